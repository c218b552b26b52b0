//! `cargo xtask memory`: gives a model a tune memory, its training songs indexed beside the
//! network (see `model::memory`), with the weights of the mixture fitted on held-out
//! songs.
//! Runs on: offline (a terminal).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use model::io::{CONFIG_FILE, TRAIN_FILE, WEIGHTS_FILE};
use model::memory::{fit_weights, FitSample, MemoryConfig, MemoryScore, TuneMemory, MAX_VOCAB};
use train::data::{build_dataset, read_set, ValidationStream};
use train::trainer::{
    nll_of, read_train_config, score_predictions, window_predictions, EvalConfig, EvalMetrics, TrainConfig,
};

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
    /// Where the network runs: cpu, cuda or metal (the last two need the build feature of that
    /// name).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The model directory.
    #[arg(long)]
    model: PathBuf,
    /// Training settings whose data to remember (a TrainConfig or a model's train.json;
    /// default: the model's own train.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The data sets whose held-out songs fit the weights, pooled: `NAME[,NAME...]` (default:
    /// the first with any).
    #[arg(long, value_name = "NAMES")]
    fit_on: Option<String>,
    /// Write a copy of the model with its memory here instead of into --model.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: MemoryArgs) -> Result<()> {
    let config_path = args.config.clone().unwrap_or_else(|| args.model.join(TRAIN_FILE));
    let cfg = read_train_config(&config_path)?;
    let out = args.out.as_ref().unwrap_or(&args.model);
    if out != &args.model {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        for file in [CONFIG_FILE, WEIGHTS_FILE, TRAIN_FILE, "loss.png"] {
            let from = args.model.join(file);
            if from.exists() {
                std::fs::copy(&from, out.join(file))
                    .with_context(|| format!("copying {} to {}", from.display(), out.display()))?;
            }
        }
    }
    remember(&args.model, &cfg, args.fit_on.as_deref(), out, &args.device)
}

/// Builds the tune memory of the model in `model_dir` from the training songs of `cfg`'s data,
/// fits its weights on the held-out songs of the sets `fit_on` names (`fit_sets`),
/// scores every held-out set with and without it, and writes it into `out`.
pub fn remember(
    model_dir: &Path,
    cfg: &TrainConfig,
    fit_on: Option<&str>,
    out: &Path,
    device: &str,
) -> Result<()> {
    let started = Instant::now();
    let model = crate::load_model(Some(model_dir), true, device)?;
    let mut data_cfg = cfg.data.clone();
    // The songs as the network saw them, each once, in its pitch range (which an unset range
    // in the settings derived from the same songs).
    data_cfg.oversample.clear();
    data_cfg.pitch_range = Some((model.config.lowest_pitch, model.config.highest_pitch));
    let sets = cfg.sets.iter().map(|set| (set.name.clone(), read_set(set, &data_cfg))).collect();
    let data = build_dataset(sets, &data_cfg).context("building the dataset")?;
    if data.vocab != model.config.vocab {
        bail!(
            "the data gives a vocabulary of {} symbols, the model in {} has {}",
            data.vocab.len(),
            model_dir.display(),
            model.config.vocab.len()
        );
    }
    let vocab_len = model.config.vocab_len();
    if vocab_len > MAX_VOCAB {
        bail!("a vocabulary of {vocab_len} symbols is more than a tune memory stores ({MAX_VOCAB})");
    }
    let stream: Vec<u8> = data.train_tokens.iter().map(|&t| t as u8).collect();
    let memory =
        TuneMemory::build(&stream, vocab_len, MemoryConfig::default()).map_err(anyhow::Error::msg)?;
    println!(
        "memory: {} symbols of training songs, indexed in {:.2} s",
        memory.len(),
        started.elapsed().as_secs_f64()
    );
    let fit_names = fit_sets(fit_on, &data.validation)?;

    // One pass of the network over every held-out set; the fit and both scores read it.
    let eval = EvalConfig { max_targets: None, ..cfg.eval.clone() };
    let mut predictions = Vec::new();
    for stream in &data.validation {
        let bar = crate::progress_bar(&stream.name, stream.tokens.len().saturating_sub(eval.context_len));
        let predicted = window_predictions(&model.lstm, &stream.tokens, &stream.bars, &eval, &mut |n| {
            bar.set_position(n as u64)
        })?;
        bar.finish_and_clear();
        predictions.push(predicted);
    }
    let mut samples: Vec<FitSample> = Vec::new();
    for (stream, (targets, rows)) in data.validation.iter().zip(&predictions) {
        if !fit_names.contains(&stream.name) {
            continue;
        }
        samples.extend(targets.iter().zip(rows).map(|(&idx, row)| {
            let target = stream.tokens[idx] as usize;
            let p_model = (-nll_of(row, target).0).exp();
            memory.fit_sample(&stream.tokens[idx - eval.context_len..idx], target, p_model)
        }));
    }
    let mut memory_cfg = memory.config().clone();
    memory_cfg.weights = fit_weights(&memory_cfg, &samples);
    let num_recalled = samples.iter().filter(|s| s.recalled.is_some()).count();
    memory_cfg.fitted_on = Some(format!(
        "{}: {} held-out targets, {num_recalled} of them with a match found at most {} times",
        fit_names.join(", "),
        samples.len(),
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
    let memory = memory.with_config(memory_cfg.clone()).map_err(anyhow::Error::msg)?;

    println!("held-out, every symbol from the {} before it:", eval.context_len);
    println!("{:>10} {:>8}  {:>16}  {:>16}  {:>16}", "set", "targets", "all", "song symbols", "onsets");
    for (stream, (targets, rows)) in data.validation.iter().zip(&predictions) {
        let score =
            |memory| score_predictions(&stream.tokens, targets, rows, &data.vocab, memory, eval.context_len);
        let (network, with_memory) = (score(None), score(Some(&memory)));
        print_row(&stream.name, "network", &network);
        print_row("", "+ memory", &with_memory);
        memory_cfg.scores.push(MemoryScore { set: stream.name.clone(), network, with_memory });
    }
    let memory = memory.with_config(memory_cfg).map_err(anyhow::Error::msg)?;
    memory.save(out)?;
    println!("wrote the memory into {} ({:.0} s)", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The held-out sets `fit_on` names (`NAME[,NAME...]`; by default the first set), each checked
/// to have held-out songs in `validation`.
pub fn fit_sets(fit_on: Option<&str>, validation: &[ValidationStream]) -> Result<Vec<String>> {
    let Some(list) = fit_on else {
        let first = validation.first().context("the data has no held-out songs to fit a memory on")?;
        return Ok(vec![first.name.clone()]);
    };
    let names: Vec<String> = list.split(',').map(|name| name.trim().to_string()).collect();
    for name in &names {
        if !validation.iter().any(|s| &s.name == name) {
            let known: Vec<&str> = validation.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "fitting the memory on {name}: no held-out songs of that name (there are: {})",
                known.join(", ")
            );
        }
    }
    Ok(names)
}

fn print_row(set: &str, what: &str, m: &EvalMetrics) {
    let cell = |s: &train::trainer::Score| format!("{:.4} / {:5.2} %", s.loss, 100.0 * s.accuracy);
    println!(
        "{set:>10} {:>8}  {:>16}  {:>16}  {:>16}  {what}",
        m.all.num_targets,
        cell(&m.all),
        cell(&m.song),
        cell(&m.non_hold)
    );
}
