//! `cargo xtask quantize`: puts a model's LSTM weights on int8 grids, so the generation step
//! streams a quarter of the bytes (see `model::int8`), and with `--every-matrix` its other
//! matrices too, for a smaller file.
//! Runs on: offline (a terminal).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use model::chords::{is_chord_config, ChordModel};
use model::fast::{FastLstm, PackSource, WeightFormat};
use model::int8;
use model::io::{save_model, CONFIG_FILE, TRAIN_FILE};
use model::memory::{MEMORY_CONFIG_FILE, MEMORY_FILE};
use model::LoadedModel;

/// Put a model's LSTM weights on int8 grids, for a generation step four times lighter (a
/// melody or a chord model).
///
/// Every row of the recurrent matrices, and of the input matrices above the first layer,
/// becomes integers from -127 to 127 times a power of two. The file stores those rows as int8
/// with each row's exponent (a quarter of the bytes); every reader turns them back into the
/// same f32 values, so training, eval and every device read the model as before. On x86 CPUs
/// with AVX2 the plugin's step recognises the grid and runs 2-3× faster. `--every-matrix` puts
/// the model's other matrices on grids too, which only makes the file smaller.
/// Measure what the rounding costs with `cargo xtask eval` on both models.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The model directory to read.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the quantised model (config.json, model.safetensors, and train.json,
    /// loss.png and the tune memory when the model has them).
    #[arg(long)]
    out: PathBuf,
    /// Also put every other weight matrix on an int8 grid (the token, side-input and output
    /// tables, which the step reads as f32 rows): the same speed, a file about 40 % the size.
    /// The built-in models are quantised so, to keep the bundles small.
    #[arg(long)]
    every_matrix: bool,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if args.out == args.model {
        bail!("--out must differ from --model: the original is kept for comparison");
    }
    let scope = if args.every_matrix { int8::GridScope::EveryMatrix } else { int8::GridScope::StepMatrices };
    let is_chords = std::fs::read(args.model.join(CONFIG_FILE)).is_ok_and(|bytes| is_chord_config(&bytes));
    let (named, largest_change, fast) = if is_chords {
        let model =
            ChordModel::load_dir(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
        let (lstm, largest_change) = model.lstm.quantized(scope)?;
        ChordModel::save(&args.out, &lstm).with_context(|| format!("writing {}", args.out.display()))?;
        (PackSource::named_tensors(&lstm), largest_change, FastLstm::for_model(&lstm)?)
    } else {
        let model = LoadedModel::load_dir(&args.model)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let (lstm, largest_change) = int8::quantize_model(&model.lstm, &model.config, scope)?;
        save_model(&args.out, &model.config, &lstm)
            .with_context(|| format!("writing {}", args.out.display()))?;
        (lstm.named_tensors(), largest_change, FastLstm::for_model(&lstm)?)
    };
    for extra in [TRAIN_FILE, "loss.png", MEMORY_FILE, MEMORY_CONFIG_FILE] {
        let from = args.model.join(extra);
        if from.exists() {
            std::fs::copy(&from, args.out.join(extra))
                .with_context(|| format!("copying {} to {}", from.display(), args.out.display()))?;
        }
    }
    let grid_weights: usize = named
        .iter()
        .filter(|(_, t)| int8::grid_integers(t).is_ok_and(|grid| grid.is_some()))
        .map(|(_, t)| t.elem_count())
        .sum();
    println!(
        "{} → {}: {grid_weights} weights on int8 grids, each moved by at most {largest_change:.3e}",
        args.model.display(),
        args.out.display()
    );
    match fast {
        Some(fast) if fast.format() == WeightFormat::I8 => {
            println!("On this CPU the generation step runs it on int8 weights.")
        }
        _ => println!("No integer kernel runs on this CPU (they need x86 with AVX2): its step reads f32 or f16 weights."),
    }
    Ok(())
}
