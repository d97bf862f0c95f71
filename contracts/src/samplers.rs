//! The samplers atelier offers, by name: the vocabulary of `GenerateSpec::sampler`, the A1111
//! routes' `sampler_name` and the trainer's sample previews. The update rules themselves live in
//! the diffusion engine (`atelier_diffusion::schedulers`); this is only what a request may name.

use serde::{Deserialize, Serialize};

/// Every sampler atelier offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerA,
    Heun,
    Dpm2,
    Dpm2A,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
    #[serde(rename = "dpmpp_2m_sde")]
    DpmPp2mSde,
    #[serde(rename = "dpmpp_2m_sde_karras")]
    DpmPp2mSdeKarras,
    EulerKarras,
    EulerTrailing,
    #[serde(rename = "unipc")]
    UniPc,
    Lcm,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 17] = [
        SamplerKind::Euler,
        SamplerKind::EulerA,
        SamplerKind::EulerKarras,
        SamplerKind::EulerTrailing,
        SamplerKind::Heun,
        SamplerKind::Lms,
        SamplerKind::Dpm2,
        SamplerKind::Dpm2A,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mKarras,
        SamplerKind::DpmPp2mSde,
        SamplerKind::DpmPp2mSdeKarras,
        SamplerKind::Ddim,
        SamplerKind::Ddpm,
        SamplerKind::Pndm,
        SamplerKind::UniPc,
        SamplerKind::Lcm,
    ];

    /// Our name (also the serde form).
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::Pndm => "pndm",
            SamplerKind::Lms => "lms",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler_a",
            SamplerKind::Heun => "heun",
            SamplerKind::Dpm2 => "dpm2",
            SamplerKind::Dpm2A => "dpm2_a",
            SamplerKind::DpmPp2m => "dpmpp_2m",
            SamplerKind::DpmPp2mKarras => "dpmpp_2m_karras",
            SamplerKind::DpmPp2mSde => "dpmpp_2m_sde",
            SamplerKind::DpmPp2mSdeKarras => "dpmpp_2m_sde_karras",
            SamplerKind::EulerKarras => "euler_karras",
            SamplerKind::EulerTrailing => "euler_trailing",
            SamplerKind::UniPc => "unipc",
            SamplerKind::Lcm => "lcm",
        }
    }

    /// The name AUTOMATIC1111 shows, where it has the sampler.
    pub fn a1111_name(self) -> Option<&'static str> {
        Some(match self {
            SamplerKind::Ddpm | SamplerKind::EulerTrailing => return None,
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Pndm => "PLMS",
            SamplerKind::Lms => "LMS",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::Heun => "Heun",
            SamplerKind::Dpm2 => "DPM2",
            SamplerKind::Dpm2A => "DPM2 a",
            SamplerKind::DpmPp2m => "DPM++ 2M",
            SamplerKind::DpmPp2mKarras => "DPM++ 2M Karras",
            SamplerKind::DpmPp2mSde => "DPM++ 2M SDE",
            SamplerKind::DpmPp2mSdeKarras => "DPM++ 2M SDE Karras",
            SamplerKind::EulerKarras => "Euler Karras",
            SamplerKind::UniPc => "UniPC",
            SamplerKind::Lcm => "LCM",
        })
    }

    /// The diffusers scheduler class this sampler reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "DDPMScheduler",
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Pndm => "PNDMScheduler",
            SamplerKind::Lms => "LMSDiscreteScheduler",
            SamplerKind::Euler | SamplerKind::EulerKarras | SamplerKind::EulerTrailing => {
                "EulerDiscreteScheduler"
            }
            SamplerKind::EulerA => "EulerAncestralDiscreteScheduler",
            SamplerKind::Heun => "HeunDiscreteScheduler",
            SamplerKind::Dpm2 => "KDPM2DiscreteScheduler",
            SamplerKind::Dpm2A => "KDPM2AncestralDiscreteScheduler",
            SamplerKind::DpmPp2m
            | SamplerKind::DpmPp2mKarras
            | SamplerKind::DpmPp2mSde
            | SamplerKind::DpmPp2mSdeKarras => "DPMSolverMultistepScheduler",
            SamplerKind::UniPc => "UniPCMultistepScheduler",
            SamplerKind::Lcm => "LCMScheduler",
        }
    }

    /// Whether the sampler draws noise inside its steps.
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            SamplerKind::Ddpm
                | SamplerKind::EulerA
                | SamplerKind::Dpm2A
                | SamplerKind::DpmPp2mSde
                | SamplerKind::DpmPp2mSdeKarras
                | SamplerKind::Lcm
        )
    }

    /// Our name or A1111's (case-insensitive; A1111 also accepts `k_`-prefixed and
    /// underscore forms such as `k_euler_a`, `dpmpp_2m`).
    pub fn parse(name: &str) -> Option<SamplerKind> {
        let norm = |s: &str| {
            s.trim()
                .to_ascii_lowercase()
                .replace("++", "pp")
                .replace([' ', '-', '_'], "")
        };
        let wanted = norm(name);
        let wanted = wanted
            .strip_prefix('k')
            .filter(|_| name.trim().starts_with("k_"))
            .map(str::to_owned)
            .unwrap_or(wanted);
        Self::ALL
            .into_iter()
            .find(|k| norm(k.name()) == wanted || k.a1111_name().is_some_and(|a| norm(a) == wanted))
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
