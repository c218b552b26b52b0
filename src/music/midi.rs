//! Standard MIDI files in and out, with `midly`.
//! Runs on: any non-audio thread.

use super::note::Melody;

/// Why a MIDI file gave no melodies.
#[derive(Debug, thiserror::Error)]
pub enum MidiError {
    /// The bytes are not a readable Standard MIDI File.
    #[error("{path}: not a readable MIDI file: {source}")]
    Parse { path: String, source: midly::Error },
    /// SMPTE time division, which has no beats to put notes on.
    #[error("{path}: SMPTE timecode timing is not supported (only ticks per quarter note)")]
    SmpteTiming { path: String },
    /// Every track was empty or drums.
    #[error("{path}: no melodic notes (drum channel 10 is ignored)")]
    NoNotes { path: String },
}

/// How melodies are chosen from a file with several tracks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MelodyChoice {
    /// One melody per file: the highest voice of the most melodic non-drum track.
    #[default]
    MainTrack,
    /// Every non-drum track that has notes, each reduced to its highest voice.
    EveryTrack,
}

/// Reads the melodies of a Standard MIDI File. `path` is used in sources and errors only.
pub fn parse_midi(bytes: &[u8], path: &str, choice: MelodyChoice) -> Result<Vec<Melody>, MidiError> {
    let _ = (bytes, path, choice);
    todo!("MIDI reader")
}

/// Writes `melody` as a format-0 Standard MIDI File at `tempo_qpm`.
pub fn write_midi(melody: &Melody, tempo_qpm: f64) -> Vec<u8> {
    let _ = (melody, tempo_qpm);
    todo!("MIDI writer")
}
