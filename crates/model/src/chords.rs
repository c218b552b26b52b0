//! The chord model: an LSTM over chord tokens (`music::roll`), which hears and answers music
//! with several voices at a step. Its network, model directory, exact likelihood of a piano
//! roll, and the streaming generator the worker runs.
//! Runs on: the worker thread (loading, generation) and offline threads (training, evaluation).
//! `ChordGenerator::next_frame` neither allocates nor locks.
//!
//! # The network
//! Beside the last token, layer 0 reads the context of the frame being written, as rows of its
//! input matrix: every pitch of the previous frame, and every pitch written so far in this
//! one. So a held chord, the voice that moved and the room left above the last pitch are
//! inputs rather than things the state must remember. `weight_ih_l0` is `[4 hidden, vocab + 2
//! pitches]`: one column per token (one-hot), then one per previous-frame pitch, then one per
//! current-frame pitch. The layers above and the output layer are those of the melody network.
//!
//! # Exact likelihood
//! At each token only those `FrameCursor::allows` can come (ascending pitches, re-strikes of
//! sounding pitches only, at most `max_voices`), and the softmax is taken over those alone.
//! Rolls and token sequences are in one-to-one correspondence, so the product of the token
//! probabilities of a roll is its probability under a proper distribution over rolls: the
//! figure the polyphonic benchmarks publish (nats per frame). Data without onsets (the
//! benchmark frames) is scored with re-strikes left out of the softmax, as they cannot occur.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrayvec::ArrayVec;
use candle_core::{DType, Device, Result as CandleResult, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, InputKind, MAX_HIDDEN_SIZE, MAX_LAYERS};
use crate::fast::{FastLstm, PackSource, MAX_FAST_HIDDEN};
use crate::io::{read_expected_tensors, read_file, save_tensors, CONFIG_FILE, WEIGHTS_FILE};
use crate::lstm::{GenState, LstmLayer, SideLayout, LSTM_PREFIX};
use crate::sample::{Sampler, SamplingSettings};
use crate::ModelError;
use music::roll::{ChordToken, FrameCursor, STEP_TOKEN};
use music::{ChordCodec, Frame, PianoRoll, PitchSet, StepGrid, TokenId};

/// The newest chord `config.json` format this build reads and writes.
pub const CHORD_FORMAT_VERSION: u32 = 1;

/// Most voices a chord model sounds at once (the step reads two context rows per voice).
pub const MAX_VOICES: usize = 16;

const _: () =
    assert!(2 * MAX_VOICES <= crate::fast::MAX_STEP_ROWS, "a step's context rows fit the fast step");

/// The tag that tells a chord model's `config.json` from a melody model's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChordKind {
    /// The only value.
    Chords,
}

/// Sizes and conventions of a chord model, saved as its `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChordConfig {
    /// Format of this file; newer than `CHORD_FORMAT_VERSION` is refused at load.
    pub format_version: u32,
    /// Always `"chords"`.
    pub kind: ChordKind,
    /// Frames per quarter note of the music it was trained on.
    pub grid: StepGrid,
    /// Lowest pitch it reads and writes, inclusive.
    pub lowest_pitch: u8,
    /// Highest pitch it reads and writes, inclusive.
    pub highest_pitch: u8,
    /// Most pitches in one frame, 1 to `MAX_VOICES`: of a frame with more, the highest are read.
    pub max_voices: usize,
    /// Width of each LSTM layer's state, at most `MAX_FAST_HIDDEN`.
    pub hidden_size: usize,
    /// Number of stacked LSTM layers.
    pub num_layers: usize,
    /// Dropout between layers and before the output layer when training, in `[0, 1)`.
    pub dropout: f32,
}

impl ChordConfig {
    /// A config of the given sizes over the piano's 88 keys.
    pub fn new(
        grid: StepGrid,
        max_voices: usize,
        hidden_size: usize,
        num_layers: usize,
        dropout: f32,
    ) -> Self {
        let codec = ChordCodec::PIANO;
        ChordConfig {
            format_version: CHORD_FORMAT_VERSION,
            kind: ChordKind::Chords,
            grid,
            lowest_pitch: codec.lowest,
            highest_pitch: codec.highest,
            max_voices,
            hidden_size,
            num_layers,
            dropout,
        }
    }

    /// The token ids of its pitch range.
    pub fn codec(&self) -> ChordCodec {
        ChordCodec { lowest: self.lowest_pitch, highest: self.highest_pitch }
    }

    /// Number of token ids.
    pub fn vocab_len(&self) -> usize {
        self.codec().vocab_len()
    }

    /// Width of layer 0's input: the tokens, then the two context blocks of one row per pitch.
    pub fn input_width(&self) -> usize {
        self.vocab_len() + 2 * self.codec().num_pitches()
    }

    /// `frame` as this model reads it: pitches inside its range, at most `max_voices` of them
    /// (the highest).
    pub fn fit_frame(&self, frame: Frame) -> Frame {
        let mut sounding = self.codec().clip(frame.sounding);
        while sounding.len() > self.max_voices {
            let lowest = sounding.lowest().expect("a set above the limit holds pitches");
            sounding = PitchSet(sounding.0 & !(1u128 << lowest));
        }
        Frame { sounding, struck: frame.struck.intersection(sounding) }
    }

    /// Checks every field; the reason names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.format_version > CHORD_FORMAT_VERSION {
            return Err(ConfigError::UnsupportedVersion {
                version: self.format_version,
                newest: CHORD_FORMAT_VERSION,
            });
        }
        if self.grid.steps_per_quarter == 0 {
            return Err(ConfigError::BadGrid { steps_per_quarter: 0 });
        }
        if self.lowest_pitch > self.highest_pitch || self.highest_pitch > 127 {
            return Err(ConfigError::BadPitchRange {
                lowest: self.lowest_pitch,
                highest: self.highest_pitch,
            });
        }
        if !(1..=MAX_VOICES).contains(&self.max_voices) {
            return Err(ConfigError::BadMaxVoices { max_voices: self.max_voices, max: MAX_VOICES });
        }
        let max_hidden = MAX_HIDDEN_SIZE.min(MAX_FAST_HIDDEN);
        if !(1..=max_hidden).contains(&self.hidden_size) {
            return Err(ConfigError::BadHiddenSize { hidden_size: self.hidden_size, max: max_hidden });
        }
        if !(1..=MAX_LAYERS).contains(&self.num_layers) {
            return Err(ConfigError::BadNumLayers { num_layers: self.num_layers, max: MAX_LAYERS });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::BadDropout { dropout: self.dropout });
        }
        Ok(())
    }
}

/// The chord network (see the module documentation). Built by `new` from a `VarBuilder`: a
/// `VarMap` one for training, one over loaded tensors for inference.
#[derive(Clone, Debug)]
pub struct ChordLstm {
    config: ChordConfig,
    layers: Vec<LstmLayer>,
    /// `[vocab, hidden]`.
    head_w: Tensor,
    /// `[vocab]`.
    head_b: Tensor,
    device: Device,
}

impl ChordLstm {
    /// Builds the network `config` describes from the tensors of `vb`.
    pub fn new(config: &ChordConfig, vb: VarBuilder) -> CandleResult<Self> {
        let hidden = config.hidden_size;
        let layers = (0..config.num_layers)
            .map(|k| LstmLayer::new(k, if k == 0 { config.input_width() } else { hidden }, hidden, &vb))
            .collect::<CandleResult<Vec<_>>>()?;
        let bound = 1.0 / (hidden as f64).sqrt();
        let head = vb.pp("head");
        let uniform = Init::Uniform { lo: -bound, up: bound };
        let head_w = head.get_with_hints((config.vocab_len(), hidden), "weight", uniform)?;
        let head_b = head.get_with_hints(config.vocab_len(), "bias", uniform)?;
        Ok(Self { config: config.clone(), layers, head_w, head_b, device: vb.device().clone() })
    }

    /// The name and shape of every tensor `config` needs.
    pub fn tensor_shapes(config: &ChordConfig) -> Vec<(String, Vec<usize>)> {
        let (vocab, hidden) = (config.vocab_len(), config.hidden_size);
        let mut shapes = Vec::new();
        for k in 0..config.num_layers {
            let width = if k == 0 { config.input_width() } else { hidden };
            shapes.push((format!("{LSTM_PREFIX}.weight_ih_l{k}"), vec![4 * hidden, width]));
            shapes.push((format!("{LSTM_PREFIX}.weight_hh_l{k}"), vec![4 * hidden, hidden]));
            shapes.push((format!("{LSTM_PREFIX}.bias_ih_l{k}"), vec![4 * hidden]));
            shapes.push((format!("{LSTM_PREFIX}.bias_hh_l{k}"), vec![4 * hidden]));
        }
        shapes.push(("head.weight".to_string(), vec![vocab, hidden]));
        shapes.push(("head.bias".to_string(), vec![vocab]));
        shapes
    }

    /// Seeded starting values: weights uniform in `±1/√hidden`, biases zero but the forget
    /// gate's input bias at 1.
    pub fn initial_tensors(
        config: &ChordConfig,
        seed: u64,
        device: &Device,
    ) -> CandleResult<HashMap<String, Tensor>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let hidden = config.hidden_size;
        let bound = 1.0 / (hidden as f32).sqrt();
        let mut out = HashMap::new();
        for (name, shape) in Self::tensor_shapes(config) {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = if name.contains(".bias_ih_") {
                (0..len).map(|i| if (hidden..2 * hidden).contains(&i) { 1.0 } else { 0.0 }).collect()
            } else if name.contains(".bias_hh_") || name == "head.bias" {
                vec![0.0; len]
            } else {
                (0..len).map(|_| rng.random_range(-bound..bound)).collect()
            };
            out.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Ok(out)
    }

    /// Its config.
    pub fn config(&self) -> &ChordConfig {
        &self.config
    }

    /// The LSTM layers, input first.
    pub fn layers(&self) -> &[LstmLayer] {
        &self.layers
    }

    /// The output layer over `xs` `[..., hidden]` → logits `[..., vocab]`.
    pub fn head(&self, xs: &Tensor) -> CandleResult<Tensor> {
        xs.broadcast_matmul(&self.head_w.t()?)?.broadcast_add(&self.head_b)
    }

    /// The output layer's weight and bias, each passed through `weight`.
    pub fn head_weights(&self, weight: &dyn Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
        (weight(&self.head_w), weight(&self.head_b))
    }

    /// Layer 0's input as one table of rows, each passed through `weight`, `[vocab + 2 pitches +
    /// 1, 4 hidden]`: every token's row with both biases, the context rows
    /// (`FrameCursor::context_rows`, from `vocab` on), and a last row of zeros that pads a
    /// step's list of rows.
    pub fn input_table(&self, weight: &dyn Fn(&Tensor) -> Tensor) -> CandleResult<Tensor> {
        let layer = &self.layers[0];
        let vocab = self.config.vocab_len();
        let w_t = weight(&layer.w_ih).t()?;
        let bias = (weight(&layer.b_ih) + weight(&layer.b_hh))?;
        let tokens = w_t.narrow(0, 0, vocab)?.broadcast_add(&bias)?;
        let context = w_t.narrow(0, vocab, self.config.input_width() - vocab)?;
        let zeros = Tensor::zeros((1, 4 * self.config.hidden_size), DType::F32, &self.device)?;
        Tensor::cat(&[&tokens, &context, &zeros], 0)
    }

    /// A copy with the rows of the matrices `scope` names on int8 grids (`int8`): the recurrent
    /// matrices (and the input matrices above layer 0) the fast step then streams as integers
    /// where an integer kernel runs (`int8::runs_on`: x86 with AVX2), or every matrix; and the
    /// largest change to any weight.
    pub fn quantized(&self, scope: crate::int8::GridScope) -> CandleResult<(ChordLstm, f32)> {
        let (tensors, largest_change) =
            crate::int8::quantize_tensors(PackSource::named_tensors(self), scope)?;
        Ok((
            ChordLstm::new(&self.config, VarBuilder::from_tensors(tensors, DType::F32, &self.device))?,
            largest_change,
        ))
    }

    /// The row of `input_table` that pads a step's rows.
    pub fn padding_row(&self) -> u32 {
        self.config.input_width() as u32
    }
}

impl PackSource for ChordLstm {
    fn device(&self) -> &Device {
        &self.device
    }
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn vocab_len(&self) -> usize {
        self.config.vocab_len()
    }
    fn input(&self) -> InputKind {
        InputKind::OneHot
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (k, layer) in self.layers.iter().enumerate() {
            out.extend(layer.named_tensors(k));
        }
        out.push(("head.weight".to_string(), self.head_w.clone()));
        out.push(("head.bias".to_string(), self.head_b.clone()));
        out
    }
    fn side_table(&self) -> CandleResult<Option<Tensor>> {
        let vocab = self.config.vocab_len();
        let context = self.layers[0].w_ih.t()?.narrow(0, vocab, self.config.input_width() - vocab)?;
        Ok(Some(context.contiguous()?))
    }
    fn side_layout(&self) -> SideLayout {
        SideLayout::default()
    }
}

/// The built-in chord model's config, embedded at compile time.
const BUILTIN_CONFIG: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../presets/models/chords/config.json"));
/// The built-in chord model's weights, deflated by `build.rs` (f32 tensors in byte planes) and
/// embedded at compile time.
pub(crate) const BUILTIN_WEIGHTS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chords-model.safetensors.deflate"));
/// Where the built-in chord model came from, for messages.
pub const BUILTIN_ORIGIN: &str = "built-in chord model (presets/models/chords)";

/// A validated chord model ready to run, shared by the worker as `Arc<ChordModel>`.
#[derive(Debug)]
pub struct ChordModel {
    /// Its sizes and conventions.
    pub config: ChordConfig,
    /// The network.
    pub lstm: ChordLstm,
    /// Where it was loaded from, for messages.
    pub origin: String,
    fast: FastLstm,
}

impl ChordModel {
    /// A model from a network already built (freshly trained weights, tests).
    pub fn new(lstm: ChordLstm, origin: &str) -> Result<Self, ModelError> {
        let fast = FastLstm::for_model(&lstm)?.ok_or_else(|| ModelError::Device {
            name: format!("{:?}", lstm.device),
            reason: "chord models run on the CPU".to_string(),
        })?;
        Ok(Self { config: lstm.config.clone(), lstm, origin: origin.to_string(), fast })
    }

    /// Loads and validates a chord model directory (`config.json`, `model.safetensors`).
    pub fn load_dir(dir: &Path) -> Result<Self, ModelError> {
        let config = read_file(&dir.join(CONFIG_FILE))?;
        let weights = read_file(&dir.join(WEIGHTS_FILE))?;
        Self::from_bytes(&config, &weights, &dir.display().to_string())
    }

    /// The chord model built into the plugin.
    pub fn builtin() -> Result<Self, ModelError> {
        let weights = crate::io::inflate_builtin_weights(BUILTIN_WEIGHTS).map_err(|reason| {
            ModelError::CorruptWeights { path: format!("{BUILTIN_ORIGIN}/model.safetensors"), reason }
        })?;
        Self::from_bytes(BUILTIN_CONFIG, &weights, BUILTIN_ORIGIN)
    }

    /// A model from the bytes of its `config.json` and `model.safetensors`; `origin` names it.
    pub fn from_bytes(config_json: &[u8], weights: &[u8], origin: &str) -> Result<Self, ModelError> {
        let config = parse_chord_config(config_json, &format!("{origin}/{CONFIG_FILE}"))?;
        let path = format!("{origin}/{WEIGHTS_FILE}");
        let expected = ChordLstm::tensor_shapes(&config);
        let tensors = read_expected_tensors(weights, &path, expected, &Device::Cpu, |name, shape, got| {
            ModelError::ShapeMismatch {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: got.to_vec(),
            }
        })?;
        let lstm = ChordLstm::new(&config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
        Self::new(lstm, origin)
    }

    /// How the generation step holds the weights (int8 for a model on int8 grids where an
    /// integer kernel runs: `int8::runs_on`).
    pub fn weight_format(&self) -> crate::fast::WeightFormat {
        self.fast.format()
    }

    /// A zero state for one sequence.
    pub fn new_state(&self) -> GenState {
        self.fast.new_state()
    }

    /// Feeds `token`, which `cursor` has just taken, with the cursor's context: updates `state`
    /// and writes the next token's logits into `logits` (`[vocab]`). Allocation-free.
    pub fn step(
        &self,
        token: u32,
        cursor: &FrameCursor,
        state: &mut GenState,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        let mut rows = ArrayVec::<u32, { 2 * MAX_VOICES }>::new();
        cursor.context_rows(|row| {
            // A frame of more voices than the model reads is cut in `fit_frame`; this only
            // guards the fixed buffer.
            let _ = rows.try_push(row);
        });
        Ok(self.fast.step_rows(TokenId(token as u16), &rows, state, logits)?)
    }

    /// Writes `config.json` and `model.safetensors` of `lstm` into `dir` (created if needed).
    pub fn save(dir: &Path, lstm: &ChordLstm) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?;
        let tensors = lstm
            .named_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        save_tensors(&dir.join(WEIGHTS_FILE), tensors)?;
        let json = serde_json::to_string_pretty(&lstm.config).expect("a ChordConfig always serialises");
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, json + "\n")
            .map_err(|source| ModelError::Io { path: path.display().to_string(), source })
    }
}

/// Parses and validates a chord model's `config.json`.
pub fn parse_chord_config(bytes: &[u8], path: &str) -> Result<ChordConfig, ModelError> {
    let config: ChordConfig = serde_json::from_slice(bytes)
        .map_err(|source| ModelError::ConfigParse { path: path.to_string(), source })?;
    config.validate().map_err(|problem| ModelError::InvalidConfig { path: path.to_string(), problem })?;
    Ok(config)
}

/// True if the `config.json` bytes describe a chord model (a top-level `"kind": "chords"`).
pub fn is_chord_config(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(|k| k == "chords"))
        .unwrap_or(false)
}

/// Log-probabilities of the tokens `cursor` allows next (the others `-inf`), in place.
/// `restrikes` false leaves re-strikes out, for data that records no onsets.
pub fn allowed_log_softmax(logits: &mut [f32], cursor: &FrameCursor, max_voices: usize, restrikes: bool) {
    let codec = cursor.codec();
    let allowed = |id: usize| {
        cursor.allows(id as u32, max_voices)
            && (restrikes || !matches!(codec.token(id as u32), Some(ChordToken::Restrike(_))))
    };
    let max = logits
        .iter()
        .enumerate()
        .filter(|(i, _)| allowed(*i))
        .map(|(_, &l)| l)
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 =
        logits.iter().enumerate().filter(|(i, _)| allowed(*i)).map(|(_, &l)| ((l - max) as f64).exp()).sum();
    let log_sum = max as f64 + sum.ln();
    for (i, l) in logits.iter_mut().enumerate() {
        *l = if allowed(i) { (*l as f64 - log_sum) as f32 } else { f32::NEG_INFINITY };
    }
}

/// The score of one piano roll under a chord model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RollScore {
    /// Frames scored.
    pub frames: usize,
    /// Sum of `-ln p(frame | earlier frames)` over them, nats.
    pub nll: f64,
    /// The same sum without the first frame's term.
    pub nll_after_first: f64,
    /// Sums over frames of the frame's greedy prediction against the truth (given the true
    /// earlier frames): pitches in both, pitches predicted only, pitches missed.
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

impl RollScore {
    /// Adds another roll's score.
    pub fn add(&mut self, other: &RollScore) {
        self.frames += other.frames;
        self.nll += other.nll;
        self.nll_after_first += other.nll_after_first;
        self.true_positives += other.true_positives;
        self.false_positives += other.false_positives;
        self.false_negatives += other.false_negatives;
    }

    /// Frame-level accuracy (Bay et al. 2009): TP / (TP + FP + FN) over all frames.
    pub fn accuracy(&self) -> f64 {
        let all = self.true_positives + self.false_positives + self.false_negatives;
        if all == 0 {
            return 1.0;
        }
        self.true_positives as f64 / all as f64
    }
}

/// Scores `roll` under `model` from a fresh start: the exact negative log-likelihood of every
/// frame given the frames before it, and (with `predict`) the greedy prediction of each frame
/// from the true past. `restrikes` false scores data without onsets (see the module docs).
/// Pitches outside the model's range or voices beyond its limit are errors: such a roll has no
/// probability under the model.
pub fn score_roll(
    model: &ChordModel,
    roll: &PianoRoll,
    restrikes: bool,
    predict: bool,
) -> Result<RollScore, ModelError> {
    let codec = model.config.codec();
    let max_voices = model.config.max_voices;
    let mut score = RollScore::default();
    let mut state = model.new_state();
    let mut cursor = FrameCursor::new(codec);
    let mut logits = vec![0.0f32; codec.vocab_len()];
    cursor.push(STEP_TOKEN);
    model.step(STEP_TOKEN, &cursor, &mut state, &mut logits)?;
    let mut tokens = Vec::new();
    let mut previous = PitchSet::EMPTY;
    for (t, &frame) in roll.frames.iter().enumerate() {
        if model.config.fit_frame(frame) != frame {
            return Err(ModelError::Data(format!(
                "frame {t} ({:?}) has pitches outside {}..={} or more than {max_voices} voices",
                frame.sounding, codec.lowest, codec.highest
            )));
        }
        if predict {
            let predicted = greedy_frame(model, &cursor, &state, &logits, restrikes)?;
            score.true_positives += predicted.intersection(frame.sounding).len();
            score.false_positives += predicted.difference(frame.sounding).len();
            score.false_negatives += frame.sounding.difference(predicted).len();
        }
        tokens.clear();
        codec.encode_frame(previous, frame, &mut tokens);
        previous = frame.sounding;
        let mut frame_nll = 0.0f64;
        for &token in &tokens {
            allowed_log_softmax(&mut logits, &cursor, max_voices, restrikes);
            frame_nll -= logits[token as usize] as f64;
            cursor.push(token);
            model.step(token, &cursor, &mut state, &mut logits)?;
        }
        score.frames += 1;
        score.nll += frame_nll;
        if t > 0 {
            score.nll_after_first += frame_nll;
        }
    }
    Ok(score)
}

/// The most likely token at each step of one frame from `state` (left as it is).
fn greedy_frame(
    model: &ChordModel,
    cursor: &FrameCursor,
    state: &GenState,
    logits: &[f32],
    restrikes: bool,
) -> Result<PitchSet, ModelError> {
    let (mut cursor, mut state, mut logits) = (*cursor, state.clone(), logits.to_vec());
    loop {
        allowed_log_softmax(&mut logits, &cursor, model.config.max_voices, restrikes);
        let best =
            (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a))).unwrap_or(0);
        if let Some(frame) = cursor.push(best as u32) {
            return Ok(frame.sounding);
        }
        model.step(best as u32, &cursor, &mut state, &mut logits)?;
    }
}

/// Streams frames from a chord model, one at a time, for one phrase. Prime it with the
/// player's frames, then call `next_frame` with settings that may change between calls.
#[derive(Debug)]
pub struct ChordGenerator {
    model: Arc<ChordModel>,
    state: GenState,
    cursor: FrameCursor,
    logits: Vec<f32>,
    sampler: Sampler,
}

impl ChordGenerator {
    /// A generator at the start of a piece whose draws depend only on `seed`.
    pub fn new(model: Arc<ChordModel>, seed: u64) -> Result<Self, ModelError> {
        let codec = model.config.codec();
        let mut generator = ChordGenerator {
            state: model.new_state(),
            cursor: FrameCursor::new(codec),
            logits: vec![0.0; codec.vocab_len()],
            sampler: Sampler::new(seed),
            model,
        };
        generator.feed(STEP_TOKEN)?;
        Ok(generator)
    }

    /// The model it runs.
    pub fn model(&self) -> &Arc<ChordModel> {
        &self.model
    }

    fn feed(&mut self, token: u32) -> Result<(), ModelError> {
        self.cursor.push(token);
        self.model.step(token, &self.cursor, &mut self.state, &mut self.logits)
    }

    /// Feeds a frame the player played (fitted to the model's range and voices).
    pub fn feed_frame(&mut self, frame: Frame) -> Result<(), ModelError> {
        let frame = self.model.config.fit_frame(frame);
        let mut tokens = ArrayVec::<u32, { MAX_VOICES + 1 }>::new();
        let codec = self.model.config.codec();
        for pitch in frame.sounding.iter() {
            let token = if self.cursor.previous().contains(pitch) && frame.struck.contains(pitch) {
                ChordToken::Restrike(pitch)
            } else {
                ChordToken::Sound(pitch)
            };
            tokens.extend(codec.id(token));
        }
        tokens.push(STEP_TOKEN);
        for token in tokens {
            self.feed(token)?;
        }
        Ok(())
    }

    /// Samples the next frame: pitches obey `settings.pitches` (key lock and range) and at most
    /// `max_voices` (and the model's own limit) sound. Allocation-free once warm.
    pub fn next_frame(
        &mut self,
        settings: &SamplingSettings,
        max_voices: usize,
    ) -> Result<Frame, ModelError> {
        let max_voices = max_voices.clamp(1, self.model.config.max_voices);
        let codec = self.model.config.codec();
        loop {
            let cursor = self.cursor;
            let allowed = |id: usize| {
                cursor.allows(id as u32, max_voices)
                    && match codec.token(id as u32) {
                        Some(ChordToken::Sound(p) | ChordToken::Restrike(p)) => settings.pitches.allows(p),
                        _ => true,
                    }
            };
            let token =
                self.sampler.choose(&self.logits, allowed, settings).unwrap_or(STEP_TOKEN as usize) as u32;
            let closed = self.cursor.push(token);
            self.model.step(token, &self.cursor, &mut self.state, &mut self.logits)?;
            if let Some(frame) = closed {
                return Ok(frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use music::PitchRules;

    /// A random tiny model over C4..E♭4 (vocabulary: step, 4 sound, 4 re-strike tokens).
    fn tiny_model(seed: u64) -> ChordModel {
        let mut config = ChordConfig::new(StepGrid { steps_per_quarter: 1 }, 3, 4, 1, 0.0);
        (config.lowest_pitch, config.highest_pitch) = (60, 63);
        let mut tensors = ChordLstm::initial_tensors(&config, seed, &Device::Cpu).unwrap();
        // Larger weights than the initialisation's, so the probabilities differ clearly.
        for t in tensors.values_mut() {
            *t = (&*t * 3.0).unwrap();
        }
        let lstm =
            ChordLstm::new(&config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
        ChordModel::new(lstm, "tiny").unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    #[test]
    fn a_rolls_likelihood_is_the_sum_of_its_allowed_token_log_probabilities() {
        let model = tiny_model(3);
        let tensors: HashMap<String, Vec<f64>> =
            model.lstm.named_tensors().into_iter().map(|(n, t)| (n, values(&t))).collect();
        let (w_ih, w_hh) = (&tensors["lstm.weight_ih_l0"], &tensors["lstm.weight_hh_l0"]);
        let (b_ih, b_hh) = (&tensors["lstm.bias_ih_l0"], &tensors["lstm.bias_hh_l0"]);
        let (head_w, head_b) = (&tensors["head.weight"], &tensors["head.bias"]);
        let (hidden, width, vocab) = (4usize, 9 + 8, 9usize);
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (mut h, mut c) = (vec![0.0f64; hidden], vec![0.0f64; hidden]);
        // One step by the LSTM equations, `inputs` the columns of W_ih that are 1.
        let mut step = |inputs: &[usize]| -> Vec<f64> {
            let gate = |row: usize| {
                inputs.iter().map(|&col| w_ih[row * width + col]).sum::<f64>()
                    + b_ih[row]
                    + b_hh[row]
                    + (0..hidden).map(|j| w_hh[row * hidden + j] * h[j]).sum::<f64>()
            };
            let gates: Vec<f64> = (0..4 * hidden).map(gate).collect();
            for u in 0..hidden {
                let (i, f, g, o) =
                    (gates[u], gates[hidden + u], gates[2 * hidden + u], gates[3 * hidden + u]);
                c[u] = sigmoid(f) * c[u] + sigmoid(i) * g.tanh();
                h[u] = sigmoid(o) * c[u].tanh();
            }
            (0..vocab)
                .map(|v| head_b[v] + (0..hidden).map(|j| head_w[v * hidden + j] * h[j]).sum::<f64>())
                .collect()
        };
        // ln p(target) among `allowed`.
        let log_p = |logits: &[f64], allowed: &[usize], target: usize| {
            let norm = allowed.iter().map(|&a| logits[a].exp()).sum::<f64>().ln();
            logits[target] - norm
        };
        // The roll {60, 62} then {62}, without onsets. Token ids: step 0, sound 60..63 = 1..4.
        // Context columns: previous-frame pitches from 9, current-frame pitches from 13.
        let mut expected = 0.0;
        let logits = step(&[0]);
        expected += log_p(&logits, &[0, 1, 2, 3, 4], 1); // 60, anything may come
        let logits = step(&[1, 13]);
        expected += log_p(&logits, &[0, 2, 3, 4], 3); // 62, above 60
        let logits = step(&[3, 13, 15]);
        expected += log_p(&logits, &[0, 4], 0); // step, only 63 or the step
        let logits = step(&[0, 9, 11]);
        expected += log_p(&logits, &[0, 1, 2, 3, 4], 3); // 62 (held)
        let logits = step(&[3, 9, 11, 15]);
        expected += log_p(&logits, &[0, 4], 0);
        let roll = PianoRoll::from_chords(&[PitchSet::of(&[60, 62]), PitchSet::of(&[62])]);
        let score = score_roll(&model, &roll, false, false).unwrap();
        assert_eq!(score.frames, 2);
        assert!((score.nll + expected).abs() < 1e-4, "{} against {}", score.nll, -expected);
        assert!(score.nll_after_first < score.nll && score.nll_after_first > 0.0);
    }

    #[test]
    fn generation_keeps_to_the_seed_the_rules_and_the_voices() {
        let model = Arc::new(tiny_model(5));
        let mut settings = SamplingSettings { temperature: 1.5, ..Default::default() };
        settings.pitches = PitchRules::new(60, 62, None);
        let run = |seed: u64, voices: usize| {
            let mut generator = ChordGenerator::new(Arc::clone(&model), seed).unwrap();
            generator.feed_frame(Frame::after(PitchSet::EMPTY, PitchSet::of(&[60, 63]))).unwrap();
            (0..200).map(|_| generator.next_frame(&settings, voices).unwrap()).collect::<Vec<_>>()
        };
        let frames = run(1, 2);
        assert_eq!(frames, run(1, 2));
        assert_ne!(frames, run(2, 2));
        assert!(frames.iter().all(|f| f.sounding.len() <= 2 && !f.sounding.contains(63)), "{frames:?}");
        assert!(frames.iter().any(|f| f.sounding.len() == 2), "two voices are used");
        assert!(run(1, 1).iter().all(|f| f.sounding.len() <= 1));
    }

    #[test]
    fn damaged_chord_models_are_refused_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(1);
        ChordModel::save(dir.path(), &model.lstm).unwrap();
        assert!(ChordModel::load_dir(dir.path()).is_ok());
        let config = dir.path().join(CONFIG_FILE);
        assert!(is_chord_config(&std::fs::read(&config).unwrap()));
        let text =
            std::fs::read_to_string(&config).unwrap().replace("\"max_voices\": 3", "\"max_voices\": 99");
        std::fs::write(&config, text).unwrap();
        let err = ChordModel::load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("99 voices"), "{err}");
        ChordModel::save(dir.path(), &model.lstm).unwrap();
        let weights = dir.path().join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let err = ChordModel::load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn the_built_in_chord_model_loads() {
        let model = ChordModel::builtin().unwrap();
        assert_eq!(model.config.codec(), ChordCodec::PIANO);
    }
}
