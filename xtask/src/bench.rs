//! `cargo xtask bench`: how fast the model generates and trains, ours against candle-nn's
//! stock LSTM on the same weights and sizes, in one run so the ratios share the machine's load.
//! Runs on: offline (a terminal).
//!
//! Timing on a shared machine: ours and stock alternate trial by trial, and each figure is the
//! median over trials, so a burst of other work slows both sides alike.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use antiphon::engine::lstm::LstmFactory;
use antiphon::engine::timing::first_note_latencies;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::rnn::{LSTMConfig, LSTMState, RNN};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use live::phrase::Texture;
use model::chords::{ChordGenerator, ChordModel};
use model::fast::{FastLstm, WeightFormat};
use model::int8::{self, Int8Kernel};
use model::kernels::Isa;
use model::lstm::nll_and_argmax;
use model::{
    GenState, Generator, InputKind, LoadedModel, MelodyLstm, ModelConfig, Sampler, SamplingSettings,
};
use music::{Frame, PitchSet, Symbol, TokenId, Vocab};
use train::SequenceForward;

mod device;

/// Time generation and training: ours against candle-nn's stock LSTM, same weights and sizes.
///
/// Prints µs per generated symbol (LSTM step, output layer and sampling) beside the time it
/// takes just to read the weights once, and LSTM steps per second of a training step (forward
/// over every position, cross-entropy, backward, AdamW), with the ratios.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Also time this model directory (the built-in model is always timed).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Symbols generated per timed trial.
    #[arg(long, default_value_t = 300)]
    gen_symbols: usize,
    /// Trials per generation figure (ours and stock alternate).
    #[arg(long, default_value_t = 15)]
    gen_trials: usize,
    /// Timed training batches per side (ours and stock alternate).
    #[arg(long, default_value_t = 6)]
    train_batches: usize,
    /// Hidden width of the training benchmark (the recipe: 256).
    #[arg(long, default_value_t = 256)]
    train_hidden: usize,
    /// LSTM layers of the training benchmark (the recipe: 1).
    #[arg(long, default_value_t = 1)]
    train_layers: usize,
    /// Embedding width of the training benchmark; 0 for the recipe's one-hot input.
    #[arg(long, default_value_t = 0)]
    train_embedding: usize,
    /// Windows per training batch (the recipe: 64).
    #[arg(long, default_value_t = 64)]
    train_batch: usize,
    /// Symbols per training window (the recipe: 64).
    #[arg(long, default_value_t = 64)]
    train_window: usize,
    /// Skip the generation part.
    #[arg(long)]
    no_generation: bool,
    /// Skip the training part.
    #[arg(long)]
    no_training: bool,
    /// Skip the phrase-end → first-note latency.
    #[arg(long)]
    no_latency: bool,
    /// Phrases timed through the worker.
    #[arg(long, default_value_t = 100)]
    latency_trials: u32,
    /// Compare this GPU (cuda or metal; needs the build feature of that name) with the CPU:
    /// generation at batch 1 and 8, training, and the device the plugin's Auto keeps. Runs
    /// only that comparison.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Time only our training step (for profiling it).
    #[arg(long)]
    ours_only: bool,
    /// Multiply our training step's recurrences in f32 even where the CPU multiplies bfloat16
    /// (as `train --f32-products`).
    #[arg(long)]
    f32_products: bool,
    /// A Python with TensorFlow (e.g. a venv's bin/python): also time the recipe's Keras
    /// training step at the same sizes (`--train-layers`, `--train-embedding` stack more LSTMs
    /// or read an Embedding, as ours), batch by batch between ours.
    #[arg(long)]
    tensorflow: Option<PathBuf>,
}

/// The recipe's vocabulary: 41 pitches, `/`, `_`, `r`.
fn recipe_vocab() -> Vocab {
    Vocab::for_pitch_range(48, 88)
}

/// A model of the given sizes with seeded starting weights, fixed (so generation packs it).
fn seeded_model(
    vocab: Vocab,
    input: InputKind,
    hidden: usize,
    layers: usize,
    origin: &str,
) -> Result<LoadedModel> {
    let config = ModelConfig::new(vocab, input, hidden, layers, 0.0);
    let tensors = MelodyLstm::initial_tensors(&config, 7, &Device::Cpu)?;
    let lstm = MelodyLstm::new(&config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
    Ok(LoadedModel::new(config, lstm, origin)?)
}

/// candle-nn's stock pieces on a model's weights: `Embedding` (or one-hot vectors), one
/// `LSTM` per layer, `Linear`.
struct StockModel {
    embedding: Option<candle_nn::Embedding>,
    layers: Vec<candle_nn::LSTM>,
    head: candle_nn::Linear,
    vocab_len: usize,
}

impl StockModel {
    fn new(model: &MelodyLstm, vb: VarBuilder) -> Result<Self> {
        let (vocab_len, hidden) = (model.vocab_len(), model.hidden_size());
        let embedding = match model.input() {
            InputKind::Embedding { dim } => Some(candle_nn::embedding(vocab_len, dim, vb.pp("embedding"))?),
            InputKind::OneHot => None,
        };
        let mut layers = Vec::new();
        for layer_idx in 0..model.num_layers() {
            let width = if layer_idx == 0 { model.input().width(vocab_len) } else { hidden };
            let cfg = LSTMConfig { layer_idx, ..Default::default() };
            layers.push(candle_nn::lstm(width, hidden, cfg, vb.pp("lstm"))?);
        }
        let head = candle_nn::linear(hidden, vocab_len, vb.pp("head"))?;
        Ok(Self { embedding, layers, head, vocab_len })
    }

    /// Built on the same (fixed) tensors as `model`.
    fn same_weights(model: &MelodyLstm) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
        Self::new(model, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
    }

    /// tokens: `[batch, seq]` u32 → the first layer's input `[batch, seq, width]`.
    fn input(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(match &self.embedding {
            Some(e) => e.forward(tokens)?,
            None => {
                let eye = Tensor::eye(self.vocab_len, DType::F32, tokens.device())?;
                let (b, s) = tokens.dims2()?;
                eye.index_select(&tokens.flatten_all()?, 0)?.reshape((b, s, self.vocab_len))?
            }
        })
    }

    /// One generation step, as candle-nn's `LSTM::step` runs it.
    fn step(&self, token: TokenId, states: &mut [LSTMState], logits: &mut [f32]) -> Result<()> {
        let tokens = Tensor::from_slice(&[token.0 as u32], (1, 1), &Device::Cpu)?;
        let mut x = self.input(&tokens)?.squeeze(1)?;
        for (layer, state) in self.layers.iter().zip(states.iter_mut()) {
            *state = layer.step(&x, state)?;
            x = state.h.clone();
        }
        logits.copy_from_slice(&self.head.forward(&x)?.squeeze(0)?.to_vec1::<f32>()?);
        Ok(())
    }

    /// Logits of every position. tokens: `[batch, seq]` → `[batch · seq, vocab]`
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut xs = self.input(tokens)?;
        for layer in &self.layers {
            let states = layer.seq(&xs)?;
            xs = layer.states_to_tensor(&states)?;
        }
        let (b, s, h) = xs.dims3()?;
        Ok(self.head.forward(&xs.reshape((b * s, h))?)?)
    }
}

/// CPU time a process (this one when `None`) has used so far, in seconds (all threads, ended
/// ones included), where `/proc` tells it (Linux; its clock ticks are 1/100 s).
fn process_cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Median of `xs` (sorted in place).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The settings the generation timing samples with: the plugin's kind of nucleus sampling.
fn bench_settings() -> SamplingSettings {
    SamplingSettings { temperature: 0.9, top_p: 0.95, may_end: false, ..Default::default() }
}

/// µs per symbol, medians over alternating trials: ours (the `Generator`, i.e. the plugin's
/// path, with the weights packed as the plugin packs them), the same weights packed as f32 and
/// in half precision (the same step and sampler), the packings of CPUs without AVX-512 (where
/// this one has AVX-512 and so runs them too), candle-nn stock, and the floors (reading the
/// packed weights once).
struct GenFigures {
    ours_us: f64,
    format: WeightFormat,
    f32_us: f64,
    /// The same weights packed in half precision, where it holds them exactly.
    f16_us: Option<f64>,
    /// The AVX2 kernels: int8 with AVX-VNNI (where the CPU has it and the weights lie on int8
    /// grids) and half precision (where it holds them exactly).
    avx2_int8_us: Option<f64>,
    avx2_f16_us: Option<f64>,
    /// Int8 with plain AVX2's kernel (16-bit inputs), the packing of AVX2 CPUs without either
    /// VNNI, where this CPU does not pick it itself.
    avx2_wide_us: Option<f64>,
    stock_us: f64,
    floor_us: f64,
    f32_floor_us: f64,
    weight_kib: f64,
}

/// A packing timed the way the generator runs it: one step and one draw per symbol.
struct PackedRun {
    fast: FastLstm,
    state: GenState,
    token: TokenId,
}

impl PackedRun {
    fn new(fast: FastLstm, start: TokenId) -> Self {
        Self { state: fast.new_state(), fast, token: start }
    }

    /// µs per symbol over `n` symbols from the zero state.
    fn time(&mut self, n: usize, sampler: &mut Sampler, logits: &mut [f32], vocab: &Vocab) -> Result<f64> {
        self.state.reset();
        let t = Instant::now();
        for _ in 0..n {
            self.fast.step_at(self.token, &[], &mut self.state, logits)?;
            self.token = sampler.sample(logits, vocab, &bench_settings());
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
    }
}

fn time_generation(model: LoadedModel, args: &BenchArgs) -> Result<GenFigures> {
    let fast = FastLstm::for_model(&model.lstm)?.context("the model did not pack for the fast step")?;
    let vocab = model.config.vocab.clone();
    let start = vocab.id(Symbol::Delimiter).unwrap_or(TokenId(0));
    let packed =
        |isa, format| FastLstm::pack_as(&model.lstm, isa, format).ok().map(|f| PackedRun::new(f, start));
    let mut exact_run = PackedRun::new(FastLstm::pack(&model.lstm, fast.isa())?, start);
    let mut half = packed(fast.isa(), WeightFormat::F16);
    // Only a CPU with AVX-512 runs the AVX2 kernels beside its own; elsewhere they are its own.
    let has_avx512 = fast.isa() == Isa::Avx512;
    // Without AVX-VNNI (AMD's Zen 4, say) the AVX2 int8 packing runs plain AVX2's kernel, which
    // `avx2 wide` already times: the column stays empty rather than time it twice.
    let mut avx2_int8 = (has_avx512 && Int8Kernel::AvxVnni.runs_here())
        .then(|| packed(Isa::Avx2Fma, WeightFormat::I8))
        .flatten();
    let mut avx2_f16 = has_avx512.then(|| packed(Isa::Avx2Fma, WeightFormat::F16)).flatten();
    let mut avx2_wide = (fast.int8_kernel() != Some(Int8Kernel::Avx2Wide))
        .then(|| FastLstm::pack_as(&model.lstm, Isa::Avx2Fma, WeightFormat::I8).ok())
        .flatten()
        .and_then(|f| f.with_int8_kernel(Int8Kernel::Avx2Wide).ok())
        .map(|f| PackedRun::new(f, start));
    let stock = StockModel::same_weights(&model.lstm)?;
    let settings = bench_settings();
    let model = Arc::new(model);
    let mut generator = Generator::new(model.clone(), 1);
    let mut sampler = Sampler::new(1);
    let mut logits = vec![0.0f32; vocab.len()];
    let hidden = model.config.hidden_size;
    let zero = Tensor::zeros((1, hidden), DType::F32, &Device::Cpu)?;
    let mut states: Vec<LSTMState> =
        (0..model.config.num_layers).map(|_| LSTMState::new(zero.clone(), zero.clone())).collect();
    let mut token = start;
    let n = args.gen_symbols;
    let mut times: [Vec<f64>; 9] = Default::default();
    let mut sink = 0.0f32;
    let per_symbol_us = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // One untimed round warms caches and the allocator.
    for trial in 0..=args.gen_trials {
        generator.reset();
        let t = Instant::now();
        for _ in 0..n {
            sink += generator.next_symbol(&settings)?.is_some() as u8 as f32;
        }
        let ours_us = per_symbol_us(t);
        let f32_us = exact_run.time(n, &mut sampler, &mut logits, &vocab)?;
        let mut time_optional = |run: &mut Option<PackedRun>| match run {
            Some(run) => run.time(n, &mut sampler, &mut logits, &vocab),
            None => Ok(f64::NAN),
        };
        let f16_us = time_optional(&mut half)?;
        let avx2_int8_us = time_optional(&mut avx2_int8)?;
        let avx2_f16_us = time_optional(&mut avx2_f16)?;
        let avx2_wide_us = time_optional(&mut avx2_wide)?;

        let t = Instant::now();
        for _ in 0..n {
            stock.step(token, &mut states, &mut logits)?;
            token = sampler.sample(&logits, &vocab, &settings);
        }
        let stock_us = per_symbol_us(t);

        let t = Instant::now();
        for i in 0..n {
            sink += fast.read_weights_once(TokenId((i % vocab.len()) as u16));
        }
        let floor_us = per_symbol_us(t);
        let t = Instant::now();
        for i in 0..n {
            sink += exact_run.fast.read_weights_once(TokenId((i % vocab.len()) as u16));
        }
        let f32_floor_us = per_symbol_us(t);
        if trial > 0 {
            let figures = [
                ours_us,
                f32_us,
                stock_us,
                floor_us,
                f32_floor_us,
                f16_us,
                avx2_int8_us,
                avx2_f16_us,
                avx2_wide_us,
            ];
            for (list, us) in times.iter_mut().zip(figures) {
                list.push(us);
            }
        }
    }
    std::hint::black_box(sink);
    let [ours, f32_t, stock_t, floor, f32_floor, f16_t, avx2_int8_t, avx2_f16_t, avx2_wide_t] = &mut times;
    Ok(GenFigures {
        ours_us: median(ours),
        format: fast.format(),
        f32_us: median(f32_t),
        f16_us: half.is_some().then(|| median(f16_t)),
        avx2_int8_us: avx2_int8.is_some().then(|| median(avx2_int8_t)),
        avx2_f16_us: avx2_f16.is_some().then(|| median(avx2_f16_t)),
        avx2_wide_us: avx2_wide.is_some().then(|| median(avx2_wide_t)),
        stock_us: median(stock_t),
        floor_us: median(floor),
        f32_floor_us: median(f32_floor),
        weight_kib: fast.weight_bytes_per_step() as f64 / 1024.0,
    })
}

fn describe(config: &ModelConfig) -> String {
    let input = match config.input {
        InputKind::Embedding { dim } => format!("emb {dim}"),
        InputKind::OneHot => "one-hot".to_string(),
    };
    format!("{}×{}, {input}, {} sym", config.num_layers, config.hidden_size, config.vocab_len())
}

/// `describe`, and whether a tune memory is mixed in.
fn describe_model(model: &LoadedModel) -> String {
    let memory = if model.memory.is_some() { " +mem" } else { "" };
    format!("{}{memory}", describe(&model.config))
}

fn generation(args: &BenchArgs) -> Result<()> {
    // The built-in model with its tune memory, as the plugin runs it, and without: what the
    // memory's lookup and mixing add to a step.
    let mut models = vec![
        ("built-in".to_string(), LoadedModel::builtin()?),
        ("  no memory".to_string(), LoadedModel::builtin()?.with_memory(None)),
    ];
    if let Some(dir) = &args.model {
        let model = LoadedModel::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?;
        models.push((dir.display().to_string(), model));
    }
    models.push((
        "2×256 embedding".to_string(),
        seeded_model(recipe_vocab(), InputKind::Embedding { dim: 64 }, 256, 2, "bench")?,
    ));
    let recipe = seeded_model(recipe_vocab(), InputKind::OneHot, 256, 1, "bench")?;
    let (recipe_int8, _) = int8::quantize_model(&recipe.lstm, &recipe.config, int8::GridScope::StepMatrices)?;
    let recipe_int8 = LoadedModel::new(recipe.config.clone(), recipe_int8, "bench")?;
    models.push(("recipe size".to_string(), recipe));
    models.push(("recipe size int8".to_string(), recipe_int8));
    println!("\nGeneration, one sequence, one thread: µs per symbol (LSTM step + output layer + sampling)");
    println!(
        "{:<16} {:<28} {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "model",
        "sizes",
        "packed",
        "ours",
        "floor",
        "weights",
        "as f32",
        "floor",
        "as f16",
        "avx2 int8",
        "avx2 f16",
        "avx2 wide",
        "stock",
        "stock/us"
    );
    for (name, model) in models {
        let sizes = describe_model(&model);
        let g = time_generation(model, args)?;
        let format = match g.format {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::I8 => "int8",
        };
        let optional = |us: Option<f64>| us.map_or("-".to_string(), |us| format!("{us:.2}"));
        println!(
            "{:<16} {:<28} {:>6} {:>8.2} {:>8.2} {:>5.0} KiB {:>8.2} {:>8.2} {:>8} {:>9} {:>9} {:>9} {:>9.1} {:>8.1}×",
            name,
            sizes,
            format,
            g.ours_us,
            g.floor_us,
            g.weight_kib,
            g.f32_us,
            g.f32_floor_us,
            optional(g.f16_us),
            optional(g.avx2_int8_us),
            optional(g.avx2_f16_us),
            optional(g.avx2_wide_us),
            g.stock_us,
            g.stock_us / g.ours_us,
        );
    }
    println!(
        "  ours: Generator::next_symbol, the plugin's path ({} kernels), weights packed as the plugin packs them: int8 for a model on\n  int8 grids (cargo xtask quantize) on x86 with AVX2 (VNNI's kernels where the CPU has AVX-512 VNNI or AVX-VNNI), else f16 where that\n  holds the weights exactly, else f32; within 1e-5 of candle on the same weights as f16 or f32, 2e-4 as int8 (16-bit inputs).\n  floor: one pass reading the packed weights a step reads.\n  as f32, as f16: the same weights packed as f32 or half precision (the packing of CPUs without AVX2), same step and sampler.\n  avx2 int8, avx2 f16: the AVX2 kernels of CPUs without AVX-512 (int8 where they have AVX-VNNI, as Intel's since Alder Lake), run here.\n  avx2 wide: int8 with plain AVX2's kernel (weights widened to 16 bits, 16-bit inputs), for AVX2 CPUs without either VNNI, run here.\n  stock: candle-nn LSTM::step per layer + Linear, same sampler. +mem: with the tune memory mixed in (ours only).",
        Isa::detect().name()
    );
    Ok(())
}

/// The time from a phrase's end until the worker has the answer's first note, with the
/// built-in melody model and the built-in chord model, against the recipe's time for one symbol
/// and a beat's length.
fn latency(args: &BenchArgs) -> Result<()> {
    // The measurement of the recipe: one `predict` on a 64-symbol window per symbol.
    const RECIPE_SYMBOL_MS: f64 = 42.0;
    for (texture, what) in [
        (Texture::Melody, "melody model, a 2-bar phrase"),
        (Texture::Chords, "chord model, the phrase over left-hand triads"),
    ] {
        let mut times: Vec<f64> = first_note_latencies(Arc::new(LstmFactory), texture, args.latency_trials)?
            .into_iter()
            .map(|t| t.as_secs_f64() * 1e3)
            .collect();
        let median_ms = median(&mut times);
        let p95_ms = times[((times.len() - 1) as f64 * 0.95).round() as usize];
        println!("\nPhrase end → first answer note ready, through the plugin's worker (built-in {what}, {} trials)", times.len());
        println!(
            "  median {median_ms:.2} ms, p95 {p95_ms:.2} ms, max {:.2} ms; {:.0}× under one beat at 120 BPM (500 ms); the recipe needs {RECIPE_SYMBOL_MS} ms for each single symbol",
            times.last().copied().unwrap_or(f64::NAN),
            500.0 / median_ms
        );
    }
    Ok(())
}

/// µs per token and per frame of the built-in chord model's generation (the plugin's path:
/// `ChordGenerator::next_frame`, up to 6 voices), medians over trials, each continuing a fresh
/// start primed with a C major triad.
fn chord_generation(args: &BenchArgs) -> Result<()> {
    let model = Arc::new(ChordModel::builtin()?);
    let settings = bench_settings();
    let frames_per_trial = (args.gen_symbols / 4).max(1);
    let (mut per_token, mut per_frame) = (Vec::new(), Vec::new());
    let triad = Frame::after(PitchSet::EMPTY, PitchSet::of(&[48, 52, 55, 60]));
    for trial in 0..=args.gen_trials {
        let mut generator = ChordGenerator::new(Arc::clone(&model), trial as u64)?;
        generator.feed_frame(triad)?;
        let t = Instant::now();
        let mut tokens = 0usize;
        for _ in 0..frames_per_trial {
            tokens += generator.next_frame(&settings, 6)?.sounding.len() + 1;
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if trial > 0 {
            per_token.push(us / tokens as f64);
            per_frame.push(us / frames_per_trial as f64);
        }
    }
    let c = &model.config;
    let format = match model.weight_format() {
        WeightFormat::F32 => "f32",
        WeightFormat::F16 => "f16",
        WeightFormat::I8 => "int8",
    };
    println!(
        "\nChord generation, one sequence, one thread (built-in chord model, {}×{}, {} tokens, {format} weights)",
        c.num_layers,
        c.hidden_size,
        c.vocab_len()
    );
    println!(
        "  {:.2} µs per token (LSTM step with its frame-context rows + output layer + sampling), {:.2} µs per frame of {} a quarter",
        median(&mut per_token),
        median(&mut per_frame),
        c.grid.steps_per_quarter
    );
    Ok(())
}

/// One training batch of `tokens` → loss, through a gradient step of AdamW. `fused_loss`: the
/// loss as training computes it (`train::loss`), else candle's own ops.
fn train_step(
    logits: &Tensor,
    targets: &Tensor,
    opt: &mut candle_nn::AdamW,
    fused_loss: bool,
) -> Result<f32> {
    let nll = match fused_loss {
        true => train::loss::nll(logits, targets)?,
        false => nll_and_argmax(logits, targets)?.0,
    };
    let loss = nll.mean_all()?;
    let grads = loss.backward()?;
    opt.step(&grads)?;
    Ok(loss.to_scalar::<f32>()?)
}

fn training(args: &BenchArgs) -> Result<()> {
    let vocab = recipe_vocab();
    let (batch, window, hidden) = (args.train_batch, args.train_window, args.train_hidden);
    let input = match args.train_embedding {
        0 => InputKind::OneHot,
        dim => InputKind::Embedding { dim },
    };
    let config = ModelConfig::new(vocab.clone(), input, hidden, args.train_layers, 0.0);
    let device = Device::Cpu;
    // Ours: the training model with its fused recurrence; stock: candle-nn's LSTM; same start.
    let ours_map = VarMap::new();
    let ours = MelodyLstm::new(&config, VarBuilder::from_varmap(&ours_map, DType::F32, &device))?;
    let stock_map = VarMap::new();
    let stock = StockModel::new(&ours, VarBuilder::from_varmap(&stock_map, DType::F32, &device))?;
    let vars = |m: &VarMap| -> Vec<Var> { m.all_vars() };
    let params = candle_nn::ParamsAdamW { lr: 1e-3, ..Default::default() };
    let mut ours_opt = candle_nn::AdamW::new(vars(&ours_map), params.clone())?;
    let mut stock_opt = candle_nn::AdamW::new(vars(&stock_map), params)?;

    let mut seed = 12345u64;
    let mut next_batch = || -> Result<(Tensor, Tensor)> {
        let mut ids = Vec::with_capacity(batch * (window + 1));
        for _ in 0..batch * (window + 1) {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ids.push(((seed >> 33) % vocab.len() as u64) as u32);
        }
        let all = Tensor::from_vec(ids, (batch, window + 1), &device)?;
        Ok((all.narrow(1, 0, window)?.contiguous()?, all.narrow(1, 1, window)?.contiguous()?))
    };
    let mut tf_sides = Vec::new();
    if let Some(python) = &args.tensorflow {
        let sizes = TfSizes::from_args(args, vocab.len());
        for every_position in [false, true] {
            tf_sides.push(TfStep::spawn(python, every_position, &sizes, false)?);
        }
    }
    let mut sides: Vec<Side> = ["ours", "stock"].iter().map(|name| Side::new(name)).collect();
    sides.extend(tf_sides.iter().map(|tf| Side::new(&tf.name)));
    for i in 0..=args.train_batches {
        let (inputs, targets) = next_batch()?;
        let keep = i > 0;

        let cpu = process_cpu_s(None);
        let t = Instant::now();
        let (logits, _) = ours.forward_time_major(&inputs.t()?.contiguous()?, None, None, None)?;
        let tm_targets = targets.t()?.contiguous()?.flatten_all()?;
        train_step(&logits.reshape(((), vocab.len()))?, &tm_targets, &mut ours_opt, true)?;
        sides[0].record(keep, t.elapsed().as_secs_f64() * 1e3, cpu, process_cpu_s(None));

        if !args.ours_only {
            let cpu = process_cpu_s(None);
            let t = Instant::now();
            let logits = stock.forward(&inputs)?;
            train_step(&logits, &targets.flatten_all()?, &mut stock_opt, false)?;
            sides[1].record(keep, t.elapsed().as_secs_f64() * 1e3, cpu, process_cpu_s(None));
        }
        for (tf, side) in tf_sides.iter_mut().zip(&mut sides[2..]) {
            let cpu = process_cpu_s(Some(tf.child.id()));
            let ms = tf.batch()?;
            side.record(keep, ms, cpu, process_cpu_s(Some(tf.child.id())));
        }
    }
    let steps = (batch * window) as f64;
    println!(
        "\nTraining step, {}, batch {batch} × {window} steps (forward, cross-entropy, backward, Adam(W)); medians of {} alternating batches",
        describe(&config),
        args.train_batches
    );
    println!(
        "{:<34} {:>9} {:>13} {:>13} {:>12}",
        "", "ms/batch", "LSTM steps/s", "CPU ms/batch", "ours faster"
    );
    let ours_ms = sides[0].median_ms();
    for side in &mut sides {
        if side.ms.is_empty() {
            continue;
        }
        let ms = side.median_ms();
        let cpu_ms = side.cpu_s * 1e3 / side.ms.len() as f64;
        println!(
            "{:<34} {:>9.1} {:>13.0} {:>13.0} {:>11.2}×",
            side.name,
            ms,
            steps / ms * 1e3,
            cpu_ms,
            ms / ours_ms
        );
    }
    println!("  ours and stock: every position a target; TensorFlow \"last symbol\": each window's last symbol only (as the recipe trains)");
    Ok(())
}

/// One contender's timings.
struct Side {
    name: String,
    ms: Vec<f64>,
    cpu_s: f64,
}

impl Side {
    fn new(name: &str) -> Self {
        let name = match name {
            "ours" => "ours (fused, every position)",
            "stock" => "candle-nn stock (every position)",
            other => other,
        };
        Self { name: name.to_string(), ms: Vec::new(), cpu_s: 0.0 }
    }

    /// Records one batch (unless it is the warm-up) and the CPU time it took, where known.
    fn record(&mut self, keep: bool, ms: f64, cpu_before: Option<f64>, cpu_after: Option<f64>) {
        if keep {
            self.ms.push(ms);
            if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
                self.cpu_s += b - a;
            }
        }
    }

    fn median_ms(&mut self) -> f64 {
        median(&mut self.ms)
    }
}

/// The sizes of TensorFlow's model and batches (`bench_tf.py`'s options).
struct TfSizes {
    vocab: usize,
    hidden: usize,
    layers: usize,
    /// The embedding's width; 0 for one-hot input.
    embedding: usize,
    batch: usize,
    window: usize,
}

impl TfSizes {
    /// The sizes `bench`'s training options ask for.
    fn from_args(args: &BenchArgs, vocab: usize) -> Self {
        Self {
            vocab,
            hidden: args.train_hidden,
            layers: args.train_layers,
            embedding: args.train_embedding,
            batch: args.train_batch,
            window: args.train_window,
        }
    }
}

/// The recipe's Keras model training in a Python subprocess (`bench_tf.py`), one batch per
/// request, so its batches interleave with ours.
struct TfStep {
    name: String,
    /// Where TensorFlow placed the model: "GPU" or "CPU".
    device: String,
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl TfStep {
    /// Starts the script for a model of `sizes`, training every position or each window's last
    /// symbol; on the CPU unless `may_use_gpu` (then TensorFlow's own choice).
    fn spawn(
        python: &std::path::Path,
        every_position: bool,
        sizes: &TfSizes,
        may_use_gpu: bool,
    ) -> Result<Self> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let log_path = std::env::temp_dir().join("antiphon-bench-tensorflow.log");
        let log =
            std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(python);
        cmd.arg("-c").arg(include_str!("bench_tf.py"));
        cmd.args(["--vocab", &sizes.vocab.to_string(), "--hidden", &sizes.hidden.to_string()]);
        cmd.args(["--batch", &sizes.batch.to_string(), "--window", &sizes.window.to_string()]);
        cmd.args(["--layers", &sizes.layers.to_string(), "--embedding", &sizes.embedding.to_string()]);
        if every_position {
            cmd.arg("--every-position");
        }
        if !may_use_gpu {
            // The same CPU as ours, even on a machine with a GPU.
            cmd.env("CUDA_VISIBLE_DEVICES", "-1");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let stdin = child.stdin.take().context("TensorFlow's stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("TensorFlow's stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).context("reading from TensorFlow")?;
        let ready = line.strip_prefix("ready ").map(str::split_whitespace).with_context(|| {
            format!("TensorFlow did not start (its messages are in {})", log_path.display())
        })?;
        let [version, device] = ready.collect::<Vec<_>>()[..] else {
            bail!("TensorFlow answered {line:?} where it names its version and device");
        };
        // The recipe's own model is one layer on one-hot input; other sizes are its recipe
        // scaled up.
        let is_recipe_model = sizes.layers == 1 && sizes.embedding == 0;
        let name = match (every_position, is_recipe_model) {
            (false, true) => format!("TensorFlow {version}, recipe (last symbol)"),
            (false, false) => format!("TensorFlow {version}, last symbol"),
            (true, _) => format!("TensorFlow {version}, every position"),
        };
        Ok(Self { name, device: device.to_string(), child, stdin, stdout })
    }

    /// Runs one batch; its milliseconds as TensorFlow measured them.
    fn batch(&mut self) -> Result<f64> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "1").context("writing to TensorFlow")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).context("reading from TensorFlow")?;
        line.trim().parse::<f64>().with_context(|| format!("TensorFlow answered {line:?}"))
    }
}

impl Drop for TfStep {
    fn drop(&mut self) {
        // End the script and wait for it, so no process is left behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cargo xtask bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cargo xtask bench on {} ({cores} logical cores)", cpu_model());
    println!(
        "{} CPU threads for candle and the fused LSTM; kernels for {}, int8 dot products: {}",
        candle_core::utils::barrier_pool().n_workers() + 1,
        Isa::detect().name(),
        match (int8::cpu_has_vnni(), int8::cpu_has_avx_vnni()) {
            (true, true) => "AVX-512 VNNI and AVX-VNNI",
            (true, false) => "AVX-512 VNNI",
            (false, true) => "AVX-VNNI",
            (false, false) => Int8Kernel::best_for(Isa::detect()).map_or("none", Int8Kernel::name),
        },
    );
    let products = crate::train::choose_products(args.f32_products);
    println!("training's recurrent products: {}", products.describe());
    if args.device != "cpu" {
        let device = model::select_device(&args.device)?;
        return device::run(&args, &device);
    }
    if !args.no_generation {
        generation(&args)?;
        chord_generation(&args)?;
    }
    if !args.no_training {
        training(&args)?;
    }
    if !args.no_latency {
        latency(&args)?;
    }
    Ok(())
}

/// The CPU's model name as the system gives it (`/proc/cpuinfo` on Linux).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| format!("an unnamed {} CPU", std::env::consts::ARCH))
}
