//! CPU building blocks of the fast generation step (`fast`) and the fused training cell
//! (`fused`): which vector instructions this CPU has, activation functions written so the
//! compiler vectorises them, and a small packed matrix product.
//! Runs on: the worker thread (generation) and offline threads (training). Nothing here
//! allocates or locks.
//!
//! The crate is built for baseline x86-64, so every kernel is written once as an
//! `#[inline(always)]` generic body and instantiated inside `#[target_feature]` functions for
//! AVX-512 and AVX2 + FMA; `Isa::detect` picks one at run time. The portable instance (SSE2, or
//! any other architecture) computes the same function without fused multiply-adds.

/// The vector instruction sets a kernel can be instantiated for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (with AVX2 and FMA): 16 floats per register.
    Avx512,
    /// AVX2 with FMA: 8 floats per register.
    Avx2Fma,
    /// Whatever the build's baseline has (SSE2 on x86-64), without fused multiply-adds.
    Portable,
}

impl Isa {
    /// The best set this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let has_avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
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

/// `a · b + c`, fused (one rounding) when `FMA`; `FMA` is only true inside functions compiled
/// with the `fma` feature, where `mul_add` is one instruction rather than a library call.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
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
pub(crate) fn exp_approx(x: f32) -> f32 {
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer in any vector width.
    const ROUNDER: f32 = 12_582_912.0;
    // ln 2 split in two, so `n · LN2_HI` is exact and `r` keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.500_000_01;
    let e_r = p * (r * r) + r + 1.0;
    // n ∈ [-126, 127] after the clamp, so the biased exponent is a normal one.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    e_r * two_n
}

/// The logistic function `1 / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `tanh x = 2 σ(2x) - 1`; its absolute error stays below about 1e-7.
#[inline(always)]
pub(crate) fn tanh_approx(x: f32) -> f32 {
    2.0 / (1.0 + exp_approx(-2.0 * x)) - 1.0
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
}
