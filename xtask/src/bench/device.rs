//! `cargo xtask bench --device cuda` (or `metal`): the GPU against the CPU in one run, for the
//! built-in model's size and a model with 4× its weights: generation per symbol at batch 1 (the
//! plugin's case) and batch 8, training steps per second, and the device Auto would pick.
//! Runs on: offline (a terminal).
//!
//! GPU work is queued, so every timed piece ends by waiting for the device
//! (`Device::synchronize`), and every figure is a median over trials after an untimed one.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use model::compute::device_name;
use model::io::ModelSource;
use model::lstm::LstmState;
use model::{InputKind, LoadedModel, MelodyLstm, ModelConfig};
use music::TokenId;
use train::SequenceForward;

use super::{median, train_step, BenchArgs, TfSizes, TfStep};

/// Sequences stepped at once in the batched generation figure (Try Again and variations could
/// write this many answers together).
const GEN_BATCH: usize = 8;

/// One model size: its config, and how the table names it.
struct Size {
    name: String,
    config: ModelConfig,
}

/// The built-in model's size, and the same with twice its hidden width (4× the recurrent
/// weights).
fn sizes() -> Result<Vec<Size>> {
    let builtin = model::io::read_model_config(&ModelSource::Builtin)?;
    let wide = ModelConfig::new(
        builtin.vocab.clone(),
        builtin.input,
        2 * builtin.hidden_size,
        builtin.num_layers,
        0.0,
    );
    let name = |c: &ModelConfig| format!("LSTM {}×{}", c.hidden_size, c.num_layers);
    Ok(vec![
        Size { name: format!("built-in size, {}", name(&builtin)), config: builtin.clone() },
        Size { name: format!("4× weights, {}", name(&wide)), config: wide },
    ])
}

/// A model of `config` with seeded weights on `device`, fixed (for generation).
fn fixed_model(config: &ModelConfig, device: &Device) -> Result<LoadedModel> {
    let tensors = MelodyLstm::initial_tensors(config, 7, device)?;
    let lstm = MelodyLstm::new(config, VarBuilder::from_tensors(tensors, DType::F32, device))?;
    Ok(LoadedModel::new(config.clone(), lstm, "bench")?)
}

/// How a timed one-sequence step runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OneStep {
    /// The model's own step (`LoadedModel::step`, what the plugin's worker runs): the int8 or
    /// f32 kernels on the CPU, a kernel a layer on a CUDA GPU, candle's graph on Metal.
    Own,
    /// candle's graph of small ops (what a GPU ran before it had its step).
    Graph,
}

/// µs a symbol of a one-sequence generation step run `how`.
fn step_micros(model: &LoadedModel, how: OneStep, symbols: usize, trials: usize) -> Result<f64> {
    let graph_weights = model.lstm.step_weights()?.without_fast_step();
    let mut logits = vec![0.0f32; model.config.vocab.len()];
    let mut per_trial = Vec::with_capacity(trials);
    for trial in 0..=trials {
        let mut state = model.new_state();
        let start = Instant::now();
        for idx in 0..symbols {
            let token = TokenId((idx % model.config.vocab.len()) as u16);
            match how {
                OneStep::Own => model.step(token, &mut state, &mut logits)?,
                OneStep::Graph => model.lstm.step(&graph_weights, token, &[], &mut state, &mut logits)?,
            }
        }
        if trial > 0 {
            per_trial.push(start.elapsed().as_secs_f64() * 1e6 / symbols as f64);
        }
    }
    Ok(median(&mut per_trial))
}

/// µs a symbol of the batched generation step (`MelodyLstm::step_batch`: the state stays on
/// the device, only the logits come back for sampling) over `batch` sequences at once.
fn batched_micros(model: &LoadedModel, batch: usize, symbols: usize, trials: usize) -> Result<f64> {
    let device = model.lstm.device().clone();
    let weights = model.lstm.step_weights()?;
    let vocab_len = model.config.vocab.len();
    let mut per_trial = Vec::with_capacity(trials);
    for trial in 0..=trials {
        let mut state: LstmState = model.lstm.zero_state(batch)?;
        let start = Instant::now();
        for idx in 0..symbols {
            let ids: Vec<u32> = (0..batch).map(|b| ((idx + b) % vocab_len) as u32).collect();
            let tokens = Tensor::from_vec(ids, batch, &device)?;
            let logits = model.lstm.step_batch(&weights, &tokens, &mut state)?;
            // The sampler reads the logits on the CPU.
            logits.to_device(&Device::Cpu)?;
        }
        device.synchronize()?;
        if trial > 0 {
            per_trial.push(start.elapsed().as_secs_f64() * 1e6 / (symbols * batch) as f64);
        }
    }
    Ok(median(&mut per_trial))
}

/// How a timed training batch runs the LSTM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recurrence {
    /// One op a layer: `train::fused` on the CPU, `gpu_recurrence` on a GPU (what `train` runs).
    Fused,
    /// The network's own graph, step by step (what a GPU ran before it had its op).
    PerStep,
}

/// Median ms of a training batch (forward over every position, cross-entropy, backward,
/// AdamW) of a model of `config` on `device`.
fn training_ms(
    config: &ModelConfig,
    device: &Device,
    recurrence: Recurrence,
    args: &BenchArgs,
) -> Result<f64> {
    let (batch, window) = (args.train_batch, args.train_window);
    let vars = VarMap::new();
    let lstm = MelodyLstm::new(config, VarBuilder::from_varmap(&vars, DType::F32, device))?;
    let params = candle_nn::ParamsAdamW { lr: 1e-3, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(vars.all_vars(), params)?;
    let vocab_len = config.vocab.len() as u64;
    let mut seed = 12345u64;
    let mut ms = Vec::with_capacity(args.train_batches);
    for idx in 0..=args.train_batches {
        let ids: Vec<u32> = (0..batch * (window + 1))
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) % vocab_len) as u32
            })
            .collect();
        let all = Tensor::from_vec(ids, (window + 1, batch), device)?;
        let (inputs, targets) = (all.narrow(0, 0, window)?, all.narrow(0, 1, window)?);
        let start = Instant::now();
        let inputs = inputs.contiguous()?;
        let (logits, _) = match recurrence {
            Recurrence::Fused => lstm.forward_time_major(&inputs, None, None, None)?,
            Recurrence::PerStep => lstm.graph_forward_time_major(&inputs, None, None, None)?,
        };
        train_step(
            &logits.reshape(((), config.vocab.len()))?,
            &targets.contiguous()?.flatten_all()?,
            &mut opt,
            true,
        )?;
        device.synchronize()?;
        if idx > 0 {
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&mut ms))
}

/// Median ms of a training batch of TensorFlow's recipe scaled to `config` (every position a
/// target, as ours), run by `python` with the GPU visible, and the device TensorFlow chose.
fn tensorflow_ms(python: &std::path::Path, config: &ModelConfig, args: &BenchArgs) -> Result<(f64, String)> {
    let sizes = TfSizes {
        vocab: config.vocab.len(),
        hidden: config.hidden_size,
        layers: config.num_layers,
        embedding: match config.input {
            InputKind::Embedding { dim } => dim,
            InputKind::OneHot => 0,
        },
        batch: args.train_batch,
        window: args.train_window,
    };
    let mut tf = TfStep::spawn(python, true, &sizes, true)?;
    let mut ms = Vec::with_capacity(args.train_batches);
    for idx in 0..=args.train_batches {
        let batch_ms = tf.batch()?;
        if idx > 0 {
            ms.push(batch_ms);
        }
    }
    Ok((median(&mut ms), tf.device.clone()))
}

/// Runs the comparison on `device` (a GPU) against the CPU.
pub fn run(args: &BenchArgs, device: &Device) -> Result<()> {
    let gpu = device_name(device);
    let (symbols, trials) = (args.gen_symbols, args.gen_trials);
    println!("\n{gpu} against the CPU, one run; medians of {trials} trials of {symbols} symbols");
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "generation, µs a symbol",
        "GPU batch 1",
        "GPU graph",
        "CPU batch 1",
        "GPU batch 8",
        "CPU batch 8",
        "Auto"
    );
    let sizes = sizes()?;
    for size in &sizes {
        let on_gpu =
            fixed_model(&size.config, device).with_context(|| format!("{} on the {gpu}", size.name))?;
        let on_cpu = fixed_model(&size.config, &Device::Cpu)?;
        let gpu_1 = step_micros(&on_gpu, OneStep::Own, symbols, trials)?;
        let gpu_graph_1 = step_micros(&on_gpu, OneStep::Graph, symbols, trials)?;
        let cpu_1 = step_micros(&on_cpu, OneStep::Own, symbols, trials)?;
        let gpu_8 = batched_micros(&on_gpu, GEN_BATCH, symbols / GEN_BATCH + 1, trials)?;
        let cpu_8 = batched_micros(&on_cpu, GEN_BATCH, symbols / GEN_BATCH + 1, trials)?;
        // Auto's rule (`compute::place`): the GPU only where its step is faster.
        let auto = if gpu_1 < cpu_1 { "GPU" } else { "CPU" };
        println!(
            "{:<30} {gpu_1:>12.1} {gpu_graph_1:>12.1} {cpu_1:>12.1} {gpu_8:>12.1} {cpu_8:>12.1} {auto:>8}",
            size.name
        );
    }
    println!("  batch 1: the model's own step, as the plugin runs it (on the CPU its int8 or f32 kernels, on a CUDA");
    println!("  GPU a kernel a layer); GPU graph: candle's graph of small ops a step instead; batch 8: the batched");
    println!("  step over 8 sequences (candle's ops), per symbol. Auto: the device the plugin's Auto keeps.");

    let (batch, window) = (args.train_batch, args.train_window);
    println!("\ntraining, batch {batch} × {window} steps, medians of {} batches", args.train_batches);
    println!(
        "{:<30} {:>14} {:>14} {:>14} {:>10} {:>12}",
        "LSTM steps/s", "GPU, one op", "GPU, per step", "CPU", "GPU/CPU", "TensorFlow"
    );
    let mut tensorflow_devices = Vec::new();
    for size in &sizes {
        let gpu_ms = training_ms(&size.config, device, Recurrence::Fused, args)?;
        let gpu_graph_ms = training_ms(&size.config, device, Recurrence::PerStep, args)?;
        let cpu_ms = training_ms(&size.config, &Device::Cpu, Recurrence::Fused, args)?;
        let per_s = |ms: f64| (batch * window) as f64 / ms * 1e3;
        let tensorflow = match &args.tensorflow {
            Some(python) => {
                let (ms, on) = tensorflow_ms(python, &size.config, args)?;
                tensorflow_devices.push(on);
                format!("{:.0}", per_s(ms))
            }
            None => "-".to_string(),
        };
        println!(
            "{:<30} {:>14.0} {:>14.0} {:>14.0} {:>9.2}× {tensorflow:>12}",
            size.name,
            per_s(gpu_ms),
            per_s(gpu_graph_ms),
            per_s(cpu_ms),
            cpu_ms / gpu_ms
        );
    }
    println!("  one op: each LSTM layer's recurrence as one op (the CPU's fused op; on the GPU a cuBLAS product and a");
    println!("  cell kernel a step); per step: candle's graph of small ops a step. Both batch the input projection.");
    println!("  GPU/CPU: the one-op rates. `train` runs the one-op form on either device.");
    match tensorflow_devices.first() {
        Some(on) => println!("  TensorFlow: the recipe's Keras model at these sizes, every position a target, on its {on}."),
        None => println!("  TensorFlow: not timed (give --tensorflow PYTHON to time the recipe's Keras model on the same GPU)."),
    }
    if device.is_metal() {
        println!("  Metal has no LSTM op or step of its own: its GPU columns run candle's graph, batch 1 and training.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn the_comparison_runs_through_with_the_cpu_standing_in_for_the_gpu() {
        let cli = Cli::parse_from([
            "bench",
            "--gen-symbols",
            "16",
            "--gen-trials",
            "1",
            "--train-batches",
            "1",
            "--train-batch",
            "2",
            "--train-window",
            "4",
        ]);
        run(&cli.bench, &Device::Cpu).unwrap();
        let on_cpu = fixed_model(&sizes().unwrap()[0].config, &Device::Cpu).unwrap();
        assert!(step_micros(&on_cpu, OneStep::Own, 8, 1).unwrap() > 0.0);
        assert!(step_micros(&on_cpu, OneStep::Graph, 8, 1).unwrap() > 0.0);
        assert!(batched_micros(&on_cpu, GEN_BATCH, 2, 1).unwrap() > 0.0);
    }
}
