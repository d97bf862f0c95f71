//! Near-duplicates by perceptual hash: Hamming distance ≤ k over 64-bit hashes, found with a
//! multi-index: split each hash into k+1 chunks; by pigeonhole, two hashes within k bits agree
//! exactly on at least one chunk, so only hashes sharing a chunk are compared.

use std::collections::HashMap;

/// For each hash (in order), the index of an earlier hash within `max_bits`, if any. The first
/// of a group is kept; later ones point at it (or at any earlier member within reach).
pub fn earlier_near_duplicates(hashes: &[Option<u64>], max_bits: u32) -> Vec<Option<usize>> {
    let chunks = (max_bits + 1).min(64) as usize;
    let bounds: Vec<(u32, u32)> = (0..chunks)
        .map(|i| {
            let lo = (i * 64 / chunks) as u32;
            let hi = ((i + 1) * 64 / chunks) as u32;
            (lo, hi)
        })
        .collect();
    let piece = |h: u64, (lo, hi): (u32, u32)| -> u64 {
        let width = hi - lo;
        if width == 64 {
            h
        } else {
            (h >> lo) & ((1u64 << width) - 1)
        }
    };
    let mut index: Vec<HashMap<u64, Vec<usize>>> = vec![HashMap::new(); chunks];
    let mut out = vec![None; hashes.len()];
    for (i, h) in hashes.iter().enumerate() {
        let Some(h) = *h else { continue };
        let mut found = None;
        'search: for (c, b) in bounds.iter().enumerate() {
            if let Some(cands) = index[c].get(&piece(h, *b)) {
                for &j in cands {
                    if let Some(o) = hashes[j] {
                        if (o ^ h).count_ones() <= max_bits {
                            found = Some(j);
                            break 'search;
                        }
                    }
                }
            }
        }
        out[i] = found;
        for (c, b) in bounds.iter().enumerate() {
            index[c].entry(piece(h, *b)).or_default().push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_pairs_within_reach() {
        // Brute force agrees on pseudo-random hashes with planted near-copies.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut hashes: Vec<Option<u64>> = Vec::new();
        for i in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 5 == 4 {
                let base: u64 = hashes[i - 3].unwrap_or(x);
                hashes.push(Some(base ^ (1u64 << (i % 64)) ^ (1u64 << ((i * 7) % 64))));
            } else if i % 11 == 0 {
                hashes.push(None);
            } else {
                hashes.push(Some(x));
            }
        }
        for k in [0u32, 2, 4, 6] {
            let got = earlier_near_duplicates(&hashes, k);
            for (i, h) in hashes.iter().enumerate() {
                let brute = h.and_then(|h| {
                    (0..i).find(|&j| hashes[j].is_some_and(|o| (o ^ h).count_ones() <= k))
                });
                assert_eq!(got[i].is_some(), brute.is_some(), "k={k} i={i}");
                if let Some(j) = got[i] {
                    assert!((hashes[j].unwrap() ^ h.unwrap()).count_ones() <= k);
                    assert!(j < i);
                }
            }
        }
    }
}
