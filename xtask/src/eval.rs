//! `cargo xtask eval`: scores a model on folders of songs (likelihood, continuations against
//! the true next bars, copying from training songs) and writes a table, JSON and MIDI.
//! Runs on: offline (a terminal).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use model::io::TRAIN_FILE;
use music::encode::DurationFilter;
use music::midi::write_midi;
use music::Melody;
use train::data::{read_set, DataSet, Split};
use train::eval::select::{data_config_for, split_melodies};
use train::eval::{
    file_stem_of, format_table, read_training_record, run_eval, select_songs, to_json, EvalObserver,
    EvalSettings, SplitSide, Stage, TrainingSongs,
};

use crate::train::parse_set;

/// The built-in model's training summary, if the trained model ships one.
const BUILTIN_TRAIN_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../presets/models/default/train.json");

/// Score a model on folders of songs: likelihood, continuations, copying.
///
/// Likelihood is measured the recipe's way (each symbol from the 64 before it) and streaming
/// (the state carried through each song, as the plugin runs). Every song of at least 8 bars is
/// continued from its first 4 bars at each temperature, and the continuations are compared with
/// the true next 4 bars on musical features. With --train-data, it also finds the longest run of
/// notes each continuation copies from a training song. Songs go through the filters and key
/// convention of the model's training (from its train.json, else any length on the grid).
///
/// Example, the held-out tenth of the benchmark split, for a model trained on the Erk tunes
/// (its train.json names the files), with copies looked for in its training songs:
///
///   cargo xtask eval --model my-model --split validation --train-data erk=../shared/corpus/essen/erk5.abc,../shared/corpus/essen/erk10.abc,../shared/corpus/essen/erk20.abc,../shared/corpus/essen/erk30.abc --train-split training --json eval.json
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Where the network runs: cpu, cuda or metal (the last two need the build feature of that
    /// name).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model directory (default: the model built into the plugin).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Score a chord model on a polyphonic benchmark split (a `.frames` file; `FILE@K` for K
    /// frames a quarter note other than the model's): negative log-likelihood in nats per frame
    /// and frame accuracy, then continuations of every piece of --primer-bars + --bars (4/4) at
    /// each --temperature compared with the real ones, and, with --train-data (.frames or MIDI),
    /// the longest stretch of chords each copies. The model defaults to the built-in chord model.
    #[arg(long)]
    frames: Option<PathBuf>,
    /// Leave the model's tune memory out: the network alone.
    #[arg(long)]
    no_memory: bool,
    /// Songs to evaluate as `[NAME=]PATH[,PATH...]` (files and folders of .abc and .mid);
    /// repeat for several sets. Each set is split on its own, as in training. Default: the sets
    /// the model was trained on (from its train.json), which suits --split validation.
    #[arg(long = "data", value_name = "[NAME=]PATHS")]
    data: Vec<String>,
    /// Which songs of each set: `all`, or the `validation` or `training` side of the model's
    /// split (the same songs its training run held out or trained on).
    #[arg(long, default_value = "all")]
    split: String,
    /// The split's N (song index % N == 0 is validation); default: the model's, else 10.
    #[arg(long)]
    val_every: Option<usize>,
    /// Allowed note lengths: `recipe` (1/4 … 4 quarters) or `grid`; default: the model's.
    #[arg(long)]
    durations: Option<String>,
    /// Training songs to look for copies in, as `[NAME=]PATH[,PATH...]`; repeatable. The songs
    /// under evaluation are never counted as their own training songs.
    #[arg(long = "train-data", value_name = "[NAME=]PATHS")]
    train_data: Vec<String>,
    /// Which songs of the training data: `all` or the `training` side of the split.
    #[arg(long, default_value = "all")]
    train_split: String,
    /// Sampling temperature of the continuations; repeat for several (default 1.0).
    #[arg(long = "temperature")]
    temperatures: Vec<f32>,
    /// Song i is continued with seed SEED + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Choose among the k likeliest symbols only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Choose among the likeliest symbols that make up this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Symbols of context in the windowed likelihood.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Windows per forward pass (1024 takes about 0.7 GB; larger is a little faster).
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Evaluate at most this many evenly spaced windowed targets (quicker on big sets).
    #[arg(long)]
    max_window_targets: Option<usize>,
    /// Evaluate only the first N songs selected.
    #[arg(long)]
    max_songs: Option<usize>,
    /// Bars of primer.
    #[arg(long, default_value_t = 4)]
    primer_bars: usize,
    /// Bars generated and compared.
    #[arg(long, default_value_t = 4)]
    bars: usize,
    /// Offenders to name per temperature.
    #[arg(long, default_value_t = 5)]
    worst: usize,
    /// Write the full report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write each song's primer and continuation here as MIDI, one file per song (and
    /// temperature, when there are several).
    #[arg(long)]
    write_midi: Option<PathBuf>,
    /// Tempo of the MIDI files in quarter notes per minute, when the song gives none.
    #[arg(long, default_value_t = 100.0)]
    tempo: f64,
}

/// `name (path, path)` for each set.
fn set_names(sets: &[DataSet]) -> String {
    let names: Vec<String> = sets
        .iter()
        .map(|s| {
            let paths: Vec<String> = s.paths.iter().map(|p| p.display().to_string()).collect();
            format!("{} ({})", s.name, paths.join(", "))
        })
        .collect();
    names.join("; ")
}

fn parse_side(text: &str, flag: &str) -> Result<SplitSide> {
    Ok(match text {
        "all" => SplitSide::All,
        "validation" => SplitSide::Validation,
        "training" => SplitSide::Training,
        other => bail!("{flag} {other}: expected all, validation or training"),
    })
}

pub fn run(args: EvalArgs) -> Result<()> {
    if let Some(frames) = &args.frames {
        let temperatures = if args.temperatures.is_empty() { vec![1.0] } else { args.temperatures.clone() };
        let continuations = crate::chords::Continuations {
            training: &args.train_data,
            temperatures: &temperatures,
            seed: args.seed,
            top_k: args.top_k,
            top_p: args.top_p,
            primer_bars: args.primer_bars,
            bars: args.bars,
        };
        return crate::chords::eval_frames(
            args.model.as_deref(),
            frames,
            args.json.as_deref(),
            &continuations,
        );
    }
    let started = Instant::now();
    let side = parse_side(&args.split, "--split")?;
    let train_side = parse_side(&args.train_split, "--train-split")?;
    if train_side == SplitSide::Validation {
        bail!("--train-split validation: copies are looked for in training songs (all or training)");
    }
    let model = Arc::new(crate::load_model(args.model.as_deref(), !args.no_memory, &args.device)?);
    let train_json = match &args.model {
        Some(dir) => dir.join(TRAIN_FILE),
        None => PathBuf::from(BUILTIN_TRAIN_JSON),
    };
    let record = read_training_record(&train_json)?;
    let mut data = match &record {
        Some(record) => {
            println!("filters and split from {}", train_json.display());
            record.data.clone()
        }
        None => {
            println!("no {}: any length on the grid, split every 10th song", train_json.display());
            data_config_for(&model.config)
        }
    };
    if let Some(n) = args.val_every {
        data.split = Split::EveryNth { n };
    }
    match args.durations.as_deref() {
        None => {}
        Some("recipe") => data.durations = DurationFilter::recipe(),
        Some("grid") => data.durations = DurationFilter::OnGrid,
        Some(other) => bail!("--durations {other}: expected recipe or grid"),
    }

    let data_sets: Vec<DataSet> = if args.data.is_empty() {
        let trained_on = record.map(|r| r.sets).unwrap_or_default();
        if trained_on.is_empty() {
            bail!("no songs: give --data PATH (the model's train.json names no data sets)");
        }
        println!("the sets the model was trained on: {}", set_names(&trained_on));
        trained_on
    } else {
        args.data.iter().enumerate().map(|(i, spec)| parse_set(spec, i)).collect()
    };
    let mut sets = Vec::new();
    for set in &data_sets {
        sets.push((set.name.clone(), read_set(set, &data)));
    }
    let mut selection = select_songs(sets, &data, side, &model.config);
    if let Some(max) = args.max_songs.filter(|&max| max < selection.songs.len()) {
        println!("evaluating the first {max} of {} usable songs", selection.songs.len());
        selection.songs.truncate(max);
    }
    let num_duration_refused: usize = selection.sets.iter().filter_map(|c| c.rejected.get("duration")).sum();
    if num_duration_refused > 0 && args.durations.is_none() {
        println!(
            "{num_duration_refused} songs have note lengths the model's training filter refuses; \
             --durations grid takes them"
        );
    }
    if selection.songs.is_empty() {
        for c in &selection.sets {
            println!(
                "{}: {} melodies, {} unreadable, refused {:?}",
                c.name, c.num_melodies, c.num_unreadable, c.rejected
            );
        }
        bail!("no song to evaluate");
    }
    let songs = &selection.songs;

    let training = if args.train_data.is_empty() {
        None
    } else {
        let mut melodies: Vec<Melody> = Vec::new();
        for (i, spec) in args.train_data.iter().enumerate() {
            let set = parse_set(spec, i);
            let (chosen, c) = split_melodies(&set.name, read_set(&set, &data), &data, train_side);
            println!("training songs {}: {} of {} melodies", set.name, chosen.len(), c.num_melodies);
            melodies.extend(chosen);
        }
        let exclude: Vec<_> = songs.iter().map(|s| &s.melody.source).collect();
        let indexed = Instant::now();
        let training = TrainingSongs::new(&melodies, &exclude);
        println!(
            "indexed {} training songs ({} steps) in {:.1} s",
            training.len(),
            training.index().num_steps(),
            indexed.elapsed().as_secs_f64()
        );
        Some(training)
    };

    let temperatures = if args.temperatures.is_empty() { vec![1.0] } else { args.temperatures.clone() };
    let settings = EvalSettings {
        context_len: args.context,
        batch_size: args.batch,
        max_window_targets: args.max_window_targets,
        temperatures,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        primer_bars: args.primer_bars,
        continuation_bars: args.bars,
        num_worst: args.worst,
    };
    let mut progress = Progress { bar: None };
    let output = run_eval(&model, &selection, training.as_ref(), &settings, &mut progress)?;
    progress.finish();
    println!("{}", format_table(&output.report));

    if let Some(path) = &args.json {
        std::fs::write(path, to_json(&output.report))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(dir) = &args.write_midi {
        write_continuations(dir, &output.continued, songs, args.tempo, settings.temperatures.len() > 1)?;
    }
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One MIDI file per song (and temperature when there are several): the primer, then the
/// generated continuation.
fn write_continuations(
    dir: &Path,
    continued: &[train::eval::ContinuedSong],
    songs: &[train::eval::EvalSong],
    default_tempo_qpm: f64,
    several_temperatures: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut num_files = 0;
    for song in continued {
        let source = &songs[song.song_idx].melody;
        let tempo = source.tempo_qpm.unwrap_or(default_tempo_qpm);
        for (generated_idx, (temperature, _)) in song.generated.iter().enumerate() {
            let mut name = file_stem_of(&source.source);
            if several_temperatures {
                name.push_str(&format!("-t{temperature}"));
            }
            let path = dir.join(format!("{name}.mid"));
            std::fs::write(&path, write_midi(&song.joined(generated_idx), tempo))
                .with_context(|| format!("writing {}", path.display()))?;
            num_files += 1;
        }
    }
    println!("wrote {num_files} MIDI files to {}", dir.display());
    Ok(())
}

/// One progress bar per stage.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl EvalObserver for Progress {
    fn on_stage(&mut self, stage: Stage, total: usize) {
        self.finish();
        self.bar = Some(crate::progress_bar(stage.label(), total));
    }

    fn on_progress(&mut self, done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }
}
