//! The melody network: token input (embedding or one-hot), stacked LSTM layers, dropout, and a
//! linear layer to logits over the vocabulary, in candle.
//! Runs on: worker and offline threads.
//!
//! Tensor names follow PyTorch, so weights move between the two without renaming:
//!
//! | name | shape | what |
//! |------|-------|------|
//! | `embedding.weight` | `[vocab, dim]` | token table (embedding input only) |
//! | `lstm.weight_ih_l{k}` | `[4 hidden, input]` | input weights of layer `k`, gates in order i, f, g, o |
//! | `lstm.weight_hh_l{k}` | `[4 hidden, hidden]` | recurrent weights of layer `k` |
//! | `lstm.bias_ih_l{k}`, `lstm.bias_hh_l{k}` | `[4 hidden]` | the two biases of layer `k` |
//! | `head.weight`, `head.bias` | `[vocab, hidden]`, `[vocab]` | output layer |
//!
//! The input of layer 0 is `dim` wide with an embedding and `vocab` wide with one-hot input.
//! One LSTM step, with `σ` the logistic function and `⊙` the element-wise product:
//! `[i f g o] = W_ih x + b_ih + W_hh h + b_hh`, `c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)`,
//! `h' = σ(o) ⊙ tanh(c')`.
//!
//! Internally sequences run time-major (`[seq, batch, ...]`) so the slice of one step is
//! contiguous. Two functions are the seams for faster kernels: `LstmLayer::recur` (the
//! recurrence of one layer over a whole sequence, the training hot spot) and
//! `MelodyLstm::step` (one symbol for one sequence over a plain `GenState`, the generation hot
//! spot).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{InputKind, ModelConfig};
use super::fast::FastLstm;
use crate::music::TokenId;

/// Prefix of the LSTM layers' tensors.
const LSTM_PREFIX: &str = "lstm";

/// One LSTM layer's weights, PyTorch layout (gates i, f, g, o stacked along the rows).
#[derive(Clone, Debug)]
pub struct LstmLayer {
    /// `[4 hidden, input]`.
    pub w_ih: Tensor,
    /// `[4 hidden, hidden]`.
    pub w_hh: Tensor,
    /// `[4 hidden]`.
    pub b_ih: Tensor,
    /// `[4 hidden]`.
    pub b_hh: Tensor,
}

impl LstmLayer {
    fn new(layer_idx: usize, input_width: usize, hidden_size: usize, vb: &VarBuilder) -> Result<Self> {
        let bound = 1.0 / (hidden_size as f64).sqrt();
        let uniform = Init::Uniform { lo: -bound, up: bound };
        let vb = vb.pp(LSTM_PREFIX);
        Ok(Self {
            w_ih: vb.get_with_hints(
                (4 * hidden_size, input_width),
                &format!("weight_ih_l{layer_idx}"),
                uniform,
            )?,
            w_hh: vb.get_with_hints(
                (4 * hidden_size, hidden_size),
                &format!("weight_hh_l{layer_idx}"),
                uniform,
            )?,
            b_ih: vb.get_with_hints(4 * hidden_size, &format!("bias_ih_l{layer_idx}"), uniform)?,
            b_hh: vb.get_with_hints(4 * hidden_size, &format!("bias_hh_l{layer_idx}"), uniform)?,
        })
    }

    /// Hidden width of this layer.
    pub fn hidden_size(&self) -> usize {
        self.w_hh.dim(1).unwrap_or(0)
    }

    /// Sum of the two biases. → `[4 hidden]`
    fn bias(&self) -> Result<Tensor> {
        &self.b_ih + &self.b_hh
    }

    /// Input projection of every step at once, biases included.
    /// xs: `[n, input]` → `[n, 4 hidden]`
    fn project(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.w_ih.t()?)?.broadcast_add(&self.bias()?)
    }

    /// The recurrence over a whole sequence, given every step's input projection.
    /// xs_proj: `[seq, batch, 4 hidden]` (`W_ih x + b_ih + b_hh`), h0 and c0: `[batch, hidden]`
    /// → (ys `[seq, batch, hidden]`, h `[batch, hidden]`, c `[batch, hidden]` after the last step).
    /// On the CPU this is one fused op with a hand-written backward pass (`super::fused`), whose
    /// returned `c` carries no gradient; elsewhere the per-step graph below.
    pub fn recur(&self, xs_proj: &Tensor, h0: &Tensor, c0: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if super::fused::applies(xs_proj, &self.w_hh) {
            return super::fused::recur(xs_proj, &self.w_hh, h0, c0);
        }
        let seq_len = xs_proj.dim(0)?;
        let hidden = self.hidden_size();
        let w_hh_t = self.w_hh.t()?;
        let (mut h, mut c) = (h0.clone(), c0.clone());
        let mut ys = Vec::with_capacity(seq_len);
        for t in 0..seq_len {
            let gates = (xs_proj.i(t)? + h.matmul(&w_hh_t)?)?;
            let in_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hidden)?)?;
            let forget_gate = candle_nn::ops::sigmoid(&gates.narrow(1, hidden, hidden)?)?;
            let cell_gate = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let out_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
            c = ((forget_gate * &c)? + (in_gate * cell_gate)?)?;
            h = (out_gate * c.tanh()?)?;
            ys.push(h.clone());
        }
        Ok((Tensor::stack(&ys, 0)?, h, c))
    }
}

/// The recurrent state of a batch of sequences: per layer, `h` and `c` of shape `[batch, hidden]`.
#[derive(Clone, Debug)]
pub struct LstmState {
    /// Hidden state per layer, each `[batch, hidden]`.
    pub h: Vec<Tensor>,
    /// Cell state per layer, each `[batch, hidden]`.
    pub c: Vec<Tensor>,
}

/// The recurrent state of one sequence during generation, as plain numbers, apart from the
/// weights: the worker owns it and resets it between phrases.
#[derive(Clone, Debug, PartialEq)]
pub struct GenState {
    /// Hidden state per layer: `[num_layers][hidden]`.
    pub h: Vec<Vec<f32>>,
    /// Cell state per layer: `[num_layers][hidden]`.
    pub c: Vec<Vec<f32>>,
}

impl GenState {
    /// The all-zero state a sequence starts from.
    pub fn zeros(num_layers: usize, hidden_size: usize) -> Self {
        Self { h: vec![vec![0.0; hidden_size]; num_layers], c: vec![vec![0.0; hidden_size]; num_layers] }
    }

    /// Back to all zeros, keeping the buffers.
    pub fn reset(&mut self) {
        for v in self.h.iter_mut().chain(self.c.iter_mut()) {
            v.fill(0.0);
        }
    }
}

/// Seeded dropout masks, so a training run repeats exactly for a seed (candle's own random
/// tensors on the CPU cannot be seeded).
pub struct Dropout {
    rng: ChaCha8Rng,
    drop_p: f32,
}

impl Dropout {
    /// Drops each activation with probability `drop_p` and scales the rest by `1 / (1 - drop_p)`.
    pub fn new(drop_p: f32, seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), drop_p }
    }

    /// xs: any shape → the same shape with dropout applied.
    pub fn apply(&mut self, xs: &Tensor) -> Result<Tensor> {
        if self.drop_p <= 0.0 {
            return Ok(xs.clone());
        }
        let scale = 1.0 / (1.0 - self.drop_p);
        let mask: Vec<f32> = (0..xs.elem_count())
            .map(|_| if self.rng.random::<f32>() < self.drop_p { 0.0 } else { scale })
            .collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// The melody network. Built by `new` from a `VarBuilder`: a `VarMap` one for training, a
/// safetensors one for inference.
#[derive(Clone, Debug)]
pub struct MelodyLstm {
    input: InputKind,
    /// `[vocab, dim]`, present for embedding input.
    embedding: Option<Tensor>,
    layers: Vec<LstmLayer>,
    /// `[vocab, hidden]`.
    head_w: Tensor,
    /// `[vocab]`.
    head_b: Tensor,
    hidden_size: usize,
    vocab_len: usize,
    dropout: f32,
    device: Device,
    /// The weights packed for `step`, when they are fixed (not training variables) and on the CPU.
    fast: Option<Arc<FastLstm>>,
}

impl MelodyLstm {
    /// Builds the network `cfg` describes from the tensors of `vb` (names in the module docs).
    /// With a `VarMap` builder the tensors are created with PyTorch's default initialisation.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let vocab_len = cfg.vocab_len();
        let hidden = cfg.hidden_size;
        let embedding = match cfg.input {
            InputKind::Embedding { dim } => Some(vb.get_with_hints(
                (vocab_len, dim),
                "embedding.weight",
                Init::Randn { mean: 0.0, stdev: 1.0 },
            )?),
            InputKind::OneHot => None,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for layer_idx in 0..cfg.num_layers {
            let width = if layer_idx == 0 { cfg.input.width(vocab_len) } else { hidden };
            layers.push(LstmLayer::new(layer_idx, width, hidden, &vb)?);
        }
        let bound = 1.0 / (hidden as f64).sqrt();
        let head = vb.pp("head");
        let head_w =
            head.get_with_hints((vocab_len, hidden), "weight", Init::Uniform { lo: -bound, up: bound })?;
        let head_b = head.get_with_hints(vocab_len, "bias", Init::Uniform { lo: -bound, up: bound })?;
        let mut lstm = Self {
            input: cfg.input,
            embedding,
            layers,
            head_w,
            head_b,
            hidden_size: hidden,
            vocab_len,
            dropout: cfg.dropout,
            device: vb.device().clone(),
            fast: None,
        };
        lstm.fast = FastLstm::for_fixed_weights(&lstm)?.map(Arc::new);
        Ok(lstm)
    }

    /// The name and shape of every tensor `cfg` needs, in a fixed order.
    pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (vocab, hidden) = (cfg.vocab_len(), cfg.hidden_size);
        let mut shapes = Vec::new();
        if let InputKind::Embedding { dim } = cfg.input {
            shapes.push(("embedding.weight".to_string(), vec![vocab, dim]));
        }
        for k in 0..cfg.num_layers {
            let width = if k == 0 { cfg.input.width(vocab) } else { hidden };
            shapes.push((format!("{LSTM_PREFIX}.weight_ih_l{k}"), vec![4 * hidden, width]));
            shapes.push((format!("{LSTM_PREFIX}.weight_hh_l{k}"), vec![4 * hidden, hidden]));
            shapes.push((format!("{LSTM_PREFIX}.bias_ih_l{k}"), vec![4 * hidden]));
            shapes.push((format!("{LSTM_PREFIX}.bias_hh_l{k}"), vec![4 * hidden]));
        }
        shapes.push(("head.weight".to_string(), vec![vocab, hidden]));
        shapes.push(("head.bias".to_string(), vec![vocab]));
        shapes
    }

    /// Seeded starting values for every tensor of `cfg`: LSTM and output weights uniform in
    /// `±1/√hidden` (PyTorch's default), embedding rows standard normal, biases zero except the
    /// forget gate's input bias at 1 (so early training does not forget everything).
    pub fn initial_tensors(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (cfg.hidden_size as f32).sqrt();
        let hidden = cfg.hidden_size;
        let mut out = HashMap::new();
        for (name, shape) in Self::tensor_shapes(cfg) {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = if name == "embedding.weight" {
                (0..len).map(|_| standard_normal(&mut rng)).collect()
            } else if name.contains(".bias_ih_") {
                (0..len).map(|i| if (hidden..2 * hidden).contains(&i) { 1.0 } else { 0.0 }).collect()
            } else if name.contains(".bias_hh_") || name == "head.bias" {
                vec![0.0; len]
            } else {
                (0..len).map(|_| rng.random_range(-bound..bound)).collect()
            };
            out.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Ok(out)
    }

    /// Every tensor by its saved name (shapes as in `tensor_shapes`).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(table) = &self.embedding {
            out.push(("embedding.weight".to_string(), table.clone()));
        }
        for (k, layer) in self.layers.iter().enumerate() {
            out.push((format!("{LSTM_PREFIX}.weight_ih_l{k}"), layer.w_ih.clone()));
            out.push((format!("{LSTM_PREFIX}.weight_hh_l{k}"), layer.w_hh.clone()));
            out.push((format!("{LSTM_PREFIX}.bias_ih_l{k}"), layer.b_ih.clone()));
            out.push((format!("{LSTM_PREFIX}.bias_hh_l{k}"), layer.b_hh.clone()));
        }
        out.push(("head.weight".to_string(), self.head_w.clone()));
        out.push(("head.bias".to_string(), self.head_b.clone()));
        out
    }

    /// Embedding or one-hot input.
    pub fn input(&self) -> InputKind {
        self.input
    }

    /// The LSTM layers, input first.
    pub fn layers(&self) -> &[LstmLayer] {
        &self.layers
    }

    /// Width of each layer's state.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Number of stacked layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of symbols, the width of the logits.
    pub fn vocab_len(&self) -> usize {
        self.vocab_len
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dropout probability of the config, for building a `Dropout` when training.
    pub fn dropout_p(&self) -> f32 {
        self.dropout
    }

    /// An all-zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<LstmState> {
        let zeros = Tensor::zeros((batch, self.hidden_size), DType::F32, &self.device)?;
        let n = self.layers.len();
        Ok(LstmState { h: vec![zeros.clone(); n], c: vec![zeros; n] })
    }

    /// Layer 0's input projection of every token.
    /// tokens: `[n]` u32 → `[n, 4 hidden]`
    fn input_projection(&self, tokens: &Tensor) -> Result<Tensor> {
        let layer0 = &self.layers[0];
        match &self.embedding {
            Some(table) => layer0.project(&table.index_select(tokens, 0)?),
            // A one-hot row times W_ihᵀ is one row of W_ihᵀ.
            None => layer0.w_ih.t()?.contiguous()?.index_select(tokens, 0)?.broadcast_add(&layer0.bias()?),
        }
    }

    /// The top layer's outputs for a time-major batch, before dropout and the output layer.
    /// tokens: `[seq, batch]` u32 → (ys `[seq, batch, hidden]`, state after the last step)
    fn lstm_outputs(
        &self,
        tokens: &Tensor,
        state: Option<&LstmState>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        let (seq_len, batch) = tokens.dims2()?;
        let zero;
        let state = match state {
            Some(s) => s,
            None => {
                zero = self.zero_state(batch)?;
                &zero
            }
        };
        let mut next =
            LstmState { h: Vec::with_capacity(self.layers.len()), c: Vec::with_capacity(self.layers.len()) };
        let mut ys: Option<Tensor> = None;
        for (k, layer) in self.layers.iter().enumerate() {
            let proj = match &ys {
                None => self.input_projection(&tokens.flatten_all()?)?,
                Some(prev) => {
                    let prev = match dropout.as_deref_mut() {
                        Some(d) => d.apply(prev)?,
                        None => prev.clone(),
                    };
                    layer.project(&prev.reshape((seq_len * batch, self.hidden_size))?)?
                }
            };
            let proj = proj.reshape((seq_len, batch, 4 * self.hidden_size))?;
            let (out, h, c) = layer.recur(&proj, &state.h[k], &state.c[k])?;
            next.h.push(h);
            next.c.push(c);
            ys = Some(out);
        }
        let ys = ys.expect("a config has at least one layer");
        let ys = match dropout {
            Some(d) => d.apply(&ys)?,
            None => ys,
        };
        Ok((ys, next))
    }

    /// The output layer. xs: `[..., hidden]` → `[..., vocab]`
    fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let flat = xs.reshape(((), self.hidden_size))?;
        let logits = flat.matmul(&self.head_w.t()?)?.broadcast_add(&self.head_b)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.vocab_len;
        logits.reshape(out_dims)
    }

    /// Logits for every position of a time-major batch. Pass `dropout` only when training.
    /// tokens: `[seq, batch]` u32, state: per layer `[batch, hidden]` (zeros when `None`)
    /// → (logits `[seq, batch, vocab]`, state after the last step)
    pub fn forward_time_major(
        &self,
        tokens: &Tensor,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        let (ys, next) = self.lstm_outputs(tokens, state, dropout)?;
        Ok((self.head(&ys)?, next))
    }

    /// Logits for every position of a batch. Pass `dropout` only when training.
    /// tokens: `[batch, seq]` u32, state: per layer `[batch, hidden]` (zeros when `None`)
    /// → (logits `[batch, seq, vocab]`, state after the last step)
    pub fn forward(
        &self,
        tokens: &Tensor,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        let (logits, next) = self.forward_time_major(&tokens.t()?.contiguous()?, state, dropout)?;
        Ok((logits.transpose(0, 1)?.contiguous()?, next))
    }

    /// Logits of the symbol after each window, every window starting from the zero state: the
    /// recipe's evaluation. tokens: `[batch, seq]` u32 → `[batch, vocab]`
    pub fn forward_last(&self, tokens: &Tensor) -> Result<Tensor> {
        let tokens = tokens.t()?.contiguous()?;
        let seq_len = tokens.dim(0)?;
        let (ys, _) = self.lstm_outputs(&tokens, None, None)?;
        self.head(&ys.i(seq_len - 1)?)
    }

    /// Feeds one token to one sequence: updates `state` and writes the logits of the next
    /// symbol into `logits`. state: per layer `[hidden]`; logits: `[vocab]`.
    /// Runs on packed weights (`FastLstm`) when the weights are fixed and on the CPU.
    pub fn step(&self, token: TokenId, state: &mut GenState, logits: &mut [f32]) -> Result<()> {
        if let Some(fast) = &self.fast {
            return fast.step(token, state, logits);
        }
        let hidden = self.hidden_size;
        let to_tensors = |rows: &[Vec<f32>]| -> Result<Vec<Tensor>> {
            rows.iter().map(|row| Tensor::from_slice(row, (1, hidden), &self.device)).collect()
        };
        let before = LstmState { h: to_tensors(&state.h)?, c: to_tensors(&state.c)? };
        let tokens = Tensor::from_slice(&[token.0 as u32], (1, 1), &self.device)?;
        let (out, after) = self.forward_time_major(&tokens, Some(&before), None)?;
        for (dst, src) in state.h.iter_mut().zip(&after.h) {
            dst.copy_from_slice(&src.flatten_all()?.to_vec1::<f32>()?);
        }
        for (dst, src) in state.c.iter_mut().zip(&after.c) {
            dst.copy_from_slice(&src.flatten_all()?.to_vec1::<f32>()?);
        }
        logits.copy_from_slice(&out.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

/// Mean negative log-likelihood and accuracy helpers shared by training and evaluation.
/// logits: `[n, vocab]`, targets: `[n]` u32 → (per-row NLL `[n]`, per-row argmax `[n]` u32)
pub fn nll_and_argmax(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    Ok((nll, logits.argmax(D::Minus1)?))
}

/// A standard normal sample (Box–Muller), so initialisation needs no extra crate.
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tests::small_config;

    fn model(cfg: &ModelConfig, seed: u64) -> MelodyLstm {
        let tensors = MelodyLstm::initial_tensors(cfg, seed, &Device::Cpu).unwrap();
        MelodyLstm::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
    }

    #[test]
    fn shapes_of_every_function() {
        let cfg = small_config();
        let m = model(&cfg, 1);
        let v = cfg.vocab_len() as u32;
        let tokens =
            Tensor::from_vec((0..15).map(|i| i % v).collect::<Vec<u32>>(), (3, 5), &Device::Cpu).unwrap();
        let (logits, state) = m.forward(&tokens, None, None).unwrap();
        assert_eq!(logits.dims(), &[3, 5, cfg.vocab_len()]);
        assert_eq!(state.h.len(), 2);
        assert_eq!(state.c[1].dims(), &[3, 16]);
        assert_eq!(m.forward_last(&tokens).unwrap().dims(), &[3, cfg.vocab_len()]);
    }

    #[test]
    fn stepping_one_token_at_a_time_matches_the_whole_sequence() {
        for input in [InputKind::Embedding { dim: 8 }, InputKind::OneHot] {
            let cfg = ModelConfig { input, ..small_config() };
            let m = model(&cfg, 2);
            let ids = [3u32, 0, 7, 7, 12, 15];
            let tokens = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
            let (logits, _) = m.forward(&tokens, None, None).unwrap();
            let whole = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            let mut state = GenState::zeros(2, 16);
            let mut step_logits = vec![0.0; cfg.vocab_len()];
            for (t, &id) in ids.iter().enumerate() {
                m.step(TokenId(id as u16), &mut state, &mut step_logits).unwrap();
                for (a, b) in step_logits.iter().zip(&whole[t]) {
                    assert!((a - b).abs() < 1e-5, "step {t}: {a} vs {b}");
                }
            }
            let last = m.forward_last(&tokens).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(last, whole[ids.len() - 1]);
        }
    }

    #[test]
    fn dropout_is_seeded_and_scales_what_it_keeps() {
        let xs = Tensor::ones((4, 50), DType::F32, &Device::Cpu).unwrap();
        let a = Dropout::new(0.5, 7).apply(&xs).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = Dropout::new(0.5, 7).apply(&xs).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| x == 0.0 || x == 2.0));
        let kept = a.iter().filter(|&&x| x > 0.0).count();
        assert!((60..140).contains(&kept), "kept {kept} of 200");
    }

    #[test]
    fn initial_tensors_are_seeded() {
        let cfg = small_config();
        let a = MelodyLstm::initial_tensors(&cfg, 5, &Device::Cpu).unwrap();
        let b = MelodyLstm::initial_tensors(&cfg, 5, &Device::Cpu).unwrap();
        let c = MelodyLstm::initial_tensors(&cfg, 6, &Device::Cpu).unwrap();
        let w = |m: &HashMap<String, Tensor>| {
            m["lstm.weight_hh_l1"].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        assert_eq!(a.len(), MelodyLstm::tensor_shapes(&cfg).len());
    }
}
