//! Choosing the next symbol from the model's logits: temperature, top-k, top-p, and
//! constraints (a set of allowed pitch classes, a pitch range, whether the song may end), with
//! a seeded RNG so the same seed gives the same notes.
//! Runs on: the worker and offline threads. `Sampler::sample` does not allocate once its
//! scratch buffer has grown to the vocabulary size.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use music::{PitchRules, Symbol, TokenId, Vocab};

/// Temperatures at or below this sample greedily (the most likely allowed symbol).
pub const GREEDY_TEMPERATURE: f32 = 1e-4;

/// How to choose each symbol. `Copy` and heap-free, so it can travel in a fixed-size message
/// and change between any two steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingSettings {
    /// Softmax temperature: 1.0 samples the model as trained, toward 0 tamer (at or below
    /// `GREEDY_TEMPERATURE` always the most likely symbol), above 1 wilder.
    pub temperature: f32,
    /// Sample only among the `top_k` most likely allowed symbols; 0 = no limit.
    pub top_k: usize,
    /// Sample only among the most likely allowed symbols whose probabilities add up to at
    /// least `top_p` (nucleus sampling); 1.0 = no limit.
    pub top_p: f32,
    /// The pitches a new note may have.
    pub pitches: PitchRules,
    /// Whether the song may end (the delimiter `/` may be chosen). Off for an answer that must
    /// fill its length.
    pub may_end: bool,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, pitches: PitchRules::ALL, may_end: true }
    }
}

impl SamplingSettings {
    /// True if the constraints let the model choose `symbol`. `_` and `r` are always allowed,
    /// so at least one symbol always is.
    pub fn allows(&self, symbol: Symbol) -> bool {
        match symbol {
            Symbol::Pitch(p) => self.pitches.allows(p),
            Symbol::Delimiter => self.may_end,
            Symbol::Hold | Symbol::Rest => true,
        }
    }

    /// The same constraints for music moved up by `semitones`: pitch classes and range move
    /// with it (the range clamped to 0..=127).
    pub fn transposed(&self, semitones: i32) -> Self {
        Self { pitches: self.pitches.transposed(semitones), ..*self }
    }
}

/// Draws symbols from logits with a seeded RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    rng: ChaCha8Rng,
    /// `(probability, token index)` of the allowed symbols, reused between calls.
    scratch: Vec<(f32, u16)>,
    /// The allowed symbols' sort keys and their order, reused between calls (`sort_by_rank`).
    keys: Vec<i32>,
    ranked: Vec<(f32, u16)>,
}

impl Sampler {
    /// A sampler whose draws depend only on `seed` and the logits it is given.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
            keys: Vec::new(),
            ranked: Vec::new(),
        }
    }

    /// Restarts the random sequence from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Chooses a token from `logits` (`[vocab]`, in `vocab`'s id order) under `settings`.
    /// NaN logits count as impossible; when nothing is possible the result is `_`, or the
    /// first allowed symbol when `vocab` has no `_`.
    pub fn sample(&mut self, logits: &[f32], vocab: &Vocab, settings: &SamplingSettings) -> TokenId {
        let symbols = vocab.symbols();
        let chosen =
            self.choose(logits, |idx| symbols.get(idx).is_some_and(|&s| settings.allows(s)), settings);
        chosen.map(|idx| TokenId(idx as u16)).unwrap_or_else(|| {
            vocab
                .id(Symbol::Hold)
                .or_else(|| symbols.iter().position(|&s| settings.allows(s)).map(|i| TokenId(i as u16)))
                .unwrap_or(TokenId(0))
        })
    }

    /// Chooses an index of `logits` among those `allowed` accepts, with the temperature, top-k
    /// and top-p of `settings` (its pitch rules are the caller's to apply through `allowed`).
    /// NaN and minus-infinite logits count as impossible; `None` when nothing is possible.
    pub fn choose(
        &mut self,
        logits: &[f32],
        allowed: impl Fn(usize) -> bool,
        settings: &SamplingSettings,
    ) -> Option<usize> {
        self.scratch.clear();
        let mut max_logit = f32::NEG_INFINITY;
        for (idx, &logit) in logits.iter().enumerate() {
            if allowed(idx) && !logit.is_nan() && logit > f32::NEG_INFINITY {
                self.scratch.push((logit, idx as u16));
                max_logit = max_logit.max(logit);
            }
        }
        if self.scratch.is_empty() {
            return None;
        }
        self.sort_by_rank();
        if settings.temperature <= GREEDY_TEMPERATURE || settings.temperature.is_nan() {
            return Some(self.scratch[0].1 as usize);
        }
        let mut total = 0.0f32;
        for entry in &mut self.scratch {
            entry.0 = ((entry.0 - max_logit) / settings.temperature).exp();
            total += entry.0;
        }
        let mut keep = self.scratch.len();
        if settings.top_k > 0 {
            keep = keep.min(settings.top_k);
        }
        if settings.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, entry) in self.scratch[..keep].iter().enumerate() {
                cumulative += entry.0 / total;
                if cumulative >= settings.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f32 = self.scratch[..keep].iter().map(|e| e.0).sum();
        let mut target = self.rng.random::<f32>() * kept_total;
        for entry in &self.scratch[..keep] {
            if target < entry.0 {
                return Some(entry.1 as usize);
            }
            target -= entry.0;
        }
        // Rounding left a sliver past the last weight: it belongs to the last kept symbol.
        Some(self.scratch[keep - 1].1 as usize)
    }

    /// Puts `scratch` in order, most likely first and ties in id order, so the choice is
    /// deterministic. Each entry's place is the number of entries that go before it: those
    /// more likely, and those as likely that come earlier in `scratch` (id order). For a few
    /// dozen symbols these branch-free counts, which the compiler vectorises, take a fraction
    /// of a comparison sort's time, whose branches a sampler's logits keep mispredicting.
    fn sort_by_rank(&mut self) {
        // A key that orders like the logit descending: its bits made to compare as
        // `total_cmp` does, then inverted.
        let key = |&(logit, _): &(f32, u16)| {
            let bits = logit.to_bits() as i32;
            !(bits ^ ((((bits >> 31) as u32) >> 1) as i32))
        };
        self.keys.clear();
        self.keys.extend(self.scratch.iter().map(key));
        self.ranked.clear();
        self.ranked.resize(self.scratch.len(), (0.0, 0));
        for (i, (&key, &entry)) in self.keys.iter().zip(&self.scratch).enumerate() {
            let (earlier, later) = (&self.keys[..i], &self.keys[i + 1..]);
            let rank = earlier.iter().map(|&other| u32::from(other <= key)).sum::<u32>()
                + later.iter().map(|&other| u32::from(other < key)).sum::<u32>();
            self.ranked[rank as usize] = entry;
        }
        std::mem::swap(&mut self.scratch, &mut self.ranked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use music::Key;

    fn vocab() -> Vocab {
        Vocab::for_pitch_range(60, 71)
    }

    /// Logits favouring the symbols in `favoured` by `margin`.
    fn logits_favouring(vocab: &Vocab, favoured: &[Symbol], margin: f32) -> Vec<f32> {
        vocab.symbols().iter().map(|s| if favoured.contains(s) { margin } else { 0.0 }).collect()
    }

    #[test]
    fn greedy_takes_the_best_allowed_symbol() {
        let v = vocab();
        let logits = logits_favouring(&v, &[Symbol::Pitch(61)], 5.0);
        let mut s = Sampler::new(1);
        let greedy = SamplingSettings { temperature: 0.0, ..Default::default() };
        assert_eq!(v.symbol(s.sample(&logits, &v, &greedy)), Symbol::Pitch(61));
        // C♯ is outside C major: the best allowed symbol wins instead (ties go to the lowest id).
        let in_c = SamplingSettings { pitches: PitchRules::new(0, 127, Some(Key::C_MAJOR)), ..greedy };
        assert_eq!(v.symbol(s.sample(&logits, &v, &in_c)), Symbol::Pitch(60));
    }

    #[test]
    fn constraints_hold_at_any_temperature() {
        let v = vocab();
        let logits = logits_favouring(&v, &[Symbol::Pitch(61), Symbol::Pitch(70), Symbol::Delimiter], 3.0);
        let settings = SamplingSettings {
            temperature: 5.0,
            pitches: PitchRules::new(62, 67, Some(Key::C_MAJOR)),
            may_end: false,
            ..Default::default()
        };
        let mut s = Sampler::new(9);
        for _ in 0..500 {
            let symbol = v.symbol(s.sample(&logits, &v, &settings));
            assert!(settings.allows(symbol), "{symbol}");
            if let Symbol::Pitch(p) = symbol {
                assert!([62, 64, 65, 67].contains(&p), "{p}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let v = vocab();
        // Probabilities fall with the id: the first few symbols carry nearly all the mass.
        let logits: Vec<f32> = (0..v.len()).map(|i| -(i as f32) * 2.0).collect();
        let mut s = Sampler::new(3);
        let top2 = SamplingSettings { top_k: 2, temperature: 3.0, ..Default::default() };
        let top_p = SamplingSettings { top_p: 0.5, ..Default::default() };
        for _ in 0..300 {
            assert!(s.sample(&logits, &v, &top2).0 < 2);
            // The first symbol alone has probability ≈ 0.86 ≥ 0.5.
            assert_eq!(s.sample(&logits, &v, &top_p).0, 0);
        }
    }

    #[test]
    fn same_seed_same_draws_and_temperature_spreads_them() {
        let v = vocab();
        let logits: Vec<f32> = (0..v.len()).map(|i| (i % 5) as f32 * 0.3).collect();
        let draw = |seed: u64, t: f32| {
            let mut s = Sampler::new(seed);
            let settings = SamplingSettings { temperature: t, ..Default::default() };
            (0..200).map(|_| s.sample(&logits, &v, &settings).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(4, 1.0), draw(4, 1.0));
        assert_ne!(draw(4, 1.0), draw(5, 1.0));
        let distinct = |d: Vec<u16>| d.into_iter().collect::<std::collections::BTreeSet<_>>().len();
        assert_eq!(distinct(draw(4, 0.0)), 1);
        assert!(distinct(draw(4, 10.0)) > 10);
    }

    #[test]
    fn ranking_orders_as_a_sort_by_logit_then_id() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut s = Sampler::new(0);
        for len in [1, 2, 45, 177] {
            for _ in 0..50 {
                // Few distinct values, so ties are common; signs, zeros of both signs and
                // infinities mixed in.
                let special = [0.0, -0.0, f32::INFINITY, 1e-30, -1e-30];
                s.scratch = (0..len)
                    .map(|i| {
                        let logit = match rng.random_range(0..4) {
                            0 => special[rng.random_range(0..special.len())],
                            _ => rng.random_range(-4i32..4) as f32 * 0.5,
                        };
                        (logit, i as u16)
                    })
                    .collect();
                let mut expected = s.scratch.clone();
                expected.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                s.sort_by_rank();
                let bits = |v: &[(f32, u16)]| v.iter().map(|e| (e.0.to_bits(), e.1)).collect::<Vec<_>>();
                assert_eq!(bits(&s.scratch), bits(&expected), "{len} logits");
            }
        }
    }

    #[test]
    fn nothing_possible_falls_back_to_hold() {
        let v = vocab();
        let logits = vec![f32::NAN; v.len()];
        assert_eq!(v.symbol(Sampler::new(0).sample(&logits, &v, &SamplingSettings::default())), Symbol::Hold);
    }
}
