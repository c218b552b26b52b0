//! Which pitches an answer may use: a range and a set of pitch classes. The one description of
//! it, from what the worker makes of the player's Key Lock and range to the sampler that keeps
//! every note inside it.
//! Runs on: any thread (plain `Copy` values).

use serde::{Deserialize, Serialize};

use crate::Key;

/// A set of pitch classes (bit `pc` set = pitch class `pc` allowed; 0 = C … 11 = B).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PitchClassSet(pub u16);

impl PitchClassSet {
    /// All twelve pitch classes.
    pub const ALL: PitchClassSet = PitchClassSet(0x0fff);

    /// The pitch classes of `key`'s scale.
    pub fn of_key(key: Key) -> Self {
        let tonic = key.tonic_pc() as u16;
        let bits =
            key.mode.scale_semitones().iter().fold(0u16, |acc, &s| acc | 1 << ((tonic + s as u16) % 12));
        PitchClassSet(bits)
    }

    /// True if `pitch`'s pitch class is in the set.
    pub fn contains(&self, pitch: u8) -> bool {
        self.0 & (1 << (pitch % 12)) != 0
    }

    /// The set moved up by `semitones` (down when negative).
    pub fn transposed(&self, semitones: i32) -> Self {
        let shift = semitones.rem_euclid(12) as u32;
        let bits = self.0 as u32 & 0x0fff;
        PitchClassSet((((bits << shift) | (bits >> (12 - shift))) & 0x0fff) as u16)
    }
}

impl Default for PitchClassSet {
    fn default() -> Self {
        PitchClassSet::ALL
    }
}

/// The pitches a note may have: `lowest_pitch..=highest_pitch`, in `pitch_classes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitchRules {
    /// Lowest pitch, inclusive.
    pub lowest_pitch: u8,
    /// Highest pitch, inclusive.
    pub highest_pitch: u8,
    /// Pitch classes allowed: a key's scale, or all twelve.
    pub pitch_classes: PitchClassSet,
}

impl PitchRules {
    /// Every MIDI pitch.
    pub const ALL: PitchRules =
        PitchRules { lowest_pitch: 0, highest_pitch: 127, pitch_classes: PitchClassSet::ALL };

    /// The pitches of `lowest..=highest` (either order) in `key`'s scale, or all of them
    /// without a key.
    pub fn new(lowest: u8, highest: u8, key: Option<Key>) -> Self {
        Self {
            lowest_pitch: lowest.min(highest).min(127),
            highest_pitch: highest.max(lowest).min(127),
            pitch_classes: key.map_or(PitchClassSet::ALL, PitchClassSet::of_key),
        }
    }

    /// Whether a note may have `pitch`.
    pub fn allows(&self, pitch: u8) -> bool {
        (self.lowest_pitch..=self.highest_pitch).contains(&pitch) && self.pitch_classes.contains(pitch)
    }

    /// The allowed pitch nearest `pitch`: moved by whole octaves into the range, then to the
    /// nearest pitch of the classes (the lower one on a tie); the range wins where no pitch of
    /// it is in the classes. For notes the rules did not choose (the player's last note, which
    /// an answer may carry on); the sampler keeps the model's own notes inside them.
    pub fn nearest(&self, pitch: u8) -> u8 {
        let (lowest, highest) = (self.lowest_pitch.min(127) as i32, self.highest_pitch.min(127) as i32);
        let mut p = pitch as i32;
        while p < lowest && p + 12 <= highest {
            p += 12;
        }
        while p > highest && p - 12 >= lowest {
            p -= 12;
        }
        let p = p.clamp(lowest, highest);
        for distance in 0..=6 {
            for candidate in [p - distance, p + distance] {
                if (lowest..=highest).contains(&candidate) && self.pitch_classes.contains(candidate as u8) {
                    return candidate as u8;
                }
            }
        }
        p as u8
    }

    /// The same rules for music moved up by `semitones` (the range clamped to 0..=127).
    pub fn transposed(&self, semitones: i32) -> Self {
        let move_pitch = |p: u8| (p as i32 + semitones).clamp(0, 127) as u8;
        Self {
            lowest_pitch: move_pitch(self.lowest_pitch),
            highest_pitch: move_pitch(self.highest_pitch),
            pitch_classes: self.pitch_classes.transposed(semitones),
        }
    }
}

impl Default for PitchRules {
    fn default() -> Self {
        Self::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mode;

    #[test]
    fn pitch_class_sets() {
        let c_major = PitchClassSet::of_key(Key::C_MAJOR);
        assert_eq!(c_major.0, 0b1010_1011_0101);
        assert!(c_major.contains(60) && c_major.contains(71) && !c_major.contains(61));
        let g_major = PitchClassSet::of_key(Key::from_tonic(7, Mode::Major));
        assert_eq!(c_major.transposed(7), g_major);
        assert_eq!(g_major.transposed(-7), c_major);
        assert_eq!(PitchClassSet::ALL.transposed(5), PitchClassSet::ALL);
    }

    #[test]
    fn rules_keep_to_the_range_and_the_scale_and_move_with_the_music() {
        let d_major = PitchRules::new(72, 60, Some(Key::from_tonic(2, Mode::Major)));
        assert_eq!((d_major.lowest_pitch, d_major.highest_pitch), (60, 72));
        assert!(d_major.allows(62) && d_major.allows(66) && !d_major.allows(65));
        assert!(!d_major.allows(74), "above the range");
        // Down a whole tone: C major on 58..=70.
        let c_major = d_major.transposed(-2);
        assert_eq!(c_major, PitchRules::new(58, 70, Some(Key::C_MAJOR)));
        assert!(PitchRules::ALL.allows(0) && PitchRules::ALL.allows(127));
        assert_eq!(PitchRules::ALL.transposed(5).lowest_pitch, 5);
    }

    #[test]
    fn the_nearest_allowed_pitch() {
        let c_major = PitchRules::new(60, 72, Some(Key::C_MAJOR));
        assert_eq!(c_major.nearest(61), 60); // C# → C (the lower on a tie)
        assert_eq!(c_major.nearest(66), 65); // F# → F
        assert_eq!(c_major.nearest(40), 64); // E2 → E4 by octaves
        assert_eq!(c_major.nearest(90), 65); // F#6 → F#4 → F4
        assert_eq!(c_major.nearest(127), 67); // G9 → G4 by octaves
                                              // Nothing in the scale fits: the range wins.
        assert_eq!(PitchRules::new(61, 61, Some(Key::C_MAJOR)).nearest(70), 61);
        for p in 0..=127 {
            assert_eq!(PitchRules::ALL.nearest(p), p);
        }
    }
}
