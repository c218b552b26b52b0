//! The built plugin's saved state through a real CLAP host: parameters and the model choice
//! survive saving and loading; junk, empty or out-of-range state is refused and leaves the
//! defaults; a model that does not load gives way to the built-in one. Needs
//! `cargo xtask bundle antiphon` first.

mod plugin_host;

use plugin_host::{notes_on, Plugin, Take};
use serde_json::{json, Value};

/// The JSON inside a CLAP state saved by the framework (a little-endian length, then JSON).
fn state_json(bytes: &[u8]) -> Value {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + len]).expect("state JSON")
}

fn state_bytes(json: &Value) -> Vec<u8> {
    let text = serde_json::to_vec(json).unwrap();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    bytes
}

/// Every parameter's value, by name.
fn values(plugin: &Plugin) -> Vec<(String, f64)> {
    plugin.param_names().into_iter().map(|name| (name.clone(), plugin.value(&name))).collect()
}

const CHANGES: &[(&str, &str)] = &[
    ("Temperature", "0.3"),
    ("Trigger", "Bars"),
    ("Silence", "2.5"),
    ("Phrase Length", "4"),
    ("Answer Start", "Next Beat"),
    ("Answer Length", "8"),
    ("Yield", "Off"),
    ("Continuous", "On"),
    ("Texture", "Chords"),
    ("Max Voices", "9"),
    ("Key Lock", "Fixed"),
    ("Key", "A"),
    ("Scale", "Dorian"),
    ("Lowest Note", "E2"),
    ("Highest Note", "F#6"),
    ("Velocity Mode", "Fixed"),
    ("Velocity", "64"),
    ("Gate", "75"),
    ("Output Channel", "5"),
    ("Seed", "1234"),
    ("Fresh Seed", "Off"),
    ("Device", "CPU"),
    ("Free Tempo", "97.5"),
    ("MIDI Thru", "Off"),
];

#[test]
fn every_parameter_has_a_readable_value() {
    let plugin = Plugin::load();
    let names = plugin.param_names();
    assert_eq!(names.len(), 27, "{names:?}");
    assert_eq!(plugin.text("Model"), "Built-in");
    assert_eq!(plugin.text("Temperature"), "1.00");
    assert_eq!(plugin.text("Silence"), "1.00 beats");
    assert_eq!(plugin.text("Answer Length"), "2 bars");
    assert_eq!(plugin.text("Lowest Note"), "C3");
    assert_eq!(plugin.text("Gate"), "100 %");
    assert_eq!(plugin.text("Free Tempo"), "120.0 BPM");
    assert_eq!(plugin.text("Trigger"), "Silence");
    assert_eq!(plugin.text("Texture"), "Auto");
    assert_eq!(plugin.text("Max Voices"), "6");
    assert_eq!(plugin.text("Device"), "Auto");
}

#[test]
fn parameters_and_the_model_survive_save_and_load() {
    let plugin = Plugin::load();
    let defaults = values(&plugin);
    plugin.set(CHANGES);
    let changed = values(&plugin);
    assert_ne!(changed, defaults);
    assert_eq!(plugin.text("Temperature"), "0.30");
    assert_eq!(plugin.text("Scale"), "Dorian");
    let mut saved = state_json(&plugin.save_state());
    assert_eq!(saved["fields"]["model"], json!("\"builtin\""));
    // Choose a model directory, as a GUI would, by loading a state that names it.
    saved["fields"]["model"] = json!(r#"{"directory":"/home/me/models/reels"}"#);
    assert!(plugin.load_state(&state_bytes(&saved)));

    let restored = Plugin::load();
    assert_eq!(values(&restored), defaults);
    assert!(restored.load_state(&plugin.save_state()));
    assert_eq!(values(&restored), changed);
    assert_eq!(restored.text("Lowest Note"), "E2");
    assert_eq!(restored.text("Output Channel"), "5");
    let again = state_json(&restored.save_state());
    assert_eq!(again["fields"]["model"], json!(r#"{"directory":"/home/me/models/reels"}"#));
}

#[test]
fn junk_and_empty_state_is_refused_and_leaves_the_defaults() {
    let plugin = Plugin::load();
    let defaults = values(&plugin);
    assert!(!plugin.load_state(&[]));
    assert!(!plugin.load_state(&0u64.to_le_bytes()));
    assert!(!plugin.load_state(b"\x05\0\0\0\0\0\0\0hello"));
    assert!(!plugin.load_state(&state_bytes(&json!({"params": 3}))));
    assert!(!plugin.load_state(&(u64::MAX).to_le_bytes()));
    let noise: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(!plugin.load_state(&noise));
    assert_eq!(values(&plugin), defaults);
}

#[test]
fn out_of_range_entries_are_dropped_and_the_rest_loads() {
    let plugin = Plugin::load();
    let defaults = values(&plugin);
    let mut state = state_json(&plugin.save_state());
    state["params"]["temp"] = json!({"f32": 99.0});
    state["params"]["ansbars"] = json!({"i32": -3});
    state["params"]["chan"] = json!({"bool": true});
    state["params"]["scale"] = json!({"i32": 12});
    state["params"]["nonesuch"] = json!({"f32": 1.0});
    state["params"]["seed"] = json!({"i32": 55});
    state["fields"]["model"] = json!(r#"{"directory":""}"#);
    assert!(plugin.load_state(&state_bytes(&state)));
    for (name, value) in values(&plugin) {
        let default = defaults.iter().find(|(n, _)| *n == name).unwrap().1;
        if name == "Seed" {
            assert_eq!(plugin.text("Seed"), "55");
        } else {
            assert_eq!(value, default, "{name} changed");
        }
    }
    assert_eq!(state_json(&plugin.save_state())["fields"]["model"], json!("\"builtin\""));
}

#[test]
fn a_model_that_does_not_load_falls_back_to_the_builtin_one() {
    let mut plugin = Plugin::load();
    plugin.set(&[("Output Channel", "2"), ("Fresh Seed", "Off")]);
    plugin.set_offline(true);
    let notes: Vec<(u8, f64, f64)> =
        [60, 62, 64, 65].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect();
    let take = Take::new(120.0, notes, 21.0);
    let mut answer_with = |model: &str| {
        let mut state = state_json(&plugin.save_state());
        state["fields"]["model"] = json!(model);
        assert!(plugin.load_state(&state_bytes(&state)));
        let mut processor = plugin.activate(48_000.0, 256);
        let heard = take.perform(&mut processor, 256);
        plugin.deactivate(processor);
        assert_eq!(notes_on(&heard, 0).len(), 4, "the phrase did not pass through");
        notes_on(&heard, 1)
    };
    let missing = answer_with(r#"{"directory":"/nonexistent/antiphon-model"}"#);
    let builtin = answer_with("\"builtin\"");
    assert!(!builtin.is_empty(), "no answer with the built-in model");
    assert_eq!(missing, builtin);
}

#[test]
fn a_model_directory_saved_with_the_project_answers() {
    // The built-in model's own files, loaded as a user's model directory, answer exactly as the
    // built-in model does.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/models/default");
    let notes: Vec<(u8, f64, f64)> =
        [62, 64, 66, 67, 69, 67, 66, 64].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect();
    let take = Take::new(120.0, notes, 21.0);
    let answer_with = |model: Value| {
        let mut plugin = Plugin::load();
        plugin.set(&[("Output Channel", "2"), ("Fresh Seed", "Off")]);
        plugin.set_offline(true);
        let mut state = state_json(&plugin.save_state());
        state["fields"]["model"] = model;
        assert!(plugin.load_state(&state_bytes(&state)));
        let mut processor = plugin.activate(48_000.0, 256);
        let heard = take.perform(&mut processor, 256);
        plugin.deactivate(processor);
        notes_on(&heard, 1)
    };
    let builtin = answer_with(json!("\"builtin\""));
    let directory = answer_with(json!(serde_json::to_string(&json!({ "directory": dir })).unwrap()));
    assert!(!builtin.is_empty());
    assert_eq!(builtin, directory);
}
