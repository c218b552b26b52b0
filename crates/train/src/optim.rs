//! AdamW with decoupled weight decay whose moments can be saved and put back, so a resumed
//! training run continues exactly where it stopped rather than with a cold optimiser.
//! Runs on: offline threads (training).
//!
//! The update is the usual one (Loshchilov & Hutter's AdamW): with gradient `g` at step `t`,
//! `m ← β₁m + (1-β₁)g`, `v ← β₂v + (1-β₂)g²`, and
//! `θ ← θ(1 - lr·λ) - lr · (m / (1-β₁ᵗ)) / (√(v / (1-β₂ᵗ)) + ε)`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use model::ModelError;

/// Prefixes of the moments in `AdamW::state`.
const FIRST_MOMENT: &str = "adam.m.";
const SECOND_MOMENT: &str = "adam.v.";

/// AdamW over a fixed list of variables.
pub struct AdamW {
    vars: Vec<Var>,
    /// First and second moments, one each per variable, in the order of `vars`.
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// Steps taken, for the bias corrections.
    step: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamW {
    /// An optimiser of `vars` with zero moments, β = (0.9, 0.999) and ε = 1e-8.
    pub fn new(vars: Vec<Var>, learning_rate: f64, weight_decay: f64) -> Result<Self, ModelError> {
        let first =
            vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            vars,
            first,
            second,
            step: 0,
            learning_rate,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update from `grads`; a variable without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<(), ModelError> {
        self.step += 1;
        let lr = self.learning_rate;
        let (beta1, beta2) = (self.beta1, self.beta2);
        let first_scale = 1.0 / (1.0 - beta1.powi(self.step as i32));
        let second_scale = 1.0 / (1.0 - beta2.powi(self.step as i32));
        for ((var, m), v) in self.vars.iter().zip(&mut self.first).zip(&mut self.second) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            *m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?.detach();
            *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?.detach();
            let direction = ((&*m * first_scale)? / ((&*v * second_scale)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (direction * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments, named after `names` (one per variable, in order), for a checkpoint.
    pub fn state(&self, names: &[String]) -> HashMap<String, Tensor> {
        let mut state = HashMap::new();
        for ((name, m), v) in names.iter().zip(&self.first).zip(&self.second) {
            state.insert(format!("{FIRST_MOMENT}{name}"), m.clone());
            state.insert(format!("{SECOND_MOMENT}{name}"), v.clone());
        }
        state
    }

    /// Puts back the moments of `state` (as `state` named them) after `steps` steps; `path`
    /// names the checkpoint in errors. Nothing changes unless every moment is there.
    pub fn restore(
        &mut self,
        state: &HashMap<String, Tensor>,
        names: &[String],
        steps: usize,
        path: &str,
    ) -> Result<(), ModelError> {
        let mut first = Vec::with_capacity(self.vars.len());
        let mut second = Vec::with_capacity(self.vars.len());
        for (name, var) in names.iter().zip(&self.vars) {
            first.push(saved_tensor(state, &format!("{FIRST_MOMENT}{name}"), var.as_tensor(), path)?);
            second.push(saved_tensor(state, &format!("{SECOND_MOMENT}{name}"), var.as_tensor(), path)?);
        }
        (self.first, self.second, self.step) = (first, second, steps);
        Ok(())
    }
}

/// The tensor `key` of a checkpoint's `state`, on `like`'s device and of its type and shape;
/// `path` names the checkpoint in errors.
pub(super) fn saved_tensor(
    state: &HashMap<String, Tensor>,
    key: &str,
    like: &Tensor,
    path: &str,
) -> Result<Tensor, ModelError> {
    let tensor = state
        .get(key)
        .ok_or_else(|| ModelError::MissingTensor { path: path.to_string(), name: key.to_string() })?;
    if tensor.dims() != like.dims() {
        return Err(ModelError::ShapeMismatch {
            path: path.to_string(),
            name: key.to_string(),
            expected: like.dims().to_vec(),
            got: tensor.dims().to_vec(),
        });
    }
    Ok(tensor.to_device(like.device())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{Optimizer, ParamsAdamW};

    use super::*;

    fn loss_of(var: &Var) -> Tensor {
        // A bowl with its bottom away from the start, so every step moves the weights.
        let target = Tensor::new(&[3.0f32, -1.0, 0.5], &Device::Cpu).unwrap();
        (var.as_tensor() - target).unwrap().sqr().unwrap().sum_all().unwrap()
    }

    /// The same updates as candle's own AdamW, which it replaces.
    #[test]
    fn steps_like_candles_adamw() {
        let start = Tensor::new(&[0.5f32, 0.25, -2.0], &Device::Cpu).unwrap();
        let ours_var = Var::from_tensor(&start).unwrap();
        let theirs_var = Var::from_tensor(&start).unwrap();
        let mut ours = AdamW::new(vec![ours_var.clone()], 0.05, 0.01).unwrap();
        let params = ParamsAdamW { lr: 0.05, weight_decay: 0.01, ..Default::default() };
        let mut theirs = candle_nn::AdamW::new(vec![theirs_var.clone()], params).unwrap();
        for _ in 0..20 {
            ours.step(&loss_of(&ours_var).backward().unwrap()).unwrap();
            theirs.step(&loss_of(&theirs_var).backward().unwrap()).unwrap();
        }
        let (a, b) = (
            ours_var.as_tensor().to_vec1::<f32>().unwrap(),
            theirs_var.as_tensor().to_vec1::<f32>().unwrap(),
        );
        assert_ne!(a, start.to_vec1::<f32>().unwrap());
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} against {b}");
        }
    }

    /// Saved after 5 steps and put back into a fresh optimiser, the next 5 steps are the
    /// uninterrupted run's; a fresh optimiser without them goes elsewhere.
    #[test]
    fn restored_moments_continue_the_run() {
        let names = vec!["w".to_string()];
        let start = Tensor::new(&[0.5f32, 0.25, -2.0], &Device::Cpu).unwrap();
        let whole_var = Var::from_tensor(&start).unwrap();
        let mut whole = AdamW::new(vec![whole_var.clone()], 0.05, 0.01).unwrap();
        for _ in 0..5 {
            whole.step(&loss_of(&whole_var).backward().unwrap()).unwrap();
        }
        let saved = whole.state(&names);
        let halfway = whole_var.as_tensor().copy().unwrap();
        for _ in 0..5 {
            whole.step(&loss_of(&whole_var).backward().unwrap()).unwrap();
        }

        let run_on = |restore: bool| {
            let var = Var::from_tensor(&halfway).unwrap();
            let mut adam = AdamW::new(vec![var.clone()], 0.05, 0.01).unwrap();
            if restore {
                adam.restore(&saved, &names, 5, "checkpoint").unwrap();
            }
            for _ in 0..5 {
                adam.step(&loss_of(&var).backward().unwrap()).unwrap();
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run_on(true), whole_var.as_tensor().to_vec1::<f32>().unwrap());
        assert_ne!(run_on(false), whole_var.as_tensor().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn a_checkpoint_without_a_moment_is_refused_whole() {
        let var = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut adam = AdamW::new(vec![var.clone()], 0.05, 0.0).unwrap();
        let mut state = adam.state(&["w".to_string()]);
        state.remove("adam.v.w");
        let err =
            adam.restore(&state, &["w".to_string()], 9, "run/checkpoint/optimizer.safetensors").unwrap_err();
        assert_eq!(err.to_string(), "run/checkpoint/optimizer.safetensors: tensor 'adam.v.w' is missing");
        assert_eq!(adam.steps(), 0);
    }
}
