//! Image generation jobs: `txt2img` (sampler service), `img2img` and `inpaint` (inpainter
//! service). One spec shape for all three; [`GenerateSpec::check`] says what each kind needs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ArtifactRef;

/// Limits every generation job is held to before any model work.
pub const MAX_STEPS: u32 = 150;
pub const MAX_PIXELS: u64 = 2048 * 2048;
pub const MAX_BATCH: u32 = 16;
/// Longest prompt or negative prompt, in bytes (about 4,000 CLIP tokens, 55 chunks of 75: far
/// past any prompt A1111 users write, and a bound on the text encoder's work per request).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

fn d_steps() -> u32 {
    20
}
fn d_cfg() -> f64 {
    7.0
}
fn d_side() -> u32 {
    512
}
fn d_one() -> u32 {
    1
}
fn d_sampler() -> String {
    "euler_a".into()
}
fn d_strength() -> f64 {
    0.75
}
fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn d_blur() -> f32 {
    4.0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// Where a seed's noise comes from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RandnSource {
    /// torch's CPU generator, bit for bit: what diffusers with
    /// `torch.Generator("cpu").manual_seed(seed)`, ComfyUI and A1111's "CPU" source draw.
    #[default]
    #[serde(alias = "CPU")]
    Cpu,
    /// A1111's "NV" source: what torch draws on a CUDA device, reproduced on any device.
    #[serde(alias = "NV")]
    Nv,
}

/// A generation request. Prompts use AUTOMATIC1111's syntax (emphasis, BREAK, prompt editing,
/// alternation, `<lora:name:weight>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    /// Model name in the registry (a diffusers folder or a single-file checkpoint).
    pub model: String,
    /// A separate VAE file under the registry's `vae/` (A1111's `sd_vae`) decoding and encoding
    /// instead of the model's own; absent: the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "d_steps")]
    pub steps: u32,
    #[serde(default = "d_cfg")]
    pub cfg_scale: f64,
    /// Seed of the first image (image i uses seed + i); chosen at random when absent and
    /// recorded in the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default = "d_side")]
    pub width: u32,
    #[serde(default = "d_side")]
    pub height: u32,
    #[serde(default = "d_one")]
    pub batch_size: u32,
    /// Our sampler name (`euler_a`, `dpmpp_2m_karras`, ...) or A1111's (`Euler a`, ...).
    #[serde(default = "d_sampler")]
    pub sampler: String,
    /// A1111's "Clip skip": 1 conditions on the text encoder's last layer, N on the N-th from the
    /// end (then its final layer norm), for the prompt and the negative prompt alike. diffusers'
    /// `clip_skip=k` is N = k + 1 and leaves the negative prompt on the last layer.
    #[serde(default = "d_one")]
    pub clip_skip: u32,
    /// Where the seeds' noise comes from (default `cpu`).
    #[serde(default)]
    pub randn_source: RandnSource,
    /// A1111's variation seed of the first image (image i uses subseed + i).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subseed: Option<u64>,
    /// A1111's variation strength (0..=1): how far the noise moves, along the sphere, from the
    /// seed's toward the variation seed's.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub subseed_strength: f64,
    /// A1111's eta noise seed delta (ENSD): samplers' step noise comes from seed + delta.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub eta_noise_seed_delta: u64,
    /// img2img / inpaint: the starting image's artifact key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// img2img / inpaint: how much of the schedule runs (0..=1).
    #[serde(default = "d_strength")]
    pub strength: f64,
    /// inpaint: the mask's artifact key (white is repainted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// inpaint: feathering of the mask edge in pixels.
    #[serde(default = "d_blur")]
    pub mask_blur: f32,
    /// inpaint: repaint the black region instead.
    #[serde(default)]
    pub mask_invert: bool,
    /// Decode the first image every N steps as a preview (its key in the job's progress); 0: off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub preview_every: u32,
    /// inpaint: what the masked area starts from (A1111's "Masked content", `inpainting_fill`).
    #[serde(default, skip_serializing_if = "InpaintFill::is_original")]
    pub inpaint_fill: InpaintFill,
    /// inpaint: generate only the mask's box, grown by `inpaint_padding` pixels and to the
    /// output's aspect ratio, at `width`×`height`, and paste it back into the init image, whose
    /// size the output keeps (A1111's "Only masked", `inpaint_full_res`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inpaint_only_masked: bool,
    /// inpaint: pixels around the mask's box with `inpaint_only_masked` (A1111's
    /// `inpaint_full_res_padding`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inpaint_padding: u32,
    /// txt2img: a second pass at a larger size (A1111's hires fix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresSpec>,
    /// img2img and inpaint: how the init image (and mask) is brought to `width`×`height`.
    #[serde(default, skip_serializing_if = "ResizeMode::is_default")]
    pub resize_mode: ResizeMode,
    /// FLUX.1-dev's embedded guidance (Forge's "Distilled CFG Scale"; default 3.5). FLUX has no
    /// classifier-free guidance: `cfg_scale` applies to SD 3 and the UNet families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// FLUX / SD 3: T5 tokens read from the prompt (1..=512; default 512 for FLUX-dev, 256 for
    /// FLUX-schnell and SD 3, as diffusers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<u32>,
    /// FLUX / SD 3: a fixed shift of the flow-matching sigmas in place of the model's own
    /// scheduler config (its `shift`, or FLUX's resolution-dependent shift).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
}

/// A1111's img2img resize modes 0 to 3.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Stretched to the size.
    #[default]
    JustResize,
    /// Scaled to cover the size, the middle kept.
    CropAndResize,
    /// Scaled to fit, centred, the margins filled with the stretched edges.
    ResizeAndFill,
    /// A1111's "just resize (latent upscale)": the image encoded at its own size (floored to
    /// multiples of 8), its latents resized bilinearly to the output's (a mask is just resized).
    LatentUpscale,
}

impl ResizeMode {
    pub fn is_default(&self) -> bool {
        *self == ResizeMode::JustResize
    }

    pub fn from_a1111(n: i64) -> Option<Self> {
        match n {
            0 => Some(Self::JustResize),
            1 => Some(Self::CropAndResize),
            2 => Some(Self::ResizeAndFill),
            3 => Some(Self::LatentUpscale),
            _ => None,
        }
    }
}

/// A1111's hires fix: the first pass's result upscaled, then img2img at that size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HiresSpec {
    /// The second pass's size as a multiple of the first's (A1111's `hr_scale`), unless
    /// `width`/`height` are set (A1111's `hr_resize_x`/`hr_resize_y`; one of them alone keeps
    /// the first pass's aspect ratio). Rounded down to the model's multiple of 8.
    #[serde(default = "d_hr_scale")]
    pub scale: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub width: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub height: u32,
    /// `Latent` (bilinear, A1111's default), `Latent (nearest)`, `Lanczos` or `Nearest`.
    #[serde(default = "d_hr_upscaler")]
    pub upscaler: String,
    /// Steps of the second pass; 0: the first pass's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub steps: u32,
    #[serde(default = "d_hr_strength")]
    pub denoising_strength: f64,
    /// The second pass's prompts; absent: the first pass's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
}

/// The upscalers a hires pass accepts.
pub const HIRES_UPSCALERS: [&str; 5] = [
    "Latent",
    "Latent (bilinear)",
    "Latent (nearest)",
    "Lanczos",
    "Nearest",
];

fn d_hr_scale() -> f64 {
    2.0
}
fn d_hr_upscaler() -> String {
    "Latent".into()
}
fn d_hr_strength() -> f64 {
    0.7
}

impl HiresSpec {
    /// The second pass's size for a first pass of `width`×`height`, in multiples of 8.
    pub fn size(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = match (self.width, self.height) {
            (0, 0) => (
                (width as f64 * self.scale) as u32,
                (height as f64 * self.scale) as u32,
            ),
            (x, 0) => (x, (x as u64 * height as u64 / width.max(1) as u64) as u32),
            (0, y) => ((y as u64 * width as u64 / height.max(1) as u64) as u32, y),
            (x, y) => (x, y),
        };
        (w / 8 * 8, h / 8 * 8)
    }

    /// What A1111's infotext names the target: `Hires upscale: 2` or `Hires resize: 1024x768`.
    pub fn label(&self) -> String {
        match (self.width, self.height) {
            (0, 0) => format!("Hires upscale: {}", self.scale),
            (x, y) => format!("Hires resize: {x}x{y}"),
        }
    }

    fn check(&self, width: u32, height: u32) -> Result<(), String> {
        if !(self.scale.is_finite() && (1.0..=4.0).contains(&self.scale)) {
            return Err(format!(
                "hires.scale must be within 1..=4 (got {})",
                self.scale
            ));
        }
        if !HIRES_UPSCALERS.contains(&self.upscaler.as_str()) {
            return Err(format!(
                "hires.upscaler {:?} is not one of {}",
                self.upscaler,
                HIRES_UPSCALERS.join(", ")
            ));
        }
        if !(self.denoising_strength.is_finite() && (0.0..=1.0).contains(&self.denoising_strength))
        {
            return Err(format!(
                "hires.denoising_strength must be within 0..=1 (got {})",
                self.denoising_strength
            ));
        }
        let (w, h) = self.size(width, height);
        if w < width || h < height || w > 4096 || h > 4096 {
            return Err(format!(
                "the hires size {w}x{h} must be at least the first pass's {width}x{height} and at most 4096 a side"
            ));
        }
        Ok(())
    }
}

/// What an inpainted area starts from: A1111's `inpainting_fill` 1, 0, 2 and 3.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum InpaintFill {
    /// The init image as it is.
    #[default]
    Original,
    /// The masked area painted over with the colours around it, blurred in.
    Fill,
    /// The masked area's latents replaced by the run's noise.
    LatentNoise,
    /// The masked area's latents set to zero.
    LatentNothing,
}

impl InpaintFill {
    pub fn is_original(&self) -> bool {
        *self == InpaintFill::Original
    }

    /// From A1111's `inpainting_fill` number.
    pub fn from_a1111(n: i64) -> Option<Self> {
        match n {
            0 => Some(InpaintFill::Fill),
            1 => Some(InpaintFill::Original),
            2 => Some(InpaintFill::LatentNoise),
            3 => Some(InpaintFill::LatentNothing),
            _ => None,
        }
    }
}

/// Which generation job a spec is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerateKind {
    Txt2Img,
    Img2Img,
    Inpaint,
}

impl GenerateSpec {
    /// A txt2img spec with every default (A1111's).
    pub fn txt2img(model: &str, prompt: &str) -> Self {
        Self {
            model: model.into(),
            vae: None,
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: d_steps(),
            cfg_scale: d_cfg(),
            seed: None,
            width: d_side(),
            height: d_side(),
            batch_size: d_one(),
            sampler: d_sampler(),
            clip_skip: d_one(),
            randn_source: RandnSource::Cpu,
            subseed: None,
            subseed_strength: 0.0,
            eta_noise_seed_delta: 0,
            init_image: None,
            strength: d_strength(),
            mask: None,
            mask_blur: d_blur(),
            mask_invert: false,
            preview_every: 0,
            inpaint_fill: InpaintFill::Original,
            inpaint_only_masked: false,
            inpaint_padding: 0,
            hires: None,
            resize_mode: ResizeMode::JustResize,
            guidance: None,
            max_sequence_length: None,
            shift: None,
        }
    }

    /// A reason for anything out of range or missing for `kind` (sampler and model names are
    /// checked where the sampler list and the registry are known).
    pub fn check(&self, kind: GenerateKind) -> Result<(), String> {
        if self.model.trim().is_empty() {
            return Err("model is empty".into());
        }
        for (name, text) in [
            ("prompt", &self.prompt),
            ("negative_prompt", &self.negative_prompt),
        ] {
            if text.len() > MAX_PROMPT_BYTES {
                return Err(format!(
                    "{name} is {} bytes, over the limit of {MAX_PROMPT_BYTES}",
                    text.len()
                ));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(format!(
                "steps must be 1..={MAX_STEPS} (got {})",
                self.steps
            ));
        }
        if !(self.cfg_scale.is_finite() && (0.0..=30.0).contains(&self.cfg_scale)) {
            return Err(format!(
                "cfg_scale must be within 0..=30 (got {})",
                self.cfg_scale
            ));
        }
        if self.width == 0
            || self.height == 0
            || !self.width.is_multiple_of(8)
            || !self.height.is_multiple_of(8)
        {
            return Err(format!(
                "width and height must be positive multiples of 8 (got {}x{})",
                self.width, self.height
            ));
        }
        if self.width as u64 * self.height as u64 > MAX_PIXELS {
            return Err(format!(
                "{}x{} is over the pixel budget of {MAX_PIXELS} pixels",
                self.width, self.height
            ));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return Err(format!(
                "batch_size must be 1..={MAX_BATCH} (got {})",
                self.batch_size
            ));
        }
        if let Some(g) = self.guidance {
            if !(g.is_finite() && (0.0..=30.0).contains(&g)) {
                return Err(format!("guidance must be within 0..=30 (got {g})"));
            }
        }
        if let Some(n) = self.max_sequence_length {
            if n == 0 || n > 512 {
                return Err(format!("max_sequence_length must be 1..=512 (got {n})"));
            }
        }
        if let Some(s) = self.shift {
            if !(s.is_finite() && s > 0.0 && s <= 100.0) {
                return Err(format!("shift must be within (0, 100] (got {s})"));
            }
        }
        if self.preview_every > self.steps {
            return Err(format!(
                "preview_every {} is more than the {} steps (0 turns previews off)",
                self.preview_every, self.steps
            ));
        }
        if self.clip_skip == 0 || self.clip_skip > 12 {
            return Err(format!("clip_skip must be 1..=12 (got {})", self.clip_skip));
        }
        if !(self.subseed_strength.is_finite() && (0.0..=1.0).contains(&self.subseed_strength)) {
            return Err(format!(
                "subseed_strength must be within 0..=1 (got {})",
                self.subseed_strength
            ));
        }
        if let Some(hr) = &self.hires {
            if kind != GenerateKind::Txt2Img {
                return Err("hires is a txt2img pass (img2img and inpaint take none)".into());
            }
            hr.check(self.width, self.height)?;
        }
        match kind {
            GenerateKind::Txt2Img => {
                if self.init_image.is_some() || self.mask.is_some() {
                    return Err(
                        "txt2img takes no init_image or mask (use img2img or inpaint)".into(),
                    );
                }
            }
            GenerateKind::Img2Img | GenerateKind::Inpaint => {
                if self.init_image.is_none() {
                    return Err("init_image (an uploaded artifact key) is required".into());
                }
                if !(self.strength.is_finite() && (0.0..=1.0).contains(&self.strength)) {
                    return Err(format!(
                        "strength must be within 0..=1 (got {})",
                        self.strength
                    ));
                }
                if kind == GenerateKind::Inpaint && self.mask.is_none() {
                    return Err("inpaint needs a mask (an uploaded artifact key)".into());
                }
                if kind == GenerateKind::Img2Img && self.mask.is_some() {
                    return Err("img2img takes no mask (use inpaint)".into());
                }
                if !(self.mask_blur.is_finite() && (0.0..=64.0).contains(&self.mask_blur)) {
                    return Err(format!(
                        "mask_blur must be within 0..=64 (got {})",
                        self.mask_blur
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One generated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct GeneratedImage {
    /// The PNG (with A1111's `parameters` text chunk).
    pub image: ArtifactRef,
    pub seed: u64,
}

/// The result of a generation job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ImagesOutput {
    pub images: Vec<GeneratedImage>,
    /// A1111's `parameters` text of the first image.
    pub parameters: String,
    /// A1111's short model hash.
    pub model_hash: String,
    /// How many jobs shared this job's sampling passes (absent when it ran alone): a sampler
    /// with a batch window stacks compatible txt2img jobs into one UNet batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_jobs: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_over_the_limit_are_refused_with_the_figure() {
        let mut spec = GenerateSpec::txt2img("m", &"a".repeat(MAX_PROMPT_BYTES));
        assert!(spec.check(GenerateKind::Txt2Img).is_ok());
        spec.negative_prompt = "b".repeat(MAX_PROMPT_BYTES + 1);
        let e = spec.check(GenerateKind::Txt2Img).unwrap_err();
        assert!(e.contains("negative_prompt") && e.contains("16384"), "{e}");
    }
}
