//! eval-captions throughput beside pycocoevalcap, in one run.
//!
//! `cargo bench -p atelier-caption-eval --bench eval` (or `just bench`). Generates 5,000 images
//! with 5 references and 1 candidate each (deterministic, with the punctuation, quotes, brackets,
//! clitics and abbreviations the tokenizer must handle), then times:
//! - atelier: tokenization + BLEU-1..4 + ROUGE-L + CIDEr-D, median of 5 runs;
//! - pycocoevalcap 1.2 (`.tools/bin/python`, PTBTokenizer via java + Bleu(4) + Rouge + Cider;
//!   METEOR excluded on both sides), median of 3 runs, timed inside Python (interpreter start-up
//!   excluded, the tokenizer's java process included, as it is part of every pycocoevalcap run);
//!
//! It also checks that both give the same corpus scores (1e-6). The Python side needs `.tools/bin/pip install --no-deps pycocoevalcap==1.2` and java.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGES: usize = 5000;
const REFS: usize = 5;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn caption(rng: &mut Rng) -> String {
    let det = ["A", "The", "Two", "Some", "An old", "A young", "One", "a"];
    let subj = [
        "cat", "dog", "man", "surfer", "red car", "giraffe", "bus", "train", "chef", "couple",
    ];
    let verb = [
        "sitting",
        "standing",
        "running",
        "eating",
        "lying",
        "riding a wave",
        "parked",
        "waiting",
    ];
    let place = [
        "on a beach",
        "in a kitchen",
        "on the street",
        "near the ocean",
        "in a grassy field",
        "under a tree",
        "at the station",
    ];
    let extra = [
        "",
        " with two friends",
        " (blurry photo)",
        " near a \"stop\" sign",
        " -- it's a busy day",
        " while it's raining",
        ", looking at the camera",
        " at 5 p.m.",
        " in the U.S.",
        " on a sunny day",
        " and they don't care",
    ];
    let end = ["", ".", "!", " .", "?!"];
    format!(
        "{} {} {} {}{}{}",
        rng.pick(&det),
        rng.pick(&subj),
        rng.pick(&verb),
        rng.pick(&place),
        rng.pick(&extra),
        rng.pick(&end)
    )
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

const PY: &str = r#"
import json, sys, time
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.cider.cider import Cider
refs = json.load(open(sys.argv[1])); cands = json.load(open(sys.argv[2]))
t = time.perf_counter()
gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in cands.items()})
out = {}
b, _ = Bleu(4).compute_score(gts, res, verbose=0)
for i, x in enumerate(b): out["Bleu_%d" % (i + 1)] = x
out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
out["CIDEr"], _ = Cider().compute_score(gts, res)
out["seconds"] = time.perf_counter() - t
print(json.dumps(out))
"#;

fn main() {
    let mut rng = Rng(0x5eed);
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cands: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..IMAGES {
        let id = format!("img{i:05}");
        refs.insert(id.clone(), (0..REFS).map(|_| caption(&mut rng)).collect());
        cands.insert(id, caption(&mut rng));
    }
    if std::env::var_os("PROFILE").is_some() {
        profile(&refs, &cands);
        return;
    }
    println!("eval-captions: {IMAGES} candidates × {REFS} references (tokenize + BLEU-1..4 + ROUGE-L + CIDEr-D; METEOR excluded)");
    let mut ours = Vec::new();
    let mut scores = None;
    for _ in 0..5 {
        let t = Instant::now();
        scores = Some(atelier_caption_eval::evaluate(&refs, &cands).expect("valid input"));
        ours.push(t.elapsed());
    }
    let ours = median(ours);
    let scores = scores.expect("ran");
    println!(
        "atelier (Rust):        median {:>9.1} ms",
        ours.as_secs_f64() * 1e3
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".tools/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import pycocoevalcap"])
        .output();
    if !matches!(probe, Ok(ref o) if o.status.success()) {
        println!("pycocoevalcap:         not installed (.tools/bin/pip install --no-deps pycocoevalcap==1.2); no side-by-side figure");
        return;
    }
    let dir = std::env::temp_dir().join(format!("atelier-caption-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("refs.json"),
        serde_json::to_string(&refs).expect("json"),
    )
    .expect("write");
    std::fs::write(
        dir.join("cands.json"),
        serde_json::to_string(&cands).expect("json"),
    )
    .expect("write");
    let mut theirs = Vec::new();
    let mut reference = serde_json::Value::Null;
    for _ in 0..3 {
        let out = Command::new(&python)
            .arg("-c")
            .arg(PY)
            .arg(dir.join("refs.json"))
            .arg(dir.join("cands.json"))
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "pycocoevalcap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        reference = serde_json::from_str(line.lines().last().expect("output")).expect("json");
        theirs.push(Duration::from_secs_f64(
            reference["seconds"].as_f64().expect("seconds"),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let theirs = median(theirs);
    println!(
        "pycocoevalcap 1.2:     median {:>9.1} ms",
        theirs.as_secs_f64() * 1e3
    );
    println!(
        "speed-up:              {:.1}×",
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
    let mut worst: f64 = 0.0;
    for (metric, ours) in &scores.corpus {
        let theirs = reference[metric].as_f64().expect("metric");
        worst = worst.max((ours - theirs).abs());
        println!("  {metric:<8} atelier {ours:.9}  pycocoevalcap {theirs:.9}");
    }
    println!(
        "largest corpus-score difference: {worst:.2e} ({})",
        if worst <= 1e-6 { "agree" } else { "DISAGREE" }
    );
}

/// `PROFILE=1`: time each stage single-threaded instead.
fn profile(refs: &BTreeMap<String, Vec<String>>, cands: &BTreeMap<String, String>) {
    let t = Instant::now();
    let ids: Vec<&String> = cands.keys().collect();
    let tr: Vec<Vec<String>> = ids
        .iter()
        .map(|id| {
            refs[*id]
                .iter()
                .map(|c| atelier_caption_eval::ptb::tokenize(c))
                .collect()
        })
        .collect();
    let tc: Vec<String> = ids
        .iter()
        .map(|id| atelier_caption_eval::ptb::tokenize(&cands[*id]))
        .collect();
    eprintln!("tokenize {:?}", t.elapsed());
    let t = Instant::now();
    let prepared = atelier_caption_eval::grams::Prepared::new(&tr, &tc);
    eprintln!("n-grams {:?}", t.elapsed());
    let t = Instant::now();
    atelier_caption_eval::bleu::score_prepared(&prepared);
    eprintln!("bleu {:?}", t.elapsed());
    let t = Instant::now();
    atelier_caption_eval::rouge::score(&tr, &tc);
    eprintln!("rouge {:?}", t.elapsed());
    let t = Instant::now();
    atelier_caption_eval::cider::score_prepared(&prepared);
    eprintln!("cider {:?}", t.elapsed());
}
