//! PLACEHOLDER continuer, to be replaced by the LSTM generator of `model`: until that is merged,
//! the plugin answers with [`EchoContinuer`], which re-samples the phrase's own intervals and
//! note lengths. It is seeded and temperature-sensitive like the real model, so the plugin's
//! plumbing (streaming, live temperature, determinism) can be built and tested against it.
//! Runs on: worker.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::music::encode::StepGrid;
use crate::music::Symbol;

use super::{Constraints, Continuer, ContinuerFactory, EngineError, ModelChoice};

/// Temperatures are clamped to at least this, where sampling is all but greedy.
const MIN_TEMPERATURE: f32 = 0.01;

/// Loads [`EchoContinuer`] as the "built-in model". PLACEHOLDER: a model directory cannot be
/// loaded until the model module is merged; asking for one fails with a reason, as a broken
/// directory would.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlaceholderFactory;

impl ContinuerFactory for PlaceholderFactory {
    fn load(&self, choice: &ModelChoice) -> Result<Box<dyn Continuer>, EngineError> {
        match choice {
            ModelChoice::Builtin => Ok(Box::new(EchoContinuer::new(StepGrid::SIXTEENTHS))),
            ModelChoice::Directory(path) => {
                let reason = if std::path::Path::new(path).is_dir() {
                    "this build cannot load model directories yet".to_string()
                } else {
                    "no such directory".to_string()
                };
                Err(EngineError::ModelLoad { choice: choice.to_string(), reason })
            }
        }
    }
}

/// A value seen in the phrase and how often.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Counted<T> {
    value: T,
    count: u32,
}

/// PLACEHOLDER continuer: plays on with the intervals and note lengths of the primer, each
/// drawn with probability proportional to `count^(1/temperature)` (so near 0 it repeats the most
/// common one, at 1 it follows the phrase's own mix, above 1 it evens out).
#[derive(Clone, Debug)]
pub struct EchoContinuer {
    grid: StepGrid,
    rng: ChaCha8Rng,
    intervals: Vec<Counted<i32>>,
    lengths_steps: Vec<Counted<u32>>,
    last_pitch: Option<u8>,
    /// Steps of the current note still to hold.
    num_hold_steps: u32,
}

impl EchoContinuer {
    /// A continuer on `grid`, to be started with [`Continuer::begin`].
    pub fn new(grid: StepGrid) -> Self {
        Self {
            grid,
            rng: ChaCha8Rng::seed_from_u64(0),
            intervals: Vec::new(),
            lengths_steps: Vec::new(),
            last_pitch: None,
            num_hold_steps: 0,
        }
    }

    fn draw<T: Copy>(rng: &mut ChaCha8Rng, items: &[Counted<T>], temperature: f32) -> Option<T> {
        let max_count = items.iter().map(|c| c.count).max()? as f64;
        let exponent = 1.0 / temperature.max(MIN_TEMPERATURE) as f64;
        let weights = items.iter().map(|c| (c.count as f64 / max_count).powf(exponent));
        let total: f64 = weights.clone().sum();
        let mut pick = rng.random::<f64>() * total;
        for (item, weight) in items.iter().zip(weights) {
            if pick < weight {
                return Some(item.value);
            }
            pick -= weight;
        }
        items.last().map(|c| c.value)
    }
}

fn count<T: PartialEq + Copy>(counts: &mut Vec<Counted<T>>, value: T) {
    match counts.iter_mut().find(|c| c.value == value) {
        Some(c) => c.count += 1,
        None => counts.push(Counted { value, count: 1 }),
    }
}

impl Continuer for EchoContinuer {
    fn grid(&self) -> StepGrid {
        self.grid
    }

    fn begin(&mut self, primer: &[Symbol], seed: u64) -> Result<(), EngineError> {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        self.intervals.clear();
        self.lengths_steps.clear();
        self.last_pitch = None;
        self.num_hold_steps = 0;
        let mut current: Option<(u8, u32)> = None;
        let close = |current: &mut Option<(u8, u32)>, lengths: &mut Vec<Counted<u32>>| {
            if let Some((_, len)) = current.take() {
                count(lengths, len);
            }
        };
        for symbol in primer {
            match *symbol {
                Symbol::Pitch(pitch) => {
                    close(&mut current, &mut self.lengths_steps);
                    if let Some(last) = self.last_pitch {
                        count(&mut self.intervals, pitch as i32 - last as i32);
                    }
                    self.last_pitch = Some(pitch);
                    current = Some((pitch, 1));
                }
                Symbol::Hold => {
                    if let Some((_, len)) = &mut current {
                        *len += 1;
                    }
                }
                Symbol::Rest | Symbol::Delimiter => close(&mut current, &mut self.lengths_steps),
            }
        }
        close(&mut current, &mut self.lengths_steps);
        if self.intervals.is_empty() {
            for interval in [-2, 2, -1, 1, 0, 3, -3] {
                count(&mut self.intervals, interval);
            }
        }
        if self.lengths_steps.is_empty() {
            let quarter_steps = self.grid.steps_per_quarter;
            for len in [quarter_steps, quarter_steps / 2, quarter_steps] {
                count(&mut self.lengths_steps, len.max(1));
            }
        }
        Ok(())
    }

    fn next_symbol(&mut self, temperature: f32, constraints: &Constraints) -> Result<Symbol, EngineError> {
        if self.num_hold_steps > 0 {
            self.num_hold_steps -= 1;
            return Ok(Symbol::Hold);
        }
        let (lowest, highest) =
            (constraints.lowest_pitch as i32, constraints.highest_pitch.max(constraints.lowest_pitch) as i32);
        let interval = Self::draw(&mut self.rng, &self.intervals, temperature).unwrap_or(0);
        let len_steps = Self::draw(&mut self.rng, &self.lengths_steps, temperature).unwrap_or(1).max(1);
        let last = self.last_pitch.map_or((lowest + highest) / 2, |p| p as i32);
        // Turn back at the edges of the range rather than stick to them.
        let mut pitch = last + interval;
        if !(lowest..=highest).contains(&pitch) {
            pitch = last - interval;
        }
        let pitch = pitch.clamp(lowest, highest).clamp(0, 127) as u8;
        self.last_pitch = Some(pitch);
        self.num_hold_steps = len_steps - 1;
        Ok(Symbol::Pitch(pitch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::music::encode::parse_symbols;

    fn wide() -> Constraints {
        Constraints { lowest_pitch: 0, highest_pitch: 127, key: None, may_end: false }
    }

    fn run(primer: &str, seed: u64, temperatures: &[f32]) -> Vec<Symbol> {
        let mut c = EchoContinuer::new(StepGrid::SIXTEENTHS);
        c.begin(&parse_symbols(primer).unwrap(), seed).unwrap();
        temperatures.iter().map(|&t| c.next_symbol(t, &wide()).unwrap()).collect()
    }

    const PRIMER: &str = "60 _ 62 _ 64 _ _ _ 62 _ 60 _ 67 _ _ _ 65 _ 64 _ 62 _ _ _";

    #[test]
    fn the_same_seed_gives_the_same_symbols() {
        let temps = [1.0; 64];
        assert_eq!(run(PRIMER, 7, &temps), run(PRIMER, 7, &temps));
        assert_ne!(run(PRIMER, 7, &temps), run(PRIMER, 8, &temps));
    }

    #[test]
    fn temperature_changes_the_symbols() {
        let cold = run(PRIMER, 7, &[0.01; 64]);
        assert_ne!(run(PRIMER, 7, &[1.0; 64]), cold);
        // Near zero it always takes the most common length: six of the primer's nine notes
        // last two steps.
        let onsets = cold.iter().filter(|s| matches!(s, Symbol::Pitch(_))).count();
        assert_eq!(onsets, 32, "all quarter notes at 2 steps each: {cold:?}");
    }

    #[test]
    fn pitches_stay_in_the_range() {
        let mut c = EchoContinuer::new(StepGrid::SIXTEENTHS);
        c.begin(&parse_symbols("60 67 74 81").unwrap(), 3).unwrap();
        let narrow = Constraints { lowest_pitch: 60, highest_pitch: 72, key: None, may_end: false };
        for _ in 0..200 {
            if let Symbol::Pitch(p) = c.next_symbol(1.5, &narrow).unwrap() {
                assert!((60..=72).contains(&p), "{p}");
            }
        }
    }

    #[test]
    fn an_empty_primer_still_answers() {
        let symbols = run("", 1, &[1.0; 16]);
        assert!(matches!(symbols[0], Symbol::Pitch(_)));
    }

    #[test]
    fn directories_fail_with_a_reason() {
        let err =
            PlaceholderFactory.load(&ModelChoice::Directory("/no/such/antiphon/model".into())).err().unwrap();
        assert!(err.to_string().contains("no such directory"), "{err}");
        assert!(PlaceholderFactory.load(&ModelChoice::Builtin).is_ok());
    }
}
