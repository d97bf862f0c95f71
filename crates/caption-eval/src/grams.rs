//! N-grams (n = 1..4) over interned tokens: a token becomes a `u32`, an n-gram a `u128` (four
//! 32-bit lanes holding id + 1, zero for absent), and a caption's n-gram counts a vector sorted by gram, so metrics compare captions
//! by merge-joins instead of hashing. The metrics only compare n-grams for equality, so this changes
//! no score, only the cost.

use rustc_hash::FxHashMap;

pub const MAX_N: usize = 4;
/// Four lanes of `token id + 1`; unused lanes are 0.
pub type Gram = u128;
/// `(gram, count)`, sorted by gram, grams distinct.
pub type Counts = Vec<(Gram, u32)>;

/// Token → id, shared by every caption of one evaluation.
#[derive(Default)]
pub struct Vocab(FxHashMap<String, u32>);

impl Vocab {
    /// The id of `w`, added when new.
    pub fn id(&mut self, w: &str) -> u32 {
        match self.0.get(w) {
            Some(&id) => id,
            None => {
                let id = self.0.len() as u32;
                self.0.insert(w.to_owned(), id);
                id
            }
        }
    }

    /// Whitespace-split tokens of a tokenized caption, as ids.
    pub fn ids(&mut self, sentence: &str) -> Vec<u32> {
        sentence.split_whitespace().map(|w| self.id(w)).collect()
    }
}

/// The gram's n (1..=4).
pub fn order(g: &Gram) -> usize {
    (1..=MAX_N)
        .take_while(|k| (g >> (32 * (k - 1))) as u32 != 0)
        .count()
}

/// Counts of every n-gram, n = 1..=4, sorted by gram.
pub fn counts(ids: &[u32]) -> Counts {
    counts_into(ids, &mut Vec::new())
}

/// [`counts`] with a scratch buffer reused across captions.
fn counts_into(ids: &[u32], all: &mut Vec<Gram>) -> Counts {
    all.clear();
    for n in 1..=MAX_N {
        for w in ids.windows(n) {
            let mut g: Gram = 0;
            for (k, &id) in w.iter().enumerate() {
                g |= ((id as u128) + 1) << (32 * k);
            }
            all.push(g);
        }
    }
    all.sort_unstable();
    let distinct = 1 + all.windows(2).filter(|w| w[0] != w[1]).count();
    let mut out: Counts = Vec::with_capacity(if all.is_empty() { 0 } else { distinct });
    for &g in all.iter() {
        match out.last_mut() {
            Some((last, c)) if *last == g => *c += 1,
            _ => out.push((g, 1)),
        }
    }
    out
}

/// Per gram, the largest count in any of `lists` (sorted by gram): pairwise merges of the
/// already sorted lists.
pub fn max_counts(lists: &[Counts]) -> Counts {
    let mut acc: Counts = Vec::new();
    for list in lists {
        let mut out: Counts = Vec::with_capacity(acc.len() + list.len());
        let (mut i, mut j) = (0, 0);
        while i < acc.len() && j < list.len() {
            match acc[i].0.cmp(&list[j].0) {
                std::cmp::Ordering::Less => {
                    out.push(acc[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(list[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    out.push((acc[i].0, acc[i].1.max(list[j].1)));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&acc[i..]);
        out.extend_from_slice(&list[j..]);
        acc = out;
    }
    acc
}

/// Calls `f(a_count, b_count)` for every gram in both sorted lists.
pub fn join(a: &Counts, b: &Counts, mut f: impl FnMut(&Gram, u32, u32)) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                f(&a[i].0, a[i].1, b[j].1);
                i += 1;
                j += 1;
            }
        }
    }
}

/// One image's captions as n-gram counts, computed once and shared by BLEU and CIDEr.
pub struct Image {
    pub refs: Vec<Counts>,
    pub ref_lens: Vec<usize>,
    /// Per gram, the largest count over the references (BLEU's clip; CIDEr's document set).
    pub ref_max: Counts,
    pub cand: Counts,
    pub cand_len: usize,
}

/// Every image of an evaluation, prepared on all cores.
pub struct Prepared {
    pub images: Vec<Image>,
}

impl Prepared {
    pub fn new(refs: &[Vec<String>], cands: &[String]) -> Self {
        // Each thread interns its images with its own vocabulary; the vocabularies are then
        // merged into one (small) and each thread maps its ids to the shared ones and counts.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let chunk = refs.len().div_ceil(threads).max(1);
        type Local = (Vocab, Vec<(Vec<Vec<u32>>, Vec<u32>)>);
        let locals: Vec<Local> = std::thread::scope(|s| {
            let handles: Vec<_> = refs
                .chunks(chunk)
                .zip(cands.chunks(chunk))
                .map(|(rp, cp)| {
                    s.spawn(move || {
                        let mut vocab = Vocab::default();
                        let ids = rp
                            .iter()
                            .zip(cp)
                            .map(|(rs, c)| {
                                (rs.iter().map(|r| vocab.ids(r)).collect(), vocab.ids(c))
                            })
                            .collect();
                        (vocab, ids)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("interning thread"))
                .collect()
        });
        let mut shared = Vocab::default();
        let maps: Vec<Vec<u32>> = locals
            .iter()
            .map(|(v, _)| {
                let mut by_local = vec![0u32; v.0.len()];
                for (w, &local) in &v.0 {
                    by_local[local as usize] = shared.id(w);
                }
                by_local
            })
            .collect();
        let images = std::thread::scope(|s| {
            let handles: Vec<_> = locals
                .iter()
                .zip(&maps)
                .map(|((_, ids), map)| {
                    s.spawn(move || {
                        let (mut scratch, mut mapped) = (Vec::new(), Vec::new());
                        let mut count = |v: &[u32]| -> Counts {
                            mapped.clear();
                            mapped.extend(v.iter().map(|&i| map[i as usize]));
                            counts_into(&mapped, &mut scratch)
                        };
                        ids.iter()
                            .map(|(rs, c)| {
                                let refs: Vec<Counts> = rs.iter().map(|r| count(r)).collect();
                                Image {
                                    ref_lens: rs.iter().map(Vec::len).collect(),
                                    ref_max: max_counts(&refs),
                                    refs,
                                    cand: count(c),
                                    cand_len: c.len(),
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("n-gram thread"))
                .collect()
        });
        Self { images }
    }
}
