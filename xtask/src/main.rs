//! `cargo xtask`: bundling the plugin, and the offline tools that share its code.
//! Runs on: offline (a terminal).

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use model::LoadedModel;

mod bench;
mod chords;
mod corpus;
mod eval;
mod generate;
mod memory;
mod quantize;
mod train;

/// Antiphon's offline tools.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and bundle the plugin: `cargo xtask bundle antiphon --release` writes
    /// target/bundled/antiphon.clap and antiphon.vst3.
    #[command(disable_help_flag = true)]
    Bundle {
        /// Passed on to the bundler (package name, --release, cargo flags).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Read the Erk tunes from ABC and from abc2midi's MIDI files and compare their encodings.
    CorpusCheck(corpus::CheckArgs),
    /// Report tunes read, kept, dropped by reason, symbols and the vocabulary of folders of songs.
    CorpusStats(corpus::StatsArgs),
    /// Train a melody model on folders of .abc and .mid files, or a chord model (--kind chords).
    Train(Box<train::TrainArgs>),
    /// Continue a primer melody with a model and write MIDI.
    Generate(generate::GenerateArgs),
    /// Time generation and training, ours against candle-nn's stock LSTM.
    Bench(bench::BenchArgs),
    // The help text is `EvalArgs`'s doc comment, long form included.
    Eval(eval::EvalArgs),
    /// Put a model's LSTM weights on int8 grids, for a generation step four times lighter.
    Quantize(quantize::QuantizeArgs),
    // The help text is `MemoryArgs`'s doc comment, long form included.
    Memory(memory::MemoryArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bundle { args } => {
            let args = std::iter::once("bundle".to_string()).chain(args);
            nice_plug_xtask::main_with_args("cargo xtask", args)
        }
        Command::CorpusCheck(args) => corpus::check(args),
        Command::CorpusStats(args) => corpus::stats(args),
        Command::Train(args) => train::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Memory(args) => memory::run(args),
    }
}

/// The model in `dir`, or the built-in one; without its tune memory unless `with_memory`.
pub(crate) fn load_model(dir: Option<&Path>, with_memory: bool) -> Result<LoadedModel> {
    let model = match dir {
        Some(dir) => {
            LoadedModel::load_dir(dir).with_context(|| format!("loading the model in {}", dir.display()))?
        }
        None => LoadedModel::builtin().context("loading the built-in model")?,
    };
    Ok(if with_memory { model } else { model.with_memory(None) })
}

/// A progress bar of `total` steps labelled `prefix`, as `eval` and `memory` draw them.
pub(crate) fn progress_bar(prefix: &str, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>13} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}
