//! What a run trains: a LoRA network's adapters, or a textual-inversion embedding's vectors.

use std::collections::HashMap;

use atelier_diffusion::torch as engine;
use atelier_diffusion::torch::inversion::TrainableEmbedding;
use atelier_diffusion::torch::train::{grads_of, load_named, zero_grads};
use atelier_diffusion::train::{Group, LoraNetwork};

pub enum Params {
    Lora(LoraNetwork),
    Embedding(TrainableEmbedding),
}

impl Params {
    /// The trainable tensors and the learning-rate group of each.
    pub fn vars(&self) -> Vec<(&engine::Tensor, Group)> {
        match self {
            Params::Lora(n) => n.vars(),
            Params::Embedding(e) => e.vectors.iter().map(|v| (v, Group::Text)).collect(),
        }
    }

    /// Their names in checkpoints, in [`Params::vars`] order.
    pub fn var_names(&self) -> Vec<String> {
        match self {
            Params::Lora(n) => n.var_names(),
            Params::Embedding(e) => e.var_names(),
        }
    }

    pub fn zero_grad(&self) {
        zero_grads(self.vars().into_iter().map(|(v, _)| v));
    }

    /// The accumulated gradients, in [`Params::vars`] order.
    pub fn grads(&self) -> Vec<engine::Tensor> {
        grads_of(self.vars().into_iter().map(|(v, _)| v))
    }

    /// Set the tensors from a checkpoint's (named as [`Params::var_names`]).
    pub fn load_weights(
        &self,
        tensors: &HashMap<String, candle_core::Tensor>,
    ) -> engine::Result<()> {
        let vars: Vec<&engine::Tensor> = self.vars().into_iter().map(|(v, _)| v).collect();
        load_named(&self.var_names(), &vars, tensors)
    }

    pub fn lora(&self) -> Option<&LoraNetwork> {
        match self {
            Params::Lora(n) => Some(n),
            Params::Embedding(_) => None,
        }
    }

    pub fn embedding(&self) -> Option<&TrainableEmbedding> {
        match self {
            Params::Embedding(e) => Some(e),
            Params::Lora(_) => None,
        }
    }
}
