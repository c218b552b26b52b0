//! Keys and modes, key estimation from pitches (Krumhansl–Schmuckler), and the transposition
//! that brings a melody to the recipe's key convention (C major / A minor).
//! Runs on: any non-audio thread.

use serde::{Deserialize, Serialize};

use super::note::{Melody, Note};

/// A church mode. `Major` is Ionian and `Minor` is Aeolian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    Major,
    Dorian,
    Phrygian,
    Lydian,
    Mixolydian,
    Minor,
    Locrian,
}

impl Mode {
    /// Semitones from the tonic of the relative major (the key signature's major key) to this
    /// mode's tonic: Dorian on D has the signature of C major, so 2.
    pub fn semitones_above_relative_major(self) -> u8 {
        match self {
            Mode::Major => 0,
            Mode::Dorian => 2,
            Mode::Phrygian => 4,
            Mode::Lydian => 5,
            Mode::Mixolydian => 7,
            Mode::Minor => 9,
            Mode::Locrian => 11,
        }
    }

    /// Steps in the circle of fifths from the relative major to this mode's tonic: Dorian on D
    /// sits two fifths above C (C → G → D).
    pub fn fifths_above_relative_major(self) -> i8 {
        match self {
            Mode::Lydian => -1,
            Mode::Major => 0,
            Mode::Mixolydian => 1,
            Mode::Dorian => 2,
            Mode::Minor => 3,
            Mode::Phrygian => 4,
            Mode::Locrian => 5,
        }
    }

    /// The intervals of the scale above its tonic, in semitones.
    pub fn scale_semitones(self) -> [u8; 7] {
        const IONIAN: [u8; 7] = [0, 2, 4, 5, 7, 9, 11];
        let offset = self.semitones_above_relative_major();
        let start = IONIAN.iter().position(|&s| s == offset).unwrap_or(0);
        std::array::from_fn(|i| (IONIAN[(start + i) % 7] + 12 - offset) % 12)
    }
}

/// A key: a key signature plus a mode. The signature keeps the spelling (F♯ major has six
/// sharps, G♭ major six flats), which the ABC reader needs to apply it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Key {
    /// Sharps (positive) or flats (negative) of the key signature, -7..=7.
    pub fifths: i8,
    /// The mode; with `fifths` it fixes the tonic.
    pub mode: Mode,
}

impl Key {
    /// C major: no sharps or flats.
    pub const C_MAJOR: Key = Key { fifths: 0, mode: Mode::Major };

    /// The key whose tonic is the pitch class `tonic_pc` (0 = C) in `mode`, spelled with at
    /// most six sharps or five flats (F♯ rather than G♭, B♭ rather than A♯).
    pub fn from_tonic(tonic_pc: u8, mode: Mode) -> Key {
        let relative_major_pc =
            (tonic_pc as i32 - mode.semitones_above_relative_major() as i32).rem_euclid(12);
        // The circle of fifths: the major key on pitch class p has (7 p mod 12) sharps.
        let mut fifths = (relative_major_pc * 7).rem_euclid(12);
        if fifths > 6 {
            fifths -= 12;
        }
        Key { fifths: fifths as i8, mode }
    }

    /// Pitch class of the tonic, 0 = C .. 11 = B.
    pub fn tonic_pc(&self) -> u8 {
        let tonic_fifths = self.fifths as i32 + self.mode.fifths_above_relative_major() as i32;
        (tonic_fifths * 7).rem_euclid(12) as u8
    }

    /// Pitch class of the major key that shares this signature.
    pub fn relative_major_pc(&self) -> u8 {
        (self.fifths as i32 * 7).rem_euclid(12) as u8
    }

    /// True if `pitch` belongs to this key's scale.
    pub fn contains(&self, pitch: u8) -> bool {
        let relative = (pitch as i32 - self.tonic_pc() as i32).rem_euclid(12) as u8;
        self.mode.scale_semitones().contains(&relative)
    }

    /// The same key moved by `semitones`, respelled within six sharps or six flats.
    pub fn transposed(&self, semitones: i32) -> Key {
        let tonic = (self.tonic_pc() as i32 + semitones).rem_euclid(12) as u8;
        Key::from_tonic(tonic, self.mode)
    }

    /// The semitones, in -6..=5, that bring this key's signature to no sharps or flats: C major,
    /// A minor, D dorian and so on. This is the recipe's key convention, extended to the modes.
    pub fn shift_to_plain_signature(&self) -> i32 {
        let up = (12 - self.relative_major_pc() as i32) % 12;
        if up > 5 {
            up - 12
        } else {
            up
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHARP_NAMES: [&str; 12] = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"];
        const FLAT_NAMES: [&str; 12] = ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"];
        let names = if self.fifths < 0 { &FLAT_NAMES } else { &SHARP_NAMES };
        write!(f, "{} {:?}", names[self.tonic_pc() as usize], self.mode)
    }
}

/// Krumhansl–Kessler probe-tone profiles (Krumhansl 1990), indexed by semitones above the tonic.
const MAJOR_PROFILE: [f64; 12] = [6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88];
const MINOR_PROFILE: [f64; 12] = [6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17];

/// Estimates a major or minor key from the notes with the Krumhansl–Schmuckler algorithm: the
/// duration-weighted pitch-class histogram is correlated with the 24 rotated profiles and the
/// best one wins. Returns `None` when there are no notes.
pub fn estimate_key(notes: &[Note]) -> Option<Key> {
    if notes.is_empty() {
        return None;
    }
    let mut histogram = [0.0f64; 12];
    for note in notes {
        histogram[(note.pitch % 12) as usize] += note.len_beats;
    }
    let mut best: Option<(f64, Key)> = None;
    for tonic in 0..12u8 {
        for (mode, profile) in [(Mode::Major, &MAJOR_PROFILE), (Mode::Minor, &MINOR_PROFILE)] {
            let rotated: [f64; 12] = std::array::from_fn(|pc| profile[(pc + 12 - tonic as usize) % 12]);
            let score = correlation(&histogram, &rotated);
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, Key::from_tonic(tonic, mode)));
            }
        }
    }
    best.map(|(_, key)| key)
}

/// Pearson correlation of two 12-bin vectors; 0 when either is constant.
fn correlation(a: &[f64; 12], b: &[f64; 12]) -> f64 {
    let mean_a = a.iter().sum::<f64>() / 12.0;
    let mean_b = b.iter().sum::<f64>() / 12.0;
    let (mut cov, mut var_a, mut var_b) = (0.0, 0.0, 0.0);
    for i in 0..12 {
        cov += (a[i] - mean_a) * (b[i] - mean_b);
        var_a += (a[i] - mean_a).powi(2);
        var_b += (b[i] - mean_b).powi(2);
    }
    if var_a == 0.0 || var_b == 0.0 {
        0.0
    } else {
        cov / (var_a * var_b).sqrt()
    }
}

/// How a melody's key is found before it is moved to the key convention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The key the file declares, and the estimate where it declares none.
    #[default]
    DeclaredThenEstimated,
    /// Always the Krumhansl–Schmuckler estimate, as the recipe does.
    Estimated,
}

/// The key `melody` is taken to be in under `source`, or `None` for a melody without notes.
pub fn melody_key(melody: &Melody, source: KeySource) -> Option<Key> {
    match (source, melody.key) {
        (KeySource::DeclaredThenEstimated, Some(key)) => Some(key),
        _ => estimate_key(&melody.notes),
    }
}

/// The semitones that bring `melody` to the key convention (its signature plain: C major,
/// A minor, D dorian...), or `None` for a melody without notes.
pub fn shift_to_convention(melody: &Melody, source: KeySource) -> Option<i32> {
    melody_key(melody, source).map(|key| key.shift_to_plain_signature())
}

/// Every shift in -11..=11 semitones that keeps all of `melody`'s pitches inside
/// `lowest..=highest` (inclusive), for transposition augmentation. Includes 0 when the melody
/// already fits.
pub fn shifts_within(melody: &Melody, lowest: u8, highest: u8) -> Vec<i32> {
    let Some((low, high)) = melody.pitch_range() else {
        return Vec::new();
    };
    (-11..=11)
        .filter(|shift| low as i32 + shift >= lowest as i32 && high as i32 + shift <= highest as i32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::note::tests::melody;

    #[test]
    fn tonic_and_signature_agree_for_every_mode() {
        for tonic in 0..12 {
            for mode in [
                Mode::Major,
                Mode::Dorian,
                Mode::Phrygian,
                Mode::Lydian,
                Mode::Mixolydian,
                Mode::Minor,
                Mode::Locrian,
            ] {
                let key = Key::from_tonic(tonic, mode);
                assert_eq!(key.tonic_pc(), tonic, "{key:?}");
                assert!((-6..=6).contains(&key.fifths));
            }
        }
        assert_eq!(Key::from_tonic(2, Mode::Dorian).fifths, 0);
        assert_eq!(Key::from_tonic(9, Mode::Minor).fifths, 0);
        assert_eq!(Key::from_tonic(7, Mode::Major).fifths, 1);
        assert_eq!(Key::from_tonic(5, Mode::Major).fifths, -1);
        assert_eq!(Key::from_tonic(4, Mode::Minor).fifths, 1);
        assert_eq!(Key { fifths: -6, mode: Mode::Major }.tonic_pc(), 6);
    }

    #[test]
    fn scales_of_the_modes() {
        assert_eq!(Mode::Major.scale_semitones(), [0, 2, 4, 5, 7, 9, 11]);
        assert_eq!(Mode::Minor.scale_semitones(), [0, 2, 3, 5, 7, 8, 10]);
        assert_eq!(Mode::Dorian.scale_semitones(), [0, 2, 3, 5, 7, 9, 10]);
        assert!(Key::from_tonic(7, Mode::Major).contains(66)); // F# in G major
        assert!(!Key::from_tonic(7, Mode::Major).contains(65));
    }

    #[test]
    fn shift_to_plain_signature_is_the_nearest_way() {
        assert_eq!(Key::from_tonic(7, Mode::Major).shift_to_plain_signature(), 5); // G → C up
        assert_eq!(Key::from_tonic(2, Mode::Major).shift_to_plain_signature(), -2); // D → C
        assert_eq!(Key::from_tonic(4, Mode::Minor).shift_to_plain_signature(), 5); // E minor → A minor
        assert_eq!(Key::from_tonic(6, Mode::Major).shift_to_plain_signature(), -6);
        assert_eq!(Key::from_tonic(2, Mode::Dorian).shift_to_plain_signature(), 0);
    }

    #[test]
    fn estimates_obvious_keys() {
        // A G major scale and arpeggio, ending on G.
        let g_major = melody(&[
            (67, 0.0, 1.0),
            (69, 1.0, 1.0),
            (71, 2.0, 1.0),
            (72, 3.0, 1.0),
            (74, 4.0, 1.0),
            (76, 5.0, 1.0),
            (78, 6.0, 1.0),
            (79, 7.0, 2.0),
            (74, 9.0, 1.0),
            (71, 10.0, 1.0),
            (67, 11.0, 2.0),
        ]);
        assert_eq!(estimate_key(&g_major.notes), Some(Key::from_tonic(7, Mode::Major)));
        // A minor triad and harmonic-minor leading tone.
        let a_minor = melody(&[
            (69, 0.0, 2.0),
            (72, 2.0, 1.0),
            (76, 3.0, 1.0),
            (74, 4.0, 1.0),
            (72, 5.0, 1.0),
            (71, 6.0, 1.0),
            (68, 7.0, 1.0),
            (69, 8.0, 3.0),
        ]);
        assert_eq!(estimate_key(&a_minor.notes), Some(Key::from_tonic(9, Mode::Minor)));
        assert_eq!(estimate_key(&[]), None);
    }

    #[test]
    fn augmentation_shifts_stay_in_range() {
        let m = melody(&[(60, 0.0, 1.0), (67, 1.0, 1.0)]);
        assert_eq!(shifts_within(&m, 58, 70), vec![-2, -1, 0, 1, 2, 3]);
        assert_eq!(shifts_within(&m, 61, 62), Vec::<i32>::new());
    }
}
