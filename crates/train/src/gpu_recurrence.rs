//! The recurrence of one LSTM layer over a whole batch of sequences on a CUDA GPU: the GPU
//! counterpart of `fused`'s CPU op, one candle custom op with its backward pass written by hand.
//! Each step is one cuBLAS product and one kernel for the cell, forward and backward, where
//! candle's per-step graph launches about fifteen kernels a step forward and more backward, each
//! with an allocation. The input projections, the output layer and the loss stay candle ops.
//! Runs on: offline threads (training, evaluation), which queue the work on the GPU's stream.
//!
//! The launches are written once, as a plan over buffers named by role (`forward`, `backward`
//! over a `Launches`). The CUDA implementation (feature `cuda`) runs the plan on the GPU; the
//! tests run the same plan on the CPU, with a column-major reference product and the cell's
//! formulas, against `fused`'s op, so the plan's matrix layouts and offsets are checked on
//! machines without a GPU. The formulas are `fused`'s (its header writes them out).

use candle_core::Result;

/// The numbers the plan reads and writes, by role: f32, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Buf {
    /// `[4 hidden, hidden]`, the recurrent weights.
    WHh,
    /// `[seq, batch, 4 hidden]`: the gates' pre-activations (the input projection on entry,
    /// each step's recurrent product added), replaced by their activations `σ(i) σ(f) tanh(g) σ(o)`.
    Gates,
    /// `[seq + 1, batch, hidden]`: h0, then `h` after each step. Its first `seq` blocks are every
    /// step's previous `h`, which `dW_hh` multiplies.
    Hs,
    /// `[seq + 1, batch, hidden]`: c0, then `c` after each step.
    Cs,
    /// `[seq, batch, hidden]`: `tanh c` after each step.
    TanhCs,
    /// `[seq, batch, hidden]`: the loss's gradient for each step's output.
    GradYs,
    /// `[seq, batch, 4 hidden]`: the gradient for each step's gate pre-activations, which is the
    /// gradient for the input projection.
    GradGates,
    /// `[2, batch, hidden]`: the gradients for `h` and `c` flowing back from the step after;
    /// after the first step, the gradients for h0 and c0.
    GradState,
    /// `[4 hidden, hidden]`.
    GradWHh,
}

/// How many kinds of `Buf` there are (the last one's index, plus one).
const BUFFERS: usize = Buf::GradWHh as usize + 1;

/// A place in a buffer: the buffer, and the index of the first number.
#[derive(Clone, Copy, Debug)]
struct At(Buf, usize);

/// A matrix product as cuBLAS's `sgemm` takes it, column-major: `C = op(A) op(B)`, plus `C` when
/// `accumulate`, with `op(A)` `m × k`, `op(B)` `k × n` and `C` `m × n`. A row-major matrix is
/// its transpose to a column-major reader, which is how every product below is set up.
#[derive(Clone, Copy, Debug)]
struct Product {
    a_transposed: bool,
    b_transposed: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    accumulate: bool,
}

/// The sizes of one run of the recurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Steps {
    seq_len: usize,
    batch: usize,
    hidden: usize,
}

impl Steps {
    /// Numbers in one step's `[batch, hidden]` block.
    fn block(self) -> usize {
        self.batch * self.hidden
    }

    /// Numbers in one step's `[batch, 4 hidden]` block of gates.
    fn gate_block(self) -> usize {
        4 * self.block()
    }
}

/// What the plan asks of a device.
trait Launches {
    /// `c = op(a) op(b) (+ c)`.
    fn product(&mut self, p: Product, a: At, b: At, c: At) -> Result<()>;

    /// One step's cell forward on `[batch, hidden]` units: the gate pre-activations in, their
    /// activations out (in place), the new cell, its tanh and the output.
    fn cell_forward(&mut self, steps: Steps, gates: At, c_prev: At, c: At, tanh_c: At, h: At) -> Result<()>;

    /// One step's cell backward: from the kept activations, the step's output gradient and the
    /// gradients from the step after (`state`: h's over c's), the gate gradients; c's gradient
    /// is replaced by the one for the step before, in place.
    #[allow(clippy::too_many_arguments)]
    fn cell_backward(
        &mut self,
        steps: Steps,
        gates: At,
        grad_y: At,
        tanh_c: At,
        c_prev: At,
        state: At,
        grad_gates: At,
    ) -> Result<()>;
}

/// The forward pass over every step. On entry `Gates` holds the input projection and the first
/// blocks of `Hs` and `Cs` hold h0 and c0; on return `Hs` and `Cs` hold every step's state,
/// `Gates` the activations and `TanhCs` the tanh of every cell.
fn forward(launches: &mut impl Launches, steps: Steps) -> Result<()> {
    let (hidden, gate_width) = (steps.hidden, 4 * steps.hidden);
    // gates[t] += h[t-1] W_hhᵀ, read column-major: gates[t]ᵀ (4 hidden × batch) += W_hh · h[t-1]ᵀ,
    // where W_hh's row-major storage reads as W_hhᵀ, so it is transposed back.
    let recurrent = Product {
        a_transposed: true,
        b_transposed: false,
        m: gate_width,
        n: steps.batch,
        k: hidden,
        lda: hidden,
        ldb: hidden,
        ldc: gate_width,
        accumulate: true,
    };
    for t in 0..steps.seq_len {
        let (gates, h_prev, h) = (t * steps.gate_block(), t * steps.block(), (t + 1) * steps.block());
        launches.product(recurrent, At(Buf::WHh, 0), At(Buf::Hs, h_prev), At(Buf::Gates, gates))?;
        launches.cell_forward(
            steps,
            At(Buf::Gates, gates),
            At(Buf::Cs, h_prev),
            At(Buf::Cs, h),
            At(Buf::TanhCs, h_prev),
            At(Buf::Hs, h),
        )?;
    }
    Ok(())
}

/// The backward pass through every step, in reverse, after `forward`. `GradState` starts at
/// zero and ends as the gradients for h0 over c0; `GradGates` ends as the gradient for the
/// input projection, and `GradWHh` (when `weights` asks for it) as the recurrent weights'.
fn backward(launches: &mut impl Launches, steps: Steps, weights: bool) -> Result<()> {
    let (hidden, gate_width) = (steps.hidden, 4 * steps.hidden);
    // dh[t-1] = d_gates[t] W_hh, read column-major: dh[t-1]ᵀ (hidden × batch) = W_hhᵀ ·
    // d_gates[t]ᵀ, and W_hh's storage already reads as W_hhᵀ.
    let into_h = Product {
        a_transposed: false,
        b_transposed: false,
        m: hidden,
        n: steps.batch,
        k: gate_width,
        lda: hidden,
        ldb: gate_width,
        ldc: hidden,
        accumulate: false,
    };
    for t in (0..steps.seq_len).rev() {
        let (gates, block) = (t * steps.gate_block(), t * steps.block());
        launches.cell_backward(
            steps,
            At(Buf::Gates, gates),
            At(Buf::GradYs, block),
            At(Buf::TanhCs, block),
            At(Buf::Cs, block),
            At(Buf::GradState, 0),
            At(Buf::GradGates, gates),
        )?;
        launches.product(into_h, At(Buf::WHh, 0), At(Buf::GradGates, gates), At(Buf::GradState, 0))?;
    }
    if weights {
        // dW_hh = Σ_t d_gates[t]ᵀ h[t-1], every step and sequence in one product. Read
        // column-major: dW_hhᵀ (hidden × 4 hidden) = H_prevᵀ · D, with H_prev the first `seq`
        // blocks of `Hs` (reading as H_prevᵀ) and D the gate gradients (reading as Dᵀ).
        let rows = steps.seq_len * steps.batch;
        let weights = Product {
            a_transposed: false,
            b_transposed: true,
            m: hidden,
            n: gate_width,
            k: rows,
            lda: hidden,
            ldb: gate_width,
            ldc: hidden,
            accumulate: false,
        };
        launches.product(weights, At(Buf::Hs, 0), At(Buf::GradGates, 0), At(Buf::GradWHh, 0))?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub use on_cuda::recur;

#[cfg(feature = "cuda")]
mod on_cuda {
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result::sgemm, sys::cublasOperation_t};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::op::BackpropOp;
    use candle_core::{
        CpuStorage, CudaDevice, CudaStorage, CustomOp3, Error, Layout, Result, Shape, Storage, Tensor,
    };

    use super::{At, Buf, Launches, Product, Steps, BUFFERS};

    /// The cell kernels, one thread per unit of a `[batch, hidden]` block, compiled by NVRTC the
    /// first time a process needs them. Their formulas are the CPU op's (`fused`).
    const CELL_KERNELS: &str = r#"
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void lstm_cell_forward(float* gates, const float* c_prev, float* c,
                                             float* tanh_c, float* h, int batch, int hidden) {
    int unit = blockIdx.x * blockDim.x + threadIdx.x;
    if (unit >= batch * hidden) return;
    int row = unit / hidden;
    float* g = gates + (long long)row * 4 * hidden + (unit - row * hidden);
    float i = sigmoid(g[0]);
    float f = sigmoid(g[hidden]);
    float cand = tanhf(g[2 * hidden]);
    float o = sigmoid(g[3 * hidden]);
    float c_new = f * c_prev[unit] + i * cand;
    float t = tanhf(c_new);
    g[0] = i;
    g[hidden] = f;
    g[2 * hidden] = cand;
    g[3 * hidden] = o;
    c[unit] = c_new;
    tanh_c[unit] = t;
    h[unit] = o * t;
}

extern "C" __global__ void lstm_cell_backward(const float* gates, const float* grad_y,
                                              const float* tanh_c, const float* c_prev,
                                              float* state, float* grad_gates, int batch,
                                              int hidden) {
    int unit = blockIdx.x * blockDim.x + threadIdx.x;
    int block = batch * hidden;
    if (unit >= block) return;
    int row = unit / hidden;
    long long gate = (long long)row * 4 * hidden + (unit - row * hidden);
    const float* g = gates + gate;
    float* d = grad_gates + gate;
    float i = g[0], f = g[hidden], cand = g[2 * hidden], o = g[3 * hidden], t = tanh_c[unit];
    float dh = grad_y[unit] + state[unit];
    float dc = state[block + unit] + dh * o * (1.0f - t * t);
    d[0] = dc * cand * i * (1.0f - i);
    d[hidden] = dc * c_prev[unit] * f * (1.0f - f);
    d[2 * hidden] = dc * i * (1.0f - cand * cand);
    d[3 * hidden] = dh * t * o * (1.0f - o);
    state[block + unit] = dc * f;
}
"#;

    /// The module name the kernels are loaded under, once per device.
    const MODULE: &str = "antiphon_lstm_cell";
    /// Threads per block of the cell kernels.
    const THREADS: u32 = 256;

    /// The kernels' PTX, compiled once per process (or why NVRTC refused them).
    pub(super) fn cell_ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        model::compute::ptx_once(&PTX, CELL_KERNELS, "GPU LSTM: the cell kernels")
    }

    /// The recurrence on the GPU, the same function as `fused::recur` (which checks the shapes
    /// and sends CUDA tensors here). xs_proj: `[seq, batch, 4 hidden]`, w_hh: `[4 hidden,
    /// hidden]`, h0 and c0: `[batch, hidden]` → (ys `[seq, batch, hidden]`, h and c after the
    /// last step). Gradients flow to `xs_proj`, `w_hh`, `h0` and `c0` through `ys`.
    pub fn recur(
        xs_proj: &Tensor,
        w_hh: &Tensor,
        h0: &Tensor,
        c0: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (seq_len, batch, gate_width) = xs_proj.dims3()?;
        let steps = Steps { seq_len, batch, hidden: gate_width / 4 };
        let saved = Arc::new(Mutex::new(None));
        let op = Recurrence { steps, saved: saved.clone() };
        let hc0 = Tensor::stack(&[h0, c0], 0)?.contiguous()?;
        let ys = xs_proj.contiguous()?.apply_op3(&w_hh.contiguous()?, &hc0, op)?;
        let h_last = ys.get(seq_len - 1)?;
        let c_last = {
            let guard = lock(&saved)?;
            let kept = guard.as_ref().ok_or_else(|| Error::Msg("GPU LSTM: forward kept no state".into()))?;
            let mut last = kept.device.alloc_zeros::<f32>(steps.block())?;
            kept.device.memcpy_dtod(&kept.cs.slice(seq_len * steps.block()..), &mut last)?;
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(last, kept.device.clone()));
            Tensor::from_storage(storage, (batch, steps.hidden), BackpropOp::none(), false)
        };
        Ok((ys, h_last, c_last))
    }

    fn lock(saved: &Mutex<Option<Saved>>) -> Result<std::sync::MutexGuard<'_, Option<Saved>>> {
        saved.lock().map_err(|_| Error::Msg("GPU LSTM: state lock poisoned".into()))
    }

    /// What the forward pass keeps on the GPU for the backward pass (`Buf` says each shape).
    struct Saved {
        device: CudaDevice,
        gates: CudaSlice<f32>,
        hs: CudaSlice<f32>,
        cs: CudaSlice<f32>,
        tanh_cs: CudaSlice<f32>,
    }

    /// The custom op. Inputs: xs_proj `[seq, batch, 4 hidden]`, w_hh `[4 hidden, hidden]`, hc0
    /// `[2, batch, hidden]` (h0 over c0); output: ys `[seq, batch, hidden]`.
    struct Recurrence {
        steps: Steps,
        saved: Arc<Mutex<Option<Saved>>>,
    }

    /// The contiguous f32 numbers of a CUDA storage under `layout`.
    fn view<'a>(
        storage: &'a CudaStorage,
        layout: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| Error::Msg("GPU LSTM: input not contiguous".into()))?;
        Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
    }

    /// A tensor's CUDA storage, or an error naming `what`.
    fn cuda_storage<'a>(storage: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
        match storage {
            Storage::Cuda(s) => Ok(s),
            _ => Err(Error::Msg(format!("GPU LSTM: {what} is not on the GPU"))),
        }
    }

    /// Runs the plan's launches on one CUDA device, on the buffers' raw addresses (the plan
    /// reads and writes parts of one buffer in one launch, which borrowed slices cannot say).
    struct CudaLaunches<'a> {
        device: &'a CudaDevice,
        /// Each `Buf`'s address, by `Buf as usize` (0 where the run has no such buffer).
        addresses: [u64; BUFFERS],
    }

    impl CudaLaunches<'_> {
        /// The device address of `at`, or an error for a buffer this run does not have.
        fn address(&self, at: At) -> Result<u64> {
            match self.addresses[at.0 as usize] {
                0 => Err(Error::Msg(format!("GPU LSTM: no {:?} buffer in this pass", at.0))),
                base => Ok(base + (at.1 * std::mem::size_of::<f32>()) as u64),
            }
        }

        /// Runs a cell kernel over one step's units, its pointer parameters at `places`.
        fn launch(&self, kernel: &str, steps: Steps, places: &[At]) -> Result<()> {
            let addresses = places.iter().map(|&at| self.address(at)).collect::<Result<Vec<u64>>>()?;
            let function = self.device.get_or_load_custom_func(kernel, MODULE, cell_ptx()?)?;
            let units = steps.block();
            let (batch, hidden) = (steps.batch as i32, steps.hidden as i32);
            let mut args = function.builder();
            for address in &addresses {
                args.arg(address);
            }
            args.arg(&batch).arg(&hidden);
            let config = LaunchConfig {
                grid_dim: ((units as u32).div_ceil(THREADS), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel's parameters are the addresses above and two ints, as declared
            // in `CELL_KERNELS`; every address is a live buffer of this run, sized by `Buf`'s
            // shapes for `steps`, and each thread touches only its unit's numbers.
            unsafe { args.launch(config) }.map_err(|e| Error::Msg(format!("GPU LSTM: {kernel}: {e}")))?;
            Ok(())
        }
    }

    impl Launches for CudaLaunches<'_> {
        fn product(&mut self, p: Product, a: At, b: At, c: At) -> Result<()> {
            let op = |transposed| match transposed {
                true => cublasOperation_t::CUBLAS_OP_T,
                false => cublasOperation_t::CUBLAS_OP_N,
            };
            let (alpha, beta) = (1.0f32, if p.accumulate { 1.0f32 } else { 0.0 });
            let int =
                |n: usize| i32::try_from(n).map_err(|_| Error::Msg("GPU LSTM: a matrix too large".into()));
            let blas = self.device.cublas_handle();
            // SAFETY: the addresses are live buffers of this run on the stream cuBLAS's handle
            // uses, and `forward` and `backward` size every product within them.
            unsafe {
                sgemm(
                    *blas.handle(),
                    op(p.a_transposed),
                    op(p.b_transposed),
                    int(p.m)?,
                    int(p.n)?,
                    int(p.k)?,
                    &alpha,
                    self.address(a)? as *const f32,
                    int(p.lda)?,
                    self.address(b)? as *const f32,
                    int(p.ldb)?,
                    &beta,
                    self.address(c)? as *mut f32,
                    int(p.ldc)?,
                )
            }
            .map_err(|e| Error::Msg(format!("GPU LSTM: a cuBLAS product failed: {e:?}")))
        }

        fn cell_forward(
            &mut self,
            steps: Steps,
            gates: At,
            c_prev: At,
            c: At,
            tanh_c: At,
            h: At,
        ) -> Result<()> {
            self.launch("lstm_cell_forward", steps, &[gates, c_prev, c, tanh_c, h])
        }

        fn cell_backward(
            &mut self,
            steps: Steps,
            gates: At,
            grad_y: At,
            tanh_c: At,
            c_prev: At,
            state: At,
            grad_gates: At,
        ) -> Result<()> {
            self.launch("lstm_cell_backward", steps, &[gates, grad_y, tanh_c, c_prev, state, grad_gates])
        }
    }

    impl CustomOp3 for Recurrence {
        fn name(&self) -> &'static str {
            "gpu-lstm-recurrence"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            Err(Error::Msg("GPU LSTM: the inputs are on the CPU; `fused` runs them there".into()))
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let steps = self.steps;
            let device = s1.device().clone();
            let stream = device.cuda_stream();
            let block = steps.block();
            let (xs_proj, w_hh, hc0) = (view(s1, l1)?, view(s2, l2)?, view(s3, l3)?);
            let mut gates = device.alloc_zeros::<f32>(steps.seq_len * steps.gate_block())?;
            device.memcpy_dtod(&xs_proj, &mut gates)?;
            let mut hs = device.alloc_zeros::<f32>((steps.seq_len + 1) * block)?;
            let mut cs = device.alloc_zeros::<f32>((steps.seq_len + 1) * block)?;
            device.memcpy_dtod(&hc0.slice(..block), &mut hs.slice_mut(..block))?;
            device.memcpy_dtod(&hc0.slice(block..), &mut cs.slice_mut(..block))?;
            let mut tanh_cs = device.alloc_zeros::<f32>(steps.seq_len * block)?;
            {
                let (w_hh_address, _w_hh_sync) = w_hh.device_ptr(&stream);
                let (gates_address, _gates_sync) = gates.device_ptr_mut(&stream);
                let (hs_address, _hs_sync) = hs.device_ptr_mut(&stream);
                let (cs_address, _cs_sync) = cs.device_ptr_mut(&stream);
                let (tanh_address, _tanh_sync) = tanh_cs.device_ptr_mut(&stream);
                let mut addresses = [0u64; BUFFERS];
                addresses[Buf::WHh as usize] = w_hh_address;
                addresses[Buf::Gates as usize] = gates_address;
                addresses[Buf::Hs as usize] = hs_address;
                addresses[Buf::Cs as usize] = cs_address;
                addresses[Buf::TanhCs as usize] = tanh_address;
                super::forward(&mut CudaLaunches { device: &device, addresses }, steps)?;
            }
            let mut ys = device.alloc_zeros::<f32>(steps.seq_len * block)?;
            device.memcpy_dtod(&hs.slice(block..), &mut ys)?;
            *lock(&self.saved)? = Some(Saved { device: device.clone(), gates, hs, cs, tanh_cs });
            Ok((
                CudaStorage::wrap_cuda_slice(ys, device),
                Shape::from((steps.seq_len, steps.batch, steps.hidden)),
            ))
        }

        fn bwd(
            &self,
            _xs_proj: &Tensor,
            w_hh: &Tensor,
            hc0: &Tensor,
            _ys: &Tensor,
            grad_ys: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let steps = self.steps;
            let guard = lock(&self.saved)?;
            let kept =
                guard.as_ref().ok_or_else(|| Error::Msg("GPU LSTM: backward before forward".into()))?;
            let device = &kept.device;
            let stream = device.cuda_stream();
            let grad_ys = grad_ys.contiguous()?;
            let (grad_ys_storage, grad_ys_layout) = grad_ys.storage_and_layout();
            let grad_ys = view(cuda_storage(&grad_ys_storage, "the output gradient")?, grad_ys_layout)?;
            let weights = w_hh.track_op();
            let (w_hh_storage, w_hh_layout) = w_hh.storage_and_layout();
            let w_hh = view(cuda_storage(&w_hh_storage, "W_hh")?, w_hh_layout)?;
            let mut grad_gates = device.alloc_zeros::<f32>(steps.seq_len * steps.gate_block())?;
            let mut grad_state = device.alloc_zeros::<f32>(2 * steps.block())?;
            let mut grad_w_hh =
                device.alloc_zeros::<f32>(if weights { 4 * steps.hidden * steps.hidden } else { 1 })?;
            {
                let (w_hh_address, _w_hh_sync) = w_hh.device_ptr(&stream);
                let (gates_address, _gates_sync) = kept.gates.device_ptr(&stream);
                let (hs_address, _hs_sync) = kept.hs.device_ptr(&stream);
                let (cs_address, _cs_sync) = kept.cs.device_ptr(&stream);
                let (tanh_address, _tanh_sync) = kept.tanh_cs.device_ptr(&stream);
                let (grad_ys_address, _grad_ys_sync) = grad_ys.device_ptr(&stream);
                let (grad_gates_address, _grad_gates_sync) = grad_gates.device_ptr_mut(&stream);
                let (grad_state_address, _grad_state_sync) = grad_state.device_ptr_mut(&stream);
                let (grad_w_address, _grad_w_sync) = grad_w_hh.device_ptr_mut(&stream);
                let mut addresses = [0u64; BUFFERS];
                addresses[Buf::WHh as usize] = w_hh_address;
                addresses[Buf::Gates as usize] = gates_address;
                addresses[Buf::Hs as usize] = hs_address;
                addresses[Buf::Cs as usize] = cs_address;
                addresses[Buf::TanhCs as usize] = tanh_address;
                addresses[Buf::GradYs as usize] = grad_ys_address;
                addresses[Buf::GradGates as usize] = grad_gates_address;
                addresses[Buf::GradState as usize] = grad_state_address;
                addresses[Buf::GradWHh as usize] = grad_w_address;
                super::backward(&mut CudaLaunches { device, addresses }, steps, weights)?;
            }
            let tensor = |slice: CudaSlice<f32>, shape: Shape| {
                let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
                Tensor::from_storage(storage, shape, BackpropOp::none(), false)
            };
            let grad_input = tensor(grad_gates, Shape::from((steps.seq_len, steps.batch, 4 * steps.hidden)));
            let grad_w_hh = weights.then(|| tensor(grad_w_hh, Shape::from((4 * steps.hidden, steps.hidden))));
            let grad_hc0 =
                hc0.track_op().then(|| tensor(grad_state, Shape::from((2, steps.batch, steps.hidden))));
            Ok((Some(grad_input), grad_w_hh, grad_hc0))
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::fused::{self, Products};

    /// The plan's launches on the CPU: the reference that `CudaLaunches` stands in for. Products
    /// follow `sgemm`'s column-major definition; the cells use exact `exp` and `tanh`.
    struct CpuLaunches {
        buffers: Vec<Vec<f32>>,
    }

    impl CpuLaunches {
        fn new() -> Self {
            Self { buffers: vec![Vec::new(); BUFFERS] }
        }

        fn buf(&mut self, b: Buf) -> &mut Vec<f32> {
            &mut self.buffers[b as usize]
        }

        /// A copy of `len` numbers from `at` (the plan may read and write one buffer in one
        /// launch; copies keep the reference simple).
        fn read(&self, at: At, len: usize) -> Vec<f32> {
            self.buffers[at.0 as usize][at.1..at.1 + len].to_vec()
        }
    }

    impl Launches for CpuLaunches {
        fn product(&mut self, p: Product, a: At, b: At, c: At) -> Result<()> {
            // Column-major element (row, col) of a matrix with leading dimension ld.
            let a_len = if p.a_transposed { (p.m - 1) * p.lda + p.k } else { (p.k - 1) * p.lda + p.m };
            let b_len = if p.b_transposed { (p.k - 1) * p.ldb + p.n } else { (p.n - 1) * p.ldb + p.k };
            let (a_data, b_data) = (self.read(a, a_len), self.read(b, b_len));
            let op_a = |row: usize, col: usize| match p.a_transposed {
                true => a_data[row * p.lda + col],
                false => a_data[col * p.lda + row],
            };
            let op_b = |row: usize, col: usize| match p.b_transposed {
                true => b_data[row * p.ldb + col],
                false => b_data[col * p.ldb + row],
            };
            let c_data = &mut self.buffers[c.0 as usize][c.1..];
            for col in 0..p.n {
                for row in 0..p.m {
                    let sum: f32 = (0..p.k).map(|i| op_a(row, i) * op_b(i, col)).sum();
                    let out = &mut c_data[col * p.ldc + row];
                    *out = if p.accumulate { *out + sum } else { sum };
                }
            }
            Ok(())
        }

        fn cell_forward(
            &mut self,
            steps: Steps,
            gates: At,
            c_prev: At,
            c: At,
            tanh_c: At,
            h: At,
        ) -> Result<()> {
            let (block, hidden) = (steps.block(), steps.hidden);
            let mut g = self.read(gates, 4 * block);
            let c_prev = self.read(c_prev, block);
            let (mut c_new, mut t_new, mut h_new) = (vec![0.0; block], vec![0.0; block], vec![0.0; block]);
            let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
            for unit in 0..block {
                let (row, j) = (unit / hidden, unit % hidden);
                let base = row * 4 * hidden + j;
                let i = sigmoid(g[base]);
                let f = sigmoid(g[base + hidden]);
                let cand = g[base + 2 * hidden].tanh();
                let o = sigmoid(g[base + 3 * hidden]);
                c_new[unit] = f * c_prev[unit] + i * cand;
                t_new[unit] = c_new[unit].tanh();
                h_new[unit] = o * t_new[unit];
                [g[base], g[base + hidden], g[base + 2 * hidden], g[base + 3 * hidden]] = [i, f, cand, o];
            }
            for (at, data) in [(gates, g), (c, c_new), (tanh_c, t_new), (h, h_new)] {
                self.buffers[at.0 as usize][at.1..at.1 + data.len()].copy_from_slice(&data);
            }
            Ok(())
        }

        fn cell_backward(
            &mut self,
            steps: Steps,
            gates: At,
            grad_y: At,
            tanh_c: At,
            c_prev: At,
            state: At,
            grad_gates: At,
        ) -> Result<()> {
            let (block, hidden) = (steps.block(), steps.hidden);
            let g = self.read(gates, 4 * block);
            let (dy, t, cp) = (self.read(grad_y, block), self.read(tanh_c, block), self.read(c_prev, block));
            let mut s = self.read(state, 2 * block);
            let mut d = vec![0.0; 4 * block];
            for unit in 0..block {
                let (row, j) = (unit / hidden, unit % hidden);
                let base = row * 4 * hidden + j;
                let (i, f, cand, o) = (g[base], g[base + hidden], g[base + 2 * hidden], g[base + 3 * hidden]);
                let dh = dy[unit] + s[unit];
                let dc = s[block + unit] + dh * o * (1.0 - t[unit] * t[unit]);
                d[base] = dc * cand * i * (1.0 - i);
                d[base + hidden] = dc * cp[unit] * f * (1.0 - f);
                d[base + 2 * hidden] = dc * i * (1.0 - cand * cand);
                d[base + 3 * hidden] = dh * t[unit] * o * (1.0 - o);
                s[block + unit] = dc * f;
            }
            for (at, data) in [(state, s), (grad_gates, d)] {
                self.buffers[at.0 as usize][at.1..at.1 + data.len()].copy_from_slice(&data);
            }
            Ok(())
        }
    }

    /// NVRTC compiles the cell kernels (no GPU needed), and the PTX has both entry points.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_gpu_cell_kernels_compile() {
        let ptx = on_cuda::cell_ptx().unwrap();
        for kernel in ["lstm_cell_forward", "lstm_cell_backward"] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "no {kernel} in the PTX");
        }
    }

    fn random(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The GPU's plan, run on the CPU, gives the CPU fused op's outputs, final state and every
    /// gradient: the products' layouts, offsets and order are the ones the GPU runs.
    #[test]
    fn the_gpu_plan_matches_the_cpu_op() {
        for (seq_len, batch, hidden, seed) in [(1, 1, 4, 1), (5, 3, 8, 2), (7, 2, 12, 3)] {
            let steps = Steps { seq_len, batch, hidden };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (block, gate_block) = (steps.block(), steps.gate_block());
            let xs_proj = random(&mut rng, seq_len * gate_block, 1.0);
            let w_hh = random(&mut rng, 4 * hidden * hidden, 0.5);
            let (h0, c0) = (random(&mut rng, block, 0.5), random(&mut rng, block, 0.5));
            let grad_ys = random(&mut rng, seq_len * block, 1.0);

            let mut cpu = CpuLaunches::new();
            *cpu.buf(Buf::WHh) = w_hh.clone();
            *cpu.buf(Buf::Gates) = xs_proj.clone();
            *cpu.buf(Buf::Hs) = [h0.clone(), vec![0.0; seq_len * block]].concat();
            *cpu.buf(Buf::Cs) = [c0.clone(), vec![0.0; seq_len * block]].concat();
            *cpu.buf(Buf::TanhCs) = vec![0.0; seq_len * block];
            forward(&mut cpu, steps).unwrap();
            *cpu.buf(Buf::GradYs) = grad_ys.clone();
            *cpu.buf(Buf::GradGates) = vec![0.0; seq_len * gate_block];
            *cpu.buf(Buf::GradState) = vec![0.0; 2 * block];
            *cpu.buf(Buf::GradWHh) = vec![0.0; 4 * hidden * hidden];
            backward(&mut cpu, steps, true).unwrap();

            let var =
                |data: &[f32], shape: &[usize]| Var::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap();
            let xs_var = var(&xs_proj, &[seq_len, batch, 4 * hidden]);
            let w_var = var(&w_hh, &[4 * hidden, hidden]);
            let h0_var = var(&h0, &[batch, hidden]);
            let c0_var = var(&c0, &[batch, hidden]);
            let (ys, _, c_last) = fused::recur(&xs_var, &w_var, &h0_var, &c0_var, Products::F32).unwrap();
            let grad_ys_t =
                Tensor::from_vec(grad_ys.clone(), (seq_len, batch, hidden), &Device::Cpu).unwrap();
            let grads = (&ys * &grad_ys_t).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| to_vec(grads.get(v.as_tensor()).unwrap());

            let hs = &cpu.buffers[Buf::Hs as usize];
            let cs = &cpu.buffers[Buf::Cs as usize];
            let state = &cpu.buffers[Buf::GradState as usize];
            let checks = [
                ("ys", max_diff(&hs[block..], &to_vec(&ys))),
                ("last c", max_diff(&cs[seq_len * block..], &to_vec(&c_last))),
                ("grad xs_proj", max_diff(&cpu.buffers[Buf::GradGates as usize], &grad(&xs_var))),
                ("grad w_hh", max_diff(&cpu.buffers[Buf::GradWHh as usize], &grad(&w_var))),
                ("grad h0", max_diff(&state[..block], &grad(&h0_var))),
                ("grad c0", max_diff(&state[block..], &grad(&c0_var))),
            ];
            for (what, diff) in checks {
                assert!(
                    diff < 1e-4,
                    "{what} differs by {diff} at seq {seq_len}, batch {batch}, hidden {hidden}"
                );
            }
        }
    }
}
