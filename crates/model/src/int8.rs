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
//! it and packs the integers, computing the same function.
//!
//! The kernel multiplies those integers by the layer's input in 24-bit fixed point, with the
//! VNNI instruction `vpdpbusd` (unsigned bytes times signed bytes, four products summed into each
//! 32-bit lane): on 512-bit registers where the CPU has AVX-512 VNNI, and on 256-bit ones where it
//! has AVX-VNNI without AVX-512 (Intel's Alder Lake and later desktop and laptop chips). An input `x` in `[-1, 1]` (LSTM hidden states always are) becomes
//! `U = round(x · 2^23) + 2^23`, split into three bytes `U = 2^16 u2 + 2^8 u1 + u0`; with
//! `S_l = Σ q·u_l` and `Q = Σ q` over a row, `Σ q·x = 2^-7 (S_2 - 128 Q) + 2^-15 S_1 + 2^-23 S_0`.
//! The integer sums are exact; the fixed point's error is at most `2^-24` per input, so the
//! result agrees with the f32 product within about 1e-6.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::kernels::Isa;
use super::lstm::MelodyLstm;

/// Largest integer of the grid.
const Q_MAX: f32 = 127.0;
/// Fractional bits of the fixed-point inputs.
const FRAC_BITS: u32 = 23;

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
    Ok(integers
        .chunks_exact(cols.max(1))
        .zip(exponents)
        .flat_map(|(row, &e)| row.iter().map(move |&q| f32::from(q) * pow2(i32::from(e))))
        .collect())
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

/// A copy of `lstm` with the rows of its grid tensors (`is_grid_tensor`) put on their int8
/// grids, and the largest change that made to any weight.
pub fn quantize_model(lstm: &MelodyLstm, cfg: &ModelConfig) -> Result<(MelodyLstm, f32)> {
    let (tensors, largest_change) = quantize_tensors(lstm.named_tensors())?;
    let device = lstm.device().clone();
    Ok((MelodyLstm::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &device))?, largest_change))
}

/// Named tensors of any LSTM network (as `PackSource::named_tensors` lists them) with the rows
/// of the grid tensors put on their int8 grids, as f32, and the largest change to any weight.
pub fn quantize_tensors(named: Vec<(String, Tensor)>) -> Result<(HashMap<String, Tensor>, f32)> {
    let mut largest_change = 0.0f32;
    let mut tensors = HashMap::new();
    for (name, tensor) in named {
        let tensor = tensor.to_dtype(DType::F32)?;
        let tensor = if is_grid_tensor(&name) {
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

/// True where the integer kernel runs with `isa`'s instructions: AVX-512 with VNNI (and BW, for
/// the byte work around it), or AVX2 with AVX-VNNI.
pub fn runs_on(isa: Isa) -> bool {
    match isa {
        Isa::Avx512 => cpu_has_vnni(),
        Isa::Avx2Fma => cpu_has_avx_vnni(),
        Isa::Portable => false,
    }
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
    /// `[num_quads][BLOCK_ROWS][4]`: quad `p`, row `r`, byte `t` is `q` of column `4p + t`.
    pub weights: Vec<i8>,
    /// `2^e` of each row (1 for padding rows).
    pub scales: [f32; BLOCK_ROWS],
    /// `Σ q` of each row.
    pub sums: [i32; BLOCK_ROWS],
}

impl Int8Part {
    /// Packs rows that lie on their grids; `rows[r]` is `None` for a padding row. Every row
    /// holds `columns` weights. Errors (returns `None`) when a row is off its grid.
    pub fn pack(rows: &[Option<&[f32]>], columns: usize) -> Option<Self> {
        let quads = num_quads(columns);
        let mut part = Int8Part {
            weights: vec![0; quads * QUAD_BYTES],
            scales: [1.0; BLOCK_ROWS],
            sums: [0; BLOCK_ROWS],
        };
        for (r, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            let e = row_exponent(row)?;
            let scale = pow2(e);
            part.scales[r] = scale;
            for (col, &w) in row.iter().enumerate() {
                let q = (w / scale) as i8;
                part.weights[(col / 4) * QUAD_BYTES + r * 4 + col % 4] = q;
                part.sums[r] += q as i32;
            }
        }
        Some(part)
    }
}

/// An input vector in the kernel's fixed point: per quad of inputs, three words, word `l`
/// holding byte `l` of each input's `U` (see the module's notes), input `4p + t` in byte `t`.
pub type Limbs = [u32; 3];

/// Splits `xs` (each in `[-1, 1]`; anything beyond is clamped) into `out`, one `Limbs` per quad;
/// missing inputs of the last quad are zero.
#[inline(always)]
pub fn split_limbs(xs: &[f32], out: &mut [Limbs]) {
    let one = (1u32 << FRAC_BITS) as f32;
    for (p, limbs) in out.iter_mut().enumerate() {
        *limbs = [0; 3];
        for t in 0..4 {
            let x = xs.get(4 * p + t).copied().unwrap_or(0.0);
            // `max` turns NaN into the lower bound, so `bounded` is finite and within i32.
            let bounded = (x * one).round_ties_even().max(-one).min(one - 1.0);
            // SAFETY: `bounded` is a finite integer value in [-2^23, 2^23).
            let fixed: i32 = unsafe { bounded.to_int_unchecked() };
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
    // Sums per limb and register: twelve independent chains.
    let mut sums = [[_mm512_setzero_si512(); REGS]; 3];
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
    let [s0, s1, s2] = sums;
    for i in 0..REGS {
        let q_sums = _mm512_loadu_si512(part.sums.as_ptr().add(16 * i) as *const _);
        let top = _mm512_sub_epi32(s2[i], _mm512_slli_epi32::<7>(q_sums));
        let mut total = _mm512_mul_ps(_mm512_cvtepi32_ps(top), _mm512_set1_ps(1.0 / 128.0));
        total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[i]), _mm512_set1_ps(pow2(-15)), total);
        total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), _mm512_set1_ps(pow2(-23)), total);
        let scales = _mm512_loadu_ps(part.scales.as_ptr().add(16 * i));
        let out = acc.as_mut_ptr().add(16 * i);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(total, scales, _mm512_loadu_ps(out)));
    }
}

/// `acc += W x` for one packed block part with the kernel of `isa`, `x` split by `split_limbs`
/// (as many quads as the part has).
///
/// # Safety
/// `runs_on(isa)` must hold.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn accumulate_on(isa: Isa, acc: &mut [f32; BLOCK_ROWS], part: &Int8Part, x: &[Limbs]) {
    // SAFETY: the caller saw `runs_on(isa)`: AVX-512 VNNI for `Avx512`, AVX-VNNI otherwise.
    unsafe {
        match isa {
            Isa::Avx512 => accumulate(acc, part, x),
            _ => accumulate_avx(acc, part, x),
        }
    }
}

/// `accumulate` on 256-bit registers, for CPUs with AVX-VNNI but not AVX-512: the same integer
/// sums and the same f32 arithmetic on them, so the same result to the bit. Twelve 256-bit sums
/// (three limbs of 32 rows) and the three broadcast limbs fill the sixteen registers, so the
/// block's 64 rows are summed as two halves of 32, each reading its half of every quad.
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
        let mut sums = [[_mm256_setzero_si256(); REGS]; 3];
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
        let [s0, s1, s2] = sums;
        for i in 0..REGS {
            let row = half * HALF_ROWS + 8 * i;
            // SAFETY: `row + 8 ≤ BLOCK_ROWS` for the sums, scales and `acc`.
            unsafe {
                let q_sums = _mm256_loadu_si256(part.sums.as_ptr().add(row) as *const _);
                let top = _mm256_sub_epi32(s2[i], _mm256_slli_epi32::<7>(q_sums));
                let mut total = _mm256_mul_ps(_mm256_cvtepi32_ps(top), _mm256_set1_ps(1.0 / 128.0));
                total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[i]), _mm256_set1_ps(pow2(-15)), total);
                total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[i]), _mm256_set1_ps(pow2(-23)), total);
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

    /// The plugin's speed rests on the built-in model staying quantised when it is replaced.
    #[test]
    fn builtin_model_lies_on_int8_grids() {
        let model = crate::io::LoadedModel::builtin().unwrap();
        let (_, change) = quantize_model(&model.lstm, &model.config).unwrap();
        assert_eq!(change, 0.0, "run cargo xtask quantize on a new built-in model");
    }

    #[test]
    fn limbs_hold_each_input_to_24_bits() {
        let xs = [-1.0f32, -0.5, 0.0, 0.3, 0.999_999_9, 1.0, 2.0, f32::NAN];
        let mut limbs = [[0u32; 3]; 2];
        split_limbs(&xs, &mut limbs);
        for (k, &x) in xs.iter().enumerate().filter(|(_, x)| !x.is_nan()) {
            let (p, t) = (k / 4, k % 4);
            let byte = |l: usize| (limbs[p][l] >> (8 * t)) & 0xff;
            let u = byte(0) | byte(1) << 8 | byte(2) << 16;
            let back = (u as f64 - 8_388_608.0) / 8_388_608.0;
            assert!((back - x.clamp(-1.0, 1.0) as f64).abs() <= 1.2e-7, "{x} → {back}");
        }
        // NaN (never an LSTM's output, but never undefined either) becomes -1: U = 0.
        assert_eq!(limbs[1].map(|word| word >> 24), [0, 0, 0]);
        let mut padded = [[0u32; 3]; 1];
        split_limbs(&xs[..3], &mut padded);
        // The missing fourth input is zero: U = 2^23, whose top byte is 0x80.
        assert_eq!(padded[0][2] >> 24, 0x80);
    }

    #[test]
    fn kernel_matches_the_f32_product() {
        if !cpu_has_vnni() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for columns in [4, 13, 256] {
            let mut rows: Vec<Vec<f32>> = (0..BLOCK_ROWS - 3)
                .map(|_| (0..columns).map(|_| rng.random_range(-0.2f32..0.2)).collect())
                .collect();
            rows.iter_mut().for_each(|r| round_row(r));
            let mut refs: Vec<Option<&[f32]>> = rows.iter().map(|r| Some(r.as_slice())).collect();
            refs.extend([None, None, None]);
            let part = Int8Part::pack(&refs, columns).unwrap();
            let x: Vec<f32> = (0..columns).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut limbs = vec![[0u32; 3]; num_quads(columns)];
            split_limbs(&x, &mut limbs);
            let mut acc = [0.5f32; BLOCK_ROWS];
            // SAFETY: VNNI was detected above.
            unsafe { accumulate(&mut acc, &part, &limbs) };
            if cpu_has_avx_vnni() {
                let mut narrow = [0.5f32; BLOCK_ROWS];
                // SAFETY: AVX-VNNI was detected.
                unsafe { accumulate_avx(&mut narrow, &part, &limbs) };
                assert_eq!(narrow, acc, "the 256-bit kernel gives the 512-bit one's bits");
            }
            for (r, row) in rows.iter().enumerate() {
                let want = 0.5 + row.iter().zip(&x).map(|(&w, &x)| w as f64 * x as f64).sum::<f64>();
                assert!((acc[r] as f64 - want).abs() < 1e-6, "row {r} of {columns}: {} vs {want}", acc[r]);
            }
            assert_eq!(&acc[BLOCK_ROWS - 3..], &[0.5; 3], "padding rows add nothing");
            let mut off = rows[0].clone();
            off[0] += 1e-3;
            assert!(Int8Part::pack(&[Some(&off)], columns).is_none(), "a row off its grid is refused");
        }
    }
}
