//! What an evaluation found, as serde types for the JSON file, and the same figures as a
//! table for the terminal.
//! Runs on: offline threads (xtask eval, tests).

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::features::Feature;
use super::select::{SetCounts, SplitSide};
use super::stats::Similarity;
use super::EvalSettings;
use crate::data::DataConfig;
use crate::trainer::{EvalMetrics, Score};

/// Everything an evaluation measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Where the model came from.
    pub model: String,
    /// The settings of the run.
    pub settings: EvalSettings,
    /// The side of the split evaluated.
    pub split: SplitSide,
    /// The filters and split the songs were chosen under.
    pub data: DataConfig,
    /// What became of each set's songs.
    pub sets: Vec<SetCounts>,
    /// Songs evaluated.
    pub num_songs: usize,
    /// Their symbols, without delimiters.
    pub num_song_symbols: usize,
    /// The recipe's windows of `settings.context_len` symbols.
    pub windowed: EvalMetrics,
    /// The state carried through each whole song.
    pub streaming: EvalMetrics,
    /// Continuations of the songs long enough, if any.
    pub continuations: Option<ContinuationReport>,
    /// Per song.
    pub songs: Vec<SongRecord>,
}

/// Continuations against the true next bars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContinuationReport {
    /// Songs with at least `primer_bars + continuation_bars` bars.
    pub num_songs: usize,
    /// Training songs indexed for copying (0 without training data).
    pub num_training_songs: usize,
    /// The true continuations, per feature, with the ceiling: one half of them against the
    /// other.
    pub real: Vec<RealFeature>,
    /// How much of a training song the true continuations copy (the human baseline).
    pub real_copying: Option<CopyStats>,
    /// The true continuations that copy the longest runs.
    pub real_worst: Vec<CopyOffender>,
    /// The generated continuations, per temperature.
    pub generated: Vec<TemperatureReport>,
}

/// One feature of the true continuations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RealFeature {
    /// Which feature.
    pub feature: Feature,
    /// Mean over songs (scalar features only).
    pub mean: Option<f64>,
    /// Standard deviation over songs (scalar features only).
    pub std: Option<f64>,
    /// Within-set distances of the even-numbered songs against their distances to the
    /// odd-numbered ones: what a perfect model would score, given this many songs.
    pub ceiling: Option<Similarity>,
}

/// The continuations generated at one temperature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemperatureReport {
    /// The sampling temperature.
    pub temperature: f32,
    /// Mean notes per continuation.
    pub mean_num_notes: f64,
    /// Per feature, against the true continuations.
    pub features: Vec<GeneratedFeature>,
    /// How much of a training song they copy.
    pub copying: Option<CopyStats>,
    /// The continuations that copy the longest runs.
    pub worst: Vec<CopyOffender>,
}

/// One feature of generated continuations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratedFeature {
    /// Which feature.
    pub feature: Feature,
    /// Mean over songs (scalar features only).
    pub mean: Option<f64>,
    /// Standard deviation over songs (scalar features only).
    pub std: Option<f64>,
    /// Within-set distances of the true continuations against their distances to the
    /// generated ones (MGEval's overlap area and KL divergence).
    pub vs_real: Option<Similarity>,
}

/// Longest copied runs over a set of continuations, in notes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyStats {
    /// The median.
    pub median_notes: f64,
    /// The 95th percentile (linear interpolation).
    pub p95_notes: f64,
    /// The longest.
    pub max_notes: usize,
}

/// A continuation that copies a long run of a training song.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyOffender {
    /// The song continued (file and tune).
    pub song: String,
    /// The training song copied from.
    pub training_song: String,
    /// Notes in the run.
    pub num_notes: usize,
    /// The run's first note in the continuation (0-based).
    pub start_note_idx: usize,
    /// The run's first note in the training song (0-based).
    pub training_start_note_idx: usize,
}

/// One evaluated song.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SongRecord {
    /// File and tune.
    pub source: String,
    /// Title, where the file gives one.
    pub title: Option<String>,
    /// The set it came from.
    pub set: String,
    /// Semitones it was moved by for the model.
    pub shift_semitones: i32,
    /// Its symbols, without delimiters.
    pub num_symbols: usize,
    /// Streaming cross-entropy over its symbols (no delimiter target), nats per symbol.
    pub streaming_song_loss: f64,
    /// Its continuations, when it is long enough.
    pub continuation: Option<SongContinuation>,
}

/// The continuations of one song.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SongContinuation {
    /// Notes of the true continuation.
    pub real_num_notes: usize,
    /// Longest run of the true continuation found in a training song.
    pub real_copy_notes: Option<usize>,
    /// One per temperature, in order.
    pub generated: Vec<GeneratedContinuation>,
}

/// One generated continuation of a song.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratedContinuation {
    /// The sampling temperature.
    pub temperature: f32,
    /// The seed of its random draws.
    pub seed: u64,
    /// Its notes.
    pub num_notes: usize,
    /// Longest run found in a training song.
    pub copy_notes: Option<usize>,
    /// The training song of that run, when it is at least two notes.
    pub copy_song: Option<String>,
}

/// The report as pretty JSON.
pub fn to_json(report: &EvalReport) -> String {
    serde_json::to_string_pretty(report).expect("a report always serialises") + "\n"
}

/// Perplexity of a mean cross-entropy in nats.
pub fn perplexity(loss_nats: f64) -> f64 {
    loss_nats.exp()
}

fn score_cells(score: &Score) -> String {
    format!(
        "{:>8.4} {:>8.3} {:>7.2}% {:>9}",
        score.loss,
        perplexity(score.loss),
        100.0 * score.accuracy,
        score.num_targets
    )
}

fn mean_std_cell(mean: Option<f64>, std: Option<f64>) -> String {
    match (mean, std) {
        (Some(m), Some(s)) => format!("{m:.2}±{s:.2}"),
        _ => "-".to_string(),
    }
}

fn similarity_cell(s: Option<Similarity>) -> String {
    match s {
        Some(s) => format!("{:.3}/{:.3}", s.overlap, s.kl),
        None => "-".to_string(),
    }
}

fn copy_cell(stats: Option<CopyStats>) -> String {
    match stats {
        Some(c) => format!("{:.1} / {:.1} / {}", c.median_notes, c.p95_notes, c.max_notes),
        None => "-".to_string(),
    }
}

/// The report as a table for the terminal.
pub fn format_table(report: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "model: {}", report.model);
    for set in &report.sets {
        let rejected: Vec<String> = set.rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            out,
            "{}: {} files, {} melodies ({} unreadable), {} outside the split, {} refused ({}), {} usable",
            set.name,
            set.num_files,
            set.num_melodies,
            set.num_unreadable,
            set.num_outside_split,
            set.rejected.values().sum::<usize>(),
            if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") },
            set.num_selected
        );
    }
    let _ = writeln!(out, "\nLikelihood: {} songs, {} symbols", report.num_songs, report.num_song_symbols);
    let _ = writeln!(out, "{:<28} {:>8} {:>8} {:>8} {:>9}", "", "nats", "perplex", "accuracy", "targets");
    let windows = format!("windows of {}", report.settings.context_len);
    for (way, m) in [(windows.as_str(), &report.windowed), ("streaming", &report.streaming)] {
        for (targets, score) in [("all", &m.all), ("song symbols", &m.song), ("onsets", &m.non_hold)] {
            let _ = writeln!(out, "{:<28} {}", format!("{way}, {targets}"), score_cells(score));
        }
    }
    let Some(c) = &report.continuations else {
        let _ = writeln!(
            out,
            "\nNo song has {} bars, so no continuations.",
            report.settings.primer_bars + report.settings.continuation_bars
        );
        return out;
    };
    let _ = writeln!(
        out,
        "\nContinuations: {} songs; the first {} bars are the primer, the next {} are generated and \
         compared with the song's own.",
        c.num_songs, report.settings.primer_bars, report.settings.continuation_bars
    );
    let _ = writeln!(
        out,
        "Cells: mean±sd over songs, and overlap/KL of the MGEval distance distributions (1/0 is a \
         perfect match); \"real halves\" is one half of the real continuations against the other, \
         the best to expect."
    );
    let mut header = format!("{:<14} {:>13} {:>13}", "feature", "real", "real halves");
    for t in &c.generated {
        let _ = write!(header, " {:>13} {:>13}", format!("T={}", t.temperature), "vs real");
    }
    let _ = writeln!(out, "{header}");
    for (i, real) in c.real.iter().enumerate() {
        let mut row = format!(
            "{:<14} {:>13} {:>13}",
            real.feature.label(),
            mean_std_cell(real.mean, real.std),
            similarity_cell(real.ceiling)
        );
        for t in &c.generated {
            let g = &t.features[i];
            let _ = write!(row, " {:>13} {:>13}", mean_std_cell(g.mean, g.std), similarity_cell(g.vs_real));
        }
        let _ = writeln!(out, "{row}");
    }
    let mut notes_row = format!("{:<14} {:>13} {:>13}", "notes", "", "");
    for t in &c.generated {
        let _ = write!(notes_row, " {:>13} {:>13}", format!("{:.1}", t.mean_num_notes), "");
    }
    let _ = writeln!(out, "{notes_row}");
    if c.num_training_songs > 0 {
        let _ = writeln!(
            out,
            "\nCopying: longest run found verbatim (any key) in {} training songs, notes: median / p95 / max",
            c.num_training_songs
        );
        let _ = writeln!(out, "  real continuations   {}", copy_cell(c.real_copying));
        for t in &c.generated {
            let _ = writeln!(out, "  generated, T={:<6} {}", t.temperature, copy_cell(t.copying));
        }
        for t in &c.generated {
            if t.worst.is_empty() {
                continue;
            }
            let _ = writeln!(out, "Longest copies at T={}:", t.temperature);
            for w in &t.worst {
                let _ = writeln!(
                    out,
                    "  {:>3} notes  {} (from note {})  ←  {} (from note {})",
                    w.num_notes, w.song, w.start_note_idx, w.training_song, w.training_start_note_idx
                );
            }
        }
        if !c.real_worst.is_empty() {
            let _ = writeln!(out, "Longest copies in the real continuations:");
            for w in &c.real_worst {
                let _ = writeln!(out, "  {:>3} notes  {}  ←  {}", w.num_notes, w.song, w.training_song);
            }
        }
    }
    out
}
