//! The training loss: each row's negative log-likelihood of its target, as one candle op on the
//! CPU with its backward pass written out, in place of the log-softmax, gather and negation
//! that candle's graph builds and differentiates op by op (a tenth of a recipe-size training
//! step went to their backward passes).
//! Runs on: offline threads (training, `cargo xtask bench`).

use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Tensor};
use model::kernels::{exp_approx, Isa, Kernel};
use model::lstm::nll_and_argmax;

/// `-log softmax(logits)[target]` of each row: logits `[n, vocab]`, targets `[n]` (u32) →
/// `[n]`. For f32 logits on the CPU, one op whose gradient is `softmax - onehot(target)` per
/// row, scaled by the row's incoming gradient; elsewhere `nll_and_argmax`'s graph, the same
/// function.
pub fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        return Ok(nll_and_argmax(logits, targets)?.0);
    }
    let (rows, vocab) = logits.dims2()?;
    if targets.dims() != [rows] {
        return Err(Error::Msg(format!(
            "loss: targets {:?} do not fit logits {:?}",
            targets.dims(),
            logits.dims()
        )));
    }
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Msg(format!("loss: target {bad} outside a vocabulary of {vocab}")));
    }
    logits.contiguous()?.apply_op1(Nll { isa: Isa::detect(), targets })
}

/// The custom op behind `nll`; the targets ride along, as they carry no gradient.
struct Nll {
    isa: Isa,
    targets: Vec<u32>,
}

/// `log Σ_j e^{x_j}` of every row of `logits` (`[rows, vocab]`) into `out` (`[rows]`), each
/// shifted by its maximum; `scratch` holds one row's exponentials.
struct LogSumExp<'a> {
    logits: &'a [f32],
    vocab: usize,
    scratch: &'a mut [f32],
    out: &'a mut [f32],
}

impl Kernel for LogSumExp<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool, const INT8: bool>(self) {
        for (row, lse) in self.logits.chunks_exact(self.vocab).zip(self.out.iter_mut()) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            self.scratch.iter_mut().zip(row).for_each(|(e, &x)| *e = exp_approx(x - max));
            *lse = max + self.scratch.iter().sum::<f32>().ln();
        }
    }
}

/// `softmax(row) · scale` of every row, less `scale` at the row's target: the gradient of the
/// rows' losses, with `scale` each row's incoming gradient.
struct NllGradient<'a> {
    logits: &'a [f32],
    log_sum_exps: &'a [f32],
    targets: &'a [u32],
    scales: &'a [f32],
    out: &'a mut [f32],
}

impl Kernel for NllGradient<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool, const INT8: bool>(self) {
        let vocab = self.logits.len() / self.targets.len().max(1);
        let rows = self.logits.chunks_exact(vocab).zip(self.out.chunks_exact_mut(vocab));
        for (i, (row, grad)) in rows.enumerate() {
            let (lse, scale) = (self.log_sum_exps[i], self.scales[i]);
            grad.iter_mut().zip(row).for_each(|(g, &x)| *g = exp_approx(x - lse) * scale);
            grad[self.targets[i] as usize] -= scale;
        }
    }
}

impl Nll {
    fn log_sum_exps(&self, logits: &[f32], vocab: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; self.targets.len()];
        let mut scratch = vec![0.0f32; vocab];
        self.isa.run(None, LogSumExp { logits, vocab, scratch: &mut scratch, out: &mut out });
        out
    }
}

impl CustomOp1 for Nll {
    fn name(&self) -> &'static str {
        "nll"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| Error::Msg("loss: logits not contiguous".into()))?;
        let logits = &storage.as_slice::<f32>()?[start..end];
        let mut nll = self.log_sum_exps(logits, vocab);
        for ((loss, row), &target) in nll.iter_mut().zip(logits.chunks_exact(vocab)).zip(&self.targets) {
            *loss -= row[target as usize];
        }
        Ok((CpuStorage::F32(nll), Shape::from(rows)))
    }

    fn bwd(&self, logits: &Tensor, _nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = logits.dims2()?;
        let data = logits.flatten_all()?.to_vec1::<f32>()?;
        let scales = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let log_sum_exps = self.log_sum_exps(&data, vocab);
        let mut out = vec![0.0f32; rows * vocab];
        let kernel = NllGradient {
            logits: &data,
            log_sum_exps: &log_sum_exps,
            targets: &self.targets,
            scales: &scales,
            out: &mut out,
        };
        self.isa.run(None, kernel);
        Ok(Some(Tensor::from_vec(out, (rows, vocab), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn loss_and_gradient_match_the_graph() {
        let (rows, vocab) = (37, 45);
        let values: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 90.0).collect();
        let targets: Vec<u32> = (0..rows).map(|i| (i * 13 % vocab) as u32).collect();
        let targets = Tensor::from_vec(targets, rows, &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let logits = Var::from_vec(values.clone(), (rows, vocab), &Device::Cpu).unwrap();
            let per_row = match fused {
                true => nll(logits.as_tensor(), &targets).unwrap(),
                false => nll_and_argmax(logits.as_tensor(), &targets).unwrap().0,
            };
            // Rows weighted unequally, so each row's incoming gradient is used.
            let weights = Tensor::arange(1.0f32, rows as f32 + 1.0, &Device::Cpu).unwrap();
            let loss = (per_row.clone() * weights).unwrap().mean_all().unwrap();
            let grad = loss.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
            (per_row.to_vec1::<f32>().unwrap(), grad.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let (fused_nll, fused_grad) = run(true);
        let (graph_nll, graph_grad) = run(false);
        for (f, g) in fused_nll.iter().zip(&graph_nll) {
            assert!((f - g).abs() < 1e-5 * (1.0 + g.abs()), "nll {f} against {g}");
        }
        for (f, g) in fused_grad.iter().zip(&graph_grad) {
            assert!((f - g).abs() < 1e-6, "gradient {f} against {g}");
        }
        assert!(graph_grad.iter().any(|g| g.abs() > 1e-3), "a gradient to compare");
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let err = nll(&logits, &targets).unwrap_err().to_string();
        assert!(err.contains("target 4 outside a vocabulary of 4"), "{err}");
    }
}
