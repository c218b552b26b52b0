//! `cargo xtask train --kind chords` and `cargo xtask eval --frames`: training and scoring the
//! polyphonic chord model on piano rolls (benchmark `.frames` files, or MIDI read with every
//! voice).
//! Runs on: offline (a terminal).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;

use model::chords::ChordModel;
use model::SamplingSettings;
use music::StepGrid;
use train::chords::{
    score_rolls, train_chords, ChordEpoch, ChordObserver, ChordTrainConfig, ChordTrainSummary, RollSet,
};
use train::eval::poly::{continue_pieces, PolyContinuations};
use train::eval::stats as model_similarity;

use crate::train::{plot_curves, TrainArgs};

/// Reads `.frames` files and MIDI files or folders (comma-separated) into one set, on `grid`.
/// A `.frames` file is taken to be on `grid` unless its path ends in `@K`: K frames a quarter
/// note, stretched to the grid (`jsb-chorales/train.frames@1` on a grid of 2).
pub(crate) fn read_rolls(paths: &str, grid: StepGrid) -> Result<RollSet> {
    let mut set = RollSet::default();
    let mut skipped = Vec::new();
    for spec in paths.split(',').filter(|p| !p.is_empty()) {
        let (path, frames_per_quarter) = match spec.rsplit_once('@') {
            Some((path, k)) => {
                (path, k.parse::<u32>().with_context(|| format!("{spec}: @K needs a whole number"))?)
            }
            None => (spec, grid.steps_per_quarter),
        };
        let path = PathBuf::from(path);
        if path.extension().is_some_and(|e| e == "frames") {
            if frames_per_quarter == 0 || !grid.steps_per_quarter.is_multiple_of(frames_per_quarter) {
                bail!(
                    "{spec}: {frames_per_quarter} frames a quarter do not divide the grid's {}",
                    grid.steps_per_quarter
                );
            }
            let first = set.rolls.len();
            set.add_frames_file(&path)?;
            let factor = (grid.steps_per_quarter / frames_per_quarter) as usize;
            for roll in &mut set.rolls[first..] {
                *roll = roll.stretched(factor);
            }
        } else {
            set.add_midi(&path, grid, &mut |reason| skipped.push(reason))?;
        }
    }
    if !skipped.is_empty() {
        println!("{} files could not be read, e.g. {}", skipped.len(), skipped[0]);
    }
    Ok(set)
}

/// `cargo xtask train --kind chords`.
pub fn train(args: &TrainArgs) -> Result<()> {
    if args.data.is_empty() {
        bail!("no training data: give --data with .frames files or .mid files and folders");
    }
    let grid = StepGrid { steps_per_quarter: args.frames_per_quarter.unwrap_or(2) };
    let mut cfg = ChordTrainConfig::default();
    let set = |field: &mut usize, value: Option<usize>| {
        if let Some(v) = value {
            *field = v;
        }
    };
    set(&mut cfg.hidden_size, args.hidden);
    set(&mut cfg.num_layers, args.layers);
    set(&mut cfg.max_voices, args.max_voices);
    set(&mut cfg.batch_size, args.batch_size);
    set(&mut cfg.window_len, args.window);
    set(&mut cfg.epochs, args.epochs);
    set(&mut cfg.patience, args.patience);
    cfg.dropout = args.dropout.unwrap_or(cfg.dropout);
    cfg.learning_rate = args.lr.unwrap_or(cfg.learning_rate);
    cfg.weight_decay = args.weight_decay.unwrap_or(cfg.weight_decay);
    cfg.clip_norm = args.grad_clip.unwrap_or(cfg.clip_norm);
    cfg.transpose = args.transpose.unwrap_or(0);
    cfg.seed = args.seed.unwrap_or(cfg.seed);

    let mut train_set = RollSet::default();
    for spec in &args.data {
        // A set name before '=' is accepted as for melodies, and not needed.
        let paths = spec.split_once('=').map_or(spec.as_str(), |(_, p)| p);
        let part = read_rolls(paths, grid)?;
        train_set.rolls.extend(part.rolls);
        train_set.sources.extend(part.sources);
    }
    // Data read from `.frames` files records no onsets.
    cfg.restrikes = !args
        .data
        .iter()
        .flat_map(|d| d.split(','))
        .all(|p| p.split('@').next().is_some_and(|p| p.ends_with(".frames")));
    let valid_set = match &args.valid {
        Some(paths) => read_rolls(paths, grid)?,
        None => {
            let mut valid =
                RollSet { rolls: Vec::new(), sources: vec!["every tenth piece of the training data".into()] };
            let mut kept = Vec::new();
            for (i, roll) in std::mem::take(&mut train_set.rolls).into_iter().enumerate() {
                if i % 10 == 0 {
                    valid.rolls.push(roll);
                } else {
                    kept.push(roll);
                }
            }
            train_set.rolls = kept;
            valid
        }
    };
    println!(
        "chords: train {} pieces, {} frames; validation {} pieces, {} frames; {} frames a quarter; onsets {}",
        train_set.rolls.len(),
        train_set.num_frames(),
        valid_set.rolls.len(),
        valid_set.num_frames(),
        grid.steps_per_quarter,
        if cfg.restrikes { "read" } else { "not recorded" }
    );
    let mut progress = Progress::new();
    let summary = train_chords(&cfg, grid, &train_set, &valid_set, &args.out, args.resume, &mut progress)?;
    progress.bar.finish_and_clear();
    plot(&args.out, &summary)?;
    println!("stopped: {}", summary.stop_reason);
    if let Some(best) = summary.best_epoch {
        let e = &summary.epochs[best - 1];
        println!("best epoch {best}: validation {:.4} nats per frame", e.valid_nll);
    }
    println!("{} weights, {:.0} s; model in {}", summary.num_params, summary.wall_s, args.out.display());
    Ok(())
}

/// Draws the training loss per frame against the validation NLL per frame.
fn plot(dir: &Path, summary: &ChordTrainSummary) -> Result<()> {
    let train: Vec<(f64, f64)> = summary.epochs.iter().map(|e| (e.epoch as f64, e.train_loss)).collect();
    let valid: Vec<(f64, f64)> = summary.epochs.iter().map(|e| (e.epoch as f64, e.valid_nll)).collect();
    plot_curves(&dir.join("loss.png"), "train nats/token, val nats/frame", &train, &valid)
}

/// A progress bar per epoch and a line after it.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new() -> Self {
        Progress { bar: ProgressBar::hidden() }
    }
}

impl ChordObserver for Progress {
    fn on_epoch_start(&mut self, epoch: usize, num_batches: usize) {
        self.bar = ProgressBar::new(num_batches as u64);
        self.bar.set_style(
            ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
                .expect("a valid template"),
        );
        self.bar.set_prefix(epoch.to_string());
    }

    fn on_batch(&mut self, batch_idx: usize, loss: f64, tokens_per_s: f64) {
        self.bar.set_position(batch_idx as u64 + 1);
        self.bar.set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tokens/s"));
    }

    fn on_epoch_end(&mut self, e: &ChordEpoch, _summary: &ChordTrainSummary) {
        self.bar.finish_and_clear();
        println!(
            "epoch {}: train {:.4} nats/token | validation {:.4} nats/frame{} | lr {:.2e} | {:.0} tokens/s | {:.0} s + {:.0} s",
            e.epoch,
            e.train_loss,
            e.valid_nll,
            if e.is_best { " (best)" } else { "" },
            e.learning_rate,
            e.tokens_per_s,
            e.train_wall_s,
            e.eval_wall_s
        );
    }
}

/// What `eval --frames` continues, and where it looks for copies.
pub struct Continuations<'a> {
    /// Training data as `[NAME=]PATHS`, to look for copies in.
    pub training: &'a [String],
    pub temperatures: &'a [f32],
    pub seed: u64,
    pub top_k: usize,
    pub top_p: f32,
    /// Bars of 4/4 that prime, and that are generated.
    pub primer_bars: usize,
    pub bars: usize,
}

/// `cargo xtask eval --frames FILE`: the exact likelihood and frame accuracy of a chord model on
/// a benchmark split, and its continuations judged as music.
pub fn eval_frames(
    model_dir: Option<&Path>,
    frames: &Path,
    json: Option<&Path>,
    c: &Continuations,
) -> Result<()> {
    let started = Instant::now();
    let model = match model_dir {
        Some(dir) => ChordModel::load_dir(dir),
        None => ChordModel::builtin(),
    }
    .context("loading the chord model")?;
    let grid = model.config.grid;
    let set = read_rolls(&frames.display().to_string(), grid)?;
    let clipped =
        set.rolls.iter().flat_map(|r| &r.frames).filter(|&&f| model.config.fit_frame(f) != f).count();
    let score = score_rolls(&model, &set.rolls, false, true)?;
    let frames_after_first = score.frames - set.rolls.len();
    let nll = score.nll / score.frames.max(1) as f64;
    let nll_after_first = score.nll_after_first / frames_after_first.max(1) as f64;
    println!(
        "{}: {} sequences, {} frames\n  NLL {nll:.4} nats per frame (every frame); {nll_after_first:.4} (first frame of each sequence left out)\n  frame accuracy {:.4}",
        frames.display(),
        set.rolls.len(),
        score.frames,
        score.accuracy()
    );
    if clipped > 0 {
        println!("  note: {clipped} frames had pitches or voices beyond the model's and were cut to fit: not the benchmark's figure");
    }
    let mut training = RollSet::default();
    for spec in c.training {
        let paths = spec.split_once('=').map_or(spec.as_str(), |(_, p)| p);
        training.rolls.extend(read_rolls(paths, grid)?.rolls);
    }
    let steps_per_bar = 4 * grid.steps_per_quarter as usize;
    let model = Arc::new(model);
    let mut reports = Vec::new();
    for &temperature in c.temperatures {
        let settings = SamplingSettings { temperature, top_k: c.top_k, top_p: c.top_p, ..Default::default() };
        let report = continue_pieces(
            &model,
            &set.rolls,
            &training.rolls,
            c.primer_bars * steps_per_bar,
            c.bars * steps_per_bar,
            &settings,
            c.seed,
        )?;
        print_continuations(&report);
        reports.push(report);
    }
    let report = serde_json::json!({
        "model": model.origin,
        "data": frames.display().to_string(),
        "sequences": set.rolls.len(),
        "frames": score.frames,
        "nll_per_frame": nll,
        "nll_per_frame_after_first": nll_after_first,
        "frame_accuracy": score.accuracy(),
        "frames_cut_to_the_model": clipped,
        "continuations": reports,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_continuations(r: &PolyContinuations) {
    println!(
        "\nContinuations at T={}: {} pieces, {} frames of primer, {} generated and compared with the piece's own",
        r.temperature, r.num_pieces, r.primer_frames, r.continuation_frames
    );
    println!("  overlap/KL of the MGEval distance distributions (1/0 is a perfect match); real halves: the best to expect");
    println!(
        "  {:<15} {:>13} {:>13} {:>13} {:>13}",
        "feature", "real", "real halves", "generated", "vs real"
    );
    let cell = |s: &Option<model_similarity::Similarity>| {
        s.map_or("-".to_string(), |s| format!("{:.2}/{:.2}", s.overlap, s.kl))
    };
    for row in &r.rows {
        println!(
            "  {:<15} {:>13} {:>13} {:>13} {:>13}",
            row.feature,
            format!("{:.2}±{:.2}", row.real.0, row.real.1),
            cell(&row.ceiling),
            format!("{:.2}±{:.2}", row.generated.0, row.generated.1),
            cell(&row.vs_real)
        );
    }
    if let (Some(real), Some(generated)) = (r.real_copying, r.generated_copying) {
        println!("  copying: longest run of frames found in a training piece (any key), median / p95 / max");
        println!(
            "    real continuations {:.0} / {:.0} / {:.0}; generated {:.0} / {:.0} / {:.0}",
            real.0, real.1, real.2, generated.0, generated.1, generated.2
        );
    }
}
