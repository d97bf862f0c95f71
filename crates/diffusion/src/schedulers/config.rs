//! A model's `scheduler/scheduler_config.json` read for a sampler the way diffusers'
//! `SchedulerClass.from_config(pipe.scheduler.config)` reads it: every key the file holds that the
//! sampler's class takes is used, and a key the file lacks takes that class's own default — not
//! the default of the class the file was written for. So an SD 1.x folder whose PNDM config has no
//! `timestep_spacing` runs Euler with `linspace` spacing and DDIM with `clip_sample=True` unless
//! the file switches it off, as diffusers does.

use serde_json::{Map, Value};

use super::{SamplerKind, ScheduleConfig};

/// The sampler options beyond the noise schedule that change a sampler's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplerOptions {
    /// DDPM and DDIM: the predicted clean latents are clamped to ±this (`clip_sample`,
    /// `clip_sample_range`); `None` when `clip_sample` is false.
    pub clip_sample: Option<f64>,
    /// DDIM and PNDM: the step after timestep 0 lands on ᾱ = 1 (`set_alpha_to_one`); when false,
    /// on ᾱ₀.
    pub set_alpha_to_one: bool,
}

/// The keys of a scheduler config file (empty: every option at the class defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerConfig {
    keys: Map<String, Value>,
}

/// The defaults diffusers 0.42's scheduler classes declare for the options atelier reads.
fn class_defaults(class: &str) -> Value {
    let ddpm_betas = serde_json::json!({
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear", "prediction_type": "epsilon", "steps_offset": 0,
    });
    let mut v = ddpm_betas;
    let extra = match class {
        "DDPMScheduler" => {
            serde_json::json!({"timestep_spacing": "leading", "clip_sample": true, "clip_sample_range": 1.0})
        }
        "DDIMScheduler" => serde_json::json!({
            "timestep_spacing": "leading", "clip_sample": true, "clip_sample_range": 1.0,
            "set_alpha_to_one": true,
        }),
        "PNDMScheduler" => {
            serde_json::json!({"timestep_spacing": "leading", "set_alpha_to_one": false})
        }
        "LCMScheduler" => serde_json::json!({
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "timestep_spacing": "leading", "clip_sample": false, "set_alpha_to_one": true,
        }),
        // Euler, Euler a, LMS, Heun, KDPM2 (a), DPM-Solver++, UniPC.
        _ => serde_json::json!({"timestep_spacing": "linspace"}),
    };
    if let (Value::Object(base), Value::Object(extra)) = (&mut v, extra) {
        base.extend(extra);
    }
    v
}

impl SchedulerConfig {
    /// A config file's JSON object.
    pub fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::Object(keys) => Ok(Self { keys }),
            other => Err(format!("a scheduler config is a JSON object, not {other}")),
        }
    }

    /// What a diffusers folder of Stable Diffusion holds for `schedule` (the noise schedule plus
    /// `clip_sample: false`, `set_alpha_to_one: false`, `skip_prk_steps: true`, as the published
    /// SD 1.x, 2.x and XL configs set them): single-file checkpoints and the test models use it.
    pub fn of_schedule(schedule: &ScheduleConfig) -> Self {
        let mut keys = match serde_json::to_value(schedule) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        keys.insert("clip_sample".into(), Value::Bool(false));
        keys.insert("set_alpha_to_one".into(), Value::Bool(false));
        keys.insert("skip_prk_steps".into(), Value::Bool(true));
        Self { keys }
    }

    /// The model's own noise schedule (what it was trained with): the file's keys over Stable
    /// Diffusion's values.
    pub fn schedule(&self) -> Result<ScheduleConfig, String> {
        serde_json::from_value(self.to_value()).map_err(|e| format!("scheduler config: {e}"))
    }

    /// The file's JSON (to write into a diffusers folder).
    pub fn to_value(&self) -> Value {
        Value::Object(self.keys.clone())
    }

    /// The noise schedule and options `kind` runs with: the class defaults of `kind`'s diffusers
    /// class, overridden by every key the file holds.
    pub fn for_sampler(
        &self,
        kind: SamplerKind,
    ) -> Result<(ScheduleConfig, SamplerOptions), String> {
        let mut merged = class_defaults(kind.diffusers_class());
        if let Value::Object(m) = &mut merged {
            for (k, v) in &self.keys {
                if !v.is_null() {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        let schedule: ScheduleConfig =
            serde_json::from_value(merged.clone()).map_err(|e| format!("scheduler config: {e}"))?;
        let flag = |k: &str| merged.get(k).and_then(Value::as_bool).unwrap_or(false);
        let range = merged
            .get("clip_sample_range")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let options = SamplerOptions {
            clip_sample: flag("clip_sample").then_some(range),
            set_alpha_to_one: flag("set_alpha_to_one"),
        };
        Ok((schedule, options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::TimestepSpacing;

    /// SD 1.5's published scheduler config: written for PNDM, without `timestep_spacing`.
    fn sd15() -> SchedulerConfig {
        SchedulerConfig::from_value(serde_json::json!({
            "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
            "trained_betas": null
        }))
        .expect("object")
    }

    #[test]
    fn keys_the_file_lacks_take_the_samplers_class_defaults() {
        let (euler, _) = sd15().for_sampler(SamplerKind::Euler).expect("euler");
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(euler.steps_offset, 1);
        let (ddim, o) = sd15().for_sampler(SamplerKind::Ddim).expect("ddim");
        assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(o.clip_sample, None);
        assert!(!o.set_alpha_to_one);
        // An SDXL folder configures Euler: DDIM built from it clips and ends on ᾱ = 1.
        let xl = SchedulerConfig::from_value(serde_json::json!({
            "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1
        }))
        .expect("object");
        let (_, o) = xl.for_sampler(SamplerKind::Ddim).expect("ddim");
        assert_eq!(o.clip_sample, Some(1.0));
        assert!(o.set_alpha_to_one);
        let (_, o) = xl.for_sampler(SamplerKind::Pndm).expect("pndm");
        assert!(!o.set_alpha_to_one);
        // An empty file: the class's own betas.
        let (s, _) = SchedulerConfig::default()
            .for_sampler(SamplerKind::Ddpm)
            .expect("ddpm");
        assert_eq!(
            (s.beta_start, s.beta_end, s.steps_offset),
            (0.0001, 0.02, 0)
        );
    }

    #[test]
    fn the_published_layout_round_trips() {
        let c = SchedulerConfig::of_schedule(&ScheduleConfig::default());
        let (s, o) = c.for_sampler(SamplerKind::Ddim).expect("ddim");
        assert_eq!(s, ScheduleConfig::default());
        assert_eq!(o, SamplerOptions::default());
        assert!(SchedulerConfig::from_value(serde_json::json!([1])).is_err());
    }
}
