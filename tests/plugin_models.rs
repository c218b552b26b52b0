//! The Model parameter through a real CLAP host: it lists the user's models folder by name,
//! picks a model from it, saves the pick with the project by name, and falls back to the
//! built-in model (still answering) when the picked model does not load or is gone, with the
//! reason in the log file. Needs `cargo xtask bundle antiphon` first.
//!
//! This file holds one test, so setting the models-folder and log variables cannot race another
//! test, and they are set before the plugin library is first loaded (the log is set up then).

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
    let log = folder.path().join("logs/antiphon.log");
    std::env::set_var(antiphon::log::LOG_FILE_VAR, &log);

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
    // A model that does not load: the built-in model answers instead of silence, and the log
    // file says which model and why.
    assert_eq!(answer_with(&mut plugin, "broken"), builtin);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.lines().any(|line| line.contains("broken") && line.contains("model.safetensors")),
        "the log does not say why 'broken' failed:\n{logged}"
    );

    // Every value the parameter shows reads back as itself (hosts and validators convert both
    // ways).
    for value in 0..=antiphon::engine::MAX_LIBRARY_MODELS {
        plugin.set(&[("Model", &value.to_string())]);
        let text = plugin.text("Model");
        assert_eq!(plugin.value_of("Model", &text), value as f64, "{text:?} does not read back as {value}");
    }

    // The pick is saved with the project by name: a model added since, which sorts before it,
    // moves it down the list, and the project still gets it.
    plugin.set(&[("Model", "Folk Tunes")]);
    let project = plugin.save_state();
    let restored = Plugin::load();
    assert!(restored.load_state(&project));
    assert_eq!(restored.text("Model"), "Folk Tunes");
    copy_builtin(&folder.path().join("Airs"), None);
    let restored = Plugin::load();
    assert!(restored.load_state(&project));
    assert_eq!(restored.text("Model"), "Folk Tunes");
    assert_eq!(restored.value("Model"), 3.0, "Airs, broken, Folk Tunes");

    // A project whose model is gone opens with the built-in model, and the log says so.
    std::fs::remove_dir_all(folder.path().join("Folk Tunes")).unwrap();
    let mut restored = Plugin::load();
    assert!(restored.load_state(&project));
    assert_eq!(restored.text("Model"), "Built-in");
    restored.set(&[("Output Channel", "2"), ("Fresh Seed", "Off")]);
    restored.set_offline(true);
    let notes: Vec<(u8, f64, f64)> =
        [62, 64, 66, 67, 69, 67, 66, 64].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect();
    let mut processor = restored.activate(48_000.0, 256);
    let heard = Take::new(120.0, notes, 21.0).perform(&mut processor, 256);
    restored.deactivate(processor);
    assert_eq!(notes_on(&heard, 1), builtin, "the built-in model answers for the missing one");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.lines().any(|line| line.contains("'Folk Tunes'") && line.contains("no longer holds it")),
        "the log does not say the project's model is gone:\n{logged}"
    );
}
