//! CPU building blocks of the fast generation step (`fast`) and the fused training cell
//! (`fused`): which vector instructions this CPU has, activation functions written so the
//! compiler vectorises them, and a small packed matrix product (f32, or bfloat16 on AMX tiles
//! or with AVX-512 BF16 for training).
//! Runs on: the worker thread (generation) and offline threads (training). Nothing the worker
//! calls allocates or locks; the bfloat16 product, which only training calls, keeps a buffer
//! per thread for its packed left-hand side.
//!
//! The crate is built for baseline x86-64, so every kernel is written once as an
//! `#[inline(always)]` generic body (a `Kernel`) and `Isa::run` instantiates it inside
//! `#[target_feature]` functions for AVX-512 and AVX2 + FMA (each with or without an integer
//! kernel's instructions); `Isa::detect`
//! picks one at run time. Hand-written intrinsics (the packed matrix product here, the int8
//! product in `int8`) are `#[target_feature]` functions of their own; AMX's tile instructions,
//! whose intrinsics are not stable, are `asm!`. The portable instance (SSE2, or
//! any other architecture) computes the same function, with fused multiply-adds only where the
//! baseline has them (aarch64).

use crate::int8::Int8Kernel;

/// The vector instruction sets a kernel can be instantiated for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (with AVX2, FMA and F16C): 16 floats per register.
    Avx512,
    /// AVX2 with FMA and F16C: 8 floats per register.
    Avx2Fma,
    /// Whatever the build's baseline has: SSE2 on x86-64, without fused multiply-adds; NEON on
    /// aarch64, with them.
    Portable,
}

impl Isa {
    /// The best set this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // F16C converts half-precision weights (`fast`); every CPU with AVX2 and FMA has it.
            let has_avx2_fma = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if has_avx2_fma && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if has_avx2_fma {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }

    /// The set's name as printed by benchmarks.
    pub fn name(&self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

/// A kernel written once as a generic body, which `Isa::run` compiles for each instruction set:
/// the body is `#[inline(always)]`, so it is inlined into a `#[target_feature]` function and the
/// compiler vectorises it with that set's instructions. The one way this crate dispatches on
/// the CPU: a new kernel implements this trait and calls `isa.run(...)`.
pub trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The body. `FMA`: fused multiply-adds are available (`madd`); `INT8`: an integer kernel
    /// is (`int8::Int8Kernel`, the one `Isa::run` was given).
    fn run<const FMA: bool, const INT8: bool>(self) -> Self::Output;
}

impl Isa {
    /// Runs `kernel` compiled for this set; with `int8`, compiled for that integer kernel's
    /// instructions too (which the CPU must have: `Int8Kernel::runs_here`).
    #[inline]
    pub fn run<K: Kernel>(self, int8: Option<Int8Kernel>, kernel: K) -> K::Output {
        debug_assert!(int8.is_none_or(Int8Kernel::runs_here), "{int8:?} asked of a CPU without it");
        match (self, int8) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Int8Kernel::Avx512Vnni` only runs where the CPU reports AVX-512F, BW and
            // VNNI (and so AVX2 and FMA); `Isa::Avx512` only where it reports AVX-512F, AVX2, FMA.
            (_, Some(Int8Kernel::Avx512Vnni)) => unsafe { on_avx512_vnni(kernel) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, without VNNI.
            (Isa::Avx512, None) => unsafe { on_avx512(kernel) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Int8Kernel::AvxVnni` only runs where the CPU reports AVX2, FMA and AVX-VNNI.
            (_, Some(Int8Kernel::AvxVnni)) => unsafe { on_avx2_vnni(kernel) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Int8Kernel::Avx2Wide` only runs where `Isa::detect` found AVX2 and FMA.
            (_, Some(Int8Kernel::Avx2Wide)) => unsafe { on_avx2_int8(kernel) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2Fma` is only chosen when the CPU reports AVX2 and FMA.
            (Isa::Avx2Fma, None) => unsafe { on_avx2(kernel) },
            // aarch64's baseline fuses: `mul_add` is one `fmadd` (`fmla` on four lanes).
            _ => kernel.run::<{ cfg!(target_arch = "aarch64") }, false>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn on_avx512_vnni<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true, true>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn on_avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true, false>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn on_avx2_vnni<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true, true>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2_int8<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true, true>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true, false>()
}

/// `a · b + c`, fused (one rounding) when `FMA`; `FMA` is only true inside functions compiled
/// with the `fma` feature, or on aarch64, where `mul_add` is one instruction rather than a
/// library call.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` within about 2 ulp for `x` in `[-87, 88]` (clamped outside it), in plain arithmetic so
/// a loop over it vectorises: `e^x = 2^n e^r` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and
/// `e^r` from Cephes' degree-7 polynomial.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer in any vector width.
    const ROUNDER: f32 = 12_582_912.0;
    // ln 2 split in two, so `n · LN2_HI` is exact and `r` keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = rounded - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // `rounded` lies in [2^23, 2^24), where the step is 1, so its bits are the rounder's plus
    // n (read that way rather than by a float-to-int conversion, which stops vectorisation).
    // n ∈ [-126, 127] after the clamp, so the biased exponent is a normal one.
    let n_bits = rounded.to_bits().wrapping_sub(ROUNDER.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    e_r * two_n
}

/// The logistic function `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `tanh x = 2 σ(2x) - 1`; its absolute error stays below about 1e-7.
#[inline(always)]
pub fn tanh_approx(x: f32) -> f32 {
    2.0 / (1.0 + exp_approx(-2.0 * x)) - 1.0
}

/// Columns per packed panel of a matrix product's right-hand side.
pub const PANEL_COLS: usize = 16;
/// Most rows of the left-hand side one micro-kernel call covers, by the floats per register of
/// the instruction set (`LANES`, 1 for the portable body): a row of a panel is two AVX2
/// registers or one AVX-512 register, and each row of the tile keeps that many accumulators, so
/// AVX-512's 32 registers hold twice the rows of AVX2's 16.
const fn max_tile_rows(lanes: usize) -> usize {
    if lanes == 16 {
        12
    } else {
        6
    }
}
/// Depth of one pass over a panel: `KC · PANEL_COLS` floats (16 KiB) stay in the L1 cache.
const KC: usize = 256;

/// The right-hand side `B` (`[k, n]`) of a matrix product, packed once and reused by every
/// product with it: `[n / PANEL_COLS][k][PANEL_COLS]`, the last panel padded with zero columns.
/// After `round_to_bf16`, `[n / PANEL_COLS][pairs][PANEL_COLS]` 32-bit words instead, each the
/// bfloat16 values of rows `2q` (low half) and `2q + 1` (high half) of one column, `pairs` being
/// `k / 2` rounded up to a whole AMX tile (`AMX_PAIRS`, zeros after `k`): the layout of an
/// AMX tile of `B`.
#[derive(Clone, Debug, Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
    bf16: bool,
}

impl PackedB {
    /// Packs `B` whose element `(row, col)` is `src[row * row_stride + col * col_stride]`,
    /// reusing this buffer.
    pub fn pack(&mut self, k: usize, n: usize, src: &[f32], row_stride: usize, col_stride: usize) {
        let num_panels = n.div_ceil(PANEL_COLS);
        self.k = k;
        self.n = n;
        self.bf16 = false;
        self.data.clear();
        self.data.resize(num_panels * k * PANEL_COLS, 0.0);
        for (p, panel) in self.data.chunks_exact_mut(k * PANEL_COLS).enumerate() {
            let cols = (n - p * PANEL_COLS).min(PANEL_COLS);
            for (row, out) in panel.chunks_exact_mut(PANEL_COLS).enumerate() {
                let base = row * row_stride + p * PANEL_COLS * col_stride;
                if col_stride == 1 {
                    out[..cols].copy_from_slice(&src[base..base + cols]);
                } else {
                    for (j, o) in out[..cols].iter_mut().enumerate() {
                        *o = src[base + j * col_stride];
                    }
                }
            }
        }
    }

    /// Packs the row-major `B` (`[k, n]`) whose rows are the rows of `pieces` one after another
    /// (each piece a whole number of rows), reusing this buffer.
    pub fn pack_row_pieces(&mut self, n: usize, pieces: &[&[f32]]) {
        let k = pieces.iter().map(|p| p.len() / n).sum();
        let num_panels = n.div_ceil(PANEL_COLS);
        self.k = k;
        self.n = n;
        self.bf16 = false;
        self.data.clear();
        self.data.resize(num_panels * k * PANEL_COLS, 0.0);
        let rows = pieces.iter().flat_map(|p| p.chunks_exact(n));
        for (row_idx, row) in rows.enumerate() {
            for (p, cols) in row.chunks(PANEL_COLS).enumerate() {
                self.data[(p * k + row_idx) * PANEL_COLS..][..cols.len()].copy_from_slice(cols);
            }
        }
    }

    /// Rounds the packed matrix to bfloat16 (to nearest, ties to even) in pairs of rows:
    /// products with it then multiply bfloat16 and sum in f32 (`Bf16Unit`). Only where
    /// `Bf16Unit::here` finds a unit.
    pub fn round_to_bf16(&mut self) {
        if self.bf16 {
            return;
        }
        let (k, pairs) = (self.k, amx_pairs(self.k));
        let num_panels = self.n.div_ceil(PANEL_COLS);
        let mut words = vec![0.0f32; num_panels * pairs * PANEL_COLS];
        for (panel, out) in
            self.data.chunks_exact(k * PANEL_COLS).zip(words.chunks_exact_mut(pairs * PANEL_COLS))
        {
            for (q, out_row) in out.chunks_exact_mut(PANEL_COLS).take(k.div_ceil(2)).enumerate() {
                let low = &panel[2 * q * PANEL_COLS..][..PANEL_COLS];
                let high = panel.get((2 * q + 1) * PANEL_COLS..(2 * q + 2) * PANEL_COLS);
                for j in 0..PANEL_COLS {
                    out_row[j] = bf16_pair(low[j], high.map_or(0.0, |h| h[j]));
                }
            }
        }
        self.data = words;
        self.bf16 = true;
    }

    /// Columns of the packed matrix.
    pub fn n(&self) -> usize {
        self.n
    }

    /// An empty packing that will pack into `buffer`'s memory.
    pub fn with_buffer(buffer: Vec<f32>) -> Self {
        Self { k: 0, n: 0, data: buffer, bf16: false }
    }

    /// The memory of the packing, for reuse.
    pub fn into_buffer(self) -> Vec<f32> {
        self.data
    }

    /// A packed copy of `B`.
    #[cfg(test)]
    pub fn new(k: usize, n: usize, src: &[f32], row_stride: usize, col_stride: usize) -> Self {
        let mut packed = Self::default();
        packed.pack(k, n, src, row_stride, col_stride);
        packed
    }
}

/// The left-hand side `A` (`[m, k]`) of a matrix product, read in place: element `(row, col)` is
/// `data[row * row_stride + col * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `C = A B` (or `C += A B` when `accumulate`), `A` `[m, k]`, `B` packed `[k, n]`, `C` row-major
/// `[m, n]` with rows `ldc` apart. Single-threaded; callers split `m` among threads.
pub fn gemm(isa: Isa, m: usize, a: MatRef, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm: C too small");
    assert!(k == 0 || a.data.len() > (m - 1) * a.row_stride + (k - 1) * a.col_stride, "gemm: A too small");
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    if b.bf16 {
        let unit = Bf16Unit::here().expect("gemm: a bfloat16 packing on a CPU without bfloat16 products");
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        match unit {
            Bf16Unit::Amx => bf16::gemm_amx(m, a, b, c, ldc, accumulate),
            // SAFETY: `Bf16Unit::Avx512` is only found where `has_avx512_bf16` held; the
            // asserts above keep every access inside `a` and `c`.
            Bf16Unit::Avx512 => unsafe { bf16::gemm_vdp(m, a, b, c, ldc, accumulate) },
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let _ = unit;
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only chosen when the CPU reports AVX-512F, AVX2 and FMA; the
        // asserts above keep every access inside `a` and `c`.
        Isa::Avx512 => unsafe { gemm_avx512(m, a, b, c, ldc, accumulate) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only chosen when the CPU reports AVX2 and FMA; as above.
        Isa::Avx2Fma => unsafe { gemm_avx2(m, a, b, c, ldc, accumulate) },
        _ => gemm_tiles::<1>(m, a, b, c, ldc, accumulate),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gemm_avx512(m: usize, a: MatRef, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    gemm_tiles::<16>(m, a, b, c, ldc, accumulate)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_avx2(m: usize, a: MatRef, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    gemm_tiles::<8>(m, a, b, c, ldc, accumulate)
}

/// The blocking shared by every instruction set: depth blocks of `KC`, then panels, then row
/// tiles of near-equal height (so no tile is left with one or two rows). `LANES`: floats per
/// register of the tile kernel (16 AVX-512, 8 AVX2, 1 portable). Every element of `C` sums its
/// products in the same order, fused, whichever the kernel, so the SIMD kernels agree to the bit.
#[inline(always)]
fn gemm_tiles<const LANES: usize>(
    m: usize,
    a: MatRef,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (k, n) = (b.k, b.n);
    let max_rows = max_tile_rows(LANES);
    let num_tiles = m.div_ceil(max_rows);
    let tile_rows = |tile: usize, row0: usize| (m - row0) / (num_tiles - tile);
    let num_panels = n.div_ceil(PANEL_COLS);
    // One tile's block of `A`, copied depth-major (`[kc][rows]`) so the kernel reads it in
    // order from the L1 cache for every panel, whatever `A`'s strides: read in place, a
    // transposed `A` (`Σ xᵀ y`, rows a few KiB apart) made every read a new cache line, all
    // in one L1 set.
    let mut a_block = [0.0f32; KC * max_tile_rows(16)];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        if LANES != 16 && a.col_stride == 1 {
            // AVX2's 6-row tiles read a row-major `A` in place, one panel at a time across
            // every tile: measured faster for them than tile by tile.
            for p in 0..num_panels {
                let mut row0 = 0;
                for tile in 0..num_tiles {
                    let rows = tile_rows(tile, row0);
                    let tile_a = MatRef { data: &a.data[row0 * a.row_stride + k0..], ..a };
                    panel_tile::<LANES>(c, ldc, row0, rows, tile_a, b, p, k0, kc, accumulate);
                    row0 += rows;
                }
            }
            continue;
        }
        let mut row0 = 0;
        for tile in 0..num_tiles {
            let rows = tile_rows(tile, row0);
            let at = |r: usize, kk: usize| a.data[(row0 + r) * a.row_stride + (k0 + kk) * a.col_stride];
            if a.col_stride == 1 {
                for r in 0..rows {
                    (0..kc).for_each(|kk| a_block[kk * rows + r] = at(r, kk));
                }
            } else {
                for kk in 0..kc {
                    (0..rows).for_each(|r| a_block[kk * rows + r] = at(r, kk));
                }
            }
            let tile_a = MatRef { data: &a_block[..kc * rows], row_stride: 1, col_stride: rows };
            for p in 0..num_panels {
                panel_tile::<LANES>(c, ldc, row0, rows, tile_a, b, p, k0, kc, accumulate);
            }
            row0 += rows;
        }
    }
}

/// One tile of `gemm_tiles`: rows `row0..row0 + rows` of `C` against panel `p` of `b`, depth
/// `k0..k0 + kc`, `tile_a` the tile's rows of `A` from depth `k0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn panel_tile<const LANES: usize>(
    c: &mut [f32],
    ldc: usize,
    row0: usize,
    rows: usize,
    tile_a: MatRef,
    b: &PackedB,
    p: usize,
    k0: usize,
    kc: usize,
    accumulate: bool,
) {
    let (k, n) = (b.k, b.n);
    let panel = &b.data[p * k * PANEL_COLS..][k0 * PANEL_COLS..(k0 + kc) * PANEL_COLS];
    let load_c = accumulate || k0 > 0;
    let col0 = p * PANEL_COLS;
    let cols = (n - col0).min(PANEL_COLS);
    let c_tile = &mut c[row0 * ldc + col0..];
    if cols == PANEL_COLS {
        tile_dispatch::<LANES>(rows, kc, tile_a, panel, c_tile, ldc, load_c);
    } else {
        // A partial last panel goes through a full-width scratch tile.
        let mut scratch = [0.0f32; max_tile_rows(16) * PANEL_COLS];
        for r in 0..rows {
            scratch[r * PANEL_COLS..][..cols].copy_from_slice(&c_tile[r * ldc..][..cols]);
        }
        tile_dispatch::<LANES>(rows, kc, tile_a, panel, &mut scratch, PANEL_COLS, load_c);
        for r in 0..rows {
            c_tile[r * ldc..][..cols].copy_from_slice(&scratch[r * PANEL_COLS..][..cols]);
        }
    }
}

/// A tile of `rows` rows (at most `max_tile_rows(LANES)`) with the kernel compiled for it.
#[inline(always)]
fn tile_dispatch<const LANES: usize>(
    rows: usize,
    kc: usize,
    a: MatRef,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    load_c: bool,
) {
    debug_assert!(rows <= max_tile_rows(LANES));
    match rows {
        1 => tile::<LANES, 1>(kc, a, panel, c, ldc, load_c),
        2 => tile::<LANES, 2>(kc, a, panel, c, ldc, load_c),
        3 => tile::<LANES, 3>(kc, a, panel, c, ldc, load_c),
        4 => tile::<LANES, 4>(kc, a, panel, c, ldc, load_c),
        5 => tile::<LANES, 5>(kc, a, panel, c, ldc, load_c),
        // Taller tiles only for AVX-512; elsewhere `max_tile_rows` stops at 6.
        7 if LANES == 16 => tile::<LANES, 7>(kc, a, panel, c, ldc, load_c),
        8 if LANES == 16 => tile::<LANES, 8>(kc, a, panel, c, ldc, load_c),
        9 if LANES == 16 => tile::<LANES, 9>(kc, a, panel, c, ldc, load_c),
        10 if LANES == 16 => tile::<LANES, 10>(kc, a, panel, c, ldc, load_c),
        11 if LANES == 16 => tile::<LANES, 11>(kc, a, panel, c, ldc, load_c),
        12 if LANES == 16 => tile::<LANES, 12>(kc, a, panel, c, ldc, load_c),
        _ => tile::<LANES, 6>(kc, a, panel, c, ldc, load_c),
    }
}

/// One `MR × PANEL_COLS` tile of `C` over depth `kc`. The bounds of `a`, `panel` and `c` were
/// checked by `gemm` (and the slices carry them), so the SIMD bodies index through pointers.
#[inline(always)]
fn tile<const LANES: usize, const MR: usize>(
    kc: usize,
    a: MatRef,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    load_c: bool,
) {
    debug_assert!(panel.len() >= kc * PANEL_COLS && c.len() >= (MR - 1) * ldc + PANEL_COLS);
    debug_assert!(a.data.len() > (MR - 1) * a.row_stride + (kc - 1) * a.col_stride);
    #[cfg(target_arch = "x86_64")]
    if LANES == 16 {
        // SAFETY: `LANES` is 16 only inside `gemm_avx512`, compiled for AVX-512F; the indices
        // stay within the bounds asserted by `gemm` and restated above.
        unsafe { tile_avx512::<MR>(kc, a, panel, c, ldc, load_c) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if LANES == 8 {
        // SAFETY: `LANES` is 8 only inside `gemm_avx2`, compiled for AVX2 and FMA; as above.
        unsafe { tile_avx2::<MR>(kc, a, panel, c, ldc, load_c) };
        return;
    }
    let mut acc = [[0.0f32; PANEL_COLS]; MR];
    if load_c {
        for (r, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[r * ldc..][..PANEL_COLS]);
        }
    }
    for (kk, b_row) in panel.chunks_exact(PANEL_COLS).take(kc).enumerate() {
        for (r, row) in acc.iter_mut().enumerate() {
            let a_val = a.data[r * a.row_stride + kk * a.col_stride];
            for (x, &bv) in row.iter_mut().zip(b_row) {
                *x += a_val * bv;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        c[r * ldc..][..PANEL_COLS].copy_from_slice(row);
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx2<const MR: usize>(
    kc: usize,
    a: MatRef,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    load_c: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: offsets stay below the bounds the caller checked (rows < MR, depth < kc, columns
    // < PANEL_COLS) in the whole body.
    unsafe {
        let (a_ptr, b_ptr, c_ptr) = (a.data.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
        let mut lo = [_mm256_setzero_ps(); MR];
        let mut hi = [_mm256_setzero_ps(); MR];
        if load_c {
            for r in 0..MR {
                lo[r] = _mm256_loadu_ps(c_ptr.add(r * ldc));
                hi[r] = _mm256_loadu_ps(c_ptr.add(r * ldc + 8));
            }
        }
        for kk in 0..kc {
            let b_lo = _mm256_loadu_ps(b_ptr.add(kk * PANEL_COLS));
            let b_hi = _mm256_loadu_ps(b_ptr.add(kk * PANEL_COLS + 8));
            let a_col = a_ptr.add(kk * a.col_stride);
            for r in 0..MR {
                let a_val = _mm256_broadcast_ss(&*a_col.add(r * a.row_stride));
                lo[r] = _mm256_fmadd_ps(a_val, b_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(a_val, b_hi, hi[r]);
            }
        }
        for r in 0..MR {
            _mm256_storeu_ps(c_ptr.add(r * ldc), lo[r]);
            _mm256_storeu_ps(c_ptr.add(r * ldc + 8), hi[r]);
        }
    }
}

/// `tile` for AVX-512: one register per row of the tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx512<const MR: usize>(
    kc: usize,
    a: MatRef,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    load_c: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: offsets stay below the bounds the caller checked (rows < MR, depth < kc, columns
    // < PANEL_COLS) in the whole body.
    unsafe {
        let (a_ptr, b_ptr, c_ptr) = (a.data.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
        let mut acc = [_mm512_setzero_ps(); MR];
        if load_c {
            for (r, sum) in acc.iter_mut().enumerate() {
                *sum = _mm512_loadu_ps(c_ptr.add(r * ldc));
            }
        }
        for kk in 0..kc {
            let b_row = _mm512_loadu_ps(b_ptr.add(kk * PANEL_COLS));
            let a_col = a_ptr.add(kk * a.col_stride);
            for (r, sum) in acc.iter_mut().enumerate() {
                let a_val = _mm512_set1_ps(*a_col.add(r * a.row_stride));
                *sum = _mm512_fmadd_ps(a_val, b_row, *sum);
            }
        }
        for (r, sum) in acc.iter().enumerate() {
            _mm512_storeu_ps(c_ptr.add(r * ldc), *sum);
        }
    }
}

/// Depth pairs (bfloat16 words) per row of an AMX tile: 64 bytes.
const AMX_PAIRS: usize = 16;

/// Depth pairs of a bfloat16 packing of depth `k`: whole tiles, zeros after `k`.
fn amx_pairs(k: usize) -> usize {
    k.div_ceil(2 * AMX_PAIRS) * AMX_PAIRS
}

/// `x` rounded to bfloat16, to nearest with ties to even (NaN stays NaN).
fn to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let bits = x.to_bits();
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Two values as one word of bfloat16 pairs (`low` in the low half), stored in an f32's bits.
fn bf16_pair(low: f32, high: f32) -> f32 {
    f32::from_bits(u32::from(to_bf16(low)) | (u32::from(to_bf16(high)) << 16))
}

/// Where a bfloat16 packing (`PackedB::round_to_bf16`) is multiplied on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Unit {
    /// AMX tiles (`tdpbf16ps`): Intel's Sapphire Rapids and later.
    Amx,
    /// AVX-512 BF16's `vdpbf16ps` on 512-bit registers, where AMX is missing (AMD's Zen 4 and
    /// later): twice the products of an f32 fused multiply-add per instruction.
    Avx512,
}

impl Bf16Unit {
    /// The unit this CPU multiplies bfloat16 with, if any. AMX needs the kernel's leave to use
    /// the tile registers, asked once, on first call.
    pub fn here() -> Option<Self> {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            static UNIT: std::sync::OnceLock<Option<Bf16Unit>> = std::sync::OnceLock::new();
            *UNIT.get_or_init(|| {
                if bf16::request_amx() {
                    Some(Bf16Unit::Amx)
                } else {
                    bf16::has_avx512_bf16().then_some(Bf16Unit::Avx512)
                }
            })
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            None
        }
    }
}

/// The bfloat16 matrix products: on AMX tiles (Sapphire Rapids and later), `C` in 16 × 16 f32
/// tiles, each summed over 32 depth values per tile instruction, the tile instructions written
/// in `asm!` as their intrinsics are not yet stable; and with AVX-512 BF16's `vdpbf16ps`
/// elsewhere, `C` in tiles of up to 12 rows of 16 columns in registers.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod bf16 {
    use std::arch::asm;
    use std::cell::RefCell;

    use super::{amx_pairs, bf16_pair, MatRef, PackedB, AMX_PAIRS, PANEL_COLS};

    /// Rows of a tile of `C` and `A`.
    const TILE_ROWS: usize = 16;
    /// Depth pairs per block: 16 panels of `B` (256 columns) take 256 KiB.
    const BLOCK_PAIRS: usize = 256;

    /// The CPU has AVX-512 BF16 (with F and BW): the conversion `pack_a` rounds with, and
    /// `vdpbf16ps`.
    pub(super) fn has_avx512_bf16() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }

    /// Asks the kernel for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`) once the CPU reports AMX-TILE and AMX-BF16, and AVX-512 BF16;
    /// true if granted.
    pub(super) fn request_amx() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // CPUID leaf 7 reports zeros where a feature is missing.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        if !(amx_bf16 && amx_tile && has_avx512_bf16()) {
            return false;
        }
        // SAFETY: a system call with integer arguments only; it changes this process's
        // permitted extended state and nothing else.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// The tile configuration `ldtilecfg` reads: palette 1, every tile 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    thread_local! {
        /// `A` in bfloat16 pairs, `[rows][pairs]`, kept per thread.
        static A_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// `A` (`[m, k]`) as bfloat16 pairs into `out` (`[m rounded up to TILE_ROWS][pitch]`
    /// words), zeros after `m` and `k`, in one pass in `A`'s own order. Rounded by AVX-512
    /// BF16's conversion: to nearest even, as `to_bf16`, with subnormals flushed to zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_a(a: MatRef, m: usize, k: usize, pitch: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        out.fill(0.0);
        if a.col_stride == 1 {
            // Rows in place: 32 depth values of a row become 16 words.
            for r in 0..m {
                let src = &a.data[r * a.row_stride..][..k];
                let dst = &mut out[r * pitch..][..k.div_ceil(2)];
                let mut chunks = src.chunks_exact(2 * AMX_PAIRS);
                for (chunk, words) in chunks.by_ref().zip(dst.chunks_exact_mut(AMX_PAIRS)) {
                    // SAFETY: 32 floats read from `chunk`, 16 words written to `words`.
                    unsafe {
                        let low = _mm512_loadu_ps(chunk.as_ptr());
                        let high = _mm512_loadu_ps(chunk.as_ptr().add(16));
                        let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                        _mm512_storeu_si512(words.as_mut_ptr().cast(), bf);
                    }
                }
                let done = (k / (2 * AMX_PAIRS)) * AMX_PAIRS;
                let rest = chunks.remainder();
                for (q, word) in dst[done..].iter_mut().enumerate().take(rest.len().div_ceil(2)) {
                    *word = bf16_pair(rest[2 * q], rest.get(2 * q + 1).copied().unwrap_or(0.0));
                }
            }
            return;
        }
        // Columns in place (a transposed `A`): two depth values of 16 rows become one word per
        // row, the two columns interleaved.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        let column = |row0: usize, kk: usize| {
            let mut col = [0.0f32; TILE_ROWS];
            if kk < k {
                let rows = (m - row0).min(TILE_ROWS);
                for (r, x) in col.iter_mut().enumerate().take(rows) {
                    *x = a.data[(row0 + r) * a.row_stride + kk * a.col_stride];
                }
            }
            col
        };
        for q in 0..k.div_ceil(2) {
            for row0 in (0..m).step_by(TILE_ROWS) {
                let (even, odd) = (column(row0, 2 * q), column(row0, 2 * q + 1));
                let mut words = [0u32; TILE_ROWS];
                // SAFETY: 16 floats read from each column, 16 words written to `words`.
                unsafe {
                    let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                        _mm512_loadu_ps(odd.as_ptr()),
                        _mm512_loadu_ps(even.as_ptr()),
                    ));
                    _mm512_storeu_si512(words.as_mut_ptr().cast(), _mm512_permutexvar_epi16(interleave, bf));
                }
                for (r, &word) in words.iter().enumerate() {
                    out[(row0 + r) * pitch + q] = f32::from_bits(word);
                }
            }
        }
    }

    /// `gemm` for a bfloat16 packing on AMX tiles; `Bf16Unit::here` found them.
    pub(super) fn gemm_amx(m: usize, a: MatRef, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
        let (k, n) = (b.k, b.n);
        let pairs = amx_pairs(k);
        let mut config =
            TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        for tile in 0..8 {
            config.bytes_per_row[tile] = 64;
            config.rows[tile] = TILE_ROWS as u8;
        }
        // Rows of the packed `A` one tile row longer than their pairs: rows a power of two
        // apart would all fall in one set of the L1 cache, as the transposed `A` of `Σ xᵀ y` is
        // written down a column.
        let pitch = pairs + AMX_PAIRS;
        A_ROWS.with_borrow_mut(|a_rows| {
            // Whole pairs of row blocks; `pack_a` writes every word, zeros after `m` and `k`.
            a_rows.resize(m.next_multiple_of(2 * TILE_ROWS) * pitch, 0.0);
            // SAFETY: `request_amx` (through `Bf16Unit::here`, asserted by `gemm`) checked
            // AVX-512F, BW and BF16; `A`'s rows lie inside `a` (checked by `gemm`).
            unsafe { pack_a(a, m, k, pitch, a_rows) };
            // SAFETY: `config` is a valid palette-1 configuration (8 tiles of 16 × 64 bytes);
            // `Bf16Unit::Amx` (asserted by `gemm`) means the CPU has AMX and the process may
            // use it. `tilerelease` below returns the tiles to their initial state.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) &config, options(nostack, readonly)) };
            // Depth blocks whose panels of `B` stay in the L2 cache while every row block
            // passes over them; in each, 32 × 32 blocks of `C` as four tiles (two row blocks by
            // two panels), so four independent sums share each tile of `A` and of `B`.
            let num_panels = n.div_ceil(PANEL_COLS);
            for block0 in (0..pairs).step_by(BLOCK_PAIRS) {
                let chunks = BLOCK_PAIRS.min(pairs - block0) / AMX_PAIRS;
                let load_c = accumulate || block0 > 0;
                for row0 in (0..m).step_by(2 * TILE_ROWS) {
                    for p0 in (0..num_panels).step_by(2) {
                        // Tile `2 i + j` (row block `i`, panel `j`) is summed in `sums[2 i + j]`
                        // and then added into `C` (or written, for a first block without
                        // `accumulate`): stored down `C` itself, 16 rows `ldc` apart would often
                        // share one set of the L1 cache.
                        let mut sums = [[0.0f32; TILE_ROWS * PANEL_COLS]; 4];
                        let extent = |t: usize| {
                            let (i, j) = (t / 2, t % 2);
                            let rows = m.saturating_sub(row0 + i * TILE_ROWS).min(TILE_ROWS);
                            let cols = n.saturating_sub((p0 + j) * PANEL_COLS).min(PANEL_COLS);
                            (rows, cols, (row0 + i * TILE_ROWS) * ldc + (p0 + j) * PANEL_COLS)
                        };
                        let a_tiles =
                            [0, 1].map(|i| a_rows[(row0 + i * TILE_ROWS) * pitch + block0..].as_ptr());
                        // A missing second panel repeats the first; its sums (no columns of
                        // `C`) are dropped below.
                        let b_tiles = [0, 1].map(|j| {
                            let p = (p0 + j).min(num_panels - 1);
                            b.data[(p * pairs + block0) * PANEL_COLS..].as_ptr()
                        });
                        // SAFETY: each of `sums` holds a tile of 16 rows of 16 floats; each tile
                        // of `A` 16 rows of `pitch` words (`a_rows` has whole pairs of row
                        // blocks), and each panel of `B` `chunks` tiles of 16 rows of 16 words.
                        unsafe {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack, nomem)
                            );
                            for chunk in 0..chunks {
                                asm!(
                                    "tileloadd tmm4, [{a0} + {a_stride}*1]",
                                    "tileloadd tmm6, [{b0} + {b_stride}*1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tileloadd tmm7, [{b1} + {b_stride}*1]",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    "tileloadd tmm5, [{a1} + {a_stride}*1]",
                                    "tdpbf16ps tmm2, tmm5, tmm6",
                                    "tdpbf16ps tmm3, tmm5, tmm7",
                                    a0 = in(reg) a_tiles[0].add(chunk * AMX_PAIRS),
                                    a1 = in(reg) a_tiles[1].add(chunk * AMX_PAIRS),
                                    a_stride = in(reg) pitch * 4,
                                    b0 = in(reg) b_tiles[0].add(chunk * AMX_PAIRS * PANEL_COLS),
                                    b1 = in(reg) b_tiles[1].add(chunk * AMX_PAIRS * PANEL_COLS),
                                    b_stride = in(reg) PANEL_COLS * 4,
                                    options(nostack, readonly),
                                );
                            }
                            let tile_stride = PANEL_COLS * 4;
                            asm!(
                                "tilestored [{c0} + {stride}*1], tmm0",
                                "tilestored [{c1} + {stride}*1], tmm1",
                                "tilestored [{c2} + {stride}*1], tmm2",
                                "tilestored [{c3} + {stride}*1], tmm3",
                                c0 = in(reg) sums[0].as_mut_ptr(),
                                c1 = in(reg) sums[1].as_mut_ptr(),
                                c2 = in(reg) sums[2].as_mut_ptr(),
                                c3 = in(reg) sums[3].as_mut_ptr(),
                                stride = in(reg) tile_stride,
                                options(nostack),
                            );
                        }
                        for (t, sum) in sums.iter().enumerate() {
                            let (rows, cols, at) = extent(t);
                            if cols == 0 {
                                continue;
                            }
                            for (r, sum_row) in sum.chunks_exact(PANEL_COLS).take(rows).enumerate() {
                                let c_row = &mut c[at + r * ldc..][..cols];
                                match load_c {
                                    true => c_row.iter_mut().zip(sum_row).for_each(|(c, s)| *c += s),
                                    false => c_row.copy_from_slice(&sum_row[..cols]),
                                }
                            }
                        }
                    }
                }
            }
            // SAFETY: releases the tiles configured above.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    }

    /// Most rows of a `vdpbf16ps` tile: one register of sums per row, plus the panel's row and
    /// the broadcast word, within AVX-512's 32 registers with room to spare.
    const VDP_ROWS: usize = 12;

    /// `gemm` for a bfloat16 packing with `vdpbf16ps`: `A` packed in pairs as for the tiles,
    /// then for each block of up to `VDP_ROWS` rows (kept in the L1 cache) every panel of `B`
    /// (from the L2 cache), each row's 16 sums in a register. Each instruction adds the two
    /// products of a depth pair to each of 16 sums, twice an f32 fused multiply-add's.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, BW and BF16 (`has_avx512_bf16`); `a` and `c` must hold the
    /// rows and columns `gemm` checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn gemm_vdp(
        m: usize,
        a: MatRef,
        b: &PackedB,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        let (k, n) = (b.k, b.n);
        let pairs = amx_pairs(k);
        let pitch = pairs + AMX_PAIRS;
        // Pairs past `k`'s are zeros in both packings: no need to sum them.
        let used_pairs = k.div_ceil(2);
        let num_panels = n.div_ceil(PANEL_COLS);
        // Row blocks of near-equal height, so no block is left with one or two rows.
        let num_blocks = m.div_ceil(VDP_ROWS);
        A_ROWS.with_borrow_mut(|a_rows| {
            a_rows.resize(m.next_multiple_of(2 * TILE_ROWS) * pitch, 0.0);
            // SAFETY: the caller saw AVX-512F, BW and BF16; `A`'s rows lie inside `a`.
            unsafe { pack_a(a, m, k, pitch, a_rows) };
            let mut row0 = 0;
            for block in 0..num_blocks {
                let rows = (m - row0) / (num_blocks - block);
                let block_a = &a_rows[row0 * pitch..][..rows * pitch];
                for p in 0..num_panels {
                    let panel = &b.data[p * pairs * PANEL_COLS..][..used_pairs * PANEL_COLS];
                    let col0 = p * PANEL_COLS;
                    let cols = (n - col0).min(PANEL_COLS);
                    let c_tile = &mut c[row0 * ldc + col0..];
                    // SAFETY: the caller saw the instructions; `block_a` holds `rows` rows of
                    // `pitch ≥ used_pairs` words, `panel` `used_pairs` rows of 16 words, and
                    // `c_tile` `rows` rows `ldc` apart of which `cols` columns are written.
                    unsafe {
                        match rows {
                            1 => vdp_tile::<1>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            2 => vdp_tile::<2>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            3 => vdp_tile::<3>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            4 => vdp_tile::<4>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            5 => vdp_tile::<5>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            6 => vdp_tile::<6>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            7 => vdp_tile::<7>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            8 => vdp_tile::<8>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            9 => vdp_tile::<9>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            10 => vdp_tile::<10>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            11 => vdp_tile::<11>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                            _ => vdp_tile::<VDP_ROWS>(block_a, pitch, panel, c_tile, ldc, cols, accumulate),
                        }
                    }
                }
                row0 += rows;
            }
        });
    }

    /// One `MR × PANEL_COLS` tile of `gemm_vdp`: `a` holds `MR` packed rows `pitch` words
    /// apart, `panel` the depth pairs' rows of one panel; the first `cols` columns of `c`'s
    /// `MR` rows (`ldc` apart) get the sums (added to them when `accumulate`).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn vdp_tile<const MR: usize>(
        a: &[f32],
        pitch: usize,
        panel: &[f32],
        c: &mut [f32],
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        debug_assert!(a.len() >= (MR - 1) * pitch + panel.len() / PANEL_COLS);
        debug_assert!(c.len() >= (MR - 1) * ldc + cols);
        let (a_ptr, b_ptr) = (a.as_ptr(), panel.as_ptr());
        let mut sums = [_mm512_setzero_ps(); MR];
        for q in 0..panel.len() / PANEL_COLS {
            // SAFETY: pair `q` of the panel is 16 words; of each row of `a`, one word (the
            // caller's bounds, restated above).
            unsafe {
                let b_pair: __m512bh = std::mem::transmute(_mm512_loadu_ps(b_ptr.add(q * PANEL_COLS)));
                for (r, sum) in sums.iter_mut().enumerate() {
                    let a_pair: __m512bh = std::mem::transmute(_mm512_set1_ps(*a_ptr.add(r * pitch + q)));
                    *sum = _mm512_dpbf16_ps(*sum, a_pair, b_pair);
                }
            }
        }
        let mask: __mmask16 = if cols == PANEL_COLS { 0xffff } else { (1 << cols) - 1 };
        for (r, sum) in sums.iter().enumerate() {
            // SAFETY: row `r` of `c` has `cols` columns (the caller's bounds); the mask keeps
            // the load and the store to them.
            unsafe {
                let out = c.as_mut_ptr().add(r * ldc);
                let total =
                    if accumulate { _mm512_add_ps(*sum, _mm512_maskz_loadu_ps(mask, out)) } else { *sum };
                _mm512_mask_storeu_ps(out, mask, total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_the_standard_library() {
        let mut worst = (0.0f64, 0.0f64, 0.0f64);
        for i in -40_000..=40_000 {
            let x = i as f32 * 1e-3;
            let exp_rel = ((exp_approx(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            let sig = (sigmoid(x) as f64 - 1.0 / (1.0 + (-(x as f64)).exp())).abs();
            let tanh = (tanh_approx(x) as f64 - (x as f64).tanh()).abs();
            worst = (worst.0.max(exp_rel), worst.1.max(sig), worst.2.max(tanh));
        }
        assert!(worst.0 < 4e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 2e-7, "sigmoid error {}", worst.1);
        assert!(worst.2 < 3e-7, "tanh error {}", worst.2);
    }

    #[test]
    fn activations_saturate_without_nan() {
        for x in [-1e30f32, -200.0, -88.5, 88.5, 200.0, 1e30, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(sigmoid(x).is_finite() && (0.0..=1.0).contains(&sigmoid(x)), "{x}");
            assert!(tanh_approx(x).is_finite() && tanh_approx(x).abs() <= 1.0, "{x}");
        }
        assert_eq!(sigmoid(-1e30), sigmoid(-88.0));
        assert!((tanh_approx(1e30) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn fused_and_separate_multiply_add_agree() {
        assert_eq!(madd::<true>(1.5, 2.0, 0.25), 3.25);
        assert_eq!(madd::<false>(1.5, 2.0, 0.25), 3.25);
    }

    /// `C = A B` by the definition, in f64.
    fn reference_product(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
    ) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for kk in 0..k {
                let av = a[i * a_rs + kk * a_cs] as f64;
                for j in 0..n {
                    c[i * n + j] += av * b[kk * n + j] as f64;
                }
            }
        }
        c
    }

    #[test]
    fn matrix_product_matches_the_definition() {
        // Every set this CPU runs: the portable body, AVX2 under an AVX-512 CPU too.
        let isas: Vec<Isa> = [Isa::Portable, Isa::Avx2Fma, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa == Isa::Portable || isa == Isa::detect() || Isa::detect() == Isa::Avx512)
            .collect();
        // Sizes around every tile (6 and 12 rows), panel and depth-block edge.
        let sizes =
            [(1, 1, 1), (5, 7, 16), (7, 300, 33), (13, 256, 48), (32, 513, 20), (6, 1, 17), (25, 40, 64)];
        for &(m, k, n) in &sizes {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 32.0).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
            let want = reference_product(m, k, n, &a, k, 1, &b);
            // A read transposed: the same values stored column-major.
            let mut a_t = vec![0.0f32; m * k];
            for i in 0..m {
                for kk in 0..k {
                    a_t[kk * m + i] = a[i * k + kk];
                }
            }
            let packed = PackedB::new(k, n, &b, n, 1);
            let mut simd_results: Vec<Vec<f32>> = Vec::new();
            for &isa in &isas {
                for (a_ref, label) in [
                    (MatRef { data: &a, row_stride: k, col_stride: 1 }, "row-major A"),
                    (MatRef { data: &a_t, row_stride: 1, col_stride: m }, "column-major A"),
                ] {
                    let mut c = c0.clone();
                    gemm(isa, m, a_ref, &packed, &mut c, n, true);
                    let mut fresh = vec![9.0f32; m * n];
                    gemm(isa, m, a_ref, &packed, &mut fresh, n, false);
                    for i in 0..m * n {
                        let tol = 1e-4 * (1.0 + want[i].abs());
                        assert!(
                            (c[i] as f64 - c0[i] as f64 - want[i]).abs() < tol,
                            "{isa:?} {label} {m}x{k}x{n} [{i}]"
                        );
                        assert!(
                            (fresh[i] as f64 - want[i]).abs() < tol,
                            "{isa:?} {label} {m}x{k}x{n} [{i}] fresh"
                        );
                    }
                    if isa != Isa::Portable {
                        simd_results.push(c);
                    }
                }
            }
            // Same sums in the same order, fused: AVX2 and AVX-512 agree to the bit.
            if let Some(first) = simd_results.first() {
                assert!(simd_results.iter().all(|c| c == first), "{m}x{k}x{n}: SIMD kernels differ");
            }
        }
    }

    #[test]
    fn bfloat16_product_is_the_product_of_the_rounded_matrices() {
        if Bf16Unit::here().is_none() {
            eprintln!("skipped: no bfloat16 products here");
            return;
        }
        let rounded = |x: f32| f32::from_bits(u32::from(to_bf16(x)) << 16);
        // Odd depths leave half a pair and part of a tile; 17 and 33 rows part of a row
        // block; 33 and 20 columns part of a panel.
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 16), (17, 513, 33), (32, 256, 20), (33, 40, 64)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 29.0).collect();
            let a_r: Vec<f32> = a.iter().map(|&x| rounded(x)).collect();
            let b_r: Vec<f32> = b.iter().map(|&x| rounded(x)).collect();
            let want = reference_product(m, k, n, &a_r, k, 1, &b_r);
            let exact = reference_product(m, k, n, &a, k, 1, &b);
            let mut packed = PackedB::new(k, n, &b, n, 1);
            packed.round_to_bf16();
            let mut a_t = vec![0.0f32; m * k];
            for i in 0..m {
                for kk in 0..k {
                    a_t[kk * m + i] = a[i * k + kk];
                }
            }
            for a_ref in [
                MatRef { data: &a, row_stride: k, col_stride: 1 },
                MatRef { data: &a_t, row_stride: 1, col_stride: m },
            ] {
                let c0: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
                let mut added = c0.clone();
                gemm(Isa::detect(), m, a_ref, &packed, &mut added, n, true);
                let mut fresh = vec![9.0f32; m * n];
                gemm(Isa::detect(), m, a_ref, &packed, &mut fresh, n, false);
                let scale = (k as f64).sqrt() * 2.0;
                for i in 0..m * n {
                    let got = added[i] as f64 - c0[i] as f64;
                    // Sums in f32 of bfloat16 products: close to the rounded matrices' product,
                    // and within bfloat16's precision of the exact one.
                    assert!(
                        (got - want[i]).abs() < 1e-5 * scale,
                        "{m}x{k}x{n} [{i}]: {got} against {}",
                        want[i]
                    );
                    assert!(
                        (got - exact[i]).abs() < 1e-2 * scale,
                        "{m}x{k}x{n} [{i}]: {got}, exact {}",
                        exact[i]
                    );
                    assert!((fresh[i] as f64 - want[i]).abs() < 1e-5 * scale, "{m}x{k}x{n} [{i}] fresh");
                }
            }
        }
    }

    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 512.0), 0x3f81);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert!(f32::from_bits(u32::from(to_bf16(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn a_transposed_b_packs_alike() {
        // B given transposed (column stride > 1) packs to the same panels.
        let (k, n) = (5, 19);
        let b: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        let mut b_t = vec![0.0f32; k * n];
        for r in 0..k {
            for j in 0..n {
                b_t[j * k + r] = b[r * n + j];
            }
        }
        assert_eq!(PackedB::new(k, n, &b, n, 1).data, PackedB::new(k, n, &b_t, 1, k).data);
    }
}
