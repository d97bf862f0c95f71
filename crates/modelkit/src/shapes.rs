//! A weight backend that fills a model with seeded random weights (tiny test models, benchmarks
//! of the real geometries).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::noise::SeededNoise;

/// Seeded random weights (a tiny model for tests and the demo): normal(0, 1/√fan_in) for
/// matrices and kernels, 1 for norm scales, small values for biases. Every tensor is recorded so
/// the model can be saved.
#[derive(Clone)]
pub struct RandomWeights {
    seed: u64,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
    record: bool,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            made: Arc::default(),
            record: true,
        }
    }

    /// Weights that are not kept here once handed out (a model of full size is not held twice;
    /// [`RandomWeights::tensors`] is then empty).
    pub fn unrecorded(seed: u64) -> Self {
        Self {
            record: false,
            ..Self::new(seed)
        }
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// Every tensor made, by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.made.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: each tensor's values depend on its name only.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Ok(m) = self.made.lock() {
            if let Some(t) = m.get(name) {
                return t.to_dtype(dtype);
            }
        }
        let dims = s.dims().to_vec();
        let mut rng = SeededNoise::new(name_seed(self.seed, name));
        let is_norm = name.contains("norm") && !name.contains("proj");
        let t = if dims.len() == 1 && is_norm && name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else if dims.len() <= 1 {
            // Biases and scalars (CLIP's logit scale).
            rng.randn(s, dev)?.affine(0.02, 0.0)?
        } else {
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            let std = if name.contains("embedding") {
                0.02
            } else {
                1.0 / (fan_in as f64).sqrt()
            };
            rng.randn(s, dev)?.affine(std, 0.0)?
        };
        if self.record {
            if let Ok(mut m) = self.made.lock() {
                m.insert(name.to_string(), t.clone());
            }
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights: {name} needs a shape"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
