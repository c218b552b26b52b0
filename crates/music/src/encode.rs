//! The main recipe's time-series encoding: one symbol per step of a fixed grid (a sixteenth
//! note by default), with the pitch at a note's onset, `r` at a rest's onset, `_` while a note
//! or rest goes on, and runs of `/` between songs.
//!
//! | symbol | text  | meaning                                        |
//! |--------|-------|------------------------------------------------|
//! | `Pitch(p)` | `p` (`60`) | a note of MIDI pitch `p` starts on this step |
//! | `Rest`     | `r`   | a rest starts on this step                     |
//! | `Hold`     | `_`   | whatever sounds (note or rest) goes on         |
//! | `Delimiter`| `/`   | between songs; the recipe writes 64 in a row   |
//!
//! Runs on: any non-audio thread.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::note::{Melody, Note};

/// One step of the encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Symbol {
    /// A note of this MIDI pitch starts.
    Pitch(u8),
    /// Between songs.
    Delimiter,
    /// The sounding note or rest continues.
    Hold,
    /// A rest starts.
    Rest,
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Symbol::Pitch(p) => write!(f, "{p}"),
            Symbol::Delimiter => f.write_str("/"),
            Symbol::Hold => f.write_str("_"),
            Symbol::Rest => f.write_str("r"),
        }
    }
}

/// A symbol text that is none of `0`..`127`, `r`, `_` or `/`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a symbol (expected a MIDI pitch 0-127, 'r', '_' or '/')")]
pub struct ParseSymbolError(pub String);

impl FromStr for Symbol {
    type Err = ParseSymbolError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "/" => Ok(Symbol::Delimiter),
            "_" => Ok(Symbol::Hold),
            "r" => Ok(Symbol::Rest),
            _ => text
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 127)
                .map(Symbol::Pitch)
                .ok_or_else(|| ParseSymbolError(text.to_string())),
        }
    }
}

impl Serialize for Symbol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Symbol {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses whitespace-separated symbols: `"60 _ 62 _ r _"`.
pub fn parse_symbols(text: &str) -> Result<Vec<Symbol>, ParseSymbolError> {
    text.split_whitespace().map(str::parse).collect()
}

/// Writes symbols separated by single spaces.
pub fn symbols_to_string(symbols: &[Symbol]) -> String {
    symbols.iter().map(Symbol::to_string).collect::<Vec<_>>().join(" ")
}

/// Steps of the grid per quarter note: 4 puts one symbol on each sixteenth, 12 also keeps
/// eighth- and sixteenth-note triplets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepGrid {
    pub steps_per_quarter: u32,
}

impl Default for StepGrid {
    fn default() -> Self {
        StepGrid::SIXTEENTHS
    }
}

/// Tolerance, in beats, for a time to count as on a grid point. MIDI ticks and ABC fractions
/// land exactly on it; this only absorbs floating-point error.
const ON_GRID_TOLERANCE_BEATS: f64 = 1e-6;

impl StepGrid {
    /// One step per sixteenth, the recipe's grid.
    pub const SIXTEENTHS: StepGrid = StepGrid { steps_per_quarter: 4 };
    /// Twelve steps per quarter: sixteenths and triplets.
    pub const TRIPLETS: StepGrid = StepGrid { steps_per_quarter: 12 };

    /// Length of one step in beats.
    pub fn step_beats(&self) -> f64 {
        1.0 / self.steps_per_quarter as f64
    }

    /// `beats` as a whole number of steps, or `None` when it falls between grid points.
    pub fn exact_steps(&self, beats: f64) -> Option<u32> {
        let steps = beats * self.steps_per_quarter as f64;
        let rounded = steps.round();
        let on_grid = (steps - rounded).abs() * self.step_beats() <= ON_GRID_TOLERANCE_BEATS;
        (on_grid && rounded >= 0.0).then_some(rounded as u32)
    }

    /// `beats` rounded to the nearest step (halves round up).
    pub fn nearest_steps(&self, beats: f64) -> u32 {
        (beats * self.steps_per_quarter as f64 + 0.5).floor().max(0.0) as u32
    }
}

/// Which note and rest lengths a song may contain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurationFilter {
    /// Any length that is a whole number of steps.
    #[default]
    OnGrid,
    /// Only these lengths, in quarter notes; the recipe allows 1/4, 1/2, 3/4, 1, 3/2, 2, 3, 4.
    Only(Vec<f64>),
}

impl DurationFilter {
    /// The recipe's list of allowed lengths.
    pub fn recipe() -> Self {
        DurationFilter::Only(vec![0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0])
    }
}

/// What a song must satisfy to be encoded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncodeConfig {
    /// The step grid.
    #[serde(default)]
    pub grid: StepGrid,
    /// Allowed note and rest lengths.
    #[serde(default)]
    pub durations: DurationFilter,
    /// Lowest allowed pitch, inclusive.
    #[serde(default = "default_lowest_pitch")]
    pub lowest_pitch: u8,
    /// Highest allowed pitch, inclusive.
    #[serde(default = "default_highest_pitch")]
    pub highest_pitch: u8,
    /// Fewest notes a song must have.
    #[serde(default = "default_min_notes")]
    pub min_notes: usize,
}

fn default_lowest_pitch() -> u8 {
    0
}
fn default_highest_pitch() -> u8 {
    127
}
fn default_min_notes() -> usize {
    1
}

impl Default for EncodeConfig {
    fn default() -> Self {
        Self {
            grid: StepGrid::default(),
            durations: DurationFilter::default(),
            lowest_pitch: default_lowest_pitch(),
            highest_pitch: default_highest_pitch(),
            min_notes: default_min_notes(),
        }
    }
}

impl EncodeConfig {
    /// Accepts any melody on `grid`: every length and pitch, even no notes at all. For primers,
    /// which are whatever the player played.
    pub fn any_on(grid: StepGrid) -> Self {
        Self { grid, durations: DurationFilter::OnGrid, lowest_pitch: 0, highest_pitch: 127, min_notes: 0 }
    }
}

/// Why a song was not encoded. `reason()` gives the short name used in dataset counts.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Reject {
    /// A note or rest starts or ends between grid points.
    #[error("a note or rest at beat {at_beats} is off the {steps_per_quarter}-per-quarter grid")]
    OffGrid { at_beats: f64, steps_per_quarter: u32 },
    /// A note or rest has a length the duration filter does not allow.
    #[error("a note or rest at beat {at_beats} lasts {len_beats} quarters, which is not allowed")]
    Duration { at_beats: f64, len_beats: f64 },
    /// A pitch lies outside the allowed range.
    #[error("pitch {pitch} is outside {lowest}..={highest}")]
    OutOfRange { pitch: u8, lowest: u8, highest: u8 },
    /// Fewer notes than required.
    #[error("{num_notes} notes, fewer than the {min_notes} required")]
    TooShort { num_notes: usize, min_notes: usize },
    /// Two notes sound at once.
    #[error("two notes overlap at beat {at_beats}")]
    Polyphonic { at_beats: f64 },
}

impl Reject {
    /// Short name of the reason, for counts: `off_grid`, `duration`, `out_of_range`,
    /// `too_short`, `polyphonic`.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::OffGrid { .. } => "off_grid",
            Reject::Duration { .. } => "duration",
            Reject::OutOfRange { .. } => "out_of_range",
            Reject::TooShort { .. } => "too_short",
            Reject::Polyphonic { .. } => "polyphonic",
        }
    }
}

/// Encodes `melody` from beat 0 to its `end_beats`: a leading rest, the notes, the rests between
/// them and a trailing rest all become symbols.
pub fn encode(melody: &Melody, cfg: &EncodeConfig) -> Result<Vec<Symbol>, Reject> {
    if melody.notes.len() < cfg.min_notes {
        return Err(Reject::TooShort { num_notes: melody.notes.len(), min_notes: cfg.min_notes });
    }
    let grid = cfg.grid;
    let steps_at = |at_beats: f64| {
        grid.exact_steps(at_beats)
            .ok_or(Reject::OffGrid { at_beats, steps_per_quarter: grid.steps_per_quarter })
    };
    let check_len = |at_beats: f64, len_beats: f64| match &cfg.durations {
        DurationFilter::OnGrid => Ok(()),
        DurationFilter::Only(allowed) => {
            if allowed.iter().any(|a| (a - len_beats).abs() <= ON_GRID_TOLERANCE_BEATS) {
                Ok(())
            } else {
                Err(Reject::Duration { at_beats, len_beats })
            }
        }
    };

    let mut symbols = Vec::new();
    let mut cursor_beats = 0.0;
    let push_run = |symbols: &mut Vec<Symbol>, first: Symbol, from_beats: f64, to_beats: f64| {
        let from = steps_at(from_beats)?;
        let to = steps_at(to_beats)?;
        if to > from {
            symbols.push(first);
            symbols.extend(std::iter::repeat_n(Symbol::Hold, (to - from - 1) as usize));
        }
        Ok(())
    };
    for note in &melody.notes {
        if note.pitch < cfg.lowest_pitch || note.pitch > cfg.highest_pitch {
            return Err(Reject::OutOfRange {
                pitch: note.pitch,
                lowest: cfg.lowest_pitch,
                highest: cfg.highest_pitch,
            });
        }
        if note.start_beats < cursor_beats - ON_GRID_TOLERANCE_BEATS {
            return Err(Reject::Polyphonic { at_beats: note.start_beats });
        }
        if note.start_beats > cursor_beats + ON_GRID_TOLERANCE_BEATS {
            check_len(cursor_beats, note.start_beats - cursor_beats)?;
            push_run(&mut symbols, Symbol::Rest, cursor_beats, note.start_beats)?;
        }
        check_len(note.start_beats, note.len_beats)?;
        let before = symbols.len();
        push_run(&mut symbols, Symbol::Pitch(note.pitch), note.start_beats, note.end_beats())?;
        if symbols.len() == before {
            // Shorter than one step would vanish; refuse rather than lose the note.
            return Err(Reject::OffGrid {
                at_beats: note.start_beats,
                steps_per_quarter: grid.steps_per_quarter,
            });
        }
        cursor_beats = note.end_beats();
    }
    if melody.end_beats > cursor_beats + ON_GRID_TOLERANCE_BEATS {
        check_len(cursor_beats, melody.end_beats - cursor_beats)?;
        push_run(&mut symbols, Symbol::Rest, cursor_beats, melody.end_beats)?;
    }
    Ok(symbols)
}

/// Snaps every onset and end of `melody` to the nearest step of `grid` (halves round up), for
/// sources whose times are near the grid but not on it: performed MIDI, or writers that delay
/// onsets or shorten notes by a few ticks. A note that would shrink to nothing keeps one step;
/// a note that would overlap the next one after snapping is cut at the next onset, and dropped
/// if nothing is left.
pub fn quantize(melody: &Melody, grid: StepGrid) -> Melody {
    let step_beats = grid.step_beats();
    let snap = |beats: f64| grid.nearest_steps(beats) as f64 * step_beats;
    let mut notes: Vec<Note> = Vec::with_capacity(melody.notes.len());
    for note in &melody.notes {
        let start_beats = snap(note.start_beats);
        let end_beats = snap(note.end_beats()).max(start_beats + step_beats);
        if let Some(previous) = notes.last_mut() {
            if previous.start_beats >= start_beats {
                continue;
            }
            if previous.end_beats() > start_beats {
                previous.len_beats = start_beats - previous.start_beats;
            }
        }
        notes.push(Note { start_beats, len_beats: end_beats - start_beats, ..*note });
    }
    let end_beats = snap(melody.end_beats).max(notes.last().map_or(0.0, Note::end_beats));
    Melody { notes, end_beats, pickup_beats: snap(melody.pickup_beats), ..melody.clone() }
}

/// Turns symbols back into a melody on `grid`. A `Hold` extends whatever sounds; a `Hold` with
/// nothing before it extends a rest. Delimiters end the current note and are otherwise skipped.
pub fn decode(symbols: &[Symbol], grid: StepGrid) -> Melody {
    let step_beats = grid.step_beats();
    let mut notes: Vec<Note> = Vec::new();
    let mut is_note_sounding = false;
    for (step_idx, symbol) in symbols.iter().enumerate() {
        let at_beats = step_idx as f64 * step_beats;
        match symbol {
            Symbol::Pitch(p) => {
                notes.push(Note::new(*p, at_beats, step_beats));
                is_note_sounding = true;
            }
            Symbol::Hold => {
                if is_note_sounding {
                    if let Some(last) = notes.last_mut() {
                        last.len_beats += step_beats;
                    }
                }
            }
            Symbol::Rest | Symbol::Delimiter => is_note_sounding = false,
        }
    }
    let mut melody = Melody::from_notes(notes);
    melody.end_beats = symbols.len() as f64 * step_beats;
    melody
}

/// Joins encoded songs into one stream as the recipe does: each song followed by
/// `delimiter_len` delimiters.
pub fn join_songs<'a>(songs: impl IntoIterator<Item = &'a [Symbol]>, delimiter_len: usize) -> Vec<Symbol> {
    join_runs(songs, Symbol::Delimiter, delimiter_len)
}

/// Joins per-song runs of anything as `join_songs` joins symbols: each run followed by
/// `filler_len` copies of `filler` (for streams that run beside the symbols, such as their
/// bar positions).
pub fn join_runs<'a, T: Copy + 'a>(
    runs: impl IntoIterator<Item = &'a [T]>,
    filler: T,
    filler_len: usize,
) -> Vec<T> {
    let mut stream = Vec::new();
    for run in runs {
        stream.extend_from_slice(run);
        stream.extend(std::iter::repeat_n(filler, filler_len));
    }
    stream
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::note::tests::melody;

    fn syms(text: &str) -> Vec<Symbol> {
        parse_symbols(text).unwrap()
    }

    #[test]
    fn symbols_round_trip_through_text() {
        let text = "60 _ _ r _ 127 0 /";
        assert_eq!(symbols_to_string(&syms(text)), text);
        assert!(parse_symbols("128").is_err());
        assert!(parse_symbols("x").is_err());
        assert!(parse_symbols("-1").is_err());
    }

    #[test]
    fn encodes_notes_rests_and_holds() {
        // A leading rest of a quarter, C for an eighth, a sixteenth rest, D for a dotted eighth.
        let mut m = melody(&[(60, 1.0, 0.5), (62, 1.75, 0.75)]);
        m.end_beats = 3.0;
        let encoded = encode(&m, &EncodeConfig::default()).unwrap();
        assert_eq!(encoded, syms("r _ _ _ 60 _ r 62 _ _ r _"));
        let decoded = decode(&encoded, StepGrid::SIXTEENTHS);
        assert_eq!(decoded.notes, m.notes);
        assert_eq!(decoded.end_beats, 3.0);
    }

    #[test]
    fn round_trips_on_the_triplet_grid() {
        let third = 1.0 / 3.0;
        let m = melody(&[(60, 0.0, third), (62, third, third), (64, 2.0 * third, third), (65, 1.0, 0.25)]);
        let encoded = encode(&m, &EncodeConfig { grid: StepGrid::TRIPLETS, ..Default::default() }).unwrap();
        assert_eq!(encoded, syms("60 _ _ _ 62 _ _ _ 64 _ _ _ 65 _ _"));
        let decoded = decode(&encoded, StepGrid::TRIPLETS);
        for (a, b) in decoded.notes.iter().zip(&m.notes) {
            assert_eq!(a.pitch, b.pitch);
            assert!((a.start_beats - b.start_beats).abs() < 1e-9 && (a.len_beats - b.len_beats).abs() < 1e-9);
        }
        // The same triplets do not fit on sixteenths.
        assert_eq!(encode(&m, &EncodeConfig::default()).unwrap_err().reason(), "off_grid");
    }

    #[test]
    fn rejects_with_reasons() {
        let cfg = EncodeConfig {
            durations: DurationFilter::recipe(),
            lowest_pitch: 48,
            highest_pitch: 84,
            min_notes: 2,
            ..Default::default()
        };
        assert_eq!(encode(&melody(&[(60, 0.0, 1.0)]), &cfg).unwrap_err().reason(), "too_short");
        assert_eq!(
            encode(&melody(&[(60, 0.0, 1.0), (90, 1.0, 1.0)]), &cfg).unwrap_err().reason(),
            "out_of_range"
        );
        assert_eq!(
            encode(&melody(&[(60, 0.0, 1.25), (62, 1.25, 1.0)]), &cfg).unwrap_err().reason(),
            "duration"
        );
        assert_eq!(
            encode(&melody(&[(60, 0.0, 1.0), (62, 0.5, 1.0)]), &cfg).unwrap_err().reason(),
            "polyphonic"
        );
        assert_eq!(
            encode(&melody(&[(60, 0.0, 0.1), (62, 0.1, 1.0)]), &EncodeConfig::default())
                .unwrap_err()
                .reason(),
            "off_grid"
        );
        // The boundary pitches themselves are allowed.
        assert!(encode(&melody(&[(48, 0.0, 1.0), (84, 1.0, 1.0)]), &cfg).is_ok());
        assert_eq!(
            encode(&melody(&[(47, 0.0, 1.0), (84, 1.0, 1.0)]), &cfg).unwrap_err().reason(),
            "out_of_range"
        );
        assert_eq!(
            encode(&melody(&[(48, 0.0, 1.0), (85, 1.0, 1.0)]), &cfg).unwrap_err().reason(),
            "out_of_range"
        );
        // A rest of a disallowed length is refused too (1.25 quarters).
        assert_eq!(
            encode(&melody(&[(60, 0.0, 1.0), (62, 2.25, 1.0)]), &cfg).unwrap_err().reason(),
            "duration"
        );
    }

    #[test]
    fn a_note_across_a_bar_line_is_one_onset() {
        // In 2/4 a half note from beat 1.5 crosses the bar at beat 2: still one onset.
        let m = melody(&[(67, 0.0, 1.5), (69, 1.5, 2.0)]);
        assert_eq!(encode(&m, &EncodeConfig::default()).unwrap(), syms("67 _ _ _ _ _ 69 _ _ _ _ _ _ _"));
    }

    #[test]
    fn quantize_snaps_to_the_nearest_step() {
        let tick = 1.0 / 480.0;
        // Onsets a tick late and ends a few ticks early, as some writers do.
        let m = melody(&[(60, tick, 0.5 - 4.0 * tick), (62, 0.5 + tick, 0.25), (64, 0.76, 0.01)]);
        let q = quantize(&m, StepGrid::SIXTEENTHS);
        assert_eq!(q.notes, melody(&[(60, 0.0, 0.5), (62, 0.5, 0.25), (64, 0.75, 0.25)]).notes);
        // Two onsets that snap to one step keep the first note.
        let crowded = melody(&[(60, 0.0, 0.05), (62, 0.05, 0.5)]);
        let q = quantize(&crowded, StepGrid::SIXTEENTHS);
        assert_eq!(q.notes.len(), 1);
        assert_eq!(q.notes[0].pitch, 60);
    }

    #[test]
    fn grid_rounding() {
        let g = StepGrid::SIXTEENTHS;
        assert_eq!(g.exact_steps(0.75), Some(3));
        assert_eq!(g.exact_steps(0.75 + 1e-9), Some(3));
        assert_eq!(g.exact_steps(0.8), None);
        assert_eq!(g.nearest_steps(0.125), 1); // half a step rounds up
        assert_eq!(g.nearest_steps(0.12), 0);
    }

    #[test]
    fn songs_are_joined_with_delimiters() {
        let a = syms("60 _");
        let b = syms("r 62");
        assert_eq!(join_songs([a.as_slice(), b.as_slice()], 2), syms("60 _ / / r 62 / /"));
    }
}
