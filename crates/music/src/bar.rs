//! Where each step falls in its bar, as one small integer per step: the metric input a model
//! may read beside each symbol. A model lists the meters it knows; every step of a melody in
//! one of them gets the id of its (meter, step within the bar) pair, and every other step
//! (delimiters, unknown or unusual meters) gets `NO_BAR_POSITION`.
//! Runs on: any thread; `BarClock` is plain arithmetic, fit for the audio thread too.

use super::{Melody, Meter, StepGrid};

/// The id of a step whose place in a bar is unknown, and of every delimiter.
pub const NO_BAR_POSITION: u16 = 0;

/// The number of a step's bar when it is unknown (delimiters, no meter).
pub const NO_BAR_NUMBER: u16 = 0;

/// The number of the pickup before a song's first bar line.
pub const PICKUP_BAR_NUMBER: u16 = 1;

/// The number of a song's first whole bar; the `k`th bar is `FIRST_BAR_NUMBER + k - 1`.
pub const FIRST_BAR_NUMBER: u16 = 2;

/// A step's place in the song, as the bar streams carry it: its position id in the low 16 bits
/// and its bar's number above them. `position` alone reads as bar number unknown.
pub fn bar_step(position: u16, number: u16) -> u32 {
    position as u32 | (number as u32) << 16
}

/// The position id of a `bar_step`.
pub fn step_position(step: u32) -> u16 {
    step as u16
}

/// The bar number of a `bar_step`.
pub fn step_bar_number(step: u32) -> u16 {
    (step >> 16) as u16
}

/// The meters a new model learns positions for: those of nearly all the folk songs in the
/// corpus (the Essen and Erk books: 2/4, 4/4, 3/4, 6/8, 4/2, 3/8, 6/4, 3/2, 2/2...).
pub const COMMON_METERS: [Meter; 12] = [
    Meter { numerator: 2, denominator: 4 },
    Meter { numerator: 3, denominator: 4 },
    Meter { numerator: 4, denominator: 4 },
    Meter { numerator: 5, denominator: 4 },
    Meter { numerator: 6, denominator: 4 },
    Meter { numerator: 2, denominator: 2 },
    Meter { numerator: 3, denominator: 2 },
    Meter { numerator: 4, denominator: 2 },
    Meter { numerator: 3, denominator: 8 },
    Meter { numerator: 6, denominator: 8 },
    Meter { numerator: 9, denominator: 8 },
    Meter { numerator: 12, denominator: 8 },
];

/// Steps in one bar of `meter` on `grid`, or `None` when a bar is not a whole number of steps.
pub fn bar_steps(meter: Meter, grid: StepGrid) -> Option<u32> {
    if meter.numerator == 0 || meter.denominator == 0 {
        return None;
    }
    let per_whole = 4 * grid.steps_per_quarter;
    let steps = meter.numerator as u32 * per_whole;
    steps.is_multiple_of(meter.denominator as u32).then(|| steps / meter.denominator as u32)
}

/// Number of ids for `meters` on `grid`: `NO_BAR_POSITION` plus one per step of each meter's
/// bar (meters whose bar is not whole steps get none).
pub fn num_bar_positions(meters: &[Meter], grid: StepGrid) -> usize {
    bar_lengths(meters, grid).len()
}

/// The bar length in steps of every id for `meters` on `grid`, indexed by id (0 for
/// `NO_BAR_POSITION`): how far back "one bar ago" lies from a step.
pub fn bar_lengths(meters: &[Meter], grid: StepGrid) -> Vec<u16> {
    let mut lengths = vec![0u16];
    for &meter in meters {
        if let Some(steps) = bar_steps(meter, grid) {
            lengths.extend(std::iter::repeat_n(steps as u16, steps as usize));
        }
    }
    lengths
}

/// Counts the steps of a bar and names each one's id. Copy, no allocation: the worker keeps
/// one per phrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarClock {
    /// Id of this meter's first step (the downbeat).
    first_id: u16,
    bar_steps: u16,
    /// Step within the bar, `0..bar_steps`.
    step: u16,
    /// The bar's number: `PICKUP_BAR_NUMBER` or counting from `FIRST_BAR_NUMBER` (never
    /// `NO_BAR_NUMBER`).
    number: u16,
}

impl BarClock {
    /// A clock for `meter` among a model's `meters`, at `step_in_bar` (taken modulo the bar):
    /// a run that starts off the downbeat starts in a pickup, and its first bar line begins the
    /// first bar. `None` when the model does not know the meter or its bar is not whole steps.
    pub fn new(meters: &[Meter], meter: Meter, grid: StepGrid, step_in_bar: i64) -> Option<Self> {
        let mut first_id = 1usize;
        for &known in meters {
            let Some(steps) = bar_steps(known, grid) else { continue };
            if known == meter {
                let step = step_in_bar.rem_euclid(steps as i64) as u16;
                return Some(Self {
                    first_id: u16::try_from(first_id).ok()?,
                    bar_steps: u16::try_from(steps).ok()?,
                    step,
                    number: if step == 0 { FIRST_BAR_NUMBER } else { PICKUP_BAR_NUMBER },
                });
            }
            first_id += steps as usize;
        }
        None
    }

    /// The id of the current step.
    pub fn id(&self) -> u16 {
        self.first_id + self.step
    }

    /// The current step within the bar (0: the downbeat).
    pub fn step_in_bar(&self) -> u32 {
        self.step as u32
    }

    /// The current bar's number since the clock started (`PICKUP_BAR_NUMBER` in a pickup, then
    /// from `FIRST_BAR_NUMBER`).
    pub fn bar_number(&self) -> u16 {
        self.number
    }

    /// The current step's position and bar number, as one `bar_step`.
    pub fn bar_step(&self) -> u32 {
        bar_step(self.id(), self.number)
    }

    /// Moves to the next step, wrapping at the bar line into the next bar.
    pub fn advance(&mut self) {
        self.step = (self.step + 1) % self.bar_steps;
        if self.step == 0 {
            self.number = self.number.saturating_add(1);
        }
    }
}

/// Where a run of steps starts: step `step_in_bar` of a bar of `meter`. Copy, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarPhase {
    pub meter: Meter,
    pub step_in_bar: u32,
}

impl BarPhase {
    /// A run that starts on a downbeat of `meter`.
    pub fn downbeat(meter: Meter) -> Self {
        Self { meter, step_in_bar: 0 }
    }

    /// The phase `steps` steps later (earlier when negative) on `grid`; unchanged when a bar of
    /// the meter is not whole steps.
    pub fn shifted(self, steps: i64, grid: StepGrid) -> Self {
        match bar_steps(self.meter, grid) {
            Some(bar) => {
                let step = (self.step_in_bar as i64 + steps).rem_euclid(bar as i64);
                Self { step_in_bar: step as u32, ..self }
            }
            None => self,
        }
    }

    /// The `pickup_beats` of a melody whose beat 0 lies at this phase: the time to its first
    /// bar line (0 on a downbeat).
    pub fn pickup_beats(self, grid: StepGrid) -> f64 {
        match bar_steps(self.meter, grid) {
            Some(bar) => ((bar - self.step_in_bar % bar) % bar) as f64 * grid.step_beats(),
            None => 0.0,
        }
    }
}

/// The step within its bar of a melody's first step (beat 0): the bar line falls at its
/// `pickup_beats`, so a pickup of one beat in 4/4 starts at step 12 of 16.
pub fn first_step_in_bar(melody: &Melody, grid: StepGrid) -> i64 {
    -(grid.nearest_steps(melody.pickup_beats) as i64)
}

/// The `bar_step`s of `len` steps of `melody` from beat 0 (its encoding's steps), for a model
/// that knows `meters`, bars numbered from the melody's start: all unknown when the melody has
/// no meter or one the model does not know.
pub fn melody_bar_steps(melody: &Melody, len: usize, meters: &[Meter], grid: StepGrid) -> Vec<u32> {
    let clock = melody.meter.and_then(|m| BarClock::new(meters, m, grid, first_step_in_bar(melody, grid)));
    match clock {
        Some(mut clock) => (0..len)
            .map(|_| {
                let step = clock.bar_step();
                clock.advance();
                step
            })
            .collect(),
        None => vec![NO_BAR_POSITION as u32; len],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: StepGrid = StepGrid::SIXTEENTHS;

    fn meter(numerator: u8, denominator: u8) -> Meter {
        Meter { numerator, denominator }
    }

    #[test]
    fn bars_in_steps() {
        assert_eq!(bar_steps(meter(4, 4), GRID), Some(16));
        assert_eq!(bar_steps(meter(6, 8), GRID), Some(12));
        assert_eq!(bar_steps(meter(3, 2), GRID), Some(24));
        assert_eq!(bar_steps(meter(7, 32), GRID), None);
        assert_eq!(bar_steps(meter(3, 0), GRID), None);
        // 8 + 12 + 16 + 20 + 24 + 16 + 24 + 32 + 6 + 12 + 18 + 24, and the unknown id.
        assert_eq!(num_bar_positions(&COMMON_METERS, GRID), 213);
    }

    #[test]
    fn every_meter_gets_its_own_ids() {
        let mut seen = std::collections::HashSet::new();
        for m in COMMON_METERS {
            let mut clock = BarClock::new(&COMMON_METERS, m, GRID, 0).unwrap();
            for _ in 0..bar_steps(m, GRID).unwrap() {
                assert!(seen.insert(clock.id()), "{m:?} reuses id {}", clock.id());
                assert!((clock.id() as usize) < num_bar_positions(&COMMON_METERS, GRID));
                clock.advance();
            }
            assert_eq!(clock.step_in_bar(), 0, "{m:?} wraps at its bar line");
        }
        assert!(!seen.contains(&NO_BAR_POSITION));
        let lengths = bar_lengths(&COMMON_METERS, GRID);
        assert_eq!(lengths.len(), num_bar_positions(&COMMON_METERS, GRID));
        let waltz = BarClock::new(&COMMON_METERS, meter(3, 4), GRID, 5).unwrap();
        assert_eq!((lengths[0], lengths[waltz.id() as usize]), (0, 12));
        assert_eq!(BarClock::new(&COMMON_METERS, meter(7, 8), GRID, 0), None);
    }

    #[test]
    fn a_pickup_starts_before_the_downbeat() {
        let mut m = crate::note::tests::melody(&[(60, 0.0, 1.0), (62, 1.0, 4.0)]);
        m.meter = Some(meter(3, 4));
        m.pickup_beats = 1.0;
        let steps = melody_bar_steps(&m, 18, &COMMON_METERS, GRID);
        let ids: Vec<u16> = steps.iter().map(|&s| step_position(s)).collect();
        let numbers: Vec<u16> = steps.iter().map(|&s| step_bar_number(s)).collect();
        let downbeat = BarClock::new(&COMMON_METERS, meter(3, 4), GRID, 0).unwrap().id();
        // Steps 0..4 are the pickup beat (steps 8..12 of the bar); step 4 is the downbeat of
        // the first bar, step 16 that of the second.
        assert_eq!(ids[4], downbeat);
        assert_eq!(ids[0], downbeat + 8);
        assert_eq!(ids[5], downbeat + 1);
        assert_eq!(ids[16], downbeat);
        assert_eq!((numbers[0], numbers[3], numbers[4], numbers[15], numbers[16]), (1, 1, 2, 2, 3));
        m.meter = None;
        assert_eq!(melody_bar_steps(&m, 3, &COMMON_METERS, GRID), vec![NO_BAR_POSITION as u32; 3]);
        assert_eq!(step_bar_number(NO_BAR_POSITION as u32), NO_BAR_NUMBER);
    }

    #[test]
    fn a_clock_counts_its_bars_from_where_it_starts() {
        let mut on_beat = BarClock::new(&COMMON_METERS, meter(2, 4), GRID, 0).unwrap();
        assert_eq!(on_beat.bar_number(), 2);
        for _ in 0..8 * 3 {
            on_beat.advance();
        }
        assert_eq!((on_beat.bar_number(), on_beat.step_in_bar()), (5, 0));
        assert_eq!(on_beat.bar_step(), bar_step(on_beat.id(), 5));
        let mut pickup = BarClock::new(&COMMON_METERS, meter(2, 4), GRID, -2).unwrap();
        assert_eq!((pickup.bar_number(), pickup.step_in_bar()), (1, 6));
        pickup.advance();
        pickup.advance();
        assert_eq!((pickup.bar_number(), pickup.step_in_bar()), (2, 0));
    }

    #[test]
    fn a_phase_moves_round_the_bar_and_names_its_pickup() {
        let waltz = BarPhase::downbeat(meter(3, 4));
        assert_eq!(waltz.pickup_beats(GRID), 0.0);
        assert_eq!(waltz.shifted(-4, GRID), BarPhase { meter: meter(3, 4), step_in_bar: 8 });
        assert_eq!(waltz.shifted(-4, GRID).pickup_beats(GRID), 1.0);
        assert_eq!(waltz.shifted(12 * 5 + 1, GRID).step_in_bar, 1);
        // A melody given that pickup starts its bar clock where the phase says.
        let mut m = crate::note::tests::melody(&[(60, 0.0, 1.0)]);
        m.meter = Some(meter(3, 4));
        m.pickup_beats = waltz.shifted(-4, GRID).pickup_beats(GRID);
        assert_eq!(first_step_in_bar(&m, GRID).rem_euclid(12), 8);
    }
}
