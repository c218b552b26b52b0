//! The side inputs a model reads beside each token, from a token stream and its bar steps:
//! the bar position, the tokens whole bars before, what followed the latest repeat of the last
//! few symbols, and the bar number. Training reads them off its windows and the generator off
//! its history, through the same `BarReader`, so the two can never disagree.
//! Runs on: the worker and offline threads (it allocates when pushing into a `Vec`).

use arrayvec::ArrayVec;
use music::bar;

use crate::config::{MAX_BAR_LOOKBACK, MAX_SIDE_INPUTS};
use crate::ModelConfig;

/// How far back a repeat is looked for: as far as the last step of a 64-symbol window sees.
pub const REPEAT_REACH: usize = 63;

/// The shortest match of each class of repeat; the first class starts at one symbol.
const REPEAT_CLASS_STARTS: [usize; 4] = [1, 4, 10, 24];

/// Matches are not followed past this length: the last class holds every longer one.
const REPEAT_MAX_LEN: usize = 24;

/// Reads a model's bar inputs off a token stream and its `bar::bar_step`s: per input step, the
/// bar position, then for each bar of lookback the token that many bars before the target,
/// then for each class of repeat the token that followed the latest longest earlier match of
/// the symbols up to this step, in the slot of the match's length class (the others none),
/// then the row of the step's bar number.
#[derive(Clone, Debug)]
pub struct BarReader {
    /// `bar::bar_lengths` of the model's meters.
    lengths: Vec<u16>,
    lookback: usize,
    repeat_classes: usize,
    /// Bars told apart by number (0: the model reads no bar numbers).
    bar_numbers: usize,
    /// The lookback input for "nothing there": the vocabulary's length.
    none: u32,
}

impl BarReader {
    /// The reader for `cfg`'s bar inputs (a model without bars reads only positions, which it
    /// ignores).
    pub fn for_model(cfg: &ModelConfig) -> Self {
        Self {
            lengths: bar::bar_lengths(&cfg.bar_meters, cfg.grid),
            lookback: if cfg.bar_meters.is_empty() { 0 } else { cfg.bar_lookback },
            repeat_classes: if cfg.bar_meters.is_empty() { 0 } else { cfg.repeat_classes },
            bar_numbers: if cfg.bar_meters.is_empty() { 0 } else { cfg.bar_numbers },
            none: cfg.vocab_len() as u32,
        }
    }

    /// Inputs per step.
    pub fn per_step(&self) -> usize {
        1 + self.lookback + self.repeat_classes + usize::from(self.bar_numbers > 0)
    }

    /// How many recent tokens `inputs` may ask for.
    pub fn history_len(&self) -> usize {
        let bars = self.lookback * self.lengths.iter().copied().max().unwrap_or(0) as usize;
        match self.repeat_classes {
            0 => bars,
            _ => bars.max(REPEAT_REACH + 1),
        }
    }

    /// Appends the bar inputs of input step `t` of a window that starts at `window_start` to
    /// `out`: its bar position, then for each bar of lookback the token that many bars before
    /// the target `t + 1`, or "none" when the step's bar is unknown or that step lies before the
    /// window (a window sees nothing before its first symbol).
    pub fn push(&self, tokens: &[u32], bars: &[u32], window_start: usize, t: usize, out: &mut Vec<u32>) {
        let earlier =
            |back: usize| t.checked_sub(back).filter(|&idx| idx >= window_start).map(|idx| tokens[idx]);
        out.extend(self.inputs(bars[t], earlier));
    }

    /// The bar inputs of a step at `bar` (a `bar::bar_step`, as `push`), where `earlier(k)` is
    /// the token `k` steps before it (`earlier(0)`: its own), or `None` beyond what is known.
    pub fn inputs(&self, bar: u32, earlier: impl Fn(usize) -> Option<u32>) -> ArrayVec<u32, MAX_SIDE_INPUTS> {
        let position = bar::step_position(bar);
        let bar_len = self.lengths.get(position as usize).copied().unwrap_or(0) as usize;
        let mut out = ArrayVec::new();
        out.push(position as u32);
        for back in 1..=self.lookback.min(MAX_BAR_LOOKBACK) {
            // The token `back` bars before the target lies `back · bar - 1` steps before this one.
            out.push(match bar_len {
                0 => self.none,
                _ => earlier(back * bar_len - 1).unwrap_or(self.none),
            });
        }
        if self.repeat_classes > 0 {
            let found = latest_longest_match(&earlier);
            for class in 0..self.repeat_classes {
                out.push(match found {
                    Some((token, len)) if repeat_class(len, self.repeat_classes) == class => token,
                    _ => self.none,
                });
            }
        }
        if self.bar_numbers > 0 {
            out.push(bar_number_row(bar::step_bar_number(bar), self.bar_numbers));
        }
        out
    }
}

/// The row of `bar_number.weight` for a bar numbered `number` (`bar::BarClock::bar_number`) in
/// a model that tells `bar_numbers` bars apart: the row is the number itself, so unknown and the
/// pickup have their own rows, and the count starts again after the last.
fn bar_number_row(number: u16, bar_numbers: usize) -> u32 {
    let first = bar::FIRST_BAR_NUMBER as usize;
    match number as usize {
        n if n < first => n as u32,
        n => (first + (n - first) % bar_numbers) as u32,
    }
}

/// The token that followed the latest of the longest earlier matches of the symbols up to
/// this step (`earlier(0)` back), with the match's length (at most `REPEAT_MAX_LEN`), looking no
/// further back than `REPEAT_REACH`; `None` when this step's symbol has not come before.
fn latest_longest_match(earlier: &impl Fn(usize) -> Option<u32>) -> Option<(u32, usize)> {
    let mut best = None;
    let mut best_len = 0;
    for distance in 1..=REPEAT_REACH {
        let mut len = 0;
        while len < REPEAT_MAX_LEN && len + distance <= REPEAT_REACH {
            match (earlier(len), earlier(len + distance)) {
                (Some(now), Some(then)) if now == then => len += 1,
                _ => break,
            }
        }
        if len > best_len {
            // The match ends `distance` steps back; what came after it is `distance - 1` back.
            best = earlier(distance - 1).map(|next| (next, len));
            best_len = len;
            if len == REPEAT_MAX_LEN {
                break;
            }
        }
        if earlier(distance).is_none() {
            break;
        }
    }
    best
}

/// The class (of `classes`) of a match of `len` symbols: the last class also holds the
/// longer ones.
fn repeat_class(len: usize, classes: usize) -> usize {
    REPEAT_CLASS_STARTS[..classes].iter().rposition(|&start| len >= start).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_REPEAT_CLASSES;
    use music::Meter;

    #[test]
    fn bar_inputs_look_back_whole_bars_within_the_window() {
        let mut cfg = crate::config::tests::small_config();
        cfg.bar_meters = vec![Meter { numerator: 2, denominator: 4 }];
        cfg.bar_lookback = 2;
        let reader = BarReader::for_model(&cfg);
        let none = cfg.vocab_len() as u32;
        assert_eq!((reader.per_step(), reader.history_len()), (3, 16));
        // A song in 2/4 (ids 1..=8, one bar of 8 steps) after two delimiters.
        let tokens: Vec<u32> = (100..130).collect();
        let bars: Vec<u32> = [0, 0].into_iter().chain((0..28).map(|i| 1 + i % 8)).collect();
        let mut out = Vec::new();
        // Step 20 predicts step 21; a bar before that is step 13, two bars step 5.
        reader.push(&tokens, &bars, 0, 20, &mut out);
        assert_eq!(out, vec![bars[20], 113, 105]);
        // A window starting at 6 cannot see step 5.
        out.clear();
        reader.push(&tokens, &bars, 6, 20, &mut out);
        assert_eq!(out, vec![bars[20], 113, none]);
        // A delimiter has no bar to count back by.
        out.clear();
        reader.push(&tokens, &bars, 0, 1, &mut out);
        assert_eq!(out, vec![0, none, none]);

        // Four bars back: steps 13, 5, then before the stream's start.
        cfg.bar_lookback = MAX_BAR_LOOKBACK;
        let reader = BarReader::for_model(&cfg);
        assert_eq!((reader.per_step(), reader.history_len()), (5, 32));
        out.clear();
        reader.push(&tokens, &bars, 0, 20, &mut out);
        assert_eq!(out, vec![bars[20], 113, 105, none, none]);
        out.clear();
        reader.push(&tokens, &bars, 0, 29, &mut out);
        assert_eq!(out, vec![bars[29], 122, 114, 106, none]);
    }

    #[test]
    fn bar_numbers_come_last_and_count_again_after_the_last_numbered_bar() {
        let mut cfg = crate::config::tests::small_config();
        cfg.bar_meters = vec![Meter { numerator: 2, denominator: 4 }];
        cfg.bar_lookback = 1;
        cfg.bar_numbers = 4;
        let reader = BarReader::for_model(&cfg);
        assert_eq!(reader.per_step(), 3);
        let tokens: Vec<u32> = (0..80).collect();
        // A delimiter, a pickup of two steps, then bars 1 to 5 of 8 steps, numbered as a clock
        // counts them.
        let mut clock =
            bar::BarClock::new(&cfg.bar_meters, cfg.bar_meters[0], cfg.grid, -2).expect("a known meter");
        let mut bars = vec![bar::NO_BAR_POSITION as u32];
        for _ in 0..2 + 5 * 8 {
            bars.push(clock.bar_step());
            clock.advance();
        }
        let number_at = |t: usize| {
            let mut out = Vec::new();
            reader.push(&tokens, &bars, 0, t, &mut out);
            assert_eq!(out[0], bar::step_position(bars[t]) as u32, "the position comes first");
            *out.last().unwrap()
        };
        // Unknown, the pickup, bars 1 to 4, then bar 5 reads as bar 1 again.
        let rows: Vec<u32> = [0, 1, 3, 3 + 8, 3 + 16, 3 + 24, 3 + 32].into_iter().map(number_at).collect();
        assert_eq!(rows, vec![0, 1, 2, 3, 4, 5, 2]);
        assert!(rows.iter().all(|&row| (row as usize) < cfg.num_bar_number_rows()));
        // A model without bar numbers reads the same stream's positions only.
        cfg.bar_numbers = 0;
        let mut out = Vec::new();
        BarReader::for_model(&cfg).push(&tokens, &bars, 0, 20, &mut out);
        assert_eq!(out[0], bar::step_position(bars[20]) as u32);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn repeat_inputs_carry_what_followed_the_longest_latest_match() {
        let mut cfg = crate::config::tests::small_config();
        cfg.bar_meters = vec![Meter { numerator: 2, denominator: 4 }];
        cfg.repeat_classes = 3;
        let reader = BarReader::for_model(&cfg);
        let none = cfg.vocab_len() as u32;
        assert_eq!((reader.per_step(), reader.history_len()), (4, REPEAT_REACH + 1));
        let bars = vec![1; 40];
        let inputs = |tokens: &[u32], window_start: usize, t: usize| {
            let mut out = Vec::new();
            reader.push(tokens, &bars, window_start, t, &mut out);
            out[1..].to_vec()
        };
        // 1 2 3 9 | 1 2 3 7 | 1 2 3: at the last 3, the latest match of "1 2 3" ends three
        // before a 7, and an older one before a 9; both are 3 long (class 0, 1 to 3 symbols).
        let tokens = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3];
        assert_eq!(inputs(&tokens, 0, 10), vec![7, none, none]);
        // At the first 7 nothing like it came before.
        assert_eq!(inputs(&tokens, 0, 7), vec![none, none, none]);
        // At the last 3, the latest "1 2 3" (four back) came before a 7, but "1 2 3 7 1 2 3"
        // came eight back, 7 long (class 1: 4 to 9 symbols), before a 9. A window that starts
        // at 8 sees only the first.
        let tokens = [4, 1, 2, 3, 7, 1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3];
        assert_eq!(inputs(&tokens, 0, 15), vec![none, 9, none]);
        assert_eq!(inputs(&tokens, 8, 15), vec![7, none, none]);
        // Ten or more alike are the last class; twelve here, then the next 5 follows a 6 back.
        let tokens = [5, 6, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6];
        assert_eq!(inputs(&tokens, 0, 13), vec![none, none, 5]);
        assert_eq!(repeat_class(40, MAX_REPEAT_CLASSES), MAX_REPEAT_CLASSES - 1);
        assert_eq!(repeat_class(5, 1), 0);
    }
}
