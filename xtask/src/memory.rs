//! `cargo xtask memory`: gives a model a tune memory, its training songs indexed beside the
//! network (see `antiphon::model::memory`), with the weights of the mixture fitted on held-out
//! songs.
//! Runs on: offline (a terminal).

use std::path::PathBuf;
use std::time::Instant;

use antiphon::model::data::{build_dataset, read_set};
use antiphon::model::io::{CONFIG_FILE, TRAIN_FILE, WEIGHTS_FILE};
use antiphon::model::memory::{fit_weights, MemoryConfig, MemoryScore, TuneMemory, MAX_VOCAB};
use antiphon::model::train::{
    evaluate, evaluate_with_memory, memory_fit_samples, read_train_config, EvalConfig, EvalMetrics,
};
use antiphon::model::LoadedModel;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// Give a model a tune memory: the songs it was trained on, indexed, so that where a phrase
/// continues a passage of one of them the model leans toward what followed there.
///
/// Reads the training data the model's train.json names (or --config's), builds the memory
/// from its training songs (each once), and fits how much to trust it, by the length and
/// count of each match, on one set's held-out songs (--fit-on). Then scores every held-out set
/// with and without it, the recipe's way (every symbol predicted from the 64 before it), and
/// writes memory.bin and memory.json into the model directory (or a copy of the model at
/// --out). Example, the built-in model, fitted on the Essen songs so the Erk benchmark stays
/// unseen:
///
///   cargo xtask memory --model presets/models/default --fit-on essen
#[derive(clap::Args)]
pub struct MemoryArgs {
    /// The model directory.
    #[arg(long)]
    model: PathBuf,
    /// Training settings whose data to remember (a TrainConfig or a model's train.json;
    /// default: the model's own train.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The data set whose held-out songs fit the weights (default: the first with any).
    #[arg(long)]
    fit_on: Option<String>,
    /// Write a copy of the model with its memory here instead of into --model.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: MemoryArgs) -> Result<()> {
    let started = Instant::now();
    let model_dir = &args.model;
    let model =
        LoadedModel::load_dir(model_dir).with_context(|| format!("loading {}", model_dir.display()))?;
    let config_path = args.config.clone().unwrap_or_else(|| model_dir.join(TRAIN_FILE));
    let mut cfg = read_train_config(&config_path)?;
    // The songs as the network saw them, each once, in its pitch range (which an unset range
    // in the settings derived from the same songs).
    cfg.data.oversample.clear();
    cfg.data.pitch_range = Some((model.config.lowest_pitch, model.config.highest_pitch));
    let sets = cfg.sets.iter().map(|set| (set.name.clone(), read_set(set, &cfg.data))).collect();
    let data = build_dataset(sets, &cfg.data).context("building the dataset")?;
    if data.vocab != model.config.vocab {
        bail!(
            "{}: the data gives a vocabulary of {} symbols, the model has {}",
            config_path.display(),
            data.vocab.len(),
            model.config.vocab.len()
        );
    }
    let vocab_len = model.config.vocab_len();
    if vocab_len > MAX_VOCAB {
        bail!("a vocabulary of {vocab_len} symbols is more than a tune memory stores ({MAX_VOCAB})");
    }
    let stream: Vec<u8> = data.train_tokens.iter().map(|&t| t as u8).collect();
    let memory = TuneMemory::build(stream, vocab_len, MemoryConfig::default()).map_err(anyhow::Error::msg)?;
    println!(
        "memory: {} symbols of training songs, indexed in {:.2} s",
        memory.len(),
        started.elapsed().as_secs_f64()
    );

    let eval = EvalConfig { max_targets: None, ..cfg.eval.clone() };
    let fit_stream = match &args.fit_on {
        Some(name) => data.validation.iter().find(|s| &s.name == name).with_context(|| {
            let names: Vec<&str> = data.validation.iter().map(|s| s.name.as_str()).collect();
            format!("--fit-on {name}: no held-out songs of that name (there are: {})", names.join(", "))
        })?,
        None => data.validation.first().context("the data has no held-out songs to fit on")?,
    };
    let bar = progress_bar(&format!("fit {}", fit_stream.name), fit_stream.tokens.len() - eval.context_len);
    let samples =
        memory_fit_samples(&model.lstm, &memory, &fit_stream.tokens, &fit_stream.bars, &eval, &mut |n| {
            bar.set_position(n as u64)
        })?;
    bar.finish_and_clear();
    let mut memory_cfg = memory.config().clone();
    memory_cfg.weights = fit_weights(&memory_cfg, &samples);
    let num_recalled = samples.iter().filter(|s| s.recalled.is_some()).count();
    memory_cfg.fitted_on = Some(format!(
        "{}: {} held-out targets, {} of them with a match found at most {} times",
        fit_stream.name,
        samples.len(),
        num_recalled,
        memory_cfg.max_count
    ));
    println!("fitted on {}", memory_cfg.fitted_on.as_deref().unwrap_or_default());
    println!(
        "weights (rows: matches found once, 2-4 times, 5 or more; columns: match lengths from 1, {:?}):",
        memory_cfg.length_edges
    );
    for row in &memory_cfg.weights {
        println!("  {}", row.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join(" "));
    }
    let mut memory = memory.with_config(memory_cfg.clone()).map_err(anyhow::Error::msg)?;

    println!("held-out, every symbol from the {} before it:", eval.context_len);
    println!("{:>10} {:>8}  {:>16}  {:>16}  {:>16}", "set", "targets", "all", "song symbols", "onsets");
    for stream in &data.validation {
        let total = stream.tokens.len() - eval.context_len;
        let bar = progress_bar(&stream.name, 2 * total);
        let network = evaluate(&model.lstm, &stream.tokens, &stream.bars, &data.vocab, &eval, &mut |n| {
            bar.set_position(n as u64)
        })?;
        let with_memory = evaluate_with_memory(
            &model.lstm,
            Some(&memory),
            &stream.tokens,
            &stream.bars,
            &data.vocab,
            &eval,
            &mut |n| bar.set_position((total + n) as u64),
        )?;
        bar.finish_and_clear();
        print_row(&stream.name, "network", &network);
        print_row("", "+ memory", &with_memory);
        memory_cfg.scores.push(MemoryScore { set: stream.name.clone(), network, with_memory });
    }
    memory = memory.with_config(memory_cfg).map_err(anyhow::Error::msg)?;

    let out = args.out.as_ref().unwrap_or(model_dir);
    if out != model_dir {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        for file in [CONFIG_FILE, WEIGHTS_FILE, TRAIN_FILE, "loss.png"] {
            let from = model_dir.join(file);
            if from.exists() {
                std::fs::copy(&from, out.join(file))
                    .with_context(|| format!("copying {} to {}", from.display(), out.display()))?;
            }
        }
    }
    memory.save(out)?;
    println!("wrote {} ({:.0} s)", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn print_row(set: &str, what: &str, m: &EvalMetrics) {
    let cell = |s: &antiphon::model::train::Score| format!("{:.4} / {:5.2} %", s.loss, 100.0 * s.accuracy);
    println!(
        "{set:>10} {:>8}  {:>16}  {:>16}  {:>16}  {what}",
        m.all.num_targets,
        cell(&m.all),
        cell(&m.song),
        cell(&m.non_hold)
    );
}

fn progress_bar(prefix: &str, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>13} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}
