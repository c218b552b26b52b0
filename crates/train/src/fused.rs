//! The recurrence of one LSTM layer over a whole batch of sequences as a single candle custom
//! op, with its backward pass (backpropagation through time) written by hand. It replaces the
//! dozen small tensors candle's graph builds per time step, and candle's autograd still works
//! around it: the input projection, the output layer and the loss stay ordinary candle ops.
//! Training passes may multiply in bfloat16 (`Products`, `set_training_products`);
//! evaluation always multiplies in f32.
//! Runs on: offline threads (training, evaluation). Splits the batch across candle's own CPU
//! worker threads (`candle_core::utils::barrier_pool`), the calling thread among them; spawns
//! none and sets no environment variables.
//!
//! Forward, per step and per sequence: `gates = xs_proj[t] + W_hh h[t-1]`, then the cell
//! (`[i f g o] = [σ σ tanh σ](gates)`, `c = f ⊙ c[t-1] + i ⊙ g`, `h = o ⊙ tanh c`). The op keeps
//! the activated gates, `c` and `tanh c` of every step for the backward pass, which runs the
//! steps in reverse:
//!
//! ```text
//! dh = dys[t] + dh_next                       dc = dc_next + dh ⊙ o ⊙ (1 - tanh² c)
//! di = dc ⊙ g ⊙ i(1-i)    df = dc ⊙ c[t-1] ⊙ f(1-f)    dg = dc ⊙ i ⊙ (1-g²)    do = dh ⊙ tanh c ⊙ o(1-o)
//! dxs_proj[t] = [di df dg do]    dh_next = dxs_proj[t] W_hh    dc_next = dc ⊙ f
//! ```
//!
//! and `dW_hh = Σ_t dxs_proj[t]ᵀ h[t-1]` is one large matrix product at the end. Sequences are
//! independent, so each thread runs its share of the batch through all steps without waiting
//! for the others; the products are the packed kernels of `kernels`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Error, IndexOp, Layout, Result, Shape, Storage, Tensor};

use model::kernels::{gemm, sigmoid, tanh_approx, Bf16Unit, Isa, Kernel, MatRef, PackedB};
use model::lstm::{Dropout, LstmState, MelodyLstm};

/// How the recurrent matrix products of a pass multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// In f32: the same function as the per-step graph, to float rounding.
    F32,
    /// The recurrent weights and what they multiply rounded to bfloat16, the products summed
    /// in f32, where the CPU has a `kernels::Bf16Unit`: on AMX tiles three to five times the
    /// f32 rate on the recurrence's step products, 1.5 times on `dW_hh`; with AVX-512 BF16
    /// about 1.3 times a whole training step. Only for training passes, where the rounding
    /// stays within the noise between runs (`docs/experiments/speed.md` compares the loss
    /// curves).
    Bf16,
}

impl Products {
    /// How the choice is named in the tools' output.
    pub fn describe(self) -> &'static str {
        match self {
            Products::F32 => "f32",
            Products::Bf16 => match Bf16Unit::here() {
                Some(Bf16Unit::Amx) => "bfloat16 on AMX tiles, summed in f32",
                Some(Bf16Unit::Avx512) => "bfloat16 with AVX-512 BF16, summed in f32",
                // `set_training_products` grants bfloat16 only where a unit exists.
                None => "bfloat16, but this CPU has no unit for it",
            },
        }
    }

    /// Rounds `packed` as these products multiply (a no-op for f32).
    fn prepare(self, packed: &mut PackedB) {
        if self == Products::Bf16 {
            packed.round_to_bf16();
        }
    }
}

/// Whether this process's training passes multiply in bfloat16 (`set_training_products`).
static TRAINING_BF16: AtomicBool = AtomicBool::new(false);

/// Chooses how the training passes (gradients tracked) of this process multiply, and returns
/// the choice in effect: bfloat16 only where the CPU multiplies it (`Bf16Unit`), else f32.
/// Evaluation and predictions multiply in f32 whatever the choice, so scores never depend on
/// it. Until called, training multiplies in f32.
pub fn set_training_products(wanted: Products) -> Products {
    let bf16 = wanted == Products::Bf16 && Bf16Unit::here().is_some();
    TRAINING_BF16.store(bf16, Ordering::Relaxed);
    training_products()
}

/// How training passes multiply in this process (`set_training_products`).
pub fn training_products() -> Products {
    match TRAINING_BF16.load(Ordering::Relaxed) {
        true => Products::Bf16,
        false => Products::F32,
    }
}

/// True if `lstm_outputs` can run `model`: its weights are f32, on the CPU or (in a build with
/// feature `cuda`) on a CUDA GPU, where `gpu_recurrence` runs the recurrence.
pub fn applies_to(model: &MelodyLstm) -> bool {
    let device = model.device();
    (device.is_cpu() || cfg!(feature = "cuda") && device.is_cuda())
        && model.layers().iter().all(|l| l.w_hh.dtype() == DType::F32)
}

/// The top layer's outputs for a time-major batch, before dropout and the output layer: the
/// same function as `MelodyLstm`'s per-step graph, with every step of a layer in one op. Each
/// layer's input projection is one matrix product (layer 0: a table of every token's
/// `W_ih x + b_ih + b_hh`, gathered, plus the side-table rows of each step's bar inputs for a
/// model with them), and `dropout` (training only) applies to each layer's recurrent weights
/// and outputs as the per-step graph applies it, drawing its masks in the same order. With
/// `detach`, no gradient is tracked (evaluation). `products`: how the recurrences multiply.
/// tokens: `[seq, batch]` u32, bars: `[seq, batch(, inputs)]` (`MelodyLstm::side_rows`), state:
/// per layer `[batch, hidden]` (zeros when `None`) → (ys `[seq, batch, hidden]`, state after the
/// last step)
pub fn lstm_outputs(
    model: &MelodyLstm,
    tokens: &Tensor,
    bars: Option<&Tensor>,
    state: Option<&LstmState>,
    mut dropout: Option<&mut Dropout>,
    detach: bool,
    products: Products,
) -> Result<(Tensor, LstmState)> {
    let (seq_len, batch) = tokens.dims2()?;
    let hidden = model.hidden_size();
    let weight = |t: &Tensor| if detach { t.detach() } else { t.clone() };
    let zero;
    let state = match state {
        Some(s) => s,
        None => {
            zero = model.zero_state(batch)?;
            &zero
        }
    };
    let num_layers = model.num_layers();
    let mut next = LstmState { h: Vec::with_capacity(num_layers), c: Vec::with_capacity(num_layers) };
    let mut ys: Option<Tensor> = None;
    for (k, layer) in model.layers().iter().enumerate() {
        let bias = (weight(&layer.b_ih) + weight(&layer.b_hh))?;
        let w_ih_t = weight(&layer.w_ih).t()?;
        let w_hh = match dropout.as_deref_mut() {
            Some(d) => d.recurrent_weights(&weight(&layer.w_hh))?,
            None => weight(&layer.w_hh),
        };
        let (out, h, c) = match &ys {
            None => {
                let table = match model.embedding() {
                    Some(e) => weight(e).matmul(&w_ih_t)?,
                    // A one-hot token times W_ihᵀ is a row of W_ihᵀ.
                    None => w_ih_t.contiguous()?,
                };
                let table = table.broadcast_add(&bias)?;
                match (model.side_table(&weight)?, model.side_rows(tokens, bars)?) {
                    (Some(side_table), Some(side_rows)) => {
                        // One table of token rows then side rows; each step sums its token's
                        // row and its bar inputs' rows.
                        let vocab_len = table.dim(0)? as f64;
                        let table = Tensor::cat(&[&table, &side_table], 0)?;
                        let ids = Tensor::cat(&[&tokens.unsqueeze(2)?, &(side_rows + vocab_len)?], 2)?;
                        recur_table_rows(&table, &ids, &w_hh, &state.h[k], &state.c[k], products)?
                    }
                    _ => recur_tokens(&table, tokens, &w_hh, &state.h[k], &state.c[k], products)?,
                }
            }
            Some(below) => {
                let flat = below.reshape((seq_len * batch, hidden))?;
                let xs_proj = linear(&flat, &weight(&layer.w_ih), &bias, products)?.reshape((
                    seq_len,
                    batch,
                    4 * hidden,
                ))?;
                recur(&xs_proj, &w_hh, &state.h[k], &state.c[k], products)?
            }
        };
        next.h.push(h);
        next.c.push(c);
        ys = Some(match dropout.as_deref_mut() {
            Some(d) => d.apply_sequence(&out)?,
            None => out,
        });
    }
    Ok((ys.expect("a model has at least one layer"), next))
}

/// `xs Wᵀ + b` with the packed kernels on candle's threads, forward and backward: the input
/// projection of the layers above the first, where candle's own matrix product is the slower.
/// `products`: how its three products multiply. On a GPU, candle's own product (f32).
/// xs: `[n, input]`, w: `[output, input]`, b: `[output]` → `[n, output]` (all f32).
pub fn linear(xs: &Tensor, w: &Tensor, b: &Tensor, products: Products) -> Result<Tensor> {
    if !xs.device().is_cpu() {
        return xs.matmul(&w.t()?)?.broadcast_add(b);
    }
    let (_, input) = xs.dims2()?;
    let (output, w_input) = w.dims2()?;
    if w_input != input || b.dims() != [output] {
        return Err(Error::Msg(format!(
            "fused linear: xs {:?}, w {:?}, b {:?} do not fit together",
            xs.dims(),
            w.dims(),
            b.dims()
        )));
    }
    let op = Linear { isa: Isa::detect(), products };
    xs.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// The custom op behind `linear`. Inputs: xs `[n, input]`, w `[output, input]`, b `[output]`.
struct Linear {
    isa: Isa,
    products: Products,
}

/// Rows `0..n` split into near-equal shares, one per candle thread (`on_candle_threads`).
fn row_shares(n: usize) -> Vec<usize> {
    let parts = (candle_core::utils::barrier_pool().n_workers() + 1).min(n).max(1);
    (0..=parts).map(|i| i * n / parts).collect()
}

/// `out = a B` (+ `out` when `accumulate`) with the rows of `a` and `out` shared among candle's
/// threads. `a` is `[m, k]` with `a_row_stride`/`a_col_stride`; `out` is `[m, n]` row-major.
fn parallel_gemm(isa: Isa, m: usize, a: MatRef, b: &PackedB, out: &mut [f32], accumulate: bool) {
    let n = b.n();
    let bounds = row_shares(m);
    let mut parts = Vec::with_capacity(bounds.len());
    let mut rest = out;
    for w in bounds.windows(2) {
        let (part, tail) = rest.split_at_mut((w[1] - w[0]) * n);
        parts.push((w[0], w[1] - w[0], part));
        rest = tail;
    }
    on_candle_threads(&mut parts, |(row0, rows, part)| {
        let a_part = MatRef { data: &a.data[*row0 * a.row_stride..], ..a };
        gemm(isa, *rows, a_part, b, part, n, accumulate);
    });
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, input) = l1.shape().dims2()?;
        let (output, _) = l2.shape().dims2()?;
        let (xs, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        // Wᵀ (`[input, output]`) is the right-hand side.
        let mut w_t = PackedB::with_buffer(take_buffer(0));
        w_t.pack(input, output, w, 1, input);
        self.products.prepare(&mut w_t);
        let mut out = vec![0.0f32; n * output];
        for row in out.chunks_exact_mut(output) {
            row.copy_from_slice(b);
        }
        parallel_gemm(
            self.isa,
            n,
            MatRef { data: xs, row_stride: input, col_stride: 1 },
            &w_t,
            &mut out,
            true,
        );
        give_back(w_t.into_buffer());
        Ok((CpuStorage::F32(out), Shape::from((n, output))))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, input) = xs.dims2()?;
        let output = w.dim(0)?;
        let device = xs.device();
        let isa = self.isa;
        with_data(grad, |grad| -> Result<_> {
            // dxs = grad W.
            let grad_xs = if xs.track_op() {
                let mut w_packed = PackedB::with_buffer(take_buffer(0));
                with_data(w, |w| w_packed.pack(output, input, w, input, 1))?;
                self.products.prepare(&mut w_packed);
                let mut dxs = vec![0.0f32; n * input];
                let a = MatRef { data: grad, row_stride: output, col_stride: 1 };
                parallel_gemm(isa, n, a, &w_packed, &mut dxs, false);
                give_back(w_packed.into_buffer());
                Some(Tensor::from_vec(dxs, (n, input), device)?)
            } else {
                None
            };
            // dW = gradᵀ xs: `grad` read transposed, `xs` packed as the right-hand side.
            let grad_w = if w.track_op() {
                let mut xs_packed = PackedB::with_buffer(take_buffer(0));
                with_data(xs, |xs| xs_packed.pack(n, input, xs, input, 1))?;
                self.products.prepare(&mut xs_packed);
                let mut dw = vec![0.0f32; output * input];
                let a = MatRef { data: grad, row_stride: 1, col_stride: output };
                parallel_gemm(isa, output, a, &xs_packed, &mut dw, false);
                give_back(xs_packed.into_buffer());
                Some(Tensor::from_vec(dw, (output, input), device)?)
            } else {
                None
            };
            let grad_b = if b.track_op() {
                let mut db = vec![0.0f32; output];
                for row in grad.chunks_exact(output) {
                    db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
                }
                Some(Tensor::from_vec(db, output, device)?)
            } else {
                None
            };
            Ok((grad_xs, grad_w, grad_b))
        })?
    }
}

/// True if `recur` can run this recurrence: f32 tensors with at least one step, on the CPU or
/// (feature `cuda`) a CUDA GPU.
pub fn applies(xs_proj: &Tensor, w_hh: &Tensor) -> bool {
    let device = xs_proj.device();
    (device.is_cpu() || cfg!(feature = "cuda") && device.is_cuda())
        && xs_proj.dtype() == DType::F32
        && w_hh.dtype() == DType::F32
        && xs_proj.rank() == 3
        && xs_proj.dim(0).is_ok_and(|seq| seq > 0)
}

/// The recurrence over a whole sequence, given every step's input projection; the same
/// function as `LstmLayer::recur`'s per-step graph. On a CUDA GPU (feature `cuda`),
/// `gpu_recurrence` runs it, multiplying in f32 whatever `products` says.
/// xs_proj: `[seq, batch, 4 hidden]` (`W_ih x + b_ih + b_hh`), w_hh: `[4 hidden, hidden]`,
/// h0 and c0: `[batch, hidden]` → (ys `[seq, batch, hidden]`, h `[batch, hidden]`, c
/// `[batch, hidden]` after the last step). Gradients flow to `xs_proj`, `w_hh`, `h0` and `c0`
/// through `ys` (and `h`, its last step); the returned `c` carries none.
pub fn recur(
    xs_proj: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    c0: &Tensor,
    products: Products,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (seq_len, batch, _) = xs_proj.dims3()?;
    check_fit(xs_proj, w_hh, h0, c0, false, seq_len, batch)?;
    #[cfg(feature = "cuda")]
    if xs_proj.device().is_cuda() {
        return crate::gpu_recurrence::recur(xs_proj, w_hh, h0, c0);
    }
    recur_on(xs_proj, w_hh, h0, c0, Recurrence { products, ..Recurrence::new() }, seq_len, batch)
}

/// `recur` for a first layer whose input projection is a row of a table per token: the rows
/// are gathered inside the op, and their gradient summed into the table's there, so no
/// `[seq, batch, 4 hidden]` tensor passes through candle's graph.
/// table: `[vocab, 4 hidden]` (`W_ih x + b_ih + b_hh` of every token), tokens: `[seq, batch]`
/// u32; the rest and the results as for `recur`. Gradients flow to `table` as to `xs_proj`.
pub fn recur_tokens(
    table: &Tensor,
    tokens: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    c0: &Tensor,
    products: Products,
) -> Result<(Tensor, Tensor, Tensor)> {
    recur_table_rows(table, &tokens.unsqueeze(2)?, w_hh, h0, c0, products)
}

/// `recur_tokens` where each step's input projection is the sum of several rows of the table:
/// ids `[seq, batch, rows]` u32 (a token and its bar position's row).
pub fn recur_table_rows(
    table: &Tensor,
    ids: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    c0: &Tensor,
    products: Products,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (seq_len, batch, rows_per_step) = ids.dims3()?;
    let num_rows = table.dim(0)?;
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= num_rows) {
        return Err(Error::Msg(format!("fused LSTM: row {bad} outside a table of {num_rows}")));
    }
    if table.device().is_cuda() {
        // On a GPU the rows are gathered and summed by candle's ops, whose backward pass sums
        // the gradients into the table's rows.
        let gate_width = table.dim(1)?;
        let rows = table
            .index_select(&Tensor::from_vec(ids, seq_len * batch * rows_per_step, table.device())?, 0)?;
        let xs_proj = rows.reshape((seq_len, batch, rows_per_step, gate_width))?.sum(2)?;
        return recur(&xs_proj, w_hh, h0, c0, products);
    }
    check_fit(table, w_hh, h0, c0, true, seq_len, batch)?;
    let op = Recurrence { token_ids: Some(ids), rows_per_step, products, ..Recurrence::new() };
    recur_on(table, w_hh, h0, c0, op, seq_len, batch)
}

/// An error unless the shapes fit together; `input` is xs_proj, or with `table` the table of
/// rows the steps' ids pick.
fn check_fit(
    input: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    c0: &Tensor,
    table: bool,
    seq_len: usize,
    batch: usize,
) -> Result<()> {
    let gate_width = *input.dims().last().unwrap_or(&0);
    let hidden = gate_width / 4;
    let input_fits = match table {
        true => input.rank() == 2,
        false => input.dims() == [seq_len, batch, gate_width],
    };
    if !input_fits
        || seq_len == 0
        || w_hh.dims() != [gate_width, hidden]
        || h0.dims() != [batch, hidden]
        || c0.dims() != [batch, hidden]
    {
        return Err(Error::Msg(format!(
            "fused LSTM: input {:?}, w_hh {:?}, h0 {:?}, c0 {:?} do not fit together",
            input.dims(),
            w_hh.dims(),
            h0.dims(),
            c0.dims()
        )));
    }
    Ok(())
}

/// Runs `op` on shapes `check_fit` accepted; `input` as there.
fn recur_on(
    input: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    c0: &Tensor,
    op: Recurrence,
    seq_len: usize,
    batch: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let hidden = w_hh.dim(1)?;
    let hc0 = Tensor::stack(&[h0, c0], 0)?.contiguous()?;
    let saved = op.saved.clone();
    let op = Recurrence { steps: (seq_len, batch), ..op };
    let ys = input.contiguous()?.apply_op3(&w_hh.contiguous()?, &hc0, op)?;
    let h_last = ys.i(seq_len - 1)?;
    let c_last = {
        let guard = saved.lock().map_err(|_| Error::Msg("fused LSTM: state lock poisoned".into()))?;
        let saved = guard.as_ref().ok_or_else(|| Error::Msg("fused LSTM: forward kept no state".into()))?;
        let last = &saved.cells[(seq_len - 1) * batch * hidden..];
        Tensor::from_slice(last, (batch, hidden), input.device())?
    };
    Ok((ys, h_last, c_last))
}

/// Large buffers kept between calls, for at most `POOL_MAX_FLOATS` numbers in all. A fresh
/// buffer of megabytes costs a page fault per 4 KiB the first time it is written; at the
/// recipe's sizes that was a fifth of a training step.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
const POOL_MAX_FLOATS: usize = 32 << 20;

/// A buffer of `len` numbers from the pool (or a new one). Its contents are left over from an
/// earlier use: callers overwrite every element.
fn take_buffer(len: usize) -> Vec<f32> {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        let idx =
            (0..pool.len()).filter(|&i| pool[i].capacity() >= len).min_by_key(|&i| pool[i].capacity())?;
        Some(pool.swap_remove(idx))
    });
    let mut buf = reused.unwrap_or_default();
    buf.resize(len, 0.0);
    buf
}

/// Returns `buf` to the pool, or frees it when the pool is full.
fn give_back(buf: Vec<f32>) {
    if let Ok(mut pool) = POOL.lock() {
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= POOL_MAX_FLOATS {
            pool.push(buf);
        }
    }
}

/// What the forward pass keeps for the backward pass, all `[seq, batch, ...]`.
struct Saved {
    seq_len: usize,
    batch: usize,
    hidden: usize,
    /// `[seq, batch, 4 hidden]`: the activated gates `σ(i) σ(f) tanh(g) σ(o)`.
    gates: Vec<f32>,
    /// `[seq, batch, hidden]`: `c` after each step.
    cells: Vec<f32>,
    /// `[seq, batch, hidden]`: `tanh c` after each step.
    tanh_cells: Vec<f32>,
}

impl Drop for Saved {
    fn drop(&mut self) {
        for buf in [&mut self.gates, &mut self.cells, &mut self.tanh_cells] {
            give_back(std::mem::take(buf));
        }
    }
}

/// The custom op. Inputs: xs_proj `[seq, batch, 4 hidden]` (or with `token_ids`, the table
/// `[vocab, 4 hidden]`), w_hh `[4 hidden, hidden]`, hc0 `[2, batch, hidden]` (h0 over c0);
/// output: ys `[seq, batch, hidden]`.
struct Recurrence {
    isa: Isa,
    num_threads: usize,
    /// `[seq, batch, rows_per_step]` row ids, when the first input is a table to gather rows
    /// from: each step's input projection is the sum of its rows.
    token_ids: Option<Vec<u32>>,
    rows_per_step: usize,
    /// `(seq, batch)`.
    steps: (usize, usize),
    products: Products,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl Recurrence {
    fn new() -> Self {
        Self {
            isa: Isa::detect(),
            num_threads: candle_core::utils::barrier_pool().n_workers() + 1,
            token_ids: None,
            rows_per_step: 1,
            steps: (0, 0),
            products: Products::F32,
            saved: Arc::new(Mutex::new(None)),
        }
    }

    /// Row bounds splitting `batch` sequences into near-equal shares, one per thread.
    fn shares(&self, batch: usize) -> Vec<usize> {
        let n = self.num_threads.min(batch).max(1);
        (0..=n).map(|i| i * batch / n).collect()
    }
}

/// Runs `work` on every item, spread over candle's own CPU threads (the calling thread among
/// them): no threads are spawned, and none of candle's idle workers spin beside ours.
fn on_candle_threads<T: Send>(items: &mut [T], work: impl Fn(&mut T) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let num_threads = pool.n_workers() + 1;
    // Each item is locked by the one thread that takes it, so these locks never wait.
    let items: Vec<Mutex<&mut T>> = items.iter_mut().map(Mutex::new).collect();
    pool.execute(|thread_idx| {
        for item in items.iter().skip(thread_idx).step_by(num_threads) {
            if let Ok(mut item) = item.lock() {
                work(&mut item);
            }
        }
    });
}

/// The contiguous f32 data of a CPU storage under `layout`.
fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| Error::Msg("fused LSTM: input not contiguous".into()))?;
    Ok(&data[start..end])
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(cpu_slice(cpu, layout)?)),
        _ => Err(Error::Msg("fused LSTM: tensor not on the CPU".into())),
    }
}

/// Splits `buf` (`[steps][batch][width]`) into per-share lists of per-step row blocks:
/// `out[share][step]` is rows `bounds[share]..bounds[share + 1]` of step `step`.
fn split_rows<'a>(
    buf: &'a mut [f32],
    batch: usize,
    width: usize,
    bounds: &[usize],
) -> Vec<Vec<&'a mut [f32]>> {
    let mut out: Vec<Vec<&mut [f32]>> = bounds.windows(2).map(|_| Vec::new()).collect();
    for step in buf.chunks_exact_mut(batch * width) {
        let mut rest = step;
        for (share, w) in out.iter_mut().zip(bounds.windows(2)) {
            let (rows, tail) = rest.split_at_mut((w[1] - w[0]) * width);
            share.push(rows);
            rest = tail;
        }
    }
    out
}

/// Per-share lists of per-step token ids: `out[share][step]` is the ids of rows
/// `bounds[share]..bounds[share + 1]` of step `step` (`ids` is `[steps][batch]`).
fn split_ids<'a>(
    ids: &'a [u32],
    batch: usize,
    rows_per_step: usize,
    bounds: &[usize],
) -> Vec<Vec<&'a [u32]>> {
    let mut out: Vec<Vec<&[u32]>> = bounds.windows(2).map(|_| Vec::new()).collect();
    for step in ids.chunks_exact(batch * rows_per_step) {
        for (share, w) in out.iter_mut().zip(bounds.windows(2)) {
            share.push(&step[w[0] * rows_per_step..w[1] * rows_per_step]);
        }
    }
    out
}

/// The same for read-only data.
fn split_rows_ref<'a>(buf: &'a [f32], batch: usize, width: usize, bounds: &[usize]) -> Vec<Vec<&'a [f32]>> {
    let mut out: Vec<Vec<&[f32]>> = bounds.windows(2).map(|_| Vec::new()).collect();
    for step in buf.chunks_exact(batch * width) {
        for (share, w) in out.iter_mut().zip(bounds.windows(2)) {
            share.push(&step[w[0] * width..w[1] * width]);
        }
    }
    out
}

/// Where each step's input projection comes from, for one share of the batch.
enum StepInputs<'a> {
    /// Per step: the share's rows of xs_proj, `[rows, 4 hidden]`.
    Rows(Vec<&'a [f32]>),
    /// The table `[table rows, 4 hidden]` and per step the share's row ids `[rows,
    /// rows_per_step]`, whose rows are summed.
    Table { table: &'a [f32], ids: Vec<&'a [u32]>, rows_per_step: usize },
}

/// One share's forward pass through every step.
struct ForwardShare<'a> {
    hidden: usize,
    /// Every step's input projection.
    input: StepInputs<'a>,
    /// The share's rows of h0 and c0, `[rows, hidden]`.
    h0: &'a [f32],
    c0: &'a [f32],
    /// Per step, written: activated gates, cells, tanh of cells, outputs.
    gates: Vec<&'a mut [f32]>,
    cells: Vec<&'a mut [f32]>,
    tanh_cells: Vec<&'a mut [f32]>,
    ys: Vec<&'a mut [f32]>,
}

/// A share of the batch run through every step, as a `Kernel`: the forward or the backward pass.
trait ShareBody {
    fn run_body(&mut self, isa: Isa, w: &PackedB);
}

impl ShareBody for ForwardShare<'_> {
    #[inline(always)]
    fn run_body(&mut self, isa: Isa, w: &PackedB) {
        ForwardShare::run_body(self, isa, w)
    }
}

impl ShareBody for BackwardShare<'_> {
    #[inline(always)]
    fn run_body(&mut self, isa: Isa, w: &PackedB) {
        BackwardShare::run_body(self, isa, w)
    }
}

/// `ShareBody::run_body` compiled for the instruction set it runs with.
struct Run<'a, S> {
    share: &'a mut S,
    isa: Isa,
    w: &'a PackedB,
}

impl<S: ShareBody> Kernel for Run<'_, S> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool, const INT8: bool>(self) {
        self.share.run_body(self.isa, self.w)
    }
}

impl ForwardShare<'_> {
    fn run(&mut self, isa: Isa, w_hh_t: &PackedB) {
        isa.run(None, Run { share: self, isa, w: w_hh_t });
    }

    #[inline(always)]
    fn run_body(&mut self, isa: Isa, w_hh_t: &PackedB) {
        let hidden = self.hidden;
        let rows = self.h0.len() / hidden;
        let gate_width = 4 * hidden;
        for t in 0..self.gates.len() {
            {
                let gates = &mut *self.gates[t];
                match &self.input {
                    StepInputs::Rows(rows) => gates.copy_from_slice(rows[t]),
                    StepInputs::Table { table, ids, rows_per_step } => {
                        for (dst, row_ids) in
                            gates.chunks_exact_mut(gate_width).zip(ids[t].chunks_exact(*rows_per_step))
                        {
                            dst.copy_from_slice(&table[row_ids[0] as usize * gate_width..][..gate_width]);
                            for &id in &row_ids[1..] {
                                let row = &table[id as usize * gate_width..][..gate_width];
                                dst.iter_mut().zip(row).for_each(|(d, &r)| *d += r);
                            }
                        }
                    }
                }
                let h_prev: &[f32] = if t == 0 { self.h0 } else { &*self.ys[t - 1] };
                let h_ref = MatRef { data: h_prev, row_stride: hidden, col_stride: 1 };
                gemm(isa, rows, h_ref, w_hh_t, gates, 4 * hidden, true);
            }
            let gates = &mut *self.gates[t];
            let (cells_done, cells_rest) = self.cells.split_at_mut(t);
            let c_prev: &[f32] = if t == 0 { self.c0 } else { &*cells_done[t - 1] };
            let cells = &mut *cells_rest[0];
            let tanh_cells = &mut *self.tanh_cells[t];
            let ys = &mut *self.ys[t];
            for r in 0..rows {
                let g_row = &mut gates[r * 4 * hidden..][..4 * hidden];
                let (gi, rest) = g_row.split_at_mut(hidden);
                let (gf, rest) = rest.split_at_mut(hidden);
                let (gg, go) = rest.split_at_mut(hidden);
                let span = r * hidden..(r + 1) * hidden;
                let mut lanes = Lanes::new(hidden);
                for j in lanes.by_ref() {
                    cell_forward(
                        lane(gi, j),
                        lane(gf, j),
                        lane(gg, j),
                        lane(go, j),
                        lane_ref(&c_prev[span.clone()], j),
                        lane(&mut cells[span.clone()], j),
                        lane(&mut tanh_cells[span.clone()], j),
                        lane(&mut ys[span.clone()], j),
                    );
                }
                if let Some(j) = lanes.tail() {
                    let mut buf = [[0.0f32; LANES]; 8];
                    let n = hidden - j;
                    for (b, src) in buf.iter_mut().zip([&*gi, gf, gg, go, &c_prev[span.clone()]]) {
                        b[..n].copy_from_slice(&src[j..]);
                    }
                    let [bi, bf, bg, bo, bcp, bc, btc, by] = &mut buf;
                    cell_forward(bi, bf, bg, bo, bcp, bc, btc, by);
                    for (dst, b) in [gi, gf, gg, go].into_iter().zip(&buf) {
                        dst[j..].copy_from_slice(&b[..n]);
                    }
                    cells[span.clone()][j..].copy_from_slice(&buf[5][..n]);
                    tanh_cells[span.clone()][j..].copy_from_slice(&buf[6][..n]);
                    ys[span][j..].copy_from_slice(&buf[7][..n]);
                }
            }
        }
    }
}

/// Units per vectorised chunk of the element-wise cell code.
const LANES: usize = 16;

/// Starts of the whole `LANES`-wide chunks of `len` units, then the start of the partial one.
struct Lanes {
    next: usize,
    len: usize,
}

impl Lanes {
    fn new(len: usize) -> Self {
        Self { next: 0, len }
    }

    /// The start of the last, partial chunk (once the whole ones are done), if there is one.
    fn tail(&self) -> Option<usize> {
        (self.next < self.len).then_some(self.next)
    }
}

impl Iterator for Lanes {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let start = self.next;
        (start + LANES <= self.len).then(|| {
            self.next += LANES;
            start
        })
    }
}

/// The whole chunk of `xs` starting at `j`.
#[inline(always)]
fn lane(xs: &mut [f32], j: usize) -> &mut [f32; LANES] {
    (&mut xs[j..j + LANES]).try_into().expect("a whole chunk")
}

#[inline(always)]
fn lane_ref(xs: &[f32], j: usize) -> &[f32; LANES] {
    xs[j..j + LANES].try_into().expect("a whole chunk")
}

/// The cell forward on `LANES` units: gate pre-activations in, activations out (in place),
/// new cell, its tanh and the output. Separate array arguments tell the compiler nothing
/// overlaps, so it vectorises.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cell_forward(
    gi: &mut [f32; LANES],
    gf: &mut [f32; LANES],
    gg: &mut [f32; LANES],
    go: &mut [f32; LANES],
    c_prev: &[f32; LANES],
    c: &mut [f32; LANES],
    tanh_c: &mut [f32; LANES],
    y: &mut [f32; LANES],
) {
    for j in 0..LANES {
        let i = sigmoid(gi[j]);
        let f = sigmoid(gf[j]);
        let g = tanh_approx(gg[j]);
        let o = sigmoid(go[j]);
        let c_new = f * c_prev[j] + i * g;
        let t_c = tanh_approx(c_new);
        gi[j] = i;
        gf[j] = f;
        gg[j] = g;
        go[j] = o;
        c[j] = c_new;
        tanh_c[j] = t_c;
        y[j] = o * t_c;
    }
}

/// The cell backward on `LANES` units: from the kept activations and the incoming gradients,
/// the gate gradients (`d_gates`: i, f, g, o) and the cell gradient passed back (`dc_next`, in
/// place).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cell_backward(
    gates: [&[f32; LANES]; 4],
    dys: &[f32; LANES],
    tanh_c: &[f32; LANES],
    c_prev: &[f32; LANES],
    dh_next: &[f32; LANES],
    dc_next: &mut [f32; LANES],
    d_gates: [&mut [f32; LANES]; 4],
) {
    let [gi, gf, gg, go] = gates;
    let [di, df, dg, d_o] = d_gates;
    for j in 0..LANES {
        let (i, f, g, o, tc) = (gi[j], gf[j], gg[j], go[j], tanh_c[j]);
        let dh = dys[j] + dh_next[j];
        let dc = dc_next[j] + dh * o * (1.0 - tc * tc);
        di[j] = dc * g * i * (1.0 - i);
        df[j] = dc * c_prev[j] * f * (1.0 - f);
        dg[j] = dc * i * (1.0 - g * g);
        d_o[j] = dh * tc * o * (1.0 - o);
        dc_next[j] = dc * f;
    }
}

/// One share's backward pass through every step, in reverse.
struct BackwardShare<'a> {
    hidden: usize,
    /// Per step, read: the gradient of the loss for the share's ys rows, the kept gates,
    /// cells and tanh of cells.
    grad_ys: Vec<&'a [f32]>,
    gates: Vec<&'a [f32]>,
    cells: Vec<&'a [f32]>,
    tanh_cells: Vec<&'a [f32]>,
    /// The share's rows of c0.
    c0: &'a [f32],
    /// Per step, written: the gradient for xs_proj, `[rows, 4 hidden]`.
    grad_xs_proj: Vec<&'a mut [f32]>,
    /// Written at the end: the gradients for h0 and c0 (the share's rows).
    grad_h0: &'a mut [f32],
    grad_c0: &'a mut [f32],
    /// With a token table: per step the share's token ids, and this share's sum of the
    /// gradients of the table's rows, `[vocab, 4 hidden]`.
    table_grad: Option<(Vec<&'a [u32]>, Vec<f32>)>,
}

impl BackwardShare<'_> {
    fn run(&mut self, isa: Isa, w_hh: &PackedB) {
        isa.run(None, Run { share: self, isa, w: w_hh });
    }

    #[inline(always)]
    fn run_body(&mut self, isa: Isa, w_hh: &PackedB) {
        let hidden = self.hidden;
        let rows = self.c0.len() / hidden;
        // dh_next lives in grad_h0 and dc_next in grad_c0 until they become those gradients.
        self.grad_h0.fill(0.0);
        self.grad_c0.fill(0.0);
        for t in (0..self.grad_ys.len()).rev() {
            let c_prev = if t == 0 { self.c0 } else { self.cells[t - 1] };
            let dxs = &mut *self.grad_xs_proj[t];
            for r in 0..rows {
                let span = r * hidden..(r + 1) * hidden;
                let gate_row = &self.gates[t][r * 4 * hidden..][..4 * hidden];
                let (gi, rest) = gate_row.split_at(hidden);
                let (gf, rest) = rest.split_at(hidden);
                let (gg, go) = rest.split_at(hidden);
                let d_row = &mut dxs[r * 4 * hidden..][..4 * hidden];
                let (di, rest) = d_row.split_at_mut(hidden);
                let (df, rest) = rest.split_at_mut(hidden);
                let (dg, d_o) = rest.split_at_mut(hidden);
                let dys = &self.grad_ys[t][span.clone()];
                let tc = &self.tanh_cells[t][span.clone()];
                let cp = &c_prev[span.clone()];
                let dh_next = &self.grad_h0[span.clone()];
                let dc_next = &mut self.grad_c0[span];
                let mut lanes = Lanes::new(hidden);
                for j in lanes.by_ref() {
                    cell_backward(
                        [lane_ref(gi, j), lane_ref(gf, j), lane_ref(gg, j), lane_ref(go, j)],
                        lane_ref(dys, j),
                        lane_ref(tc, j),
                        lane_ref(cp, j),
                        lane_ref(dh_next, j),
                        lane(dc_next, j),
                        [lane(di, j), lane(df, j), lane(dg, j), lane(d_o, j)],
                    );
                }
                if let Some(j) = lanes.tail() {
                    let n = hidden - j;
                    let mut ins = [[0.0f32; LANES]; 8];
                    for (b, src) in ins.iter_mut().zip([gi, gf, gg, go, dys, tc, cp, dh_next]) {
                        b[..n].copy_from_slice(&src[j..]);
                    }
                    let mut outs = [[0.0f32; LANES]; 5];
                    outs[0][..n].copy_from_slice(&dc_next[j..]);
                    let [i0, i1, i2, i3, i4, i5, i6, i7] = &ins;
                    let [o0, o1, o2, o3, o4] = &mut outs;
                    cell_backward([i0, i1, i2, i3], i4, i5, i6, i7, o0, [o1, o2, o3, o4]);
                    for (dst, b) in [dc_next, di, df, dg, d_o].into_iter().zip(&outs) {
                        dst[j..].copy_from_slice(&b[..n]);
                    }
                }
            }
            if let Some((ids, table_grad)) = &mut self.table_grad {
                let gate_width = 4 * hidden;
                let rows_per_step = ids[t].len() / rows;
                for (d_row, row_ids) in dxs.chunks_exact(gate_width).zip(ids[t].chunks_exact(rows_per_step)) {
                    for &id in row_ids {
                        let sum = &mut table_grad[id as usize * gate_width..][..gate_width];
                        for (s, &d) in sum.iter_mut().zip(d_row) {
                            *s += d;
                        }
                    }
                }
            }
            let d_ref = MatRef { data: dxs, row_stride: 4 * hidden, col_stride: 1 };
            gemm(isa, rows, d_ref, w_hh, self.grad_h0, hidden, false);
        }
    }
}

impl CustomOp3 for Recurrence {
    fn name(&self) -> &'static str {
        "fused-lstm-recurrence"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (seq_len, batch) = self.steps;
        let gate_width = *l1.dims().last().unwrap_or(&0);
        let hidden = gate_width / 4;
        let (input, w_hh, hc0) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        // W_hhᵀ (`[hidden, 4 hidden]`) is the right-hand side of every step's product.
        let mut w_hh_t = PackedB::with_buffer(take_buffer(0));
        w_hh_t.pack(hidden, gate_width, w_hh, 1, hidden);
        self.products.prepare(&mut w_hh_t);
        let (h0, c0) = hc0.split_at(batch * hidden);
        let mut gates = take_buffer(seq_len * batch * gate_width);
        let mut cells = take_buffer(seq_len * batch * hidden);
        let mut tanh_cells = take_buffer(seq_len * batch * hidden);
        let mut ys = vec![0.0f32; seq_len * batch * hidden];
        let bounds = self.shares(batch);
        {
            let input_shares: Vec<StepInputs> = match &self.token_ids {
                None => split_rows_ref(input, batch, gate_width, &bounds)
                    .into_iter()
                    .map(StepInputs::Rows)
                    .collect(),
                Some(ids) => split_ids(ids, batch, self.rows_per_step, &bounds)
                    .into_iter()
                    .map(|ids| StepInputs::Table { table: input, ids, rows_per_step: self.rows_per_step })
                    .collect(),
            };
            let gate_shares = split_rows(&mut gates, batch, gate_width, &bounds);
            let cell_shares = split_rows(&mut cells, batch, hidden, &bounds);
            let tanh_shares = split_rows(&mut tanh_cells, batch, hidden, &bounds);
            let ys_shares = split_rows(&mut ys, batch, hidden, &bounds);
            let mut shares: Vec<ForwardShare> = input_shares
                .into_iter()
                .zip(gate_shares)
                .zip(cell_shares)
                .zip(tanh_shares)
                .zip(ys_shares)
                .zip(bounds.windows(2))
                .map(|(((((input, gates), cells), tanh_cells), ys), w)| ForwardShare {
                    hidden,
                    input,
                    h0: &h0[w[0] * hidden..w[1] * hidden],
                    c0: &c0[w[0] * hidden..w[1] * hidden],
                    gates,
                    cells,
                    tanh_cells,
                    ys,
                })
                .collect();
            let (isa, w_hh_t) = (self.isa, &w_hh_t);
            on_candle_threads(&mut shares, |share| share.run(isa, w_hh_t));
        }
        give_back(w_hh_t.into_buffer());
        let mut saved =
            self.saved.lock().map_err(|_| Error::Msg("fused LSTM: state lock poisoned".into()))?;
        *saved = Some(Saved { seq_len, batch, hidden, gates, cells, tanh_cells });
        Ok((CpuStorage::F32(ys), Shape::from((seq_len, batch, hidden))))
    }

    fn bwd(
        &self,
        input: &Tensor,
        w_hh: &Tensor,
        hc0: &Tensor,
        ys: &Tensor,
        grad_ys: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().map_err(|_| Error::Msg("fused LSTM: state lock poisoned".into()))?;
        let saved = guard.as_ref().ok_or_else(|| Error::Msg("fused LSTM: backward before forward".into()))?;
        let (seq_len, batch, hidden) = (saved.seq_len, saved.batch, saved.hidden);
        let gate_width = 4 * hidden;
        let device = input.device();
        let mut w_hh_packed = PackedB::with_buffer(take_buffer(0));
        with_data(w_hh, |w| w_hh_packed.pack(gate_width, hidden, w, hidden, 1))?;
        self.products.prepare(&mut w_hh_packed);
        // With a token table the gradient for xs_proj stays inside (it is summed into the
        // table's), so it can live in a pooled buffer.
        let mut grad_xs = match self.token_ids {
            Some(_) => take_buffer(seq_len * batch * gate_width),
            None => vec![0.0f32; seq_len * batch * gate_width],
        };
        let vocab_len = input.dim(0)?;
        let mut table_grad = None;
        let mut grad_hc0 = vec![0.0f32; 2 * batch * hidden];
        let bounds = self.shares(batch);
        let isa = self.isa;
        with_data(hc0, |hc0| -> Result<()> {
            let c0 = &hc0[batch * hidden..];
            with_data(grad_ys, |grad_ys| {
                let (grad_h0, grad_c0) = grad_hc0.split_at_mut(batch * hidden);
                let mut h0_rest = grad_h0;
                let mut c0_rest = grad_c0;
                let grad_ys = split_rows_ref(grad_ys, batch, hidden, &bounds);
                let gates = split_rows_ref(&saved.gates, batch, gate_width, &bounds);
                let cells = split_rows_ref(&saved.cells, batch, hidden, &bounds);
                let tanh_cells = split_rows_ref(&saved.tanh_cells, batch, hidden, &bounds);
                let grad_xs_shares = split_rows(&mut grad_xs, batch, gate_width, &bounds);
                let mut id_shares = self
                    .token_ids
                    .as_ref()
                    .map(|ids| split_ids(ids, batch, self.rows_per_step, &bounds).into_iter());
                let mut shares = Vec::new();
                for (((((gy, g), c), tc), gx), w) in grad_ys
                    .into_iter()
                    .zip(gates)
                    .zip(cells)
                    .zip(tanh_cells)
                    .zip(grad_xs_shares)
                    .zip(bounds.windows(2))
                {
                    let n = (w[1] - w[0]) * hidden;
                    let (gh, rest) = std::mem::take(&mut h0_rest).split_at_mut(n);
                    h0_rest = rest;
                    let (gc, rest) = std::mem::take(&mut c0_rest).split_at_mut(n);
                    c0_rest = rest;
                    shares.push(BackwardShare {
                        hidden,
                        grad_ys: gy,
                        gates: g,
                        cells: c,
                        tanh_cells: tc,
                        c0: &c0[w[0] * hidden..w[1] * hidden],
                        grad_xs_proj: gx,
                        grad_h0: gh,
                        grad_c0: gc,
                        table_grad: id_shares
                            .as_mut()
                            .and_then(Iterator::next)
                            .map(|ids| (ids, vec![0.0f32; vocab_len * gate_width])),
                    });
                }
                let w_hh_packed = &w_hh_packed;
                on_candle_threads(&mut shares, |share| share.run(isa, w_hh_packed));
                let mut sums = shares.into_iter().filter_map(|share| share.table_grad.map(|(_, sum)| sum));
                table_grad = sums.next().map(|mut total| {
                    for other in sums {
                        total.iter_mut().zip(&other).for_each(|(t, o)| *t += o);
                    }
                    total
                });
            })
        })??;

        // dW_hh = Σ_t dxs_proj[t]ᵀ h[t-1]: one product over all steps and sequences, its rows
        // shared among the threads.
        let grad_w_hh = if w_hh.track_op() {
            let mut h_prev = PackedB::with_buffer(take_buffer(0));
            with_data(hc0, |hc0| {
                with_data(ys, |ys| {
                    let h0 = &hc0[..batch * hidden];
                    let earlier = &ys[..(seq_len - 1) * batch * hidden];
                    h_prev.pack_row_pieces(hidden, &[h0, earlier])
                })
            })??;
            self.products.prepare(&mut h_prev);
            let mut grad_w = vec![0.0f32; gate_width * hidden];
            let row_bounds = self.shares(gate_width);
            let mut rest: &mut [f32] = &mut grad_w;
            let mut parts = Vec::new();
            for w in row_bounds.windows(2) {
                let (part, tail) = rest.split_at_mut((w[1] - w[0]) * hidden);
                parts.push((w[0], w[1] - w[0], part));
                rest = tail;
            }
            let (grad_xs_ref, h_prev_ref) = (&grad_xs, &h_prev);
            on_candle_threads(&mut parts, |(row0, rows, part)| {
                let a = MatRef { data: &grad_xs_ref[*row0..], row_stride: 1, col_stride: gate_width };
                gemm(isa, *rows, a, h_prev_ref, part, hidden, false);
            });
            give_back(h_prev.into_buffer());
            Some(Tensor::from_vec(grad_w, (gate_width, hidden), device)?)
        } else {
            None
        };
        give_back(w_hh_packed.into_buffer());
        let grad_input = match table_grad {
            Some(sum) => {
                give_back(grad_xs);
                Tensor::from_vec(sum, (vocab_len, gate_width), device)?
            }
            None => Tensor::from_vec(grad_xs, (seq_len, batch, gate_width), device)?,
        };
        let grad_hc0 =
            if hc0.track_op() { Some(Tensor::from_vec(grad_hc0, (2, batch, hidden), device)?) } else { None };
        Ok((Some(grad_input), grad_w_hh, grad_hc0))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::rnn::{LSTMConfig, LSTMState, RNN};
    use candle_nn::{VarBuilder, VarMap};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::forward::SequenceForward;

    fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Worst difference of `a` and `b`, relative to the larger of 1 and `b`'s largest value.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap()) / max_abs(b).max(1.0)
    }

    /// One layer, random weights, inputs and starting state: candle-nn's stock `LSTM` against
    /// the fused recurrence (threads: `num_threads`), forward values and every gradient of the
    /// loss `Σ ys ⊙ R` (R random): weights, biases, inputs, h0 and c0. In f32 they agree to
    /// float rounding; in bfloat16 within its precision, and not exactly (so it ran).
    fn compare(seq_len: usize, batch: usize, input: usize, hidden: usize, num_threads: usize, seed: u64) {
        compare_products(seq_len, batch, input, hidden, num_threads, seed, Products::F32);
    }

    fn compare_products(
        seq_len: usize,
        batch: usize,
        input: usize,
        hidden: usize,
        num_threads: usize,
        seed: u64,
        products: Products,
    ) {
        let (value_tolerance, gradient_tolerance) = match products {
            Products::F32 => (1e-5, 1e-4),
            Products::Bf16 => (1e-2, 2e-2),
        };
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let stock = candle_nn::lstm(input, hidden, LSTMConfig::default(), vb).unwrap();
        for (name, var) in map.data().lock().unwrap().iter() {
            let fresh = random(&mut rng, var.dims(), 0.5);
            var.set(&fresh).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let get = |name: &str| map.data().lock().unwrap()[name].clone();
        let (w_ih, w_hh, b_ih, b_hh) =
            (get("weight_ih_l0"), get("weight_hh_l0"), get("bias_ih_l0"), get("bias_hh_l0"));
        let xs = Var::from_tensor(&random(&mut rng, &[batch, seq_len, input], 1.0)).unwrap();
        let h0 = Var::from_tensor(&random(&mut rng, &[batch, hidden], 0.8)).unwrap();
        let c0 = Var::from_tensor(&random(&mut rng, &[batch, hidden], 0.8)).unwrap();
        let weights = random(&mut rng, &[batch, seq_len, hidden], 1.0);

        let states =
            stock.seq_init(&xs, &LSTMState::new(h0.as_tensor().clone(), c0.as_tensor().clone())).unwrap();
        let stock_ys = stock.states_to_tensor(&states).unwrap();
        let stock_c = states.last().unwrap().c.clone();
        let stock_grads = (&stock_ys * &weights).unwrap().sum_all().unwrap().backward().unwrap();

        let xs_tm = xs.transpose(0, 1).unwrap().contiguous().unwrap();
        let flat = xs_tm.reshape((seq_len * batch, input)).unwrap();
        let bias = (b_ih.as_tensor() + b_hh.as_tensor()).unwrap();
        let xs_proj = flat.matmul(&w_ih.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let xs_proj = xs_proj.reshape((seq_len, batch, 4 * hidden)).unwrap();
        let op = Recurrence { num_threads, products, ..Recurrence::new() };
        let (ys, h, c) = recur_on(&xs_proj, &w_hh, &h0, &c0, op, seq_len, batch).unwrap();
        let ys = ys.transpose(0, 1).unwrap();
        let grads = (&ys * &weights).unwrap().sum_all().unwrap().backward().unwrap();

        let label = format!(
            "seq {seq_len} batch {batch} input {input} hidden {hidden} threads {num_threads} {products:?}"
        );
        assert!(rel_diff(&ys, &stock_ys) < value_tolerance, "{label}: ys");
        assert!(rel_diff(&h, &states.last().unwrap().h) < value_tolerance, "{label}: h");
        assert!(rel_diff(&c, &stock_c) < value_tolerance, "{label}: c");
        if products == Products::Bf16 {
            assert!(rel_diff(&ys, &stock_ys) > 1e-6, "{label}: no bfloat16 rounding to be seen");
        }
        for (name, var) in [
            ("w_ih", &w_ih),
            ("w_hh", &w_hh),
            ("b_ih", &b_ih),
            ("b_hh", &b_hh),
            ("xs", &xs),
            ("h0", &h0),
            ("c0", &c0),
        ] {
            let ours = grads.get(var).unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            let theirs = stock_grads.get(var).unwrap();
            let d = rel_diff(ours, theirs);
            assert!(d < gradient_tolerance, "{label}: gradient of {name} off by {d} (relative)");
        }
    }

    #[test]
    fn gradients_in_bfloat16_stay_close_to_candle_nn_stock_lstm() {
        if Bf16Unit::here().is_none() {
            eprintln!("skipped: no bfloat16 products here");
            return;
        }
        compare_products(9, 5, 6, 20, 2, 1, Products::Bf16);
        compare_products(12, 7, 44, 64, 2, 3, Products::Bf16);
    }

    #[test]
    fn gradients_match_candle_nn_stock_lstm() {
        // Hidden sizes off the kernels' panel width, batches that split unevenly.
        compare(9, 5, 6, 20, 2, 1);
        compare(4, 3, 44, 32, 1, 2);
        compare(12, 7, 10, 16, 3, 3);
        compare(1, 1, 3, 5, 2, 4);
    }

    /// A whole model (embedding or one-hot input, two layers, output layer) through
    /// `MelodyLstm`'s forward pass on the CPU (the fused path, tokens gathered inside the op)
    /// against the same network assembled from candle-nn's stock `Embedding` (or one-hot
    /// vectors), `LSTM` and `Linear` on the same variables: logits and the gradient of every
    /// weight of the mean cross-entropy.
    #[test]
    fn whole_model_gradients_match_candle_nn() {
        use candle_core::Module;
        use model::config::ModelConfig;
        use model::lstm::nll_and_argmax;
        use model::InputKind;
        use music::Vocab;

        let dev = Device::Cpu;
        for (seed, input) in [InputKind::Embedding { dim: 6 }, InputKind::OneHot].into_iter().enumerate() {
            let cfg = ModelConfig::new(Vocab::for_pitch_range(60, 72), input, 24, 2, 0.0);
            let vocab = cfg.vocab_len();
            let map = VarMap::new();
            let model = MelodyLstm::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &dev)).unwrap();
            assert!(applies_to(&model));
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let embedding = match input {
                InputKind::Embedding { dim } => {
                    Some(candle_nn::embedding(vocab, dim, vb.pp("embedding")).unwrap())
                }
                InputKind::OneHot => None,
            };
            let layers: Vec<_> = (0..2)
                .map(|k| {
                    let width = if k == 0 { input.width(vocab) } else { 24 };
                    let layer_cfg = LSTMConfig { layer_idx: k, ..Default::default() };
                    candle_nn::lstm(width, 24, layer_cfg, vb.pp("lstm")).unwrap()
                })
                .collect();
            let head = candle_nn::linear(24, vocab, vb.pp("head")).unwrap();
            assert_eq!(map.all_vars().len(), model.named_tensors().len(), "one set of variables");

            let mut rng = ChaCha8Rng::seed_from_u64(11 + seed as u64);
            let (batch, seq_len) = (5, 9);
            let ids: Vec<u32> =
                (0..batch * (seq_len + 1)).map(|_| rng.random_range(0..vocab as u32)).collect();
            let all = Tensor::from_vec(ids, (batch, seq_len + 1), &dev).unwrap();
            let inputs = all.narrow(1, 0, seq_len).unwrap().contiguous().unwrap();
            let targets = all.narrow(1, 1, seq_len).unwrap().flatten_all().unwrap();

            let mut xs = match &embedding {
                Some(e) => e.forward(&inputs).unwrap(),
                None => {
                    let eye = Tensor::eye(vocab, DType::F32, &dev).unwrap();
                    let rows = eye.index_select(&inputs.flatten_all().unwrap(), 0).unwrap();
                    rows.reshape((batch, seq_len, vocab)).unwrap()
                }
            };
            for layer in &layers {
                xs = layer.states_to_tensor(&layer.seq(&xs).unwrap()).unwrap();
            }
            let stock_logits = head.forward(&xs).unwrap();
            let loss = |logits: &Tensor| {
                let (nll, _) = nll_and_argmax(&logits.reshape(((), vocab)).unwrap(), &targets).unwrap();
                nll.mean_all().unwrap()
            };
            let stock_grads = loss(&stock_logits).backward().unwrap();
            let (logits, _) = model.forward(&inputs, None, None, None).unwrap();
            let grads = loss(&logits).backward().unwrap();

            assert!(rel_diff(&logits, &stock_logits) < 1e-5, "{input:?}: logits");
            for (name, var) in map.data().lock().unwrap().iter() {
                let d = rel_diff(grads.get(var).unwrap(), stock_grads.get(var).unwrap());
                assert!(d < 1e-4, "{input:?}: gradient of {name} off by {d} (relative)");
            }
        }
    }

    /// A model with bar positions, lookback and repeats through the fused op (token and side
    /// rows summed inside it) against the per-step candle graph that runs off the CPU: outputs
    /// and the gradient of every weight, the side tables' included, with all bar inputs given,
    /// with positions only, and with none.
    #[test]
    fn bar_inputs_match_the_per_step_graph() {
        use model::config::ModelConfig;
        use model::lstm::{nll_and_argmax, BAR_NUMBER_TABLE, BAR_TABLE, LOOKBACK_TABLE, REPEAT_TABLE};
        use model::InputKind;
        use music::{bar, Vocab};

        let dev = Device::Cpu;
        let mut cfg =
            ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 6 }, 20, 2, 0.0);
        cfg.bar_meters = bar::COMMON_METERS.to_vec();
        cfg.bar_lookback = 2;
        cfg.repeat_classes = 1;
        cfg.bar_numbers = 3;
        let (vocab, num_bars) = (cfg.vocab_len(), cfg.num_bar_positions());
        let map = VarMap::new();
        let model = MelodyLstm::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &dev)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let random = |rng: &mut ChaCha8Rng, n: usize| {
            (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect::<Vec<_>>()
        };
        for (name, rows) in [
            (BAR_TABLE, num_bars),
            (LOOKBACK_TABLE, 2 * (vocab + 1)),
            (REPEAT_TABLE, vocab + 1),
            (BAR_NUMBER_TABLE, cfg.num_bar_number_rows()),
        ] {
            let table = Tensor::from_vec(random(&mut rng, rows * 80), (rows, 80), &dev).unwrap();
            map.data().lock().unwrap()[name].set(&table).unwrap();
        }

        let (batch, seq_len) = (3, 7);
        let ids: Vec<u32> = (0..batch * (seq_len + 1)).map(|_| rng.random_range(0..vocab as u32)).collect();
        let all = Tensor::from_vec(ids, (seq_len + 1, batch), &dev).unwrap();
        let inputs = all.narrow(0, 0, seq_len).unwrap().contiguous().unwrap();
        let targets = all.narrow(0, 1, seq_len).unwrap().flatten_all().unwrap();
        // Per step: a bar position, the tokens one and two bars back, a repeated token
        // (`vocab`: none) and the row of a bar number.
        let number_rows = cfg.num_bar_number_rows() as u32;
        let bar_inputs: Vec<u32> = (0..batch * seq_len)
            .flat_map(|_| {
                let position = rng.random_range(0..num_bars as u32);
                let number = rng.random_range(0..number_rows);
                let mut token = || rng.random_range(0..=vocab as u32);
                [position, token(), token(), token(), number]
            })
            .collect();
        let bars = Tensor::from_vec(bar_inputs, (seq_len, batch, 5), &dev).unwrap();
        let positions_only = bars.narrow(2, 0, 1).unwrap().squeeze(2).unwrap().contiguous().unwrap();
        let loss = |ys: &Tensor| {
            let logits = model.head(ys).unwrap().reshape(((), vocab)).unwrap();
            nll_and_argmax(&logits, &targets).unwrap().0.mean_all().unwrap()
        };
        for given in [Some(&bars), Some(&positions_only), None] {
            let (fused_ys, _) =
                lstm_outputs(&model, &inputs, given, None, None, false, Products::F32).unwrap();
            let (graph_ys, _) = model.lstm_outputs(&inputs, given, None, None).unwrap();
            let graph_ys = Tensor::stack(&graph_ys, 0).unwrap();
            assert!(rel_diff(&fused_ys, &graph_ys) < 1e-5, "bars {}: outputs", given.is_some());
            let (fused_grads, graph_grads) =
                (loss(&fused_ys).backward().unwrap(), loss(&graph_ys).backward().unwrap());
            for (name, var) in map.data().lock().unwrap().iter() {
                let d = rel_diff(fused_grads.get(var).unwrap(), graph_grads.get(var).unwrap());
                assert!(d < 1e-4, "bars {}: gradient of {name} off by {d} (relative)", given.is_some());
            }
        }
        // The bar inputs matter: leaving the lookback out, or everything, gives other outputs.
        let (all, _) = lstm_outputs(&model, &inputs, Some(&bars), None, None, false, Products::F32).unwrap();
        let (positions, _) =
            lstm_outputs(&model, &inputs, Some(&positions_only), None, None, false, Products::F32).unwrap();
        let (nothing, _) = lstm_outputs(&model, &inputs, None, None, None, false, Products::F32).unwrap();
        assert!(rel_diff(&all, &positions) > 1e-3 && rel_diff(&positions, &nothing) > 1e-3);
    }

    /// Training regularisation through the fused op against the per-step graph, from the same
    /// seed: per-element, locked (one mask per layer, every step) and DropConnect on the
    /// recurrent weights each draw the same masks in both, so outputs and gradients agree; and
    /// each kind changes the outputs.
    #[test]
    fn dropout_kinds_match_the_per_step_graph() {
        use model::config::ModelConfig;
        use model::lstm::{nll_and_argmax, Dropout};
        use model::InputKind;
        use music::Vocab;

        let dev = Device::Cpu;
        let cfg =
            ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 6 }, 20, 2, 0.3);
        let vocab = cfg.vocab_len();
        let map = VarMap::new();
        let model = MelodyLstm::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &dev)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (batch, seq_len) = (3, 7);
        let ids: Vec<u32> = (0..batch * (seq_len + 1)).map(|_| rng.random_range(0..vocab as u32)).collect();
        let all = Tensor::from_vec(ids, (seq_len + 1, batch), &dev).unwrap();
        let inputs = all.narrow(0, 0, seq_len).unwrap().contiguous().unwrap();
        let targets = all.narrow(0, 1, seq_len).unwrap().flatten_all().unwrap();
        let loss = |ys: &Tensor| {
            let logits = model.head(ys).unwrap().reshape(((), vocab)).unwrap();
            nll_and_argmax(&logits, &targets).unwrap().0.mean_all().unwrap()
        };
        let (plain, _) = lstm_outputs(&model, &inputs, None, None, None, false, Products::F32).unwrap();
        let kinds = [(false, 0.0), (true, 0.0), (false, 0.4), (true, 0.4)];
        let mut seen: Vec<Tensor> = Vec::new();
        for (locked, weight_drop) in kinds {
            let dropout = || Dropout::new(0.3, 17).locked(locked).weight_drop(weight_drop);
            let (fused_ys, _) =
                lstm_outputs(&model, &inputs, None, None, Some(&mut dropout()), false, Products::F32)
                    .unwrap();
            let (graph_ys, _) = model.lstm_outputs(&inputs, None, None, Some(&mut dropout())).unwrap();
            let graph_ys = Tensor::stack(&graph_ys, 0).unwrap();
            let what = format!("locked {locked}, weight drop {weight_drop}");
            assert!(rel_diff(&fused_ys, &graph_ys) < 1e-5, "{what}: outputs");
            let (fused_grads, graph_grads) =
                (loss(&fused_ys).backward().unwrap(), loss(&graph_ys).backward().unwrap());
            for (name, var) in map.data().lock().unwrap().iter() {
                let d = rel_diff(fused_grads.get(var).unwrap(), graph_grads.get(var).unwrap());
                assert!(d < 1e-4, "{what}: gradient of {name} off by {d} (relative)");
            }
            assert!(rel_diff(&fused_ys, &plain) > 1e-2, "{what}: dropout changed nothing");
            for other in &seen {
                assert!(rel_diff(&fused_ys, other) > 1e-3, "{what}: the same as another kind");
            }
            seen.push(fused_ys);
        }
        // A locked mask is the same at every step: a unit dropped once stays dropped.
        let ones = Tensor::ones((seq_len, batch, 20), DType::F32, &dev).unwrap();
        let masked = Dropout::new(0.5, 3).locked(true).apply_sequence(&ones).unwrap();
        let first = masked.get(0).unwrap();
        for t in 1..seq_len {
            assert_eq!(rel_diff(&masked.get(t).unwrap(), &first), 0.0);
        }
        let zeros = first.eq(0.0).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap();
        assert!(zeros.to_scalar::<f32>().unwrap() > 0.0);
    }

    /// `linear` against candle's `matmul` + `broadcast_add`: values and the gradients of all
    /// three inputs, at sizes off the kernels' panel and tile widths; in bfloat16 too where the
    /// CPU multiplies it, within its precision.
    #[test]
    fn linear_matches_candle() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut runs = vec![Products::F32];
        if Bf16Unit::here().is_some() {
            runs.push(Products::Bf16);
        }
        let sizes = [(37, 20, 52), (5, 256, 1024), (1, 3, 1)];
        for (products, &(n, input, output)) in runs.iter().flat_map(|&p| sizes.iter().map(move |s| (p, s))) {
            let tolerance = if products == Products::F32 { 1e-5 } else { 2e-2 };
            let xs = Var::from_tensor(&random(&mut rng, &[n, input], 1.0)).unwrap();
            let w = Var::from_tensor(&random(&mut rng, &[output, input], 0.3)).unwrap();
            let b = Var::from_tensor(&random(&mut rng, &[output], 0.3)).unwrap();
            let r = random(&mut rng, &[n, output], 1.0);
            let want = xs.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let want_grads = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let got = linear(&xs, &w, &b, products).unwrap();
            let grads = (&got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(rel_diff(&got, &want) < tolerance, "{n}x{input}x{output} {products:?}: values");
            for (name, var) in [("xs", &xs), ("w", &w), ("b", &b)] {
                let d = rel_diff(grads.get(var).unwrap(), want_grads.get(var).unwrap());
                assert!(d < tolerance, "{n}x{input}x{output} {products:?}: gradient of {name} off by {d}");
            }
        }
        let bad = linear(
            &random(&mut rng, &[2, 3], 1.0),
            &random(&mut rng, &[4, 5], 1.0),
            &random(&mut rng, &[4], 1.0),
            Products::F32,
        );
        assert!(bad.is_err());
    }

    #[test]
    fn token_tables_refuse_tokens_outside_them() {
        let dev = Device::Cpu;
        let table = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((8, 2), DType::F32, &dev).unwrap();
        let h = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        let ok = Tensor::from_slice(&[0u32, 2, 1, 1], (2, 2), &dev).unwrap();
        assert!(recur_tokens(&table, &ok, &w, &h, &h, Products::F32).is_ok());
        let bad = Tensor::from_slice(&[0u32, 3, 1, 1], (2, 2), &dev).unwrap();
        assert!(recur_tokens(&table, &bad, &w, &h, &h, Products::F32).is_err());
    }

    #[test]
    fn applies_only_to_f32_with_steps() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((8, 2), DType::F32, &dev).unwrap();
        assert!(applies(&Tensor::zeros((3, 1, 8), DType::F32, &dev).unwrap(), &w));
        assert!(!applies(&Tensor::zeros((0, 1, 8), DType::F32, &dev).unwrap(), &w));
        assert!(!applies(&Tensor::zeros((3, 1, 8), DType::F64, &dev).unwrap(), &w));
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((3, 2, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((8, 3), DType::F32, &dev).unwrap();
        let h = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        assert!(recur(&xs, &w, &h, &h, Products::F32).is_err());
    }
}
