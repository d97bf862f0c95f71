//! Search throughput of one graph, for comparing changes to the walk in one process:
//! `cargo run --release -p atelier-ann --example walk -- [n] [dim] [ef] [seconds]`.
//! Clustered unit vectors (like real embeddings), held-out queries, one thread.

use std::time::Instant;

use atelier_ann::{exact_top_k, normalised, recall, AnnIndex, AnnParams};
use rand::{Rng, SeedableRng};

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (n, dim, ef, secs) = (arg(1, 1400), arg(2, 384), arg(3, 64), arg(4, 3));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let centres: Vec<Vec<f32>> = (0..n / 14 + 1)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    let point = |rng: &mut rand_chacha::ChaCha8Rng| {
        let c = &centres[rng.gen_range(0..centres.len())];
        let v: Vec<f32> = c.iter().map(|x| x + rng.gen_range(-0.6f32..0.6)).collect();
        normalised(&v).expect("a point has length")
    };
    let base: Vec<f32> = (0..n).flat_map(|_| point(&mut rng)).collect();
    let queries: Vec<f32> = (0..200).flat_map(|_| point(&mut rng)).collect();
    let keys: Vec<u64> = (0..n as u64).collect();
    let mut index = AnnIndex::new(dim, AnnParams::default()).expect("an index");
    let items: Vec<(u64, &[f32])> = keys.iter().copied().zip(base.chunks(dim)).collect();
    let t = Instant::now();
    index.insert_many(&items).expect("inserts");
    let build = t.elapsed().as_secs_f64();
    index.set_ef_search(ef);
    let mut r = 0.0;
    for q in queries.chunks(dim) {
        r += recall(
            &index.search(q, 10).expect("search"),
            &exact_top_k(q, &keys, &base, 10),
        );
    }
    let mut rates = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs as f64 {
        let t = Instant::now();
        for q in queries.chunks(dim) {
            std::hint::black_box(index.search(q, 10).expect("search"));
        }
        rates.push(200.0 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "n {n} dim {dim} ef {ef}: build {build:.3} s, recall@10 {:.3}, median {:.0} q/s over {} passes",
        r / 200.0,
        rates[rates.len() / 2],
        rates.len()
    );
}
