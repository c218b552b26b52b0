//! Training a melody model: windows over the training stream with every position a target,
//! AdamW with gradient-norm clipping and a warmup + decay schedule, seeded dropout, and after
//! each epoch the recipe's validation metric (every symbol of a validation stream predicted
//! from exactly the symbols before it). Keeps the best checkpoint, stops early, resumes, and
//! writes the run summary `train.json`.
//! Runs on: offline threads (xtask train, tests). Progress goes to a `TrainObserver`, so the
//! terminal and plotting live in xtask.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::ValidationStream;
pub use crate::data::{build_dataset, read_set, DataConfig, DataSet, Dataset, SetCounts, Split};
use crate::distill::Teachers;
use crate::forward::SequenceForward;
use crate::loss;
use crate::optim::{saved_tensor, AdamW};
use model::config::is_zero;
use model::io::{
    read_model_parts, read_tensors, read_weights, save_model, save_tensors, save_weights, ModelSource,
    TRAIN_FILE, WEIGHTS_FILE,
};
use model::lstm::{nll_and_argmax, Dropout, MelodyLstm, StepWeights};
use model::memory::TuneMemory;
pub use model::metrics::{nll_of, EvalMetrics, MetricSums, Score, ScoreSum};
use model::side::BarReader;
use model::{InputKind, ModelConfig, ModelError};
use music::{TokenId, Vocab};

/// Sub-folder of the output directory holding the state `--resume` needs.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const LAST_WEIGHTS_FILE: &str = "last.safetensors";
const RESUME_FILE: &str = "state.json";
/// The optimiser's moments and the weight average at the end of the last epoch.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The tensor of `OPTIMIZER_FILE` holding the epochs done when it was written.
const OPTIMIZER_EPOCH: &str = "epochs_done";

/// The network's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelShape {
    /// Embedding (with its width) or one-hot input.
    pub input: InputKind,
    /// Width of each LSTM layer.
    pub hidden_size: usize,
    /// Number of LSTM layers.
    pub num_layers: usize,
    /// Dropout between layers and before the output layer, in `[0, 1)`.
    pub dropout: f32,
    /// Draw the `dropout` mask once per window and layer rather than per step.
    pub locked_dropout: bool,
    /// DropConnect on each layer's recurrent weights, in `[0, 1)`: the chance each weight is
    /// dropped for a batch.
    pub weight_drop: f32,
    /// Bars of lookback (`ModelConfig::bar_lookback`; needs the data's bar meters).
    pub bar_lookback: usize,
    /// Classes of repeat read (`ModelConfig::repeat_classes`; needs the data's bar meters).
    #[serde(default)]
    pub repeat_classes: usize,
    /// Bars told apart by number (`ModelConfig::bar_numbers`; needs the data's bar meters).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bar_numbers: usize,
}

impl Default for ModelShape {
    fn default() -> Self {
        Self {
            input: InputKind::Embedding { dim: 64 },
            hidden_size: 256,
            num_layers: 2,
            dropout: 0.2,
            locked_dropout: false,
            weight_drop: 0.0,
            bar_lookback: 0,
            repeat_classes: 0,
            bar_numbers: 0,
        }
    }
}

/// How the learning rate moves over the run (after the linear warmup).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LrSchedule {
    /// The same rate throughout.
    Constant,
    /// Half a cosine from the full rate down to `min_ratio` of it at the last planned step.
    Cosine { min_ratio: f64 },
    /// Multiplied by `factor` every `every_epochs` epochs.
    Step { every_epochs: usize, factor: f64 },
}

/// How validation runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalConfig {
    /// Symbols of context before each predicted symbol (the recipe: 64). Every window starts
    /// from the zero state.
    pub context_len: usize,
    /// Windows per forward pass.
    pub batch_size: usize,
    /// Evaluate at most this many evenly spaced targets per stream (`None`: all of them).
    pub max_targets: Option<usize>,
    /// The validation set whose loss picks the best epoch and stops early (`None`: the first
    /// set with validation songs).
    pub select_on: Option<String>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { context_len: 64, batch_size: 512, max_targets: None, select_on: None }
    }
}

/// Everything a training run is set by; read from a JSON file and overridden by flags. Every
/// field has a default, so a file need only name what it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// The data, as named sets of files and folders.
    pub sets: Vec<DataSet>,
    /// Filtering, split, transposition and augmentation.
    pub data: DataConfig,
    /// Network sizes.
    pub model: ModelShape,
    /// Symbols per training window; every position of a window is a target unless
    /// `min_context` leaves the early ones out.
    pub window_len: usize,
    /// Distance between window starts (`window_len`: each symbol once an epoch).
    pub window_stride: usize,
    /// Targets predicted from fewer symbols of their window than this are left out of the
    /// loss (0 or 1: every position is a target). Validation predicts each target from
    /// `eval.context_len` symbols, so a run can spend its gradient on the contexts it is judged
    /// on; a stride below `window_len` keeps every symbol a target. Left out of `train.json`
    /// when 0, so runs that count every position record the settings they always did.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_context: usize,
    /// Windows per mini-batch.
    pub batch_size: usize,
    /// Most epochs to run.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation loss (0: never stop early).
    pub patience: usize,
    /// Peak learning rate of AdamW.
    pub learning_rate: f64,
    /// The decay after warmup.
    pub schedule: LrSchedule,
    /// Steps of linear warmup from 0 to `learning_rate`.
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradients are scaled down to this global L2 norm when larger (0: no clipping).
    pub grad_clip_norm: f64,
    /// Validate and keep an exponential moving average of the weights with this decay per step
    /// (0: the weights themselves). Small batches make the last step's weights noisy; their
    /// average generalises better. It starts at the weights a run starts from when those were
    /// trained (`init_from`, resuming, which restarts it); from random weights it holds only
    /// what the run trained, so its early epochs are not mostly the random start.
    pub weight_average: f64,
    /// Start from this model's weights rather than random ones (fine-tuning): a model
    /// directory, or `builtin`. The run must keep its sizes, vocabulary and conventions
    /// (`adopt_base` copies them).
    pub init_from: Option<String>,
    /// Trained models to learn from as well as from the data (distillation): model
    /// directories, or `builtin`. Empty: learn from the data alone.
    pub teachers: Vec<String>,
    /// How much of the loss is the cross-entropy against the teachers' mean distribution, in
    /// `[0, 1]`; the rest is against the symbol that came. Only read with teachers.
    pub teacher_weight: f64,
    /// Seeds the weights, window order and dropout.
    pub seed: u64,
    /// Cut each epoch to this many batches (for quick trials and tests).
    pub max_batches_per_epoch: Option<usize>,
    /// Validation settings.
    pub eval: EvalConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            sets: Vec::new(),
            data: DataConfig::default(),
            model: ModelShape::default(),
            window_len: 64,
            window_stride: 64,
            min_context: 0,
            batch_size: 64,
            epochs: 30,
            patience: 4,
            learning_rate: 3e-3,
            schedule: LrSchedule::Cosine { min_ratio: 0.05 },
            warmup_steps: 200,
            weight_decay: 0.01,
            grad_clip_norm: 1.0,
            weight_average: 0.0,
            init_from: None,
            teachers: Vec::new(),
            teacher_weight: 0.5,
            seed: 1,
            max_batches_per_epoch: None,
            eval: EvalConfig::default(),
        }
    }
}

impl TrainConfig {
    /// The defaults for fine-tuning a trained model on a small collection: a tenth of the
    /// learning rate and a short warmup, so the run refines what the model knows rather than
    /// overwriting it, and small batches of windows 16 steps apart, so a few dozen tunes still
    /// make hundreds of steps an epoch. No weight average: over so few steps it lags behind.
    pub fn fine_tuning() -> Self {
        Self {
            window_stride: 16,
            batch_size: 16,
            epochs: 20,
            patience: 4,
            learning_rate: 3e-4,
            warmup_steps: 50,
            ..Self::default()
        }
    }

    /// Takes the sizes and data conventions of `base`, the model the run starts from, so that
    /// the data is encoded in its vocabulary and the network fits its weights. Dropout is taken
    /// too, as a default the run may change.
    pub fn adopt_base(&mut self, base: &ModelConfig) {
        self.data.grid = base.grid;
        self.data.pitch_range = Some((base.lowest_pitch, base.highest_pitch));
        self.data.transposition = base.transposition;
        self.data.delimiter_len = base.delimiter_len;
        self.data.bar_meters = base.bar_meters.clone();
        self.model.input = base.input;
        self.model.hidden_size = base.hidden_size;
        self.model.num_layers = base.num_layers;
        self.model.dropout = base.dropout;
        self.model.bar_lookback = base.bar_lookback;
        self.model.repeat_classes = base.repeat_classes;
        self.model.bar_numbers = base.bar_numbers;
    }
}

/// The first way in which the model a run would build differs from the model it starts from,
/// if any, as `what (base), the run's (run)`.
fn base_mismatch(base: &ModelConfig, run: &ModelConfig) -> Option<String> {
    // A run may add repeat inputs or bar numbers to a base without them: their tables start at
    // zero.
    let adds_repeats = base.repeat_classes == 0;
    let adds_bar_numbers = base.bar_numbers == 0;
    config_mismatch(base, run, &|what| {
        !(adds_repeats && what == "repeat classes" || adds_bar_numbers && what == "bar numbers")
    })
}

/// The first of the parts that `which` names (by their names below) in which `ours` differs
/// from the run's model `run`, as `what (ours), the run's (run)`.
pub(super) fn config_mismatch(
    ours: &ModelConfig,
    run: &ModelConfig,
    which: &dyn Fn(&str) -> bool,
) -> Option<String> {
    // Everything the weights or the encoding depend on, as each side reads it.
    let parts = |c: &ModelConfig| {
        let meters: Vec<String> =
            c.bar_meters.iter().map(|m| format!("{}/{}", m.numerator, m.denominator)).collect();
        [
            ("pitch range", format!("{}..={}", c.lowest_pitch, c.highest_pitch)),
            ("vocabulary", format!("{:?}", c.vocab.symbols())),
            ("step grid", format!("{:?}", c.grid)),
            ("input", format!("{:?}", c.input)),
            ("size", format!("{}×{}", c.num_layers, c.hidden_size)),
            ("key convention", format!("{:?}", c.transposition)),
            ("song delimiter", c.delimiter_len.to_string()),
            ("bar meters", format!("[{}]", meters.join(" "))),
            ("bar lookback", c.bar_lookback.to_string()),
            ("repeat classes", c.repeat_classes.to_string()),
            ("bar numbers", c.bar_numbers.to_string()),
        ]
    };
    parts(ours)
        .into_iter()
        .zip(parts(run))
        .find(|((what, ours), (_, theirs))| which(what) && ours != theirs)
        .map(|((what, ours), (_, theirs))| format!("{what} {ours}, the run's {theirs}"))
}

/// The weights of the model a run starts from, after checking that the run's model fits them.
fn base_weights(
    source: &str,
    run: &ModelConfig,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let source = ModelSource::parse(source);
    let (base, mut tensors) = read_model_parts(&source, device)?;
    if let Some(problem) = base_mismatch(&base, run) {
        return Err(ModelError::Data(format!(
            "cannot start from {source}: it has {problem} (leave its sizes, pitch range and key convention as they are)"
        )));
    }
    // Inputs the base lacks start at zero, so the run starts from the base's function.
    for (name, shape) in MelodyLstm::tensor_shapes(run) {
        if let Entry::Vacant(slot) = tensors.entry(name) {
            slot.insert(Tensor::zeros(shape, DType::F32, device)?);
        }
    }
    Ok(tensors)
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training cross-entropy over the epoch's targets (with dropout).
    pub train_loss: f64,
    /// Training accuracy over the epoch's targets (with dropout).
    pub train_accuracy: f64,
    /// Training targets processed.
    pub train_symbols: usize,
    /// Optimiser steps taken.
    pub num_steps: usize,
    /// Steps skipped because the loss was not finite.
    pub num_skipped_steps: usize,
    /// Learning rate at the epoch's last step.
    pub learning_rate: f64,
    /// Seconds spent training.
    pub train_wall_s: f64,
    /// Training targets per second.
    pub symbols_per_s: f64,
    /// Seconds spent validating.
    pub eval_wall_s: f64,
    /// Validation per set, in set order.
    pub validation: Vec<(String, EvalMetrics)>,
    /// True if this epoch's weights are the saved best.
    pub is_best: bool,
}

/// `train.json`: what was trained on, how, and how it went. Rewritten after every epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// The settings of the run.
    pub config: TrainConfig,
    /// Counts per data set.
    pub data: Vec<SetCounts>,
    /// Symbols in the training stream, delimiters included.
    pub num_train_stream_symbols: usize,
    /// Symbols in each validation stream, delimiters included.
    pub num_validation_stream_symbols: Vec<(String, usize)>,
    /// Number of weights.
    pub num_params: usize,
    /// The device trained on.
    pub device: String,
    /// Every epoch so far.
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose weights are in `model.safetensors`.
    pub best_epoch: Option<usize>,
    /// That epoch's validation (on `eval.max_targets` targets when set).
    pub best_validation: Vec<(String, EvalMetrics)>,
    /// The best epoch's weights on every target of every validation stream, when epochs were
    /// validated on a subset (`eval.max_targets`); otherwise the same as `best_validation`.
    #[serde(default)]
    pub final_validation: Vec<(String, EvalMetrics)>,
    /// Why training stopped (empty while it runs).
    pub stop_reason: String,
    /// Seconds of the whole run, resumed parts included.
    pub wall_s: f64,
    /// Seconds spent in training steps.
    pub train_wall_s: f64,
    /// Training targets per second over the whole run.
    pub symbols_per_s: f64,
    /// Epochs completed before each `--resume`.
    pub resumed_after_epochs: Vec<usize>,
    /// The validation of the model the run started from (`init_from`), before any training:
    /// what an epoch must beat to be kept. Empty for a run from random weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_validation: Vec<(String, EvalMetrics)>,
    /// The validation of the teachers' mean distribution, the target the run learns from:
    /// what a student that copied them perfectly would score. Empty for a run without
    /// teachers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teachers_validation: Vec<(String, EvalMetrics)>,
}

/// What one batch reports to the observer.
#[derive(Clone, Copy, Debug)]
pub struct BatchProgress {
    /// 1-based epoch.
    pub epoch: usize,
    /// 0-based batch within the epoch.
    pub batch_idx: usize,
    /// Batches in this epoch.
    pub num_batches: usize,
    /// Mean training loss of the epoch so far.
    pub loss: f64,
    /// Training accuracy of the epoch so far.
    pub accuracy: f64,
    /// Training targets per second in this epoch so far.
    pub symbols_per_s: f64,
    /// The learning rate of this step.
    pub learning_rate: f64,
}

/// Receives progress; every method has an empty default.
pub trait TrainObserver {
    /// Before the first epoch of this process.
    fn on_start(&mut self, _summary: &TrainSummary) {}
    /// At the start of each epoch.
    fn on_epoch_start(&mut self, _epoch: usize, _num_batches: usize) {}
    /// After each optimiser step.
    fn on_batch(&mut self, _progress: &BatchProgress) {}
    /// Before validation, with the number of targets it will predict.
    fn on_eval_start(&mut self, _epoch: usize, _num_targets: usize) {}
    /// During validation, with the targets done so far.
    fn on_eval_progress(&mut self, _num_done: usize) {}
    /// After each epoch, once `train.json` is written.
    fn on_epoch_end(&mut self, _record: &EpochRecord, _summary: &TrainSummary) {}
    /// The model a fine-tuning run starts from was validated, before any training.
    fn on_base_validated(&mut self, _validation: &[(String, EvalMetrics)]) {}
    /// The teachers' mean distribution was validated, before any training.
    fn on_teachers_validated(&mut self, _validation: &[(String, EvalMetrics)]) {}
    /// Something the person running the training should know, that does not stop it.
    fn on_notice(&mut self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl TrainObserver for Quiet {}

/// What `--resume` picks up.
#[derive(Serialize, Deserialize)]
struct ResumeState {
    epochs_done: usize,
    global_step: usize,
    epochs_since_best: usize,
    best_loss: Option<f64>,
    summary: TrainSummary,
    /// Training stream length and vocabulary size, to refuse resuming on other data.
    data_fingerprint: (usize, usize),
    /// The counters beside the tensors of `OPTIMIZER_FILE`; absent in checkpoints written
    /// before the optimiser was saved, which resume with a fresh one.
    #[serde(default)]
    optimizer: Option<OptimizerCounters>,
}

/// The optimiser's and the weight average's counters, for an exact resume.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct OptimizerCounters {
    adam_steps: usize,
    average_total: f64,
    average_steps: usize,
}

/// The model config a run trains, from its settings and data.
pub fn model_config(cfg: &TrainConfig, data: &Dataset) -> ModelConfig {
    let mut model = ModelConfig::new(
        data.vocab.clone(),
        cfg.model.input,
        cfg.model.hidden_size,
        cfg.model.num_layers,
        cfg.model.dropout,
    );
    model.grid = cfg.data.grid;
    model.lowest_pitch = data.lowest_pitch;
    model.highest_pitch = data.highest_pitch;
    model.transposition = cfg.data.transposition;
    model.delimiter_len = cfg.data.delimiter_len;
    model.bar_meters = cfg.data.bar_meters.clone();
    model.bar_lookback = cfg.model.bar_lookback;
    model.repeat_classes = cfg.model.repeat_classes;
    model.bar_numbers = cfg.model.bar_numbers;
    model
}

/// Learning rate at optimiser step `step` (0-based) of `total_steps`, in epoch `epoch`
/// (0-based).
pub fn learning_rate_at(cfg: &TrainConfig, step: usize, total_steps: usize, epoch: usize) -> f64 {
    let peak = cfg.learning_rate;
    if step < cfg.warmup_steps {
        return peak * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    match cfg.schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine { min_ratio } => {
            let span = total_steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
            let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
            peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
        }
        LrSchedule::Step { every_epochs, factor } => peak * factor.powi((epoch / every_epochs.max(1)) as i32),
    }
}

/// Trains a model on `data` into `out_dir` (the model directory: `model.safetensors` and
/// `config.json` of the best epoch, `train.json`, and `checkpoint/` for `resume`).
pub fn train(
    cfg: &TrainConfig,
    data: &Dataset,
    out_dir: &Path,
    device: &Device,
    resume: bool,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, ModelError> {
    let started = Instant::now();
    let model_cfg = model_config(cfg, data);
    model_cfg
        .validate()
        .map_err(|problem| ModelError::InvalidConfig { path: "training settings".to_string(), problem })?;
    if cfg.window_len == 0 || cfg.batch_size == 0 || cfg.window_stride == 0 {
        return Err(ModelError::Data("window length, stride and batch size must be at least 1".to_string()));
    }
    if cfg.min_context > cfg.window_len {
        return Err(ModelError::Data(format!(
            "a smallest context of {} leaves no target in windows of {}",
            cfg.min_context, cfg.window_len
        )));
    }
    if !(0.0..1.0).contains(&cfg.model.weight_drop) {
        return Err(ModelError::Data(format!("weight drop {} is outside [0, 1)", cfg.model.weight_drop)));
    }
    if !(0.0..=1.0).contains(&cfg.teacher_weight) {
        return Err(ModelError::Data(format!("teacher weight {} is outside [0, 1]", cfg.teacher_weight)));
    }
    if data.train_tokens.len() <= cfg.window_len + 1 {
        return Err(ModelError::Data(format!(
            "the training stream has {} symbols, fewer than one window of {}",
            data.train_tokens.len(),
            cfg.window_len + 1
        )));
    }
    let checkpoint_dir = out_dir.join(CHECKPOINT_DIR);
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ModelError::Io { path: path.clone(), source }
    };
    std::fs::create_dir_all(&checkpoint_dir).map_err(io_err(&checkpoint_dir))?;

    let mut varmap = VarMap::new();
    let lstm = MelodyLstm::new(&model_cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let bar_reader = BarReader::for_model(&model_cfg);
    let teachers = Teachers::load(&cfg.teachers, &model_cfg, &data.train_tokens, device)?;
    let vars = sorted_vars(&varmap);
    let fingerprint = (data.train_tokens.len(), data.vocab.len());

    let select_idx = match &cfg.eval.select_on {
        Some(name) => Some(
            data.validation
                .iter()
                .position(|v| &v.name == name)
                .ok_or_else(|| ModelError::Data(format!("no validation songs in set '{name}'")))?,
        ),
        None => (!data.validation.is_empty()).then_some(0),
    };

    // The optimiser's counters of a resumed run; `None` in checkpoints that predate them.
    let mut saved_counters = None;
    let (mut epochs_done, mut global_step, mut epochs_since_best, mut best_loss, mut summary) = if resume {
        let state_path = checkpoint_dir.join(RESUME_FILE);
        let text = std::fs::read(&state_path).map_err(io_err(&state_path))?;
        let state: ResumeState = serde_json::from_slice(&text)
            .map_err(|e| ModelError::Data(format!("{}: not a resume state: {e}", state_path.display())))?;
        if state.data_fingerprint != fingerprint {
            return Err(ModelError::Data(format!(
                "resume: the checkpoint was trained on {} symbols over {} tokens, this data has {} over {}",
                state.data_fingerprint.0, state.data_fingerprint.1, fingerprint.0, fingerprint.1
            )));
        }
        let weights_path = checkpoint_dir.join(LAST_WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
        let tensors = read_weights(&bytes, &weights_path.display().to_string(), &model_cfg, device)?;
        for var in &vars {
            let name = var_name(&varmap, var);
            var.set(&tensors[&name])?;
        }
        let mut summary = state.summary;
        summary.resumed_after_epochs.push(state.epochs_done);
        summary.stop_reason.clear();
        summary.config = cfg.clone();
        saved_counters = state.optimizer;
        (state.epochs_done, state.global_step, state.epochs_since_best, state.best_loss, summary)
    } else {
        let init = match &cfg.init_from {
            Some(source) => base_weights(source, &model_cfg, device)?,
            None => MelodyLstm::initial_tensors(&model_cfg, cfg.seed, device)?,
        };
        varmap.set(init.iter())?;
        let summary = TrainSummary {
            config: cfg.clone(),
            data: data.counts.clone(),
            num_train_stream_symbols: data.train_tokens.len(),
            num_validation_stream_symbols: data
                .validation
                .iter()
                .map(|v| (v.name.clone(), v.tokens.len()))
                .collect(),
            num_params: vars.iter().map(|v| v.elem_count()).sum(),
            device: format!("{device:?}"),
            epochs: Vec::new(),
            best_epoch: None,
            best_validation: Vec::new(),
            final_validation: Vec::new(),
            stop_reason: String::new(),
            wall_s: 0.0,
            train_wall_s: 0.0,
            symbols_per_s: 0.0,
            resumed_after_epochs: Vec::new(),
            base_validation: Vec::new(),
            teachers_validation: Vec::new(),
        };
        (0, 0, 0, None, summary)
    };
    let wall_before = summary.wall_s;
    observer.on_start(&summary);
    if !teachers.is_empty() && !resume {
        summary.teachers_validation =
            validate_with(data, &cfg.eval, 0, observer, &mut |stream, progress| {
                teachers.evaluate(&stream.tokens, &stream.bars, &data.vocab, &cfg.eval, progress)
            })?;
        observer.on_teachers_validated(&summary.teachers_validation);
    }
    if cfg.init_from.is_some() && !resume {
        // The base is epoch 0: kept unless an epoch does better on its validation.
        let validation = validate(&lstm, data, &cfg.eval, 0, observer)?;
        best_loss = select_idx.map(|i| validation[i].1.all.loss);
        if best_loss.is_some() {
            save_model(out_dir, &model_cfg, &lstm)?;
            summary.best_epoch = Some(0);
            summary.best_validation = validation.clone();
        }
        summary.base_validation = validation;
        write_json(&out_dir.join(TRAIN_FILE), &summary)?;
        observer.on_base_validated(&summary.base_validation);
    }

    let mut optimizer = AdamW::new(vars.clone(), cfg.learning_rate, cfg.weight_decay)?;
    let start = if resume || cfg.init_from.is_some() { AverageStart::Weights } else { AverageStart::Empty };
    let mut average = WeightAverage::new(cfg.weight_average, &vars, start)?;
    let var_names: Vec<String> = vars.iter().map(|var| var_name(&varmap, var)).collect();
    let optimizer_path = checkpoint_dir.join(OPTIMIZER_FILE);
    if resume {
        let restored = saved_counters
            .ok_or_else(|| {
                let state_path = checkpoint_dir.join(RESUME_FILE);
                format!("{}: written before the optimiser was saved with the weights", state_path.display())
            })
            .and_then(|counters| {
                restore_optimizer(
                    &optimizer_path,
                    epochs_done,
                    counters,
                    &var_names,
                    &mut optimizer,
                    average.as_mut(),
                    device,
                )
                .map_err(|e| e.to_string())
            });
        if let Err(reason) = restored {
            // The weights and the schedule still resume; only the optimiser starts cold.
            optimizer = AdamW::new(vars.clone(), cfg.learning_rate, cfg.weight_decay)?;
            average = WeightAverage::new(cfg.weight_average, &vars, start)?;
            observer.on_notice(&format!(
                "{reason}: AdamW's moments and the weight average start afresh from the resumed weights"
            ));
        }
    }
    let batches_per_epoch = {
        let windows = (data.train_tokens.len() - cfg.window_len - 1) / cfg.window_stride + 1;
        let batches = windows.div_ceil(cfg.batch_size);
        cfg.max_batches_per_epoch.map_or(batches, |max| batches.min(max))
    };
    let total_steps = batches_per_epoch * cfg.epochs;

    while epochs_done < cfg.epochs {
        let epoch = epochs_done + 1;
        let mut rng = ChaCha8Rng::seed_from_u64(
            cfg.seed.wrapping_add((epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        let mut dropout = Dropout::new(cfg.model.dropout, rng.random())
            .locked(cfg.model.locked_dropout)
            .weight_drop(cfg.model.weight_drop);
        let starts = window_starts(data.train_tokens.len(), cfg, &mut rng);
        let batches: Vec<&[usize]> = starts.chunks(cfg.batch_size).take(batches_per_epoch).collect();
        observer.on_epoch_start(epoch, batches.len());

        let train_started = Instant::now();
        let (mut nll_sum, mut correct, mut num_targets, mut num_steps, mut num_skipped) =
            (0.0f64, 0usize, 0usize, 0, 0);
        let mut lr = cfg.learning_rate;
        for (batch_idx, batch) in batches.iter().enumerate() {
            lr = learning_rate_at(cfg, global_step, total_steps, epochs_done);
            optimizer.learning_rate = lr;
            let (inputs, bars, targets) = batch_tensors(
                &data.train_tokens,
                &data.train_bars,
                &bar_reader,
                batch,
                cfg.window_len,
                device,
            )?;
            let soft = teachers.soft_targets(&data.train_bars, batch, cfg.window_len, device)?;
            let (logits, _) = lstm.forward_time_major(&inputs, Some(&bars), None, Some(&mut dropout))?;
            let logits = logits.reshape(((), model_cfg.vocab_len()))?;
            // Time-major rows: the first `skip` are the targets with too little context.
            let skip = cfg.min_context.saturating_sub(1) * batch.len();
            let (logits, targets, soft) = if skip > 0 {
                let rows = targets.dim(0)? - skip;
                let soft = soft.map(|soft| soft.narrow(0, skip, rows)).transpose()?;
                (logits.narrow(0, skip, rows)?, targets.narrow(0, skip, rows)?, soft)
            } else {
                (logits, targets, soft)
            };
            let nll = loss::nll(&logits, &targets)?;
            let argmax = logits.argmax(D::Minus1)?;
            // The reported loss is always the data's, comparable with validation.
            let data_loss = nll.mean_all()?;
            let loss_value = data_loss.to_scalar::<f32>()? as f64;
            let loss = match &soft {
                Some(soft) => {
                    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                    let soft_loss = (soft * log_probs)?.sum(D::Minus1)?.neg()?.mean_all()?;
                    ((data_loss * (1.0 - cfg.teacher_weight))? + (soft_loss * cfg.teacher_weight)?)?
                }
                None => data_loss,
            };
            global_step += 1;
            let loss_is_finite = soft.is_none() || loss.to_scalar::<f32>()?.is_finite();
            if !loss_value.is_finite() || !loss_is_finite {
                num_skipped += 1;
                continue;
            }
            let mut grads = loss.backward()?;
            clip_gradients(&mut grads, &vars, cfg.grad_clip_norm)?;
            optimizer.step(&grads)?;
            if let Some(average) = &mut average {
                average.update(&vars)?;
            }
            num_steps += 1;
            let n = targets.dim(0)?;
            nll_sum += loss_value * n as f64;
            correct += argmax.eq(&targets)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
            num_targets += n;
            let elapsed = train_started.elapsed().as_secs_f64();
            observer.on_batch(&BatchProgress {
                epoch,
                batch_idx,
                num_batches: batches.len(),
                loss: nll_sum / num_targets as f64,
                accuracy: correct as f64 / num_targets as f64,
                symbols_per_s: num_targets as f64 / elapsed.max(1e-9),
                learning_rate: lr,
            });
        }
        let train_wall_s = train_started.elapsed().as_secs_f64();

        let eval_started = Instant::now();
        // The network validated and kept: the trained one, or its weights' average.
        let averaged = match &average {
            Some(average) => Some(average.network(&varmap, &vars, &model_cfg, device)?),
            None => None,
        };
        let judged = averaged.as_ref().unwrap_or(&lstm);
        let validation = validate(judged, data, &cfg.eval, epoch, observer)?;
        let eval_wall_s = eval_started.elapsed().as_secs_f64();

        let selected_loss = select_idx.map(|i| validation[i].1.all.loss);
        let is_best = match (selected_loss, best_loss) {
            (Some(loss), Some(best)) => loss < best,
            (Some(loss), None) => loss.is_finite(),
            // Without validation, the latest weights are the ones kept.
            (None, _) => true,
        };
        if is_best {
            best_loss = selected_loss;
            epochs_since_best = 0;
            save_model(out_dir, &model_cfg, judged)?;
            summary.best_epoch = Some(epoch);
            summary.best_validation = validation.clone();
        } else {
            epochs_since_best += 1;
        }
        let record = EpochRecord {
            epoch,
            train_loss: nll_sum / num_targets.max(1) as f64,
            train_accuracy: correct as f64 / num_targets.max(1) as f64,
            train_symbols: num_targets,
            num_steps,
            num_skipped_steps: num_skipped,
            learning_rate: lr,
            train_wall_s,
            symbols_per_s: num_targets as f64 / train_wall_s.max(1e-9),
            eval_wall_s,
            validation,
            is_best,
        };
        summary.epochs.push(record.clone());
        summary.train_wall_s += train_wall_s;
        let total_symbols: usize = summary.epochs.iter().map(|e| e.train_symbols).sum();
        summary.symbols_per_s = total_symbols as f64 / summary.train_wall_s.max(1e-9);
        summary.wall_s = wall_before + started.elapsed().as_secs_f64();
        epochs_done = epoch;

        let should_stop = cfg.patience > 0 && epochs_since_best >= cfg.patience;
        if should_stop {
            summary.stop_reason = format!("no better validation loss for {} epochs", cfg.patience);
        } else if epochs_done == cfg.epochs {
            summary.stop_reason = format!("ran all {} epochs", cfg.epochs);
        }
        save_weights(&checkpoint_dir.join(LAST_WEIGHTS_FILE), &lstm)?;
        let counters =
            save_optimizer(&optimizer_path, epochs_done, &var_names, &optimizer, average.as_ref())?;
        let state = ResumeState {
            epochs_done,
            global_step,
            epochs_since_best,
            best_loss,
            summary: summary.clone(),
            data_fingerprint: fingerprint,
            optimizer: Some(counters),
        };
        write_json(&checkpoint_dir.join(RESUME_FILE), &state)?;
        write_json(&out_dir.join(TRAIN_FILE), &summary)?;
        observer.on_epoch_end(&record, &summary);
        if should_stop {
            break;
        }
    }
    if summary.stop_reason.is_empty() {
        summary.stop_reason = format!("ran all {} epochs", cfg.epochs);
    }
    summary.final_validation = if cfg.eval.max_targets.is_some() && summary.best_epoch.is_some() {
        // Epochs were judged on a subset; the kept weights are judged on everything.
        let weights_path = out_dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
        let tensors = read_weights(&bytes, &weights_path.display().to_string(), &model_cfg, device)?;
        let best = MelodyLstm::new(&model_cfg, VarBuilder::from_tensors(tensors, DType::F32, device))?;
        let full = EvalConfig { max_targets: None, ..cfg.eval.clone() };
        validate(&best, data, &full, summary.best_epoch.unwrap_or(0), observer)?
    } else {
        summary.best_validation.clone()
    };
    summary.wall_s = wall_before + started.elapsed().as_secs_f64();
    write_json(&out_dir.join(TRAIN_FILE), &summary)?;
    Ok(summary)
}

/// `lstm` on every validation stream of `data`, in set order.
fn validate(
    lstm: &MelodyLstm,
    data: &Dataset,
    eval: &EvalConfig,
    epoch: usize,
    observer: &mut dyn TrainObserver,
) -> Result<Vec<(String, EvalMetrics)>, ModelError> {
    validate_with(data, eval, epoch, observer, &mut |stream, progress| {
        evaluate(lstm, &stream.tokens, &stream.bars, &data.vocab, eval, progress)
    })
}

/// Scores one validation stream, telling the callback the targets done so far.
type StreamScorer<'a> =
    dyn FnMut(&ValidationStream, &mut dyn FnMut(usize)) -> Result<EvalMetrics, ModelError> + 'a;

/// Each validation stream's metrics from `score`, reported to `observer` as epoch `epoch`'s
/// validation.
fn validate_with(
    data: &Dataset,
    eval: &EvalConfig,
    epoch: usize,
    observer: &mut dyn TrainObserver,
    score: &mut StreamScorer,
) -> Result<Vec<(String, EvalMetrics)>, ModelError> {
    let mut validation = Vec::new();
    for stream in &data.validation {
        observer.on_eval_start(epoch, eval_targets(stream.tokens.len(), eval).len());
        let metrics = score(stream, &mut |done| observer.on_eval_progress(done))?;
        validation.push((stream.name.clone(), metrics));
    }
    Ok(validation)
}

/// Writes the optimiser's moments and the weight average to `path`, with the epochs done so a
/// stale file is never paired with newer weights; → the counters that go beside them.
fn save_optimizer(
    path: &Path,
    epochs_done: usize,
    names: &[String],
    optimizer: &AdamW,
    average: Option<&WeightAverage>,
) -> Result<OptimizerCounters, ModelError> {
    let mut tensors = optimizer.state(names);
    if let Some(average) = average {
        tensors.extend(average.state(names));
    }
    tensors.insert(OPTIMIZER_EPOCH.to_string(), Tensor::new(&[epochs_done as u32], &Device::Cpu)?);
    save_tensors(path, tensors)?;
    Ok(OptimizerCounters {
        adam_steps: optimizer.steps(),
        average_total: average.map_or(0.0, |a| a.total),
        average_steps: average.map_or(0, |a| a.steps),
    })
}

/// Puts back what `save_optimizer` wrote to `path` after epoch `epochs_done`.
fn restore_optimizer(
    path: &Path,
    epochs_done: usize,
    counters: OptimizerCounters,
    names: &[String],
    optimizer: &mut AdamW,
    average: Option<&mut WeightAverage>,
    device: &Device,
) -> Result<(), ModelError> {
    let shown = path.display().to_string();
    let tensors = read_tensors(path, device)?;
    let written_after = tensors
        .get(OPTIMIZER_EPOCH)
        .ok_or_else(|| ModelError::MissingTensor { path: shown.clone(), name: OPTIMIZER_EPOCH.to_string() })?
        .flatten_all()?
        .to_vec1::<u32>()?;
    if written_after != [epochs_done as u32] {
        return Err(ModelError::StaleCheckpoint {
            path: shown,
            problem: format!("written after another epoch than the resumed weights' ({epochs_done})"),
        });
    }
    optimizer.restore(&tensors, names, counters.adam_steps, &shown)?;
    if let Some(average) = average {
        average.restore(&tensors, names, counters, &shown)?;
    }
    Ok(())
}

/// An exponential moving average of the trained weights (Polyak averaging), kept beside them.
struct WeightAverage {
    /// The decay per update, which comes every `AVERAGE_EVERY` steps.
    decay: f64,
    /// Steps since the last update.
    steps: usize,
    /// One weighted sum per variable, in the order of the run's variables.
    averages: Vec<Tensor>,
    /// The total weight in those sums: 1 from the start for `AverageStart::Weights`; from
    /// `Empty`, `1 - decay^updates`, by which the sums are divided (as Adam corrects its
    /// moments).
    total: f64,
}

/// What a weight average holds before its first update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AverageStart {
    /// The weights as they are: trained ones (a base model, a resumed run).
    Weights,
    /// Nothing: the weights are random, and averaging them in would drag the average toward
    /// noise for thousands of steps (0.999 per step keeps 71 % of the start after 340 steps).
    Empty,
}

/// Steps between two updates of the weight average: each update costs about a quarter of a
/// small batch's step, and weights a few steps apart differ little.
const AVERAGE_EVERY: usize = 8;

/// Prefix of the weight average's sums in `OPTIMIZER_FILE`.
const AVERAGE_PREFIX: &str = "average.";

impl WeightAverage {
    /// An average of `vars` from `start`; `None` when `decay` is 0 (no average).
    fn new(decay: f64, vars: &[Var], start: AverageStart) -> Result<Option<Self>, ModelError> {
        if decay <= 0.0 {
            return Ok(None);
        }
        let averages = vars
            .iter()
            .map(|v| match start {
                AverageStart::Weights => v.as_tensor().copy().map(|t| t.detach()),
                AverageStart::Empty => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let total = if start == AverageStart::Weights { 1.0 } else { 0.0 };
        Ok(Some(Self { decay: decay.powi(AVERAGE_EVERY as i32), steps: 0, averages, total }))
    }

    /// The weighted sums, named after `names` (one per variable, in order), for a checkpoint.
    fn state(&self, names: &[String]) -> HashMap<String, Tensor> {
        names
            .iter()
            .zip(&self.averages)
            .map(|(name, sum)| (format!("{AVERAGE_PREFIX}{name}"), sum.clone()))
            .collect()
    }

    /// Puts back the sums of `state` and `counters`; nothing changes unless every sum is there.
    fn restore(
        &mut self,
        state: &HashMap<String, Tensor>,
        names: &[String],
        counters: OptimizerCounters,
        path: &str,
    ) -> Result<(), ModelError> {
        let mut averages = Vec::with_capacity(self.averages.len());
        for (name, like) in names.iter().zip(&self.averages) {
            averages.push(saved_tensor(state, &format!("{AVERAGE_PREFIX}{name}"), like, path)?);
        }
        (self.averages, self.total, self.steps) = (averages, counters.average_total, counters.average_steps);
        Ok(())
    }

    /// Called after every optimiser step; every `AVERAGE_EVERY` steps,
    /// `average ← decay · average + (1 - decay) · weights`.
    fn update(&mut self, vars: &[Var]) -> Result<(), ModelError> {
        self.steps += 1;
        if self.steps < AVERAGE_EVERY {
            return Ok(());
        }
        self.steps = 0;
        for (average, var) in self.averages.iter_mut().zip(vars) {
            // Detached, or each average would hold the whole chain of the ones before it.
            *average = ((&*average * self.decay)? + (var.as_tensor() * (1.0 - self.decay))?)?.detach();
        }
        self.total = self.total * self.decay + (1.0 - self.decay);
        Ok(())
    }

    /// The averaged value of each variable; before any update from `Empty`, the weights
    /// themselves.
    fn values(&self, vars: &[Var]) -> Result<Vec<Tensor>, ModelError> {
        let values =
            self.averages
                .iter()
                .zip(vars)
                .map(|(average, var)| {
                    if self.total > 0.0 {
                        average / self.total
                    } else {
                        Ok(var.as_tensor().copy()?.detach())
                    }
                })
                .collect::<candle_core::Result<_>>()?;
        Ok(values)
    }

    /// The network with the averaged weights.
    fn network(
        &self,
        varmap: &VarMap,
        vars: &[Var],
        model_cfg: &ModelConfig,
        device: &Device,
    ) -> Result<MelodyLstm, ModelError> {
        let tensors: HashMap<String, Tensor> = vars
            .iter()
            .zip(self.values(vars)?)
            .map(|(var, average)| (var_name(varmap, var), average))
            .collect();
        Ok(MelodyLstm::new(model_cfg, VarBuilder::from_tensors(tensors, DType::F32, device))?)
    }
}

/// The run's variables in name order, so every run visits them alike.
fn sorted_vars(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().expect("the var map lock is never poisoned");
    let mut named: Vec<(&String, &Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

fn var_name(varmap: &VarMap, var: &Var) -> String {
    let data = varmap.data().lock().expect("the var map lock is never poisoned");
    data.iter()
        .find(|(_, v)| v.as_tensor().id() == var.as_tensor().id())
        .map(|(k, _)| k.clone())
        .unwrap_or_default()
}

/// Shuffled window starts covering the stream once per `window_stride`, from a random phase.
fn window_starts(stream_len: usize, cfg: &TrainConfig, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let last_start = stream_len - cfg.window_len - 1;
    let phase = rng.random_range(0..cfg.window_stride.min(last_start + 1));
    let mut starts: Vec<usize> = (phase..=last_start).step_by(cfg.window_stride).collect();
    starts.shuffle(rng);
    starts
}

/// Time-major inputs and flat targets of a batch of windows.
/// → (inputs `[window, batch]` u32, targets `[window * batch]` u32: the symbol after each input)
pub(super) fn batch_tensors(
    tokens: &[u32],
    bars: &[u32],
    reader: &BarReader,
    starts: &[usize],
    window_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor), ModelError> {
    let batch = starts.len();
    let mut inputs = Vec::with_capacity(window_len * batch);
    let mut input_bars = Vec::with_capacity(window_len * batch * reader.per_step());
    let mut targets = Vec::with_capacity(window_len * batch);
    for t in 0..window_len {
        for &s in starts {
            inputs.push(tokens[s + t]);
            reader.push(tokens, bars, s, s + t, &mut input_bars);
            targets.push(tokens[s + t + 1]);
        }
    }
    Ok((
        Tensor::from_vec(inputs, (window_len, batch), device)?,
        Tensor::from_vec(input_bars, (window_len, batch, reader.per_step()), device)?,
        Tensor::from_vec(targets, window_len * batch, device)?,
    ))
}

/// Scales all gradients down together when their global L2 norm exceeds `max_norm`.
pub(crate) fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[Var],
    max_norm: f64,
) -> Result<(), ModelError> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let mut sum_sq = 0.0f64;
    for var in vars {
        if let Some(g) = grads.get(var) {
            sum_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sum_sq.sqrt();
    if norm > max_norm {
        let scale = max_norm / norm;
        for var in vars {
            if let Some(g) = grads.remove(var) {
                grads.insert(var, (g * scale)?);
            }
        }
    }
    Ok(())
}

/// Indices of the symbols a stream's evaluation predicts: every one after the first
/// `context_len`, or `max_targets` of them evenly spaced.
pub fn eval_targets(stream_len: usize, eval: &EvalConfig) -> Vec<usize> {
    let all: Vec<usize> = (eval.context_len..stream_len).collect();
    match eval.max_targets {
        Some(max) if max < all.len() && max > 0 => (0..max).map(|i| all[i * all.len() / max]).collect(),
        _ => all,
    }
}

/// The recipe's validation metric: each target symbol predicted from exactly the
/// `context_len` symbols before it (and their bar positions, `bars`, for a model that reads
/// them), every window starting from the zero state. `progress` hears the number of targets
/// done after each batch.
pub fn evaluate(
    lstm: &MelodyLstm,
    tokens: &[u32],
    bars: &[u32],
    vocab: &Vocab,
    eval: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalMetrics, ModelError> {
    evaluate_with_memory(lstm, None, tokens, bars, vocab, eval, progress)
}

/// `evaluate` with a tune memory mixed into every prediction, each window its history.
pub fn evaluate_with_memory(
    lstm: &MelodyLstm,
    memory: Option<&TuneMemory>,
    tokens: &[u32],
    bars: &[u32],
    vocab: &Vocab,
    eval: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalMetrics, ModelError> {
    let weights = lstm.step_weights()?;
    score_windows(tokens, vocab, eval, progress, &mut |chunk| {
        let logits = window_logits(lstm, &weights, tokens, bars, chunk, eval.context_len)?;
        let Some(memory) = memory else { return Ok(logits) };
        let mut rows = logits.to_vec2::<f32>()?;
        for (row, &target_idx) in rows.iter_mut().zip(chunk) {
            memory.mix(&tokens[target_idx - eval.context_len..target_idx], row);
        }
        let num_rows = rows.len();
        Ok(Tensor::from_vec(rows.concat(), (num_rows, vocab.len()), logits.device())?)
    })
}

/// The network's logits for every target `evaluate` scores, in order: their indices in
/// `tokens` (`eval_targets`) and a `[vocab]` row of logits each, every window from the zero
/// state. Holds them all, for work that reads the same predictions several ways (fitting a tune
/// memory and scoring with and without it). `progress` hears the targets done after each batch.
pub fn window_predictions(
    lstm: &MelodyLstm,
    tokens: &[u32],
    bars: &[u32],
    eval: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<usize>, Vec<Vec<f32>>), ModelError> {
    let weights = lstm.step_weights()?;
    let targets = eval_targets(tokens.len(), eval);
    let mut rows = Vec::with_capacity(targets.len());
    for chunk in targets.chunks(eval.batch_size.max(1)) {
        rows.extend(window_logits(lstm, &weights, tokens, bars, chunk, eval.context_len)?.to_vec2::<f32>()?);
        progress(rows.len());
    }
    Ok((targets, rows))
}

/// The recipe's metric from predictions already made (`window_predictions`): `rows[i]` the
/// logits of the symbol at `targets[i]` of `tokens`, with `memory` mixed into each (the
/// `context_len` symbols before it its history) when given.
pub fn score_predictions(
    tokens: &[u32],
    targets: &[usize],
    rows: &[Vec<f32>],
    vocab: &Vocab,
    memory: Option<&TuneMemory>,
    context_len: usize,
) -> EvalMetrics {
    let mut sums = MetricSums::default();
    let mut mixed = vec![0.0f32; vocab.len()];
    for (&target_idx, row) in targets.iter().zip(rows) {
        mixed.copy_from_slice(row);
        if let Some(memory) = memory {
            memory.mix(&tokens[target_idx.saturating_sub(context_len)..target_idx], &mut mixed);
        }
        let target = tokens[target_idx];
        let (nll, is_best) = nll_of(&mixed, target as usize);
        sums.add(vocab.symbol(TokenId(target as u16)), nll, is_best);
    }
    sums.metrics()
}

/// The recipe's metric over `tokens` with the scores `predict` gives each batch of targets
/// (their indices in `tokens`): `[targets, vocab]` log-probabilities, or logits.
pub(super) fn score_windows(
    tokens: &[u32],
    vocab: &Vocab,
    eval: &EvalConfig,
    progress: &mut dyn FnMut(usize),
    predict: &mut dyn FnMut(&[usize]) -> Result<Tensor, ModelError>,
) -> Result<EvalMetrics, ModelError> {
    let targets = eval_targets(tokens.len(), eval);
    let mut sums = MetricSums::default();
    let mut done = 0;
    for chunk in targets.chunks(eval.batch_size.max(1)) {
        let scores = predict(chunk)?;
        let wanted: Vec<u32> = chunk.iter().map(|&i| tokens[i]).collect();
        let wanted_t = Tensor::from_slice(&wanted, chunk.len(), scores.device())?;
        let (nll, argmax) = nll_and_argmax(&scores, &wanted_t)?;
        let nll = nll.to_vec1::<f32>()?;
        let argmax = argmax.to_vec1::<u32>()?;
        for ((&target, &loss), &best) in wanted.iter().zip(&nll).zip(&argmax) {
            sums.add(vocab.symbol(TokenId(target as u16)), loss as f64, best == target);
        }
        done += chunk.len();
        progress(done);
    }
    Ok(sums.metrics())
}

/// Logits of the symbol at each index of `chunk` in `tokens`, from the `context_len` symbols
/// before it, starting from the zero state → `[chunk, vocab]`
pub(super) fn window_logits(
    lstm: &MelodyLstm,
    weights: &StepWeights,
    tokens: &[u32],
    bars: &[u32],
    chunk: &[usize],
    context_len: usize,
) -> Result<Tensor, ModelError> {
    let device = lstm.device();
    let reader = lstm.bar_reader();
    let mut windows = Vec::with_capacity(chunk.len() * context_len);
    let mut window_bars = Vec::with_capacity(chunk.len() * context_len * reader.per_step());
    for &i in chunk {
        let start = i - context_len;
        windows.extend_from_slice(&tokens[start..i]);
        for t in start..i {
            reader.push(tokens, bars, start, t, &mut window_bars);
        }
    }
    let inputs = Tensor::from_vec(windows, (chunk.len(), context_len), device)?;
    let input_bars = Tensor::from_vec(window_bars, (chunk.len(), context_len, reader.per_step()), device)?;
    Ok(lstm.forward_last_with(weights, &inputs, Some(&input_bars))?.detach())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ModelError> {
    let json = serde_json::to_string_pretty(value).expect("summaries always serialise");
    std::fs::write(path, json + "\n")
        .map_err(|source| ModelError::Io { path: path.display().to_string(), source })
}

/// Reads a `TrainConfig` from a JSON file: the settings themselves, or a model's `train.json`,
/// whose `config` field holds the settings that trained it.
pub fn read_train_config(path: &Path) -> Result<TrainConfig, ModelError> {
    let text =
        std::fs::read(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    let parse_error = |source| ModelError::TrainConfigParse { path: path.display().to_string(), source };
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(parse_error)?;
    let is_report = value.get("config").is_some() && value.get("epochs").is_some();
    let settings = if is_report { value["config"].clone() } else { value };
    serde_json::from_value(settings).map_err(parse_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The average moves toward the weights once every `AVERAGE_EVERY` steps, by the decay of
    /// that many steps, and does not follow later changes to the weights it was built from.
    #[test]
    fn weight_average_decays_every_few_steps() {
        let var = Var::from_vec(vec![0.0f32, 4.0], 2, &Device::Cpu).unwrap();
        let vars = std::slice::from_ref(&var);
        let mut average = WeightAverage::new(0.5, vars, AverageStart::Weights).unwrap().unwrap();
        var.set(&Tensor::new(&[8.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        let values = |a: &WeightAverage| a.values(vars).unwrap()[0].to_vec1::<f32>().unwrap();
        for _ in 0..AVERAGE_EVERY - 1 {
            average.update(vars).unwrap();
        }
        assert_eq!(values(&average), [0.0, 4.0], "no update before the {AVERAGE_EVERY}th step");
        average.update(vars).unwrap();
        let kept = 0.5f32.powi(AVERAGE_EVERY as i32);
        let got = values(&average);
        assert!((got[0] - 8.0 * (1.0 - kept)).abs() < 1e-6 && got[1] == 4.0, "{got:?}");
        assert!(
            WeightAverage::new(0.0, vars, AverageStart::Weights).unwrap().is_none(),
            "0 means no average"
        );
    }

    /// From random weights the average holds only the weights the run trained: the start's
    /// share, which a decay of 0.999 would keep for thousands of steps, is not in it.
    #[test]
    fn weight_average_from_random_weights_leaves_them_out() {
        let var = Var::from_vec(vec![-3.0f32, 5.0], 2, &Device::Cpu).unwrap();
        let vars = std::slice::from_ref(&var);
        let mut average = WeightAverage::new(0.999, vars, AverageStart::Empty).unwrap().unwrap();
        let values = |a: &WeightAverage| a.values(vars).unwrap()[0].to_vec1::<f32>().unwrap();
        assert_eq!(values(&average), [-3.0, 5.0], "before any update, the weights themselves");
        // Trained weights that then stay put: the average is exactly them after one update, and
        // stays there, where a start-weighted average would still be 99 % the start.
        var.set(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        for step in 1..=3 * AVERAGE_EVERY {
            average.update(vars).unwrap();
            if step >= AVERAGE_EVERY {
                let got = values(&average);
                assert!((got[0] - 1.0).abs() < 1e-5 && (got[1] - 2.0).abs() < 1e-5, "step {step}: {got:?}");
            }
        }
        // A later move is followed by the decay, from the trained weights only: one update
        // at 0.999^8 per update moves it (1 - d) / (1 - d^4) of the way from 1 to 9.
        var.set(&Tensor::new(&[9.0f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        for _ in 0..AVERAGE_EVERY {
            average.update(vars).unwrap();
        }
        let d = 0.999f64.powi(AVERAGE_EVERY as i32);
        let expected = 1.0 + 8.0 * (1.0 - d) / (1.0 - d.powi(4));
        let got = values(&average);
        assert!(
            (got[0] as f64 - expected).abs() < 1e-4 && (got[1] - 2.0).abs() < 1e-5,
            "{got:?} vs {expected}"
        );
    }

    #[test]
    fn warmup_then_cosine_then_floor() {
        let cfg = TrainConfig { learning_rate: 1.0, warmup_steps: 10, ..Default::default() };
        assert!((learning_rate_at(&cfg, 0, 110, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate_at(&cfg, 9, 110, 0) - 1.0).abs() < 1e-12);
        assert!((learning_rate_at(&cfg, 10, 110, 0) - 1.0).abs() < 1e-12);
        assert!((learning_rate_at(&cfg, 60, 110, 0) - 0.525).abs() < 1e-9);
        assert!((learning_rate_at(&cfg, 110, 110, 0) - 0.05).abs() < 1e-12);
        assert!((learning_rate_at(&cfg, 500, 110, 0) - 0.05).abs() < 1e-12);
        let step = TrainConfig {
            schedule: LrSchedule::Step { every_epochs: 2, factor: 0.5 },
            warmup_steps: 0,
            learning_rate: 1.0,
            ..Default::default()
        };
        assert_eq!(learning_rate_at(&step, 3, 10, 3), 0.5);
        assert_eq!(learning_rate_at(&step, 5, 10, 4), 0.25);
    }

    #[test]
    fn windows_cover_the_stream_in_a_seeded_order() {
        let cfg = TrainConfig { window_len: 4, window_stride: 4, ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut starts = window_starts(30, &cfg, &mut rng);
        let again = window_starts(30, &cfg, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(starts, again);
        starts.sort();
        // Every window of 4 inputs needs a 5th symbol as its last target.
        assert!(starts.iter().all(|&s| s + 5 <= 30));
        assert!(starts.windows(2).all(|w| w[1] - w[0] == 4));
        assert!(starts[0] < 4 && *starts.last().unwrap() + 4 + 5 > 30);
    }

    #[test]
    fn batches_are_time_major_with_shifted_targets() {
        let tokens: Vec<u32> = (0..20).collect();
        let bars: Vec<u32> = (100..120).collect();
        let reader = BarReader::for_model(&ModelConfig::new(
            Vocab::for_pitch_range(60, 72),
            InputKind::Embedding { dim: 8 },
            16,
            2,
            0.1,
        ));
        let (inputs, input_bars, targets) =
            batch_tensors(&tokens, &bars, &reader, &[0, 10], 3, &Device::Cpu).unwrap();
        assert_eq!(inputs.to_vec2::<u32>().unwrap(), vec![vec![0, 10], vec![1, 11], vec![2, 12]]);
        // Each input carries its own step's bar position.
        let input_bars = input_bars.squeeze(2).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(input_bars, vec![vec![100, 110], vec![101, 111], vec![102, 112]]);
        assert_eq!(targets.to_vec1::<u32>().unwrap(), vec![1, 11, 2, 12, 3, 13]);
    }

    #[test]
    fn evaluation_targets_skip_the_first_context() {
        let eval = EvalConfig { context_len: 4, ..Default::default() };
        assert_eq!(eval_targets(8, &eval), vec![4, 5, 6, 7]);
        let capped = EvalConfig { max_targets: Some(2), ..eval };
        assert_eq!(eval_targets(8, &capped), vec![4, 6]);
    }

    /// `--config` takes the settings alone or a model's `train.json`, so a shipped model's run
    /// can be repeated; anything else is refused with the file's name.
    #[test]
    fn train_config_is_read_from_settings_or_a_models_train_json() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../presets/models/default/train.json");
        let from_report = read_train_config(&shipped).unwrap();
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&shipped).unwrap()).unwrap();
        assert_eq!(serde_json::to_value(&from_report).unwrap(), summary["config"]);
        assert_eq!(from_report.model.repeat_classes, 4);

        let dir = tempfile::tempdir().unwrap();
        let settings = dir.path().join("settings.json");
        std::fs::write(&settings, serde_json::to_string(&from_report).unwrap()).unwrap();
        assert_eq!(read_train_config(&settings).unwrap(), from_report);

        let junk = dir.path().join("junk.json");
        std::fs::write(&junk, r#"{"config": 3, "epochs": []}"#).unwrap();
        let message = read_train_config(&junk).unwrap_err().to_string();
        assert!(message.contains("junk.json") && message.contains("not training settings"), "{message}");
    }
}
