//! The generation step on packed weights: one symbol for one sequence in a few microseconds,
//! computing the same function as `MelodyLstm`'s candle graph (within 1e-5 with float weights,
//! 2e-4 with int8 ones; see the tests).
//! Runs on: the worker thread. `FastLstm::step` neither allocates nor locks; the weights are
//! packed once, when a model with fixed weights is built.
//!
//! A batch-1 step is bound by how fast the weights stream from cache, so the layout serves one
//! pass over them:
//! - The gate rows of each layer are regrouped into blocks of `BLOCK_UNITS` hidden units, each
//!   block holding its units' four gates (i, f, g, o) as `4 · BLOCK_UNITS` rows. A block's
//!   weights are stored column after column (`[input + hidden][4 · BLOCK_UNITS]`), so the
//!   matrix-vector product is a run of contiguous multiply-adds into 64 accumulators. A block's
//!   cell update follows the next block's products, so the two overlap.
//! - Layer 0's input projection is a table: for a one-hot or embedded token, `W_ih x + b_ih +
//!   b_hh` is one precomputed row per token (`E W_ihᵀ` for an embedding).
//! - The output layer is packed the same way, in blocks of 64 symbols, in the layers' format
//!   where its rows allow.
//!
//! Hidden sizes that are not a multiple of `BLOCK_UNITS` are padded with zero rows; the padded
//! units are computed and thrown away.
//!
//! A model whose LSTM rows lie on int8 grids (`int8`, `cargo xtask quantize`) is packed as
//! those integers on x86 CPUs with AVX2: a quarter of the bytes. The integer kernels round each
//! input to 16 bits, so the step is within about 2e-4 of the f32 one. Elsewhere (ARM, x86
//! without AVX2) they are packed as f32: half precision holds every int8-grid weight exactly,
//! but without F16C each weight is widened on its own, slower than reading twice the bytes.

use std::fmt;
use std::ops::BitXor;

use candle_core::{DType, Device, Error, Result, Tensor};

use super::config::{InputKind, MAX_SIDE_INPUTS};
use super::huge_pages::HugePageArray;
use super::int8::{self, Int8Kernel, Int8Part, Limbs};
use super::kernels::{madd, sigmoid, tanh_approx, Isa, Kernel};
use super::lstm::{GenState, MelodyLstm, SideLayout};
use music::TokenId;

/// Hidden units per packed block.
pub const BLOCK_UNITS: usize = 16;
/// Gate rows per packed block (four gates of `BLOCK_UNITS` units); also the symbols per block of
/// the output layer.
const BLOCK_ROWS: usize = 4 * BLOCK_UNITS;
const _: () = assert!(BLOCK_ROWS == int8::BLOCK_ROWS, "int8 parts are blocks of the same rows");
/// Largest hidden size the fast step runs: a layer's previous hidden state is copied to a stack
/// buffer of this many numbers. Larger models use candle.
pub const MAX_FAST_HIDDEN: usize = 1024;

/// How the packed layer matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// As trained: the step computes candle's function within 1e-5.
    F32,
    /// The integers of weights that lie on their rows' int8 grids (`int8`; a model saved by
    /// `cargo xtask quantize`): a quarter of the bytes, and candle's function within 2e-4 (the
    /// kernels' inputs are rounded to 16 bits). Needs an integer kernel (`int8::runs_on`: x86
    /// with AVX2);
    /// `for_model` picks it by itself where both hold.
    I8,
    /// Half-precision layer matrices, for weights that half precision holds exactly (every
    /// int8-grid weight does): half the bytes of f32, the same products, so the same function
    /// as `F32` to the bit. `for_model` picks it on x86 with AVX2 for such weights off the
    /// int8 grids.
    F16,
}

/// A network `FastLstm` can pack: stacked LSTM layers whose first reads a token (one-hot or
/// embedded) plus rows of a side table, under an output layer. The melody and chord networks
/// are both such.
pub trait PackSource {
    /// Where its tensors live; only the CPU is packed.
    fn device(&self) -> &Device;
    /// Width of each layer's state.
    fn hidden_size(&self) -> usize;
    /// Number of stacked layers.
    fn num_layers(&self) -> usize;
    /// Number of tokens (rows of the output layer).
    fn vocab_len(&self) -> usize;
    /// How a token reaches layer 0 (a one-hot token reads column `token` of `weight_ih_l0`).
    fn input(&self) -> InputKind;
    /// Every tensor by its saved name: `lstm.weight_ih_l{k}` and the rest, `head.weight`,
    /// `head.bias`, and `embedding.weight` for embedded tokens.
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
    /// Rows added to layer 0's gates beside the token, `[rows, 4 hidden]`; `None` for none.
    fn side_table(&self) -> Result<Option<Tensor>>;
    /// Which side rows `step_at`'s bar inputs read (empty for a network that names its rows
    /// itself through `step_rows`).
    fn side_layout(&self) -> SideLayout;
}

impl PackSource for MelodyLstm {
    fn device(&self) -> &Device {
        MelodyLstm::device(self)
    }
    fn hidden_size(&self) -> usize {
        MelodyLstm::hidden_size(self)
    }
    fn num_layers(&self) -> usize {
        MelodyLstm::num_layers(self)
    }
    fn vocab_len(&self) -> usize {
        MelodyLstm::vocab_len(self)
    }
    fn input(&self) -> InputKind {
        MelodyLstm::input(self)
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        MelodyLstm::named_tensors(self)
    }
    fn side_table(&self) -> Result<Option<Tensor>> {
        MelodyLstm::side_table(self, &Tensor::clone)
    }
    fn side_layout(&self) -> SideLayout {
        MelodyLstm::side_layout(self)
    }
}

/// Most side rows `step_rows` adds in one step.
pub const MAX_STEP_ROWS: usize = 64;

/// A layer's matrix in one of the `WeightFormat`s, starting on a cache line (so is every
/// column of a block, and every quad of an int8 part).
enum LayerWeights {
    F32(HugePageArray<f32>),
    /// Per block, the input part then the hidden part.
    I8(Vec<Int8Part>),
    /// The `F32` layout, each weight as the bits of a half-precision number.
    F16(HugePageArray<u16>),
}

impl LayerWeights {
    fn num_bytes(&self) -> usize {
        match self {
            LayerWeights::F32(w) => 4 * w.len(),
            LayerWeights::F16(w) => 2 * w.len(),
            LayerWeights::I8(parts) => parts.iter().map(|p| p.weights.len() + 8 * BLOCK_ROWS).sum(),
        }
    }
}

/// One LSTM layer, or the output layer, packed.
struct PackedLayer {
    /// Width of the layer's input in `weights` (0 for layer 0, whose input is the token table,
    /// and for the output layer, which reads only the top layer's new hidden state).
    input_width: usize,
    /// `[num_blocks][input_width + hidden][BLOCK_ROWS]`: block `b`, column `k`, packed row
    /// `q · BLOCK_UNITS + u` is row `q · hidden + b · BLOCK_UNITS + u` of `[W_ih | W_hh]`. For
    /// the output layer, packed row `r` of block `b` is symbol `b · BLOCK_ROWS + r`'s row.
    weights: LayerWeights,
    /// `[num_blocks · BLOCK_ROWS]`: `b_ih + b_hh` in packed row order (all zero for layer 0,
    /// whose biases live in the token table); the output layer's biases.
    bias: Vec<f32>,
}

impl PackedLayer {
    /// `acc += W [input; hidden]` over block `b`'s rows. With int8 weights, `kernel` is the
    /// integer kernel and the limbs are `input` and `hidden` split for it.
    #[inline(always)]
    fn accumulate_block<const FMA: bool>(
        &self,
        isa: Isa,
        kernel: Option<Int8Kernel>,
        b: usize,
        acc: &mut [f32; BLOCK_ROWS],
        (input, input_limbs): (&[f32], &[Limbs]),
        (hidden, hidden_limbs): (&[f32], &[Limbs]),
    ) {
        let cols = self.input_width + hidden.len();
        let block_range = b * cols * BLOCK_ROWS..(b + 1) * cols * BLOCK_ROWS;
        let split = self.input_width * BLOCK_ROWS;
        match &self.weights {
            LayerWeights::F32(w) => {
                let (w_input, w_hidden) = w[block_range].split_at(split);
                accumulate::<FMA>(acc, w_input, input);
                accumulate::<FMA>(acc, w_hidden, hidden);
            }
            LayerWeights::F16(w) => {
                let (w_input, w_hidden) = w[block_range].split_at(split);
                accumulate_f16(isa, acc, w_input, input);
                accumulate_f16(isa, acc, w_hidden, hidden);
            }
            LayerWeights::I8(parts) => {
                #[cfg(target_arch = "x86_64")]
                if let Some(kernel) = kernel {
                    // SAFETY: int8 weights are stepped only from `Isa::run` given
                    // `FastLstm::int8`, which `pack_as` (`Int8Kernel::best_for`) or
                    // `with_int8_kernel` saw runs here; the limbs, split for it, cover each
                    // part's quads.
                    unsafe {
                        if self.input_width > 0 {
                            int8::accumulate_with(kernel, acc, &parts[2 * b], input_limbs);
                        }
                        int8::accumulate_with(kernel, acc, &parts[2 * b + 1], hidden_limbs);
                    }
                }
                // No integer kernel exists off x86, so no int8 layers are packed there.
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (parts, input_limbs, hidden_limbs);
                debug_assert!(kernel.is_some(), "int8 weights run only with an integer kernel");
            }
        }
    }
}

/// A `MelodyLstm` with its weights packed for one-sequence stepping on the CPU.
pub struct FastLstm {
    isa: Isa,
    format: WeightFormat,
    /// The integer kernel of `WeightFormat::I8` layers (`None` for the other formats).
    int8: Option<Int8Kernel>,
    hidden_size: usize,
    vocab_len: usize,
    num_blocks: usize,
    /// `[vocab][num_blocks · BLOCK_ROWS]`: layer 0's `W_ih x + b_ih + b_hh` per token, packed.
    token_gates: HugePageArray<f32>,
    /// `[side rows][num_blocks · BLOCK_ROWS]`: layer 0's input per row of the side table
    /// (`MelodyLstm::side_table`: bar positions, lookback and repeat tokens, bar numbers),
    /// packed; empty for a model without bar inputs.
    side_gates: HugePageArray<f32>,
    /// Which rows of `side_gates` each bar input reads.
    side_layout: SideLayout,
    layers: Vec<PackedLayer>,
    /// The output layer, in the layers' format where its rows allow (else f32): symbol `v` in
    /// block `v / BLOCK_ROWS`.
    head: PackedLayer,
}

impl fmt::Debug for FastLstm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastLstm")
            .field("isa", &self.isa)
            .field("format", &self.format)
            .field("hidden_size", &self.hidden_size)
            .field("num_layers", &self.layers.len())
            .field("vocab_len", &self.vocab_len)
            .field("weight_bytes_per_step", &self.weight_bytes_per_step())
            .finish()
    }
}

/// Packs the rows of `[left | right]` (`left` and `right` row-major with the given widths) in
/// `format`, as `num_blocks` blocks of `BLOCK_ROWS` rows: packed row `p` is row `source_row(p)`,
/// or zeros for `None` (padding). Says what is wrong when `format` cannot hold the weights.
fn pack_blocks(
    format: WeightFormat,
    num_blocks: usize,
    (left, left_width): (&[f32], usize),
    (right, right_width): (&[f32], usize),
    source_row: &dyn Fn(usize) -> Option<usize>,
) -> std::result::Result<LayerWeights, String> {
    if format == WeightFormat::I8 {
        let mut parts = Vec::with_capacity(2 * num_blocks);
        for b in 0..num_blocks {
            for (matrix, width) in [(left, left_width), (right, right_width)] {
                // The block's rows of the matrix (`None` for padding rows).
                let rows: Vec<Option<&[f32]>> = (0..BLOCK_ROWS)
                    .map(|r| {
                        let row = (width > 0).then(|| source_row(b * BLOCK_ROWS + r)).flatten();
                        row.map(|row| &matrix[row * width..][..width])
                    })
                    .collect();
                parts.push(Int8Part::pack(&rows, width).ok_or("off their int8 grid")?);
            }
        }
        return Ok(LayerWeights::I8(parts));
    }
    let cols = left_width + right_width;
    let mut weights = vec![0.0f32; num_blocks * cols * BLOCK_ROWS];
    for p in 0..num_blocks * BLOCK_ROWS {
        let Some(row) = source_row(p) else { continue };
        let (b, r) = (p / BLOCK_ROWS, p % BLOCK_ROWS);
        let block = &mut weights[b * cols * BLOCK_ROWS..][..cols * BLOCK_ROWS];
        let row_values =
            left[row * left_width..][..left_width].iter().chain(&right[row * right_width..][..right_width]);
        for (col, &w) in row_values.enumerate() {
            block[col * BLOCK_ROWS + r] = w;
        }
    }
    match format {
        WeightFormat::F16 => weights
            .iter()
            .map(|&w| {
                let half = half::f16::from_f32(w);
                (half.to_f32() == w).then_some(half.to_bits())
            })
            .collect::<Option<Vec<u16>>>()
            .map(|halves| LayerWeights::F16(halves.into()))
            .ok_or_else(|| "half precision cannot hold".to_string()),
        _ => Ok(LayerWeights::F32(weights.into())),
    }
}

/// A tensor's values as `f32`, row-major.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl FastLstm {
    /// Packs `lstm`'s current weights when it lives on the CPU and its hidden size is at most
    /// `MAX_FAST_HIDDEN` (`None` otherwise). A copy: pack again after the weights change.
    pub fn for_model(lstm: &impl PackSource) -> Result<Option<Self>> {
        if !lstm.device().is_cpu() || lstm.hidden_size() > MAX_FAST_HIDDEN {
            return Ok(None);
        }
        let isa = Isa::detect();
        if int8::runs_on(isa) {
            if let Ok(fast) = Self::pack_as(lstm, isa, WeightFormat::I8) {
                return Ok(Some(fast));
            }
        }
        // Half precision only where F16C widens it in registers: elsewhere (`Portable`: ARM,
        // x86 without AVX2) each weight is widened alone, several times slower than f32 read
        // as it is (on Apple silicon one `fcvt` and a store per weight, against `fmla` on
        // four NEON lanes).
        if isa != Isa::Portable {
            if let Ok(fast) = Self::pack_as(lstm, isa, WeightFormat::F16) {
                return Ok(Some(fast));
            }
        }
        Self::pack(lstm, isa).map(Some)
    }

    /// Packs `lstm`'s current weights as f32 for kernels of `isa` (which the CPU must run; see
    /// `Isa::detect`). Works for any hidden size up to `MAX_FAST_HIDDEN`.
    pub fn pack(lstm: &impl PackSource, isa: Isa) -> Result<Self> {
        Self::pack_as(lstm, isa, WeightFormat::F32)
    }

    /// Packs `lstm`'s current weights in `format` for kernels of `isa`. `WeightFormat::I8` errors
    /// unless an integer kernel runs beside `isa` (`int8::runs_on`; the step uses the best,
    /// `Int8Kernel::best_for`) and every row of the layers' matrices (but layer 0's input
    /// matrix, which becomes the token table) lies on its int8 grid; `WeightFormat::F16` unless
    /// half precision holds each of those weights exactly.
    pub fn pack_as(lstm: &impl PackSource, isa: Isa, format: WeightFormat) -> Result<Self> {
        let int8 = match format {
            WeightFormat::I8 => Some(Int8Kernel::best_for(isa).ok_or_else(|| {
                Error::Msg(format!("fast step: int8 weights need AVX2, which {} lacks here", isa.name()))
            })?),
            WeightFormat::F32 | WeightFormat::F16 => None,
        };
        let hidden = lstm.hidden_size();
        let vocab_len = lstm.vocab_len();
        if hidden == 0 || hidden > MAX_FAST_HIDDEN {
            return Err(Error::Msg(format!("fast step: hidden size {hidden} outside 1..={MAX_FAST_HIDDEN}")));
        }
        let num_blocks = hidden.div_ceil(BLOCK_UNITS);
        let packed_rows = num_blocks * BLOCK_ROWS;
        // Packed row → original gate row (None for padding).
        let source_row = |packed: usize| {
            let (b, r) = (packed / BLOCK_ROWS, packed % BLOCK_ROWS);
            let (q, u) = (r / BLOCK_UNITS, r % BLOCK_UNITS);
            let unit = b * BLOCK_UNITS + u;
            (unit < hidden).then_some(q * hidden + unit)
        };
        let get = |name: &str| -> Result<Vec<f32>> {
            let (_, t) = lstm
                .named_tensors()
                .into_iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Msg(format!("fast step: no tensor '{name}'")))?;
            values(&t)
        };

        let mut layers = Vec::with_capacity(lstm.num_layers());
        let mut token_gates = vec![0.0f32; vocab_len * packed_rows];
        for k in 0..lstm.num_layers() {
            let w_ih = get(&format!("lstm.weight_ih_l{k}"))?;
            let w_hh = get(&format!("lstm.weight_hh_l{k}"))?;
            let b_ih = get(&format!("lstm.bias_ih_l{k}"))?;
            let b_hh = get(&format!("lstm.bias_hh_l{k}"))?;
            let in_width = w_ih.len() / (4 * hidden);
            let bias = |row: usize| b_ih[row] + b_hh[row];
            let input_width = if k == 0 { 0 } else { in_width };
            let mut packed_bias = vec![0.0f32; packed_rows];
            if k > 0 {
                for (p, packed_bias) in packed_bias.iter_mut().enumerate() {
                    if let Some(row) = source_row(p) {
                        *packed_bias = bias(row);
                    }
                }
            }
            if k == 0 {
                // The token table: a one-hot token picks a column of W_ih; an embedded one is
                // its table row times W_ihᵀ (summed in f64, so only the final rounding differs
                // from an exact product).
                let embedding = match lstm.input() {
                    InputKind::Embedding { .. } => Some(get("embedding.weight")?),
                    InputKind::OneHot => None,
                };
                for v in 0..vocab_len {
                    let row_out = &mut token_gates[v * packed_rows..][..packed_rows];
                    for (p, out) in row_out.iter_mut().enumerate() {
                        let Some(row) = source_row(p) else { continue };
                        let w_row = &w_ih[row * in_width..][..in_width];
                        let x_part = match &embedding {
                            Some(table) => {
                                let e_row = &table[v * in_width..][..in_width];
                                w_row.iter().zip(e_row).map(|(&w, &e)| w as f64 * e as f64).sum::<f64>()
                            }
                            None => w_row[v] as f64,
                        };
                        *out = (x_part + b_ih[row] as f64 + b_hh[row] as f64) as f32;
                    }
                }
            }
            let weights = pack_blocks(format, num_blocks, (&w_ih, input_width), (&w_hh, hidden), &source_row)
                .map_err(|problem| Error::Msg(format!("fast step: layer {k} has weights {problem}")))?;
            layers.push(PackedLayer { input_width, weights, bias: packed_bias });
        }

        let mut side_gates = Vec::new();
        if let Some(table) = lstm.side_table()? {
            let (num_rows, _) = table.dims2()?;
            let table = values(&table)?;
            side_gates = vec![0.0f32; num_rows * packed_rows];
            for (side_row, out) in side_gates.chunks_exact_mut(packed_rows).enumerate() {
                for (p, out) in out.iter_mut().enumerate() {
                    if let Some(row) = source_row(p) {
                        *out = table[side_row * 4 * hidden + row];
                    }
                }
            }
        }
        let side_layout = lstm.side_layout();

        // The output layer in the layers' format where its rows allow it (a model quantised with
        // `--every-matrix` has them on int8 grids), else as f32.
        let head_w = get("head.weight")?;
        let vocab_blocks = vocab_len.div_ceil(BLOCK_ROWS);
        let symbol_row = |p: usize| (p < vocab_len).then_some(p);
        let head_weights = pack_blocks(format, vocab_blocks, (&[], 0), (&head_w, hidden), &symbol_row)
            .or_else(|_| {
                pack_blocks(WeightFormat::F32, vocab_blocks, (&[], 0), (&head_w, hidden), &symbol_row)
            })
            .map_err(Error::Msg)?;
        let mut head_b = get("head.bias")?;
        head_b.resize(vocab_blocks * BLOCK_ROWS, 0.0);
        let head = PackedLayer { input_width: 0, weights: head_weights, bias: head_b };
        Ok(Self {
            isa,
            format,
            int8,
            hidden_size: hidden,
            vocab_len,
            num_blocks,
            token_gates: token_gates.into(),
            side_gates: side_gates.into(),
            side_layout,
            layers,
            head,
        })
    }

    /// An all-zero state for this model.
    pub fn new_state(&self) -> GenState {
        GenState::zeros(self.layers.len(), self.hidden_size)
    }

    /// The instruction set its kernels run with.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// How its layer matrices are stored.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// The integer kernel its `WeightFormat::I8` layers run with.
    pub fn int8_kernel(&self) -> Option<Int8Kernel> {
        self.int8
    }

    /// The same packing run with another integer kernel (to time or test one the CPU would not
    /// pick); errors for a packing without int8 layers, or a kernel this CPU cannot run.
    pub fn with_int8_kernel(mut self, kernel: Int8Kernel) -> Result<Self> {
        if self.int8.is_none() || !kernel.runs_here() {
            return Err(Error::Msg(format!("fast step: cannot run {} here on these weights", kernel.name())));
        }
        self.int8 = Some(kernel);
        Ok(self)
    }

    /// Bytes of weights one step reads: every layer, one row of the token table, the output
    /// layer.
    pub fn weight_bytes_per_step(&self) -> usize {
        let layers: usize =
            self.layers.iter().chain([&self.head]).map(|l| l.weights.num_bytes() + 4 * l.bias.len()).sum();
        layers + 4 * self.num_blocks * BLOCK_ROWS
    }

    /// Reads every weight a step reads, once, and returns their sum: timing this gives the
    /// floor a step's time is measured against (it does no other work).
    pub fn read_weights_once(&self, token: TokenId) -> f32 {
        let row = (token.0 as usize).min(self.vocab_len - 1) * self.num_blocks * BLOCK_ROWS;
        let table_row = &self.token_gates[row..][..self.num_blocks * BLOCK_ROWS];
        let mut total = 0.0;
        let mut parts: Vec<&[f32]> = vec![table_row];
        for layer in self.layers.iter().chain([&self.head]) {
            parts.push(&layer.bias);
            match &layer.weights {
                LayerWeights::F32(w) => parts.push(w),
                LayerWeights::F16(w) => total += self.isa.run(None, XorFold(w)) as f32,
                LayerWeights::I8(parts) => {
                    for part in parts {
                        total += self.isa.run(None, XorFold(&part.weights)) as f32
                            + self.isa.run(None, XorFold(&part.sums)) as f32
                            + part.scales.iter().sum::<f32>();
                    }
                }
            }
        }
        for part in parts {
            total += self.isa.run(None, Sum(part));
        }
        total
    }

    /// Feeds `token` with its bar inputs (`bars`: the bar position, then the tokens one, two...
    /// bars back; missing ones read as none, and a model without bar inputs ignores them) to
    /// one sequence: updates `state` (per layer `[hidden]`) and writes the next symbol's logits
    /// into `logits` (`[vocab]`). Errors (a token or bar input outside the model's, a state or
    /// buffer of the wrong size) leave `state` untouched.
    pub fn step_at(
        &self,
        token: TokenId,
        bars: &[u16],
        state: &mut GenState,
        logits: &mut [f32],
    ) -> Result<()> {
        let token = token.0 as usize;
        self.check_step(token, state, logits)?;
        let packed_rows = self.num_blocks * BLOCK_ROWS;
        // The bar inputs' rows, added to layer 0's gates.
        let mut side_rows: [&[f32]; MAX_SIDE_INPUTS] = [&[]; MAX_SIDE_INPUTS];
        let inputs_per_step = self.side_layout.inputs_per_step();
        for (j, side) in side_rows.iter_mut().enumerate().take(inputs_per_step) {
            let raw = bars.get(j).map_or(self.side_layout.missing(j), |&raw| raw as u32);
            let row = self
                .side_layout
                .row(j, raw)
                .ok_or_else(|| Error::Msg(format!("fast step: {}", self.side_layout.refusal(j, raw))))?
                as usize;
            *side = &self.side_gates[row * packed_rows..][..packed_rows];
        }
        self.run_step(token, &side_rows[..inputs_per_step], state, logits);
        Ok(())
    }

    /// `step_at` for a network that names its side rows itself (the chord model): `rows` index
    /// the side table (`PackSource::side_table`), at most `MAX_STEP_ROWS` of them. Errors leave
    /// `state` untouched.
    pub fn step_rows(
        &self,
        token: TokenId,
        rows: &[u32],
        state: &mut GenState,
        logits: &mut [f32],
    ) -> Result<()> {
        let token = token.0 as usize;
        self.check_step(token, state, logits)?;
        let packed_rows = self.num_blocks * BLOCK_ROWS;
        let num_rows = self.side_gates.len() / packed_rows.max(1);
        if rows.len() > MAX_STEP_ROWS || rows.iter().any(|&r| r as usize >= num_rows) {
            return Err(Error::Msg(format!("fast step: side rows {rows:?} outside the model's {num_rows}")));
        }
        let mut side_rows: [&[f32]; MAX_STEP_ROWS] = [&[]; MAX_STEP_ROWS];
        for (slot, &row) in side_rows.iter_mut().zip(rows) {
            *slot = &self.side_gates[row as usize * packed_rows..][..packed_rows];
        }
        self.run_step(token, &side_rows[..rows.len()], state, logits);
        Ok(())
    }

    /// Refuses a token outside the vocabulary, a state of another shape or a logits buffer of
    /// another length.
    fn check_step(&self, token: usize, state: &GenState, logits: &[f32]) -> Result<()> {
        let hidden = self.hidden_size;
        let is_shaped = state.h.len() == self.layers.len()
            && state.c.len() == self.layers.len()
            && state.h.iter().chain(&state.c).all(|v| v.len() == hidden);
        if token >= self.vocab_len || !is_shaped || logits.len() != self.vocab_len {
            return Err(Error::Msg(format!(
                "fast step: token {token} of {}, {} layers of {hidden} in the state, {} logits",
                self.vocab_len,
                state.h.len(),
                logits.len()
            )));
        }
        Ok(())
    }

    /// The step with the kernels of this CPU; shapes were checked.
    fn run_step(&self, token: usize, bar_rows: &[&[f32]], state: &mut GenState, logits: &mut [f32]) {
        self.isa.run(self.int8, Step { lstm: self, token, bar_rows, state, logits });
    }

    /// The step itself; shapes were checked by `step`.
    #[inline(always)]
    fn step_body<const FMA: bool, const INT8: bool>(
        &self,
        token: usize,
        bar_rows: &[&[f32]],
        state: &mut GenState,
        logits: &mut [f32],
    ) {
        let hidden = self.hidden_size;
        let packed_rows = self.num_blocks * BLOCK_ROWS;
        // The layer's previous hidden state: the blocks read all of it while the new one is
        // written over it.
        let mut h_prev_buf = [0.0f32; MAX_FAST_HIDDEN];
        let h_prev = &mut h_prev_buf[..hidden];
        // The integer kernel, only in the instance `Isa::run` compiled for its instructions.
        let int8_kernel = if INT8 { self.int8 } else { None };
        // With int8 weights, the input and the previous state in the kernel's fixed point.
        let mut input_limbs_buf = [[0u32; 2]; MAX_FAST_HIDDEN / 4];
        let mut h_limbs_buf = [[0u32; 2]; MAX_FAST_HIDDEN / 4];
        for (k, layer) in self.layers.iter().enumerate() {
            h_prev.copy_from_slice(&state.h[k]);
            let (below, this_and_above) = state.h.split_at_mut(k);
            let input: &[f32] = match below.last() {
                Some(h_below) => h_below,
                None => &[],
            };
            let input_limbs: &mut [Limbs] = &mut input_limbs_buf[..int8::num_quads(input.len())];
            let h_limbs: &mut [Limbs] = &mut h_limbs_buf[..int8::num_quads(hidden)];
            if let Some(kernel) = int8_kernel {
                int8::split_for(kernel, input, input_limbs);
                int8::split_for(kernel, h_prev, h_limbs);
            }
            let h_out = &mut this_and_above[0];
            let c = &mut state.c[k];
            let start: &[f32] =
                if k == 0 { &self.token_gates[token * packed_rows..][..packed_rows] } else { &layer.bias };
            // Each block's cell update runs after the next block's products are issued: it
            // depends only on sums finished before them, so the CPU overlaps its chains of
            // multiplies and divisions with their loads. (Right after its own products it
            // waited for their last sums; in groups of four blocks after theirs, the int8 step
            // took as long and the f32 step 0.6 µs longer.)
            let mut pending: Option<(usize, [f32; BLOCK_ROWS])> = None;
            for b in 0..self.num_blocks {
                let mut acc = [0.0f32; BLOCK_ROWS];
                acc.copy_from_slice(&start[b * BLOCK_ROWS..][..BLOCK_ROWS]);
                if k == 0 {
                    for side in bar_rows {
                        for (a, &x) in acc.iter_mut().zip(&side[b * BLOCK_ROWS..][..BLOCK_ROWS]) {
                            *a += x;
                        }
                    }
                }
                layer.accumulate_block::<FMA>(
                    self.isa,
                    int8_kernel,
                    b,
                    &mut acc,
                    (input, input_limbs),
                    (h_prev, h_limbs),
                );
                if let Some((done, gates)) = pending.replace((b, acc)) {
                    cell_update(&gates, done, c, h_out);
                }
            }
            if let Some((done, gates)) = pending {
                cell_update(&gates, done, c, h_out);
            }
        }
        let top = &state.h[self.layers.len() - 1];
        let top_limbs: &mut [Limbs] = &mut h_limbs_buf[..int8::num_quads(hidden)];
        let head_kernel = if matches!(self.head.weights, LayerWeights::I8(_)) { int8_kernel } else { None };
        if let Some(kernel) = head_kernel {
            int8::split_for(kernel, top, top_limbs);
        }
        for (b, out) in logits.chunks_mut(BLOCK_ROWS).enumerate() {
            let mut acc = [0.0f32; BLOCK_ROWS];
            acc.copy_from_slice(&self.head.bias[b * BLOCK_ROWS..][..BLOCK_ROWS]);
            self.head.accumulate_block::<FMA>(
                self.isa,
                head_kernel,
                b,
                &mut acc,
                (&[], &[]),
                (top, top_limbs),
            );
            out.copy_from_slice(&acc[..out.len()]);
        }
    }
}

/// `acc += W x` for one packed block: `w` is `[x.len()][BLOCK_ROWS]`.
#[inline(always)]
fn accumulate<const FMA: bool>(acc: &mut [f32; BLOCK_ROWS], w: &[f32], x: &[f32]) {
    for (column, &xk) in w.chunks_exact(BLOCK_ROWS).zip(x) {
        for (a, &wk) in acc.iter_mut().zip(column) {
            *a = madd::<FMA>(wk, xk, *a);
        }
    }
}

/// `acc += W x` for one packed block of half-precision weights (`w`: `[x.len()][BLOCK_ROWS]`
/// as bits), with the same products and sums in the same order as `accumulate`, so an exact
/// weight gives the same bits. `isa` is the one the model was packed for (the CPU runs it).
#[inline(always)]
fn accumulate_f16(isa: Isa, acc: &mut [f32; BLOCK_ROWS], w: &[u16], x: &[f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only detected where the CPU has AVX-512F and F16C.
        Isa::Avx512 => unsafe { f16_x86::accumulate_avx512(acc, w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only detected where the CPU has AVX2, FMA and F16C.
        Isa::Avx2Fma => unsafe { f16_x86::accumulate_avx2(acc, w, x) },
        _ => {
            for (column, &xk) in w.chunks_exact(BLOCK_ROWS).zip(x) {
                for (a, &wk) in acc.iter_mut().zip(column) {
                    *a = madd::<false>(half::f16::from_bits(wk).to_f32(), xk, *a);
                }
            }
        }
    }
}

/// The half-precision block product with x86 vector instructions: each column's weights are
/// widened to f32 (`vcvtph2ps`) and multiplied into the accumulators with one fused
/// multiply-add each, as `accumulate::<true>` does with f32 weights.
#[cfg(target_arch = "x86_64")]
mod f16_x86 {
    use std::arch::x86_64::*;

    use super::BLOCK_ROWS;

    /// AVX-512: four registers of 16 accumulators.
    #[target_feature(enable = "avx512f,f16c,fma")]
    pub unsafe fn accumulate_avx512(acc: &mut [f32; BLOCK_ROWS], w: &[u16], x: &[f32]) {
        let mut sums = [_mm512_setzero_ps(); BLOCK_ROWS / 16];
        for (i, sum) in sums.iter_mut().enumerate() {
            // SAFETY: `acc` holds BLOCK_ROWS floats; lane group `i` reads 16 of them.
            *sum = unsafe { _mm512_loadu_ps(acc.as_ptr().add(16 * i)) };
        }
        for (column, &xk) in w.chunks_exact(BLOCK_ROWS).zip(x) {
            let xv = _mm512_set1_ps(xk);
            for (i, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `column` holds BLOCK_ROWS halves; lane group `i` reads 16 of them.
                let halves = unsafe { _mm256_loadu_si256(column.as_ptr().add(16 * i).cast()) };
                *sum = _mm512_fmadd_ps(_mm512_cvtph_ps(halves), xv, *sum);
            }
        }
        for (i, sum) in sums.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(16 * i), *sum) };
        }
    }

    /// AVX2: eight registers of 8 accumulators.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn accumulate_avx2(acc: &mut [f32; BLOCK_ROWS], w: &[u16], x: &[f32]) {
        let mut sums = [_mm256_setzero_ps(); BLOCK_ROWS / 8];
        for (i, sum) in sums.iter_mut().enumerate() {
            // SAFETY: `acc` holds BLOCK_ROWS floats; lane group `i` reads 8 of them.
            *sum = unsafe { _mm256_loadu_ps(acc.as_ptr().add(8 * i)) };
        }
        for (column, &xk) in w.chunks_exact(BLOCK_ROWS).zip(x) {
            let xv = _mm256_set1_ps(xk);
            for (i, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `column` holds BLOCK_ROWS halves; lane group `i` reads 8 of them.
                let halves = unsafe { _mm_loadu_si128(column.as_ptr().add(8 * i).cast()) };
                *sum = _mm256_fmadd_ps(_mm256_cvtph_ps(halves), xv, *sum);
            }
        }
        for (i, sum) in sums.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(8 * i), *sum) };
        }
    }
}

/// The LSTM cell of block `b`: `gates` holds the pre-activations `[i, f, g, o]` of its units
/// (its packed rows); its real units of the layer's `c` and `h` are updated (fewer than
/// `BLOCK_UNITS` in the last block when the hidden size is not a multiple of it).
// (A function rather than a closure in the step: a closure doing this took the step from 14
// to 17 µs.)
#[inline(always)]
fn cell_update(gates: &[f32; BLOCK_ROWS], b: usize, c: &mut [f32], h: &mut [f32]) {
    let units = b * BLOCK_UNITS..((b + 1) * BLOCK_UNITS).min(c.len());
    let (c, h) = (&mut c[units.clone()], &mut h[units]);
    // A whole block updates the state in place, in registers; a call to copy a slice of
    // unknown length in and out took about 2 % of a step.
    let (whole_c, whole_h) =
        (<&mut [f32; BLOCK_UNITS]>::try_from(&mut *c), <&mut [f32; BLOCK_UNITS]>::try_from(&mut *h));
    if let (Ok(c), Ok(h)) = (whole_c, whole_h) {
        return cell_update_units(gates, c, h);
    }
    let n = c.len();
    let mut c_buf = [0.0f32; BLOCK_UNITS];
    let mut h_buf = [0.0f32; BLOCK_UNITS];
    c_buf[..n].copy_from_slice(c);
    cell_update_units(gates, &mut c_buf, &mut h_buf);
    c.copy_from_slice(&c_buf[..n]);
    h.copy_from_slice(&h_buf[..n]);
}

/// `cell_update` over all `BLOCK_UNITS` units (padding units compute and are dropped).
#[inline(always)]
fn cell_update_units(gates: &[f32; BLOCK_ROWS], c: &mut [f32; BLOCK_UNITS], h: &mut [f32; BLOCK_UNITS]) {
    let (gate_i, rest) = gates.split_at(BLOCK_UNITS);
    let (gate_f, rest) = rest.split_at(BLOCK_UNITS);
    let (gate_g, gate_o) = rest.split_at(BLOCK_UNITS);
    for u in 0..BLOCK_UNITS {
        let i = sigmoid(gate_i[u]);
        let f = sigmoid(gate_f[u]);
        let g = tanh_approx(gate_g[u]);
        let o = sigmoid(gate_o[u]);
        let c_new = f * c[u] + i * g;
        c[u] = c_new;
        h[u] = o * tanh_approx(c_new);
    }
}

/// One step of `FastLstm` as a `Kernel`.
struct Step<'a> {
    lstm: &'a FastLstm,
    token: usize,
    bar_rows: &'a [&'a [f32]],
    state: &'a mut GenState,
    logits: &'a mut [f32],
}

impl Kernel for Step<'_> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool, const INT8: bool>(self) {
        self.lstm.step_body::<FMA, INT8>(self.token, self.bar_rows, self.state, self.logits)
    }
}

/// All of the slice folded with exclusive-or, in the vector width of the `Isa` it runs with:
/// reads the bytes a kernel over packed integers reads, at the speed memory delivers them.
struct XorFold<'a, T>(&'a [T]);

impl<T: Copy + Default + BitXor<Output = T>> Kernel for XorFold<'_, T> {
    type Output = T;
    #[inline(always)]
    fn run<const FMA: bool, const INT8: bool>(self) -> T {
        let mut acc = [T::default(); 2 * BLOCK_ROWS];
        let mut chunks = self.0.chunks_exact(acc.len());
        for chunk in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(chunk) {
                *a = *a ^ x;
            }
        }
        acc.iter().chain(chunks.remainder()).fold(T::default(), |s, &a| s ^ a)
    }
}

/// Sum of the slice with many accumulators, so it runs at the speed memory delivers.
struct Sum<'a>(&'a [f32]);

impl Kernel for Sum<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<const FMA: bool, const INT8: bool>(self) -> f32 {
        let mut acc = [0.0f32; BLOCK_ROWS];
        let mut chunks = self.0.chunks_exact(BLOCK_ROWS);
        for chunk in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(chunk) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_nn::VarBuilder;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::config::ModelConfig;
    use music::Vocab;

    /// A model of `cfg` with weights uniform in `±scale` (biases too) from `seed`.
    fn random_lstm(cfg: &ModelConfig, seed: u64, scale: f32) -> MelodyLstm {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors: HashMap<String, Tensor> = MelodyLstm::tensor_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
                (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
            })
            .collect();
        MelodyLstm::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
    }

    /// The candle graph's logits and state after each of `tokens`, from a zero state.
    fn candle_steps(lstm: &MelodyLstm, tokens: &[u32]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let seq = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
        let (logits, state) = lstm.graph_forward(&seq, None, None, None).unwrap();
        let top_c = state.c.last().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), vec![top_c])
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Steps `fast` through `tokens` from a zero state: every step's logits, and the final top
    /// cell state (relative where it passes 1), within 1e-5 of candle's (`candle_steps`), or
    /// `INT8_TOLERANCE` with int8 weights.
    fn assert_steps_match(
        fast: &FastLstm,
        tokens: &[u32],
        (want, want_c): (&[Vec<f32>], &[Vec<f32>]),
        what: &str,
    ) -> Vec<f32> {
        let tolerance = if fast.int8.is_some() { INT8_TOLERANCE } else { 1e-5 };
        let mut state = fast.new_state();
        let mut logits = vec![0.0; fast.vocab_len];
        for (t, &token) in tokens.iter().enumerate() {
            fast.step_at(TokenId(token as u16), &[], &mut state, &mut logits).unwrap();
            let d = max_diff(&logits, &want[t]);
            assert!(d < tolerance, "{what} step {t}: off by {d}");
        }
        // A cell state grows past 1 over a long passage (f32's spacing at 16 is 2e-6): it is
        // compared relative to its size there.
        let relative = state.c.last().unwrap().iter().zip(&want_c[0]);
        let d = relative.map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max);
        assert!(d < tolerance, "{what} final cell state off by {d} (relative past 1)");
        logits
    }

    /// Every instruction set this CPU runs, each packing of every size class, against candle.
    #[test]
    fn matches_candle_within_1e_5() {
        let vocab = Vocab::for_pitch_range(48, 88);
        let shapes = [
            (InputKind::Embedding { dim: 12 }, 32, 2),
            (InputKind::OneHot, 48, 1),
            // Not a multiple of the block: the padded units must not leak.
            (InputKind::Embedding { dim: 5 }, 23, 3),
            (InputKind::OneHot, 7, 2),
        ];
        let mut isas = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            isas.push(Isa::Avx2Fma);
        }
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        for (seed, &(input, hidden, layers)) in shapes.iter().enumerate() {
            let cfg = ModelConfig::new(vocab.clone(), input, hidden, layers, 0.0);
            let lstm = random_lstm(&cfg, seed as u64, 0.6);
            let mut rng = ChaCha8Rng::seed_from_u64(100 + seed as u64);
            let tokens: Vec<u32> = (0..40).map(|_| rng.random_range(0..vocab.len() as u32)).collect();
            let (want, want_c) = candle_steps(&lstm, &tokens);
            for &isa in &isas {
                let fast = FastLstm::pack(&lstm, isa).unwrap();
                assert_steps_match(
                    &fast,
                    &tokens,
                    (&want, &want_c),
                    &format!("{isa:?} {input:?} {hidden}x{layers}"),
                );
            }
        }
    }

    /// Int8-grid weights packed in half precision give the f32 packing's logits and state to
    /// the bit, on every instruction set this CPU runs, padded blocks included; weights half
    /// precision cannot hold are refused that format (and `for_model` then packs f32).
    #[test]
    fn half_precision_weights_give_the_f32_bits_for_int8_grid_weights() {
        let vocab = Vocab::for_pitch_range(48, 88);
        let mut isas = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            isas.push(Isa::Avx2Fma);
        }
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        for (seed, (input, hidden, layers)) in
            [(InputKind::Embedding { dim: 64 }, 256, 2), (InputKind::Embedding { dim: 5 }, 23, 3)]
                .into_iter()
                .enumerate()
        {
            let cfg = ModelConfig::new(vocab.clone(), input, hidden, layers, 0.0);
            let off_grid = random_lstm(&cfg, seed as u64, 2.0 / (hidden as f32).sqrt());
            let refused = FastLstm::pack_as(&off_grid, Isa::Portable, WeightFormat::F16).unwrap_err();
            assert!(refused.to_string().contains("half precision cannot hold"), "{refused}");
            let (lstm, _) = int8::quantize_model(&off_grid, &cfg, int8::GridScope::StepMatrices).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let tokens: Vec<u32> = (0..48).map(|_| rng.random_range(0..vocab.len() as u32)).collect();
            for &isa in &isas {
                let half = FastLstm::pack_as(&lstm, isa, WeightFormat::F16).unwrap();
                let full = FastLstm::pack(&lstm, isa).unwrap();
                assert_eq!(2 * half.layers[0].weights.num_bytes(), full.layers[0].weights.num_bytes());
                let (mut half_state, mut full_state) = (half.new_state(), full.new_state());
                let (mut half_logits, mut full_logits) = (vec![0.0; vocab.len()], vec![0.0; vocab.len()]);
                for &token in &tokens {
                    half.step_at(TokenId(token as u16), &[], &mut half_state, &mut half_logits).unwrap();
                    full.step_at(TokenId(token as u16), &[], &mut full_state, &mut full_logits).unwrap();
                    assert_eq!(half_logits, full_logits, "{isa:?} {hidden}x{layers}");
                }
                assert_eq!(half_state.c, full_state.c);
            }
            let picked = FastLstm::for_model(&lstm).unwrap().unwrap().format();
            // The integer kernels on x86 with AVX2; elsewhere f32, as half precision is only
            // picked where F16C widens it (and every x86 CPU with it has an integer kernel).
            let expected = if int8::runs_on(Isa::detect()) { WeightFormat::I8 } else { WeightFormat::F32 };
            assert_eq!(picked, expected);
        }
    }

    /// Weights half precision holds but off the int8 grids: `for_model` packs them in half
    /// precision where F16C widens it in registers, and as f32 elsewhere.
    #[test]
    fn half_precision_is_picked_only_where_f16c_widens_it() {
        let cfg =
            ModelConfig::new(Vocab::for_pitch_range(48, 88), InputKind::Embedding { dim: 8 }, 32, 2, 0.0);
        let halves: HashMap<String, Tensor> = random_lstm(&cfg, 4, 0.3)
            .named_tensors()
            .into_iter()
            .map(|(name, t)| {
                let v: Vec<f32> =
                    values(&t).unwrap().iter().map(|&w| half::f16::from_f32(w).to_f32()).collect();
                (name, Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap())
            })
            .collect();
        let lstm = MelodyLstm::new(&cfg, VarBuilder::from_tensors(halves, DType::F32, &Device::Cpu)).unwrap();
        if int8::runs_on(Isa::detect()) {
            assert!(FastLstm::pack_as(&lstm, Isa::detect(), WeightFormat::I8).is_err(), "off the int8 grids");
        }
        let expected = if Isa::detect() == Isa::Portable { WeightFormat::F32 } else { WeightFormat::F16 };
        assert_eq!(FastLstm::for_model(&lstm).unwrap().unwrap().format(), expected);
    }

    /// How far the integer kernels may be from candle: their inputs are rounded to `2^-15`,
    /// which puts the built-in model's logits within about 2e-4; the rest is margin.
    const INT8_TOLERANCE: f32 = 5e-4;

    /// `lstm` packed as int8 for every integer kernel this CPU runs, each beside every float
    /// instruction set it runs with, named.
    fn int8_packings(lstm: &MelodyLstm) -> Vec<(String, FastLstm)> {
        let mut packings = Vec::new();
        for isa in [Isa::Avx512, Isa::Avx2Fma] {
            if !(isa == Isa::detect() || Isa::detect() == Isa::Avx512) || !int8::runs_on(isa) {
                continue;
            }
            let best = FastLstm::pack_as(lstm, isa, WeightFormat::I8).unwrap();
            let others: Vec<Int8Kernel> = Int8Kernel::ALL
                .into_iter()
                .filter(|&k| k.runs_here() && Some(k) != best.int8_kernel())
                .collect();
            for kernel in others {
                let other =
                    FastLstm::pack_as(lstm, isa, WeightFormat::I8).unwrap().with_int8_kernel(kernel).unwrap();
                packings.push((format!("{isa:?} {kernel:?}"), other));
            }
            packings.push((format!("{isa:?} {:?}", best.int8_kernel()), best));
        }
        packings
    }

    /// The built-in model through each integer kernel, over a passage of its own training songs,
    /// against candle on the same weights: trained weights, not only random ones. The VNNI
    /// kernels give the same last logits to the bit.
    #[test]
    fn builtin_model_int8_step_matches_candle_within_5e_4() {
        let model = crate::io::LoadedModel::builtin().unwrap();
        let stream = model.memory.as_ref().expect("the built-in model has a tune memory").to_bytes();
        let tokens: Vec<u32> = stream[stream.len() / 2..][..200].iter().map(|&t| t as u32).collect();
        let picked = FastLstm::for_model(&model.lstm).unwrap().unwrap().format();
        assert_eq!(picked == WeightFormat::I8, int8::runs_on(Isa::detect()));
        let (want, want_c) = candle_steps(&model.lstm, &tokens);
        let mut vnni_logits = Vec::new();
        for (what, fast) in int8_packings(&model.lstm) {
            let logits =
                assert_steps_match(&fast, &tokens, (&want, &want_c), &format!("built-in int8 {what}"));
            if fast.int8_kernel() != Some(Int8Kernel::Avx2Wide) {
                vnni_logits.push(logits);
            }
        }
        assert!(vnni_logits.windows(2).all(|pair| pair[0] == pair[1]), "the VNNI kernels differ");
    }

    /// Int8-grid weights (`int8::quantize_model`, in either scope) through each integer kernel,
    /// against candle on the same weights; and a model off the grid is refused that format.
    #[test]
    fn int8_weights_match_candle_within_5e_4() {
        if !int8::runs_on(Isa::detect()) {
            return;
        }
        let vocab = Vocab::for_pitch_range(48, 88);
        for (seed, (input, hidden, layers)) in [
            (InputKind::Embedding { dim: 64 }, 256, 2),
            (InputKind::OneHot, 48, 1),
            (InputKind::Embedding { dim: 5 }, 23, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let cfg = ModelConfig::new(vocab.clone(), input, hidden, layers, 0.0);
            let lstm = random_lstm(&cfg, seed as u64, 2.0 / (hidden as f32).sqrt());
            assert!(FastLstm::pack_as(&lstm, Isa::detect(), WeightFormat::I8).is_err());
            assert_eq!(FastLstm::for_model(&lstm).unwrap().unwrap().format(), WeightFormat::F32);
            let original = lstm.named_tensors();
            for scope in [int8::GridScope::StepMatrices, int8::GridScope::EveryMatrix] {
                let (lstm, change) = int8::quantize_model(&lstm, &cfg, scope).unwrap();
                assert!(change > 0.0);
                for ((name, before), (_, after)) in original.iter().zip(lstm.named_tensors()) {
                    let on_grid = int8::grid_integers(&after).unwrap().is_some();
                    let covered = match scope {
                        int8::GridScope::StepMatrices => int8::is_grid_tensor(name),
                        int8::GridScope::EveryMatrix => before.rank() == 2,
                    };
                    assert_eq!(on_grid, covered, "{name} in {scope:?}");
                    if !covered {
                        let same = (before - &after).unwrap().abs().unwrap().max_all().unwrap();
                        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{name} in {scope:?}");
                    }
                }
                let fast = FastLstm::for_model(&lstm).unwrap().unwrap();
                assert_eq!(fast.format(), WeightFormat::I8, "picked by itself for weights on the grid");
                let mut rng = ChaCha8Rng::seed_from_u64(9);
                let tokens: Vec<u32> = (0..64).map(|_| rng.random_range(0..vocab.len() as u32)).collect();
                let (want, want_c) = candle_steps(&lstm, &tokens);
                for (what, fast) in int8_packings(&lstm) {
                    assert_steps_match(
                        &fast,
                        &tokens,
                        (&want, &want_c),
                        &format!("int8 {what} {input:?} {hidden}x{layers} {scope:?}"),
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_bad_tokens_and_shapes_without_touching_the_state() {
        let cfg = ModelConfig::new(Vocab::for_pitch_range(60, 64), InputKind::OneHot, 8, 2, 0.0);
        let fast = FastLstm::pack(&random_lstm(&cfg, 2, 0.3), Isa::detect()).unwrap();
        let mut state = fast.new_state();
        state.h[1][3] = 0.25;
        let before = state.clone();
        let mut logits = vec![0.0; cfg.vocab_len()];
        assert!(fast.step_at(TokenId(cfg.vocab_len() as u16), &[], &mut state, &mut logits).is_err());
        assert!(fast.step_at(TokenId(0), &[], &mut state, &mut logits[1..]).is_err());
        let mut wrong = GenState::zeros(1, 8);
        assert!(fast.step_at(TokenId(0), &[], &mut wrong, &mut logits).is_err());
        assert_eq!(state, before);
        fast.step_at(TokenId(0), &[], &mut state, &mut logits).unwrap();
        assert_ne!(state, before);
    }

    #[test]
    fn floor_pass_reads_every_weight() {
        let cfg = ModelConfig::new(Vocab::for_pitch_range(60, 64), InputKind::OneHot, 8, 1, 0.0);
        let fast = FastLstm::pack(&random_lstm(&cfg, 3, 0.3), Isa::detect()).unwrap();
        // One block of 64 rows over 8 hidden columns, a table row of 64, a head block of 64 × 8
        // plus its 64 biases, and the layer's 64 (zero) biases.
        assert_eq!(fast.weight_bytes_per_step(), 4 * (64 * 8 + 64 + 64 + 64 * 8 + 64));
        let LayerWeights::F32(weights) = &fast.layers[0].weights else { panic!("packed as f32") };
        let LayerWeights::F32(head) = &fast.head.weights else { panic!("packed as f32") };
        let direct: f32 = weights.iter().sum::<f32>()
            + fast.token_gates[..64].iter().sum::<f32>()
            + head.iter().sum::<f32>()
            + fast.head.bias.iter().sum::<f32>();
        assert!((fast.read_weights_once(TokenId(0)) - direct).abs() < 1e-4);
    }
}
