//! How likely a model finds a set of songs, two ways: the recipe's windows (each symbol
//! predicted from exactly the symbols before it, every window from the zero state, the start
//! padded with delimiters) and streaming (the state carried through a whole song after the
//! delimiter run the plugin primes a fresh song with). Both count every target, song symbols
//! only (no delimiter targets) and onsets only (neither `_` nor `/`).
//! Runs on: offline threads (xtask eval, tests). Calls candle.

pub use crate::trainer::{MetricSums, ScoreSum};

use crate::trainer::{evaluate_with_memory, nll_of, EvalConfig, EvalMetrics};
use model::lstm::GenState;
use model::memory::RecallCursor;
use model::{LoadedModel, ModelError};
use music::bar::NO_BAR_POSITION;
use music::encode::{join_runs, join_songs};
use music::{Symbol, TokenId};

/// The stream the recipe's windows run over: `context_len` delimiters of padding, then each
/// song followed by the model's run of delimiters, as the training streams are joined.
pub fn windowed_stream(model: &LoadedModel, songs: &[&[Symbol]], context_len: usize) -> Vec<Symbol> {
    let mut stream = vec![Symbol::Delimiter; context_len];
    stream.extend(join_songs(songs.iter().copied(), model.config.delimiter_len));
    stream
}

/// The recipe's metric over `songs` (each in the model's key and vocabulary): every symbol
/// after the padding predicted from exactly the `eval.context_len` symbols before it (and
/// their bar positions and numbers: `bars` holds each song's `bar_step`s, or nothing when none
/// are known), each window
/// from the zero state, with the model's tune memory mixed in where it has one. The same
/// computation as training's validation, on a stream that also pads the first song. `progress`
/// hears the targets done after each batch.
pub fn windowed_likelihood(
    model: &LoadedModel,
    songs: &[&[Symbol]],
    bars: &[&[u32]],
    eval: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalMetrics, ModelError> {
    let stream = windowed_stream(model, songs, eval.context_len);
    let tokens: Vec<u32> = model.config.vocab.encode(&stream)?.into_iter().map(|t| t.0 as u32).collect();
    // The bar positions beside that stream: none for the padding and the delimiters, nor for a
    // song whose positions are not given.
    let song_bars: Vec<Vec<u32>> = songs
        .iter()
        .enumerate()
        .map(|(idx, song)| match bars.get(idx) {
            Some(given) if given.len() == song.len() => given.to_vec(),
            _ => vec![NO_BAR_POSITION as u32; song.len()],
        })
        .collect();
    let mut bar_stream = vec![NO_BAR_POSITION as u32; eval.context_len];
    bar_stream.extend(join_runs(
        song_bars.iter().map(Vec::as_slice),
        NO_BAR_POSITION as u32,
        model.config.delimiter_len,
    ));
    let memory = model.memory.as_ref();
    evaluate_with_memory(&model.lstm, memory, &tokens, &bar_stream, &model.config.vocab, eval, progress)
}

/// Targets of `windowed_likelihood` for `songs`, for a progress bar.
pub fn num_windowed_targets(model: &LoadedModel, songs: &[&[Symbol]], eval: &EvalConfig) -> usize {
    let all: usize = songs.iter().map(|s| s.len() + model.config.delimiter_len).sum();
    eval.max_targets.filter(|&max| max > 0).map_or(all, |max| all.min(max))
}

/// One song streamed as the plugin runs it: from the zero state, the model's run of delimiters,
/// then every symbol of `song` (at its bar position in `bars`, when they are known) and one
/// closing delimiter predicted from everything before it, one `LoadedModel::step_at` at a time
/// with the tune memory mixed in (the generator's own path).
pub fn streaming_likelihood(
    model: &LoadedModel,
    song: &[Symbol],
    bars: &[u32],
) -> Result<MetricSums, ModelError> {
    let vocab = &model.config.vocab;
    let lead = vec![Symbol::Delimiter; model.config.delimiter_len.max(1)];
    let lead_tokens = vocab.encode(&lead)?;
    let mut targets = song.to_vec();
    targets.push(Symbol::Delimiter);
    let target_tokens = vocab.encode(&targets)?;
    let mut state = model.new_state();
    let mut logits = vec![0.0f32; vocab.len()];
    let reader = model.lstm.bar_reader();
    let mut fed: Vec<u32> = Vec::with_capacity(lead_tokens.len() + target_tokens.len());
    let mut recall_cursor = RecallCursor::default();
    // Every step, the delimiters' too, reads what the generator reads: its bar inputs off what
    // was fed so far.
    let mut feed = |token: TokenId, bar: u32, state: &mut GenState, logits: &mut [f32]| {
        fed.push(token.0 as u32);
        let earlier = |back: usize| fed.len().checked_sub(back + 1).map(|i| fed[i]);
        let inputs: Vec<u16> = reader.inputs(bar, earlier).iter().map(|&x| x as u16).collect();
        model.step_at(token, &inputs, state, logits)?;
        let recent = &fed[fed.len().saturating_sub(model.memory_context())..];
        model.mix_memory(recent, &mut recall_cursor, logits);
        Ok::<(), ModelError>(())
    };
    for &token in &lead_tokens {
        feed(token, NO_BAR_POSITION as u32, &mut state, &mut logits)?;
    }
    let mut sums = MetricSums::default();
    for (idx, (&symbol, &token)) in targets.iter().zip(&target_tokens).enumerate() {
        let (nll, is_best) = nll_of(&logits, token.0 as usize);
        sums.add(symbol, nll, is_best);
        let bar = match bars.get(idx) {
            Some(&bar) if idx < song.len() => bar,
            _ => NO_BAR_POSITION as u32,
        };
        feed(token, bar, &mut state, &mut logits)?;
    }
    Ok(sums)
}
