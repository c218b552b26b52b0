//! Scoring a model on a set of songs it has not seen: likelihood (the recipe's windows and
//! streaming), continuations of each song's first bars compared with the true next bars on
//! musical features (MGEval-style overlap and KL divergence, with one half of the real songs
//! against the other as the ceiling), and how long a stretch of a training song each
//! continuation copies. `cargo xtask eval` reads the files, draws the progress bar and writes
//! the table, JSON and MIDI; everything measured lives here.
//! Runs on: offline threads (xtask, tests). Calls candle through `model`; never
//! imports `nice_plug`.

pub mod copying;
pub mod features;
pub mod likelihood;
pub mod poly;
pub mod report;
pub mod select;
pub mod stats;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use copying::{CopyIndex, CopyRun};
pub use features::{cut_song, Feature, Features, SongCut};
pub use report::{format_table, to_json, EvalReport};
pub use select::{
    read_training_record, select_songs, EvalSong, Selection, SetCounts, SplitSide, TrainingRecord,
};

use crate::trainer::EvalConfig;
use likelihood::{num_windowed_targets, streaming_likelihood, windowed_likelihood, MetricSums};
use model::{continue_melody, LoadedModel, ModelError, SamplingSettings, Transposition};
use music::key::{melody_key, KeySource};
use music::{Melody, Source, Symbol};
use report::{
    ContinuationReport, CopyOffender, CopyStats, GeneratedContinuation, GeneratedFeature, RealFeature,
    SongContinuation, SongRecord, TemperatureReport,
};
use stats::{inter_set_distances, intra_set_distances, mean_std, quantile, similarity};

/// How an evaluation runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalSettings {
    /// Symbols of context before each target in the windowed likelihood (the recipe: 64).
    pub context_len: usize,
    /// Windows per forward pass: on a CPU, 1024 runs the recipe's windows about 1.7 times as
    /// fast as 256 (measured with a 2 × 256 LSTM, in about 0.7 GB).
    pub batch_size: usize,
    /// Evaluate at most this many evenly spaced windowed targets (`None`: all).
    pub max_window_targets: Option<usize>,
    /// Sampling temperatures of the continuations, each a full set.
    pub temperatures: Vec<f32>,
    /// Sample among the k likeliest symbols only (0: all).
    pub top_k: usize,
    /// Sample among the likeliest symbols that make up this much probability (1: all).
    pub top_p: f32,
    /// Song `i` is continued with seed `seed + i` at every temperature.
    pub seed: u64,
    /// Bars of each song (after its pickup) given as the primer.
    pub primer_bars: usize,
    /// Bars generated and compared with the song's own.
    pub continuation_bars: usize,
    /// Offenders named per temperature.
    pub num_worst: usize,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            context_len: 64,
            batch_size: 1024,
            max_window_targets: None,
            temperatures: vec![1.0],
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            primer_bars: 4,
            continuation_bars: 4,
            num_worst: 5,
        }
    }
}

/// A part of the evaluation, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The recipe's windows; counted in targets.
    WindowedLikelihood,
    /// Whole songs with the state carried; counted in songs.
    StreamingLikelihood,
    /// Generating continuations; counted in continuations (songs × temperatures).
    Continuations,
}

impl Stage {
    /// A short name for a progress bar.
    pub fn label(self) -> &'static str {
        match self {
            Stage::WindowedLikelihood => "windows",
            Stage::StreamingLikelihood => "streaming",
            Stage::Continuations => "continuations",
        }
    }
}

/// Hears the progress of an evaluation; every method has an empty default.
pub trait EvalObserver {
    /// A stage starts with `total` units of work.
    fn on_stage(&mut self, _stage: Stage, _total: usize) {}
    /// Units done so far in the current stage.
    fn on_progress(&mut self, _done: usize) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl EvalObserver for Quiet {}

/// The training songs a continuation may copy from, indexed.
pub struct TrainingSongs {
    index: CopyIndex,
    names: Vec<String>,
}

impl TrainingSongs {
    /// Indexes `melodies`, leaving out any from the same file (however its path is spelt) and
    /// position as a source in `exclude` (the songs under evaluation, so a song never counts as
    /// its own training song).
    pub fn new(melodies: &[Melody], exclude: &[&Source]) -> Self {
        let place =
            |s: &Source| (std::fs::canonicalize(&s.path).unwrap_or_else(|_| s.path.clone().into()), s.index);
        let excluded: std::collections::HashSet<_> = exclude.iter().map(|s| place(s)).collect();
        let kept: Vec<&Melody> = melodies.iter().filter(|m| !excluded.contains(&place(&m.source))).collect();
        Self {
            index: CopyIndex::build(kept.iter().map(|m| m.notes.as_slice())),
            names: kept.iter().map(|m| short_source(&m.source)).collect(),
        }
    }

    /// Songs indexed.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no song is indexed.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The index.
    pub fn index(&self) -> &CopyIndex {
        &self.index
    }

    /// Name of indexed song `idx`.
    pub fn name(&self, idx: usize) -> &str {
        &self.names[idx]
    }
}

/// A song's file name and tune, without the folders: `erk5.abc X:42`.
pub fn short_source(source: &Source) -> String {
    let file = std::path::Path::new(&source.path)
        .file_name()
        .map_or_else(|| source.path.clone(), |f| f.to_string_lossy().into_owned());
    match source.number {
        Some(n) => format!("{file} X:{n}"),
        None => format!("{file} #{}", source.index),
    }
}

/// The continuations of one song, to be written out or listened to.
#[derive(Clone, Debug)]
pub struct ContinuedSong {
    /// Index of the song in the evaluated list.
    pub song_idx: usize,
    /// The primer and the true continuation.
    pub cut: SongCut,
    /// `(temperature, continuation)`, times from the boundary, in the song's key.
    pub generated: Vec<(f32, Melody)>,
}

impl ContinuedSong {
    /// The primer followed by continuation `generated_idx`, as one melody in the song's time
    /// (for writing out and listening).
    pub fn joined(&self, generated_idx: usize) -> Melody {
        let mut song = self.cut.primer.clone();
        let boundary_beats = self.cut.boundary_beats;
        song.notes.extend(self.generated[generated_idx].1.notes.iter().map(|n| {
            let mut n = *n;
            n.start_beats += boundary_beats;
            n
        }));
        song.end_beats = boundary_beats + self.cut.window_beats;
        song
    }
}

/// A file name (without extension) for a song: its file's stem and the tune number,
/// `erk5-X42`, or the melody's index in the file when it has no number and is not the first.
pub fn file_stem_of(source: &Source) -> String {
    let stem = std::path::Path::new(&source.path)
        .file_stem()
        .map_or_else(|| "song".to_string(), |s| s.to_string_lossy().into_owned());
    match source.number {
        Some(n) => format!("{stem}-X{n}"),
        None if source.index == 0 => stem,
        None => format!("{stem}-{}", source.index),
    }
}

/// The report and the continuations behind it.
pub struct EvalOutput {
    /// The figures.
    pub report: EvalReport,
    /// One entry per song long enough to continue.
    pub continued: Vec<ContinuedSong>,
}

/// Evaluates `model` on the songs of `selection` (from `select_songs`), with copying measured
/// against `training` when given.
pub fn run_eval(
    model: &Arc<LoadedModel>,
    selection: &Selection,
    training: Option<&TrainingSongs>,
    settings: &EvalSettings,
    observer: &mut dyn EvalObserver,
) -> Result<EvalOutput, ModelError> {
    let songs = selection.songs.as_slice();
    let symbols: Vec<&[Symbol]> = songs.iter().map(|s| s.symbols.as_slice()).collect();
    let bars: Vec<Vec<u32>> = songs.iter().map(|s| s.bars(&model.config)).collect();
    let bar_slices: Vec<&[u32]> = bars.iter().map(Vec::as_slice).collect();
    let eval_cfg = EvalConfig {
        context_len: settings.context_len,
        batch_size: settings.batch_size,
        max_targets: settings.max_window_targets,
        select_on: None,
    };
    let windowed = if songs.is_empty() {
        MetricSums::default().metrics()
    } else {
        observer.on_stage(Stage::WindowedLikelihood, num_windowed_targets(model, &symbols, &eval_cfg));
        windowed_likelihood(model, &symbols, &bar_slices, &eval_cfg, &mut |done| observer.on_progress(done))?
    };

    observer.on_stage(Stage::StreamingLikelihood, songs.len());
    let mut streaming = MetricSums::default();
    let mut records = Vec::with_capacity(songs.len());
    for (idx, song) in songs.iter().enumerate() {
        let sums = streaming_likelihood(model, &song.symbols, &bars[idx])?;
        streaming.merge(&sums);
        records.push(SongRecord {
            source: song.melody.source.to_string(),
            title: song.melody.source.title.clone(),
            set: song.set_name.clone(),
            shift_semitones: song.shift_semitones,
            num_symbols: song.symbols.len(),
            streaming_song_loss: sums.song.score().loss,
            continuation: None,
        });
        observer.on_progress(idx + 1);
    }

    let (continuations, continued) =
        continue_songs(model, songs, training, settings, &mut records, observer)?;
    let report = EvalReport {
        model: model.origin.clone(),
        settings: settings.clone(),
        split: selection.split,
        data: selection.data.clone(),
        sets: selection.sets.clone(),
        num_songs: songs.len(),
        num_song_symbols: songs.iter().map(|s| s.symbols.len()).sum(),
        windowed,
        streaming: streaming.metrics(),
        continuations,
        songs: records,
    };
    Ok(EvalOutput { report, continued })
}

/// The feature values of a set of continuations for one feature.
fn values(features: &[Features], feature: Feature) -> Vec<Vec<f64>> {
    features.iter().map(|f| f.value(feature)).collect()
}

/// Mean and standard deviation of a scalar feature, `(None, None)` for a histogram.
fn scalar_summary(values: &[Vec<f64>], feature: Feature) -> (Option<f64>, Option<f64>) {
    if !feature.is_scalar() {
        return (None, None);
    }
    let scalars: Vec<f64> = values.iter().map(|v| v[0]).collect();
    mean_std(&scalars).map_or((None, None), |(m, s)| (Some(m), Some(s)))
}

/// Median, 95th percentile and maximum of run lengths.
pub fn copy_stats(runs: &[usize]) -> Option<CopyStats> {
    let as_f64: Vec<f64> = runs.iter().map(|&r| r as f64).collect();
    Some(CopyStats {
        median_notes: quantile(&as_f64, 0.5)?,
        p95_notes: quantile(&as_f64, 0.95)?,
        max_notes: runs.iter().copied().max()?,
    })
}

/// The `n` longest runs of at least two notes, longest first (ties in song order).
fn worst(runs: &[(String, CopyRun)], training: &TrainingSongs, n: usize) -> Vec<CopyOffender> {
    let mut found: Vec<&(String, CopyRun)> = runs.iter().filter(|(_, r)| r.song_idx.is_some()).collect();
    found.sort_by_key(|(_, run)| std::cmp::Reverse(run.num_notes));
    found
        .into_iter()
        .take(n)
        .map(|(song, run)| CopyOffender {
            song: song.clone(),
            training_song: training.name(run.song_idx.expect("filtered above")).to_string(),
            num_notes: run.num_notes,
            start_note_idx: run.start_note_idx,
            training_start_note_idx: run.song_start_note_idx,
        })
        .collect()
}

/// `melody` with only the notes that start in `[0, window_beats)`, cut at its end.
fn clip_to_window(mut melody: Melody, window_beats: f64) -> Melody {
    melody.notes.retain(|n| n.start_beats < window_beats);
    for note in &mut melody.notes {
        note.len_beats = note.len_beats.min(window_beats - note.start_beats);
    }
    melody.end_beats = window_beats;
    melody
}

/// Generates and measures the continuations of every song long enough.
fn continue_songs(
    model: &Arc<LoadedModel>,
    songs: &[EvalSong],
    training: Option<&TrainingSongs>,
    settings: &EvalSettings,
    records: &mut [SongRecord],
    observer: &mut dyn EvalObserver,
) -> Result<(Option<ContinuationReport>, Vec<ContinuedSong>), ModelError> {
    let cuts: Vec<(usize, SongCut)> = songs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            cut_song(&s.melody, settings.primer_bars, settings.continuation_bars).map(|c| (i, c))
        })
        .collect();
    if cuts.is_empty() {
        return Ok((None, Vec::new()));
    }
    let key_source = match model.config.transposition {
        Transposition::PlainSignature { key_source } => key_source,
        Transposition::None => KeySource::DeclaredThenEstimated,
    };
    let grid = model.config.grid;
    let temperatures = &settings.temperatures;
    observer.on_stage(Stage::Continuations, cuts.len() * temperatures.len());

    let mut real_features = Vec::with_capacity(cuts.len());
    let mut generated_features: Vec<Vec<Features>> = vec![Vec::with_capacity(cuts.len()); temperatures.len()];
    let mut real_runs: Vec<(String, CopyRun)> = Vec::new();
    let mut generated_runs: Vec<Vec<(String, CopyRun)>> = vec![Vec::new(); temperatures.len()];
    let mut num_notes = vec![0usize; temperatures.len()];
    let mut continued = Vec::with_capacity(cuts.len());
    let mut done = 0;
    for (song_idx, cut) in cuts {
        let name = short_source(&songs[song_idx].melody.source);
        let key = melody_key(&cut.primer, key_source);
        let shift = songs[song_idx].shift_semitones;
        real_features.push(Features::measure(&cut.continuation, cut.window_beats, key, shift));
        let real_run = training.map(|t| t.index().longest_run(&cut.continuation.notes));
        if let Some(run) = real_run {
            real_runs.push((name.clone(), run));
        }
        let num_steps = grid.nearest_steps(cut.window_beats) as usize;
        let seed = settings.seed.wrapping_add(song_idx as u64);
        let mut generated = Vec::with_capacity(temperatures.len());
        let mut generated_records = Vec::with_capacity(temperatures.len());
        for (t_idx, &temperature) in temperatures.iter().enumerate() {
            let sampling = SamplingSettings {
                temperature,
                top_k: settings.top_k,
                top_p: settings.top_p,
                may_end: false,
                ..SamplingSettings::default()
            };
            let melody = clip_to_window(
                continue_melody(model, &cut.primer, num_steps, &sampling, seed)?,
                cut.window_beats,
            );
            generated_features[t_idx].push(Features::measure(&melody, cut.window_beats, key, shift));
            num_notes[t_idx] += melody.notes.len();
            let run = training.map(|t| t.index().longest_run(&melody.notes));
            if let Some(run) = run {
                generated_runs[t_idx].push((name.clone(), run));
            }
            generated_records.push(GeneratedContinuation {
                temperature,
                seed,
                num_notes: melody.notes.len(),
                copy_notes: run.map(|r| r.num_notes),
                copy_song: run.and_then(|r| r.song_idx).and_then(|i| training.map(|t| t.name(i).to_string())),
            });
            generated.push((temperature, melody));
            done += 1;
            observer.on_progress(done);
        }
        records[song_idx].continuation = Some(SongContinuation {
            real_num_notes: cut.continuation.notes.len(),
            real_copy_notes: real_run.map(|r| r.num_notes),
            generated: generated_records,
        });
        continued.push(ContinuedSong { song_idx, cut, generated });
    }

    let num_songs = real_features.len();
    let mut real = Vec::with_capacity(Feature::ALL.len());
    let mut per_temperature: Vec<Vec<GeneratedFeature>> = vec![Vec::new(); temperatures.len()];
    for feature in Feature::ALL {
        let real_values = values(&real_features, feature);
        let (even, odd): (Vec<_>, Vec<_>) =
            real_values.iter().cloned().enumerate().partition(|(i, _)| i % 2 == 0);
        let even: Vec<Vec<f64>> = even.into_iter().map(|(_, v)| v).collect();
        let odd: Vec<Vec<f64>> = odd.into_iter().map(|(_, v)| v).collect();
        let ceiling = similarity(&intra_set_distances(&even), &inter_set_distances(&even, &odd));
        let (mean, std) = scalar_summary(&real_values, feature);
        real.push(RealFeature { feature, mean, std, ceiling });
        let intra_real = intra_set_distances(&real_values);
        for (t_idx, features) in generated_features.iter().enumerate() {
            let generated_values = values(features, feature);
            let (mean, std) = scalar_summary(&generated_values, feature);
            let vs_real = similarity(&intra_real, &inter_set_distances(&real_values, &generated_values));
            per_temperature[t_idx].push(GeneratedFeature { feature, mean, std, vs_real });
        }
    }
    let run_lengths = |runs: &[(String, CopyRun)]| runs.iter().map(|(_, r)| r.num_notes).collect::<Vec<_>>();
    let generated = temperatures
        .iter()
        .zip(per_temperature)
        .enumerate()
        .map(|(t_idx, (&temperature, features))| TemperatureReport {
            temperature,
            mean_num_notes: num_notes[t_idx] as f64 / num_songs as f64,
            features,
            copying: training.and_then(|_| copy_stats(&run_lengths(&generated_runs[t_idx]))),
            worst: training.map_or_else(Vec::new, |t| worst(&generated_runs[t_idx], t, settings.num_worst)),
        })
        .collect();
    let report = ContinuationReport {
        num_songs,
        num_training_songs: training.map_or(0, TrainingSongs::len),
        real,
        real_copying: training.and_then(|_| copy_stats(&run_lengths(&real_runs))),
        real_worst: training.map_or_else(Vec::new, |t| worst(&real_runs, t, settings.num_worst)),
        generated,
    };
    Ok((Some(report), continued))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::features::tests::melody;

    #[test]
    fn copy_statistics_by_hand() {
        let stats = copy_stats(&[3, 1, 2, 10]).unwrap();
        // Sorted 1 2 3 10: the median halfway between 2 and 3; the 95th percentile at position
        // 0.95 × 3 = 2.85, so 3 + 0.85 × 7.
        assert_eq!(stats.median_notes, 2.5);
        assert!((stats.p95_notes - 8.95).abs() < 1e-12);
        assert_eq!(stats.max_notes, 10);
        assert_eq!(copy_stats(&[]), None);
    }

    #[test]
    fn a_song_is_never_its_own_training_song_however_its_path_is_spelt() {
        let song = |path: &str, index: usize| {
            let mut m = melody(&[(60, 0.0, 1.0), (62, 1.0, 1.0), (64, 2.0, 1.0)]);
            m.source = Source { path: path.to_string(), index, number: None, title: None };
            m
        };
        let training = [song("Cargo.toml", 0), song("Cargo.toml", 1), song("other.abc", 0)];
        let evaluated = song("./Cargo.toml", 0);
        let indexed = TrainingSongs::new(&training, &[&evaluated.source]);
        assert_eq!(indexed.len(), 2);
        assert_eq!(indexed.name(0), "Cargo.toml #1");
        let run = indexed.index().longest_run(&evaluated.notes);
        assert_eq!((run.num_notes, run.song_idx), (3, Some(0)));
    }

    #[test]
    fn file_names_for_continuations() {
        let mut source =
            Source { path: "../corpus/erk5.abc".to_string(), index: 3, number: Some(42), title: None };
        assert_eq!(file_stem_of(&source), "erk5-X42");
        assert_eq!(short_source(&source), "erk5.abc X:42");
        source.number = None;
        assert_eq!(file_stem_of(&source), "erk5-3");
        source.index = 0;
        assert_eq!(file_stem_of(&source), "erk5");
    }

    #[test]
    fn the_worst_offenders_are_the_longest_runs_of_two_notes_or_more() {
        let training = TrainingSongs::new(&[melody(&[(60, 0.0, 1.0)]), melody(&[(60, 0.0, 1.0)])], &[]);
        let run =
            |num_notes, song_idx| CopyRun { num_notes, start_note_idx: 0, song_idx, song_start_note_idx: 2 };
        let runs = vec![
            ("a".to_string(), run(3, Some(0))),
            ("b".to_string(), run(1, None)),
            ("c".to_string(), run(7, Some(1))),
            ("d".to_string(), run(3, Some(1))),
        ];
        let found: Vec<(String, usize)> =
            worst(&runs, &training, 2).into_iter().map(|w| (w.song, w.num_notes)).collect();
        assert_eq!(found, vec![("c".to_string(), 7), ("a".to_string(), 3)]);
        assert_eq!(worst(&runs, &training, 10).len(), 3);
    }
}
