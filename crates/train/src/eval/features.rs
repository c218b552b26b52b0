//! Cutting a song into a primer and its true continuation by bars, and the musical features a
//! continuation is measured on (after MGEval, Yang & Lerch 2018): pitch-class histogram, pitch
//! range, pitch count, interval histogram, note-length histogram, mean inter-onset interval,
//! share of notes in the primer's key, and rest ratio.
//! Runs on: offline threads (xtask eval, tests). Pure, no model.

use serde::{Deserialize, Serialize};

use music::{Key, Melody, Meter, Note};

/// Tolerance in beats for times that should coincide (bar lines, note lengths).
const TIME_TOLERANCE_BEATS: f64 = 1e-6;

/// Widest interval, in semitones, with its own bin; wider leaps share the outermost bins.
pub const MAX_INTERVAL_SEMITONES: i32 = 12;
/// Bins of the interval histogram: -12..=12 semitones.
pub const NUM_INTERVAL_BINS: usize = 2 * MAX_INTERVAL_SEMITONES as usize + 1;
/// The note lengths with their own bin, in quarter notes (the recipe's list); anything else
/// falls in one more bin, "other".
pub const NOTE_LENGTH_BINS_BEATS: [f64; 8] = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0];
/// Bins of the note-length histogram: the lengths above plus "other".
pub const NUM_NOTE_LENGTH_BINS: usize = NOTE_LENGTH_BINS_BEATS.len() + 1;

/// A song cut at bar lines: the primer, and the bars right after it.
#[derive(Clone, Debug, PartialEq)]
pub struct SongCut {
    /// The song's first bars (and its pickup), notes cut at `boundary_beats`; `end_beats` is
    /// the boundary. Keeps the song's key, meter and source.
    pub primer: Melody,
    /// The true continuation, times from the boundary; notes that start in the window, cut at
    /// its end; `end_beats` is the window length.
    pub continuation: Melody,
    /// Where the continuation starts in the song, in beats.
    pub boundary_beats: f64,
    /// Length of the continuation window, in beats.
    pub window_beats: f64,
}

/// Cuts `song` into a primer of `primer_bars` bars (after its pickup) and the next
/// `continuation_bars` bars. Bars follow the song's meter (4/4 when it has none) and start at
/// `pickup_beats`. `None` when the song is shorter than the two together.
pub fn cut_song(song: &Melody, primer_bars: usize, continuation_bars: usize) -> Option<SongCut> {
    let bar_beats = song.meter.unwrap_or(Meter::COMMON).bar_beats();
    let boundary_beats = song.pickup_beats + primer_bars as f64 * bar_beats;
    let window_beats = continuation_bars as f64 * bar_beats;
    let window_end_beats = boundary_beats + window_beats;
    if song.end_beats < window_end_beats - TIME_TOLERANCE_BEATS || window_beats <= 0.0 {
        return None;
    }
    let mut primer = song.clone();
    primer.notes = song
        .notes
        .iter()
        .filter(|n| n.start_beats < boundary_beats - TIME_TOLERANCE_BEATS)
        .map(|n| Note { len_beats: n.len_beats.min(boundary_beats - n.start_beats), ..*n })
        .collect();
    primer.end_beats = boundary_beats;
    let mut continuation = song.clone();
    continuation.notes = song
        .notes
        .iter()
        .filter(|n| {
            n.start_beats >= boundary_beats - TIME_TOLERANCE_BEATS
                && n.start_beats < window_end_beats - TIME_TOLERANCE_BEATS
        })
        .map(|n| {
            let start_beats = (n.start_beats - boundary_beats).max(0.0);
            Note { start_beats, len_beats: n.len_beats.min(window_beats - start_beats), ..*n }
        })
        .collect();
    continuation.end_beats = window_beats;
    continuation.pickup_beats = 0.0;
    Some(SongCut { primer, continuation, boundary_beats, window_beats })
}

/// One feature of a continuation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Share of notes on each pitch class, C first, in the model's key convention (12 numbers
    /// summing to 1).
    PitchClassHistogram,
    /// Highest minus lowest pitch, in semitones.
    PitchRange,
    /// Number of distinct pitches.
    PitchCount,
    /// Share of each melodic step between consecutive notes, -12..=12 semitones, wider leaps in
    /// the end bins (25 numbers summing to 1).
    IntervalHistogram,
    /// Share of notes of each length in `NOTE_LENGTH_BINS_BEATS`, then "other" (9 numbers).
    NoteLengthHistogram,
    /// Mean time from one onset to the next, in beats (the window length with under two notes).
    MeanInterOnsetBeats,
    /// Share of notes whose pitch is in the primer's key.
    InKeyShare,
    /// Share of the window where no note sounds.
    RestRatio,
}

impl Feature {
    /// Every feature, in table order.
    pub const ALL: [Feature; 8] = [
        Feature::PitchClassHistogram,
        Feature::PitchRange,
        Feature::PitchCount,
        Feature::IntervalHistogram,
        Feature::NoteLengthHistogram,
        Feature::MeanInterOnsetBeats,
        Feature::InKeyShare,
        Feature::RestRatio,
    ];

    /// A short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Feature::PitchClassHistogram => "pitch classes",
            Feature::PitchRange => "pitch range",
            Feature::PitchCount => "pitch count",
            Feature::IntervalHistogram => "intervals",
            Feature::NoteLengthHistogram => "note lengths",
            Feature::MeanInterOnsetBeats => "inter-onset",
            Feature::InKeyShare => "in key",
            Feature::RestRatio => "rest ratio",
        }
    }

    /// True for a single number, false for a histogram.
    pub fn is_scalar(self) -> bool {
        !matches!(
            self,
            Feature::PitchClassHistogram | Feature::IntervalHistogram | Feature::NoteLengthHistogram
        )
    }
}

/// The features of one continuation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// `Feature::PitchClassHistogram`.
    pub pitch_class_histogram: [f64; 12],
    /// `Feature::PitchRange`, semitones.
    pub pitch_range_semitones: f64,
    /// `Feature::PitchCount`.
    pub num_pitches: f64,
    /// `Feature::IntervalHistogram`, bin `i` is `i - 12` semitones.
    pub interval_histogram: [f64; NUM_INTERVAL_BINS],
    /// `Feature::NoteLengthHistogram`.
    pub note_length_histogram: [f64; NUM_NOTE_LENGTH_BINS],
    /// `Feature::MeanInterOnsetBeats`.
    pub mean_inter_onset_beats: f64,
    /// `Feature::InKeyShare`.
    pub in_key_share: f64,
    /// `Feature::RestRatio`.
    pub rest_ratio: f64,
}

impl Features {
    /// Measures the notes of `melody` in `[0, window_beats)` (they are expected there, sorted
    /// and monophonic), with `key` the primer's key. Pitch classes are counted after moving by
    /// `pitch_class_shift` semitones: the song's move into the model's key convention, so that
    /// songs in different keys are compared by scale degree (C is the tonic of a major song).
    /// Features of no notes are 0, except the inter-onset interval (the window) and the rest
    /// ratio (1).
    pub fn measure(melody: &Melody, window_beats: f64, key: Option<Key>, pitch_class_shift: i32) -> Features {
        let notes = &melody.notes;
        let num_notes = notes.len() as f64;
        let share = |count: f64| if num_notes > 0.0 { count / num_notes } else { 0.0 };

        let mut pitch_class_histogram = [0.0; 12];
        for note in notes {
            pitch_class_histogram[(note.pitch as i32 + pitch_class_shift).rem_euclid(12) as usize] += 1.0;
        }
        pitch_class_histogram.iter_mut().for_each(|x| *x = share(*x));

        let pitch_range_semitones = melody.pitch_range().map_or(0.0, |(lo, hi)| (hi - lo) as f64);
        let mut pitches: Vec<u8> = notes.iter().map(|n| n.pitch).collect();
        pitches.sort_unstable();
        pitches.dedup();

        let mut interval_histogram = [0.0; NUM_INTERVAL_BINS];
        for pair in notes.windows(2) {
            let step = (pair[1].pitch as i32 - pair[0].pitch as i32)
                .clamp(-MAX_INTERVAL_SEMITONES, MAX_INTERVAL_SEMITONES);
            interval_histogram[(step + MAX_INTERVAL_SEMITONES) as usize] += 1.0;
        }
        let num_intervals = notes.len().saturating_sub(1) as f64;
        if num_intervals > 0.0 {
            interval_histogram.iter_mut().for_each(|x| *x /= num_intervals);
        }

        let mut note_length_histogram = [0.0; NUM_NOTE_LENGTH_BINS];
        for note in notes {
            let bin = NOTE_LENGTH_BINS_BEATS
                .iter()
                .position(|len| (len - note.len_beats).abs() <= TIME_TOLERANCE_BEATS)
                .unwrap_or(NOTE_LENGTH_BINS_BEATS.len());
            note_length_histogram[bin] += 1.0;
        }
        note_length_histogram.iter_mut().for_each(|x| *x = share(*x));

        let mean_inter_onset_beats = if notes.len() >= 2 {
            (notes[notes.len() - 1].start_beats - notes[0].start_beats) / num_intervals
        } else {
            window_beats
        };

        let in_key_share = match key {
            Some(key) => share(notes.iter().filter(|n| key.contains(n.pitch)).count() as f64),
            None => 0.0,
        };

        let sounding_beats: f64 =
            notes.iter().map(|n| (n.end_beats().min(window_beats) - n.start_beats.max(0.0)).max(0.0)).sum();
        let rest_ratio =
            if window_beats > 0.0 { (1.0 - sounding_beats / window_beats).clamp(0.0, 1.0) } else { 0.0 };

        Features {
            pitch_class_histogram,
            pitch_range_semitones,
            num_pitches: pitches.len() as f64,
            interval_histogram,
            note_length_histogram,
            mean_inter_onset_beats,
            in_key_share,
            rest_ratio,
        }
    }

    /// The value of one feature: one number for a scalar, the bins for a histogram.
    pub fn value(&self, feature: Feature) -> Vec<f64> {
        match feature {
            Feature::PitchClassHistogram => self.pitch_class_histogram.to_vec(),
            Feature::PitchRange => vec![self.pitch_range_semitones],
            Feature::PitchCount => vec![self.num_pitches],
            Feature::IntervalHistogram => self.interval_histogram.to_vec(),
            Feature::NoteLengthHistogram => self.note_length_histogram.to_vec(),
            Feature::MeanInterOnsetBeats => vec![self.mean_inter_onset_beats],
            Feature::InKeyShare => vec![self.in_key_share],
            Feature::RestRatio => vec![self.rest_ratio],
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use music::Mode;

    /// A melody from `(pitch, start_beats, len_beats)` triples.
    pub(crate) fn melody(notes: &[(u8, f64, f64)]) -> Melody {
        Melody::from_notes(notes.iter().map(|&(p, s, l)| Note::new(p, s, l)).collect())
    }

    #[test]
    fn features_of_a_small_phrase_by_hand() {
        // C4 quarter, E4 quarter, a quarter rest, G4 eighth, C#5 eighth, in a window of 4 beats;
        // the key is C major.
        let m = melody(&[(60, 0.0, 1.0), (64, 1.0, 1.0), (67, 3.0, 0.5), (73, 3.5, 0.5)]);
        let f = Features::measure(&m, 4.0, Some(Key::C_MAJOR), 0);
        let mut pch = [0.0; 12];
        pch[0] = 0.25; // C
        pch[4] = 0.25; // E
        pch[7] = 0.25; // G
        pch[1] = 0.25; // C#
        assert_eq!(f.pitch_class_histogram, pch);
        assert_eq!(f.pitch_range_semitones, 13.0);
        assert_eq!(f.num_pitches, 4.0);
        // Intervals +4, +3, +6: a third each.
        let mut ih = [0.0; NUM_INTERVAL_BINS];
        ih[12 + 4] = 1.0 / 3.0;
        ih[12 + 3] = 1.0 / 3.0;
        ih[12 + 6] = 1.0 / 3.0;
        assert_eq!(f.interval_histogram, ih);
        // Two quarters and two eighths.
        assert_eq!(f.note_length_histogram, [0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // Onsets 0, 1, 3, 3.5: mean gap 3.5 / 3.
        assert!((f.mean_inter_onset_beats - 3.5 / 3.0).abs() < 1e-12);
        // C#5 is outside C major.
        assert_eq!(f.in_key_share, 0.75);
        // Three beats sound out of four.
        assert_eq!(f.rest_ratio, 0.25);
        assert_eq!(f.value(Feature::PitchRange), vec![13.0]);
        assert_eq!(f.value(Feature::IntervalHistogram).len(), 25);
        // The same notes a tone higher in D major, measured with the song's move of -2: only
        // the key changes, and the pitch classes come out as in C.
        let d = Melody::from_notes(m.notes.iter().map(|n| Note { pitch: n.pitch + 2, ..*n }).collect());
        assert_eq!(Features::measure(&d, 4.0, Some(Key::from_tonic(2, Mode::Major)), -2), f);
        // Unmoved, the histogram moves up two classes.
        let unmoved = Features::measure(&d, 4.0, Some(Key::from_tonic(2, Mode::Major)), 0);
        assert_eq!(unmoved.pitch_class_histogram[2], 0.25);
        assert_eq!(unmoved.pitch_class_histogram[0], 0.0);
    }

    #[test]
    fn leaps_beyond_an_octave_share_the_end_bins_and_odd_lengths_are_other() {
        let m = melody(&[(60, 0.0, 0.3), (79, 0.3, 1.0), (50, 1.3, 1.0)]);
        let f = Features::measure(&m, 4.0, Some(Key::from_tonic(9, Mode::Minor)), 0);
        assert_eq!(f.interval_histogram[24], 0.5);
        assert_eq!(f.interval_histogram[0], 0.5);
        assert_eq!(f.note_length_histogram[8], 1.0 / 3.0);
        assert_eq!(f.note_length_histogram[3], 2.0 / 3.0);
    }

    #[test]
    fn no_notes_is_all_rest() {
        let f = Features::measure(&melody(&[]), 8.0, Some(Key::C_MAJOR), 0);
        assert_eq!((f.pitch_range_semitones, f.num_pitches, f.in_key_share), (0.0, 0.0, 0.0));
        assert_eq!((f.mean_inter_onset_beats, f.rest_ratio), (8.0, 1.0));
        assert!(f.pitch_class_histogram.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn songs_are_cut_at_bar_lines_after_the_pickup() {
        // 3/4 with a one-beat pickup: bar lines at 1, 4, 7, ... The primer of one bar ends at 4,
        // the continuation of one bar is [4, 7).
        let mut song = melody(&[(67, 0.0, 1.0), (72, 1.0, 2.0), (74, 3.0, 2.0), (76, 5.0, 3.0)]);
        song.meter = Some(Meter { numerator: 3, denominator: 4 });
        song.pickup_beats = 1.0;
        let cut = cut_song(&song, 1, 1).unwrap();
        assert_eq!((cut.boundary_beats, cut.window_beats), (4.0, 3.0));
        // The note across the boundary is cut in the primer and absent from the continuation.
        assert_eq!(cut.primer.notes, melody(&[(67, 0.0, 1.0), (72, 1.0, 2.0), (74, 3.0, 1.0)]).notes);
        assert_eq!(cut.primer.end_beats, 4.0);
        assert_eq!(cut.primer.meter, song.meter);
        // The last note is cut at the window's end.
        assert_eq!(cut.continuation.notes, melody(&[(76, 1.0, 2.0)]).notes);
        assert_eq!(cut.continuation.end_beats, 3.0);
        // Two bars of continuation do not fit in 8 beats.
        assert!(cut_song(&song, 1, 2).is_none());
    }
}
