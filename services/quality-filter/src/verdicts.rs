//! What the filter's models said about an image, kept in KV `atelier_verdicts` between jobs.
//!
//! A dataset is usually filtered more than once (another threshold, another caption source, new
//! images added), and the NSFW detector and CLIP cost far more per image than every other check
//! together. Their verdicts depend only on the model and the content, so they are stored under
//! keys naming both ([`atelier_contracts::dataset::ModelVerdict`]) and a later job runs the models
//! only on what it has not seen. Changing the model file or how its input is prepared (bump the
//! tag passed to [`model_id`]) changes the id, so stale verdicts are never read.

use std::io::Read as _;
use std::path::Path;

use sha2::{Digest, Sha256};

/// How the NSFW detector's input is prepared and its output read ([`crate::nsfw`]); part of its
/// model id.
pub const NSFW_TAG: &str = "nudenet-letterbox-320-triangle-best-box-v1";
/// How CLIP scores are computed (`atelier_embed::clip`); part of its model id.
pub const CLIP_TAG: &str = "clip-score-100-max-cos-v1";

/// 16 hex digits of the sha256 of `tag` and every file's name and bytes (in the order given).
pub fn model_id(tag: &str, files: &[&Path]) -> std::io::Result<String> {
    let mut h = Sha256::new();
    h.update(tag.as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        h.update([0]);
        if let Some(name) = path.file_name() {
            h.update(name.as_encoded_bytes());
        }
        h.update([0]);
        let mut f = std::fs::File::open(path)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// Where the NSFW verdict of `model` on an image is kept.
pub fn nsfw_key(model: &str, image_sha256: &str) -> String {
    format!("nsfw.{model}.{image_sha256}")
}

/// Where the CLIP score of `model` for an image and a caption is kept.
pub fn clip_key(model: &str, image_sha256: &str, caption: &str) -> String {
    let h = Sha256::new()
        .chain_update(image_sha256.as_bytes())
        .chain_update([0])
        .chain_update(caption.as_bytes())
        .finalize();
    format!("clip.{model}.{}", hex::encode(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_follow_the_bytes_names_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
        std::fs::write(&a, vec![7u8; 3 << 20]).unwrap();
        std::fs::write(&b, vec![7u8; 3 << 20]).unwrap();
        let id = model_id("t", &[&a]).unwrap();
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, model_id("t", &[&a]).unwrap());
        assert_ne!(id, model_id("t2", &[&a]).unwrap(), "tag");
        assert_ne!(id, model_id("t", &[&b]).unwrap(), "file name");
        let mut bytes = vec![7u8; 3 << 20];
        bytes[(3 << 20) - 1] = 8;
        std::fs::write(&a, bytes).unwrap();
        assert_ne!(id, model_id("t", &[&a]).unwrap(), "last byte");
        assert!(model_id("t", &[&dir.path().join("missing")]).is_err());
    }

    #[test]
    fn keys_are_valid_kv_keys_and_separate_captions() {
        let sha = "ab".repeat(32);
        let n = nsfw_key("0123456789abcdef", &sha);
        assert_eq!(n, format!("nsfw.0123456789abcdef.{sha}"));
        let c1 = clip_key("0123456789abcdef", &sha, "a red bus");
        let c2 = clip_key("0123456789abcdef", &sha, "a red bus.");
        assert_ne!(c1, c2);
        // NATS KV keys: letters, digits, '-', '_', '=', '.', '/'.
        for k in [&n, &c1] {
            assert!(k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=./".contains(c)));
        }
    }
}
