//! Reading whole collections: files and folders of `.abc` and `.mid` songs, with a per-file
//! error list instead of a failure, and the counts a dataset build reports.
//! Runs on: offline and worker threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::abc::{self, AbcError};
use super::encode::{self, EncodeConfig, Reject, StepGrid, Symbol};
use super::midi::{self, MelodyChoice, MidiError};
use super::note::Melody;

/// Something in a collection that could not be read. The rest of the collection is unaffected.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file or folder could not be read at all.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// One tune of an ABC tunebook.
    #[error(transparent)]
    Abc(#[from] AbcError),
    /// A MIDI file.
    #[error(transparent)]
    Midi(#[from] MidiError),
}

/// The kinds of file a collection is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SongFormat {
    /// ABC notation, `.abc`.
    Abc,
    /// Standard MIDI File, `.mid` or `.midi`.
    Midi,
}

impl SongFormat {
    /// The format a path's extension names (case-insensitive), if it is one we read.
    pub fn of(path: &Path) -> Option<SongFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "abc" => Some(SongFormat::Abc),
            "mid" | "midi" | "smf" => Some(SongFormat::Midi),
            _ => None,
        }
    }
}

/// What a collection gave: melodies in a stable order (paths sorted, then file order), and an
/// error for each file or tune that could not be read.
#[derive(Debug, Default)]
pub struct Collection {
    /// Every melody read.
    pub melodies: Vec<Melody>,
    /// Everything that could not be read.
    pub errors: Vec<ReadError>,
    /// Song files visited.
    pub num_files: usize,
    /// Files skipped because their extension is not one we read.
    pub num_skipped_files: usize,
}

impl Collection {
    /// Reads every `.abc`/`.mid` file of `paths`; folders are searched recursively.
    pub fn read(paths: &[PathBuf], choice: MelodyChoice) -> Collection {
        let mut collection = Collection::default();
        for path in paths {
            collection.read_path(path, choice);
        }
        collection
    }

    /// Snaps the melodies read from MIDI files to `grid` (see `encode::quantize`). MIDI times
    /// come from a performance or a writer's habits (abc2midi starts each note a tick late);
    /// ABC times are exact, so an ABC tune off the grid stays off it and is dropped as such.
    pub fn quantize_midi(&mut self, grid: StepGrid) {
        for melody in &mut self.melodies {
            if SongFormat::of(Path::new(&melody.source.path)) == Some(SongFormat::Midi) {
                *melody = encode::quantize(melody, grid);
            }
        }
    }

    fn read_path(&mut self, path: &Path, choice: MelodyChoice) {
        if !path.exists() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder");
            self.errors.push(ReadError::Io { path: path.display().to_string(), source });
            return;
        }
        if path.is_dir() {
            let entries = match std::fs::read_dir(path) {
                Ok(entries) => entries,
                Err(source) => {
                    self.errors.push(ReadError::Io { path: path.display().to_string(), source });
                    return;
                }
            };
            let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            children.sort();
            for child in children {
                self.read_path(&child, choice);
            }
            return;
        }
        let Some(format) = SongFormat::of(path) else {
            self.num_skipped_files += 1;
            return;
        };
        self.num_files += 1;
        match read_file(path, format, choice) {
            Ok((melodies, errors)) => {
                self.melodies.extend(melodies);
                self.errors.extend(errors);
            }
            Err(error) => self.errors.push(error),
        }
    }
}

/// Reads one song file: its melodies and the errors of the tunes that did not parse, or the
/// error that stopped the whole file.
pub fn read_file(
    path: &Path,
    format: SongFormat,
    choice: MelodyChoice,
) -> Result<(Vec<Melody>, Vec<ReadError>), ReadError> {
    let io_error = |source| ReadError::Io { path: path.display().to_string(), source };
    match format {
        SongFormat::Abc => {
            let book = abc::read_tunebook(path).map_err(io_error)?;
            Ok((book.tunes, book.errors.into_iter().map(ReadError::from).collect()))
        }
        SongFormat::Midi => {
            let bytes = std::fs::read(path).map_err(io_error)?;
            let melodies = midi::parse_midi(&bytes, &path.display().to_string(), choice)?;
            Ok((melodies, Vec::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
    }

    #[test]
    fn reads_a_folder_of_both_formats_and_snaps_only_midi() {
        let mut collection = Collection::read(&[data_dir()], MelodyChoice::MainTrack);
        assert!(collection.num_files >= 5, "{} files", collection.num_files);
        let is_midi = |m: &Melody| SongFormat::of(Path::new(&m.source.path)) == Some(SongFormat::Midi);
        assert!(collection.melodies.iter().any(is_midi));
        assert!(collection.melodies.iter().any(|m| !is_midi(m)));
        let before: Vec<Melody> = collection.melodies.clone();
        collection.quantize_midi(StepGrid::SIXTEENTHS);
        let cfg = EncodeConfig::default();
        // The abc2midi file encodes on sixteenths only once snapped.
        let erk_idx = before.iter().position(|m| m.source.path.ends_with("erk10-0226.mid")).unwrap();
        assert_eq!(encode::encode(&before[erk_idx], &cfg).unwrap_err().reason(), "off_grid");
        assert!(encode::encode(&collection.melodies[erk_idx], &cfg).is_ok());
        // ABC tunes are left exactly as read.
        for (a, b) in before.iter().zip(&collection.melodies).filter(|(a, _)| !is_midi(a)) {
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_missing_path_is_an_error_and_the_rest_is_read() {
        let missing = data_dir().join("no-such-folder");
        let collection = Collection::read(&[missing, data_dir().join("abc")], MelodyChoice::MainTrack);
        assert_eq!(collection.errors.len(), 1);
        let message = collection.errors[0].to_string();
        assert!(message.contains("no-such-folder") && message.contains("no such file"), "{message}");
        assert_eq!(collection.num_files, 3);
        assert!(collection.melodies.len() >= 8);
    }
}

/// Songs that passed the encoder's filter, and counts of those that did not by reason.
#[derive(Debug, Default)]
pub struct Encoded {
    /// (index into the input melodies, symbols) of each kept song, in input order.
    pub songs: Vec<(usize, Vec<Symbol>)>,
    /// Dropped songs by `Reject::reason()`.
    pub dropped: BTreeMap<&'static str, usize>,
}

/// Encodes every melody under `cfg`, after moving each by the shift `shift_of` gives it
/// (`None` drops the song as `no_key`, e.g. a song without notes).
pub fn encode_all(
    melodies: &[Melody],
    cfg: &EncodeConfig,
    shift_of: impl Fn(&Melody) -> Option<i32>,
) -> Encoded {
    let mut out = Encoded::default();
    for (idx, melody) in melodies.iter().enumerate() {
        let result = shift_of(melody)
            .ok_or("no_key")
            .and_then(|shift| melody.transposed(shift).ok_or("out_of_range"))
            .and_then(|moved| encode::encode(&moved, cfg).map_err(|r: Reject| r.reason()));
        match result {
            Ok(symbols) => out.songs.push((idx, symbols)),
            Err(reason) => *out.dropped.entry(reason).or_default() += 1,
        }
    }
    out
}
