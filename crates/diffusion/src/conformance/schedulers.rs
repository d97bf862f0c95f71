//! Replays diffusers scheduler traces (the format of
//! `tests/conformance/schedulers/diffusers-*.json`): every step's latents must match to 1e-4.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::Report;
use crate::noise::ReplayNoise;
use crate::schedulers::{
    NoiseSchedule, SamplerKind, SamplerOptions, ScheduleConfig, SchedulerConfig,
};

/// Absolute tolerance, relative for values above 1.
pub const TOLERANCE: f64 = 1e-4;

#[derive(Debug, Deserialize)]
pub struct TraceFile {
    pub traces: Vec<Trace>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Trace {
    pub scheduler: String,
    #[serde(default)]
    pub diffusers_class: Option<String>,
    pub config: serde_json::Map<String, serde_json::Value>,
    pub steps: usize,
    #[serde(default)]
    pub shape: Option<Vec<usize>>,
    pub strength: Option<f64>,
    #[serde(default)]
    pub order: Option<usize>,
    #[serde(default)]
    pub init_noise_sigma: Option<f64>,
    pub timesteps_all: Vec<f64>,
    #[serde(default)]
    pub sigmas_all: Option<Vec<f64>>,
    pub noise0: Vec<f32>,
    #[serde(default)]
    pub image_latents: Option<Vec<f32>>,
    pub timesteps: Vec<f64>,
    pub x_start: Vec<f32>,
    pub trace: Vec<TraceStep>,
    pub x_final: Vec<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TraceStep {
    pub t: f64,
    pub model_input: Vec<f32>,
    #[serde(default)]
    pub noise: Vec<Vec<f32>>,
    pub x: Vec<f32>,
}

/// The traces' stand-in for a UNet: 0.9·tanh(0.8·x) + 0.05·sin(0.01·t), elementwise.
pub fn toy_model(x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    x.affine(0.8, 0.0)?.tanh()?.affine(0.9, 0.0)? + 0.05 * (0.01 * t).sin()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOLERANCE * b.abs().max(1.0)
}

/// The first index where `got` and `want` differ beyond tolerance, with both values.
fn mismatch(got: &[f32], want: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, expected {}", got.len(), want.len()));
    }
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| !close(**g as f64, **w as f64) || !g.is_finite())
        .map(|(i, (g, w))| format!("[{i}] = {g}, expected {w}"))
}

/// Whether `kind` runs what a reference ran: the diffusers class (when named) and the options a
/// sampler name implies (Karras sigmas, the SDE algorithm, PNDM's PRK steps skipped).
pub(super) fn fits(
    kind: SamplerKind,
    class: Option<&str>,
    options: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    if let Some(class) = class {
        if class != kind.diffusers_class() {
            return Err(format!(
                "{kind} reproduces {}, the reference ran {class}",
                kind.diffusers_class()
            ));
        }
    }
    let karras = options
        .get("use_karras_sigmas")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let wants_karras = matches!(
        kind,
        SamplerKind::EulerKarras | SamplerKind::DpmPp2mKarras | SamplerKind::DpmPp2mSdeKarras
    );
    if karras != wants_karras {
        return Err(format!("use_karras_sigmas={karras} does not fit {kind}"));
    }
    let algorithm = options.get("algorithm_type").and_then(|v| v.as_str());
    let sde = algorithm.is_some_and(|a| a.starts_with("sde"));
    let wants_sde = matches!(
        kind,
        SamplerKind::DpmPp2mSde | SamplerKind::DpmPp2mSdeKarras
    );
    if sde != wants_sde || algorithm.is_some_and(|a| !a.ends_with("dpmsolver++")) {
        return Err(format!("algorithm_type {algorithm:?} does not fit {kind}"));
    }
    let skips_prk = options.get("skip_prk_steps").and_then(|v| v.as_bool());
    if kind == SamplerKind::Pndm && skips_prk != Some(true) {
        return Err("PNDM runs as PLMS (skip_prk_steps=True) only".into());
    }
    Ok(())
}

fn config_of(trace: &Trace) -> Result<(SamplerKind, ScheduleConfig, SamplerOptions), String> {
    let kind = SamplerKind::parse(&trace.scheduler)
        .ok_or_else(|| format!("unknown scheduler {:?}", trace.scheduler))?;
    let c = &trace.config;
    fits(kind, trace.diffusers_class.as_deref(), c)?;
    // Keys the trace's config lacks take the class's defaults, as diffusers' constructor gives
    // them.
    let (cfg, options) =
        SchedulerConfig::from_value(serde_json::Value::Object(c.clone()))?.for_sampler(kind)?;
    Ok((kind, cfg, options))
}

/// Replay one trace; `Err` says where it first diverged.
pub fn replay(trace: &Trace) -> Result<(), String> {
    let (kind, cfg, options) = config_of(trace)?;
    let schedule = NoiseSchedule::new(cfg);
    let mut sampler = crate::schedulers::build_with(kind, &schedule, trace.steps, options)
        .map_err(|e| e.to_string())?;
    let dev = Device::Cpu;
    let e = |err: candle_core::Error| err.to_string();

    if sampler.timesteps().len() != trace.timesteps_all.len()
        || sampler
            .timesteps()
            .iter()
            .zip(&trace.timesteps_all)
            .any(|(a, b)| !close(*a, *b))
    {
        return Err(format!(
            "timesteps {:?}, expected {:?}",
            sampler.timesteps(),
            trace.timesteps_all
        ));
    }
    if let (Some(want), Some(got)) = (&trace.sigmas_all, sampler.sigmas()) {
        if want.len() != got.len() || got.iter().zip(want).any(|(a, b)| !close(*a, *b)) {
            return Err(format!("sigmas {got:?}, expected {want:?}"));
        }
    }
    if let Some(order) = trace.order {
        if order != sampler.order() {
            return Err(format!("order {}, expected {order}", sampler.order()));
        }
    }
    if let Some(s) = trace.init_noise_sigma {
        if !close(sampler.init_noise_sigma(), s) {
            return Err(format!(
                "init_noise_sigma {}, expected {s}",
                sampler.init_noise_sigma()
            ));
        }
    }

    let n = trace.noise0.len();
    let shape = match &trace.shape {
        Some(shape) if shape.iter().product::<usize>() == n => shape.clone(),
        _ => vec![1, n],
    };
    let noise0 = Tensor::from_vec(trace.noise0.clone(), shape.clone(), &dev).map_err(e)?;
    let mut x = match trace.strength {
        None => (noise0.affine(sampler.init_noise_sigma(), 0.0)).map_err(e)?,
        Some(strength) => {
            let begin = sampler.begin_index_for_strength(trace.steps, strength);
            sampler.set_begin_index(begin);
            let latents = trace
                .image_latents
                .clone()
                .ok_or("an img2img trace without image_latents")?;
            let latents = Tensor::from_vec(latents, shape.clone(), &dev).map_err(e)?;
            sampler.add_noise(&latents, &noise0).map_err(e)?
        }
    };
    let run: Vec<f64> = sampler.timesteps()[sampler.step_index()..].to_vec();
    if run.len() != trace.timesteps.len()
        || run
            .iter()
            .zip(&trace.timesteps)
            .any(|(a, b)| !close(*a, *b))
    {
        return Err(format!(
            "run timesteps {run:?}, expected {:?}",
            trace.timesteps
        ));
    }
    let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(e);
    if let Some(m) = mismatch(&flat(&x)?, &trace.x_start) {
        return Err(format!("x_start {m}"));
    }
    let mut noise = ReplayNoise::new(trace.trace.iter().flat_map(|s| s.noise.clone()));
    for (i, step) in trace.trace.iter().enumerate() {
        let t = sampler.timestep();
        if !close(t, step.t) {
            return Err(format!("step {i}: timestep {t}, expected {}", step.t));
        }
        let input = sampler.scale_model_input(&x).map_err(e)?;
        if let Some(m) = mismatch(&flat(&input)?, &step.model_input) {
            return Err(format!("step {i} (t={t}): model_input {m}"));
        }
        let out = toy_model(&input, t).map_err(e)?;
        x = sampler
            .step(&out, &x, &mut noise)
            .map_err(|err| format!("step {i}: {err}"))?;
        if let Some(m) = mismatch(&flat(&x)?, &step.x) {
            return Err(format!("step {i} (t={t}): x {m}"));
        }
    }
    if noise.remaining() != 0 {
        return Err(format!(
            "{} recorded noise draws were not used",
            noise.remaining()
        ));
    }
    if let Some(m) = mismatch(&flat(&x)?, &trace.x_final) {
        return Err(format!("x_final {m}"));
    }
    Ok(())
}

/// Replay every trace of every `*.json` file under `dir` (or the one file `dir` names).
pub fn replay_dir(dir: &Path) -> Result<Report, String> {
    let mut files: Vec<std::path::PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        let rd = std::fs::read_dir(dir)
            .map_err(|err| format!("cannot read {}: {err}", dir.display()))?;
        rd.filter_map(|d| d.ok().map(|d| d.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(format!("no *.json trace files in {}", dir.display()));
    }
    let mut report = Report::default();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
        let parsed: TraceFile = serde_json::from_str(&text)
            .map_err(|err| format!("{} is not a scheduler trace file: {err}", file.display()))?;
        for trace in &parsed.traces {
            let label = format!(
                "{} {} steps{}{}",
                trace.scheduler,
                trace.steps,
                trace
                    .strength
                    .map(|s| format!(" img2img {s}"))
                    .unwrap_or_default(),
                trace
                    .config
                    .get("prediction_type")
                    .and_then(|v| v.as_str())
                    .map(|p| format!(" {p}"))
                    .unwrap_or_default()
            );
            match replay(trace) {
                Ok(()) => report.pass(),
                Err(why) => report.fail(format!("{}: {label}: {why}", file.display())),
            }
        }
    }
    Ok(report)
}
