//! What a `.safetensors` file says about itself without loading it: its tensors' names and shapes
//! and its `__metadata__` (kohya's `ss_*` training fields, A1111's `modelspec.*`). Read from the
//! file's JSON header only, so the gateway can describe LoRAs and embeddings without the engine.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Headers larger than this are refused (real ones are kilobytes to a few megabytes).
const MAX_HEADER: u64 = 64 << 20;

/// A safetensors file's header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    /// Tensor name → shape.
    pub tensors: BTreeMap<String, Vec<u64>>,
    /// `__metadata__` (string values only, as the format defines it).
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("reading the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a safetensors file: {0}")]
    Format(String),
}

/// The header of the safetensors file at `path`.
pub fn read(path: &Path) -> Result<Header, HeaderError> {
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len == 0 || len > MAX_HEADER {
        return Err(HeaderError::Format(format!(
            "header length {len} (at most {MAX_HEADER})"
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(HeaderError::Format("the header is cut short".into()));
    }
    parse(&buf)
}

/// A header from its JSON bytes.
pub fn parse(json: &[u8]) -> Result<Header, HeaderError> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| HeaderError::Format(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| HeaderError::Format("the header is not a JSON object".into()))?;
    let mut h = Header::default();
    for (name, entry) in obj {
        if name == "__metadata__" {
            for (k, v) in entry.as_object().into_iter().flatten() {
                if let Some(s) = v.as_str() {
                    h.metadata.insert(k.clone(), s.to_owned());
                }
            }
            continue;
        }
        let shape = entry["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| HeaderError::Format(format!("tensor {name:?} has no shape")))?;
        h.tensors.insert(name.clone(), shape);
    }
    Ok(h)
}

/// A textual-inversion embedding's (vectors, width) as A1111 reports them: the first tensor of
/// A1111's (`emb_params`), the older (`string_to_param.*`) or SDXL's (`clip_l`/`clip_g`, widths
/// summed) layouts.
pub fn embedding_shape(h: &Header) -> Option<(u64, u64)> {
    let two_d = |s: &Vec<u64>| match s.as_slice() {
        [v, w] => Some((*v, *w)),
        [w] => Some((1, *w)),
        _ => None,
    };
    if let (Some(l), Some(g)) = (h.tensors.get("clip_l"), h.tensors.get("clip_g")) {
        let ((v, wl), (_, wg)) = (two_d(l)?, two_d(g)?);
        return Some((v, wl + wg));
    }
    h.tensors
        .iter()
        .find(|(k, _)| *k == "emb_params" || k.starts_with("string_to_param"))
        .or_else(|| h.tensors.iter().next())
        .and_then(|(_, s)| two_d(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str) -> tempfile::NamedTempFile {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    #[test]
    fn shapes_and_metadata_come_from_the_header() {
        let f = file(
            r#"{"__metadata__":{"ss_network_dim":"4","n":"x"},"emb_params":{"dtype":"F32","shape":[3,768],"data_offsets":[0,16]}}"#,
        );
        let h = read(f.path()).unwrap();
        assert_eq!(h.metadata["ss_network_dim"], "4");
        assert_eq!(embedding_shape(&h), Some((3, 768)));

        let sdxl = parse(br#"{"clip_l":{"shape":[2,768]},"clip_g":{"shape":[2,1280]}}"#).unwrap();
        assert_eq!(embedding_shape(&sdxl), Some((2, 2048)));
    }

    #[test]
    fn other_files_are_refused_with_a_reason() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(read(f.path()), Err(HeaderError::Format(_))));
        assert!(parse(b"[1]").is_err());
        assert!(parse(br#"{"t":{"dtype":"F32"}}"#).is_err());
    }
}
