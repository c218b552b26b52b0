//! The Model parameter through a real CLAP host: it lists the user's models folder by name,
//! picks a model from it, saves the pick with the project, and falls back to the built-in model
//! (still answering) when the picked model does not load. Needs `cargo xtask bundle antiphon`
//! first.
//!
//! This file holds one test, so setting the models-folder variable cannot race another test.

mod plugin_host;

use std::path::Path;

use plugin_host::{notes_on, Plugin, Take};

/// Copies the built-in model's files (its tune memory too) to `dir`, cutting the weights to
/// `weights_len` bytes.
fn copy_builtin(dir: &Path, weights_len: Option<usize>) {
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/models/default");
    std::fs::create_dir_all(dir).unwrap();
    for file in ["config.json", "memory.bin", "memory.json"] {
        std::fs::copy(builtin.join(file), dir.join(file)).unwrap();
    }
    let mut weights = std::fs::read(builtin.join("model.safetensors")).unwrap();
    if let Some(len) = weights_len {
        weights.truncate(len);
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
}

/// The answer (channel 2) to a fixed phrase, with the Model parameter at `model`.
fn answer_with(plugin: &mut Plugin, model: &str) -> Vec<(u8, f64, f64)> {
    plugin.set(&[("Model", model)]);
    let notes: Vec<(u8, f64, f64)> =
        [62, 64, 66, 67, 69, 67, 66, 64].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect();
    let take = Take::new(120.0, notes, 21.0);
    let mut processor = plugin.activate(48_000.0, 256);
    let heard = take.perform(&mut processor, 256);
    plugin.deactivate(processor);
    notes_on(&heard, 1)
}

#[test]
fn the_model_parameter_picks_from_the_models_folder() {
    let folder = tempfile::tempdir().unwrap();
    copy_builtin(&folder.path().join("Folk Tunes"), None);
    copy_builtin(&folder.path().join("broken"), Some(1000));
    std::fs::create_dir_all(folder.path().join("not a model")).unwrap();
    std::env::set_var(antiphon::engine::library::MODELS_FOLDER_VAR, folder.path());

    let mut plugin = Plugin::load();
    plugin.set(&[("Output Channel", "2"), ("Fresh Seed", "Off")]);
    plugin.set_offline(true);
    assert_eq!(plugin.text("Model"), "Built-in");
    // The folder's models, by name, in name order; typed names are read back.
    plugin.set(&[("Model", "folk tunes")]);
    assert_eq!(plugin.text("Model"), "Folk Tunes");
    plugin.set(&[("Model", "1")]);
    assert_eq!(plugin.text("Model"), "broken");
    plugin.set(&[("Model", "3")]);
    assert_eq!(plugin.text("Model"), "3 (empty)");

    let builtin = answer_with(&mut plugin, "Built-in");
    assert!(!builtin.is_empty(), "no answer from the built-in model");
    // The folder's copy of the built-in model answers as it does.
    assert_eq!(answer_with(&mut plugin, "Folk Tunes"), builtin);
    // A model that does not load: the built-in model answers instead of silence.
    assert_eq!(answer_with(&mut plugin, "broken"), builtin);

    // The pick is saved with the project.
    plugin.set(&[("Model", "Folk Tunes")]);
    let restored = Plugin::load();
    assert!(restored.load_state(&plugin.save_state()));
    assert_eq!(restored.text("Model"), "Folk Tunes");
}
