//! Comparing two sets of melodies feature by feature in the manner of MGEval (Yang & Lerch 2018,
//! "On the evaluation of generative models in music"): distances between the feature values of
//! every pair of songs, a Gaussian kernel density estimate of each set of distances, and the
//! overlap area and Kullback–Leibler divergence of two such densities. Also percentiles.
//! Runs on: offline threads (xtask eval, tests). Pure numbers, no model.

use serde::{Deserialize, Serialize};

/// Points of the grid the densities are evaluated on.
const GRID_POINTS: usize = 1001;
/// The grid reaches this many bandwidths beyond the outermost samples, so both tails are kept.
const GRID_MARGIN_BANDWIDTHS: f64 = 5.0;
/// Densities below this are raised to it inside the KL divergence, which would otherwise be
/// infinite where the second density underflows.
const DENSITY_FLOOR: f64 = 1e-12;

/// Euclidean distance between two feature values of the same length (`|a - b|` for scalars).
pub fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt()
}

/// Distances between every pair of values within one set (`i < j`): n (n - 1) / 2 of them.
pub fn intra_set_distances(values: &[Vec<f64>]) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len() * values.len().saturating_sub(1) / 2);
    for (i, a) in values.iter().enumerate() {
        for b in &values[i + 1..] {
            out.push(distance(a, b));
        }
    }
    out
}

/// Distances between every value of `a` and every value of `b`: `a.len() * b.len()` of them.
pub fn inter_set_distances(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<f64> {
    a.iter().flat_map(|x| b.iter().map(move |y| distance(x, y))).collect()
}

/// Mean and (population) standard deviation, or `None` for no samples.
pub fn mean_std(samples: &[f64]) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Some((mean, var.sqrt()))
}

/// The `q`-th quantile (`q` in `[0, 1]`) with linear interpolation between order statistics
/// (NumPy's default): the median is `quantile(xs, 0.5)`. `None` for no samples.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// Scott's rule, as SciPy's `gaussian_kde` uses: the sample standard deviation (n - 1) times
/// n^(-1/5). Where that is zero or undefined (one sample, or all equal) it falls back to a
/// hundredth of `scale`, or 1e-3 when `scale` is zero, so a set of identical values is a narrow
/// peak rather than a division by zero.
pub fn scott_bandwidth(samples: &[f64], scale: f64) -> f64 {
    let n = samples.len();
    let fallback = if scale > 0.0 { scale * 0.01 } else { 1e-3 };
    if n < 2 {
        return fallback;
    }
    let mean = samples.iter().sum::<f64>() / n as f64;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let bandwidth = var.sqrt() * (n as f64).powf(-0.2);
    if bandwidth > 0.0 && bandwidth.is_finite() {
        bandwidth
    } else {
        fallback
    }
}

/// How alike two smoothed distributions are.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Similarity {
    /// Area under the smaller of the two densities: 1 for the same distribution, 0 for
    /// disjoint ones.
    pub overlap: f64,
    /// Kullback–Leibler divergence KL(p ‖ q) in nats: 0 for the same distribution, growing
    /// as q misses where p has mass.
    pub kl: f64,
}

/// Overlap area and KL(p ‖ q) of the Gaussian kernel density estimates of `p_samples` and
/// `q_samples`, each with its own Scott bandwidth. `None` when either has no samples.
pub fn similarity(p_samples: &[f64], q_samples: &[f64]) -> Option<Similarity> {
    if p_samples.is_empty() || q_samples.is_empty() {
        return None;
    }
    let (lo, hi) = span(p_samples.iter().chain(q_samples));
    let scale = hi - lo;
    similarity_with(
        p_samples,
        scott_bandwidth(p_samples, scale),
        q_samples,
        scott_bandwidth(q_samples, scale),
    )
}

/// As `similarity`, with the bandwidth of each density given.
pub fn similarity_with(
    p_samples: &[f64],
    p_bandwidth: f64,
    q_samples: &[f64],
    q_bandwidth: f64,
) -> Option<Similarity> {
    if p_samples.is_empty() || q_samples.is_empty() || p_bandwidth <= 0.0 || q_bandwidth <= 0.0 {
        return None;
    }
    let (lo, hi) = span(p_samples.iter().chain(q_samples));
    let margin = GRID_MARGIN_BANDWIDTHS * p_bandwidth.max(q_bandwidth);
    let grid = Grid::new(lo - margin, hi + margin, GRID_POINTS);
    let p = grid.density(p_samples, p_bandwidth);
    let q = grid.density(q_samples, q_bandwidth);
    let overlap: Vec<f64> = p.iter().zip(&q).map(|(a, b)| a.min(*b)).collect();
    let kl: Vec<f64> = p
        .iter()
        .zip(&q)
        .map(|(&a, &b)| if a <= 0.0 { 0.0 } else { a * (a.max(DENSITY_FLOOR) / b.max(DENSITY_FLOOR)).ln() })
        .collect();
    Some(Similarity { overlap: grid.integrate(&overlap).min(1.0), kl: grid.integrate(&kl).max(0.0) })
}

/// Smallest and largest value.
fn span<'a>(values: impl Iterator<Item = &'a f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Evenly spaced points on `[lo, hi]` (both ends included).
struct Grid {
    lo: f64,
    step: f64,
    len: usize,
}

impl Grid {
    fn new(lo: f64, hi: f64, len: usize) -> Self {
        Self { lo, step: (hi - lo) / (len - 1) as f64, len }
    }

    /// The trapezoid rule over the grid.
    fn integrate(&self, values: &[f64]) -> f64 {
        let inner: f64 = values.iter().sum();
        (inner - 0.5 * (values[0] + values[self.len - 1])) * self.step
    }

    /// The Gaussian kernel density estimate of `samples` at every grid point, normalised to
    /// integrate to 1 over the grid. Samples are first spread over their two neighbouring grid
    /// points in proportion to nearness (linear binning), so the cost is one kernel sum per pair
    /// of grid points, however many samples there are; with a grid step far below the
    /// bandwidth the error is negligible.
    fn density(&self, samples: &[f64], bandwidth: f64) -> Vec<f64> {
        let mut weights = vec![0.0; self.len];
        for &x in samples {
            let pos = ((x - self.lo) / self.step).clamp(0.0, (self.len - 1) as f64);
            let left = (pos.floor() as usize).min(self.len - 2);
            let frac = pos - left as f64;
            weights[left] += 1.0 - frac;
            weights[left + 1] += frac;
        }
        // The kernel between grid points depends only on their distance in steps.
        let reach = ((8.0 * bandwidth / self.step).ceil() as usize).min(self.len - 1);
        let kernel: Vec<f64> =
            (0..=reach).map(|k| (-0.5 * (k as f64 * self.step / bandwidth).powi(2)).exp()).collect();
        let mut density = vec![0.0; self.len];
        for (j, &w) in weights.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let from = j.saturating_sub(reach);
            let to = (j + reach).min(self.len - 1);
            for (i, d) in density.iter_mut().enumerate().take(to + 1).skip(from) {
                *d += w * kernel[i.abs_diff(j)];
            }
        }
        let total = self.integrate(&density);
        if total > 0.0 {
            density.iter_mut().for_each(|d| *d /= total);
        }
        density
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn distances_between_and_within_sets() {
        let set = vec![vec![0.0, 0.0], vec![3.0, 4.0], vec![0.0, 1.0]];
        assert_eq!(intra_set_distances(&set), vec![5.0, 1.0, 18.0f64.sqrt()]);
        let other = vec![vec![0.0, 0.0]];
        assert_eq!(inter_set_distances(&set, &other), vec![0.0, 5.0, 1.0]);
        assert!(intra_set_distances(&set[..1]).is_empty());
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let xs = [3.0, 1.0, 2.0, 10.0];
        assert_eq!(quantile(&xs, 0.5), Some(2.5));
        // Position 0.95 × 3 = 2.85: 3 + 0.85 × (10 − 3).
        assert!(close(quantile(&xs, 0.95).unwrap(), 8.95, 1e-12));
        assert_eq!(quantile(&xs, 1.0), Some(10.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(mean_std(&[1.0, 3.0]), Some((2.0, 1.0)));
    }

    #[test]
    fn scott_bandwidth_matches_scipy() {
        // SciPy: std with ddof=1 of [0, 1, 2, 3] is 1.29099; times 4^(-1/5) = 0.75786.
        assert!(close(scott_bandwidth(&[0.0, 1.0, 2.0, 3.0], 3.0), 1.290_994_4 * 4f64.powf(-0.2), 1e-6));
        assert_eq!(scott_bandwidth(&[2.0, 2.0], 4.0), 0.04);
        assert_eq!(scott_bandwidth(&[2.0], 0.0), 1e-3);
    }

    #[test]
    fn same_samples_overlap_fully() {
        let xs = [0.0, 0.5, 2.0, 2.5, 7.0];
        let s = similarity(&xs, &xs).unwrap();
        assert!(close(s.overlap, 1.0, 1e-9) && close(s.kl, 0.0, 1e-9), "{s:?}");
    }

    #[test]
    fn two_unit_gaussians_one_apart() {
        // One sample each with bandwidth 1: p = N(0, 1), q = N(1, 1). The densities cross at
        // 0.5, so the overlap is 2 Φ(−0.5) = 0.617075, and KL(p ‖ q) = (0 − 1)² / 2 = 0.5.
        let s = similarity_with(&[0.0], 1.0, &[1.0], 1.0).unwrap();
        assert!(close(s.overlap, 0.617_075, 1e-3), "{s:?}");
        assert!(close(s.kl, 0.5, 1e-3), "{s:?}");
        // Three apart: overlap 2 Φ(−1.5) = 0.133614, KL 4.5.
        let s = similarity_with(&[0.0], 1.0, &[3.0], 1.0).unwrap();
        assert!(close(s.overlap, 0.133_614, 1e-3) && close(s.kl, 4.5, 1e-2), "{s:?}");
    }

    #[test]
    fn disjoint_sets_barely_overlap() {
        let s = similarity(&[0.0, 0.1, 0.2], &[50.0, 50.1, 50.2]).unwrap();
        assert!(s.overlap < 1e-6 && s.kl > 10.0, "{s:?}");
        assert!(similarity(&[], &[1.0]).is_none());
    }
}
