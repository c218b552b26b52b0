//! Shared by the model-file fuzz targets: a copy of the built-in model's directory in which one
//! file is replaced by the fuzzer's bytes, loaded as the plugin's worker loads a model. Whatever
//! the bytes, loading must give a model or an error that names the file, never a panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use antiphon_model::LoadedModel;

/// The model directory's files, as shipped.
const FILES: [&str; 4] = ["config.json", "model.safetensors", "memory.json", "memory.bin"];

/// The built-in model's directory, as shipped.
pub fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets/models/default")
}

/// A temporary copy of the built-in model, made once per fuzzing process.
fn model_copy() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let shipped = shipped_dir();
        for file in FILES {
            std::fs::copy(shipped.join(file), dir.path().join(file)).expect("the built-in model's files");
        }
        dir
    })
    .path()
}

/// Loads the model with `file` holding `bytes` (the other files as shipped) and checks that a
/// refusal names the model directory and is not a panic.
pub fn load_with(file: &str, bytes: &[u8]) {
    let dir = model_copy();
    let path: PathBuf = dir.join(file);
    let original = std::fs::read(&path).expect("the copy's file");
    std::fs::write(&path, bytes).expect("writing the fuzzed file");
    let loaded = LoadedModel::load_dir(dir);
    std::fs::write(&path, original).expect("restoring the file");
    if let Err(err) = loaded {
        let message = err.to_string();
        assert!(message.contains(&dir.display().to_string()), "an error that names no file: {message}");
    }
}
