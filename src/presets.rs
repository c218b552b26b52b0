//! Presets: a name, a description and parameter values as the host shows them ("0.80",
//! "Silence", "C4", "Built-in"), kept as JSON files. The factory presets are the files in
//! `presets/` built into the plugin; the user's own live in `presets/` of the user data folder.
//! Runs on: main thread (the editor lists, applies and saves them). Never on the audio thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nice_plug::context::gui::GuiContext;
use nice_plug::prelude::{ParamPtr, Params};
use serde::{Deserialize, Serialize};

use crate::engine::library::user_data_folder;
use crate::params::AntiphonParams;

/// The factory presets, as shipped in `presets/`: (file name, JSON).
const FACTORY: &[(&str, &str)] = &[
    ("call-and-response.json", include_str!("../presets/call-and-response.json")),
    ("endless-melody.json", include_str!("../presets/endless-melody.json")),
    ("sparse-answers.json", include_str!("../presets/sparse-answers.json")),
    ("wild.json", include_str!("../presets/wild.json")),
    ("strict-key.json", include_str!("../presets/strict-key.json")),
    ("chorale.json", include_str!("../presets/chorale.json")),
    ("piano-comping.json", include_str!("../presets/piano-comping.json")),
];

/// Parameters a preset never sets: the host's bypass, and the one-shot Answer Now.
const NOT_IN_PRESETS: &[&str] = &["bypass", "now"];

/// A preset as its file holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// What the editor lists it as.
    pub name: String,
    /// What it is for, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// Parameter id → value as the host shows it. Parameters it leaves out take their default.
    pub params: BTreeMap<String, String>,
}

/// Where a preset came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresetOrigin {
    /// Built into the plugin.
    Factory,
    /// A file of the user's presets folder.
    User(PathBuf),
}

/// A preset that cannot be used, with its name and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PresetError {
    #[error("preset {file}: not a preset file: {reason}")]
    Format { file: String, reason: String },
    #[error("preset {file}: no parameter has the id '{id}'")]
    UnknownParam { file: String, id: String },
    #[error("preset {file}: '{value}' is not a value of {param}")]
    BadValue { file: String, param: String, value: String },
    #[error("preset {file}: could not be written: {reason}")]
    Write { file: String, reason: String },
}

impl Preset {
    /// Reads a preset from its JSON text; `file` names it in errors.
    pub fn parse(json: &str, file: &str) -> Result<Preset, PresetError> {
        serde_json::from_str(json)
            .map_err(|e| PresetError::Format { file: file.into(), reason: e.to_string() })
    }

    /// The normalized value of every parameter the preset sets (its own value, or the default
    /// for one it leaves out), checked against `params`. Nothing is changed.
    pub fn resolve(&self, params: &AntiphonParams, file: &str) -> Result<Vec<(ParamPtr, f32)>, PresetError> {
        let map = params.param_map();
        if let Some(id) = self.params.keys().find(|id| !map.iter().any(|(known, _, _)| known == *id)) {
            return Err(PresetError::UnknownParam { file: file.into(), id: id.clone() });
        }
        let mut values = Vec::with_capacity(map.len());
        for (id, ptr, _) in map {
            if NOT_IN_PRESETS.contains(&id.as_str()) {
                continue;
            }
            // SAFETY: `ptr` points into `params`, which the caller's borrow keeps alive.
            let normalized = unsafe {
                match self.params.get(&id) {
                    None => ptr.default_normalized_value(),
                    Some(text) => {
                        // A switch reads anything but "on" or "true" as off: only its four
                        // spellings are taken, so a typo is refused rather than switched off.
                        let is_switch = matches!(ptr, ParamPtr::BoolParam(_));
                        let is_switch_word = ["on", "off", "true", "false"]
                            .iter()
                            .any(|word| text.trim().eq_ignore_ascii_case(word));
                        let bad_value = || PresetError::BadValue {
                            file: file.into(),
                            param: ptr.name().to_string(),
                            value: text.clone(),
                        };
                        if is_switch && !is_switch_word {
                            return Err(bad_value());
                        }
                        ptr.string_to_normalized_value(text).ok_or_else(bad_value)?
                    }
                }
            };
            values.push((ptr, normalized));
        }
        Ok(values)
    }

    /// A preset of the parameters' values now, under `name`.
    pub fn capture(params: &AntiphonParams, name: &str, description: &str) -> Preset {
        let mut values = BTreeMap::new();
        for (id, ptr, _) in params.param_map() {
            if NOT_IN_PRESETS.contains(&id.as_str()) {
                continue;
            }
            // SAFETY: `ptr` points into `params`, borrowed for this call.
            let text = unsafe { ptr.normalized_value_to_string(ptr.unmodulated_normalized_value(), false) };
            values.insert(id, text);
        }
        Preset { name: name.trim().to_string(), description: description.to_string(), params: values }
    }

    /// Sets every parameter the preset names through the host, as a user's edit would.
    /// Main thread.
    pub fn apply(
        &self,
        params: &AntiphonParams,
        context: &GuiContext,
        file: &str,
    ) -> Result<(), PresetError> {
        let values = self.resolve(params, file)?;
        for (ptr, normalized) in values {
            // SAFETY: `ptr` is one of `params`' own parameters, which outlive this call.
            unsafe {
                context.raw_begin_set_parameter(ptr);
                context.raw_set_parameter_normalized(ptr, normalized);
                context.raw_end_set_parameter(ptr);
            }
        }
        Ok(())
    }
}

/// The user's presets folder (`presets` in the user data folder).
pub fn user_presets_folder() -> Option<PathBuf> {
    user_data_folder().map(|data| data.join("presets"))
}

/// A preset ready to list: where it came from, and the preset or why it cannot be used.
pub type Listed = (PresetOrigin, Result<Preset, PresetError>);

/// The factory presets, then the user's (sorted by file name). A damaged file is listed with
/// its reason rather than left out, so the editor can say what is wrong with it.
pub fn list(user_folder: Option<&Path>) -> Vec<Listed> {
    let mut presets: Vec<Listed> =
        FACTORY.iter().map(|(file, json)| (PresetOrigin::Factory, Preset::parse(json, file))).collect();
    let Some(folder) = user_folder else { return presets };
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for path in files {
        let file = path.display().to_string();
        let preset = std::fs::read_to_string(&path)
            .map_err(|e| PresetError::Format { file: file.clone(), reason: e.to_string() })
            .and_then(|json| Preset::parse(&json, &file));
        presets.push((PresetOrigin::User(path), preset));
    }
    presets
}

/// Writes `preset` into `folder` as `<name>.json` (characters a file name cannot hold become
/// '-') and returns its path.
pub fn save(preset: &Preset, folder: &Path) -> Result<PathBuf, PresetError> {
    let stem: String = preset
        .name
        .chars()
        .map(|c| if c.is_alphanumeric() || c == ' ' || c == '-' || c == '_' { c } else { '-' })
        .collect();
    let stem = if stem.trim().is_empty() { "preset".to_string() } else { stem.trim().to_string() };
    let path = folder.join(format!("{stem}.json"));
    let file = path.display().to_string();
    let write_error = |reason: String| PresetError::Write { file: file.clone(), reason };
    std::fs::create_dir_all(folder).map_err(|e| write_error(e.to_string()))?;
    let json = serde_json::to_string_pretty(preset).map_err(|e| write_error(e.to_string()))?;
    std::fs::write(&path, json + "\n").map_err(|e| write_error(e.to_string()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_factory_preset_parses_and_sets_known_parameters_to_valid_values() {
        let params = AntiphonParams::default();
        let listed = list(None);
        assert_eq!(listed.len(), FACTORY.len());
        for ((file, _), (_, preset)) in FACTORY.iter().zip(&listed) {
            let preset = preset.as_ref().unwrap_or_else(|e| panic!("{e}"));
            assert!(!preset.description.is_empty(), "{file} has no description");
            assert!(!preset.params.is_empty(), "{file} sets nothing");
            preset.resolve(&params, file).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn a_captured_preset_round_trips_through_its_file() {
        let params = AntiphonParams::default();
        let dir = tempfile::tempdir().unwrap();
        let preset = Preset::capture(&params, "My / Take", "mine");
        let path = save(&preset, dir.path()).unwrap();
        assert_eq!(path.file_name().unwrap(), "My - Take.json");
        let listed = list(Some(dir.path()));
        let (origin, back) = listed.last().unwrap();
        assert_eq!(origin, &PresetOrigin::User(path.clone()));
        assert_eq!(back.as_ref().unwrap(), &preset);
        // Every value it wrote reads back as the value it holds now.
        let values = back.as_ref().unwrap().resolve(&params, "mine").unwrap();
        for (ptr, normalized) in values {
            // SAFETY: `ptr` points into `params`, alive for the test.
            let (now, name) = unsafe { (ptr.unmodulated_normalized_value(), ptr.name()) };
            assert!((now - normalized).abs() < 1e-4, "{name}");
        }
    }

    #[test]
    fn a_damaged_preset_is_refused_with_its_name_and_reason() {
        let params = AntiphonParams::default();
        let err = Preset::parse("{\"name\": 3}", "broken.json").unwrap_err();
        assert!(err.to_string().starts_with("preset broken.json: not a preset file"), "{err}");

        let mut preset = Preset::parse(FACTORY[0].1, "a.json").unwrap();
        preset.params.insert("temp".into(), "very hot".into());
        let err = preset.resolve(&params, "a.json").unwrap_err();
        assert_eq!(err.to_string(), "preset a.json: 'very hot' is not a value of Temperature");

        preset.params.clear();
        preset.params.insert("loudness".into(), "11".into());
        let err = preset.resolve(&params, "a.json").unwrap_err();
        assert_eq!(err.to_string(), "preset a.json: no parameter has the id 'loudness'");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.json"), b"\xff\xfe not json").unwrap();
        let listed = list(Some(dir.path()));
        let (_, junk) = listed.last().unwrap();
        assert!(junk.as_ref().unwrap_err().to_string().contains("junk.json"));
    }
}
