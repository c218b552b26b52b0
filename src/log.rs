//! Where the plugin's messages go, so a user can find out why a model did not load: the host's
//! standard error, and a file, `antiphon.log` in the user's data folder (`ANTIPHON_LOG` names
//! another file). The framework's own messages and a panic's go there too.
//! Runs on: main thread, once per process when the host loads the plugin (also at a plugin
//! scan, so nothing is opened then: the file is opened, and its folder made, by the first
//! message). Messages come from the worker and the main thread; the audio thread never logs.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::writer::{MakeWriter, MakeWriterExt, MutexGuardWriter, OptionalWriter};

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
    let file = LogFile { path: log_file_path(), file: OnceLock::new() };
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr.and(file))
        .try_init()
        .is_ok()
}

/// The log file, opened by the first message written to it.
struct LogFile {
    path: Option<PathBuf>,
    /// `None` inside once opening failed: the messages then reach standard error only.
    file: OnceLock<Option<Mutex<File>>>,
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = OptionalWriter<MutexGuardWriter<'a, File>>;

    fn make_writer(&'a self) -> Self::Writer {
        match self.file.get_or_init(|| self.path.as_deref().and_then(open_log).map(Mutex::new)) {
            Some(file) => OptionalWriter::some(file.make_writer()),
            None => OptionalWriter::none(),
        }
    }
}

/// Opens `path` for appending, first moving a long one aside; `None` when it cannot be written.
fn open_log(path: &Path) -> Option<File> {
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder).ok()?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
    OpenOptions::new().create(true).append(true).open(path).ok()
}
