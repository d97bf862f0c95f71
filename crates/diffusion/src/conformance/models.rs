//! Replays the component references of `tests/conformance/models/` (what diffusers and
//! transformers compute from small models with the real structures): text encoders, UNets, the
//! VAE's decode and encode, and a kohya LoRA applied to a base case. One [`Line`] per check with
//! its largest difference against the case's tolerance.
//!
//! Whole-pipeline checks (`pipeline`) and the transformer families (FLUX.1, SD 3.5) are reported
//! as skipped: the fidelity and transformer-family work replays them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::components::{self, Components};
use crate::lora::LoraFile;

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
    let mut cases: Vec<PathBuf> = if dir.join("case.json").is_file() {
        vec![dir.to_path_buf()]
    } else {
        std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("case.json").is_file())
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

/// One case folder's checks.
pub fn replay_case(dir: &Path) -> Result<Vec<Line>, String> {
    let case: Case = read_json(&dir.join("case.json"))?;
    let tensors = candle_core::safetensors::load(dir.join(&case.tensors), &Device::Cpu)
        .map_err(|e| format!("{}: {e}", dir.join(&case.tensors).display()))?;
    let mut model: Option<Result<Components, String>> = None;
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
        let transformer = case.family.starts_with("flux") || case.family.starts_with("sd3");
        let skip = match kind {
            _ if transformer => Some("skipped: the transformer families are not in the engine yet"),
            "pipeline" | "pipeline_flux" | "pipeline_sd3" => {
                Some("skipped: whole-pipeline checks are the fidelity work's")
            }
            "tokenizer_t5" | "text_encoder_t5" | "transformer_flux" | "transformer_sd3" => {
                Some("skipped: the transformer families are not in the engine yet")
            }
            _ => None,
        };
        if let Some(why) = skip {
            line.note = Some(why.into());
            lines.push(line);
            continue;
        }
        if kind == "lora" {
            model = Some(lora_model(dir, check));
            match &model {
                Some(Ok(_)) => line.passed = true,
                Some(Err(e)) => line.note = Some(e.clone()),
                None => {}
            }
            lines.push(line);
            continue;
        }
        let m = model.get_or_insert_with(|| match &case.model {
            Some(m) if dir.join(m).is_dir() => components::load(&dir.join(m), None),
            _ => Err(format!(
                "{}: no model folder and no lora check before this one",
                dir.display()
            )),
        });
        let result = match m {
            Ok(m) => run_check(m, kind, check, &tensors),
            Err(e) => Err(e.clone()),
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

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// The base case's model with the check's LoRA merged at its weight.
fn lora_model(dir: &Path, check: &Value) -> Result<Components, String> {
    let base = check["base_case"]
        .as_str()
        .ok_or("lora check without base_case")?;
    let base_dir = dir.parent().unwrap_or(Path::new(".")).join(base);
    let base_case: Case = read_json(&base_dir.join("case.json"))?;
    let model_dir = base_dir.join(base_case.model.as_deref().unwrap_or("model"));
    let file = LoraFile::load(&dir.join(check["file"].as_str().ok_or("lora check without file")?))?;
    let weight = check["weight"].as_f64().unwrap_or(1.0);
    components::load(&model_dir, Some((&file, weight)))
}

type Tensors = HashMap<String, Tensor>;

fn get<'a>(t: &'a Tensors, check: &Value, field: &str) -> Result<&'a Tensor, String> {
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

fn diff(got: &Tensor, want: &Tensor) -> Result<f64, String> {
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
