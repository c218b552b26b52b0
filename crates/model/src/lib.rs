//! The melody model of the main recipe: an LSTM language model over the step encoding's
//! symbols (`music::encode`): the network, its fast and int8 generation steps, sampling,
//! streaming generation, the tune memory's recall, and the model directory on disk. Training
//! lives in the `antiphon-train` crate, which only the offline tools link.
//! Runs on: the worker thread (loading, generation) and offline threads (xtask, tests). Calls
//! candle and allocates, so never on the audio thread; Cargo keeps nice-plug out of it.
//!
//! The tokens are the music core's `Symbol`s, numbered by the model's `Vocab` (saved in
//! `config.json`):
//!
//! | symbol | text | meaning |
//! |--------|------|---------|
//! | `Symbol::Pitch(p)` | `60` | a note of MIDI pitch `p` starts on this step |
//! | `Symbol::Rest` | `r` | a rest starts on this step |
//! | `Symbol::Hold` | `_` | the sounding note or rest goes on for another step |
//! | `Symbol::Delimiter` | `/` | between songs; generation stops here |
//!
//! A trained model is a directory (`io`): `model.safetensors`, `config.json`, `train.json`, and
//! optionally its tune memory (`memory`): `memory.bin` and `memory.json`.
//!
//! The worker continues a phrase like this: one `PhraseContinuation` per phrase, built from a
//! shared model, advanced one step at a time with settings that may change between steps.
//! ```no_run
//! use std::sync::Arc;
//! use antiphon_model::{LoadedModel, PhraseContinuation, SamplingSettings};
//! use music::{Melody, Note};
//!
//! let model = Arc::new(LoadedModel::builtin()?);
//! // The captured phrase, times from its first bar line; it ends where the answer starts.
//! let mut primer = Melody::from_notes(vec![Note::new(60, 0.0, 1.0), Note::new(64, 1.0, 1.0)]);
//! primer.end_beats = 4.0;
//! let mut phrase = PhraseContinuation::start(Arc::clone(&model), &primer, 64, 7)?;
//! let settings = SamplingSettings { temperature: 0.9, may_end: false, ..Default::default() };
//! while let Some(_symbol) = phrase.next_symbol(&settings)? {
//!     // Notes in `phrase.finished_notes()` are final (times from `phrase.start_beats()`).
//! }
//! # Ok::<(), antiphon_model::ModelError>(())
//! ```

mod byte_planes;
pub mod chords;
pub mod compute;
pub mod config;
pub mod fast;
pub mod generate;
// Its step runs only on CUDA; the tests run its plan on the CPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod gpu_step;
pub mod huge_pages;
pub mod int8;
pub mod io;
pub mod kernels;
pub mod lstm;
pub mod memory;
pub mod metrics;
pub mod sample;
pub mod side;

pub use chords::{ChordConfig, ChordGenerator, ChordLstm, ChordModel};
pub use config::{ConfigError, InputKind, ModelConfig, Transposition};
pub use generate::{continue_melody, Generator, PhraseContinuation};
pub use io::LoadedModel;
pub use lstm::{GenState, MelodyLstm};
pub use music::{PitchClassSet, PitchRules};
pub use sample::{Sampler, SamplingSettings};

pub use candle_core::Device;

/// The device called `cpu`, `cuda` (the first GPU) or `metal`. The GPU ones need the crate
/// feature of the same name.
pub fn select_device(name: &str) -> Result<Device, ModelError> {
    let unavailable =
        |e: candle_core::Error| ModelError::Device { name: name.to_string(), reason: candle_message(&e) };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(0).map_err(unavailable),
        "metal" if cfg!(feature = "metal") => Device::new_metal(0).map_err(unavailable),
        "cuda" | "metal" => Err(ModelError::Device {
            name: name.to_string(),
            reason: format!("this build lacks the '{name}' feature (build with --features {name})"),
        }),
        _ => Err(ModelError::Device {
            name: name.to_string(),
            reason: "expected cpu, cuda or metal".to_string(),
        }),
    }
}

/// Everything that can go wrong loading, running or training a model. Each variant carries the
/// file and the offending values.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model directory is not there.
    #[error("{path}: missing (a model directory holds model.safetensors, config.json and train.json)")]
    MissingFile { path: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// `config.json` is not valid JSON for a `ModelConfig`.
    #[error("{path}: not a model config: {source}")]
    ConfigParse { path: String, source: serde_json::Error },
    /// A training settings file is not valid JSON for a `TrainConfig`.
    #[error("{path}: not training settings (a TrainConfig, or a model's train.json): {source}")]
    TrainConfigParse { path: String, source: serde_json::Error },
    /// `config.json` parsed but describes no usable model.
    #[error("{path}: {problem}")]
    InvalidConfig { path: String, problem: ConfigError },
    /// The weights file ends before the data its header announces.
    #[error("{path}: truncated: {got_bytes} bytes, the header announces {expected_bytes}")]
    Truncated { path: String, expected_bytes: u64, got_bytes: u64 },
    /// The weights file is not readable safetensors for another reason.
    #[error("{path}: not a readable safetensors file: {reason}")]
    CorruptWeights { path: String, reason: String },
    /// A tensor the config needs is not in the weights.
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: String, name: String },
    /// The weights hold a tensor the config does not describe.
    #[error("{path}: tensor '{name}' is not part of this model (config and weights disagree)")]
    UnexpectedTensor { path: String, name: String },
    /// A tensor has the wrong shape for the config's sizes.
    #[error("{path}: tensor '{name}' has shape {got:?}, the config needs {expected:?}")]
    ShapeMismatch { path: String, name: String, expected: Vec<usize>, got: Vec<usize> },
    /// The weights were trained on a vocabulary of another size than `config.json` lists.
    #[error(
        "{path}: tensor '{name}' is for {weights_len} symbols but the config's vocabulary has {config_len}"
    )]
    VocabMismatch { path: String, name: String, config_len: usize, weights_len: usize },
    /// A tensor holds NaN or infinite values.
    #[error("{path}: tensor '{name}' has {num_bad} non-finite values (NaN or infinity)")]
    NonFinite { path: String, name: String, num_bad: usize },
    /// A tensor is stored in a type we do not read.
    #[error("{path}: tensor '{name}' is {dtype}; only f32, f16 and bf16 are read")]
    UnsupportedDtype { path: String, name: String, dtype: String },
    /// A primer could not be encoded for the model.
    #[error("primer: {0}")]
    Primer(#[from] music::encode::Reject),
    /// A symbol outside the model's vocabulary.
    #[error(transparent)]
    UnknownSymbol(#[from] music::vocab::UnknownSymbol),
    /// The training data gave nothing to train or validate on.
    #[error("training data: {0}")]
    Data(String),
    /// The tune memory (`memory.bin`, `memory.json`) is unreadable or does not fit the model.
    #[error("{path}: {problem}")]
    CorruptMemory { path: String, problem: String },
    /// A file of a training checkpoint does not belong with the rest of it.
    #[error("{path}: {problem}")]
    StaleCheckpoint { path: String, problem: String },
    /// The requested device cannot be used.
    #[error("device '{name}': {reason}")]
    Device { name: String, reason: String },
    /// A tensor operation failed.
    #[error("tensor operation: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// `err`'s message without the backtraces candle attaches where `RUST_BACKTRACE` is set (a
/// status line or a log line is no place for forty lines of frames), its context first.
pub fn candle_message(err: &candle_core::Error) -> String {
    use candle_core::Error;
    match err {
        Error::WithBacktrace { inner, .. } => candle_message(inner),
        Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        Error::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_read_without_their_backtraces() {
        let backtraced = |inner: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let err = backtraced(candle_core::Error::Msg("the device is busy".into()).context("stepping"));
        assert!(err.to_string().lines().count() > 1, "candle's own message carries the frames");
        let err = ModelError::from(err);
        assert_eq!(err.to_string(), "tensor operation: stepping: the device is busy");
        let err = backtraced(candle_core::Error::UnwrapNone).with_path("model.safetensors");
        assert_eq!(candle_message(&err), "model.safetensors: unwrap none");
    }
}
