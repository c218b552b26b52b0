//! The melody network over whole sequences, as training and evaluation run it: on the CPU each
//! layer is one fused op (`fused`), elsewhere the network's own per-step graph
//! (`MelodyLstm::graph_*`). The two compute the same function.
//! Runs on: offline threads (training, evaluation, xtask).

use candle_core::{Result, Tensor};
use model::lstm::{time_major, Dropout, LstmState, MelodyLstm, StepWeights};

use crate::fused::{self, Products};

/// Whole-sequence passes of a `MelodyLstm`, taking the fused op where it applies.
pub trait SequenceForward {
    /// Logits for every position of a time-major batch. Pass `dropout` only when training.
    /// tokens: `[seq, batch]` u32, bars: `[seq, batch]` or `[seq, batch, inputs]`
    /// (`MelodyLstm::side_rows`), state: per layer `[batch, hidden]` (zeros when `None`) →
    /// (logits `[seq, batch, vocab]`, state after the last step)
    fn forward_time_major(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)>;

    /// Logits for every position of a time-major batch from the zero state, with no gradient
    /// tracked (a teacher's predictions). tokens, bars: as `forward_time_major` → logits
    /// `[seq, batch, vocab]`
    fn predict_time_major(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Tensor>;

    /// Logits for every position of a batch-major batch. tokens: `[batch, seq]` u32, bars:
    /// `[batch, seq(, inputs)]`, state as `forward_time_major` → (logits `[batch, seq, vocab]`,
    /// state after the last step)
    fn forward(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)>;

    /// Logits of the symbol after each window, every window from the zero state: the recipe's
    /// evaluation. tokens: `[batch, seq]` u32, bars: `[batch, seq(, inputs)]` → `[batch, vocab]`
    fn forward_last(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Tensor>;

    /// As `forward_last`, with no gradient bookkeeping and the output layer of `weights`
    /// (`MelodyLstm::step_weights`): evaluation's fast path.
    fn forward_last_with(
        &self,
        weights: &StepWeights,
        tokens: &Tensor,
        bars: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// `MelodyLstm::head` over every position of `ys` (`[seq, batch, hidden]` → `[seq, batch,
/// vocab]`) as the fused linear op: candle's product and its backward pass (a transposed
/// product, then a sum for the bias) took a sixth of a recipe-size training step.
fn fused_head(model: &MelodyLstm, ys: &Tensor) -> Result<Tensor> {
    let (seq_len, batch, hidden) = ys.dims3()?;
    let (weight, bias) = model.output_layer();
    // f32 even in training: the logits are the loss's input, and this product is small.
    let logits = fused::linear(&ys.reshape((seq_len * batch, hidden))?, weight, bias, Products::F32)?;
    logits.reshape((seq_len, batch, weight.dim(0)?))
}

impl SequenceForward for MelodyLstm {
    fn forward_time_major(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        if !fused::applies_to(self) {
            return self.graph_forward_time_major(tokens, bars, state, dropout);
        }
        let (ys, next) =
            fused::lstm_outputs(self, tokens, bars, state, dropout, false, fused::training_products())?;
        Ok((fused_head(self, &ys)?, next))
    }

    fn predict_time_major(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Tensor> {
        if !fused::applies_to(self) {
            return self.graph_predict_time_major(tokens, bars);
        }
        let (ys, _) = fused::lstm_outputs(self, tokens, bars, None, None, true, Products::F32)?;
        Ok(fused_head(self, &ys)?.detach())
    }

    fn forward(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        let (tokens, bars) = time_major(tokens, bars)?;
        let (logits, next) = self.forward_time_major(&tokens, bars.as_ref(), state, dropout)?;
        Ok((logits.transpose(0, 1)?.contiguous()?, next))
    }

    fn forward_last(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Tensor> {
        if !fused::applies_to(self) {
            return self.graph_forward_last(tokens, bars);
        }
        let (tokens, bars) = time_major(tokens, bars)?;
        let (ys, _) = fused::lstm_outputs(self, &tokens, bars.as_ref(), None, None, false, Products::F32)?;
        self.head(&ys.get(ys.dim(0)? - 1)?)
    }

    fn forward_last_with(
        &self,
        weights: &StepWeights,
        tokens: &Tensor,
        bars: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !fused::applies_to(self) {
            return self.graph_forward_last_with(weights, tokens, bars);
        }
        let (tokens, bars) = time_major(tokens, bars)?;
        let (ys, _) = fused::lstm_outputs(self, &tokens, bars.as_ref(), None, None, true, Products::F32)?;
        let (head_w_t, head_b) = weights.head();
        ys.get(ys.dim(0)? - 1)?.matmul(head_w_t)?.broadcast_add(head_b)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;
    use model::{InputKind, ModelConfig};
    use music::Vocab;

    use super::*;

    /// The fused passes give what the network's own graph gives, batch-major and time-major,
    /// with the last position and the step weights' output layer alike.
    #[test]
    fn every_pass_matches_the_graph() {
        let cfg =
            ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 8 }, 16, 2, 0.1);
        let tensors = MelodyLstm::initial_tensors(&cfg, 4, &Device::Cpu).unwrap();
        let m = MelodyLstm::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
        assert!(fused::applies_to(&m));
        let v = cfg.vocab_len() as u32;
        let tokens =
            Tensor::from_vec((0..15).map(|i| (i * 7) % v).collect::<Vec<u32>>(), (3, 5), &Device::Cpu)
                .unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let (fused_all, _) = m.forward(&tokens, None, None, None).unwrap();
        let (graph_all, _) = m.graph_forward(&tokens, None, None, None).unwrap();
        assert_eq!(fused_all.dims(), &[3, 5, cfg.vocab_len()]);
        assert!(max_diff(&fused_all, &graph_all) < 1e-5);
        let last = m.forward_last(&tokens, None).unwrap();
        assert!(max_diff(&last, &m.graph_forward_last(&tokens, None).unwrap()) < 1e-5);
        let weights = m.step_weights().unwrap();
        let with = m.forward_last_with(&weights, &tokens, None).unwrap();
        assert!(max_diff(&with, &last) < 1e-5);
        let time_major = tokens.t().unwrap().contiguous().unwrap();
        let predicted = m.predict_time_major(&time_major, None).unwrap();
        assert!(max_diff(&predicted.transpose(0, 1).unwrap(), &graph_all) < 1e-5);
    }

    /// On a GPU (feature `cuda`; run by `scripts/gpu-check.sh` on a machine with one): the
    /// network's loss and every gradient match the CPU's fused op within float tolerance.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_training_step_on_the_gpu_matches_the_cpu() {
        let gpu = model::compute::first_gpu().expect("this test needs a GPU");
        let cfg =
            ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 8 }, 32, 2, 0.0);
        let v = cfg.vocab_len() as u32;
        let ids: Vec<u32> = (0..48).map(|i| (i * 7 + i / 5) % v).collect();
        let loss_and_grads = |device: &Device| {
            let tensors = MelodyLstm::initial_tensors(&cfg, 4, device).unwrap();
            let vars: Vec<(String, candle_core::Var)> = tensors
                .into_iter()
                .map(|(name, t)| (name, candle_core::Var::from_tensor(&t).unwrap()))
                .collect();
            let as_tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            let m = MelodyLstm::new(&cfg, VarBuilder::from_tensors(as_tensors, DType::F32, device)).unwrap();
            let all = Tensor::from_vec(ids.clone(), (4, 12), device).unwrap();
            let (inputs, targets) = (all.narrow(1, 0, 11).unwrap(), all.narrow(1, 1, 11).unwrap());
            let (logits, _) = m.forward(&inputs.contiguous().unwrap(), None, None, None).unwrap();
            let loss = candle_nn::loss::cross_entropy(
                &logits.reshape(((), cfg.vocab_len())).unwrap(),
                &targets.contiguous().unwrap().flatten_all().unwrap(),
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            let mut out: Vec<(String, Vec<f32>)> = vars
                .iter()
                .map(|(name, var)| {
                    let grad = grads.get(var.as_tensor()).expect("every weight has a gradient");
                    (
                        name.clone(),
                        grad.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
                    )
                })
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            (loss.to_device(&Device::Cpu).unwrap().to_scalar::<f32>().unwrap(), out)
        };
        let (cpu_loss, cpu_grads) = loss_and_grads(&Device::Cpu);
        let (gpu_loss, gpu_grads) = loss_and_grads(&gpu);
        assert!((cpu_loss - gpu_loss).abs() < 1e-4, "loss {cpu_loss} on the CPU, {gpu_loss} on the GPU");
        for ((name, cpu), (_, on_gpu)) in cpu_grads.iter().zip(&gpu_grads) {
            let worst = cpu.iter().zip(on_gpu).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{name}: gradients differ by {worst}");
        }
    }
}
