//! Replays the references of `tests/conformance/models/` (what diffusers and transformers compute
//! from small models with the real structures): the CLIP tokenizer, text encoders, UNets, the
//! VAE's decode and encode, a kohya LoRA applied to a base case, and whole txt2img runs from given
//! latents or from seeds. One [`Line`] per check with its largest difference against the case's
//! tolerance.
//!
//! The transformer families' cases (FLUX.1, SD 3.5) go through [`super::flow`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::components::{self, Components};
use super::{flow, pipelines, tokenizer};
use crate::lora::LoraFile;
use crate::pipeline::StableDiffusion;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    family: String,
    #[serde(default)]
    model: Option<String>,
    tensors: String,
    tolerance: Tolerance,
    checks: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct Tolerance {
    abs: f64,
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Line {
    pub case: String,
    pub check: String,
    /// The largest absolute difference per element; None when skipped.
    pub max_diff: Option<f64>,
    pub tolerance: f64,
    /// Why it did not run or could not compare (skipped or failed).
    pub note: Option<String>,
    pub passed: bool,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match (self.passed, self.max_diff, &self.note) {
            (true, _, _) => "ok  ",
            (false, None, Some(_)) if self.skipped() => "skip",
            _ => "FAIL",
        };
        write!(f, "{status} {}/{}", self.case, self.check)?;
        if let Some(d) = self.max_diff {
            write!(f, ": max |diff| {d:.3e} (tolerance {:.1e})", self.tolerance)?;
        }
        if let Some(n) = &self.note {
            write!(f, " — {n}")?;
        }
        Ok(())
    }
}

impl Line {
    pub fn skipped(&self) -> bool {
        !self.passed
            && self.max_diff.is_none()
            && self
                .note
                .as_deref()
                .is_some_and(|n| n.starts_with("skipped"))
    }
}

/// Every case folder under `dir` (or `dir` itself when it holds a `case.json`), in name order.
pub fn replay_dir(dir: &Path) -> Result<Vec<Line>, String> {
    let mut cases: Vec<PathBuf> =
        if dir.join("case.json").is_file() || dir.join("cases.json").is_file() {
            vec![dir.to_path_buf()]
        } else {
            std::fs::read_dir(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("case.json").is_file() || p.join("cases.json").is_file())
                .collect()
        };
    if cases.is_empty() {
        return Err(format!(
            "{}: no case folders (each holds a case.json; tests/conformance/models is one such folder)",
            dir.display()
        ));
    }
    cases.sort();
    let mut lines = Vec::new();
    for c in cases {
        lines.extend(replay_case(&c)?);
    }
    Ok(lines)
}

/// Where a case's model comes from: its folder, or a base case's with a LoRA at a weight.
struct Source {
    dir: PathBuf,
    lora: Option<(LoraFile, f64)>,
}

impl Source {
    fn lora(&self) -> Option<(&LoraFile, f64)> {
        self.lora.as_ref().map(|(f, w)| (f, *w))
    }
}

/// The case's models, each loaded on first use.
#[derive(Default)]
struct Loaded {
    source: Option<Result<Source, String>>,
    components: Option<Result<Components, String>>,
    pipeline: Option<Result<StableDiffusion, String>>,
    flow: Option<Result<crate::flow::FlowModel, String>>,
}

impl Loaded {
    fn components(&mut self, case: &Case, dir: &Path) -> Result<&Components, String> {
        let source = source_of(&mut self.source, case, dir);
        once(&mut self.components, || {
            source.and_then(|s| components::load(&s.dir, s.lora()))
        })
    }

    fn flow(&mut self, case: &Case, dir: &Path) -> Result<&crate::flow::FlowModel, String> {
        let source = source_of(&mut self.source, case, dir);
        once(&mut self.flow, || {
            source.and_then(|s| flow::load(&s.dir, s.lora()))
        })
    }

    fn pipeline(&mut self, case: &Case, dir: &Path) -> Result<&StableDiffusion, String> {
        let source = source_of(&mut self.source, case, dir);
        once(&mut self.pipeline, || {
            source.and_then(|s| pipelines::load(&s.dir, s.lora()))
        })
    }
}

/// The case's model folder, unless a lora check set another source first.
fn source_of<'a>(
    slot: &'a mut Option<Result<Source, String>>,
    case: &Case,
    dir: &Path,
) -> Result<&'a Source, String> {
    once(slot, || match &case.model {
        Some(m) if dir.join(m).is_dir() => Ok(Source {
            dir: dir.join(m),
            lora: None,
        }),
        _ => Err(format!(
            "{}: no model folder and no lora check before this one",
            dir.display()
        )),
    })
}

/// What `slot` holds, made by `make` on first use (a failure is kept and repeated).
fn once<T>(
    slot: &mut Option<Result<T, String>>,
    make: impl FnOnce() -> Result<T, String>,
) -> Result<&T, String> {
    slot.get_or_insert_with(make).as_ref().map_err(Clone::clone)
}

/// One case folder's checks (a `cases.json` folder holds tokenizer cases instead).
pub fn replay_case(dir: &Path) -> Result<Vec<Line>, String> {
    if !dir.join("case.json").is_file() {
        return tokenizer::replay(dir);
    }
    let case: Case = read_json(&dir.join("case.json"))?;
    let tensors = candle_core::safetensors::load(dir.join(&case.tensors), &Device::Cpu)
        .map_err(|e| format!("{}: {e}", dir.join(&case.tensors).display()))?;
    let mut loaded = Loaded::default();
    let mut lines = Vec::new();
    for (i, check) in case.checks.iter().enumerate() {
        let kind = check["kind"].as_str().unwrap_or("?");
        let label = format!(
            "{i}:{kind}{}",
            check["component"]
                .as_str()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        );
        let mut line = Line {
            case: case.name.clone(),
            check: label,
            max_diff: None,
            tolerance: case.tolerance.abs,
            note: None,
            passed: false,
        };
        if kind == "tokenizer_t5" {
            match t5_tokenizer(dir, &case, check) {
                Ok(()) => {
                    line.max_diff = Some(0.0);
                    line.passed = true;
                }
                Err(e) => line.note = Some(e),
            }
            lines.push(line);
            continue;
        }
        if kind == "text_encoder_t5" {
            match t5_encoder(dir, &case, check, &tensors) {
                Ok(d) => {
                    line.max_diff = Some(d);
                    line.passed = d <= case.tolerance.abs;
                }
                Err(e) => line.note = Some(e),
            }
            lines.push(line);
            continue;
        }
        if kind == "lora" {
            let source = lora_source(dir, check);
            match &source {
                Ok(_) => line.passed = true,
                Err(e) => line.note = Some(e.clone()),
            }
            loaded = Loaded {
                source: Some(source),
                ..Loaded::default()
            };
            lines.push(line);
            continue;
        }
        let transformer = case.family.starts_with("flux") || case.family.starts_with("sd3");
        let result = if transformer {
            loaded
                .flow(&case, dir)
                .and_then(|m| flow::run_check(m, kind, check, &tensors))
        } else if kind == "pipeline" {
            loaded
                .pipeline(&case, dir)
                .and_then(|m| pipelines::run(m, check, &tensors))
                .and_then(|(got, want)| diff(&got, &want))
                .map_err(|e| format!("pipeline: {e}"))
        } else {
            loaded
                .components(&case, dir)
                .and_then(|m| run_check(m, kind, check, &tensors))
        };
        match result {
            Ok(d) => {
                line.max_diff = Some(d);
                line.passed = d <= case.tolerance.abs;
            }
            Err(e) => line.note = Some(e),
        }
        lines.push(line);
    }
    Ok(lines)
}

/// T5's tokenizer against the reference's ids (and lengths before truncation) for every text.
fn t5_tokenizer(dir: &Path, case: &Case, check: &Value) -> Result<(), String> {
    let model = case
        .model
        .as_deref()
        .ok_or("tokenizer_t5 without a model folder")?;
    let component = check["component"]
        .as_str()
        .ok_or("tokenizer_t5 without a component")?;
    let tok =
        atelier_modelkit::t5_tokenizer::T5Tokenizer::from_dir(&dir.join(model).join(component))
            .map_err(|e| e.to_string())?;
    let max = check["max_length"]
        .as_u64()
        .ok_or("tokenizer_t5 without max_length")? as usize;
    let texts = check["texts"]
        .as_array()
        .ok_or("tokenizer_t5 without texts")?;
    for (i, text) in texts.iter().enumerate() {
        let text = text.as_str().ok_or("a text that is not a string")?;
        let got = tok.encode(text, max).map_err(|e| e.to_string())?;
        let want: Vec<u32> = serde_json::from_value(check["input_ids"][i].clone())
            .map_err(|e| format!("input_ids[{i}]: {e}"))?;
        if got.ids != want {
            return Err(format!(
                "{text:?}: ids {:?}, the reference's {want:?}",
                got.ids
            ));
        }
        let len = check["untruncated_lengths"][i].as_u64();
        if len.is_some_and(|l| l as usize != got.untruncated) {
            return Err(format!(
                "{text:?}: {} ids before truncation, the reference's {len:?}",
                got.untruncated
            ));
        }
    }
    Ok(())
}

/// The T5 encoder's last hidden state for the reference's ids, against the reference's.
fn t5_encoder(dir: &Path, case: &Case, check: &Value, t: &Tensors) -> Result<f64, String> {
    use crate::torch::weights::{from_candle, to_candle};
    let model = case
        .model
        .as_deref()
        .ok_or("text_encoder_t5 without a model folder")?;
    let component = check["component"]
        .as_str()
        .ok_or("text_encoder_t5 without a component")?;
    let enc = crate::torch::t5::T5Encoder::load(&dir.join(model).join(component), tch::Device::Cpu)
        .map_err(|e| e.to_string())?;
    let ids = from_candle(get(t, check, "input_ids")?).map_err(|e| e.to_string())?;
    let got = tch::no_grad(|| enc.forward(&ids)).map_err(|e| e.to_string())?;
    let got = to_candle(&got).map_err(|e| e.to_string())?;
    diff(&got, get(t, check, "last_hidden_state")?)
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// The base case's model with the check's LoRA at its weight.
fn lora_source(dir: &Path, check: &Value) -> Result<Source, String> {
    let base = check["base_case"]
        .as_str()
        .ok_or("lora check without base_case")?;
    let base_dir = dir.parent().unwrap_or(Path::new(".")).join(base);
    let base_case: Case = read_json(&base_dir.join("case.json"))?;
    let model_dir = base_dir.join(base_case.model.as_deref().unwrap_or("model"));
    let file = LoraFile::load(&dir.join(check["file"].as_str().ok_or("lora check without file")?))?;
    let weight = check["weight"].as_f64().unwrap_or(1.0);
    Ok(Source {
        dir: model_dir,
        lora: Some((file, weight)),
    })
}

/// A case's tensors file, by name.
pub(super) type Tensors = HashMap<String, Tensor>;

/// The tensor a check names in `field`.
pub(super) fn get<'a>(t: &'a Tensors, check: &Value, field: &str) -> Result<&'a Tensor, String> {
    let name = check[field]
        .as_str()
        .ok_or_else(|| format!("check has no {field}"))?;
    t.get(name)
        .ok_or_else(|| format!("tensors file has no {name}"))
}

/// The largest absolute difference of the check's outputs from the references.
fn run_check(m: &Components, kind: &str, check: &Value, t: &Tensors) -> Result<f64, String> {
    let r = match kind {
        "text_encoder" => text_encoder(m, check, t),
        "unet" => unet(m, check, t),
        "vae_decode" => diff(
            &m.vae_decode(get(t, check, "scaled_latents")?)?,
            get(t, check, "output")?,
        ),
        "vae_encode" => diff(
            &m.vae_encode_mean(get(t, check, "image")?)?,
            get(t, check, "mean")?,
        ),
        other => return Err(format!("unknown check kind {other:?}")),
    };
    r.map_err(|e| format!("{kind}: {e}"))
}

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

fn text_encoder(m: &Components, check: &Value, t: &Tensors) -> Result<f64, String> {
    let index = match check["component"].as_str() {
        Some("text_encoder") => 0,
        Some("text_encoder_2") => 1,
        other => return Err(format!("unknown component {other:?}")),
    };
    let (last, penultimate, pooled) = m.text(index, get(t, check, "input_ids")?)?;
    let mut d = diff(&last, get(t, check, "last_hidden_state")?)?;
    d = d.max(diff(
        &penultimate,
        get(t, check, "penultimate_hidden_state")?,
    )?);
    if check.get("text_embeds").is_some_and(|v| !v.is_null()) {
        d = d.max(diff(&pooled, get(t, check, "text_embeds")?)?);
    }
    Ok(d)
}

fn unet(m: &Components, check: &Value, t: &Tensors) -> Result<f64, String> {
    let step = check["timestep"]
        .as_f64()
        .ok_or("unet check without timestep")?;
    let added = match (check.get("text_embeds"), check.get("time_ids")) {
        (Some(e), Some(i)) if !e.is_null() && !i.is_null() => {
            Some((get(t, check, "text_embeds")?, get(t, check, "time_ids")?))
        }
        _ => None,
    };
    let out = m.unet(
        get(t, check, "sample")?,
        step,
        get(t, check, "encoder_hidden_states")?,
        added,
    )?;
    diff(&out, get(t, check, "output")?)
}

/// The largest absolute difference per element of `got` from `want` (same shapes).
pub fn diff(got: &Tensor, want: &Tensor) -> Result<f64, String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "shape {:?}, reference {:?}",
            got.dims(),
            want.dims()
        ));
    }
    let d = (got.to_dtype(DType::F32).map_err(err)? - want.to_dtype(DType::F32).map_err(err)?)
        .map_err(err)?
        .abs()
        .map_err(err)?
        .flatten_all()
        .map_err(err)?
        .max(0)
        .map_err(err)?
        .to_scalar::<f32>()
        .map_err(err)?;
    Ok(f64::from(d))
}
