//! Notes and melodies with explicit units: times in beats (quarter notes), pitches as MIDI numbers.
//! Runs on: any non-audio thread.

use serde::{Deserialize, Serialize};

use super::key::Key;

/// One sounding note. Time ranges are half-open: the note sounds in `[start_beats, end_beats())`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Note {
    /// MIDI pitch, 0..=127 (60 = middle C).
    pub pitch: u8,
    /// MIDI velocity, 1..=127.
    pub velocity: u8,
    /// Onset, in beats (quarter notes) from the start of the melody.
    pub start_beats: f64,
    /// Length in beats; always > 0.
    pub len_beats: f64,
}

impl Note {
    /// A note with the default velocity of 80.
    pub fn new(pitch: u8, start_beats: f64, len_beats: f64) -> Self {
        Self { pitch, velocity: DEFAULT_VELOCITY, start_beats, len_beats }
    }

    /// Exclusive end of the note, in beats.
    pub fn end_beats(&self) -> f64 {
        self.start_beats + self.len_beats
    }
}

/// Velocity given to notes whose source has none (ABC, decoded symbols).
pub const DEFAULT_VELOCITY: u8 = 80;

/// A time signature, such as 6/8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// Beats in a bar, in units of `denominator`.
    pub numerator: u8,
    /// The note value of one count (4 = quarter, 8 = eighth).
    pub denominator: u8,
}

impl Meter {
    /// 4/4, assumed where a source gives no meter.
    pub const COMMON: Meter = Meter { numerator: 4, denominator: 4 };

    /// Length of one bar in beats (quarter notes): 6/8 → 3.0.
    pub fn bar_beats(&self) -> f64 {
        self.numerator as f64 * 4.0 / self.denominator as f64
    }
}

/// Where a melody came from, for error messages, reports and the song-level split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The file's path as given to the reader.
    pub path: String,
    /// 0-based position of this melody among those read from the file (tune in a tunebook,
    /// or melody track in a MIDI file).
    pub index: usize,
    /// ABC reference number (`X:`), where the source has one.
    pub number: Option<u32>,
    /// Title (`T:` or the MIDI track name), where the source has one.
    pub title: Option<String>,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.number {
            Some(number) => write!(f, "{} X:{}", self.path, number),
            None => write!(f, "{} #{}", self.path, self.index),
        }
    }
}

/// A monophonic melody: notes sorted by onset that never overlap. Rests are the gaps between
/// notes, before the first note (a leading rest) and after the last one up to `end_beats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Melody {
    /// The notes, sorted by `start_beats`, none overlapping the next.
    pub notes: Vec<Note>,
    /// Exclusive end of the melody in beats, at or after the last note's end (a trailing rest
    /// makes it later).
    pub end_beats: f64,
    /// The key the source declares (ABC `K:`, MIDI key signature), if any.
    pub key: Option<Key>,
    /// The first time signature of the source, if any.
    pub meter: Option<Meter>,
    /// Length of a pickup (anacrusis) before the first full bar, in beats; 0 when the melody
    /// starts on a bar line or the source does not say.
    pub pickup_beats: f64,
    /// The first tempo of the source in quarter notes per minute, if any.
    pub tempo_qpm: Option<f64>,
    /// Where it came from.
    pub source: Source,
}

impl Melody {
    /// A melody of `notes` (sorted, monophonic) that ends when its last note ends.
    pub fn from_notes(notes: Vec<Note>) -> Self {
        let end_beats = notes.last().map_or(0.0, Note::end_beats);
        Self {
            notes,
            end_beats,
            key: None,
            meter: None,
            pickup_beats: 0.0,
            tempo_qpm: None,
            source: Source::default(),
        }
    }

    /// Lowest and highest pitch, or `None` for a melody without notes.
    pub fn pitch_range(&self) -> Option<(u8, u8)> {
        let lowest = self.notes.iter().map(|n| n.pitch).min()?;
        let highest = self.notes.iter().map(|n| n.pitch).max()?;
        Some((lowest, highest))
    }

    /// The same melody moved by `semitones`, or `None` if a pitch would leave 0..=127.
    pub fn transposed(&self, semitones: i32) -> Option<Melody> {
        let mut out = self.clone();
        for note in &mut out.notes {
            note.pitch = u8::try_from(note.pitch as i32 + semitones).ok().filter(|p| *p <= 127)?;
        }
        out.key = self.key.map(|k| k.transposed(semitones));
        Some(out)
    }
}

impl Melody {
    /// A melody of `(pitch, start_beats, len_beats)` triples: fixtures in tests and examples.
    pub fn from_triples(notes: &[(u8, f64, f64)]) -> Melody {
        Melody::from_notes(notes.iter().map(|&(p, s, l)| Note::new(p, s, l)).collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a melody from `(pitch, start_beats, len_beats)` triples.
    pub(crate) fn melody(notes: &[(u8, f64, f64)]) -> Melody {
        Melody::from_triples(notes)
    }

    #[test]
    fn bar_length_follows_the_meter() {
        assert_eq!(Meter { numerator: 6, denominator: 8 }.bar_beats(), 3.0);
        assert_eq!(Meter { numerator: 3, denominator: 2 }.bar_beats(), 6.0);
        assert_eq!(Meter::COMMON.bar_beats(), 4.0);
    }

    #[test]
    fn transposition_refuses_to_leave_the_midi_range() {
        let m = melody(&[(120, 0.0, 1.0), (60, 1.0, 1.0)]);
        assert_eq!(m.transposed(7).unwrap().notes[0].pitch, 127);
        assert!(m.transposed(8).is_none());
        assert!(m.transposed(-61).is_none());
        assert_eq!(m.transposed(-60).unwrap().pitch_range(), Some((0, 60)));
    }
}
