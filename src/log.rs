//! Where the plugin's messages go, so a user can find out why a model did not load: the host's
//! standard error, and a file, `antiphon.log` in the user's data folder (`ANTIPHON_LOG` names
//! another file). The framework's own messages and a panic's go there too.
//! Runs on: main thread, once per process when the host loads the plugin. Messages come from the
//! worker and the main thread; the audio thread never logs.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::engine::library::user_data_folder;

/// The environment variable that names the log file instead of the data folder's.
pub const LOG_FILE_VAR: &str = "ANTIPHON_LOG";

/// A log file longer than this is moved aside (to `antiphon.log.1`, replacing an older one)
/// when the plugin loads, so it never grows without bound.
const MAX_LOG_BYTES: u64 = 1 << 20;

/// The log file: `ANTIPHON_LOG`, else `antiphon.log` in the user's data folder.
pub fn log_file_path() -> Option<PathBuf> {
    match std::env::var_os(LOG_FILE_VAR).filter(|v| !v.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => user_data_folder().map(|folder| folder.join("antiphon.log")),
    }
}

/// Installs the logger. Returns whether it could be installed (another logger may already be
/// the process's); without a file it still logs to standard error.
pub fn setup() -> bool {
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_ansi(false)
        .with_target(false);
    match log_file_path().and_then(|path| open_log(&path)) {
        Some(file) => builder.with_writer(std::io::stderr.and(Mutex::new(file))).try_init().is_ok(),
        None => builder.with_writer(std::io::stderr).try_init().is_ok(),
    }
}

/// Opens `path` for appending, first moving a long one aside; `None` when it cannot be written
/// (the messages then reach standard error only).
fn open_log(path: &PathBuf) -> Option<File> {
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder).ok()?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
    OpenOptions::new().create(true).append(true).open(path).ok()
}
