//! The user's models folder: trained model directories the host's generic parameter view can
//! pick by name, through the Model parameter.
//! Runs on: main thread and worker (it reads the file system); never on the audio thread.
//!
//! The folder is `ANTIPHON_MODELS` when that is set, else the platform's place for user data:
//! `~/Library/Application Support/Antiphon/Models` on macOS, `%APPDATA%\Antiphon\Models` on
//! Windows, `$XDG_DATA_HOME/antiphon/models` (or `~/.local/share/antiphon/models`) elsewhere.
//! Each subfolder holding a `config.json` and a `model.safetensors` is a model, named after the
//! subfolder; they are listed in name order. The folder is read once per plugin instance, the
//! first time the list is needed, so a model added later shows up in the next instance.

use std::path::{Path, PathBuf};

/// Most models the Model parameter can name (its range is 0..=this; 0 is the project's choice).
pub const MAX_LIBRARY_MODELS: usize = 64;

/// The environment variable that overrides the models folder.
pub const MODELS_FOLDER_VAR: &str = "ANTIPHON_MODELS";

/// One model of the folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryModel {
    /// The subfolder's name.
    pub name: String,
    /// The model directory.
    pub path: PathBuf,
}

/// The models found in a models folder, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelLibrary {
    /// The folder read, if there is one for this platform.
    pub folder: Option<PathBuf>,
    /// At most [`MAX_LIBRARY_MODELS`] models.
    pub models: Vec<LibraryModel>,
}

impl ModelLibrary {
    /// The models in `folder`. A folder that does not exist or cannot be read holds none.
    pub fn scan(folder: &Path) -> Self {
        let mut models: Vec<LibraryModel> = std::fs::read_dir(folder)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let path = entry.path();
                let is_model = path.join("config.json").is_file() && path.join("model.safetensors").is_file();
                let name = entry.file_name().to_str()?.to_string();
                (is_model && !name.starts_with('.')).then_some(LibraryModel { name, path })
            })
            .collect();
        models.sort_by(|a, b| a.name.to_lowercase().cmp(&b.name.to_lowercase()).then(a.name.cmp(&b.name)));
        models.truncate(MAX_LIBRARY_MODELS);
        Self { folder: Some(folder.to_path_buf()), models }
    }

    /// The models in the user's models folder ([`user_models_folder`]).
    pub fn user() -> Self {
        match user_models_folder() {
            Some(folder) => Self::scan(&folder),
            None => Self::default(),
        }
    }

    /// The model at a Model parameter value: 1 is the first model. `None` for 0 and for values
    /// past the end of the list.
    pub fn get(&self, slot: usize) -> Option<&LibraryModel> {
        slot.checked_sub(1).and_then(|idx| self.models.get(idx))
    }

    /// The Model parameter value of the model named `name` (ignoring case).
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        let name = name.trim();
        self.models.iter().position(|m| m.name.eq_ignore_ascii_case(name)).map(|idx| idx + 1)
    }
}

/// Where this platform keeps the user's models (see the module documentation).
pub fn user_models_folder() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(folder) = var(MODELS_FOLDER_VAR) {
        return Some(folder);
    }
    let models = if cfg!(target_os = "macos") || cfg!(windows) { "Models" } else { "models" };
    user_data_folder().map(|data| data.join(models))
}

/// Where this platform keeps the plugin's user data (its models folder and its log):
/// `~/Library/Application Support/Antiphon` on macOS, `%APPDATA%\Antiphon` on Windows,
/// `$XDG_DATA_HOME/antiphon` (or `~/.local/share/antiphon`) elsewhere.
pub fn user_data_folder() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if cfg!(target_os = "macos") {
        var("HOME").map(|home| home.join("Library/Application Support/Antiphon"))
    } else if cfg!(windows) {
        var("APPDATA").map(|data| data.join("Antiphon"))
    } else {
        var("XDG_DATA_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".local/share")))
            .map(|data| data.join("antiphon"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(root: &Path, name: &str) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "").unwrap();
    }

    #[test]
    fn scanning_lists_model_folders_by_name_and_skips_the_rest() {
        let root = tempfile::tempdir().unwrap();
        model_dir(root.path(), "reels");
        model_dir(root.path(), "Airs");
        model_dir(root.path(), "jigs");
        model_dir(root.path(), ".hidden");
        // Not models: a folder without weights, and a plain file.
        std::fs::create_dir_all(root.path().join("half")).unwrap();
        std::fs::write(root.path().join("half/config.json"), "{}").unwrap();
        std::fs::write(root.path().join("notes.txt"), "x").unwrap();

        let library = ModelLibrary::scan(root.path());
        let names: Vec<&str> = library.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["Airs", "jigs", "reels"]);
        assert_eq!(library.get(0), None);
        assert_eq!(library.get(1).unwrap().path, root.path().join("Airs"));
        assert_eq!(library.get(3).unwrap().name, "reels");
        assert_eq!(library.get(4), None);
        assert_eq!(library.slot_of("JIGS"), Some(2));
        assert_eq!(library.slot_of("hornpipes"), None);
    }

    #[test]
    fn a_missing_folder_holds_no_models() {
        let library = ModelLibrary::scan(Path::new("/no/such/antiphon/models"));
        assert!(library.models.is_empty());
        assert_eq!(library.get(1), None);
    }
}
