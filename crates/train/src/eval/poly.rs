//! Judging a chord model's continuations as music: each piece's first bars prime the model, the
//! next bars are generated and compared with the piece's own on polyphonic features (notes
//! sounding per step, distinct pitches, pitch-class histogram, interval between the outer
//! voices, note lengths, onsets per beat, share of notes in the primer's key) in the MGEval
//! manner of `stats`, with one half of the real continuations against the other as the
//! ceiling; and how long a stretch of chords each continuation copies from a training piece.
//! Runs on: offline threads (xtask eval, tests). Generation through `model::chords`.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use model::chords::{ChordGenerator, ChordModel};
use model::{ModelError, SamplingSettings};
use music::key::estimate_key;
use music::{Frame, PianoRoll, PitchClassSet, PitchSet, StepGrid};

use super::stats::{inter_set_distances, intra_set_distances, mean_std, quantile, similarity, Similarity};

/// The features, in report order.
pub const POLY_FEATURES: [&str; 7] =
    ["voices/step", "pitches", "pitch classes", "outer interval", "note length", "onsets/beat", "in key"];

/// The features of one stretch of music, one value (or histogram) per feature of `POLY_FEATURES`.
pub fn poly_features(frames: &[Frame], grid: StepGrid, key: PitchClassSet) -> Vec<Vec<f64>> {
    let sounding: Vec<&Frame> = frames.iter().filter(|f| !f.sounding.is_empty()).collect();
    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    };
    let voices = mean(&mut frames.iter().map(|f| f.sounding.len() as f64));
    let all = frames.iter().fold(PitchSet::EMPTY, |acc, f| acc.union(f.sounding));
    let mut classes = vec![0.0; 12];
    for f in frames {
        for p in f.struck.iter() {
            classes[(p % 12) as usize] += 1.0;
        }
    }
    let total: f64 = classes.iter().sum();
    if total > 0.0 {
        classes.iter_mut().for_each(|c| *c /= total);
    }
    let outer = mean(
        &mut sounding.iter().filter_map(|f| Some((f.sounding.highest()? - f.sounding.lowest()?) as f64)),
    );
    let notes = PianoRoll { frames: frames.to_vec() }.to_notes(grid, 80);
    let note_len = mean(&mut notes.iter().map(|n| n.len_beats));
    let beats = frames.len() as f64 * grid.step_beats();
    let onsets = if beats > 0.0 { notes.len() as f64 / beats } else { 0.0 };
    let in_key = mean(&mut notes.iter().map(|n| if key.contains(n.pitch) { 1.0 } else { 0.0 }));
    vec![
        vec![voices],
        vec![all.len() as f64],
        classes,
        vec![outer],
        vec![note_len],
        vec![onsets],
        vec![in_key],
    ]
}

/// One feature over the real and the generated continuations.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolyFeatureRow {
    pub feature: String,
    /// Mean and standard deviation of the (first value of the) feature over the real ones.
    pub real: (f64, f64),
    /// One half of the real continuations against the other: the best to expect.
    pub ceiling: Option<Similarity>,
    /// The same over the generated ones.
    pub generated: (f64, f64),
    /// Generated against real.
    pub vs_real: Option<Similarity>,
}

/// Continuations of a set of pieces, compared with the real ones.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolyContinuations {
    pub num_pieces: usize,
    pub primer_frames: usize,
    pub continuation_frames: usize,
    pub temperature: f32,
    pub rows: Vec<PolyFeatureRow>,
    /// Longest run of frames found verbatim (any transposition) in a training piece: median,
    /// 95th percentile and most, for the real continuations and the generated ones; `None`
    /// without training pieces.
    pub real_copying: Option<(f64, f64, f64)>,
    pub generated_copying: Option<(f64, f64, f64)>,
}

/// Primes `model` with the first `primer_frames` of every piece long enough, generates the
/// next `continuation_frames` (piece `i` with seed `seed + i`), and compares them with the
/// real ones; copies are looked for in `training`.
pub fn continue_pieces(
    model: &Arc<ChordModel>,
    pieces: &[PianoRoll],
    training: &[PianoRoll],
    primer_frames: usize,
    continuation_frames: usize,
    settings: &SamplingSettings,
    seed: u64,
) -> Result<PolyContinuations, ModelError> {
    let grid = model.config.grid;
    let (mut real, mut generated) = (Vec::new(), Vec::new());
    let (mut real_frames, mut generated_frames) = (Vec::new(), Vec::new());
    for (i, piece) in
        pieces.iter().filter(|p| p.frames.len() >= primer_frames + continuation_frames).enumerate()
    {
        let primer = &piece.frames[..primer_frames];
        let truth: Vec<Frame> = piece.frames[primer_frames..primer_frames + continuation_frames]
            .iter()
            .map(|&f| model.config.fit_frame(f))
            .collect();
        let mut generator = ChordGenerator::new(Arc::clone(model), seed.wrapping_add(i as u64))?;
        for &frame in primer {
            generator.feed_frame(frame)?;
        }
        let made = (0..continuation_frames)
            .map(|_| generator.next_frame(settings, model.config.max_voices))
            .collect::<Result<Vec<_>, _>>()?;
        let primer_notes = PianoRoll { frames: primer.to_vec() }.to_notes(grid, 80);
        let key = estimate_key(&primer_notes).map_or(PitchClassSet::ALL, PitchClassSet::of_key);
        real.push(poly_features(&truth, grid, key));
        generated.push(poly_features(&made, grid, key));
        real_frames.push(truth);
        generated_frames.push(made);
    }
    let rows = POLY_FEATURES
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let values = |set: &[Vec<Vec<f64>>]| set.iter().map(|f| f[k].clone()).collect::<Vec<_>>();
            let (real_k, generated_k) = (values(&real), values(&generated));
            // Even and odd pieces, so an ordered set (major pieces first) does not split by kind.
            let even: Vec<Vec<f64>> = real_k.iter().step_by(2).cloned().collect();
            let odd: Vec<Vec<f64>> = real_k.iter().skip(1).step_by(2).cloned().collect();
            let first = |set: &[Vec<f64>]| {
                mean_std(&set.iter().map(|v| v[0]).collect::<Vec<_>>()).unwrap_or((f64::NAN, f64::NAN))
            };
            PolyFeatureRow {
                feature: name.to_string(),
                real: first(&real_k),
                ceiling: similarity(&intra_set_distances(&even), &inter_set_distances(&even, &odd)),
                generated: first(&generated_k),
                vs_real: similarity(
                    &intra_set_distances(&real_k),
                    &inter_set_distances(&generated_k, &real_k),
                ),
            }
        })
        .collect();
    let copying = |pieces: &[Vec<Frame>]| {
        if training.is_empty() {
            return None;
        }
        let runs: Vec<f64> = longest_copies(pieces, training).into_iter().map(|r| r as f64).collect();
        Some((quantile(&runs, 0.5)?, quantile(&runs, 0.95)?, runs.iter().cloned().fold(0.0, f64::max)))
    };
    Ok(PolyContinuations {
        num_pieces: real.len(),
        primer_frames,
        continuation_frames,
        temperature: settings.temperature,
        rows,
        real_copying: copying(&real_frames),
        generated_copying: copying(&generated_frames),
    })
}

/// A hash of a run of frames moved so its lowest pitch is 0: the same for every transposition
/// of it.
fn shape(frames: &[Frame]) -> u64 {
    use std::hash::{Hash, Hasher};
    let lowest = frames.iter().filter_map(|f| f.sounding.lowest()).min().unwrap_or(0);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for f in frames {
        (f.sounding.0 >> lowest).hash(&mut hasher);
    }
    hasher.finish()
}

/// For each piece, the longest run of its frames whose sounding pitches appear, in order and
/// moved by one transposition, in a training piece.
pub fn longest_copies(pieces: &[Vec<Frame>], training: &[PianoRoll]) -> Vec<usize> {
    let mut best = vec![0usize; pieces.len()];
    let mut len = 1;
    loop {
        let wanted: Vec<usize> =
            (0..pieces.len()).filter(|&i| best[i] == len - 1 && pieces[i].len() >= len).collect();
        if wanted.is_empty() {
            return best;
        }
        let known: HashSet<u64> = training.iter().flat_map(|t| t.frames.windows(len).map(shape)).collect();
        for i in wanted {
            if pieces[i].windows(len).any(|w| known.contains(&shape(w))) {
                best[i] = len;
            }
        }
        len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roll(chords: &[&[u8]]) -> PianoRoll {
        PianoRoll::from_chords(&chords.iter().map(|c| PitchSet::of(c)).collect::<Vec<_>>())
    }

    #[test]
    fn copies_are_found_in_any_key_and_no_longer_than_they_are() {
        let training = [roll(&[&[60, 64, 67], &[62, 65, 69], &[64, 67, 71], &[65, 69, 72]])];
        // The middle two chords a whole tone up, then something else.
        let piece = roll(&[&[50], &[64, 67, 71], &[66, 69, 73], &[30, 31]]).frames;
        assert_eq!(longest_copies(&[piece, roll(&[&[1, 2, 3]]).frames], &training), vec![2, 0]);
    }

    #[test]
    fn features_count_what_sounds() {
        let frames = roll(&[&[48, 60, 64], &[48, 60, 64], &[], &[62]]).frames;
        let c_major = PitchClassSet::of_key(music::Key::from_tonic(0, music::Mode::Major));
        let f = poly_features(&frames, StepGrid { steps_per_quarter: 2 }, c_major);
        assert_eq!(f[0], vec![7.0 / 4.0]);
        assert_eq!(f[1], vec![4.0]);
        assert_eq!(f[3], vec![(16.0 + 16.0 + 0.0) / 3.0]);
        assert_eq!(f[6], vec![1.0]);
        // Four notes in two beats.
        assert_eq!(f[5], vec![2.0]);
    }
}
