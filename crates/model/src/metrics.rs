//! How well a model predicted some targets: cross-entropy in nats per symbol and accuracy, over
//! every target, song symbols only, and onsets only (the recipe's validation metric, and what
//! the tune memory's records and evaluation report).
//! Runs on: any thread but the audio thread (pure arithmetic; `MetricSums` does not allocate).

use music::Symbol;
use serde::{Deserialize, Serialize};

/// Cross-entropy (nats per symbol) and accuracy over some targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Targets counted.
    pub num_targets: usize,
    /// Mean negative log-likelihood, in nats.
    pub loss: f64,
    /// Share of targets that were the most likely symbol.
    pub accuracy: f64,
}

/// The recipe's validation metric on one stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Every target.
    pub all: Score,
    /// Song symbols only: targets that are not `/`.
    pub song: Score,
    /// Onsets only: targets that are a pitch or `r` (neither `_` nor `/`).
    pub non_hold: Score,
}

/// Running sums of negative log-likelihood and correct guesses.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScoreSum {
    /// Targets counted.
    pub num_targets: usize,
    /// Sum of the negative log-likelihoods, in nats.
    pub nll_sum: f64,
    /// Targets that were the most likely symbol.
    pub num_correct: usize,
}

impl ScoreSum {
    /// Counts one target.
    pub fn add(&mut self, nll: f64, is_correct: bool) {
        self.num_targets += 1;
        self.nll_sum += nll;
        self.num_correct += is_correct as usize;
    }

    /// Adds another sum to this one.
    pub fn merge(&mut self, other: &ScoreSum) {
        self.num_targets += other.num_targets;
        self.nll_sum += other.nll_sum;
        self.num_correct += other.num_correct;
    }

    /// Mean loss and accuracy (0 for no targets).
    pub fn score(&self) -> Score {
        let n = self.num_targets.max(1) as f64;
        Score { num_targets: self.num_targets, loss: self.nll_sum / n, accuracy: self.num_correct as f64 / n }
    }
}

/// The three target sets of `EvalMetrics`, as sums, so songs can be added up.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MetricSums {
    /// Every target.
    pub all: ScoreSum,
    /// Targets that are not `/`.
    pub song: ScoreSum,
    /// Targets that are a pitch or `r`.
    pub non_hold: ScoreSum,
}

impl MetricSums {
    /// Counts one target `symbol` with its loss.
    pub fn add(&mut self, symbol: Symbol, nll: f64, is_correct: bool) {
        self.all.add(nll, is_correct);
        if symbol != Symbol::Delimiter {
            self.song.add(nll, is_correct);
            if symbol != Symbol::Hold {
                self.non_hold.add(nll, is_correct);
            }
        }
    }

    /// Adds another song's sums.
    pub fn merge(&mut self, other: &MetricSums) {
        self.all.merge(&other.all);
        self.song.merge(&other.song);
        self.non_hold.merge(&other.non_hold);
    }

    /// The means.
    pub fn metrics(&self) -> EvalMetrics {
        EvalMetrics { all: self.all.score(), song: self.song.score(), non_hold: self.non_hold.score() }
    }
}

/// Negative log-likelihood (nats) of entry `target` under the softmax of `logits`, and whether
/// it is the largest (the first of equals, as `argmax` picks).
pub fn nll_of(logits: &[f32], target: usize) -> (f64, bool) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    let best = logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
    (log_sum - logits[target] as f64, best == target)
}
