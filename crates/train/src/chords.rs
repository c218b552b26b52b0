//! Training the chord model (`model::chords`) on piano rolls: the data (benchmark `.frames`
//! files or folders of MIDI), windows with their frame-context inputs and allowed-token masks,
//! the loss, and the training loop with validation, best checkpoint, resume and `train.json`.
//! Runs on: offline threads (xtask, tests). The recurrence runs as the fused CPU op (`fused`).
//!
//! The loss of a token is its negative log-probability among the tokens that may come where it
//! stands (`FrameCursor::allows`), the same quantity the model's exact likelihood sums, so the
//! training loss per frame and the validation NLL per frame are one measure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use model::chords::{score_roll, ChordConfig, ChordLstm, ChordModel, RollScore};
use model::io::{read_tensors, save_tensors, CONFIG_FILE, TRAIN_FILE, WEIGHTS_FILE};
use model::lstm::Dropout;
use model::ModelError;
use music::roll::{read_frames_file, ChordToken, FrameCursor, STEP_TOKEN};
use music::{PianoRoll, StepGrid};

use crate::fused;
use crate::optim::AdamW;
use crate::trainer::clip_gradients;

/// Settings of a chord training run, saved in its `train.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChordTrainConfig {
    /// Width of each LSTM layer.
    pub hidden_size: usize,
    /// Stacked LSTM layers.
    pub num_layers: usize,
    /// Dropout on each layer's outputs.
    pub dropout: f32,
    /// Most voices in a frame; frames with more keep the highest.
    pub max_voices: usize,
    /// Windows per batch.
    pub batch_size: usize,
    /// Tokens per window.
    pub window_len: usize,
    /// Most epochs.
    pub epochs: usize,
    /// AdamW's learning rate at the start; halved after each epoch that does not improve
    /// validation.
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradients are scaled down to this global norm (0: never).
    pub clip_norm: f64,
    /// Training stops after this many epochs in a row without a better validation.
    pub patience: usize,
    /// Each window is moved by a random number of semitones in `-transpose..=transpose` (where
    /// the piece stays inside the piano), so every key is heard.
    pub transpose: i32,
    /// Whether the data records onsets (MIDI) rather than sounding sets only (`.frames`):
    /// without onsets, re-strike tokens are never allowed.
    pub restrikes: bool,
    /// Seed of the weights, window order, transpositions and dropout.
    pub seed: u64,
}

impl Default for ChordTrainConfig {
    fn default() -> Self {
        ChordTrainConfig {
            hidden_size: 256,
            num_layers: 1,
            dropout: 0.3,
            max_voices: 12,
            batch_size: 32,
            window_len: 256,
            epochs: 40,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            clip_norm: 5.0,
            patience: 4,
            transpose: 0,
            restrikes: true,
            seed: 1,
        }
    }
}

/// Piano rolls to train or validate on, with where they came from.
#[derive(Clone, Debug, Default)]
pub struct RollSet {
    /// The pieces.
    pub rolls: Vec<PianoRoll>,
    /// What was read, for `train.json`.
    pub sources: Vec<String>,
}

impl RollSet {
    /// Frames in all pieces.
    pub fn num_frames(&self) -> usize {
        self.rolls.iter().map(|r| r.frames.len()).sum()
    }

    /// Adds the sequences of a benchmark `.frames` file.
    pub fn add_frames_file(&mut self, path: &Path) -> Result<(), ModelError> {
        let sequences = read_frames_file(path).map_err(|e| ModelError::Data(e.to_string()))?;
        self.rolls.extend(sequences.iter().map(|chords| PianoRoll::from_chords(chords)));
        self.sources.push(path.display().to_string());
        Ok(())
    }

    /// Adds every `.mid`/`.midi` file under `dir` (or the file `dir` itself) on `grid`, every
    /// track and channel together. A file that cannot be read is reported through `skipped` and
    /// left out.
    pub fn add_midi(
        &mut self,
        dir: &Path,
        grid: StepGrid,
        skipped: &mut dyn FnMut(String),
    ) -> Result<(), ModelError> {
        let files = midi_files(dir)?;
        if files.is_empty() {
            return Err(ModelError::Data(format!("{}: no .mid files", dir.display())));
        }
        for file in files {
            match music::midi::read_midi_notes(&file) {
                Ok(notes) => self.rolls.push(PianoRoll::from_notes(&notes, grid, None)),
                Err(e) => skipped(e.to_string()),
            }
        }
        self.sources.push(dir.display().to_string());
        Ok(())
    }
}

/// The MIDI files under `path`, sorted (or `path` itself when it is a file).
fn midi_files(path: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let io = |source| ModelError::Io { path: path.display().to_string(), source };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let entry = entry.map_err(io)?.path();
        if entry.is_dir() {
            out.extend(midi_files(&entry)?);
        } else if entry
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("mid") || e.eq_ignore_ascii_case("midi"))
        {
            out.push(entry);
        }
    }
    out.sort();
    Ok(out)
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChordEpoch {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss per token (nats, with dropout).
    pub train_loss: f64,
    /// Validation negative log-likelihood per frame (nats), every frame scored.
    pub valid_nll: f64,
    /// Learning rate of the epoch.
    pub learning_rate: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Seconds of training and of validation.
    pub train_wall_s: f64,
    pub eval_wall_s: f64,
    /// True if these weights are the saved best.
    pub is_best: bool,
}

/// A chord model's `train.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChordTrainSummary {
    /// The run's settings.
    pub config: ChordTrainConfig,
    /// The model's config.
    pub model: ChordConfig,
    /// What it was trained and validated on.
    pub train_sources: Vec<String>,
    pub valid_sources: Vec<String>,
    pub train_pieces: usize,
    pub train_frames: usize,
    pub valid_pieces: usize,
    pub valid_frames: usize,
    /// Number of weights.
    pub num_params: usize,
    /// Every epoch so far.
    pub epochs: Vec<ChordEpoch>,
    /// The epoch whose weights are in `model.safetensors`.
    pub best_epoch: Option<usize>,
    /// Seconds of training, resumed parts included.
    pub wall_s: f64,
    /// Why training stopped (empty while it runs).
    pub stop_reason: String,
}

/// Receives progress; every method has an empty default.
pub trait ChordObserver {
    /// At the start of each epoch.
    fn on_epoch_start(&mut self, _epoch: usize, _num_batches: usize) {}
    /// After each step: the epoch's mean loss per token so far and tokens per second.
    fn on_batch(&mut self, _batch_idx: usize, _loss: f64, _tokens_per_s: f64) {}
    /// After each epoch, once `train.json` is written.
    fn on_epoch_end(&mut self, _record: &ChordEpoch, _summary: &ChordTrainSummary) {}
}

impl ChordObserver for crate::trainer::Quiet {}

/// Files of the checkpoint `--resume` continues from.
const LAST_WEIGHTS: &str = "last.safetensors";
const LAST_OPTIMIZER: &str = "optimizer.safetensors";

/// One batch: inputs `[window, batch, rows]`, targets `[window, batch]`, the mask of tokens that
/// may not come (`-inf`) `[window, batch, vocab]`, and each target's weight (0 for padding).
struct Batch {
    ids: Tensor,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    num_targets: usize,
}

/// Builds batches of windows from the training rolls.
struct Windows<'a> {
    rolls: &'a [PianoRoll],
    model: &'a ChordConfig,
    cfg: &'a ChordTrainConfig,
    padding_row: u32,
}

impl Windows<'_> {
    fn batch(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<Batch, ModelError> {
        let (len, batch) = (self.cfg.window_len, self.cfg.batch_size);
        let rows = 1 + 2 * self.model.max_voices;
        let codec = self.model.codec();
        let vocab = codec.vocab_len();
        let mut ids = vec![self.padding_row; len * batch * rows];
        let mut targets = vec![STEP_TOKEN; len * batch];
        let mut mask = vec![f32::NEG_INFINITY; len * batch * vocab];
        let mut weights = vec![0.0f32; len * batch];
        let mut num_targets = 0;
        let total_frames: usize = self.rolls.iter().map(|r| r.frames.len()).sum();
        let mut tokens = Vec::new();
        for b in 0..batch {
            // A roll by its length, a start frame in it, a transposition that keeps it inside.
            let mut pick = rng.random_range(0..total_frames.max(1));
            let roll = self.rolls.iter().find(|r| {
                pick < r.frames.len() || {
                    pick -= r.frames.len();
                    false
                }
            });
            let Some(roll) = roll else { continue };
            let shift = rng.random_range(-self.cfg.transpose..=self.cfg.transpose);
            let start = pick;
            let fits = |s: i32| {
                roll.frames.iter().all(|f| f.sounding.transposed(s).is_some_and(|t| codec.clip(t) == t))
            };
            let shift = if shift != 0 && fits(shift) { shift } else { 0 };
            let frame_at = |t: usize| {
                let f = roll.frames[t];
                music::Frame {
                    sounding: f.sounding.transposed(shift).unwrap_or_default(),
                    struck: f.struck.transposed(shift).unwrap_or_default(),
                }
            };
            let fit = |f: music::Frame| self.model.fit_frame(f);
            let mut cursor = FrameCursor::new(codec);
            let mut previous = music::PitchSet::EMPTY;
            if start > 0 {
                previous = fit(frame_at(start - 1)).sounding;
                tokens.clear();
                codec.encode_frame(
                    music::PitchSet::EMPTY,
                    music::Frame { sounding: previous, struck: previous },
                    &mut tokens,
                );
                for &t in &tokens {
                    cursor.push(t);
                }
            } else {
                cursor.push(STEP_TOKEN);
            }
            let mut input = STEP_TOKEN;
            let mut pos = 0;
            'frames: for t in start..roll.frames.len() {
                let frame = fit(frame_at(t));
                tokens.clear();
                codec.encode_frame(previous, frame, &mut tokens);
                previous = frame.sounding;
                for &target in &tokens {
                    if pos == len {
                        break 'frames;
                    }
                    let at = pos * batch + b;
                    ids[at * rows] = input;
                    let mut r = 1;
                    cursor.context_rows(|row| {
                        if r < rows {
                            ids[at * rows + r] = vocab as u32 + row;
                            r += 1;
                        }
                    });
                    for (v, m) in mask[at * vocab..][..vocab].iter_mut().enumerate() {
                        let allowed = cursor.allows(v as u32, self.model.max_voices)
                            && (self.cfg.restrikes
                                || !matches!(codec.token(v as u32), Some(ChordToken::Restrike(_))));
                        if allowed {
                            *m = 0.0;
                        }
                    }
                    targets[at] = target;
                    weights[at] = 1.0;
                    num_targets += 1;
                    cursor.push(target);
                    input = target;
                    pos += 1;
                }
            }
            // Padding positions allow the step token alone, so their loss is 0 and finite.
            for p in pos..len {
                mask[(p * batch + b) * vocab] = 0.0;
            }
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (len, batch, rows), device)?,
            targets: Tensor::from_vec(targets, (len, batch), device)?,
            mask: Tensor::from_vec(mask, (len, batch, vocab), device)?,
            weights: Tensor::from_vec(weights, (len, batch), device)?,
            num_targets,
        })
    }
}

/// Logits of every position of a batch: layer 0 sums each position's rows of the input table
/// (`ChordLstm::input_table`), the layers above read the one below, all as fused recurrences.
/// ids: `[seq, batch, rows]` u32 → `[seq, batch, vocab]`
pub fn chord_logits(
    lstm: &ChordLstm,
    ids: &Tensor,
    mut dropout: Option<&mut Dropout>,
) -> Result<Tensor, ModelError> {
    let (seq_len, batch, _) = ids.dims3()?;
    let hidden = lstm.config().hidden_size;
    let zeros = Tensor::zeros((batch, hidden), DType::F32, ids.device())?;
    let mut ys: Option<Tensor> = None;
    for layer in lstm.layers() {
        let (out, _, _) = match &ys {
            None => {
                let table = lstm.input_table(&Tensor::clone)?;
                fused::recur_table_rows(&table, ids, &layer.w_hh, &zeros, &zeros, fused::training_products())?
            }
            Some(below) => {
                let bias = (&layer.b_ih + &layer.b_hh)?;
                let flat = below.reshape((seq_len * batch, hidden))?;
                let xs_proj = fused::linear(&flat, &layer.w_ih, &bias, fused::training_products())?
                    .reshape((seq_len, batch, 4 * hidden))?;
                fused::recur(&xs_proj, &layer.w_hh, &zeros, &zeros, fused::training_products())?
            }
        };
        ys = Some(match dropout.as_deref_mut() {
            Some(d) => d.apply_sequence(&out)?,
            None => out,
        });
    }
    Ok(lstm.head(&ys.expect("a model has at least one layer"))?)
}

/// Sum of the scores of `rolls` under `model` (see `score_roll`).
pub fn score_rolls(
    model: &ChordModel,
    rolls: &[PianoRoll],
    restrikes: bool,
    predict: bool,
) -> Result<RollScore, ModelError> {
    let mut total = RollScore::default();
    for roll in rolls {
        let fitted = PianoRoll { frames: roll.frames.iter().map(|&f| model.config.fit_frame(f)).collect() };
        total.add(&score_roll(model, &fitted, restrikes, predict)?);
    }
    Ok(total)
}

/// Trains a chord model on `train`, validating on `valid` after every epoch, and writes the
/// model directory `out`: the best epoch's `model.safetensors` and `config.json`, `train.json`,
/// and the last epoch's weights and optimiser for `resume`.
pub fn train_chords(
    cfg: &ChordTrainConfig,
    grid: StepGrid,
    train: &RollSet,
    valid: &RollSet,
    out: &Path,
    resume: bool,
    observer: &mut dyn ChordObserver,
) -> Result<ChordTrainSummary, ModelError> {
    if train.rolls.is_empty() || train.num_frames() == 0 {
        return Err(ModelError::Data("no training frames".into()));
    }
    if valid.rolls.is_empty() {
        return Err(ModelError::Data("no validation pieces".into()));
    }
    let device = Device::Cpu;
    let model_config = ChordConfig::new(grid, cfg.max_voices, cfg.hidden_size, cfg.num_layers, cfg.dropout);
    model_config
        .validate()
        .map_err(|problem| ModelError::InvalidConfig { path: "training settings".into(), problem })?;
    std::fs::create_dir_all(out)
        .map_err(|source| ModelError::Io { path: out.display().to_string(), source })?;

    let mut summary = ChordTrainSummary {
        config: cfg.clone(),
        model: model_config.clone(),
        train_sources: train.sources.clone(),
        valid_sources: valid.sources.clone(),
        train_pieces: train.rolls.len(),
        train_frames: train.num_frames(),
        valid_pieces: valid.rolls.len(),
        valid_frames: valid.num_frames(),
        num_params: 0,
        epochs: Vec::new(),
        best_epoch: None,
        wall_s: 0.0,
        stop_reason: String::new(),
    };
    let mut varmap = VarMap::new();
    let lstm = ChordLstm::new(&model_config, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let initial = if resume {
        let previous: ChordTrainSummary = read_json(&out.join(TRAIN_FILE))?;
        // A resumed run may go on for more epochs, or wait longer for a better one.
        let same_run =
            ChordTrainConfig { epochs: cfg.epochs, patience: cfg.patience, ..previous.config.clone() };
        if same_run != *cfg || previous.model != model_config {
            return Err(ModelError::StaleCheckpoint {
                path: out.join(TRAIN_FILE).display().to_string(),
                problem: "the run to resume had other settings".into(),
            });
        }
        summary = ChordTrainSummary { config: cfg.clone(), ..previous };
        summary.stop_reason.clear();
        read_tensors(&out.join(LAST_WEIGHTS), &device)?
    } else {
        ChordLstm::initial_tensors(&model_config, cfg.seed, &device)?
    };
    varmap.set(initial.iter())?;
    let names: Vec<String> = ChordLstm::tensor_shapes(&model_config).into_iter().map(|(n, _)| n).collect();
    let vars: Vec<Var> = {
        let data = varmap.data().lock().map_err(|_| ModelError::Data("variable map poisoned".into()))?;
        names.iter().map(|n| data[n].clone()).collect()
    };
    summary.num_params = vars.iter().map(|v| v.elem_count()).sum();
    let mut optimizer = AdamW::new(vars.clone(), cfg.learning_rate, cfg.weight_decay)?;
    let epochs_done = summary.epochs.len();
    if resume {
        let state = read_tensors(&out.join(LAST_OPTIMIZER), &device)?;
        let steps = summary.epochs.len() * batches_per_epoch(cfg, train);
        optimizer.restore(&state, &names, steps, &out.join(LAST_OPTIMIZER).display().to_string())?;
        optimizer.learning_rate = summary.epochs.last().map_or(cfg.learning_rate, |e| e.learning_rate);
    }

    let windows = Windows { rolls: &train.rolls, model: &model_config, cfg, padding_row: lstm.padding_row() };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(epochs_done as u64 * 7919));
    let mut best =
        summary.best_epoch.and_then(|e| summary.epochs.get(e - 1)).map_or(f64::INFINITY, |e| e.valid_nll);
    let mut since_best = summary.epochs.iter().rev().take_while(|e| !e.is_best).count();
    let num_batches = batches_per_epoch(cfg, train);
    for epoch in epochs_done + 1..=cfg.epochs {
        observer.on_epoch_start(epoch, num_batches);
        let started = Instant::now();
        let mut dropout = Dropout::new(cfg.dropout, cfg.seed.wrapping_add(epoch as u64));
        let (mut loss_sum, mut token_count) = (0.0f64, 0usize);
        for batch_idx in 0..num_batches {
            let batch = windows.batch(&mut rng, &device)?;
            let logits = chord_logits(&lstm, &batch.ids, (cfg.dropout > 0.0).then_some(&mut dropout))?;
            let log_p = candle_nn::ops::log_softmax(&(logits + &batch.mask)?, D::Minus1)?;
            let picked = log_p.gather(&batch.targets.unsqueeze(2)?, 2)?.squeeze(2)?;
            let loss = ((picked * &batch.weights)?.sum_all()? * (-1.0 / batch.num_targets.max(1) as f64))?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                continue;
            }
            let mut grads = loss.backward()?;
            clip_gradients(&mut grads, &vars, cfg.clip_norm)?;
            optimizer.step(&grads)?;
            loss_sum += loss_value * batch.num_targets as f64;
            token_count += batch.num_targets;
            let tokens_per_s = token_count as f64 / started.elapsed().as_secs_f64().max(1e-9);
            observer.on_batch(batch_idx, loss_sum / token_count.max(1) as f64, tokens_per_s);
        }
        let train_wall_s = started.elapsed().as_secs_f64();
        let eval_started = Instant::now();
        let model = ChordModel::new(lstm.clone(), "training")?;
        let score = score_rolls(&model, &valid.rolls, cfg.restrikes, false)?;
        let valid_nll = score.nll / score.frames.max(1) as f64;
        let is_best = valid_nll < best;
        let record = ChordEpoch {
            epoch,
            train_loss: loss_sum / token_count.max(1) as f64,
            valid_nll,
            learning_rate: optimizer.learning_rate,
            tokens_per_s: token_count as f64 / train_wall_s.max(1e-9),
            train_wall_s,
            eval_wall_s: eval_started.elapsed().as_secs_f64(),
            is_best,
        };
        if is_best {
            best = valid_nll;
            since_best = 0;
            summary.best_epoch = Some(epoch);
            ChordModel::save(out, &lstm)?;
        } else {
            since_best += 1;
            optimizer.learning_rate *= 0.5;
        }
        summary.wall_s += record.train_wall_s + record.eval_wall_s;
        summary.epochs.push(record.clone());
        let named: std::collections::HashMap<String, Tensor> =
            names.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().clone())).collect();
        save_tensors(&out.join(LAST_WEIGHTS), named)?;
        save_tensors(&out.join(LAST_OPTIMIZER), optimizer.state(&names))?;
        if since_best >= cfg.patience {
            summary.stop_reason = format!("{since_best} epochs without a better validation");
        } else if epoch == cfg.epochs {
            summary.stop_reason = format!("{epoch} epochs");
        }
        write_json(&out.join(TRAIN_FILE), &summary)?;
        observer.on_epoch_end(&record, &summary);
        if since_best >= cfg.patience {
            break;
        }
    }
    if !out.join(CONFIG_FILE).exists() || !out.join(WEIGHTS_FILE).exists() {
        return Err(ModelError::Data("no epoch was trained".into()));
    }
    Ok(summary)
}

/// Optimiser steps in one epoch: about one pass over the training tokens.
fn batches_per_epoch(cfg: &ChordTrainConfig, train: &RollSet) -> usize {
    // About 4 tokens a frame.
    let tokens = train.num_frames() * 4;
    (tokens / (cfg.window_len * cfg.batch_size).max(1)).max(1)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ModelError> {
    let json = serde_json::to_string_pretty(value).expect("summaries always serialise");
    std::fs::write(path, json + "\n")
        .map_err(|source| ModelError::Io { path: path.display().to_string(), source })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelError> {
    let bytes =
        std::fs::read(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|source| ModelError::TrainConfigParse { path: path.display().to_string(), source })
}
