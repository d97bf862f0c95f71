//! `atelier-ann-bench`: the HNSW index (atelier-ann) beside faiss' `IndexHNSWFlat` at the
//! same M, efConstruction and efSearch, on the same vectors, in one run. Prints one JSON line per
//! (dataset, library, efSearch): build seconds, recall@10 against exact search, queries/s with
//! 1 and 2 threads.
//!
//! Datasets: `random` (N random unit 512-d vectors, held-out random queries) and `captions`
//! (the real MiniLM embeddings of every caption in the caption conformance file; every tenth
//! caption is a query). faiss runs through `benches/faiss_anchor.py` with `--python` (a Python
//! with `faiss-cpu` and numpy; `scripts/bench-ann` installs them into `.tools/`).

mod scale;

use std::path::{Path, PathBuf};
use std::time::Instant;

use atelier_ann::{exact_top_k, normalised, recall, AnnIndex, AnnParams, Hit};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[derive(Parser)]
#[command(
    name = "atelier-ann-bench",
    about = "HNSW index beside faiss HNSW: build time, recall@10, queries/s"
)]
struct Args {
    /// Base vectors (100,000 random ones; 1,200,000 with --scale).
    #[arg(long)]
    n: Option<usize>,
    /// Dimensions (512 random; 384 with --scale).
    #[arg(long)]
    dim: Option<usize>,
    /// The index at corpus size: clustered vectors, built in segments through the store's bytes
    /// as index jobs build it (see scale.rs).
    #[arg(long)]
    scale: bool,
    /// Vectors per segment (one index job's worth) with --scale.
    #[arg(long, default_value_t = 100_000)]
    segment: usize,
    /// Cluster centres of the --scale vectors.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Where --scale writes the graph, segments and faiss' files (default: the current folder).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 128)]
    ef_construction: usize,
    /// Comma-separated efSearch values.
    #[arg(long, default_value = "64,128,256")]
    ef_search: String,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// A Python with faiss-cpu and numpy (default: .tools/bin/python when it has faiss).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The caption conformance file (default: tests/conformance/captions/pycocoevalcap-1.2.json).
    #[arg(long)]
    captions: Option<PathBuf>,
    /// Only this dataset (`random` or `captions`).
    #[arg(long)]
    only: Option<String>,
}

impl Args {
    fn n(&self) -> usize {
        self.n
            .unwrap_or(if self.scale { 1_200_000 } else { 100_000 })
    }
    fn dim(&self) -> usize {
        self.dim.unwrap_or(if self.scale { 384 } else { 512 })
    }
}

fn ef_list(a: &Args) -> anyhow::Result<Vec<usize>> {
    let efs: Vec<usize> = a
        .ef_search
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!efs.is_empty(), "--ef-search needs at least one value");
    Ok(efs)
}

struct Data {
    name: &'static str,
    dim: usize,
    base: Vec<f32>,
    queries: Vec<f32>,
}

fn random_unit(rng: &mut impl Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        out.extend(normalised(&v).expect("a random vector has length"));
    }
    out
}

fn captions_data(path: &Path) -> anyhow::Result<Data> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut texts: Vec<String> = Vec::new();
    for section in ["refs", "cands"] {
        if let Some(m) = v[section].as_object() {
            for caps in m.values() {
                match caps {
                    serde_json::Value::Array(a) => {
                        texts.extend(a.iter().filter_map(|c| c.as_str().map(str::to_owned)))
                    }
                    serde_json::Value::String(s) => texts.push(s.clone()),
                    _ => {}
                }
            }
        }
    }
    texts.sort();
    texts.dedup();
    let dir = atelier_embed::find_minilm()
        .ok_or_else(|| anyhow::anyhow!("MiniLM weights missing: run scripts/bootstrap"))?;
    let enc = atelier_embed::SentenceEncoder::load(&dir, &candle_core::Device::Cpu)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let emb = enc.embed(&refs)?;
    let dim = enc.dim;
    let (mut base, mut queries) = (Vec::new(), Vec::new());
    for (i, e) in emb.into_iter().enumerate() {
        if i % 10 == 0 {
            queries.extend(e);
        } else {
            base.extend(e);
        }
    }
    Ok(Data {
        name: "captions",
        dim,
        base,
        queries,
    })
}

fn write_f32(path: &Path, v: &[f32]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for x in v {
        out.write_all(&x.to_le_bytes())?;
    }
    out.flush()
}

fn qps(
    index: &AnnIndex,
    queries: &[f32],
    dim: usize,
    k: usize,
    threads: usize,
) -> (f64, Vec<Vec<Hit>>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let mut rates = Vec::new();
    let mut found = Vec::new();
    let start = Instant::now();
    while rates.len() < MIN_PASSES || start.elapsed().as_secs_f64() < MIN_SECONDS {
        let t = Instant::now();
        found = pool.install(|| {
            queries
                .par_chunks(dim)
                .map(|q| index.search(q, k).expect("search"))
                .collect()
        });
        rates.push(queries.len() as f64 / dim as f64 / t.elapsed().as_secs_f64());
    }
    (median(rates), found)
}

/// Passes over the queries per measurement: at least this many, and for at least this long;
/// the median pass's rate is reported (faiss' side measures the same way).
const MIN_PASSES: usize = 5;
const MIN_SECONDS: f64 = 1.0;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One JSON line: a library's figures at one efSearch.
#[allow(clippy::too_many_arguments)]
fn report(
    a: &Args,
    d: &Data,
    library: &str,
    ef: usize,
    build_s: f64,
    found: &[Vec<Hit>],
    truth: &[Vec<Hit>],
    (q1, q2): (f64, f64),
) {
    let r = found
        .iter()
        .zip(truth)
        .map(|(f, t)| recall(f, t))
        .sum::<f64>()
        / truth.len() as f64;
    println!(
        "{}",
        serde_json::json!({"dataset": d.name, "library": library,
            "n": d.base.len() / d.dim, "dim": d.dim, "queries": truth.len(), "m": a.m,
            "ef_construction": a.ef_construction, "ef_search": ef,
            "build_s": build_s, "recall_at_10": r, "qps_1_thread": q1, "qps_2_threads": q2})
    );
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let efs = ef_list(&a)?;
    let python = a.python.clone().or_else(|| {
        let p = PathBuf::from(".tools/bin/python");
        let ok = std::process::Command::new(&p)
            .args(["-c", "import faiss, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(p)
    });
    let anchor = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/faiss_anchor.py");
    if a.scale {
        return scale::run(&a, python.as_deref(), &anchor);
    }
    let mut sets = Vec::new();
    if a.only.as_deref().is_none_or(|o| o == "captions") {
        let path = a
            .captions
            .clone()
            .unwrap_or_else(|| PathBuf::from("tests/conformance/captions/pycocoevalcap-1.2.json"));
        sets.push(captions_data(&path)?);
    }
    if a.only.as_deref().is_none_or(|o| o == "random") {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
        sets.push(Data {
            name: "random",
            dim: a.dim(),
            base: random_unit(&mut rng, a.n(), a.dim()),
            queries: random_unit(&mut rng, a.queries, a.dim()),
        });
    }
    let tmp = tempfile::tempdir()?;
    for d in sets {
        let n = d.base.len() / d.dim;
        let keys: Vec<u64> = (0..n as u64).collect();
        let truth: Vec<Vec<Hit>> = d
            .queries
            .par_chunks(d.dim)
            .map(|q| exact_top_k(q, &keys, &d.base, a.k))
            .collect();
        let mut index = AnnIndex::new(
            d.dim,
            AnnParams {
                m: a.m,
                ef_construction: a.ef_construction,
                ef_search: efs[0],
            },
        )?;
        let items: Vec<(u64, &[f32])> = keys.iter().copied().zip(d.base.chunks(d.dim)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        let t = Instant::now();
        pool.install(|| index.insert_many(&items))?;
        let build = t.elapsed().as_secs_f64();
        for &ef in &efs {
            index.set_ef_search(ef);
            let (q1, found) = qps(&index, &d.queries, d.dim, a.k, 1);
            let (q2, _) = qps(&index, &d.queries, d.dim, a.k, 2);
            report(&a, &d, "atelier-ann", ef, build, &found, &truth, (q1, q2));
        }
        #[cfg(feature = "hnsw-rs-bench")]
        hnsw_rs_run(&a, &d, &efs, &truth);
        let Some(py) = &python else {
            eprintln!("faiss: skipped (no Python with faiss-cpu; run scripts/bench-ann)");
            continue;
        };
        faiss_run(&a, &d, &truth, py, &anchor, tmp.path(), None)?;
    }
    Ok(())
}

/// faiss on the same vectors and exact neighbours (`benches/faiss_anchor.py`), its JSON lines
/// passed through; with `segment`, grown segment by segment through its index file.
fn faiss_run(
    a: &Args,
    d: &Data,
    truth: &[Vec<Hit>],
    py: &Path,
    anchor: &Path,
    dir: &Path,
    segment: Option<usize>,
) -> anyhow::Result<()> {
    let (b, q, g) = (
        dir.join(format!("{}-base.f32", d.name)),
        dir.join(format!("{}-queries.f32", d.name)),
        dir.join(format!("{}-truth.i64", d.name)),
    );
    write_f32(&b, &d.base)?;
    write_f32(&q, &d.queries)?;
    let gt: Vec<u8> = truth
        .iter()
        .flat_map(|t| {
            (0..a.k).flat_map(move |i| t.get(i).map_or(-1i64, |h| h.key as i64).to_le_bytes())
        })
        .collect();
    std::fs::write(&g, gt)?;
    let mut cmd = std::process::Command::new(py);
    cmd.arg(anchor)
        .args(["--dataset", d.name])
        .args(["--dim", &d.dim.to_string()])
        .args(["--m", &a.m.to_string()])
        .args(["--ef-construction", &a.ef_construction.to_string()])
        .args(["--ef-search", &a.ef_search])
        .args(["--k", &a.k.to_string()]);
    if let Some(s) = segment {
        cmd.args(["--segment", &s.to_string()])
            .arg("--work-dir")
            .arg(dir);
    }
    let out = cmd
        .arg(&b)
        .arg(&q)
        .arg(&g)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(out.status.success(), "faiss anchor failed ({})", out.status);
    Ok(())
}

/// The same measurement with hnsw_rs (DistDot on unit vectors), the other candidate.
#[cfg(feature = "hnsw-rs-bench")]
fn hnsw_rs_run(a: &Args, d: &Data, efs: &[usize], truth: &[Vec<Hit>]) {
    use hnsw_rs::prelude::*;
    let n = d.base.len() / d.dim;
    let mut h = Hnsw::<f32, DistDot>::new(a.m, n, 16, a.ef_construction, DistDot {});
    let items: Vec<(&[f32], usize)> = d.base.chunks(d.dim).zip(0..n).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let t = Instant::now();
    pool.install(|| h.parallel_insert_slice(&items));
    let build = t.elapsed().as_secs_f64();
    h.set_searching_mode(true);
    for &ef in efs {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let t = Instant::now();
            let found: Vec<Vec<Hit>> = pool.install(|| {
                d.queries
                    .par_chunks(d.dim)
                    .map(|q| {
                        h.search(q, a.k, ef)
                            .into_iter()
                            .map(|nb| Hit {
                                key: nb.d_id as u64,
                                score: 1.0 - nb.distance,
                            })
                            .collect()
                    })
                    .collect()
            });
            (
                d.queries.len() as f64 / d.dim as f64 / t.elapsed().as_secs_f64(),
                found,
            )
        };
        let (q1, found) = run(1);
        let (q2, _) = run(2);
        report(a, d, "hnsw_rs 0.3.5", ef, build, &found, truth, (q1, q2));
    }
}
