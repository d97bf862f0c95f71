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
    /// Whitespace-split tokens of a tokenized caption, as ids.
    pub fn ids(&mut self, sentence: &str) -> Vec<u32> {
        sentence
            .split_whitespace()
            .map(|w| match self.0.get(w) {
                Some(&id) => id,
                None => {
                    let id = self.0.len() as u32;
                    self.0.insert(w.to_owned(), id);
                    id
                }
            })
            .collect()
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
    let mut all: Vec<Gram> = Vec::with_capacity(ids.len() * MAX_N);
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
    let mut out: Counts = Vec::with_capacity(all.len());
    for g in all {
        match out.last_mut() {
            Some((last, c)) if *last == g => *c += 1,
            _ => out.push((g, 1)),
        }
    }
    out
}

/// Per gram, the largest count in any of `lists` (sorted by gram).
pub fn max_counts(lists: &[Counts]) -> Counts {
    let mut all: Vec<(Gram, u32)> = lists.iter().flatten().copied().collect();
    all.sort_unstable();
    let mut out: Counts = Vec::with_capacity(all.len());
    for (g, c) in all {
        match out.last_mut() {
            Some((last, m)) if *last == g => *m = (*m).max(c),
            _ => out.push((g, c)),
        }
    }
    out
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
        // Interning is sequential (one vocabulary); counting is per image and parallel.
        let mut vocab = Vocab::default();
        let ids: Vec<(Vec<Vec<u32>>, Vec<u32>)> = refs
            .iter()
            .zip(cands)
            .map(|(rs, c)| (rs.iter().map(|r| vocab.ids(r)).collect(), vocab.ids(c)))
            .collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let chunk = ids.len().div_ceil(threads).max(1);
        let images = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(rs, c)| {
                                let refs: Vec<Counts> = rs.iter().map(|r| counts(r)).collect();
                                Image {
                                    ref_lens: rs.iter().map(Vec::len).collect(),
                                    ref_max: max_counts(&refs),
                                    refs,
                                    cand: counts(c),
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
