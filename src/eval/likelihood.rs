//! How likely a model finds a set of songs, two ways: the recipe's windows (each symbol
//! predicted from exactly the symbols before it, every window from the zero state, the start
//! padded with delimiters) and streaming (the state carried through a whole song after the
//! delimiter run the plugin primes a fresh song with). Both count every target, song symbols
//! only (no delimiter targets) and onsets only (neither `_` nor `/`).
//! Runs on: offline threads (xtask eval, tests). Calls candle.

use crate::model::train::{evaluate, EvalConfig, EvalMetrics, Score};
use crate::model::{LoadedModel, ModelError};
use crate::music::encode::join_songs;
use crate::music::Symbol;

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

/// The stream the recipe's windows run over: `context_len` delimiters of padding, then each
/// song followed by the model's run of delimiters, as the training streams are joined.
pub fn windowed_stream(model: &LoadedModel, songs: &[&[Symbol]], context_len: usize) -> Vec<Symbol> {
    let mut stream = vec![Symbol::Delimiter; context_len];
    stream.extend(join_songs(songs.iter().copied(), model.config.delimiter_len));
    stream
}

/// The recipe's metric over `songs` (each in the model's key and vocabulary): every symbol
/// after the padding predicted from exactly the `eval.context_len` symbols before it, each
/// window from the zero state. The same computation as training's validation, on a stream that
/// also pads the first song. `progress` hears the targets done after each batch.
pub fn windowed_likelihood(
    model: &LoadedModel,
    songs: &[&[Symbol]],
    eval: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalMetrics, ModelError> {
    let stream = windowed_stream(model, songs, eval.context_len);
    let tokens: Vec<u32> = model.config.vocab.encode(&stream)?.into_iter().map(|t| t.0 as u32).collect();
    evaluate(&model.lstm, &tokens, &model.config.vocab, eval, progress)
}

/// Targets of `windowed_likelihood` for `songs`, for a progress bar.
pub fn num_windowed_targets(model: &LoadedModel, songs: &[&[Symbol]], eval: &EvalConfig) -> usize {
    let all: usize = songs.iter().map(|s| s.len() + model.config.delimiter_len).sum();
    eval.max_targets.filter(|&max| max > 0).map_or(all, |max| all.min(max))
}

/// One song streamed as the plugin runs it: from the zero state, the model's run of delimiters,
/// then every symbol of `song` and one closing delimiter predicted from everything before it,
/// one `LoadedModel::step` at a time (the generator's own path).
pub fn streaming_likelihood(model: &LoadedModel, song: &[Symbol]) -> Result<MetricSums, ModelError> {
    let vocab = &model.config.vocab;
    let lead = vec![Symbol::Delimiter; model.config.delimiter_len.max(1)];
    let lead_tokens = vocab.encode(&lead)?;
    let mut targets = song.to_vec();
    targets.push(Symbol::Delimiter);
    let target_tokens = vocab.encode(&targets)?;
    let mut state = model.new_state();
    let mut logits = vec![0.0f32; vocab.len()];
    for &token in &lead_tokens {
        model.step(token, &mut state, &mut logits)?;
    }
    let mut sums = MetricSums::default();
    for (&symbol, &token) in targets.iter().zip(&target_tokens) {
        let (nll, is_best) = nll_of(&logits, token.0 as usize);
        sums.add(symbol, nll, is_best);
        model.step(token, &mut state, &mut logits)?;
    }
    Ok(sums)
}

/// Negative log-likelihood (nats) of entry `target` under the softmax of `logits`, and whether
/// it is the largest (the first of equals, as `argmax` picks).
fn nll_of(logits: &[f32], target: usize) -> (f64, bool) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    let best = logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
    (log_sum - logits[target] as f64, best == target)
}
