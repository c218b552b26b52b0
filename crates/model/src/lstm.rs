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
//! | `bar_position.weight` | `[positions, 4 hidden]` | layer 0's gate input per bar position (models with `bar_meters` only) |
//! | `bar_lookback.weight` | `[lookback · (vocab + 1), 4 hidden]` | layer 0's gate input per token one, two... bars back, or none (models with `bar_lookback` only) |
//! | `repeat.weight` | `[classes · (vocab + 1), 4 hidden]` | layer 0's gate input per token that followed the longest earlier match, by class of length, or none (models with `repeat_classes` only) |
//! | `bar_number.weight` | `[bar numbers + 2, 4 hidden]` | layer 0's gate input per bar number: unknown, the pickup, bars 1, 2... (models with `bar_numbers` only) |
//!
//! The input of layer 0 is `dim` wide with an embedding and `vocab` wide with one-hot input.
//! A model with bar positions also reads, beside each token, the id of its step's place in the
//! bar (`music::bar`), a one-hot input whose weights are the rows of `bar_position.weight`; with
//! lookback, also the tokens one, two... bars before the one it predicts (`side::BarReader`).
//! One LSTM step, with `σ` the logistic function and `⊙` the element-wise product:
//! `[i f g o] = W_ih x + b_ih + W_hh h + b_hh`, `c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)`,
//! `h' = σ(o) ⊙ tanh(c')`.
//!
//! Sequences run time-major (`[seq, batch, ...]`), one tensor per step. Two functions are the
//! seams for faster kernels: `LstmLayer::recur` (the recurrence of one layer over a whole
//! sequence, the training hot spot) and `MelodyLstm::step` (one symbol for one sequence over a
//! plain `GenState`, with weights arranged once by `step_weights`: the generation hot spot).
//! On the CPU both are taken over: steps run through `fast` (packed weights), and training's
//! whole sequences through the training crate's fused op (one op per layer with a hand-written
//! backward pass), which calls the `graph_*` functions here wherever it does not apply. On a
//! CUDA GPU, steps run through `gpu_step` (a kernel a layer) and the fused op sends the
//! recurrence to the training crate's `gpu_recurrence`.

use std::collections::HashMap;
use std::sync::Arc;

use arrayvec::ArrayVec;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{InputKind, ModelConfig};
use super::fast::FastLstm;
use crate::gpu_step::{GpuStep, MAX_SIDE_ROWS};
use crate::side::BarReader;
use music::bar::{NO_BAR_NUMBER, NO_BAR_POSITION};
use music::TokenId;

/// Prefix of the LSTM layers' tensors.
pub(crate) const LSTM_PREFIX: &str = "lstm";
/// Name of the bar-position table.
pub const BAR_TABLE: &str = "bar_position.weight";
/// Name of the lookback table.
pub const LOOKBACK_TABLE: &str = "bar_lookback.weight";
/// Name of the repeat table.
pub const REPEAT_TABLE: &str = "repeat.weight";
/// Name of the bar-number table.
pub const BAR_NUMBER_TABLE: &str = "bar_number.weight";

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
    pub(crate) fn new(
        layer_idx: usize,
        input_width: usize,
        hidden_size: usize,
        vb: &VarBuilder,
    ) -> Result<Self> {
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

    /// This layer's tensors by their saved names, as layer `k` of a network.
    pub fn named_tensors(&self, k: usize) -> [(String, Tensor); 4] {
        [
            (format!("{LSTM_PREFIX}.weight_ih_l{k}"), self.w_ih.clone()),
            (format!("{LSTM_PREFIX}.weight_hh_l{k}"), self.w_hh.clone()),
            (format!("{LSTM_PREFIX}.bias_ih_l{k}"), self.b_ih.clone()),
            (format!("{LSTM_PREFIX}.bias_hh_l{k}"), self.b_hh.clone()),
        ]
    }

    /// Hidden width of this layer.
    pub fn hidden_size(&self) -> usize {
        self.w_hh.dim(1).unwrap_or(0)
    }

    /// Rows `gate * hidden .. (gate + 1) * hidden` of a `[4 hidden, ...]` tensor.
    fn gate_rows(&self, xs: &Tensor, gate: usize) -> Result<Tensor> {
        let hidden = self.hidden_size();
        xs.narrow(0, gate * hidden, hidden)
    }

    /// Per-gate tables of layer 0's input contribution for every token, biases included:
    /// `xs` holds each token's input vector (the embedding table, or `None` for one-hot, where
    /// the vector is a unit column and the table is `W_ihᵀ` itself).
    /// xs: `[vocab, input]` → 4 × `[vocab, hidden]` (gates i, f, g, o)
    fn token_tables(&self, xs: Option<&Tensor>) -> Result<Vec<Tensor>> {
        (0..4)
            .map(|gate| {
                let w_t = self.gate_rows(&self.w_ih, gate)?.t()?;
                let bias = (self.gate_rows(&self.b_ih, gate)? + self.gate_rows(&self.b_hh, gate)?)?;
                let table = match xs {
                    Some(xs) => xs.matmul(&w_t.contiguous()?)?,
                    None => w_t.contiguous()?,
                };
                table.broadcast_add(&bias)
            })
            .collect()
    }

    /// The recurrence over a sequence, one step after another, with `w_hh` as the recurrent
    /// weights (the layer's own, or a dropped-out copy when training).
    /// input: per step `[batch]` tokens (with tables) or `[batch, input]` vectors; w_hh:
    /// `[4 hidden, hidden]`; h0 and c0: `[batch, hidden]` → (per step h `[batch, hidden]`, final
    /// h, final c `[batch, hidden]`).
    ///
    /// Each gate has its own weight slices, cut once per call: candle's backward pass of a
    /// per-step slice of a larger tensor would write a zero-padded copy of the whole tensor
    /// every step.
    pub fn recur(
        &self,
        input: &LayerInput,
        w_hh: &Tensor,
        h0: &Tensor,
        c0: &Tensor,
    ) -> Result<(Vec<Tensor>, Tensor, Tensor)> {
        // Per gate: the recurrent weights (`[hidden, hidden]`ᵀ) and, for vector input, the
        // input weights stacked above them (`[input + hidden, hidden]`) with the bias.
        let mut recurrent = Vec::with_capacity(4);
        let mut stacked = Vec::with_capacity(4);
        for gate in 0..4 {
            match input {
                LayerInput::Tokens { .. } => recurrent.push(self.gate_rows(w_hh, gate)?.t()?.contiguous()?),
                LayerInput::Vectors(_) => {
                    let w =
                        Tensor::cat(&[self.gate_rows(&self.w_ih, gate)?, self.gate_rows(w_hh, gate)?], 1)?;
                    let bias = (self.gate_rows(&self.b_ih, gate)? + self.gate_rows(&self.b_hh, gate)?)?;
                    stacked.push((w.t()?.contiguous()?, bias));
                }
            }
        }
        let num_steps = input.num_steps();
        let (mut h, mut c) = (h0.clone(), c0.clone());
        let mut ys = Vec::with_capacity(num_steps);
        for t in 0..num_steps {
            let gates: Vec<Tensor> = match input {
                LayerInput::Tokens { tables, tokens, bars } => (0..4)
                    .map(|g| {
                        let from_token = tables[g].index_select(&tokens[t], 0)?;
                        let hidden = self.hidden_size();
                        let from_input = match bars {
                            Some(bars) => (from_token + bars[t].narrow(1, g * hidden, hidden)?)?,
                            None => from_token,
                        };
                        from_input + h.matmul(&recurrent[g])?
                    })
                    .collect::<Result<_>>()?,
                LayerInput::Vectors(xs) => {
                    let xh = Tensor::cat(&[&xs[t], &h], 1)?;
                    stacked.iter().map(|(w, b)| xh.matmul(w)?.broadcast_add(b)).collect::<Result<_>>()?
                }
            };
            let in_gate = candle_nn::ops::sigmoid(&gates[0])?;
            let forget_gate = candle_nn::ops::sigmoid(&gates[1])?;
            let cell_gate = gates[2].tanh()?;
            let out_gate = candle_nn::ops::sigmoid(&gates[3])?;
            c = ((forget_gate * &c)? + (in_gate * cell_gate)?)?;
            h = (out_gate * c.tanh()?)?;
            ys.push(h.clone());
        }
        Ok((ys, h, c))
    }
}

/// What one layer reads at each step.
pub enum LayerInput {
    /// Layer 0: token ids, and per gate the table of every token's input contribution
    /// (`LstmLayer::token_tables`). tables: 4 × `[vocab, hidden]`; tokens: per step `[batch]` u32;
    /// bars (models with bar inputs): per step their summed contribution `[batch, 4 hidden]`.
    Tokens { tables: Vec<Tensor>, tokens: Vec<Tensor>, bars: Option<Vec<Tensor>> },
    /// Layers above: the layer below's outputs, per step `[batch, input]`.
    Vectors(Vec<Tensor>),
}

impl LayerInput {
    fn num_steps(&self) -> usize {
        match self {
            LayerInput::Tokens { tokens, .. } => tokens.len(),
            LayerInput::Vectors(xs) => xs.len(),
        }
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
/// tensors on the CPU cannot be seeded). Masks go in two places, each set apart:
/// - on each layer's outputs: per element and step, or `locked`: one mask per layer and
///   sequence, the same at every step (variational dropout), so the network cannot average a
///   dropped unit back in over the following steps;
/// - on each layer's recurrent weights (`weight_drop`, DropConnect): one mask per layer and
///   batch, so the recurrence itself is regularised without touching the state it carries.
pub struct Dropout {
    rng: ChaCha8Rng,
    drop_p: f32,
    locked: bool,
    weight_drop: f32,
}

impl Dropout {
    /// Drops each activation with probability `drop_p` and scales the rest by `1 / (1 - drop_p)`.
    pub fn new(drop_p: f32, seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), drop_p, locked: false, weight_drop: 0.0 }
    }

    /// One output mask per layer and sequence, shared by every step.
    pub fn locked(mut self, locked: bool) -> Self {
        self.locked = locked;
        self
    }

    /// Also drops each recurrent weight with probability `weight_drop`, once per batch.
    pub fn weight_drop(mut self, weight_drop: f32) -> Self {
        self.weight_drop = weight_drop;
        self
    }

    /// A mask of `shape`: each element 0 with probability `p`, else `1 / (1 - p)`.
    fn mask(&mut self, p: f32, shape: &[usize], like: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (1.0 - p);
        let n = shape.iter().product();
        let mask: Vec<f32> = (0..n).map(|_| if self.rng.random::<f32>() < p { 0.0 } else { scale }).collect();
        Tensor::from_vec(mask, shape, like.device())?.to_dtype(like.dtype())
    }

    /// xs: any shape → the same shape with dropout applied to every element.
    pub fn apply(&mut self, xs: &Tensor) -> Result<Tensor> {
        if self.drop_p <= 0.0 {
            return Ok(xs.clone());
        }
        xs * self.mask(self.drop_p, xs.dims(), xs)?
    }

    /// One layer's outputs over a whole sequence. ys: `[seq, batch, hidden]` → the same shape.
    pub fn apply_sequence(&mut self, ys: &Tensor) -> Result<Tensor> {
        if !self.locked || self.drop_p <= 0.0 {
            return self.apply(ys);
        }
        let (_, batch, hidden) = ys.dims3()?;
        ys.broadcast_mul(&self.mask(self.drop_p, &[batch, hidden], ys)?)
    }

    /// One layer's outputs step by step, as `apply_sequence` treats them stacked, drawing the
    /// same masks. ys: per step `[batch, hidden]`.
    pub fn apply_steps(&mut self, ys: &[Tensor]) -> Result<Vec<Tensor>> {
        let Some(first) = ys.first() else { return Ok(Vec::new()) };
        if !self.locked || self.drop_p <= 0.0 {
            return ys.iter().map(|y| self.apply(y)).collect();
        }
        let mask = self.mask(self.drop_p, first.dims(), first)?;
        ys.iter().map(|y| y * &mask).collect()
    }

    /// A layer's recurrent weights for one batch, with DropConnect when `weight_drop` is set.
    /// w_hh: `[4 hidden, hidden]` → the same shape.
    pub fn recurrent_weights(&mut self, w_hh: &Tensor) -> Result<Tensor> {
        if self.weight_drop <= 0.0 {
            return Ok(w_hh.clone());
        }
        w_hh * self.mask(self.weight_drop, w_hh.dims(), w_hh)?
    }
}

/// The melody network. Built by `new` from a `VarBuilder`: a `VarMap` one for training, a
/// safetensors one for inference.
#[derive(Clone, Debug)]
pub struct MelodyLstm {
    input: InputKind,
    /// `[vocab, dim]`, present for embedding input.
    embedding: Option<Tensor>,
    /// `[positions, 4 hidden]`, present for a model with bar positions.
    bar_table: Option<Tensor>,
    /// `[lookback · (vocab + 1), 4 hidden]`, present for a model with bar lookback.
    lookback_table: Option<Tensor>,
    /// `[classes · (vocab + 1), 4 hidden]`, present for a model with repeat inputs.
    repeat_table: Option<Tensor>,
    /// `[bar numbers + 2, 4 hidden]`, present for a model with bar numbers.
    bar_number_table: Option<Tensor>,
    bar_reader: BarReader,
    side_layout: SideLayout,
    layers: Vec<LstmLayer>,
    /// `[vocab, hidden]`.
    head_w: Tensor,
    /// `[vocab]`.
    head_b: Tensor,
    hidden_size: usize,
    vocab_len: usize,
    dropout: f32,
    device: Device,
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
        let bar_table = match cfg.num_bar_positions() {
            0 => None,
            rows => Some(vb.get_with_hints((rows, 4 * hidden), BAR_TABLE, Init::Const(0.0))?),
        };
        // A table of one block of `vocab + 1` rows (every token, then none) per slot; only
        // beside the bar positions, whose side inputs carry them.
        let token_table = |slots: usize, name: &str| match (cfg.num_bar_positions(), slots) {
            (0, _) | (_, 0) => Ok(None),
            _ => vb.get_with_hints((slots * (vocab_len + 1), 4 * hidden), name, Init::Const(0.0)).map(Some),
        };
        let lookback_table = token_table(cfg.bar_lookback, LOOKBACK_TABLE)?;
        let repeat_table = token_table(cfg.repeat_classes, REPEAT_TABLE)?;
        let bar_number_table = match (cfg.num_bar_positions(), cfg.num_bar_number_rows()) {
            (0, _) | (_, 0) => None,
            (_, rows) => Some(vb.get_with_hints((rows, 4 * hidden), BAR_NUMBER_TABLE, Init::Const(0.0))?),
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
        Ok(Self {
            input: cfg.input,
            embedding,
            bar_table,
            lookback_table,
            repeat_table,
            bar_number_table,
            bar_reader: BarReader::for_model(cfg),
            side_layout: SideLayout::for_model(cfg),
            layers,
            head_w,
            head_b,
            hidden_size: hidden,
            vocab_len,
            dropout: cfg.dropout,
            device: vb.device().clone(),
        })
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
        if cfg.num_bar_positions() > 0 {
            shapes.push((BAR_TABLE.to_string(), vec![cfg.num_bar_positions(), 4 * hidden]));
            if cfg.bar_lookback > 0 {
                shapes.push((LOOKBACK_TABLE.to_string(), vec![cfg.bar_lookback * (vocab + 1), 4 * hidden]));
            }
            if cfg.repeat_classes > 0 {
                shapes.push((REPEAT_TABLE.to_string(), vec![cfg.repeat_classes * (vocab + 1), 4 * hidden]));
            }
            if cfg.bar_numbers > 0 {
                shapes.push((BAR_NUMBER_TABLE.to_string(), vec![cfg.num_bar_number_rows(), 4 * hidden]));
            }
        }
        shapes
    }

    /// Seeded starting values for every tensor of `cfg`: LSTM and output weights uniform in
    /// `±1/√hidden` (PyTorch's default), embedding rows standard normal, biases zero except the
    /// forget gate's input bias at 1 (so early training does not forget everything), and the
    /// bar-position table zero (a new model starts out reading symbols alone).
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
            } else if name.contains(".bias_hh_")
                || name == "head.bias"
                || name == BAR_TABLE
                || name == LOOKBACK_TABLE
                || name == REPEAT_TABLE
                || name == BAR_NUMBER_TABLE
            {
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
            out.extend(layer.named_tensors(k));
        }
        out.push(("head.weight".to_string(), self.head_w.clone()));
        out.push(("head.bias".to_string(), self.head_b.clone()));
        if let Some(table) = &self.bar_table {
            out.push((BAR_TABLE.to_string(), table.clone()));
        }
        if let Some(table) = &self.lookback_table {
            out.push((LOOKBACK_TABLE.to_string(), table.clone()));
        }
        if let Some(table) = &self.repeat_table {
            out.push((REPEAT_TABLE.to_string(), table.clone()));
        }
        if let Some(table) = &self.bar_number_table {
            out.push((BAR_NUMBER_TABLE.to_string(), table.clone()));
        }
        out
    }

    /// Embedding or one-hot input.
    pub fn input(&self) -> InputKind {
        self.input
    }

    /// The output layer: weight `[vocab, hidden]` and bias `[vocab]`.
    pub fn output_layer(&self) -> (&Tensor, &Tensor) {
        (&self.head_w, &self.head_b)
    }

    /// The token table `[vocab, dim]`, for embedding input.
    pub fn embedding(&self) -> Option<&Tensor> {
        self.embedding.as_ref()
    }

    /// The bar-position table `[positions, 4 hidden]`, for a model with bar positions.
    pub fn bar_table(&self) -> Option<&Tensor> {
        self.bar_table.as_ref()
    }

    /// How this model's bar inputs are read off a stream.
    pub fn bar_reader(&self) -> &BarReader {
        &self.bar_reader
    }

    /// The tables of every bar input, one after the other (`[positions + (lookback + repeat
    /// classes) · (vocab + 1) + bar number rows, 4 hidden]`: the rows `side_rows` indexes), each
    /// passed through `weight`; `None` for a model without bar inputs.
    pub fn side_table(&self, weight: &dyn Fn(&Tensor) -> Tensor) -> Result<Option<Tensor>> {
        let Some(bars) = &self.bar_table else {
            return Ok(None);
        };
        let tables: Vec<Tensor> = [
            Some(bars),
            self.lookback_table.as_ref(),
            self.repeat_table.as_ref(),
            self.bar_number_table.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(weight)
        .collect();
        Ok(Some(match tables.len() {
            1 => tables[0].clone(),
            _ => Tensor::cat(&tables, 0)?,
        }))
    }

    /// The row of the side table for bar input `j` with value `raw` (`SideLayout::row`).
    pub fn side_row(&self, j: usize, raw: u32) -> Result<u32> {
        self.side_layout.row(j, raw).ok_or_else(|| candle_core::Error::Msg(self.side_layout.refusal(j, raw)))
    }

    /// Where each bar input's rows lie in the side table.
    pub fn side_layout(&self) -> SideLayout {
        self.side_layout
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

    /// The rows of the side table (`side_table`) each step reads beside its token, `[seq, batch,
    /// inputs]` u32 (`inputs`: the bar position and one per bar of lookback). `bars` holds the
    /// raw inputs (`BarReader::push`), `[seq, batch]` (positions only) or `[seq, batch, n]`;
    /// inputs not given read as none (`NO_BAR_POSITION`, no lookback). `None` for a model
    /// without bar inputs, which ignores them.
    pub fn side_rows(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Option<Tensor>> {
        if self.bar_table.is_none() {
            return Ok(None);
        }
        let (seq_len, batch) = tokens.dims2()?;
        let per_step = self.bar_reader.per_step();
        let (given, given_per_step) = match bars {
            Some(bars) => {
                let dims = bars.dims();
                let n = match dims.len() {
                    2 => 1,
                    3 => dims[2],
                    _ => 0,
                };
                if n == 0 || dims[..2] != [seq_len, batch] {
                    candle_core::bail!("bar inputs {dims:?} do not fit tokens {:?}", tokens.dims());
                }
                (bars.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?, n)
            }
            None => (Vec::new(), 0),
        };
        let mut rows = Vec::with_capacity(seq_len * batch * per_step);
        for item in 0..seq_len * batch {
            for j in 0..per_step {
                let raw = match j < given_per_step {
                    true => given[item * given_per_step + j],
                    false => self.side_layout.missing(j),
                };
                rows.push(self.side_row(j, raw)?);
            }
        }
        Ok(Some(Tensor::from_vec(rows, (seq_len, batch, per_step), tokens.device())?))
    }

    /// The summed side-table rows of every step, `[seq, batch, 4 hidden]`, or `None` for a model
    /// without bar inputs.
    fn side_sums(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        weight: &dyn Fn(&Tensor) -> Tensor,
    ) -> Result<Option<Tensor>> {
        let (Some(rows), Some(table)) = (self.side_rows(tokens, bars)?, self.side_table(weight)?) else {
            return Ok(None);
        };
        let (seq_len, batch, per_step) = rows.dims3()?;
        let picked = table.index_select(&rows.flatten_all()?, 0)?;
        Ok(Some(picked.reshape((seq_len, batch, per_step, 4 * self.hidden_size))?.sum(2)?))
    }

    /// The top layer's output at every step of a time-major batch, before dropout and the
    /// output layer. tokens: `[seq, batch]` u32, bars: `[seq, batch(, inputs)]` → (per step
    /// `[batch, hidden]`, state after the last step)
    pub fn lstm_outputs(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<(Vec<Tensor>, LstmState)> {
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
        let step_tokens = (0..seq_len).map(|t| tokens.get(t)).collect::<Result<Vec<_>>>()?;
        let bars = match self.side_sums(tokens, bars, &Tensor::clone)? {
            Some(sums) => Some((0..seq_len).map(|t| sums.get(t)).collect::<Result<Vec<_>>>()?),
            None => None,
        };
        let mut input = LayerInput::Tokens {
            tables: self.layers[0].token_tables(self.embedding.as_ref())?,
            tokens: step_tokens,
            bars,
        };
        let mut ys = Vec::new();
        for (k, layer) in self.layers.iter().enumerate() {
            let w_hh = match dropout.as_deref_mut() {
                Some(d) => d.recurrent_weights(&layer.w_hh)?,
                None => layer.w_hh.clone(),
            };
            let (out, h, c) = layer.recur(&input, &w_hh, &state.h[k], &state.c[k])?;
            next.h.push(h);
            next.c.push(c);
            ys = match dropout.as_deref_mut() {
                Some(d) => d.apply_steps(&out)?,
                None => out,
            };
            input = LayerInput::Vectors(ys.clone());
        }
        Ok((ys, next))
    }

    /// The output layer. xs: `[..., hidden]` → `[..., vocab]`
    pub fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let flat = xs.reshape(((), self.hidden_size))?;
        let logits = flat.matmul(&self.head_w.t()?)?.broadcast_add(&self.head_b)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.vocab_len;
        logits.reshape(out_dims)
    }

    /// Logits for every position of a time-major batch. Pass `dropout` only when training.
    /// tokens: `[seq, batch]` u32, bars: `[seq, batch]` or `[seq, batch, inputs]` (`side_rows`),
    /// state: per layer `[batch, hidden]` (zeros when `None`) → (logits `[seq, batch, vocab]`,
    /// state after the last step)
    pub fn graph_forward_time_major(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        let (ys, next) = self.lstm_outputs(tokens, bars, state, dropout)?;
        Ok((self.head(&Tensor::stack(&ys, 0)?)?, next))
    }

    /// Logits for every position of a time-major batch from the zero state, with no gradient
    /// tracked (a teacher's predictions). tokens: `[seq, batch]` u32, bars: as
    /// `forward_time_major` → logits `[seq, batch, vocab]`
    pub fn graph_predict_time_major(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Tensor> {
        let (logits, _) = self.graph_forward_time_major(tokens, bars, None, None)?;
        Ok(logits.detach())
    }

    /// Logits for every position of a batch. Pass `dropout` only when training.
    /// tokens: `[batch, seq]` u32, bars: `[batch, seq]` or `[batch, seq, inputs]` (`side_rows`),
    /// state: per layer `[batch, hidden]` (zeros when `None`) → (logits `[batch, seq, vocab]`,
    /// state after the last step)
    pub fn graph_forward(
        &self,
        tokens: &Tensor,
        bars: Option<&Tensor>,
        state: Option<&LstmState>,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, LstmState)> {
        let (tokens, bars) = time_major(tokens, bars)?;
        let (logits, next) = self.graph_forward_time_major(&tokens, bars.as_ref(), state, dropout)?;
        Ok((logits.transpose(0, 1)?.contiguous()?, next))
    }

    /// Logits of the symbol after each window, every window starting from the zero state: the
    /// recipe's evaluation. tokens: `[batch, seq]` u32, bars: `[batch, seq(, inputs)]` →
    /// `[batch, vocab]`
    pub fn graph_forward_last(&self, tokens: &Tensor, bars: Option<&Tensor>) -> Result<Tensor> {
        let (tokens, bars) = time_major(tokens, bars)?;
        let (ys, _) = self.lstm_outputs(&tokens, bars.as_ref(), None, None)?;
        self.head(ys.last().expect("at least one step"))
    }

    /// The weights rearranged for `step` and `forward_last_with`: computed once per loaded
    /// model, since the training layout (per-gate slices for a cheap backward pass) is slow
    /// for inference. A copy, detached from training: recompute it after the weights change.
    pub fn step_weights(&self) -> Result<StepWeights> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (k, layer) in self.layers.iter().enumerate() {
            let bias = (&layer.b_ih + &layer.b_hh)?;
            let input = if k == 0 {
                // Every token's input contribution with the bias: `[vocab, 4 hidden]`.
                let w_ih_t = layer.w_ih.t()?.contiguous()?;
                let table = match &self.embedding {
                    Some(table) => table.matmul(&w_ih_t)?,
                    None => w_ih_t,
                };
                StepInput::Table {
                    tokens: table.broadcast_add(&bias)?.detach(),
                    bars: self.side_table(&Tensor::detach)?,
                }
            } else {
                StepInput::Weights {
                    w_ih_t: layer.w_ih.t()?.contiguous()?.detach(),
                    bias: bias.unsqueeze(0)?.detach(),
                }
            };
            layers.push(StepLayer { input, w_hh_t: layer.w_hh.t()?.contiguous()?.detach() });
        }
        let mut weights = StepWeights {
            layers,
            head_w_t: self.head_w.t()?.contiguous()?.detach(),
            head_b: self.head_b.unsqueeze(0)?.detach(),
            fast: FastLstm::for_model(self)?.map(Arc::new),
            gpu: None,
        };
        let side_per_step = if self.bar_table.is_some() { self.bar_reader.per_step() } else { 0 };
        weights.gpu = GpuStep::for_weights(&weights, side_per_step, &self.device)?.map(Arc::new);
        Ok(weights)
    }

    /// The side-table row of bar input `j` of one step's `bars` (a missing one reads as none).
    pub fn side_row_at(&self, j: usize, bars: &[u16]) -> Result<u32> {
        self.side_row(j, bars.get(j).map_or(self.side_layout.missing(j), |&raw| raw as u32))
    }

    /// Feeds one token with its bar inputs (`bars`: the bar position, then the tokens one and
    /// two bars back; missing ones read as none, and a model without bar inputs ignores them)
    /// to one sequence: updates `state` and writes the logits of the next symbol into `logits`.
    /// weights: from `step_weights`; state: per layer `[hidden]`; logits: `[vocab]`.
    pub fn step(
        &self,
        weights: &StepWeights,
        token: TokenId,
        bars: &[u16],
        state: &mut GenState,
        logits: &mut [f32],
    ) -> Result<()> {
        if let Some(fast) = &weights.fast {
            return fast.step_at(token, bars, state, logits);
        }
        if let Some(gpu) = &weights.gpu {
            // A GPU step exists only for models with at most `MAX_SIDE_ROWS` bar inputs a step.
            let mut rows = ArrayVec::<u32, MAX_SIDE_ROWS>::new();
            if self.bar_table.is_some() {
                for j in 0..self.bar_reader.per_step() {
                    rows.push(self.side_row_at(j, bars)?);
                }
            }
            return gpu.step(token.0 as usize, &rows, state, logits);
        }
        let hidden = self.hidden_size;
        let mut x: Option<Tensor> = None;
        for (k, layer) in weights.layers.iter().enumerate() {
            let h = Tensor::from_slice(&state.h[k], (1, hidden), &self.device)?;
            let c = Tensor::from_slice(&state.c[k], (1, hidden), &self.device)?;
            let from_input = match (&layer.input, &x) {
                (StepInput::Table { tokens, bars: side }, _) => {
                    let mut from_input = tokens.narrow(0, token.0 as usize, 1)?;
                    if let Some(side) = side {
                        for j in 0..self.bar_reader.per_step() {
                            let row = self.side_row_at(j, bars)? as usize;
                            from_input = (from_input + side.narrow(0, row, 1)?)?;
                        }
                    }
                    from_input
                }
                (StepInput::Weights { w_ih_t, bias }, Some(x)) => (x.matmul(w_ih_t)? + bias)?,
                (StepInput::Weights { .. }, None) => candle_core::bail!("layer {k} has no input"),
            };
            let gates = (from_input + h.matmul(&layer.w_hh_t)?)?;
            let in_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hidden)?)?;
            let forget_gate = candle_nn::ops::sigmoid(&gates.narrow(1, hidden, hidden)?)?;
            let cell_gate = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let out_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
            let c = ((forget_gate * c)? + (in_gate * cell_gate)?)?;
            let h = (out_gate * c.tanh()?)?;
            state.h[k].copy_from_slice(&h.flatten_all()?.to_vec1::<f32>()?);
            state.c[k].copy_from_slice(&c.flatten_all()?.to_vec1::<f32>()?);
            x = Some(h);
        }
        let top = x.expect("a config has at least one layer");
        let out = (top.matmul(&weights.head_w_t)? + &weights.head_b)?;
        logits.copy_from_slice(&out.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

impl MelodyLstm {
    /// Feeds one token to each of `batch` sequences at once, their bar inputs all missing, with
    /// the state kept as tensors on the model's device: on a GPU nothing crosses to the CPU
    /// but the logits. weights: from `step_weights`; tokens: `[batch]` u32; state: per layer
    /// `[batch, hidden]` (`zero_state`), updated → logits `[batch, vocab]`
    pub fn step_batch(
        &self,
        weights: &StepWeights,
        tokens: &Tensor,
        state: &mut LstmState,
    ) -> Result<Tensor> {
        let hidden = self.hidden_size;
        let mut x: Option<Tensor> = None;
        for (k, layer) in weights.layers.iter().enumerate() {
            let from_input = match (&layer.input, &x) {
                (StepInput::Table { tokens: table, bars: side }, _) => {
                    let mut from_input = table.index_select(tokens, 0)?;
                    if let Some(side) = side {
                        for j in 0..self.bar_reader.per_step() {
                            let row = self.side_row(j, self.side_layout.missing(j))? as usize;
                            from_input = from_input.broadcast_add(&side.narrow(0, row, 1)?)?;
                        }
                    }
                    from_input
                }
                (StepInput::Weights { w_ih_t, bias }, Some(x)) => x.matmul(w_ih_t)?.broadcast_add(bias)?,
                (StepInput::Weights { .. }, None) => candle_core::bail!("layer {k} has no input"),
            };
            let gates = (from_input + state.h[k].matmul(&layer.w_hh_t)?)?;
            let in_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hidden)?)?;
            let forget_gate = candle_nn::ops::sigmoid(&gates.narrow(1, hidden, hidden)?)?;
            let cell_gate = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let out_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
            let c = ((forget_gate * &state.c[k])? + (in_gate * cell_gate)?)?;
            let h = (out_gate * c.tanh()?)?;
            state.c[k] = c;
            state.h[k] = h.clone();
            x = Some(h);
        }
        let top = x.expect("a config has at least one layer");
        top.matmul(&weights.head_w_t)?.broadcast_add(&weights.head_b)
    }

    /// Logits of the symbol after each window, each window from the zero state, with weights
    /// arranged by `step_weights` and no gradient bookkeeping: evaluation's fast path.
    /// tokens: `[batch, seq]` u32, bars: `[batch, seq(, inputs)]` → `[batch, vocab]`
    pub fn graph_forward_last_with(
        &self,
        weights: &StepWeights,
        tokens: &Tensor,
        bars: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (tokens, bars) = time_major(tokens, bars)?;
        let (seq_len, batch) = tokens.dims2()?;
        let hidden = self.hidden_size;
        let side_sums = self.side_sums(&tokens, bars.as_ref(), &Tensor::detach)?;
        let mut below: Option<Tensor> = None;
        for layer in &weights.layers {
            // Every step's input contribution at once: `[seq, batch, 4 hidden]`.
            let from_input = match (&layer.input, &below) {
                (StepInput::Table { tokens: table, .. }, _) => {
                    let from_tokens = table.index_select(&tokens.flatten_all()?, 0)?;
                    match &side_sums {
                        Some(sums) => (from_tokens + sums.reshape((seq_len * batch, 4 * hidden))?)?,
                        None => from_tokens,
                    }
                }
                (StepInput::Weights { w_ih_t, bias }, Some(xs)) => {
                    xs.reshape((seq_len * batch, hidden))?.matmul(w_ih_t)?.broadcast_add(bias)?
                }
                (StepInput::Weights { .. }, None) => {
                    candle_core::bail!("a layer above the first has no input")
                }
            }
            .reshape((seq_len, batch, 4 * hidden))?;
            let mut h = Tensor::zeros((batch, hidden), DType::F32, &self.device)?;
            let mut c = h.clone();
            let mut ys = Vec::with_capacity(seq_len);
            for t in 0..seq_len {
                let gates = (from_input.get(t)? + h.matmul(&layer.w_hh_t)?)?;
                let in_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hidden)?)?;
                let forget_gate = candle_nn::ops::sigmoid(&gates.narrow(1, hidden, hidden)?)?;
                let cell_gate = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
                let out_gate = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
                c = ((forget_gate * &c)? + (in_gate * cell_gate)?)?;
                h = (out_gate * c.tanh()?)?;
                ys.push(h.clone());
            }
            below = Some(Tensor::stack(&ys, 0)?);
        }
        let top = below.expect("a config has at least one layer").get(seq_len - 1)?;
        top.matmul(&weights.head_w_t)?.broadcast_add(&weights.head_b)
    }
}

/// A batch-major batch made time-major, as the whole-sequence passes run it. tokens:
/// `[batch, seq]`, bars: `[batch, seq(, inputs)]` → (`[seq, batch]`, `[seq, batch(, inputs)]`)
pub fn time_major(tokens: &Tensor, bars: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
    let bars = bars.map(|b| b.transpose(0, 1)?.contiguous()).transpose()?;
    Ok((tokens.t()?.contiguous()?, bars))
}

/// The weights of one sequence's step, arranged once per loaded model (`MelodyLstm::step_weights`).
#[derive(Clone, Debug)]
pub struct StepWeights {
    layers: Vec<StepLayer>,
    /// `[hidden, vocab]`.
    head_w_t: Tensor,
    /// `[1, vocab]`.
    head_b: Tensor,
    /// The same weights packed for the CPU's one-sequence step (`None` off the CPU).
    fast: Option<Arc<FastLstm>>,
    /// The same weights on a CUDA GPU for its one-sequence step (`None` elsewhere).
    gpu: Option<Arc<GpuStep>>,
}

impl StepWeights {
    /// The same weights without their packed step (the CPU's or the CUDA GPU's):
    /// `MelodyLstm::step` then runs candle's graph of f32 ops (to compare the two).
    pub fn without_fast_step(mut self) -> Self {
        self.fast = None;
        self.gpu = None;
        self
    }

    /// The layers, input first.
    pub(crate) fn layers(&self) -> &[StepLayer] {
        &self.layers
    }

    /// The output layer as arranged here: `[hidden, vocab]` and `[1, vocab]`.
    pub fn head(&self) -> (&Tensor, &Tensor) {
        (&self.head_w_t, &self.head_b)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct StepLayer {
    pub(crate) input: StepInput,
    /// `[hidden, 4 hidden]`.
    pub(crate) w_hh_t: Tensor,
}

#[derive(Clone, Debug)]
pub(crate) enum StepInput {
    /// Layer 0: every token's input contribution, biases included, `[vocab, 4 hidden]`, and
    /// the side table of every bar input's (`MelodyLstm::side_table`), for a model with them.
    Table { tokens: Tensor, bars: Option<Tensor> },
    /// Layers above: `[input, 4 hidden]` and the summed bias `[1, 4 hidden]`.
    Weights { w_ih_t: Tensor, bias: Tensor },
}

/// Where each bar input's rows lie in the side table (`MelodyLstm::side_table`): input 0 is a
/// bar position, the next `token_slots` a token each (one, two... bars back, then the repeated
/// token of each class, or the vocabulary's length for none), and the last, for a model with
/// bar numbers, the row of the step's bar number (`side::BarReader`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideLayout {
    /// Rows of the bar-position table; 0 for a model without bar inputs.
    positions: usize,
    vocab_len: usize,
    /// Lookback and repeat inputs, a block of `vocab_len + 1` rows each.
    token_slots: usize,
    /// Rows of the bar-number table; 0 for a model without one.
    bar_number_rows: usize,
}

impl SideLayout {
    /// The layout of `cfg`'s side table.
    pub fn for_model(cfg: &ModelConfig) -> Self {
        match cfg.num_bar_positions() {
            0 => Self::default(),
            positions => Self {
                positions,
                vocab_len: cfg.vocab_len(),
                token_slots: cfg.bar_lookback + cfg.repeat_classes,
                bar_number_rows: cfg.num_bar_number_rows(),
            },
        }
    }

    /// Inputs read beside each token.
    pub fn inputs_per_step(&self) -> usize {
        match self.positions {
            0 => 0,
            _ => 1 + self.token_slots + usize::from(self.bar_number_rows > 0),
        }
    }

    /// Which kind of input `j` is, or `None` past the last.
    fn input(&self, j: usize) -> Option<SideInput> {
        match j {
            0 => Some(SideInput::Position),
            j if j <= self.token_slots => Some(SideInput::Token { slot: j - 1 }),
            j if j == self.token_slots + 1 && self.bar_number_rows > 0 => Some(SideInput::BarNumber),
            _ => None,
        }
    }

    /// The first row and the number of rows of `input`'s block.
    fn block(&self, input: SideInput) -> (usize, usize) {
        let token_rows = self.vocab_len + 1;
        match input {
            SideInput::Position => (0, self.positions),
            SideInput::Token { slot } => (self.positions + slot * token_rows, token_rows),
            SideInput::BarNumber => (self.positions + self.token_slots * token_rows, self.bar_number_rows),
        }
    }

    /// The value input `j` reads when none is given: an unknown position or bar number, or no
    /// token.
    pub fn missing(&self, j: usize) -> u32 {
        match self.input(j) {
            Some(SideInput::Position) => NO_BAR_POSITION as u32,
            Some(SideInput::Token { .. }) => self.vocab_len as u32,
            Some(SideInput::BarNumber) | None => NO_BAR_NUMBER as u32,
        }
    }

    /// The side-table row of input `j` with value `raw`, or `None` when `raw` (or `j`) is out
    /// of range.
    pub fn row(&self, j: usize, raw: u32) -> Option<u32> {
        let (first, len) = self.block(self.input(j)?);
        ((raw as usize) < len).then_some((first + raw as usize) as u32)
    }

    /// Why `row(j, raw)` has none, in words.
    pub fn refusal(&self, j: usize, raw: u32) -> String {
        match self.input(j) {
            Some(SideInput::Position) => format!("bar position {raw} outside the model's {}", self.positions),
            Some(SideInput::Token { .. }) => {
                format!("lookback or repeat token {raw} outside the vocabulary of {}", self.vocab_len)
            }
            Some(SideInput::BarNumber) => {
                format!("bar number row {raw} outside the model's {}", self.bar_number_rows)
            }
            None => format!("bar input {j} beyond the model's {}", self.inputs_per_step()),
        }
    }
}

/// The kinds of input a `SideLayout` places.
#[derive(Clone, Copy, Debug)]
enum SideInput {
    /// A bar position.
    Position,
    /// A token one, two... bars back, or a repeated token, or none (`slot` counts from 0).
    Token { slot: usize },
    /// The row of a bar number.
    BarNumber,
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
    use crate::config::tests::small_config;
    use crate::config::MAX_BAR_LOOKBACK;
    use crate::lstm::LOOKBACK_TABLE;

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
        let (logits, state) = m.graph_forward(&tokens, None, None, None).unwrap();
        assert_eq!(logits.dims(), &[3, 5, cfg.vocab_len()]);
        assert_eq!(state.h.len(), 2);
        assert_eq!(state.c[1].dims(), &[3, 16]);
        assert_eq!(m.graph_forward_last(&tokens, None).unwrap().dims(), &[3, cfg.vocab_len()]);
    }

    /// A model whose bar table is random rather than zero, so bar positions change its output.
    fn model_with_bars(cfg: &ModelConfig, seed: u64) -> MelodyLstm {
        let mut tensors = MelodyLstm::initial_tensors(cfg, seed, &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for name in [BAR_TABLE, LOOKBACK_TABLE, REPEAT_TABLE, BAR_NUMBER_TABLE] {
            let Some(table) = tensors.get(name) else { continue };
            let shape = table.dims().to_vec();
            let values = (0..shape.iter().product()).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            tensors.insert(name.to_string(), Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
        }
        MelodyLstm::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
    }

    #[test]
    fn the_side_layout_puts_each_input_in_its_own_block() {
        let cfg = ModelConfig {
            bar_meters: vec![music::Meter { numerator: 2, denominator: 4 }],
            bar_lookback: 1,
            repeat_classes: 1,
            bar_numbers: 4,
            ..small_config()
        };
        let (positions, vocab) = (cfg.num_bar_positions(), cfg.vocab_len());
        let layout = SideLayout::for_model(&cfg);
        assert_eq!(layout.inputs_per_step(), 4);
        assert_eq!(layout.row(0, 8), Some(8));
        assert_eq!(layout.row(0, positions as u32), None);
        assert_eq!(layout.row(1, vocab as u32), Some((positions + vocab) as u32));
        assert_eq!(layout.row(2, 0), Some((positions + vocab + 1) as u32));
        assert_eq!(layout.row(3, 5), Some((positions + 2 * (vocab + 1) + 5) as u32));
        assert_eq!(layout.row(3, 6), None);
        assert_eq!(layout.row(4, 0), None);
        assert!(layout.refusal(3, 6).contains("bar number"), "{}", layout.refusal(3, 6));
        assert_eq!([0, 1, 2, 3].map(|j| layout.missing(j)), [0, vocab as u32, vocab as u32, 0]);
        // The last row is the last of the side table.
        let m = model_with_bars(&cfg, 1);
        let rows = m.side_table(&Tensor::clone).unwrap().unwrap().dims()[0];
        assert_eq!(rows, positions + 2 * (vocab + 1) + cfg.num_bar_number_rows());
        assert_eq!(layout.row(3, 5), Some(rows as u32 - 1));
        assert_eq!(SideLayout::for_model(&small_config()).inputs_per_step(), 0);
    }

    #[test]
    fn a_batched_step_matches_each_sequence_stepped_alone() {
        let cfg = ModelConfig { bar_meters: music::bar::COMMON_METERS.to_vec(), ..small_config() };
        let m = model_with_bars(&cfg, 3);
        let weights = m.step_weights().unwrap();
        let sequences: [&[u32]; 3] = [&[1, 2, 3, 4], &[5, 5, 0, 2], &[7, 1, 1, 6]];
        let mut batched_state = m.zero_state(sequences.len()).unwrap();
        let mut alone: Vec<GenState> = sequences.iter().map(|_| GenState::zeros(2, 16)).collect();
        let mut logits = vec![0.0f32; cfg.vocab_len()];
        for t in 0..4 {
            let ids: Vec<u32> = sequences.iter().map(|seq| seq[t]).collect();
            let tokens = Tensor::from_vec(ids.clone(), ids.len(), &Device::Cpu).unwrap();
            let batched =
                m.step_batch(&weights, &tokens, &mut batched_state).unwrap().to_vec2::<f32>().unwrap();
            for (b, state) in alone.iter_mut().enumerate() {
                // No bar inputs: every one reads as missing, as in the batched step.
                m.step(&weights, TokenId(ids[b] as u16), &[], state, &mut logits).unwrap();
                for (x, y) in batched[b].iter().zip(&logits) {
                    assert!((x - y).abs() < 1e-4, "sequence {b}, step {t}: {x} against {y}");
                }
            }
        }
    }

    #[test]
    fn stepping_one_token_at_a_time_matches_the_whole_sequence() {
        let with_bars = ModelConfig { bar_meters: music::bar::COMMON_METERS.to_vec(), ..small_config() };
        let none = small_config().vocab_len() as u32;
        // Bar inputs per step: positions only, or positions with the tokens one, two (and three
        // and four) bars back (and two classes of repeat, and the row of a bar number).
        let cases: [(ModelConfig, Option<Vec<Vec<u32>>>); 6] = [
            (ModelConfig { input: InputKind::Embedding { dim: 8 }, ..small_config() }, None),
            (ModelConfig { input: InputKind::OneHot, ..small_config() }, None),
            (with_bars.clone(), Some([0u32, 17, 18, 19, 20, 212].map(|b| vec![b]).to_vec())),
            (
                ModelConfig { input: InputKind::OneHot, ..with_bars.clone() },
                Some([5u32, 6, 7, 0, 0, 30].map(|b| vec![b]).to_vec()),
            ),
            (
                ModelConfig { bar_lookback: 2, ..with_bars.clone() },
                Some(vec![
                    vec![1, none, none],
                    vec![2, 3, none],
                    vec![3, 0, 7],
                    vec![0, none, none],
                    vec![9, 12, 3],
                    vec![10, none, 0],
                ]),
            ),
            (
                ModelConfig {
                    bar_lookback: MAX_BAR_LOOKBACK,
                    repeat_classes: 2,
                    bar_numbers: 3,
                    ..with_bars
                },
                Some(vec![
                    vec![1, none, none, none, none, none, none, 1],
                    vec![2, 3, none, none, none, 4, none, 2],
                    vec![3, 0, 7, 3, none, none, 9, 2],
                    vec![0, none, none, none, none, none, none, 0],
                    vec![9, 12, 3, 0, 7, 3, none, 4],
                    vec![10, none, 0, none, 12, none, 0, 3],
                ]),
            ),
        ];
        for (cfg, bar_ids) in cases {
            let m = if bar_ids.is_some() { model_with_bars(&cfg, 2) } else { model(&cfg, 2) };
            let ids = [3u32, 0, 7, 7, 12, 15];
            let tokens = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
            let bars = bar_ids.as_ref().map(|b| {
                let flat: Vec<u32> = b.concat();
                Tensor::from_vec(flat, (1, b.len(), b[0].len()), &Device::Cpu).unwrap()
            });
            let (logits, _) = m.graph_forward(&tokens, bars.as_ref(), None, None).unwrap();
            let whole = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            let mut state = GenState::zeros(2, 16);
            let mut step_logits = vec![0.0; cfg.vocab_len()];
            let weights = m.step_weights().unwrap();
            for (t, &id) in ids.iter().enumerate() {
                let bars: Vec<u16> =
                    bar_ids.as_ref().map_or(vec![0], |b| b[t].iter().map(|&x| x as u16).collect());
                m.step(&weights, TokenId(id as u16), &bars, &mut state, &mut step_logits).unwrap();
                for (a, b) in step_logits.iter().zip(&whole[t]) {
                    assert!((a - b).abs() < 1e-5, "step {t}: {a} vs {b}");
                }
            }
            let last = m
                .graph_forward_last(&tokens, bars.as_ref())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(last, whole[ids.len() - 1]);
            let fast = m.graph_forward_last_with(&weights, &tokens, bars.as_ref()).unwrap();
            let fast = fast.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in fast.iter().zip(&last) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            if bars.is_some() {
                // Leaving the bars out reads every step as `NO_BAR_POSITION` with nothing to look
                // back to, which differs.
                let (without, _) = m.graph_forward(&tokens, None, None, None).unwrap();
                let zeros = Tensor::zeros(tokens.dims(), DType::U32, &Device::Cpu).unwrap();
                let (at_zero, _) = m.graph_forward(&tokens, Some(&zeros), None, None).unwrap();
                let diff = (&without - &at_zero).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
                let diff = (&without - &logits).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);
            }
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
