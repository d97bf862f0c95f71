//! Flow matching's sigma schedule as diffusers' `FlowMatchEulerDiscreteScheduler` configures it
//! from a model's `scheduler_config.json`: sigmas from 1 towards 0, shifted by a fixed `shift`
//! (SD 3) or by `mu` from the image's token count (`use_dynamic_shifting`, FLUX), optionally
//! stretched so the last one is `shift_terminal`. The latents move along the predicted velocity:
//! x ← x + (σ_next − σ)·v.

use serde::Deserialize;

/// The fields of `scheduler/scheduler_config.json` that shape the schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub shift_terminal: Option<f64>,
    pub time_shift_type: String,
    pub invert_sigmas: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchConfig {
    /// diffusers' class defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            shift_terminal: None,
            time_shift_type: "exponential".into(),
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

/// Where the schedule starts for a pipeline: FLUX's pipeline hands the scheduler
/// `linspace(1, 1/steps)`; SD 3's lets it space timesteps between its own shifted ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// `linspace(1, 1/steps, steps)` (FLUX pipelines).
    Flux,
    /// `linspace(σ_max, σ_min, steps)` of the training sigmas (SD 3 pipelines).
    Training,
}

impl FlowMatchConfig {
    /// From a scheduler config's JSON; options this engine does not implement are refused.
    pub fn from_value(v: serde_json::Value) -> Result<Self, String> {
        let c: Self = serde_json::from_value(v)
            .map_err(|e| format!("flow-matching scheduler config: {e}"))?;
        let unsupported = [
            ("invert_sigmas", c.invert_sigmas),
            ("use_karras_sigmas", c.use_karras_sigmas),
            ("use_exponential_sigmas", c.use_exponential_sigmas),
            ("use_beta_sigmas", c.use_beta_sigmas),
            ("stochastic_sampling", c.stochastic_sampling),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!(
                "flow-matching scheduler config: {name} is not supported"
            ));
        }
        if !matches!(c.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(format!(
                "flow-matching scheduler config: time_shift_type {:?} (exponential or linear)",
                c.time_shift_type
            ));
        }
        Ok(c)
    }

    /// diffusers' `calculate_shift`: mu linear in the image's token count between the base and
    /// max lengths.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    fn fixed_shift(&self, s: f64) -> f64 {
        self.shift * s / (1.0 + (self.shift - 1.0) * s)
    }

    fn time_shift(&self, mu: f64, t: f64) -> f64 {
        match self.time_shift_type.as_str() {
            "linear" => mu / (mu + (1.0 / t - 1.0)),
            _ => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
        }
    }

    /// The `steps` sigmas and a final 0, for an image of `image_seq_len` tokens (what dynamic
    /// shifting reads; `mu` overrides it when given).
    pub fn sigmas(
        &self,
        steps: usize,
        spacing: Spacing,
        image_seq_len: usize,
        mu: Option<f64>,
    ) -> Vec<f64> {
        let n = steps.max(1);
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    if n == 1 {
                        a
                    } else {
                        a + (b - a) * i as f64 / (n - 1) as f64
                    }
                })
                .collect()
        };
        let train = self.num_train_timesteps as f64;
        let base = match spacing {
            Spacing::Flux => linspace(1.0, 1.0 / n as f64),
            Spacing::Training => {
                let end = |s: f64| {
                    if self.use_dynamic_shifting {
                        s
                    } else {
                        self.fixed_shift(s)
                    }
                };
                // The training sigmas, kept in f32 as diffusers keeps them.
                let (max, min) = (end(1.0) as f32 as f64, end(1.0 / train) as f32 as f64);
                linspace(max * train, min * train)
                    .iter()
                    .map(|t| t / train)
                    .collect()
            }
        };
        let mu = mu.unwrap_or_else(|| self.mu(image_seq_len));
        let mut sigmas: Vec<f64> = base
            .iter()
            .map(|&s| s as f32 as f64)
            .map(|s| {
                if self.use_dynamic_shifting {
                    self.time_shift(mu, s)
                } else {
                    self.fixed_shift(s)
                }
            })
            .collect();
        if let Some(terminal) = self.shift_terminal.filter(|t| *t > 0.0) {
            let last = 1.0 - sigmas.last().copied().unwrap_or(0.0);
            let scale = last / (1.0 - terminal);
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        let mut out: Vec<f64> = sigmas.iter().map(|&s| s as f32 as f64).collect();
        out.push(0.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> FlowMatchConfig {
        FlowMatchConfig::from_value(json).unwrap()
    }

    #[test]
    fn fixed_shift_spaces_between_the_shifted_training_ends() {
        // SD 3: shift 3, 4 steps. σ_min = 3·0.001 / (1 + 2·0.001); the spaced sigmas are shifted again.
        let c = cfg(serde_json::json!({"shift": 3.0}));
        let s = c.sigmas(4, Spacing::Training, 0, None);
        let min = 0.003 / 1.002;
        let raw = [
            1.0,
            1.0 - (1.0 - min) / 3.0,
            1.0 - 2.0 * (1.0 - min) / 3.0,
            min,
        ];
        for (got, r) in s.iter().zip(raw) {
            let want = 3.0 * r / (1.0 + 2.0 * r);
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s[4], 0.0);
    }

    #[test]
    fn dynamic_shift_follows_the_token_count() {
        let c = cfg(serde_json::json!({"use_dynamic_shifting": true, "shift": 3.0}));
        // 256 tokens → mu = base_shift; 4096 → max_shift.
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
        let s = c.sigmas(2, Spacing::Flux, 256, None);
        let e = 0.5f64.exp();
        assert!((s[0] - 1.0).abs() < 1e-7);
        assert!((s[1] - e / (e + 1.0)).abs() < 1e-7, "{s:?}");
        // More tokens shift harder: every sigma rises.
        let big = c.sigmas(4, Spacing::Flux, 4096, None);
        let small = c.sigmas(4, Spacing::Flux, 256, None);
        assert!(big[1..4].iter().zip(&small[1..4]).all(|(b, s)| b > s));
    }

    #[test]
    fn shift_terminal_stretches_the_last_sigma() {
        let c = cfg(serde_json::json!({"shift": 3.0, "shift_terminal": 0.02}));
        let s = c.sigmas(8, Spacing::Flux, 0, None);
        assert!((s[7] - 0.02).abs() < 1e-6, "{s:?}");
        assert!((s[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn unsupported_options_are_refused() {
        let e = FlowMatchConfig::from_value(serde_json::json!({"use_karras_sigmas": true}))
            .unwrap_err();
        assert!(e.contains("use_karras_sigmas"), "{e}");
    }
}
