//! `cargo xtask train`: trains a melody model on folders of `.abc` and `.mid` files and writes
//! a model directory (`model.safetensors`, `config.json`, `train.json`, `loss.png`).
//! Runs on: offline (a terminal).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use model::io::{read_model_config, ModelSource};
use model::memory::{MEMORY_CONFIG_FILE, MEMORY_FILE};
use model::{select_device, InputKind, Transposition};
use music::encode::DurationFilter;
use music::key::KeySource;
use plotters::prelude::*;
use train::data::read_set;
use train::fused::{set_training_products, Products};
use train::trainer::{
    build_dataset, read_train_config, train, BatchProgress, DataSet, EpochRecord, EvalMetrics, LrSchedule,
    Split, TrainConfig, TrainObserver, TrainSummary,
};

/// Train a melody model on folders of .abc and .mid files.
///
/// Settings come from `--config FILE` (JSON, every field optional) and then from the flags
/// given here; nothing else is built in. Example, the benchmark split of the Erk tunes:
///
///   cargo xtask train --data erk=../shared/corpus/essen/erk5.abc,../shared/corpus/essen/erk10.abc,../shared/corpus/essen/erk20.abc,../shared/corpus/essen/erk30.abc --durations recipe --out my-model
///
/// To fine-tune the built-in model on a few dozen of your own tunes (with --init-from and no
/// --config, the defaults suit fine-tuning: learning rate 3e-4, batches of 16 windows 16 steps
/// apart, no weight average):
///
///   cargo xtask train --init-from builtin --data ~/tunes --out my-model
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Settings file (JSON): a TrainConfig, or a model's train.json to repeat its run; flags
    /// override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training data as `[NAME=]PATH[,PATH...]`; repeat for several sets. Each set is split on
    /// its own and validated on its own.
    #[arg(long = "data", value_name = "[NAME=]PATHS")]
    pub(crate) data: Vec<String>,
    /// The model directory to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Continue the run in `--out` from its last epoch (same data and settings), with the
    /// optimiser as it was.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Start from a trained model's weights rather than random ones, to fine-tune it on this
    /// data: a model directory, or `builtin`. The run keeps its sizes, pitch range and key
    /// convention.
    #[arg(long, value_name = "DIR|builtin")]
    init_from: Option<String>,
    /// Learn also from a trained model's predictions (distillation): a model directory, or
    /// `builtin`. Repeat for several; their mean is the target. It must read the data as this
    /// run does (grid, key convention, song delimiter, bar meters) and know its symbols; its
    /// size may differ. Their mean is validated before the first epoch.
    #[arg(long, value_name = "DIR|builtin")]
    teacher: Vec<String>,
    /// Share of the loss taken from the teachers' predictions, in [0, 1] (default 0.5); the
    /// rest is from the symbols of the data.
    #[arg(long)]
    teacher_weight: Option<f64>,
    /// Where to train: cpu, cuda or metal (the last two need the build feature of that name).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Multiply the recurrences in f32 even where the CPU multiplies bfloat16 (AMX, or AVX-512
    /// BF16). By default, where it does, training multiplies them in bfloat16 and sums in f32,
    /// faster (see README, Speed); validation and every score are f32 either way.
    #[arg(long)]
    f32_products: bool,
    /// The data sets whose held-out songs fit the tune memory built after training, pooled:
    /// `NAME[,NAME...]` (default: the one that picks the best epoch, else the first with
    /// held-out songs). Name others than the one you judge the model on to keep it unseen.
    #[arg(long, value_name = "NAMES")]
    memory_fit_on: Option<String>,
    /// Train the network only, without a tune memory (`cargo xtask memory` can add one later).
    #[arg(long)]
    no_memory: bool,
    /// Seed of the weights, window order and dropout.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Most epochs.
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// Epochs without a better validation loss before stopping (0: never).
    #[arg(long)]
    pub(crate) patience: Option<usize>,
    /// Windows per batch.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Symbols per training window (every position is a target, unless `--min-context`).
    #[arg(long)]
    pub(crate) window: Option<usize>,
    /// Distance between window starts.
    #[arg(long)]
    stride: Option<usize>,
    /// Leave out of the loss the targets predicted from fewer symbols of their window than
    /// this (validation predicts each from 64; pair it with a shorter `--stride`).
    #[arg(long)]
    min_context: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Decay after warmup: `cosine`, `constant`, or `step:EPOCHS:FACTOR`.
    #[arg(long)]
    schedule: Option<String>,
    /// Final learning rate of the cosine schedule, as a share of the peak.
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    /// Largest global gradient norm (0: no clipping).
    #[arg(long)]
    pub(crate) grad_clip: Option<f64>,
    /// Validate and keep an exponential moving average of the weights with this decay per step
    /// (e.g. 0.999; 0: off). Helps most with small batches. It starts at the weights of
    /// --init-from or a resumed run; from random weights, it holds only what the run trained.
    #[arg(long)]
    weight_average: Option<f64>,
    /// LSTM width.
    #[arg(long)]
    pub(crate) hidden: Option<usize>,
    /// LSTM layers.
    #[arg(long)]
    pub(crate) layers: Option<usize>,
    /// Embedding width; 0 for the recipe's one-hot input.
    #[arg(long)]
    embedding: Option<usize>,
    /// Dropout between layers and before the output layer.
    #[arg(long)]
    pub(crate) dropout: Option<f32>,
    /// Draw the dropout mask once per window and layer, the same at every step.
    #[arg(long)]
    locked_dropout: bool,
    /// DropConnect on the recurrent weights: the chance each is dropped for a batch.
    #[arg(long)]
    weight_drop: Option<f32>,
    /// Also read each step's place in its bar beside its symbol (songs in the common meters:
    /// 2/4, 3/4, 4/4, 6/8...); the plugin reads it from the host's time signature.
    #[arg(long)]
    bar_positions: bool,
    /// With --bar-positions, also read the symbols 1 to N bars before each one predicted (N at most 4).
    #[arg(long)]
    bar_lookback: Option<usize>,
    /// With --bar-positions, also read the symbol that followed the latest longest earlier
    /// match of the symbols just played (within 63 steps), in N classes of match length (N at
    /// most 4). A model without them may be given them with --init-from: they start at zero.
    #[arg(long)]
    repeat_classes: Option<usize>,
    /// With --bar-positions, also read each symbol's bar number since the song began, telling N
    /// bars apart (the count starts again after bar N; N at most 256): where phrases, and songs,
    /// end. A model without them may be given them with --init-from: they start at zero.
    #[arg(long)]
    bar_numbers: Option<usize>,
    /// `every-nth` (song index % --val-every == 0 is validation) or `random`.
    #[arg(long)]
    split: Option<String>,
    /// N of the every-nth split (10: the benchmark split).
    #[arg(long)]
    val_every: Option<usize>,
    /// Share of songs the random split puts in validation.
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Seed of the random split.
    #[arg(long)]
    split_seed: Option<u64>,
    /// Allowed note lengths: `recipe` (1/4 … 4 quarters) or `grid` (anything on the grid).
    #[arg(long)]
    durations: Option<String>,
    /// Key used for the transposition to C major / A minor: `declared` (then estimated) or
    /// `estimated`.
    #[arg(long)]
    key_source: Option<String>,
    /// Keep songs in their own keys.
    #[arg(long)]
    no_transpose: bool,
    /// Also train on every transposition of each training song that fits the pitch range.
    #[arg(long)]
    augment: bool,
    /// Pitch range `LO-HI` (MIDI numbers, inclusive); songs outside are dropped. Default: the
    /// range of the data.
    #[arg(long)]
    pitch_range: Option<String>,
    /// Keep training songs that equal a validation song.
    #[arg(long)]
    keep_duplicates: bool,
    /// Put each training song of a set in the stream this many times, as `NAME=COPIES`;
    /// repeat for several sets (validation is unaffected).
    #[arg(long, value_name = "NAME=COPIES")]
    oversample: Vec<String>,
    /// Windows per validation batch.
    #[arg(long)]
    eval_batch: Option<usize>,
    /// Validate on at most this many evenly spaced symbols per set (default: all).
    #[arg(long)]
    eval_max_targets: Option<usize>,
    /// The set whose validation loss picks the best epoch (default: the first).
    #[arg(long)]
    select_on: Option<String>,
    /// Cut each epoch to this many batches (quick trials).
    #[arg(long)]
    pub(crate) max_batches: Option<usize>,
    /// What to train: `melody` (one line, folders of .abc and .mid) or `chords` (polyphonic:
    /// benchmark .frames files, or .mid files read with every voice).
    #[arg(long, default_value = "melody")]
    pub(crate) kind: String,
    /// Chords: validation data, `.frames` files or .mid files and folders, comma-separated
    /// (default: every tenth piece of --data).
    #[arg(long, value_name = "PATHS")]
    pub(crate) valid: Option<String>,
    /// Chords: most voices in a frame (default 12; at most 16).
    #[arg(long)]
    pub(crate) max_voices: Option<usize>,
    /// Chords: frames per quarter note (the benchmarks: 1 for JSB chorales, 2 for the others;
    /// default 2, eighth notes).
    #[arg(long)]
    pub(crate) frames_per_quarter: Option<u32>,
    /// Chords: move each training window by up to this many semitones either way (default 0).
    #[arg(long)]
    pub(crate) transpose: Option<i32>,
}

/// File name of the loss plot in the model directory.
const PLOT_FILE: &str = "loss.png";

/// Sets how this process's training passes multiply (`train::fused::set_training_products`):
/// bfloat16 where the CPU multiplies it unless `f32_only`; returns the choice in effect.
pub fn choose_products(f32_only: bool) -> Products {
    set_training_products(if f32_only { Products::F32 } else { Products::Bf16 })
}

pub fn run(args: TrainArgs) -> Result<()> {
    let products = choose_products(args.f32_products);
    match args.device.as_str() {
        "cpu" => println!("recurrent products: {}", products.describe()),
        _ => println!("recurrent products: f32 on the GPU"),
    }
    match args.kind.as_str() {
        "melody" => {}
        "chords" => return crate::chords::train(&args),
        other => bail!("--kind {other}: the kinds are melody and chords"),
    }
    let cfg = settings(&args)?;
    if cfg.sets.is_empty() {
        bail!("no training data: give --data PATH (or \"sets\" in --config)");
    }
    let device = select_device(&args.device)?;
    let mut sets = Vec::new();
    for set in &cfg.sets {
        let collection = read_set(set, &cfg.data);
        println!(
            "{}: {} files, {} melodies, {} unreadable",
            set.name,
            collection.num_files,
            collection.melodies.len(),
            collection.errors.len()
        );
        for error in collection.errors.iter().take(3) {
            println!("  e.g. {error}");
        }
        sets.push((set.name.clone(), collection));
    }
    let data = build_dataset(sets, &cfg.data).context("building the dataset")?;
    for c in &data.counts {
        let rejected: Vec<String> = c.rejected.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        println!(
            "{}: kept {} of {} (dropped: {}); train {} songs (+{} transposed copies){}, validation {} songs",
            c.name,
            c.num_kept,
            c.num_melodies,
            if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") },
            c.num_train_songs,
            c.num_augmented_copies,
            match cfg.data.oversample.get(&c.name) {
                Some(copies) if *copies > 1 => format!(", each {copies} times in the stream"),
                _ => String::new(),
            },
            c.num_validation_songs
        );
    }
    println!(
        "vocabulary: {} symbols (pitches {}..={}); training stream {} symbols; validation {}",
        data.vocab.len(),
        data.lowest_pitch,
        data.highest_pitch,
        data.train_tokens.len(),
        data.validation
            .iter()
            .map(|v| format!("{} {}", v.name, v.tokens.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !args.no_memory && args.memory_fit_on.is_some() {
        crate::memory::fit_sets(args.memory_fit_on.as_deref(), &data.validation)
            .context("--memory-fit-on")?;
    }
    let mut observer = Progress::new(&args.out);
    let summary = train(&cfg, &data, &args.out, &device, args.resume, &mut observer)?;
    observer.finish();
    println!("stopped: {}", summary.stop_reason);
    if let Some(best) = summary.best_epoch {
        if best == 0 {
            println!("no epoch beat the model it started from, which is kept; on every validation symbol:");
        } else {
            println!("best epoch {best}, on every validation symbol:");
        }
        for (name, m) in &summary.final_validation {
            println!(
                "  {name}: loss {:.4} acc {:.4} | songs only: loss {:.4} acc {:.4} | non-hold: loss {:.4} acc {:.4}",
                m.all.loss, m.all.accuracy, m.song.loss, m.song.accuracy, m.non_hold.loss, m.non_hold.accuracy
            );
        }
    }
    println!(
        "wall {:.0} s, training {:.0} s, {:.0} symbols/s; model in {}",
        summary.wall_s,
        summary.train_wall_s,
        summary.symbols_per_s,
        args.out.display()
    );
    // A memory left from an earlier run in the same folder belongs to other weights.
    for file in [MEMORY_FILE, MEMORY_CONFIG_FILE] {
        let path = args.out.join(file);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing the old {}", path.display()))?;
        }
    }
    if !args.no_memory {
        println!("\ntune memory:");
        let fit_on = args.memory_fit_on.as_deref().or(cfg.eval.select_on.as_deref());
        if let Err(err) = crate::memory::remember(&args.out, &cfg, fit_on, &args.out, &args.device) {
            println!("no tune memory: {err:#} (the network is saved; `cargo xtask memory` can try again)");
        }
    }
    Ok(())
}

/// The config file (or defaults) with the flags applied.
fn settings(args: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = match &args.config {
        Some(path) => read_train_config(path).with_context(|| format!("reading {}", path.display()))?,
        None if args.init_from.is_some() => TrainConfig::fine_tuning(),
        None => TrainConfig::default(),
    };
    if args.init_from.is_some() {
        cfg.init_from = args.init_from.clone();
    }
    if let Some(source) = &cfg.init_from {
        let base = read_model_config(&ModelSource::parse(source))
            .with_context(|| format!("--init-from {source}: reading the model to start from"))?;
        cfg.adopt_base(&base);
    }
    if !args.data.is_empty() {
        cfg.sets = args.data.iter().enumerate().map(|(i, spec)| parse_set(spec, i)).collect();
    }
    set(&mut cfg.seed, args.seed);
    set(&mut cfg.epochs, args.epochs);
    set(&mut cfg.patience, args.patience);
    set(&mut cfg.batch_size, args.batch_size);
    set(&mut cfg.window_len, args.window);
    if let Some(window) = args.window {
        // A new window length moves the default stride with it.
        if args.stride.is_none() {
            cfg.window_stride = window;
        }
    }
    set(&mut cfg.window_stride, args.stride);
    set(&mut cfg.min_context, args.min_context);
    set(&mut cfg.learning_rate, args.lr);
    set(&mut cfg.warmup_steps, args.warmup_steps);
    set(&mut cfg.weight_decay, args.weight_decay);
    set(&mut cfg.grad_clip_norm, args.grad_clip);
    set(&mut cfg.weight_average, args.weight_average);
    if !args.teacher.is_empty() {
        cfg.teachers = args.teacher.clone();
    }
    set(&mut cfg.teacher_weight, args.teacher_weight);
    if let Some(text) = &args.schedule {
        cfg.schedule = parse_schedule(text, args.min_lr_ratio)?;
    } else if let (Some(ratio), LrSchedule::Cosine { min_ratio }) = (args.min_lr_ratio, &mut cfg.schedule) {
        *min_ratio = ratio;
    }
    set(&mut cfg.model.hidden_size, args.hidden);
    set(&mut cfg.model.num_layers, args.layers);
    set(&mut cfg.model.dropout, args.dropout);
    if args.locked_dropout {
        cfg.model.locked_dropout = true;
    }
    set(&mut cfg.model.weight_drop, args.weight_drop);
    if args.bar_positions {
        cfg.data.bar_meters = music::bar::COMMON_METERS.to_vec();
    }
    set(&mut cfg.model.bar_lookback, args.bar_lookback);
    if cfg.model.bar_lookback > 0 && cfg.data.bar_meters.is_empty() {
        bail!("--bar-lookback needs --bar-positions: bars are counted in the songs' meters");
    }
    set(&mut cfg.model.repeat_classes, args.repeat_classes);
    if cfg.model.repeat_classes > 0 && cfg.data.bar_meters.is_empty() {
        bail!("--repeat-classes needs --bar-positions: repeats are read beside the bar inputs");
    }
    set(&mut cfg.model.bar_numbers, args.bar_numbers);
    if cfg.model.bar_numbers > 0 && cfg.data.bar_meters.is_empty() {
        bail!("--bar-numbers needs --bar-positions: bars are counted in the songs' meters");
    }
    if let Some(dim) = args.embedding {
        cfg.model.input = if dim == 0 { InputKind::OneHot } else { InputKind::Embedding { dim } };
    }
    match args.split.as_deref() {
        None => {}
        Some("every-nth") => cfg.data.split = Split::EveryNth { n: args.val_every.unwrap_or(10) },
        Some("random") => {
            cfg.data.split = Split::Random {
                fraction: args.val_fraction.unwrap_or(0.1),
                seed: args.split_seed.unwrap_or(cfg.seed),
            }
        }
        Some(other) => bail!("--split {other}: expected every-nth or random"),
    }
    if let (Some(n), Split::EveryNth { n: current }) = (args.val_every, &mut cfg.data.split) {
        *current = n;
    }
    match args.durations.as_deref() {
        None => {}
        Some("recipe") => cfg.data.durations = DurationFilter::recipe(),
        Some("grid") => cfg.data.durations = DurationFilter::OnGrid,
        Some(other) => bail!("--durations {other}: expected recipe or grid"),
    }
    if let Some(text) = &args.key_source {
        let key_source = match text.as_str() {
            "declared" => KeySource::DeclaredThenEstimated,
            "estimated" => KeySource::Estimated,
            other => bail!("--key-source {other}: expected declared or estimated"),
        };
        cfg.data.transposition = Transposition::PlainSignature { key_source };
    }
    if args.no_transpose {
        cfg.data.transposition = Transposition::None;
    }
    if args.augment {
        cfg.data.augment_keys = true;
    }
    if args.keep_duplicates {
        cfg.data.drop_validation_duplicates = false;
    }
    for spec in &args.oversample {
        let (name, copies) =
            spec.split_once('=').with_context(|| format!("--oversample {spec}: expected NAME=COPIES"))?;
        let copies: usize = copies
            .trim()
            .parse()
            .with_context(|| format!("--oversample {spec}: COPIES must be a whole number"))?;
        cfg.data.oversample.insert(name.trim().to_string(), copies);
    }
    if let Some(text) = &args.pitch_range {
        let (lo, hi) = text.split_once('-').context("--pitch-range: expected LO-HI, such as 48-84")?;
        cfg.data.pitch_range = Some((lo.trim().parse()?, hi.trim().parse()?));
    }
    set(&mut cfg.eval.batch_size, args.eval_batch);
    if args.eval_max_targets.is_some() {
        cfg.eval.max_targets = args.eval_max_targets;
    }
    if args.select_on.is_some() {
        cfg.eval.select_on = args.select_on.clone();
    }
    if args.max_batches.is_some() {
        cfg.max_batches_per_epoch = args.max_batches;
    }
    Ok(cfg)
}

fn set<T: Copy>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// `name=a,b` or `a,b` (named after the first path's file stem, or `set{index}`).
pub(crate) fn parse_set(spec: &str, index: usize) -> DataSet {
    let (name, paths) = match spec.split_once('=') {
        Some((name, paths)) => (Some(name.to_string()), paths),
        None => (None, spec),
    };
    let paths: Vec<PathBuf> = paths.split(',').filter(|p| !p.is_empty()).map(PathBuf::from).collect();
    let name = name.unwrap_or_else(|| {
        paths
            .first()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("set{index}"))
    });
    DataSet { name, paths }
}

fn parse_schedule(text: &str, min_lr_ratio: Option<f64>) -> Result<LrSchedule> {
    let parts: Vec<&str> = text.split(':').collect();
    Ok(match parts.as_slice() {
        ["cosine"] => LrSchedule::Cosine { min_ratio: min_lr_ratio.unwrap_or(0.05) },
        ["constant"] => LrSchedule::Constant,
        ["step", every, factor] => LrSchedule::Step { every_epochs: every.parse()?, factor: factor.parse()? },
        _ => bail!("--schedule {text}: expected cosine, constant or step:EPOCHS:FACTOR"),
    })
}

/// Progress bars for training and validation, a line per epoch, and the loss plot.
struct Progress {
    out_dir: PathBuf,
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(out_dir: &Path) -> Self {
        Self { out_dir: out_dir.to_path_buf(), bar: None }
    }

    fn new_bar(&mut self, len: usize, prefix: String) -> &ProgressBar {
        if let Some(old) = self.bar.take() {
            old.finish_and_clear();
        }
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix);
        self.bar.insert(bar)
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl TrainObserver for Progress {
    fn on_start(&mut self, summary: &TrainSummary) {
        println!("{} weights on {}", summary.num_params, summary.device);
        if !summary.epochs.is_empty() {
            println!("resuming after epoch {}", summary.epochs.len());
        }
    }

    fn on_epoch_start(&mut self, epoch: usize, num_batches: usize) {
        self.new_bar(num_batches, format!("epoch {epoch}"));
    }

    fn on_batch(&mut self, p: &BatchProgress) {
        if let Some(bar) = &self.bar {
            bar.set_position(p.batch_idx as u64 + 1);
            bar.set_message(format!(
                "loss {:.4} acc {:.3} {:.0} sym/s lr {:.2e}",
                p.loss, p.accuracy, p.symbols_per_s, p.learning_rate
            ));
        }
    }

    fn on_eval_start(&mut self, _epoch: usize, num_targets: usize) {
        self.new_bar(num_targets, "validate".to_string());
    }

    fn on_eval_progress(&mut self, num_done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(num_done as u64);
        }
    }

    fn on_notice(&mut self, message: &str) {
        self.finish();
        println!("note: {message}");
    }

    fn on_base_validated(&mut self, validation: &[(String, EvalMetrics)]) {
        self.finish();
        println!("epoch   0 (the model it starts from): {}", validation_line(validation));
    }

    fn on_teachers_validated(&mut self, validation: &[(String, EvalMetrics)]) {
        self.finish();
        println!("the teachers' mean, which it learns from: {}", validation_line(validation));
    }

    fn on_epoch_end(&mut self, r: &EpochRecord, summary: &TrainSummary) {
        self.finish();
        println!(
            "epoch {:>3}: train loss {:.4} acc {:.4} | {} | {:.0}+{:.0} s, {:.0} sym/s{}",
            r.epoch,
            r.train_loss,
            r.train_accuracy,
            validation_line(&r.validation),
            r.train_wall_s,
            r.eval_wall_s,
            r.symbols_per_s,
            if r.is_best { " *best" } else { "" }
        );
        let path = self.out_dir.join(PLOT_FILE);
        if let Err(e) = plot_losses(&path, summary) {
            eprintln!("could not draw {}: {e}", path.display());
        }
    }
}

/// Loss and accuracy of each validation set, on all, song and non-hold targets.
fn validation_line(validation: &[(String, EvalMetrics)]) -> String {
    let sets: Vec<String> = validation
        .iter()
        .map(|(name, m)| {
            format!(
                "{name} loss {:.4} acc {:.4} (songs {:.4}/{:.4}, non-hold {:.4}/{:.4})",
                m.all.loss,
                m.all.accuracy,
                m.song.loss,
                m.song.accuracy,
                m.non_hold.loss,
                m.non_hold.accuracy
            )
        })
        .collect();
    sets.join(" | ")
}

/// Draws training and validation loss per epoch. Text is drawn with a small built-in pixel
/// font, so the plot needs no system fonts.
fn plot_losses(path: &Path, summary: &TrainSummary) -> Result<()> {
    let train: Vec<(f64, f64)> = summary.epochs.iter().map(|e| (e.epoch as f64, e.train_loss)).collect();
    // A fine-tuning run's validation starts at epoch 0, the model it started from.
    let base = summary.base_validation.first().map(|(_, m)| (0.0, m.all.loss));
    let validation: Vec<(f64, f64)> = base
        .into_iter()
        .chain(
            summary
                .epochs
                .iter()
                .filter_map(|e| e.validation.first().map(|(_, m)| (e.epoch as f64, m.all.loss))),
        )
        .collect();
    plot_curves(path, "loss", &train, &validation)
}

/// Draws a training and a validation curve per epoch (from epoch 0 when a curve has it), with
/// `label` on the y axis.
pub(crate) fn plot_curves(
    path: &Path,
    label: &str,
    train: &[(f64, f64)],
    validation: &[(f64, f64)],
) -> Result<()> {
    const WIDTH: u32 = 800;
    const HEIGHT: u32 = 480;
    let x_lo = if train.iter().chain(validation).any(|p| p.0 == 0.0) { 0.0 } else { 1.0 };
    let values = train.iter().chain(validation).map(|p| p.1).filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return Ok(());
    }
    let pad = ((hi - lo) * 0.1).max(0.01);
    let (y_lo, y_hi) = ((lo - pad).max(0.0), hi + pad);
    let x_hi = train.iter().chain(validation).map(|p| p.0).fold(2.0, f64::max);

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin_left(70)
        .margin_right(20)
        .margin_top(40)
        .margin_bottom(50)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    let grey = RGBColor(220, 220, 220);
    let y_ticks = 5;
    for i in 0..=y_ticks {
        let y = y_lo + (y_hi - y_lo) * i as f64 / y_ticks as f64;
        chart.draw_series(std::iter::once(PathElement::new(vec![(x_lo, y), (x_hi, y)], grey)))?;
        let (px, py) = chart.backend_coord(&(x_lo, y));
        draw_text(&root, &format!("{y:.3}"), px - 60, py - 5, &BLACK)?;
    }
    let x_step = ((x_hi as usize) / 10).max(1);
    for epoch in (x_lo as usize..=x_hi as usize).step_by(x_step) {
        let (px, py) = chart.backend_coord(&(epoch as f64, y_lo));
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(epoch as f64, y_lo), (epoch as f64, y_hi)],
            grey,
        )))?;
        draw_text(&root, &epoch.to_string(), px - 3, py + 8, &BLACK)?;
    }
    let blue = RGBColor(40, 90, 200);
    let red = RGBColor(210, 50, 40);
    chart.draw_series(LineSeries::new(train.to_vec(), blue.stroke_width(2)))?;
    chart.draw_series(train.iter().map(|&p| Circle::new(p, 3, blue.filled())))?;
    chart.draw_series(LineSeries::new(validation.to_vec(), red.stroke_width(2)))?;
    chart.draw_series(validation.iter().map(|&p| Circle::new(p, 3, red.filled())))?;
    draw_text(&root, label, 10, 14, &BLACK)?;
    draw_text(&root, "epoch", WIDTH as i32 / 2 - 15, HEIGHT as i32 - 22, &BLACK)?;
    draw_text(&root, "train", WIDTH as i32 - 190, 14, &blue)?;
    draw_text(&root, "val", WIDTH as i32 - 100, 14, &red)?;
    root.present()?;
    Ok(())
}

/// 3×5 glyphs (rows top to bottom, 3 bits each, high bit left) for the characters plots use.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 6, 3, 5, 7],
        'c' => [0, 7, 4, 4, 7],
        'e' => [0, 7, 7, 4, 7],
        'h' => [4, 4, 7, 5, 5],
        'i' => [2, 0, 2, 2, 2],
        'l' => [2, 2, 2, 2, 3],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'r' => [0, 7, 4, 4, 4],
        's' => [0, 7, 6, 3, 7],
        't' => [2, 7, 2, 2, 3],
        'v' => [0, 5, 5, 5, 2],
        _ => [0; 5],
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel a 2×2 square.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    x: i32,
    y: i32,
    color: &RGBColor,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    const SCALE: i32 = 2;
    for (i, c) in text.chars().enumerate() {
        let left = x + i as i32 * 4 * SCALE;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            area.draw_pixel((left + col * SCALE + dx, y + row as i32 * SCALE + dy), color)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_specs() {
        let named = parse_set("erk=a/erk5.abc,a/erk10.abc", 0);
        assert_eq!(named.name, "erk");
        assert_eq!(named.paths, vec![PathBuf::from("a/erk5.abc"), PathBuf::from("a/erk10.abc")]);
        assert_eq!(parse_set("x/folk", 3).name, "folk");
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn settings_of(flags: &[&str]) -> Result<TrainConfig> {
        use clap::Parser;
        let cli = Cli::try_parse_from(["train", "--out", "out", "--data", "tunes"].iter().chain(flags))?;
        settings(&cli.args)
    }

    #[test]
    fn fine_tuning_takes_the_base_and_its_own_defaults() {
        let builtin = read_model_config(&ModelSource::Builtin).unwrap();
        let tuning = settings_of(&["--init-from", "builtin"]).unwrap();
        assert_eq!(tuning.init_from.as_deref(), Some("builtin"));
        assert_eq!(tuning.learning_rate, TrainConfig::fine_tuning().learning_rate);
        assert_eq!((tuning.batch_size, tuning.window_stride, tuning.weight_average), (16, 16, 0.0));
        assert_eq!(tuning.model.hidden_size, builtin.hidden_size);
        assert_eq!(tuning.model.bar_lookback, builtin.bar_lookback);
        assert_eq!(tuning.data.pitch_range, Some((builtin.lowest_pitch, builtin.highest_pitch)));
        assert_eq!(tuning.data.bar_meters, builtin.bar_meters);
        // Flags still win, and a run from scratch keeps the usual defaults.
        assert_eq!(settings_of(&["--init-from", "builtin", "--lr", "0.001"]).unwrap().learning_rate, 1e-3);
        let scratch = settings_of(&[]).unwrap();
        assert_eq!((scratch.learning_rate, scratch.data.pitch_range), (3e-3, None));
        // A base that is not there is named.
        let err = settings_of(&["--init-from", "no/such/model"]).unwrap_err();
        assert!(format!("{err:#}").contains("no/such/model/config.json"), "{err:#}");
    }

    #[test]
    fn oversample_flags() {
        let cfg = settings_of(&["--oversample", "erk=2", "--oversample", "mine = 3"]).unwrap();
        assert_eq!(
            cfg.data.oversample,
            std::collections::BTreeMap::from([("erk".to_string(), 2), ("mine".to_string(), 3)])
        );
        for bad in ["erk", "erk=two"] {
            let err = settings_of(&["--oversample", bad]).unwrap_err();
            assert!(format!("{err:#}").contains(&format!("--oversample {bad}")), "{err:#}");
        }
    }

    #[test]
    fn schedules() {
        assert_eq!(
            parse_schedule("step:3:0.5", None).unwrap(),
            LrSchedule::Step { every_epochs: 3, factor: 0.5 }
        );
        assert_eq!(parse_schedule("cosine", Some(0.1)).unwrap(), LrSchedule::Cosine { min_ratio: 0.1 });
        assert!(parse_schedule("linear", None).is_err());
    }
}
