//! One sequence's generation step on a CUDA GPU, the GPU counterpart of `fast`'s CPU step:
//! one kernel a layer (its gate products and its cell together), one for the output layer, and
//! one copy back of the logits and the new state. The state stays on the GPU between steps and
//! goes up again only when the caller's `GenState` is not the one the last step handed back (a
//! new phrase, a reset, another sequence). candle's graph takes about fifteen launches a layer,
//! each with an allocation, and copies the state up and down at every layer.
//! Runs on: the worker thread (and offline threads), which wait for each step's copy back.
//!
//! The step is written once, over a `Launcher` (`Stepper`): the CUDA implementation (feature
//! `cuda`) runs it on the GPU; the tests run it on the CPU, with the kernels' formulas, against
//! candle's graph step, so the buffers' layouts, the offsets and the state's round trips are
//! checked on machines without a GPU. The formulas are the network's (`lstm`'s header).

use std::sync::Mutex;

use candle_core::{Error, Result, Tensor};

use crate::lstm::{GenState, StepInput, StepWeights};

/// Side-table rows the layer kernel adds at most (its `SideRows`). A model with more bar inputs
/// a step (`BarReader::per_step`) steps through candle's graph on the GPU.
pub(crate) const MAX_SIDE_ROWS: usize = 16;

/// Units a block of either kernel works on (one warp wide, so its weight reads coalesce).
const UNITS: usize = 32;
/// Slices a block splits each product's inner index into (one warp each).
const SLICES: usize = 8;

/// The kernels (CUDA C), compiled by NVRTC the first time a process needs them. A block is
/// `UNITS` outputs (`threadIdx.x`) by `SLICES` slices of the inner index (`threadIdx.y`); the
/// slices' partial sums meet in shared memory, and the first slice finishes each output.
const STEP_KERNELS: &str = r#"
#define UNITS 32
#define SLICES 8
#define MAX_SIDE_ROWS 16

struct SideRows { int count; int row[MAX_SIDE_ROWS]; };

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void lstm_step_layer(const float* base, const float* side, SideRows rows,
                                           const float* x, const float* w_ih_t, int inputs,
                                           const float* w_hh_t, const float* h_in,
                                           const float* c_in, float* h_out, float* c_out,
                                           int hidden) {
    __shared__ float partial[4][SLICES][UNITS];
    int lane = threadIdx.x, slice = threadIdx.y;
    int unit = blockIdx.x * UNITS + lane;
    long long width = 4LL * hidden;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (unit < hidden) {
        for (int i = slice; i < inputs; i += SLICES) {
            float xi = x[i];
            const float* w = w_ih_t + i * width + unit;
            for (int g = 0; g < 4; ++g) acc[g] += xi * w[g * hidden];
        }
        for (int i = slice; i < hidden; i += SLICES) {
            float hi = h_in[i];
            const float* w = w_hh_t + i * width + unit;
            for (int g = 0; g < 4; ++g) acc[g] += hi * w[g * hidden];
        }
    }
    for (int g = 0; g < 4; ++g) partial[g][slice][lane] = acc[g];
    __syncthreads();
    if (slice != 0 || unit >= hidden) return;
    float gate[4];
    for (int g = 0; g < 4; ++g) {
        float sum = base[g * hidden + unit];
        for (int r = 0; r < rows.count; ++r) sum += side[rows.row[r] * width + g * hidden + unit];
        for (int s = 0; s < SLICES; ++s) sum += partial[g][s][lane];
        gate[g] = sum;
    }
    float i = sigmoid(gate[0]), f = sigmoid(gate[1]), cand = tanhf(gate[2]), o = sigmoid(gate[3]);
    float c = f * c_in[unit] + i * cand;
    c_out[unit] = c;
    h_out[unit] = o * tanhf(c);
}

extern "C" __global__ void dense_step(const float* x, const float* w_t, const float* bias,
                                      float* out, int inputs, int outputs) {
    __shared__ float partial[SLICES][UNITS];
    int lane = threadIdx.x, slice = threadIdx.y;
    int o = blockIdx.x * UNITS + lane;
    float acc = 0.0f;
    if (o < outputs) {
        for (int i = slice; i < inputs; i += SLICES) acc += x[i] * w_t[(long long)i * outputs + o];
    }
    partial[slice][lane] = acc;
    __syncthreads();
    if (slice != 0 || o >= outputs) return;
    float sum = bias[o];
    for (int s = 0; s < SLICES; ++s) sum += partial[s][lane];
    out[o] = sum;
}
"#;

/// The step's numbers, by role; f32, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Buf {
    /// One of the two state buffers (`Shape::state_len`): the logits, then each layer's `h` and
    /// `c`. A step reads one and writes the other.
    State(Slot),
    /// Layer 0's gate input per token, biases included: `[vocab, 4 hidden]`.
    Tokens,
    /// Layer 0's gate input per row of the side table (`MelodyLstm::side_table`):
    /// `[rows, 4 hidden]`.
    Side,
    /// The input weights of layer `k` ≥ 1: `[hidden, 4 hidden]`.
    InputWeights(usize),
    /// The summed biases of layer `k` ≥ 1: `[4 hidden]`.
    Bias(usize),
    /// The recurrent weights of layer `k`: `[hidden, 4 hidden]`.
    RecurrentWeights(usize),
    /// `[hidden, vocab]`.
    HeadWeights,
    /// `[vocab]`.
    HeadBias,
}

/// Which of the two state buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    First,
    Second,
}

impl Slot {
    fn other(self) -> Self {
        match self {
            Slot::First => Slot::Second,
            Slot::Second => Slot::First,
        }
    }
}

/// A place in a buffer: the buffer, and the index of the first number.
#[derive(Clone, Copy, Debug, PartialEq)]
struct At(Buf, usize);

/// The sizes of a model's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    /// Rows of the side table; 0 for a model without bar inputs.
    side_rows: usize,
}

impl Shape {
    /// Numbers in a state buffer: the logits, then `h` and `c` of each layer.
    fn state_len(self) -> usize {
        self.vocab + 2 * self.layers * self.hidden
    }

    /// Where layer `k`'s `h` starts in a state buffer.
    fn h(self, k: usize) -> usize {
        self.vocab + 2 * k * self.hidden
    }

    /// Where layer `k`'s `c` starts in a state buffer.
    fn c(self, k: usize) -> usize {
        self.h(k) + self.hidden
    }
}

/// The side-table rows one layer-0 launch adds, as the kernel takes them (by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct SideRows {
    count: i32,
    row: [i32; MAX_SIDE_ROWS],
}

/// One layer's launch of `lstm_step_layer`: the gates `base + Σ side rows + x W_ih + h_in W_hh`
/// (`x` and `W_ih` only above layer 0), then the cell, into `h_out` and `c_out`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LayerLaunch {
    base: At,
    side: SideRows,
    input: Option<(At, At)>,
    recurrent: At,
    h_in: At,
    c_in: At,
    h_out: At,
    c_out: At,
}

/// The output layer's launch of `dense_step`: the logits `bias + x W` into `out`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct HeadLaunch {
    x: At,
    out: At,
}

/// The launches of one step: `token` with the side-table `rows` (both in range: `Stepper::check`),
/// reading the state in slot `from` and writing it, with the logits, into the other.
fn plan(shape: Shape, token: usize, rows: &[u32], from: Slot) -> (Vec<LayerLaunch>, HeadLaunch) {
    let to = from.other();
    let width = 4 * shape.hidden;
    let mut side = SideRows { count: rows.len() as i32, ..SideRows::default() };
    for (slot, &row) in side.row.iter_mut().zip(rows) {
        *slot = row as i32;
    }
    let layers = (0..shape.layers)
        .map(|k| {
            let (base, input, side) = match k {
                0 => (At(Buf::Tokens, token * width), None, side),
                _ => {
                    let x = At(Buf::State(to), shape.h(k - 1));
                    (At(Buf::Bias(k), 0), Some((x, At(Buf::InputWeights(k), 0))), SideRows::default())
                }
            };
            LayerLaunch {
                base,
                side,
                input,
                recurrent: At(Buf::RecurrentWeights(k), 0),
                h_in: At(Buf::State(from), shape.h(k)),
                c_in: At(Buf::State(from), shape.c(k)),
                h_out: At(Buf::State(to), shape.h(k)),
                c_out: At(Buf::State(to), shape.c(k)),
            }
        })
        .collect();
    (layers, HeadLaunch { x: At(Buf::State(to), shape.h(shape.layers - 1)), out: At(Buf::State(to), 0) })
}

/// A model's step weights as plain numbers, each under its role, and the step's sizes.
struct WeightNumbers {
    shape: Shape,
    /// Every buffer but the state buffers (which start as zeros).
    buffers: Vec<(Buf, Vec<f32>)>,
}

/// The step's weights as plain numbers (`StepWeights` lays each out as a kernel reads it).
fn weight_numbers(weights: &StepWeights) -> Result<WeightNumbers> {
    let numbers = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (head_w_t, head_b) = weights.head();
    let (hidden, vocab) = head_w_t.dims2()?;
    let mut buffers = vec![(Buf::HeadWeights, numbers(head_w_t)?), (Buf::HeadBias, numbers(head_b)?)];
    let mut side_rows = 0;
    for (k, layer) in weights.layers().iter().enumerate() {
        match (&layer.input, k) {
            (StepInput::Table { tokens, bars }, 0) => {
                buffers.push((Buf::Tokens, numbers(tokens)?));
                if let Some(bars) = bars {
                    side_rows = bars.dim(0)?;
                    buffers.push((Buf::Side, numbers(bars)?));
                }
            }
            (StepInput::Weights { w_ih_t, bias }, 1..) if w_ih_t.dims2()? == (hidden, 4 * hidden) => {
                buffers.push((Buf::InputWeights(k), numbers(w_ih_t)?));
                buffers.push((Buf::Bias(k), numbers(bias)?));
            }
            _ => return Err(Error::Msg(format!("GPU step: layer {k}'s input is not laid out for it"))),
        }
        buffers.push((Buf::RecurrentWeights(k), numbers(&layer.w_hh_t)?));
    }
    let shape = Shape { vocab, hidden, layers: weights.layers().len(), side_rows };
    Ok(WeightNumbers { shape, buffers })
}

/// Where the step runs its launches, and the state buffers' copies to and from the host.
trait Launcher {
    /// Copies `numbers` into the state buffer `slot`, from index `offset` on.
    fn upload(&mut self, slot: Slot, offset: usize, numbers: &[f32]) -> Result<()>;
    /// Runs one layer's launch (queued on a GPU; the next `download` waits for it).
    fn layer(&mut self, shape: Shape, launch: &LayerLaunch) -> Result<()>;
    /// Runs the output layer's launch (queued likewise).
    fn head(&mut self, shape: Shape, launch: &HeadLaunch) -> Result<()>;
    /// Copies the whole state buffer `slot` into `into`, after every launch before it.
    fn download(&mut self, slot: Slot, into: &mut Vec<f32>) -> Result<()>;
}

/// The step over a `Launcher`, and what the launcher's state buffers hold.
struct Stepper<L> {
    shape: Shape,
    inner: Mutex<Resident<L>>,
}

/// The launcher, and the state it holds: sequences share one model, so one step at a time.
struct Resident<L> {
    launcher: L,
    /// The slot holding the state after the last step.
    slot: Slot,
    /// That slot's numbers as the host last saw them (`Shape::state_len`, once a step ran).
    mirror: Vec<f32>,
    /// True while `slot` holds `mirror`: false before the first step and after a failed one.
    is_mirrored: bool,
}

impl<L: Launcher> Stepper<L> {
    fn new(shape: Shape, launcher: L) -> Self {
        let mirror = vec![0.0; shape.state_len()];
        let resident = Resident { launcher, slot: Slot::First, mirror, is_mirrored: false };
        Self { shape, inner: Mutex::new(resident) }
    }

    /// Feeds `token` with layer 0's side-table `rows` to the sequence in `state`: updates it and
    /// writes the next symbol's logits into `logits`.
    fn step(&self, token: usize, rows: &[u32], state: &mut GenState, logits: &mut [f32]) -> Result<()> {
        let shape = self.shape;
        self.check(token, rows, state, logits)?;
        let mut guard =
            self.inner.lock().map_err(|_| Error::Msg("GPU step: an earlier step panicked".into()))?;
        let Resident { launcher, slot, mirror, is_mirrored } = &mut *guard;
        let from = *slot;
        let layer_states = || state.h.iter().zip(&state.c).enumerate();
        let is_resident = *is_mirrored
            && layer_states().all(|(k, (h, c))| {
                mirror[shape.h(k)..][..shape.hidden] == h[..] && mirror[shape.c(k)..][..shape.hidden] == c[..]
            });
        // Until this step succeeds, the slots hold nothing the next step may trust.
        *is_mirrored = false;
        if !is_resident {
            for (k, (h, c)) in layer_states() {
                mirror[shape.h(k)..][..shape.hidden].copy_from_slice(h);
                mirror[shape.c(k)..][..shape.hidden].copy_from_slice(c);
            }
            launcher.upload(from, shape.vocab, &mirror[shape.vocab..])?;
        }
        let (layers, head) = plan(shape, token, rows, from);
        for layer in &layers {
            launcher.layer(shape, layer)?;
        }
        launcher.head(shape, &head)?;
        let to = from.other();
        launcher.download(to, mirror)?;
        logits.copy_from_slice(&mirror[..shape.vocab]);
        for (k, (h, c)) in state.h.iter_mut().zip(&mut state.c).enumerate() {
            h.copy_from_slice(&mirror[shape.h(k)..][..shape.hidden]);
            c.copy_from_slice(&mirror[shape.c(k)..][..shape.hidden]);
        }
        *slot = to;
        *is_mirrored = true;
        Ok(())
    }

    /// Refuses what would make a kernel read or write out of its buffers.
    fn check(&self, token: usize, rows: &[u32], state: &GenState, logits: &[f32]) -> Result<()> {
        let shape = self.shape;
        if token >= shape.vocab {
            return Err(Error::Msg(format!(
                "GPU step: token {token} is outside the vocabulary of {}",
                shape.vocab
            )));
        }
        if rows.len() > MAX_SIDE_ROWS || rows.iter().any(|&row| row as usize >= shape.side_rows) {
            return Err(Error::Msg(format!(
                "GPU step: side-table rows {rows:?} do not fit a table of {} rows",
                shape.side_rows
            )));
        }
        let is_shaped = state.h.len() == shape.layers
            && state.c.len() == shape.layers
            && state.h.iter().chain(&state.c).all(|v| v.len() == shape.hidden);
        if !is_shaped || logits.len() != shape.vocab {
            return Err(Error::Msg(format!(
                "GPU step: the state or the logits are not shaped for {} layers of {} units and {} symbols",
                shape.layers, shape.hidden, shape.vocab
            )));
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use on_cuda::GpuStep;

/// Without CUDA there is no GPU step: `StepWeights` never holds one.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum GpuStep {}

#[cfg(not(feature = "cuda"))]
impl GpuStep {
    /// Never one without CUDA.
    pub(crate) fn for_weights(
        _weights: &StepWeights,
        _side_per_step: usize,
        _device: &candle_core::Device,
    ) -> Result<Option<Self>> {
        Ok(None)
    }

    pub(crate) fn step(
        &self,
        _token: usize,
        _rows: &[u32],
        _state: &mut GenState,
        _logits: &mut [f32],
    ) -> Result<()> {
        match *self {}
    }
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::{CudaDevice, Device, Error, Result};

    use super::*;

    /// The module name the kernels are loaded under, once per device.
    const MODULE: &str = "antiphon_gpu_step";

    // SAFETY: `SideRows` is `repr(C)`, plain integers, laid out as the kernels' struct.
    unsafe impl DeviceRepr for SideRows {}

    /// The kernels' PTX, compiled once per process (or why NVRTC refused them).
    pub(crate) fn step_ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        crate::compute::ptx_once(&PTX, STEP_KERNELS, "GPU step: the kernels")
    }

    /// The launch shape of either kernel for `outputs` outputs: `UNITS` × `SLICES` threads a
    /// block, as many blocks as `UNITS` go into `outputs`.
    fn blocks(outputs: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (outputs.div_ceil(UNITS) as u32, 1, 1),
            block_dim: (UNITS as u32, SLICES as u32, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A model's generation step on a CUDA GPU (see the module's header).
    pub struct GpuStep(Stepper<CudaLauncher>);

    impl std::fmt::Debug for GpuStep {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "GpuStep({:?})", self.0.shape)
        }
    }

    impl GpuStep {
        /// The step for `weights` on `device`, with its own copy of the weights there; `None`
        /// off CUDA, or for a model with more than `MAX_SIDE_ROWS` bar inputs a step.
        pub(crate) fn for_weights(
            weights: &StepWeights,
            side_per_step: usize,
            device: &Device,
        ) -> Result<Option<Self>> {
            let Device::Cuda(device) = device else { return Ok(None) };
            if side_per_step > MAX_SIDE_ROWS {
                return Ok(None);
            }
            // Compiling first: a toolkit that cannot, fails the load, not the first answer.
            step_ptx()?;
            let WeightNumbers { shape, buffers: numbers } = weight_numbers(weights)?;
            let mut buffers = HashMap::new();
            for (buf, numbers) in numbers {
                buffers.insert(buf, device.clone_htod(&numbers)?);
            }
            for slot in [Slot::First, Slot::Second] {
                buffers.insert(Buf::State(slot), device.alloc_zeros::<f32>(shape.state_len())?);
            }
            let stream = device.cuda_stream();
            let addresses = buffers.iter().map(|(&buf, slice)| (buf, slice.device_ptr(&stream).0)).collect();
            let launcher = CudaLauncher { device: device.clone(), buffers, addresses };
            Ok(Some(Self(Stepper::new(shape, launcher))))
        }

        /// See `Stepper::step`.
        pub(crate) fn step(
            &self,
            token: usize,
            rows: &[u32],
            state: &mut GenState,
            logits: &mut [f32],
        ) -> Result<()> {
            self.0.step(token, rows, state, logits)
        }
    }

    /// The step's buffers on one CUDA device, and their addresses for the kernels' parameters
    /// (a launch reads one part of a state buffer and writes another).
    struct CudaLauncher {
        device: CudaDevice,
        buffers: HashMap<Buf, CudaSlice<f32>>,
        addresses: HashMap<Buf, u64>,
    }

    impl CudaLauncher {
        /// The device address of `at`.
        fn address(&self, at: At) -> Result<u64> {
            let base = self
                .addresses
                .get(&at.0)
                .ok_or_else(|| Error::Msg(format!("GPU step: no {:?} buffer", at.0)))?;
            Ok(base + (at.1 * std::mem::size_of::<f32>()) as u64)
        }

        /// The device addresses of `places`.
        fn addresses<const N: usize>(&self, places: [At; N]) -> Result<[u64; N]> {
            let mut addresses = [0; N];
            for (address, at) in addresses.iter_mut().zip(places) {
                *address = self.address(at)?;
            }
            Ok(addresses)
        }

        fn state(&mut self, slot: Slot) -> Result<&mut CudaSlice<f32>> {
            self.buffers
                .get_mut(&Buf::State(slot))
                .ok_or_else(|| Error::Msg("GPU step: no state buffer".into()))
        }
    }

    impl Launcher for CudaLauncher {
        fn upload(&mut self, slot: Slot, offset: usize, numbers: &[f32]) -> Result<()> {
            let device = self.device.clone();
            let mut place = self.state(slot)?.slice_mut(offset..offset + numbers.len());
            device.memcpy_htod(numbers, &mut place)
        }

        fn layer(&mut self, shape: Shape, launch: &LayerLaunch) -> Result<()> {
            let LayerLaunch { base, side, input, recurrent, h_in, c_in, h_out, c_out } = *launch;
            let function = self.device.get_or_load_custom_func("lstm_step_layer", MODULE, step_ptx()?)?;
            let hidden = shape.hidden as i32;
            let side_table = if side.count > 0 { self.address(At(Buf::Side, 0))? } else { 0 };
            let [x, w_ih_t, inputs] = match input {
                Some((x, w_ih_t)) => [self.address(x)?, self.address(w_ih_t)?, shape.hidden as u64],
                None => [0, 0, 0],
            };
            let inputs = inputs as i32;
            let [base, recurrent, h_in, c_in, h_out, c_out] =
                self.addresses([base, recurrent, h_in, c_in, h_out, c_out])?;
            let mut args = function.builder();
            args.arg(&base).arg(&side_table).arg(&side).arg(&x).arg(&w_ih_t).arg(&inputs);
            args.arg(&recurrent).arg(&h_in).arg(&c_in).arg(&h_out).arg(&c_out).arg(&hidden);
            // SAFETY: the parameters are as `lstm_step_layer` declares them; every address lies
            // in a live buffer sized by `shape` (`weight_numbers`, `for_weights`), `Stepper::check`
            // keeps the token and the side rows inside their tables, and the launch reads one
            // state buffer and writes the other.
            unsafe { args.launch(blocks(shape.hidden)) }
                .map_err(|e| Error::Msg(format!("GPU step: lstm_step_layer: {e}")))?;
            Ok(())
        }

        fn head(&mut self, shape: Shape, launch: &HeadLaunch) -> Result<()> {
            let function = self.device.get_or_load_custom_func("dense_step", MODULE, step_ptx()?)?;
            let [x, w_t, bias, out] =
                self.addresses([launch.x, At(Buf::HeadWeights, 0), At(Buf::HeadBias, 0), launch.out])?;
            let (inputs, outputs) = (shape.hidden as i32, shape.vocab as i32);
            let mut args = function.builder();
            args.arg(&x).arg(&w_t).arg(&bias).arg(&out).arg(&inputs).arg(&outputs);
            // SAFETY: the parameters are as `dense_step` declares them, in live buffers sized by
            // `shape`; it reads a state buffer's top `h` and writes the same buffer's logits.
            unsafe { args.launch(blocks(shape.vocab)) }
                .map_err(|e| Error::Msg(format!("GPU step: dense_step: {e}")))?;
            Ok(())
        }

        fn download(&mut self, slot: Slot, into: &mut Vec<f32>) -> Result<()> {
            let device = self.device.clone();
            // Into pageable memory, so the copy returns once it is done (CUDA's rule for
            // device-to-pageable copies), after the launches queued before it.
            device.memcpy_dtoh(self.state(slot)?, into)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::config::{InputKind, ModelConfig};
    use crate::MelodyLstm;
    use music::{TokenId, Vocab};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The launches on the CPU, with the kernels' formulas: the reference `CudaLauncher` stands
    /// in for.
    struct CpuLauncher {
        buffers: HashMap<Buf, Vec<f32>>,
        /// How many uploads the step asked for.
        uploads: usize,
    }

    impl CpuLauncher {
        fn read(&self, at: At, len: usize) -> &[f32] {
            &self.buffers[&at.0][at.1..at.1 + len]
        }

        fn write(&mut self, at: At, numbers: &[f32]) {
            self.buffers.get_mut(&at.0).unwrap()[at.1..at.1 + numbers.len()].copy_from_slice(numbers);
        }
    }

    impl Launcher for CpuLauncher {
        fn upload(&mut self, slot: Slot, offset: usize, numbers: &[f32]) -> Result<()> {
            self.uploads += 1;
            self.write(At(Buf::State(slot), offset), numbers);
            Ok(())
        }

        fn layer(&mut self, shape: Shape, launch: &LayerLaunch) -> Result<()> {
            let LayerLaunch { base, side, input, recurrent, h_in, c_in, h_out, c_out } = *launch;
            let (hidden, width) = (shape.hidden, 4 * shape.hidden);
            let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
            let mut gates = self.read(base, width).to_vec();
            for &row in &side.row[..side.count as usize] {
                let row = self.read(At(Buf::Side, row as usize * width), width);
                gates.iter_mut().zip(row).for_each(|(g, r)| *g += r);
            }
            let mut products = vec![(self.read(h_in, hidden).to_vec(), recurrent)];
            if let Some((x, w_ih_t)) = input {
                products.push((self.read(x, hidden).to_vec(), w_ih_t));
            }
            for (vector, At(weights, first)) in products {
                for (i, v) in vector.iter().enumerate() {
                    let row = self.read(At(weights, first + i * width), width);
                    gates.iter_mut().zip(row).for_each(|(g, w)| *g += v * w);
                }
            }
            let c_prev = self.read(c_in, hidden).to_vec();
            let (mut h, mut c) = (vec![0.0; hidden], vec![0.0; hidden]);
            for u in 0..hidden {
                let [i, f, g, o] = [0, 1, 2, 3].map(|q| gates[q * hidden + u]);
                c[u] = sigmoid(f) * c_prev[u] + sigmoid(i) * g.tanh();
                h[u] = sigmoid(o) * c[u].tanh();
            }
            self.write(h_out, &h);
            self.write(c_out, &c);
            Ok(())
        }

        fn head(&mut self, shape: Shape, launch: &HeadLaunch) -> Result<()> {
            let x = self.read(launch.x, shape.hidden).to_vec();
            let mut logits = self.read(At(Buf::HeadBias, 0), shape.vocab).to_vec();
            for (i, v) in x.iter().enumerate() {
                let row = self.read(At(Buf::HeadWeights, i * shape.vocab), shape.vocab);
                logits.iter_mut().zip(row).for_each(|(l, w)| *l += v * w);
            }
            self.write(launch.out, &logits);
            Ok(())
        }

        fn download(&mut self, slot: Slot, into: &mut Vec<f32>) -> Result<()> {
            into.copy_from_slice(&self.buffers[&Buf::State(slot)]);
            Ok(())
        }
    }

    /// A 3-layer model on the CPU, with bar positions and lookback when `bars`, its every
    /// weight drawn from a seeded uniform ±0.5 (the training's start leaves some tables zero).
    fn model(bars: bool) -> MelodyLstm {
        let mut config =
            ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 8 }, 24, 3, 0.0);
        if bars {
            config.bar_meters = vec![music::Meter::COMMON];
            config.bar_lookback = 2;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let tensors = MelodyLstm::initial_tensors(&config, 3, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let numbers: Vec<f32> = (0..t.elem_count()).map(|_| rng.random_range(-0.5..0.5)).collect();
                (name, Tensor::from_vec(numbers, t.shape(), &Device::Cpu).unwrap())
            })
            .collect();
        MelodyLstm::new(&config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
    }

    fn stepper(weights: &StepWeights) -> Stepper<CpuLauncher> {
        let WeightNumbers { shape, buffers: numbers } = weight_numbers(weights).unwrap();
        let mut buffers: HashMap<Buf, Vec<f32>> = numbers.into_iter().collect();
        for slot in [Slot::First, Slot::Second] {
            buffers.insert(Buf::State(slot), vec![0.0; shape.state_len()]);
        }
        Stepper::new(shape, CpuLauncher { buffers, uploads: 0 })
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn the_gpu_step_matches_the_graph_step_over_interleaved_sequences_and_resets() {
        for bars in [false, true] {
            let lstm = model(bars);
            let weights = lstm.step_weights().unwrap().without_fast_step();
            let gpu = stepper(&weights);
            let vocab = gpu.shape.vocab;
            assert_eq!(gpu.shape.side_rows > 0, bars);
            let new_state = || GenState::zeros(3, 24);
            // Two sequences stepped in turn, as two answers sharing a model would be; one is
            // reset half-way, as a new phrase resets it.
            let (mut ours, mut theirs) = ([new_state(), new_state()], [new_state(), new_state()]);
            let (mut our_logits, mut their_logits) = (vec![0.0; vocab], vec![0.0; vocab]);
            for idx in 0..40usize {
                let seq = (idx / 3) % 2;
                if idx == 19 {
                    ours[seq].reset();
                    theirs[seq].reset();
                }
                let token = TokenId(((idx * 7) % vocab) as u16);
                let raw_bars: Vec<u16> =
                    if bars { vec![(idx % 16) as u16, (idx % 5) as u16, 3] } else { vec![] };
                let rows: Vec<u32> = (0..lstm.bar_reader().per_step())
                    .filter(|_| bars)
                    .map(|j| lstm.side_row_at(j, &raw_bars).unwrap())
                    .collect();
                gpu.step(token.0 as usize, &rows, &mut ours[seq], &mut our_logits).unwrap();
                lstm.step(&weights, token, &raw_bars, &mut theirs[seq], &mut their_logits).unwrap();
                let worst = max_diff(&our_logits, &their_logits);
                assert!(worst < 1e-4, "bars {bars}, step {idx}: logits differ by {worst}");
                for k in 0..3 {
                    assert!(
                        max_diff(&ours[seq].h[k], &theirs[seq].h[k]) < 1e-5,
                        "step {idx}, h of layer {k}"
                    );
                    assert!(
                        max_diff(&ours[seq].c[k], &theirs[seq].c[k]) < 1e-5,
                        "step {idx}, c of layer {k}"
                    );
                }
            }
            // The state went up at the first step, at each of the 13 changes of sequence and at
            // the reset, not at the steps in between.
            let uploads = gpu.inner.lock().unwrap().launcher.uploads;
            assert_eq!(uploads, 1 + 13 + 1, "bars {bars}");
        }
    }

    #[test]
    fn the_gpu_step_refuses_what_would_leave_its_buffers_and_then_steps_on() {
        let lstm = model(true);
        let weights = lstm.step_weights().unwrap().without_fast_step();
        let gpu = stepper(&weights);
        let (vocab, side_rows) = (gpu.shape.vocab, gpu.shape.side_rows as u32);
        let mut state = GenState::zeros(3, 24);
        let mut logits = vec![0.0; vocab];
        let err = gpu.step(vocab, &[], &mut state, &mut logits).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        let err = gpu.step(0, &[side_rows], &mut state, &mut logits).unwrap_err();
        assert!(err.to_string().contains("do not fit a table"), "{err}");
        let err = gpu.step(0, &[0; MAX_SIDE_ROWS + 1], &mut state, &mut logits).unwrap_err();
        assert!(err.to_string().contains("do not fit a table"), "{err}");
        let err = gpu.step(0, &[], &mut GenState::zeros(2, 24), &mut logits).unwrap_err();
        assert!(err.to_string().contains("not shaped"), "{err}");
        assert_eq!(state, GenState::zeros(3, 24), "a refused step changes nothing");
        gpu.step(0, &[0], &mut state, &mut logits).unwrap();
        assert!(state.h[2].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn the_plan_reads_one_state_buffer_and_writes_the_other() {
        let shape = Shape { vocab: 5, hidden: 4, layers: 2, side_rows: 0 };
        let (layers, head) = plan(shape, 3, &[], Slot::Second);
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].base, At(Buf::Tokens, 3 * 16));
        let LayerLaunch { base, h_in, h_out, input, .. } = layers[1];
        assert_eq!(base, At(Buf::Bias(1), 0));
        assert_eq!(h_in, At(Buf::State(Slot::Second), 5 + 8));
        assert_eq!(h_out, At(Buf::State(Slot::First), 5 + 8));
        assert_eq!(input, Some((At(Buf::State(Slot::First), 5), At(Buf::InputWeights(1), 0))));
        assert_eq!(
            head,
            HeadLaunch { x: At(Buf::State(Slot::First), 13), out: At(Buf::State(Slot::First), 0) }
        );
    }

    #[test]
    fn the_kernels_are_built_for_the_sizes_the_launches_use() {
        for (name, value) in [("UNITS", UNITS), ("SLICES", SLICES), ("MAX_SIDE_ROWS", MAX_SIDE_ROWS)] {
            assert!(STEP_KERNELS.contains(&format!("#define {name} {value}\n")), "{name}");
        }
    }

    /// NVRTC compiles the kernels (feature `cuda`; no GPU needed).
    #[cfg(feature = "cuda")]
    #[test]
    fn the_gpu_step_kernels_compile() {
        let ptx = on_cuda::step_ptx().unwrap();
        assert!(ptx.contains("lstm_step_layer") && ptx.contains("dense_step"));
    }
}
