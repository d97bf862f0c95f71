//! `--scale`: the index at corpus size, built as the retrieval-indexer builds it — one segment
//! per index job: the previous graph read back from its bytes, the segment's vectors inserted on
//! two threads, the embedding segment and the whole graph written out again — beside faiss
//! `IndexHNSWFlat` grown the same way (`faiss.read_index`, `add`, `faiss.write_index`).
//!
//! The vectors are clustered and unit length (caption embeddings cluster by subject): `clusters`
//! random unit centres, each vector its centre plus uniform noise of about 0.8 of its length,
//! normalised; the queries are drawn the same way and held out. Figures per library: build time
//! (every segment's load, insert and save), the peak and the resident memory above what the
//! process held before the build (the base vectors), the graph's size in the store, and q/s and
//! recall@10 at 1 and 2 threads. Ours adds the latency of single queries (p50/p99) alone and
//! while one more segment is inserted into the same index on two threads.

use std::path::Path;
use std::time::Instant;

use atelier_ann::{exact_top_k, normalised, AnnIndex, AnnParams, Hit};
use atelier_retrieval_indexer::segment;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::{qps, report, Args, Data};

/// `n` clustered unit vectors of `dim` dimensions around `centres`, from `seed`.
pub fn clustered(n: usize, dim: usize, centres: &[f32], seed: u64) -> Vec<f32> {
    let spread = (0.8f32 * 0.8 * 3.0 / dim as f32).sqrt();
    let clusters = centres.len() / dim;
    let mut out = vec![0f32; n * dim];
    out.par_chunks_mut(dim * 1024)
        .enumerate()
        .for_each(|(chunk, block)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (chunk as u64) << 20);
            for v in block.chunks_mut(dim) {
                let c = rng.gen_range(0..clusters);
                let centre = &centres[c * dim..(c + 1) * dim];
                for (x, m) in v.iter_mut().zip(centre) {
                    *x = m + rng.gen_range(-spread..spread);
                }
                let unit = normalised(v).expect("a centre plus small noise has length");
                v.copy_from_slice(&unit);
            }
        });
    out
}

/// The data set: `n` base vectors and `queries` held-out queries around `clusters` centres.
pub fn data(a: &Args) -> Data {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1_200_000);
    let centres = crate::random_unit(&mut rng, a.clusters, a.dim());
    Data {
        name: "clustered",
        dim: a.dim(),
        base: clustered(a.n(), a.dim(), &centres, 1),
        queries: clustered(a.queries, a.dim(), &centres, 2),
    }
}

/// A figure of this process's memory from `/proc/self/status`, in bytes (`VmRSS`, `VmHWM`).
pub fn proc_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets `VmHWM` to the current resident size (Linux `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Built {
    index: AnnIndex,
    build_s: f64,
    insert_s: f64,
    peak_above: u64,
    resident_above: u64,
    graph_bytes: u64,
}

/// Grows the index segment by segment, through the store's bytes, as index jobs do.
fn build(a: &Args, d: &Data, params: AnnParams, store: &Path) -> anyhow::Result<Built> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    let graph = store.join("graph.atl");
    let baseline = proc_bytes("VmRSS");
    reset_peak();
    let (mut insert_s, start) = (0.0, Instant::now());
    let mut index = None;
    for (s, seg) in d.base.chunks(a.segment * d.dim).enumerate() {
        let t = Instant::now();
        let g = match index.take() {
            None => AnnIndex::new(d.dim, params)?,
            Some(prev) => {
                drop(prev);
                AnnIndex::from_bytes(&std::fs::read(&graph)?, d.dim, params)?
            }
        };
        let first = (s * a.segment) as u64;
        let items: Vec<(u64, &[f32])> = (first..).zip(seg.chunks(d.dim)).collect();
        let ti = Instant::now();
        pool.install(|| g.insert_many(&items))?;
        insert_s += ti.elapsed().as_secs_f64();
        let owned: Vec<(u64, Vec<f32>)> = items.iter().map(|(k, v)| (*k, v.to_vec())).collect();
        std::fs::write(
            store.join(format!("segment-{s}.vec")),
            segment::encode(d.dim, &owned),
        )?;
        drop(owned);
        std::fs::write(&graph, g.to_bytes()?)?;
        eprintln!(
            "atelier-ann: segment {s} ({} vectors, {} in all) in {:.1} s",
            items.len(),
            g.len(),
            t.elapsed().as_secs_f64()
        );
        index = Some(g);
    }
    let index = index.ok_or_else(|| anyhow::anyhow!("no vectors"))?;
    Ok(Built {
        build_s: start.elapsed().as_secs_f64(),
        insert_s,
        peak_above: proc_bytes("VmHWM").saturating_sub(baseline),
        resident_above: proc_bytes("VmRSS").saturating_sub(baseline),
        graph_bytes: std::fs::metadata(&graph)?.len(),
        index,
    })
}

/// Single-query latencies (ms, sorted) on one thread until `stop` returns true.
fn latencies(index: &AnnIndex, queries: &[f32], dim: usize, stop: impl Fn() -> bool) -> Vec<f64> {
    let mut out = Vec::new();
    for q in queries.chunks(dim).cycle() {
        if stop() {
            break;
        }
        let t = Instant::now();
        let _ = index.search(q, 10);
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// p50/p99 of single queries alone, then while `extra` vectors are inserted on two threads.
fn latency_under_insert(index: &AnnIndex, d: &Data, extra: &[f32]) -> anyhow::Result<()> {
    let alone_until = Instant::now() + std::time::Duration::from_secs(3);
    let alone = latencies(index, &d.queries, d.dim, || Instant::now() > alone_until);
    let done = std::sync::atomic::AtomicBool::new(false);
    let first = (d.base.len() / d.dim) as u64;
    let items: Vec<(u64, &[f32])> = (first..).zip(extra.chunks(d.dim)).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    let (busy, insert_s) = std::thread::scope(|s| {
        let q = s.spawn(|| {
            latencies(index, &d.queries, d.dim, || {
                done.load(std::sync::atomic::Ordering::Relaxed)
            })
        });
        let t = Instant::now();
        let r = pool.install(|| index.insert_many(&items));
        let insert_s = t.elapsed().as_secs_f64();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r.map(|()| (q.join().unwrap_or_default(), insert_s))
    })?;
    println!(
        "{}",
        serde_json::json!({"dataset": d.name, "library": "atelier-ann",
            "latency_ms_alone": {"p50": pct(&alone, 0.5), "p99": pct(&alone, 0.99), "queries": alone.len()},
            "latency_ms_during_segment_add": {"p50": pct(&busy, 0.5), "p99": pct(&busy, 0.99),
                "queries": busy.len(), "segment": items.len(), "insert_s": insert_s}})
    );
    Ok(())
}

/// The `--scale` run: ours, then faiss on the same vectors.
pub fn run(a: &Args, python: Option<&Path>, anchor: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    let d = data(a);
    eprintln!(
        "{} clustered {}-d vectors and {} queries in {:.1} s",
        a.n(),
        a.dim(),
        a.queries,
        t.elapsed().as_secs_f64()
    );
    let keys: Vec<u64> = (0..a.n() as u64).collect();
    let truth: Vec<Vec<Hit>> = d
        .queries
        .par_chunks(d.dim)
        .map(|q| exact_top_k(q, &keys, &d.base, a.k))
        .collect();
    drop(keys);
    let efs = crate::ef_list(a)?;
    let params = AnnParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: efs[0],
    };
    let tmp = tempfile::tempdir_in(a.work_dir.as_deref().unwrap_or(Path::new(".")))?;
    let mut b = build(a, &d, params, tmp.path())?;
    println!(
        "{}",
        serde_json::json!({"dataset": d.name, "library": "atelier-ann", "n": a.n(), "dim": a.dim(),
            "segment": a.segment, "build_s": b.build_s, "insert_s": b.insert_s,
            "peak_mib_above_base": b.peak_above >> 20, "resident_mib_above_base": b.resident_above >> 20,
            "graph_mib_in_store": b.graph_bytes >> 20})
    );
    for &ef in &efs {
        b.index.set_ef_search(ef);
        let (q1, found) = qps(&b.index, &d.queries, d.dim, a.k, 1);
        let (q2, _) = qps(&b.index, &d.queries, d.dim, a.k, 2);
        report(
            a,
            &d,
            "atelier-ann",
            ef,
            b.build_s,
            &found,
            &truth,
            (q1, q2),
        );
    }
    b.index.set_ef_search(efs[0]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1_200_000);
    let centres = crate::random_unit(&mut rng, a.clusters, a.dim());
    let extra = clustered(a.segment.min(a.n()), a.dim(), &centres, 3);
    latency_under_insert(&b.index, &d, &extra)?;
    drop(b);
    let Some(py) = python else {
        eprintln!("faiss: skipped (no Python with faiss-cpu; run scripts/bench-ann)");
        return Ok(());
    };
    crate::faiss_run(a, &d, &truth, py, anchor, tmp.path(), Some(a.segment))
}
