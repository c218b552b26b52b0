//! Weights on an int8 grid, and the integer matrix-vector kernel of the generation step for
//! them. A quarter of the bytes of f32 weights, so a step of the built-in model streams less than
//! the L2 cache holds.
//! Runs on: the worker thread (the kernel, through `fast::FastLstm::step`) and offline threads
//! (quantising a model, packing). The kernel neither allocates nor locks.
//!
//! The grid: each row of an LSTM layer matrix has a power-of-two scale `2^e`, the smallest with
//! `127 · 2^e ≥ max |w|`, and every weight of the row is `q · 2^e` for an integer `|q| ≤ 127`.
//! `round_row` puts a row on its grid; `row_exponent` tells whether a row already lies on one.
//! Because the scale is a power of two, `q · 2^e` is an exact f32, and the grid is found again
//! from the rounded row: rounding twice changes nothing. A model saved with its rows on the grid
//! (`cargo xtask quantize`) is still an ordinary f32 model to candle; the fast step recognises
//! it and packs the integers, computing the same function within 2e-4 (below).
//!
//! Every kernel multiplies those integers by the layer's input rounded to 16-bit fixed point
//! (`x` in `[-1, 1]`, as LSTM hidden states always are, to the nearest multiple of `2^-15`).
//! The integer sums are exact, so the only error is that rounding, at most `2^-16` an input:
//! the step stays within about 2e-4 of the f32 one on the built-in model's logits.
//!
//! The VNNI kernels use `vpdpbusd` (unsigned bytes times signed bytes, four products summed into
//! each 32-bit lane): on 512-bit registers where the CPU has AVX-512 VNNI, and on 256-bit ones
//! where it has AVX-VNNI without AVX-512 (Intel's Alder Lake and later desktop and laptop
//! chips). An input becomes `U = round(x · 2^15) + 2^15`, split into two bytes
//! `U = 2^8 u1 + u0`; with `S_l = Σ q·u_l` and `Q = Σ q` over a row,
//! `Σ q·x = 2^-7 (S_1 - 128 Q) + 2^-15 S_0`. A step is bound by these products, one
//! `vpdpbusd` per byte of input and 64 weights: a third byte (24-bit inputs, within 1e-5 of the
//! f32 step) made the built-in model's step about 1.3 µs slower (`docs/experiments/speed.md`).
//!
//! AVX2 CPUs with neither VNNI get `Int8Kernel::Avx2Wide`: the same packed bytes, widened to
//! 16 bits as they are read and multiplied by the 16-bit inputs (`vpmaddwd`). Byte limbs there
//! would cost a `vpmaddubsw`, a `vpmaddwd` and an add each, about as much as half-precision
//! weights.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::huge_pages::HugePageArray;
use super::kernels::Isa;
use super::lstm::MelodyLstm;

/// Largest integer of the grid.
const Q_MAX: f32 = 127.0;
/// Fractional bits of the kernels' 16-bit fixed-point inputs.
const FRAC_BITS: u32 = 15;

/// The grid exponent a row of weights needs: the smallest `e` with `127 · 2^e ≥ max |w|`
/// (limited to f32's normal range; an all-zero row gets 0).
fn grid_exponent(row: &[f32]) -> i32 {
    let max = row.iter().fold(0.0f32, |m, &w| m.max(w.abs()));
    if max == 0.0 || !max.is_finite() {
        return 0;
    }
    let mut e = (max / Q_MAX).log2().ceil() as i32;
    // `log2` may be off by an ulp at a power of two; settle `e` with exact arithmetic.
    while e < 127 && Q_MAX * pow2(e) < max {
        e += 1;
    }
    while e > -126 && Q_MAX * pow2(e - 1) >= max {
        e -= 1;
    }
    e.clamp(-126, 127)
}

/// `2^e` for `e` in f32's normal range.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Puts a row of weights on its int8 grid (see the module's notes): each weight becomes the
/// nearest `q · 2^e`.
pub fn round_row(row: &mut [f32]) {
    let e = grid_exponent(row);
    let scale = pow2(e);
    for w in row {
        *w = (*w / scale).round().clamp(-Q_MAX, Q_MAX) * scale;
    }
}

/// An f32 matrix whose every row lies on its int8 grid, as its integers (row-major) and each
/// row's grid exponent; `None` for any other tensor. What a model file stores such a matrix as.
pub fn grid_integers(tensor: &Tensor) -> Result<Option<(Vec<i8>, Vec<i8>)>> {
    if tensor.dtype() != DType::F32 || tensor.rank() != 2 || tensor.elem_count() == 0 {
        return Ok(None);
    }
    let rows = tensor.to_vec2::<f32>()?;
    let mut integers = Vec::with_capacity(tensor.elem_count());
    let mut exponents = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(e) = row_exponent(row) else { return Ok(None) };
        let Ok(e8) = i8::try_from(e) else { return Ok(None) };
        exponents.push(e8);
        integers.extend(row.iter().map(|&w| (w / pow2(e)) as i8));
    }
    Ok(Some((integers, exponents)))
}

/// The f32 values of a matrix stored as int8 integers (row-major, `cols` a row) and its rows'
/// grid exponents: each `q · 2^e`, exact. An error says what does not fit.
pub fn from_grid(integers: &[i8], exponents: &[i8], cols: usize) -> std::result::Result<Vec<f32>, String> {
    if integers.len() != exponents.len() * cols {
        return Err(format!("{} int8 weights are not {} rows of {cols}", integers.len(), exponents.len()));
    }
    if let Some(&e) = exponents.iter().find(|&&e| e < -126) {
        return Err(format!("grid exponent {e} is outside f32's normal range"));
    }
    if integers.contains(&i8::MIN) {
        return Err("an int8 weight of -128 lies off the grid (which ends at ±127)".into());
    }
    // Allocated to size: the tensor keeps this vector, and `collect` over `flat_map` would leave
    // it with up to twice the capacity.
    let mut values = Vec::with_capacity(integers.len());
    for (row, &e) in integers.chunks_exact(cols.max(1)).zip(exponents) {
        values.extend(row.iter().map(|&q| f32::from(q) * pow2(i32::from(e))));
    }
    Ok(values)
}

/// The grid exponent of a row whose weights already lie on its int8 grid, `None` for any other
/// row.
pub fn row_exponent(row: &[f32]) -> Option<i32> {
    let e = grid_exponent(row);
    let scale = pow2(e);
    row.iter()
        .all(|&w| {
            let q = w / scale;
            q == q.round() && q.abs() <= Q_MAX && q * scale == w
        })
        .then_some(e)
}

/// Whether the fast step keeps tensor `name` on the int8 grid: the recurrent matrices, and the
/// input matrices above layer 0 (layer 0's input matrix becomes the fast step's token table).
pub fn is_grid_tensor(name: &str) -> bool {
    let Some((_, suffix)) = name.rsplit_once(".weight_") else { return false };
    suffix.starts_with("hh_l") || (suffix.starts_with("ih_l") && suffix != "ih_l0")
}

/// Which of a model's matrices `quantize_tensors` puts on int8 grids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridScope {
    /// The matrices the fast step multiplies as integers (`is_grid_tensor`): a step four times
    /// lighter.
    StepMatrices,
    /// Every weight matrix: also the token, side-input and output tables, which the step reads
    /// as f32 rows. Only the file shrinks (each such matrix to a quarter), for the bundles that
    /// embed the built-in models.
    EveryMatrix,
}

impl GridScope {
    /// Whether tensor `name` (of `rank` dimensions) goes on the grid in this scope.
    fn covers(self, name: &str, rank: usize) -> bool {
        match self {
            GridScope::StepMatrices => is_grid_tensor(name),
            GridScope::EveryMatrix => rank == 2,
        }
    }
}

/// A copy of `lstm` with the rows of the matrices `scope` names put on their int8 grids, and the
/// largest change that made to any weight.
pub fn quantize_model(lstm: &MelodyLstm, cfg: &ModelConfig, scope: GridScope) -> Result<(MelodyLstm, f32)> {
    let (tensors, largest_change) = quantize_tensors(lstm.named_tensors(), scope)?;
    let device = lstm.device().clone();
    Ok((MelodyLstm::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &device))?, largest_change))
}

/// Named tensors of any LSTM network (as `PackSource::named_tensors` lists them) with the rows
/// of the matrices `scope` names put on their int8 grids, as f32, and the largest change to any
/// weight.
pub fn quantize_tensors(
    named: Vec<(String, Tensor)>,
    scope: GridScope,
) -> Result<(HashMap<String, Tensor>, f32)> {
    let mut largest_change = 0.0f32;
    let mut tensors = HashMap::new();
    for (name, tensor) in named {
        let tensor = tensor.to_dtype(DType::F32)?;
        let tensor = if scope.covers(&name, tensor.rank()) {
            let (rows, cols) = tensor.dims2()?;
            let original = tensor.flatten_all()?.to_vec1::<f32>()?;
            let mut values = original.clone();
            values.chunks_exact_mut(cols).for_each(round_row);
            largest_change =
                original.iter().zip(&values).fold(largest_change, |m, (a, b)| m.max((a - b).abs()));
            Tensor::from_vec(values, (rows, cols), tensor.device())?
        } else {
            tensor
        };
        tensors.insert(name, tensor);
    }
    Ok((tensors, largest_change))
}

/// The integer kernels, one per kind of x86 CPU; `best_for` picks the one a CPU runs fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// `vpdpbusd` on 512-bit registers (AVX-512 VNNI, with BW), an input's two bytes apart.
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit registers (AVX-VNNI beside AVX2): the same sums, so the same bits.
    AvxVnni,
    /// Plain AVX2: each weight widened to 16 bits as it is read (`vpmovsxbw`), times 16-bit
    /// inputs (`vpmaddwd`). About 1.8 times as fast as half-precision weights on the same
    /// registers.
    Avx2Wide,
}

impl Int8Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Self; 3] = [Self::Avx512Vnni, Self::AvxVnni, Self::Avx2Wide];

    /// The fastest kernel this CPU runs beside `isa`'s float kernels; `None` for `Portable`.
    pub fn best_for(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Avx512 if cpu_has_vnni() => Some(Self::Avx512Vnni),
            Isa::Avx512 | Isa::Avx2Fma if cpu_has_avx_vnni() => Some(Self::AvxVnni),
            // Both sets include AVX2 (`Isa::detect`).
            Isa::Avx512 | Isa::Avx2Fma => Some(Self::Avx2Wide),
            Isa::Portable => None,
        }
    }

    /// True where this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        match self {
            Self::Avx512Vnni => cpu_has_vnni(),
            Self::AvxVnni => cpu_has_avx_vnni(),
            Self::Avx2Wide => Isa::detect() != Isa::Portable,
        }
    }

    /// How the bench and error messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "AVX-512 VNNI",
            Self::AvxVnni => "AVX-VNNI",
            Self::Avx2Wide => "AVX2 (16-bit inputs)",
        }
    }
}

/// True where an integer kernel runs beside `isa`'s float kernels (`Int8Kernel::best_for`).
pub fn runs_on(isa: Isa) -> bool {
    Int8Kernel::best_for(isa).is_some()
}

/// The CPU has AVX-VNNI, the 256-bit `vpdpbusd` (with AVX2).
pub fn cpu_has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The CPU runs the 512-bit integer kernel: AVX-512 with VNNI (and BW).
pub fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows per packed block: four 512-bit registers of 32-bit sums, 16 rows each.
pub const BLOCK_ROWS: usize = 64;
/// Bytes per quad of columns in a block: `BLOCK_ROWS` rows of four weights.
const QUAD_BYTES: usize = 4 * BLOCK_ROWS;

/// The quads (groups of four columns, the last padded with zeros) of a part `columns` wide.
pub fn num_quads(columns: usize) -> usize {
    columns.div_ceil(4)
}

/// One block of `BLOCK_ROWS` rows of a matrix part on the int8 grid, packed for the kernel:
/// `[quad][row][4]` bytes, with each row's scale and integer sum.
#[derive(Clone, Debug)]
pub struct Int8Part {
    /// `[num_quads][BLOCK_ROWS][4]`: quad `p`, row `r`, byte `t` is `q` of column `4p + t`;
    /// every quad starts on a cache line, as the kernels' loads need.
    pub weights: HugePageArray<i8>,
    /// `2^e` of each row (1 for padding rows).
    pub scales: [f32; BLOCK_ROWS],
    /// `Σ q` of each row.
    pub sums: [i32; BLOCK_ROWS],
}

impl Int8Part {
    /// Packs rows that lie on their grids; `rows[r]` is `None` for a padding row. Every row
    /// holds `columns` weights. Errors (returns `None`) when a row is off its grid.
    pub fn pack(rows: &[Option<&[f32]>], columns: usize) -> Option<Self> {
        let mut weights = vec![0; num_quads(columns) * QUAD_BYTES];
        let (mut scales, mut sums) = ([1.0; BLOCK_ROWS], [0; BLOCK_ROWS]);
        for (r, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            let e = row_exponent(row)?;
            let scale = pow2(e);
            scales[r] = scale;
            for (col, &w) in row.iter().enumerate() {
                let q = (w / scale) as i8;
                weights[(col / 4) * QUAD_BYTES + r * 4 + col % 4] = q;
                sums[r] += q as i32;
            }
        }
        Some(Int8Part { weights: weights.into(), scales, sums })
    }
}

/// An input vector in a kernel's fixed point, two words per quad of inputs. For the VNNI
/// kernels word `l` holds byte `l` of each input's `U` (see the module's notes), input `4p + t`
/// in byte `t`; for `Int8Kernel::Avx2Wide` the words hold the four inputs as 16-bit integers
/// (`split_words`).
pub type Limbs = [u32; 2];

/// `x` (clamped to `[-1, 1]`) as a fixed-point integer with `FRAC_BITS` fractional bits,
/// rounded to the nearest, in `[raise - 2^FRAC_BITS, 2^FRAC_BITS - 1]`; NaN gives the lowest.
#[inline(always)]
fn to_fixed(x: f32, raise: i32) -> i32 {
    let one = (1u32 << FRAC_BITS) as f32;
    // `max` turns NaN into the lower bound, so `bounded` is finite and within i32.
    let bounded = (x * one).round_ties_even().max(raise as f32 - one).min(one - 1.0);
    // SAFETY: `bounded` is a finite integer value in [raise - 2^FRAC_BITS, 2^FRAC_BITS).
    unsafe { bounded.to_int_unchecked() }
}

/// Splits `xs` for `kernel`: `split_limbs` for the VNNI kernels, `split_words` for AVX2.
#[inline(always)]
pub fn split_for(kernel: Int8Kernel, xs: &[f32], out: &mut [Limbs]) {
    match kernel {
        Int8Kernel::Avx2Wide => split_words(xs, out),
        Int8Kernel::Avx512Vnni | Int8Kernel::AvxVnni => split_limbs(xs, out),
    }
}

/// Splits `xs` (each in `[-1, 1]`; anything beyond is clamped) into `out` for the AVX2 kernel:
/// each input as `round(x · 2^15)` in 16 bits (±32767), input `4p + t` in half `t % 2` of word
/// `t / 2`; missing inputs of the last quad are zero.
#[inline(always)]
pub fn split_words(xs: &[f32], out: &mut [Limbs]) {
    for (p, words) in out.iter_mut().enumerate() {
        *words = [0; 2];
        for t in 0..4 {
            let x = xs.get(4 * p + t).copied().unwrap_or(0.0);
            // ±32767: the lower end is moved up one, so every value fits 16 signed bits.
            let fixed = to_fixed(x, 1);
            words[t / 2] |= (fixed as u32 & 0xffff) << (16 * (t % 2));
        }
    }
}

/// Splits `xs` (each in `[-1, 1]`; anything beyond is clamped) into `out`, one `Limbs` per quad;
/// missing inputs of the last quad are zero.
#[inline(always)]
pub fn split_limbs(xs: &[f32], out: &mut [Limbs]) {
    for (p, limbs) in out.iter_mut().enumerate() {
        *limbs = [0; 2];
        for t in 0..4 {
            let x = xs.get(4 * p + t).copied().unwrap_or(0.0);
            let fixed = to_fixed(x, 0);
            let u = (fixed + (1 << FRAC_BITS)) as u32;
            for (l, word) in limbs.iter_mut().enumerate() {
                *word |= ((u >> (8 * l)) & 0xff) << (8 * t);
            }
        }
    }
}

/// `acc += W x` for one packed block part, `x` split by `split_limbs` (as many quads as the
/// part has).
///
/// # Safety
/// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI (`cpu_has_vnni`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
pub unsafe fn accumulate(acc: &mut [f32; BLOCK_ROWS], part: &Int8Part, x: &[Limbs]) {
    use std::arch::x86_64::*;
    const REGS: usize = BLOCK_ROWS / 16;
    assert!(part.weights.len() >= x.len() * QUAD_BYTES);
    // Sums per limb and register: eight independent chains.
    let mut sums = [[_mm512_setzero_si512(); REGS]; 2];
    let w = part.weights.as_ptr();
    for (p, limbs) in x.iter().enumerate() {
        let quad = w.add(p * QUAD_BYTES);
        let inputs = limbs.map(|limb| _mm512_set1_epi32(limb as i32));
        for i in 0..REGS {
            let weights = _mm512_loadu_si512(quad.add(64 * i) as *const _);
            for (sums, &input) in sums.iter_mut().zip(&inputs) {
                sums[i] = _mm512_dpbusd_epi32(sums[i], input, weights);
            }
        }
    }
    let [s0, s1] = sums;
    for i in 0..REGS {
        let q_sums = _mm512_loadu_si512(part.sums.as_ptr().add(16 * i) as *const _);
        let top = _mm512_sub_epi32(s1[i], _mm512_slli_epi32::<7>(q_sums));
        let total = _mm512_mul_ps(_mm512_cvtepi32_ps(top), _mm512_set1_ps(1.0 / 128.0));
        let total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), _mm512_set1_ps(pow2(-15)), total);
        let scales = _mm512_loadu_ps(part.scales.as_ptr().add(16 * i));
        let out = acc.as_mut_ptr().add(16 * i);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(total, scales, _mm512_loadu_ps(out)));
    }
}

/// `acc += W x` for one packed block part with `kernel`, `x` split by `split_for(kernel, ..)`
/// (as many quads as the part has).
///
/// # Safety
/// `kernel.runs_here()` must hold.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn accumulate_with(kernel: Int8Kernel, acc: &mut [f32; BLOCK_ROWS], part: &Int8Part, x: &[Limbs]) {
    // SAFETY: the caller saw `kernel.runs_here()`.
    unsafe {
        match kernel {
            Int8Kernel::Avx512Vnni => accumulate(acc, part, x),
            Int8Kernel::AvxVnni => accumulate_avx(acc, part, x),
            Int8Kernel::Avx2Wide => accumulate_wide(acc, part, x),
        }
    }
}

/// `accumulate` on 256-bit registers, for CPUs with AVX-VNNI but not AVX-512: the same integer
/// sums and the same f32 arithmetic on them, so the same result to the bit. Sixteen 256-bit
/// sums (two limbs of 64 rows) would leave no register for the broadcast limbs and the
/// weights, so the block's 64 rows are summed as two halves of 32, each reading its half of
/// every quad.
///
/// # Safety
/// The CPU must have AVX2 and AVX-VNNI (`cpu_has_avx_vnni`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
#[inline]
pub unsafe fn accumulate_avx(acc: &mut [f32; BLOCK_ROWS], part: &Int8Part, x: &[Limbs]) {
    use std::arch::x86_64::*;
    const HALF_ROWS: usize = BLOCK_ROWS / 2;
    const REGS: usize = HALF_ROWS / 8;
    assert!(part.weights.len() >= x.len() * QUAD_BYTES);
    let w = part.weights.as_ptr();
    for half in 0..2 {
        let mut sums = [[_mm256_setzero_si256(); REGS]; 2];
        for (p, limbs) in x.iter().enumerate() {
            // SAFETY: quad `p` of the part holds `QUAD_BYTES`; this half reads its second or
            // first `4 · HALF_ROWS` of them (asserted above).
            let quad = unsafe { w.add(p * QUAD_BYTES + half * 4 * HALF_ROWS) };
            let inputs = limbs.map(|limb| _mm256_set1_epi32(limb as i32));
            for i in 0..REGS {
                // SAFETY: as above, 32 bytes of the half quad.
                let weights = unsafe { _mm256_loadu_si256(quad.add(32 * i) as *const _) };
                for (sums, &input) in sums.iter_mut().zip(&inputs) {
                    sums[i] = _mm256_dpbusd_avx_epi32(sums[i], input, weights);
                }
            }
        }
        let [s0, s1] = sums;
        for i in 0..REGS {
            let row = half * HALF_ROWS + 8 * i;
            // SAFETY: `row + 8 ≤ BLOCK_ROWS` for the sums, scales and `acc`.
            unsafe {
                let q_sums = _mm256_loadu_si256(part.sums.as_ptr().add(row) as *const _);
                let top = _mm256_sub_epi32(s1[i], _mm256_slli_epi32::<7>(q_sums));
                let total = _mm256_mul_ps(_mm256_cvtepi32_ps(top), _mm256_set1_ps(1.0 / 128.0));
                let total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[i]), _mm256_set1_ps(pow2(-15)), total);
                let scales = _mm256_loadu_ps(part.scales.as_ptr().add(row));
                let out = acc.as_mut_ptr().add(row);
                _mm256_storeu_ps(out, _mm256_fmadd_ps(total, scales, _mm256_loadu_ps(out)));
            }
        }
    }
}

/// `accumulate` for CPUs with AVX2 but neither VNNI: 16 weights (4 rows of a quad) at a time
/// are widened to 16 bits and multiplied by the quad's four 16-bit inputs with `vpmaddwd`, which
/// sums them in pairs; each row's two pair sums are added at the end, in f32. The integer sums
/// are exact (at most `2 · 256 quads · 127 · 32767 < 2^31` for the widest part), so the error is
/// the inputs' rounding, at most `2^-16` each (`2^-15` at ±1), and one f32 rounding.
///
/// # Safety
/// The CPU must have AVX2 (`Int8Kernel::Avx2Wide.runs_here()`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn accumulate_wide(acc: &mut [f32; BLOCK_ROWS], part: &Int8Part, x: &[Limbs]) {
    use std::arch::x86_64::*;
    const HALF_ROWS: usize = BLOCK_ROWS / 2;
    /// Registers of sums per half: four rows each, two lanes a row.
    const REGS: usize = HALF_ROWS / 4;
    assert!(part.weights.len() >= x.len() * QUAD_BYTES);
    let w = part.weights.as_ptr();
    let unit = _mm256_set1_ps(pow2(-(FRAC_BITS as i32)));
    for half in 0..2 {
        let mut sums = [_mm256_setzero_si256(); REGS];
        for (p, words) in x.iter().enumerate() {
            // SAFETY: quad `p` of the part holds `QUAD_BYTES`; this half reads its first or
            // second `4 · HALF_ROWS` of them (asserted above).
            let quad = unsafe { w.add(p * QUAD_BYTES + half * 4 * HALF_ROWS) };
            let inputs = _mm256_set1_epi64x((words[0] as u64 | (words[1] as u64) << 32) as i64);
            for (i, sum) in sums.iter_mut().enumerate() {
                // SAFETY: as above, 16 bytes of the half quad: rows 4i to 4i + 3.
                let bytes = unsafe { _mm_loadu_si128(quad.add(16 * i) as *const _) };
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_cvtepi8_epi16(bytes), inputs));
            }
        }
        for pair in 0..REGS / 2 {
            // Lanes (2r, 2r + 1) of a register hold row r's two pair sums: add them (as floats,
            // since the two together may pass 2^31), and put the eight rows of two registers
            // back in order.
            let (low, high) = (_mm256_cvtepi32_ps(sums[2 * pair]), _mm256_cvtepi32_ps(sums[2 * pair + 1]));
            let rows = _mm256_castps_pd(_mm256_hadd_ps(low, high));
            let rows = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(rows));
            let row = half * HALF_ROWS + 8 * pair;
            // SAFETY: `row + 8 ≤ BLOCK_ROWS` for the scales and `acc`.
            unsafe {
                let total = _mm256_mul_ps(rows, unit);
                let scales = _mm256_loadu_ps(part.scales.as_ptr().add(row));
                let out = acc.as_mut_ptr().add(row);
                _mm256_storeu_ps(out, _mm256_fmadd_ps(total, scales, _mm256_loadu_ps(out)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn rounding_puts_rows_on_a_grid_it_finds_again() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for case in 0..200 {
            let scale = 10f32.powi(rng.random_range(-4..2));
            let mut row: Vec<f32> = (0..37).map(|_| rng.random_range(-scale..scale)).collect();
            if case == 0 {
                row[3] = 127.0 * pow2(-5); // exactly the top of a grid
            }
            let original = row.clone();
            assert_eq!(row_exponent(&row), None, "random weights are not on a grid");
            round_row(&mut row);
            let e = row_exponent(&row).expect("a rounded row lies on its grid");
            let step = pow2(e);
            let max = original.iter().fold(0.0f32, |m, w| m.max(w.abs()));
            assert!(127.0 * step >= max && 63.5 * step < max, "the smallest grid that holds the row");
            for (w, o) in row.iter().zip(&original) {
                assert!((w - o).abs() <= step / 2.0, "{o} → {w} on a grid of {step}");
            }
            let again = row.clone();
            round_row(&mut row);
            assert_eq!(row, again, "rounding twice changes nothing");
        }
        assert_eq!(row_exponent(&[0.0; 4]), Some(0));
    }

    /// The plugin's speed and the bundles' size rest on the built-in models staying quantised,
    /// every matrix, when they are replaced.
    #[test]
    fn builtin_models_lie_on_int8_grids() {
        let model = crate::io::LoadedModel::builtin().unwrap();
        let (_, change) = quantize_model(&model.lstm, &model.config, GridScope::EveryMatrix).unwrap();
        assert_eq!(change, 0.0, "run cargo xtask quantize --every-matrix on a new built-in model");
        let chords = crate::chords::ChordModel::builtin().unwrap();
        let (_, change) = chords.lstm.quantized(GridScope::EveryMatrix).unwrap();
        assert_eq!(change, 0.0, "run cargo xtask quantize --every-matrix on a new built-in chord model");
    }

    #[test]
    fn limbs_hold_each_input_to_16_bits() {
        let xs = [-1.0f32, -0.5, 0.0, 0.3, 0.999_999_9, 1.0, 2.0, f32::NAN];
        let mut limbs = [[0u32; 2]; 2];
        split_limbs(&xs, &mut limbs);
        for (k, &x) in xs.iter().enumerate().filter(|(_, x)| !x.is_nan()) {
            let (p, t) = (k / 4, k % 4);
            let byte = |l: usize| (limbs[p][l] >> (8 * t)) & 0xff;
            let u = byte(0) | byte(1) << 8;
            let back = (u as f64 - 32768.0) / 32768.0;
            assert!((back - x.clamp(-1.0, 1.0) as f64).abs() <= 1.0 / 32768.0, "{x} → {back}");
        }
        // NaN (never an LSTM's output, but never undefined either) becomes -1: U = 0.
        assert_eq!(limbs[1].map(|word| word >> 24), [0, 0]);
        let mut padded = [[0u32; 2]; 1];
        split_limbs(&xs[..3], &mut padded);
        // The missing fourth input is zero: U = 2^15, whose top byte is 0x80.
        assert_eq!(padded[0][1] >> 24, 0x80);
    }

    #[test]
    fn words_hold_each_input_to_16_bits() {
        let xs = [-1.0f32, -0.5, 0.0, 0.3, 0.999_999_9, 1.0, 2.0, f32::NAN];
        let mut words = [[0u32; 2]; 2];
        split_words(&xs, &mut words);
        for (k, &x) in xs.iter().enumerate().filter(|(_, x)| !x.is_nan()) {
            let (p, t) = (k / 4, k % 4);
            let fixed = (words[p][t / 2] >> (16 * (t % 2))) as u16 as i16;
            let back = fixed as f64 / 32768.0;
            assert!((back - x.clamp(-1.0, 1.0) as f64).abs() <= 1.0 / 32768.0, "{x} → {back}");
        }
        // NaN (never an LSTM's output, but never undefined either) becomes -32767.
        assert_eq!((words[1][1] >> 16) as u16 as i16, -32767);
        let mut padded = [[0u32; 2]; 1];
        split_words(&xs[..3], &mut padded);
        assert_eq!(padded[0][1] >> 16, 0, "the missing fourth input is zero");
    }

    /// Each integer kernel this CPU runs, against the f64 product of the same weights, within
    /// its inputs' rounding: at most one step of the fixed point at ±1 (`2^-15`), so `Σ |w|`
    /// steps for a row. The VNNI kernels give each other's bits. Row 1 holds the largest sums a
    /// part of 1024 columns can: every weight at its grid's end, every input ±1 with its
    /// weight's sign.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn kernels_match_the_f32_product() {
        let kernels: Vec<Int8Kernel> = Int8Kernel::ALL.into_iter().filter(|k| k.runs_here()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for columns in [4, 13, 256, 1024] {
            let mut rows: Vec<Vec<f32>> = (0..BLOCK_ROWS - 3)
                .map(|_| (0..columns).map(|_| rng.random_range(-0.2f32..0.2)).collect())
                .collect();
            rows.iter_mut().for_each(|r| round_row(r));
            rows[1].iter_mut().for_each(|w| *w = 127.0 * pow2(-10) * w.signum());
            let mut refs: Vec<Option<&[f32]>> = rows.iter().map(|r| Some(r.as_slice())).collect();
            refs.extend([None, None, None]);
            let part = Int8Part::pack(&refs, columns).unwrap();
            let mut x: Vec<f32> = (0..columns).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            x.iter_mut().zip(&rows[1]).for_each(|(x, w)| *x = w.signum());
            let mut vnni_sums = Vec::new();
            for &kernel in &kernels {
                let mut limbs = vec![[0u32; 2]; num_quads(columns)];
                split_for(kernel, &x, &mut limbs);
                let mut acc = [0.5f32; BLOCK_ROWS];
                // SAFETY: `runs_here` held.
                unsafe { accumulate_with(kernel, &mut acc, &part, &limbs) };
                for (r, row) in rows.iter().enumerate() {
                    let want = 0.5 + row.iter().zip(&x).map(|(&w, &x)| w as f64 * x as f64).sum::<f64>();
                    let input_step = pow2(-(FRAC_BITS as i32)) as f64;
                    let bound = row.iter().map(|w| w.abs() as f64).sum::<f64>() * input_step + 1e-6;
                    let got = acc[r] as f64;
                    assert!((got - want).abs() < bound, "{kernel:?} row {r} of {columns}: {got} vs {want}");
                }
                assert_eq!(&acc[BLOCK_ROWS - 3..], &[0.5; 3], "{kernel:?}: padding rows add nothing");
                if kernel != Int8Kernel::Avx2Wide {
                    vnni_sums.push(acc);
                }
            }
            assert!(vnni_sums.windows(2).all(|pair| pair[0] == pair[1]), "the VNNI kernels differ");
            let mut off = rows[0].clone();
            off[0] += 1e-3;
            assert!(Int8Part::pack(&[Some(&off)], columns).is_none(), "a row off its grid is refused");
        }
    }
}
