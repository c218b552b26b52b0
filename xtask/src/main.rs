//! `cargo xtask`: bundling the plugin, and the offline tools that share its code.
//! Runs on: offline (a terminal).

use std::path::{Path, PathBuf};

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
    /// target/bundled/antiphon.clap and antiphon.vst3, the bundles to install. Without
    /// --release the bundles go to target/bundled-debug/ instead: debug bundles abort the host
    /// on an allocation on the audio thread and are for the tests only.
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
    keep_freed_memory();
    match cli.command {
        Command::Bundle { args } => bundle(args),
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

/// Tells the C allocator to keep the memory it is given back rather than return it to the
/// system. candle allocates a fresh output for every operation, megabytes at a time in
/// training, and by default glibc maps each large one anew and unmaps it when freed: the page
/// faults and TLB shootdowns of that cycle were a sixth of a recipe-size training step.
/// The tools run one job each and exit, so holding their peak is harmless.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's largest threshold (32 MiB on 64-bit): below it, blocks come from the heap.
        const MMAP_THRESHOLD: i32 = 32 << 20;
        // SAFETY: mallopt only changes the allocator's tuning; it is called before any thread
        // of this process is started.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Bundles built without --release, kept apart from the bundles to install.
const DEBUG_BUNDLES: &str = "bundled-debug";

/// Bundles the plugin; a debug build's bundles are moved from `bundled/` to `bundled-debug/`,
/// and release bundles already in `bundled/` are left as they were.
fn bundle(args: Vec<String>) -> Result<()> {
    let is_release = args.iter().any(|a| a == "--release" || a.starts_with("--profile"));
    let bundler_args = std::iter::once("bundle".to_string()).chain(args);
    if is_release {
        return nice_plug_xtask::main_with_args("cargo xtask", bundler_args);
    }
    nice_plug_xtask::chdir_workspace_root()?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let (release_dir, debug_dir) = (target.join("bundled"), target.join(DEBUG_BUNDLES));
    let names = ["antiphon.clap", "antiphon.vst3"];
    // The bundler writes into `bundled/`: the release bundles wait beside it meanwhile.
    let parked = target.join("bundled-release-parked");
    let _ = std::fs::remove_dir_all(&parked);
    std::fs::create_dir_all(&parked)?;
    for name in names {
        if release_dir.join(name).exists() {
            std::fs::rename(release_dir.join(name), parked.join(name))?;
        }
    }
    let bundled = nice_plug_xtask::main_with_args("cargo xtask", bundler_args);
    std::fs::create_dir_all(&debug_dir)?;
    for name in names {
        let (built, debug) = (release_dir.join(name), debug_dir.join(name));
        if built.exists() {
            let _ = std::fs::remove_dir_all(&debug);
            let _ = std::fs::remove_file(&debug);
            std::fs::rename(&built, &debug)?;
        }
        if parked.join(name).exists() {
            std::fs::rename(parked.join(name), release_dir.join(name))?;
        }
    }
    let _ = std::fs::remove_dir_all(&parked);
    bundled?;
    eprintln!("Debug bundles (for the tests, not for a DAW) are in '{}'", debug_dir.display());
    Ok(())
}

/// The model in `dir`, or the built-in one, on the device named `device` (`cpu`, `cuda`,
/// `metal`); without its tune memory unless `with_memory`.
pub(crate) fn load_model(dir: Option<&Path>, with_memory: bool, device: &str) -> Result<LoadedModel> {
    let device = model::select_device(device)?;
    let model = match dir {
        Some(dir) => LoadedModel::load_dir_on(dir, &device)
            .with_context(|| format!("loading the model in {}", dir.display()))?,
        None => LoadedModel::load_on(&model::io::ModelSource::Builtin, &device)
            .context("loading the built-in model")?,
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
