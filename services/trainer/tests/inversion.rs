//! Textual inversion on a tiny SD 1 model: only the embedding's vectors get gradients and they
//! start from the initial text's token rows, the loss falls, the file loads through the
//! sampler's embedding loader in A1111's layout and changes images where the name is in the
//! prompt, and an embedding trained to step s continues from s under A1111's rate schedule.

use atelier_contracts::embedding::EmbeddingTrainSpec;
use atelier_contracts::TrainSpec;
use atelier_diffusion::conditioning::Embedding;
use atelier_diffusion::pipeline::{Placement, StableDiffusion};
use atelier_diffusion::torch::inversion::TrainableEmbedding;
use atelier_diffusion::torch::weights::to_candle;
use atelier_diffusion::train::Group;
use atelier_trainer::session::{prepare, Session, Source};

mod common;
use common::*;

const NAME: &str = "sqtok";

fn inversion_spec(steps: u32, learn_rate: &str) -> TrainSpec {
    let mut s = spec();
    s.output_name = NAME.into();
    s.max_train_steps = steps;
    s.embedding = Some(EmbeddingTrainSpec {
        learn_rate: learn_rate.into(),
        templates: vec!["a photo of [name], [filewords]".into()],
        num_vectors: 2,
        init_text: "square".into(),
    });
    s
}

fn start(dir: &std::path::Path, s: &TrainSpec, file: Option<&[u8]>) -> Session {
    let m = model(dir);
    let sources = shapes(3)
        .into_iter()
        .map(|(image, caption)| Source {
            image,
            caption,
            weight: 1.0,
            repeats: 1,
            is_class: false,
        })
        .collect();
    let ex = prepare(&m, s, sources).unwrap();
    Session::starting_from(m, s, ex, file).unwrap()
}

/// The first text encoder's vectors of `e`, flat.
fn flat(e: &TrainableEmbedding) -> Vec<f32> {
    to_candle(&e.vectors[0])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn vectors(run: &Session) -> Vec<f32> {
    flat(run.embedding().expect("an embedding run"))
}

#[test]
fn only_the_vectors_train_and_they_start_from_the_initial_text() {
    let dir = tempfile::tempdir().unwrap();
    let s = inversion_spec(10, "0.05");
    let mut run = start(dir.path(), &s, None);
    assert!(run.network().is_none(), "textual inversion attached a LoRA");
    // The vectors start as the text's token rows, spread as A1111 spreads them: vector i is
    // token ⌊i·k/n⌋'s row of the first k ≤ n tokens.
    let m = model(dir.path());
    let ids = m.tokenizer(0).unwrap().encode("square").unwrap();
    let te = &m.torch().text[0];
    for n in [1usize, 2, 5] {
        let k = ids.len().min(n);
        let picked: Vec<i64> = (0..n).map(|i| ids[i * k / n] as i64).collect();
        let want = te.token_rows(&picked);
        let got = TrainableEmbedding::from_text(&m, NAME, "square", n).unwrap();
        assert_eq!(got.len(), n);
        assert!(got.vectors[0].detach().equal(&want), "{n} vectors");
    }
    let v = vectors(&run);
    let want = flat(&TrainableEmbedding::from_text(&m, NAME, "square", 2).unwrap());
    assert_eq!(v, want, "the run starts from the initial text");
    let zeros = TrainableEmbedding::from_text(&m, NAME, "", 3).unwrap();
    assert_eq!(zeros.len(), 3);
    assert_eq!(
        zeros.vectors[0].abs().sum(tch_kind()).double_value(&[]),
        0.0
    );
    // The only gradient is the vectors', and it is not zero.
    let grads = run.gradients().unwrap();
    assert_eq!(
        grads.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["vectors.0"]
    );
    let g: f32 = grads[0]
        .1
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(g > 0.0 && g.is_finite(), "no gradient reached the vectors");
}

fn tch_kind() -> atelier_diffusion::torch::Kind {
    atelier_diffusion::torch::Kind::Float
}

#[test]
fn the_loss_falls_and_the_file_changes_images_with_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = inversion_spec(30, "0.05");
    let mut run = start(dir.path(), &s, None);
    let before = fixed_loss(&mut run);
    let initial = run.output_file("tiny", "abc").unwrap();
    while !run.done() {
        run.train_step().unwrap();
    }
    let after = fixed_loss(&mut run);
    assert!(
        after < before,
        "loss did not fall: {before:.5} → {after:.5}"
    );
    assert_eq!(run.history.len(), 30);
    // A1111's layout: one `emb_params` [2, D] tensor, the step in the metadata.
    let file = run.output_file("tiny", "abc").unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(st.names(), ["emb_params"]);
    assert_eq!(st.tensor("emb_params").unwrap().shape()[0], 2);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["step"], "30");
    assert_eq!(meta["sd_checkpoint"], "abc");
    // Through the sampler's loader: the trained vectors change an image whose prompt names the
    // embedding, relative to the initial ones, and leave a prompt without the name alone.
    let base = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let with = |bytes: &[u8]| {
        base.with_embeddings(vec![Embedding::from_safetensors(NAME, bytes).unwrap()])
    };
    let (fresh, trained) = (with(&initial), with(&file));
    let named = format!("a photo of {NAME}, red square");
    assert!(max_diff(&render(&fresh, &named), &render(&trained, &named)) > 2);
    assert_eq!(render(&fresh, "red square"), render(&trained, "red square"));
}

#[test]
fn an_embedding_continues_from_its_step_under_a1111s_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = start(dir.path(), &inversion_spec(4, "0.05"), None);
    while !run.done() {
        run.train_step().unwrap();
    }
    let file = run.output_file("tiny", "abc").unwrap();
    let trained = vectors(&run);
    // Continued to step 8 with rates 0.05 until step 6, then 0.01.
    let s = inversion_spec(8, "0.05:6, 0.01");
    let mut more = start(dir.path(), &s, Some(&file));
    assert_eq!(more.step, 4);
    assert_eq!(vectors(&more), trained);
    assert_eq!(more.lr(Group::Text, 5), 0.05);
    assert_eq!(more.lr(Group::Text, 6), 0.01);
    let mut n = 0;
    while !more.done() {
        let p = more.train_step().unwrap();
        assert_eq!(p.step, 5 + n);
        n += 1;
    }
    assert_eq!(n, 4);
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&more.output_file("tiny", "abc").unwrap()).unwrap();
    assert_eq!(meta.metadata().clone().unwrap()["step"], "8");
    // An embedding for another text-encoder width is refused with the reason.
    let wide = Embedding {
        name: NAME.into(),
        vectors: vec![candle_core::Tensor::zeros(
            (2, 7),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap()],
    };
    let mut t = std::collections::HashMap::new();
    t.insert("emb_params".to_string(), wide.vectors[0].clone());
    let bytes = atelier_diffusion::train::serialize(&t, &Default::default()).unwrap();
    let m = model(dir.path());
    let err = TrainableEmbedding::from_file(&m, NAME, &bytes)
        .err()
        .unwrap();
    assert!(err.to_string().contains("7 wide"), "{err}");
}
