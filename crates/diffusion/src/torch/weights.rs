//! Parameters for the libtorch models: a name → tensor source with diffusers-style prefixes, fed
//! by the safetensors loaders (folders and single-file checkpoints with their name maps and
//! fallbacks), seeded random weights for tiny test models, or a [`Recorder`] that lists names.

use std::sync::Arc;

use candle_nn::var_builder::SimpleBackend;
use tch::{Device, Kind, Tensor};

use super::{msg, Result};

/// Where parameters come from: stored f32 values of a named tensor of a given shape.
pub trait Source: Send + Sync {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
}

/// Any candle weight backend (the safetensors loaders, [`RandomWeights`]) as a source.
///
/// [`RandomWeights`]: atelier_modelkit::shapes::RandomWeights
pub struct CandleSource<B>(pub B);

impl<B: SimpleBackend> Source for CandleSource<B> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.0.get(
            candle_core::Shape::from(shape.to_vec()),
            name,
            candle_nn::Init::Const(0.0),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        from_candle(&t)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Any candle weight backend as a shared source.
pub fn source<B: SimpleBackend + 'static>(backend: B) -> Arc<dyn Source> {
    Arc::new(CandleSource(backend))
}

/// A source seen under a prefix, handing out tensors of one kind on one device.
#[derive(Clone)]
pub struct Weights {
    src: Arc<dyn Source>,
    prefix: String,
    pub kind: Kind,
    pub device: Device,
}

impl Weights {
    pub fn new(src: Arc<dyn Source>, kind: Kind, device: Device) -> Self {
        Self {
            src,
            prefix: String::new(),
            kind,
            device,
        }
    }

    /// Any candle weight backend (a safetensors loader, seeded random weights), handing out
    /// `kind` on `device`.
    pub fn from_backend<B: SimpleBackend + 'static>(
        backend: B,
        kind: Kind,
        device: Device,
    ) -> Self {
        Self::new(source(backend), kind, device)
    }

    /// The same source under `prefix.name`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        Self {
            prefix: self.path(name.as_ref()),
            ..self.clone()
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The parameter `name` with shape `shape`, in this kind on this device.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.src.tensor(&full, shape)?;
        let want: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if t.size() != want {
            return Err(msg(format!(
                "{full}: shape {:?}, the model expects {want:?}",
                t.size()
            )));
        }
        Ok(t.f_to_kind(self.kind)?.f_to_device(self.device)?)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.path(name))
    }
}

/// A candle tensor's values as a libtorch tensor (f32, on the CPU).
pub fn from_candle(t: &candle_core::Tensor) -> Result<Tensor> {
    let values: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let size: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_slice(&values)?.f_reshape(size)?)
}

/// A libtorch tensor's values as a candle tensor (f32, on the CPU).
pub fn to_candle(t: &Tensor) -> Result<candle_core::Tensor> {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
    let dims: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    Ok(candle_core::Tensor::from_vec(
        values,
        dims,
        &candle_core::Device::Cpu,
    )?)
}

/// Records the name and shape of every parameter a model asks for, handing out zeros that take
/// no memory (one scalar, expanded): building a model on it lists its parameters.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>,
}

impl Recorder {
    /// name → shape, sorted by name.
    pub fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.seen.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The recorder as f32 weights on the CPU.
    pub fn weights(&self) -> Weights {
        Weights::new(Arc::new(self.clone()), Kind::Float, Device::Cpu)
    }
}

impl Source for Recorder {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Ok(mut m) = self.seen.lock() {
            m.insert(name.to_string(), shape.to_vec());
        }
        let size: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::zeros([], (Kind::Float, Device::Cpu)).f_expand(size, false)?)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
