//! Embedding segments: the vectors an index job computed, so no replica ever embeds a record twice.
//!
//! ```text
//! b"ATLVEC1\0"  dim: u32 LE  count: u32 LE  then count × (key: u64 LE, dim × f32 LE)
//! ```

use std::collections::HashMap;

const MAGIC: &[u8; 8] = b"ATLVEC1\0";

/// Encodes `(key, vector)` pairs of one dimension.
pub fn encode(dim: usize, items: &[(u64, Vec<f32>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + items.len() * (8 + 4 * dim));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for (key, v) in items {
        debug_assert_eq!(v.len(), dim);
        out.extend_from_slice(&key.to_le_bytes());
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Decodes a segment into `into` (a later segment's vector for a key replaces an earlier one).
pub fn decode_into(
    bytes: &[u8],
    dim: usize,
    into: &mut HashMap<u64, Vec<f32>>,
) -> Result<(), String> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err("not an ATLVEC1 segment".to_owned());
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let got = word(8) as usize;
    if got != dim {
        return Err(format!(
            "segment holds {got}-dimensional vectors, expected {dim}"
        ));
    }
    let count = word(12) as usize;
    let record = 8 + 4 * dim;
    if bytes.len() != 16 + count * record {
        return Err(format!(
            "segment is {} bytes; {count} records of {dim} dimensions need {}",
            bytes.len(),
            16 + count * record
        ));
    }
    for r in bytes[16..].chunks_exact(record) {
        let mut k = [0u8; 8];
        k.copy_from_slice(&r[..8]);
        let v = r[8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        into.insert(u64::from_le_bytes(k), v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_and_later_wins() {
        let a = encode(2, &[(1, vec![1.0, 2.0]), (2, vec![3.0, 4.0])]);
        let b = encode(2, &[(2, vec![5.0, 6.0])]);
        let mut m = HashMap::new();
        decode_into(&a, 2, &mut m).unwrap();
        decode_into(&b, 2, &mut m).unwrap();
        assert_eq!(m[&1], vec![1.0, 2.0]);
        assert_eq!(m[&2], vec![5.0, 6.0]);
        assert!(decode_into(&a, 3, &mut m)
            .unwrap_err()
            .contains("2-dimensional"));
        assert!(decode_into(&a[..20], 2, &mut m).is_err());
        assert!(decode_into(b"garbage", 2, &mut m).is_err());
    }
}
