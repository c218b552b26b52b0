//! Keeping an answer: writes the phrase and the answer that plays (or played last) as one
//! Standard MIDI File, the answer right after the phrase, named after the time it was saved.
//! Runs on: main thread (the editor's "Save answer"). Allocates and writes files.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use music::midi::write_midi;
use music::note::{Melody, Source};

use crate::engine::library::user_data_folder;
use crate::engine::Shown;

/// The folder answers are saved in: `answers` in the user data folder.
pub fn answers_folder() -> Option<PathBuf> {
    user_data_folder().map(|data| data.join("answers"))
}

/// Why an answer could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    #[error("there is no answer to save yet: play a phrase and let Antiphon answer it")]
    NothingToSave,
    #[error("this system has no user data folder to save answers in")]
    NoFolder,
    #[error("could not write {path}: {reason}")]
    Write { path: String, reason: String },
}

/// Writes the phrase and the playing answer of `shown` at `tempo_bpm` into `folder` as
/// `antiphon-YYYY-MM-DD-HHMMSS.mid` (UTC; `-2`, `-3`... when saved twice in a second) and
/// returns the file's path.
pub fn save_answer(shown: &Shown, tempo_bpm: f64, folder: &Path) -> Result<PathBuf, KeepError> {
    let (notes, end_beats) = shown.phrase_and_answer().ok_or(KeepError::NothingToSave)?;
    let melody = Melody {
        notes,
        end_beats,
        key: shown.playing().and_then(|answer| answer.key),
        meter: shown.meter(),
        pickup_beats: 0.0,
        tempo_qpm: Some(tempo_bpm),
        source: Source { title: Some("Antiphon: phrase and answer".into()), ..Default::default() },
    };
    let write_error = |path: &Path, e: std::io::Error| KeepError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(folder).map_err(|e| write_error(folder, e))?;
    let stem = format!("antiphon-{}", utc_stamp(SystemTime::now()));
    let mut path = folder.join(format!("{stem}.mid"));
    for copy in 2.. {
        if !path.exists() {
            break;
        }
        path = folder.join(format!("{stem}-{copy}.mid"));
    }
    std::fs::write(&path, write_midi(&melody, tempo_bpm)).map_err(|e| write_error(&path, e))?;
    Ok(path)
}

/// `time` as `YYYY-MM-DD-HHMMSS` in UTC.
fn utc_stamp(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, secs_of_day) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), in 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    format!("{year:04}-{month:02}-{day:02}-{hour:02}{minute:02}{second:02}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use live::phrase::Phrase;
    use music::midi::read_midi_notes;
    use music::note::Note;

    use super::*;
    use crate::engine::{AnswerView, Voicing};

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "1970-01-01-000000");
        // 2026-12-05 13:43:28 UTC, and a leap day.
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(1_796_478_208)), "2026-12-05-134328");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29-000000");
    }

    fn note(pitch: u8, start_beats: f64, len_beats: f64) -> Note {
        Note { pitch, velocity: 90, start_beats, len_beats }
    }

    #[test]
    fn a_saved_answer_reads_back_as_the_phrase_then_the_answer() {
        let mut phrase = Phrase::empty(4.0);
        phrase.notes.push(note(60, 0.0, 1.0));
        phrase.notes.push(note(64, 1.0, 1.0));
        phrase.len_beats = 4.0;
        let answer = AnswerView {
            answer_id: 7,
            // A chord, then a note.
            notes: vec![note(55, 0.0, 2.0), note(59, 0.0, 2.0), note(62, 2.0, 2.0)],
            written_until_beats: 4.0,
            is_finished: true,
            voicing: Voicing::Chords,
            model: "test".into(),
            key: None,
            heard_key: None,
            seed: 1,
            first_note_ms: Some(1.0),
        };
        let shown = Shown { phrase: Some(phrase), variations: vec![Arc::new(answer)], playing: Some(7) };
        let dir = tempfile::tempdir().unwrap();
        let first = save_answer(&shown, 120.0, dir.path()).unwrap();
        let second = save_answer(&shown, 120.0, dir.path()).unwrap();
        assert_ne!(first, second, "a second save in the same second gets its own file");
        let back: Vec<(u8, f64, f64)> =
            read_midi_notes(&first).unwrap().iter().map(|n| (n.pitch, n.start_beats, n.len_beats)).collect();
        let mut expected: Vec<(u8, f64, f64)> =
            vec![(60, 0.0, 1.0), (64, 1.0, 1.0), (55, 4.0, 2.0), (59, 4.0, 2.0), (62, 6.0, 2.0)];
        expected.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        assert_eq!(back, expected);

        let nothing = Shown::default();
        assert!(matches!(save_answer(&nothing, 120.0, dir.path()), Err(KeepError::NothingToSave)));
    }
}
