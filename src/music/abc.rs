//! ABC notation reader: tunebooks in, one monophonic `Melody` per tune.
//! Runs on: any non-audio thread.

use std::path::Path;

use super::note::Melody;

/// A tune the reader could not read: where it is, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: tune X:{number} (line {line}): {message}", number = display_number(*.number))]
pub struct AbcError {
    /// The tunebook's path as given to the reader.
    pub path: String,
    /// The tune's `X:` number, if its header was read.
    pub number: Option<u32>,
    /// 1-based line of the tunebook where the problem is.
    pub line: usize,
    /// What is wrong, in words.
    pub message: String,
}

fn display_number(number: Option<u32>) -> String {
    number.map_or_else(|| "?".to_string(), |n| n.to_string())
}

/// What a tunebook gave: the tunes that parsed, and an error for each one that did not.
#[derive(Debug, Default)]
pub struct TuneBook {
    /// Tunes in file order.
    pub tunes: Vec<Melody>,
    /// One entry per tune that could not be read; the others are unaffected.
    pub errors: Vec<AbcError>,
}

/// Parses ABC text holding one or more tunes. `path` is used in sources and errors only.
pub fn parse_tunebook(text: &str, path: &str) -> TuneBook {
    let _ = (text, path);
    todo!("ABC reader")
}

/// Reads and parses an ABC file. Only I/O fails here; tunes that do not parse are in `errors`.
pub fn read_tunebook(path: &Path) -> std::io::Result<TuneBook> {
    let bytes = std::fs::read(path)?;
    // Some tunebooks are Latin-1; decode lossily rather than refuse the whole book.
    let text = String::from_utf8_lossy(&bytes);
    Ok(parse_tunebook(&text, &path.display().to_string()))
}
