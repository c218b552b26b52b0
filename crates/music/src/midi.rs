//! Standard MIDI files in and out, with `midly`: `parse_midi` turns a file into monophonic
//! melodies, `write_midi` turns a melody into a format-0 file.
//! Runs on: any non-audio thread (xtask, the worker, tests). Allocates freely.
//!
//! # Reading
//! Formats 0, 1 and 2 are read; format-2 tracks are independent songs whose times each start
//! at 0. Only metrical timing (ticks per quarter note) is supported: SMPTE timing has no beats
//! and gives [`MidiError::SmpteTiming`]. Times in the melody are beats: `start_beats` is
//! `tick / ticks_per_quarter` as an exactly rounded `f64`, and `len_beats` is the end's beats
//! minus the start's (an ulp less where needed so that a note never overlaps the next in
//! floating point). They count from the start of the file (of the track in format 2),
//! so leading silence stays a leading rest and a pickup stays where the file puts it.
//! `pickup_beats` is 0, because a MIDI file does not say where its first bar line is.
//! Times are not quantized: abc2midi, for one, starts every note one tick after its written
//! onset and ends it on time, and that is what the melody says (a grid encoder must snap).
//!
//! Notes are collected per *group*, a (track, channel) pair, so a format-0 file with several
//! channels has a group per channel and a format-1 track that uses two channels gives two
//! groups. Channel 10 (index 9) is the General MIDI drum channel and is skipped everywhere.
//! Within a group, notes are paired as follows:
//! - a note-on with velocity 0 is a note-off;
//! - a second note-on of a pitch that is already sounding on the channel ends the sounding note
//!   at the new onset and starts a new one, and a note-off ends the newest (the only sounding)
//!   note of its pitch. A note-off with no sounding note is ignored. One exception keeps
//!   repeated notes whose writer put the note-on before the note-off at a shared tick: a
//!   note-off at the very tick of a note-on that cut short an earlier note of its pitch belongs
//!   to that earlier note, so it is used up without ending the new one;
//! - notes still sounding at the end of the track end at the End of Track event;
//! - notes of zero length are dropped.
//!
//! Melodies must be monophonic, so each group is reduced to its highest voice (the *skyline*):
//! where notes overlap the higher one wins; a lower note cut short by a higher onset is
//! truncated there, and a note that starts while a note at least as high sounds is dropped.
//!
//! # Choosing melodies
//! [`MelodyChoice::EveryTrack`] gives one melody per group with notes, in (track, channel)
//! order. [`MelodyChoice::MainTrack`] gives one melody per file: the most melodic group, scored
//! on the notes before and after the skyline reduction with
//! - mostly monophonic: 1 when at least 90 % of its notes survive the skyline, falling to 0
//!   at 50 % (weight 2), so a chord at a cadence costs a voice nothing but a chordal
//!   accompaniment scores low;
//! - enough notes: skyline notes / 16, at most 1 (weight 2);
//! - a singable range: 1 up to two octaves between the lowest and highest skyline pitch,
//!   falling to 0 at four octaves (weight 1);
//! - register, against bass and inner voices: the mean skyline pitch from G2 (43, scoring 0)
//!   to C#5 (73, scoring 1) (weight 2).
//!
//! Scores are compared in thousandths; on a tie the higher mean pitch wins, then the earlier
//! group. On the shared corpus this picks the soprano of 377 of the 408 music21 Bach chorales;
//! the rest pick an instrument that doubles it or plays above it (horn, trumpet, violin).
//!
//! # Metadata
//! `key`, `meter` and `tempo_qpm` come from the first (earliest, then lowest track) key
//! signature, time signature and tempo events in the file; in format 2 from the melody's own
//! track. Later tempo changes are read and ignored: times are beats, so a tempo map only affects
//! wall-clock time. `Source::title` is the first track name of the group's track (UTF-8, or
//! Latin-1 when the bytes are not UTF-8). `Melody::end_beats` is the end of the last note, not
//! the End of Track time, because writers pad the end of a track with silence of their own
//! choosing (a bar, a beat, or nothing), which says nothing about the tune.
//!
//! # Damaged files
//! `midly` is lenient and silently drops what it cannot read. This reader is stricter and
//! refuses a file, naming it, when:
//! - midly cannot read the header at all (random bytes, an empty file): [`MidiError::Parse`];
//! - a chunk declares more bytes than the file holds, or the file ends inside a chunk header,
//!   before all the tracks the header declares were read: [`MidiError::Truncated`];
//! - fewer track chunks than the header declares are present: [`MidiError::MissingTracks`];
//! - an event in a track cannot be parsed: [`MidiError::BadEvent`];
//! - a track ends without an End of Track event: [`MidiError::MissingEndOfTrack`] (a sysex or
//!   meta event whose length runs past its chunk swallows the rest of the track in midly, and
//!   this is how that shows).
//!
//! RMID files (an SMF inside a RIFF wrapper) are unwrapped first. Chunks of unknown type are
//! skipped, as the SMF specification asks. Track chunks beyond the
//! declared count are read. Bytes after the last declared track that do not form a whole chunk
//! are ignored, and so are events after End of Track. midly masks data bytes that have the top
//! bit set to 7 bits instead of refusing them; that is kept.
//!
//! # Writing
//! [`write_midi`] writes format 0 at 480 ticks per quarter: a track name (the source title, if
//! any), the tempo, the time signature and key signature when the melody has them, then the
//! notes on channel 1 with explicit note-off events. Beats are rounded to the nearest tick.

use std::collections::BTreeMap;
use std::path::Path;

use midly::num::{u15, u24, u28, u4, u7};
use midly::{EventIter, Format, Header, MetaMessage, MidiMessage, Smf, Timing, TrackEvent, TrackEventKind};

use super::key::{Key, Mode};
use super::note::{Melody, Meter, Note, Source};

/// Why a MIDI file gave no melodies.
#[derive(Debug, thiserror::Error)]
pub enum MidiError {
    /// The bytes are not a readable Standard MIDI File (no `MThd` header, bad header fields).
    #[error("{path}: not a readable MIDI file: {source}")]
    Parse {
        /// The file's path as given to the reader.
        path: String,
        /// What midly found wrong.
        source: midly::Error,
    },
    /// SMPTE time division, which has no beats to put notes on.
    #[error("{path}: SMPTE timecode timing is not supported (only ticks per quarter note)")]
    SmpteTiming {
        /// The file's path as given to the reader.
        path: String,
    },
    /// The header gives 0 ticks per quarter note, so no tick has a time in beats.
    #[error("{path}: the header gives 0 ticks per quarter note")]
    ZeroTicksPerQuarter {
        /// The file's path as given to the reader.
        path: String,
    },
    /// The file ends inside a chunk: it was cut short.
    #[error(
        "{path}: truncated: the chunk at byte {offset_bytes} needs {needed_bytes} bytes but only \
         {available_bytes} remain"
    )]
    Truncated {
        /// The file's path as given to the reader.
        path: String,
        /// Where the chunk starts, in bytes from the start of the file.
        offset_bytes: usize,
        /// Bytes the chunk needs from its start: its 8-byte header plus its declared length.
        needed_bytes: u64,
        /// Bytes left in the file from the chunk's start.
        available_bytes: usize,
    },
    /// The file holds fewer track chunks than its header declares.
    #[error("{path}: the header declares {declared} tracks but the file holds {found}")]
    MissingTracks {
        /// The file's path as given to the reader.
        path: String,
        /// Track count in the header.
        declared: u16,
        /// Track chunks found.
        found: usize,
    },
    /// An event that cannot be parsed (a missing status byte, a system message, a cut event).
    #[error("{path}: track {track_idx}: unreadable event at byte {offset_bytes} of the track data")]
    BadEvent {
        /// The file's path as given to the reader.
        path: String,
        /// 0-based index of the track chunk.
        track_idx: usize,
        /// Where the event starts, in bytes from the start of the track's data.
        offset_bytes: usize,
    },
    /// A track whose data ends without an End of Track event.
    #[error("{path}: track {track_idx} ends without an End of Track event")]
    MissingEndOfTrack {
        /// The file's path as given to the reader.
        path: String,
        /// 0-based index of the track chunk.
        track_idx: usize,
    },
    /// The file could not be read from disk.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Every track was empty or drums.
    #[error("{path}: no melodic notes (drum channel 10 is ignored)")]
    NoNotes {
        /// The file's path as given to the reader.
        path: String,
    },
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

/// Ticks per quarter note of the files `write_midi` writes.
pub const WRITE_TICKS_PER_QUARTER: u16 = 480;

/// Tempo `write_midi` writes when it is given one that is not a positive finite number; the
/// SMF default.
pub const DEFAULT_TEMPO_QPM: f64 = 120.0;

/// Channel index (0-based) of General MIDI drums, channel 10 to musicians.
const DRUM_CHANNEL_IDX: u8 = 9;

/// Reads the melodies of a Standard MIDI File. `path` is used in sources and errors only.
///
/// Returns at least one melody, or an error: see the module documentation for what is read,
/// how melodies are chosen and which damage is refused.
pub fn parse_midi(bytes: &[u8], path: &str, choice: MelodyChoice) -> Result<Vec<Melody>, MidiError> {
    let mut file = read_file(bytes, path)?;
    let mut groups = Vec::new();
    for (track_idx, track) in file.tracks.iter_mut().enumerate() {
        for notes in std::mem::take(&mut track.notes_by_channel).into_values() {
            if !notes.is_empty() {
                groups.push(Group::new(track_idx, notes));
            }
        }
    }
    if groups.is_empty() {
        return Err(MidiError::NoNotes { path: path.to_string() });
    }
    let chosen: Vec<Group> = match choice {
        MelodyChoice::EveryTrack => groups,
        MelodyChoice::MainTrack => {
            let best = groups
                .into_iter()
                .enumerate()
                .max_by(|(a_idx, a), (b_idx, b)| {
                    a.score_milli
                        .cmp(&b.score_milli)
                        .then(a.mean_pitch.total_cmp(&b.mean_pitch))
                        // The earlier group wins a full tie, so it must compare as greater.
                        .then(b_idx.cmp(a_idx))
                })
                .map(|(_, group)| group);
            best.into_iter().collect()
        }
    };
    Ok(chosen.into_iter().enumerate().map(|(idx, group)| file.melody(group, path, idx)).collect())
}

/// Every non-drum note of a Standard MIDI File, all tracks and channels together, as played:
/// polyphonic music for the chord model. Sorted by onset, then pitch; notes may overlap. Errors
/// as [`parse_midi`]'s.
pub fn parse_midi_notes(bytes: &[u8], path: &str) -> Result<Vec<Note>, MidiError> {
    let file = read_file(bytes, path)?;
    let tpq = file.ticks_per_quarter as f64;
    let mut notes: Vec<Note> = file
        .tracks
        .iter()
        .flat_map(|track| track.notes_by_channel.values().flatten())
        .filter_map(|n| {
            let start_beats = n.start_ticks as f64 / tpq;
            let len_beats = fit_len_beats(start_beats, n.end_ticks as f64 / tpq)?;
            Some(Note { pitch: n.pitch, velocity: n.velocity, start_beats, len_beats })
        })
        .collect();
    if notes.is_empty() {
        return Err(MidiError::NoNotes { path: path.to_string() });
    }
    notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats).then(a.pitch.cmp(&b.pitch)));
    Ok(notes)
}

/// Reads the file at `path` and parses it with [`parse_midi_notes`].
pub fn read_midi_notes(path: &Path) -> Result<Vec<Note>, MidiError> {
    let path_text = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| MidiError::Read { path: path_text.clone(), source })?;
    parse_midi_notes(&bytes, &path_text)
}

/// Reads the file at `path` and parses it with [`parse_midi`].
pub fn read_midi_file(path: &Path, choice: MelodyChoice) -> Result<Vec<Melody>, MidiError> {
    let path_text = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| MidiError::Read { path: path_text.clone(), source })?;
    parse_midi(&bytes, &path_text, choice)
}

/// Writes `melody` as a format-0 Standard MIDI File at `tempo_qpm`. Overlapping notes (a chord
/// answer's) are written as they are (quarter notes per minute;
/// not positive or not finite means [`DEFAULT_TEMPO_QPM`]).
///
/// One track at [`WRITE_TICKS_PER_QUARTER`]: the source title as track name, the tempo, the
/// meter if it has a power-of-two denominator, the key signature (modes other than major and
/// minor are written with their signature and the major flag, so they read back as major),
/// then the notes on channel 1. Beats are rounded to the nearest tick; a note never becomes
/// shorter than one tick, and notes with a start that is not finite or past about 8.9 million
/// beats are left out. At a shared
/// tick, note-offs come before note-ons, so a repeated pitch reads back as two notes. The End
/// of Track event is at `melody.end_beats` or the last note-off, whichever is later.
pub fn write_midi(melody: &Melody, tempo_qpm: f64) -> Vec<u8> {
    let mut timed: Vec<(u64, TimedOrder, TrackEventKind<'_>)> = Vec::new();
    if let Some(title) = &melody.source.title {
        // Capped so a pathological title cannot reach midly's 256 MB event limit.
        timed.push((
            0,
            TimedOrder::Meta,
            TrackEventKind::Meta(MetaMessage::TrackName(cap_bytes(title, 4096))),
        ));
    }
    let tempo_qpm = if tempo_qpm.is_finite() && tempo_qpm > 0.0 { tempo_qpm } else { DEFAULT_TEMPO_QPM };
    let micros_per_quarter = (60_000_000.0 / tempo_qpm).round().clamp(1.0, u24::max_value().as_int() as f64);
    timed.push((
        0,
        TimedOrder::Meta,
        TrackEventKind::Meta(MetaMessage::Tempo(u24::new(micros_per_quarter as u32))),
    ));
    if let Some(meter) = melody.meter {
        if meter.numerator > 0 && meter.denominator.is_power_of_two() {
            let denominator_log2 = meter.denominator.trailing_zeros() as u8;
            // 24 MIDI clocks per metronome click and 8 thirty-seconds per quarter: the usual values.
            let time_signature = MetaMessage::TimeSignature(meter.numerator, denominator_log2, 24, 8);
            timed.push((0, TimedOrder::Meta, TrackEventKind::Meta(time_signature)));
        }
    }
    if let Some(key) = melody.key {
        if (-7..=7).contains(&key.fifths) {
            let key_signature = MetaMessage::KeySignature(key.fifths, key.mode == Mode::Minor);
            timed.push((0, TimedOrder::Meta, TrackEventKind::Meta(key_signature)));
        }
    }
    let mut last_ticks = 0u64;
    for note in &melody.notes {
        let start_ticks = beats_to_ticks(note.start_beats);
        if !note.start_beats.is_finite() || start_ticks >= MAX_WRITE_TICKS || note.pitch > 127 {
            continue;
        }
        let end_ticks = beats_to_ticks(note.end_beats()).clamp(start_ticks + 1, MAX_WRITE_TICKS);
        let key = u7::new(note.pitch);
        let on = MidiMessage::NoteOn { key, vel: u7::new(note.velocity.clamp(1, 127)) };
        let off = MidiMessage::NoteOff { key, vel: u7::new(64) };
        let channel = u4::new(0);
        timed.push((start_ticks, TimedOrder::NoteOn, TrackEventKind::Midi { channel, message: on }));
        timed.push((end_ticks, TimedOrder::NoteOff, TrackEventKind::Midi { channel, message: off }));
        last_ticks = last_ticks.max(end_ticks);
    }
    // Stable: events of one kind at one tick keep the melody's order.
    timed.sort_by_key(|(ticks, order, _)| (*ticks, *order));
    let end_ticks =
        if melody.end_beats.is_finite() { beats_to_ticks(melody.end_beats).min(MAX_WRITE_TICKS) } else { 0 };
    timed.push((end_ticks.max(last_ticks), TimedOrder::Meta, TrackEventKind::Meta(MetaMessage::EndOfTrack)));

    let mut track = Vec::with_capacity(timed.len());
    let mut now_ticks = 0u64;
    for (ticks, _, kind) in timed {
        let mut delta_ticks = ticks.saturating_sub(now_ticks);
        // A gap longer than a delta time can hold is bridged with empty marker events.
        let max_delta = u64::from(u28::max_value().as_int());
        while delta_ticks > max_delta {
            track.push(TrackEvent {
                delta: u28::max_value(),
                kind: TrackEventKind::Meta(MetaMessage::Marker(b"")),
            });
            delta_ticks -= max_delta;
        }
        track.push(TrackEvent { delta: u28::new(delta_ticks as u32), kind });
        now_ticks = now_ticks.max(ticks);
    }
    let header = Header::new(Format::SingleTrack, Timing::Metrical(u15::new(WRITE_TICKS_PER_QUARTER)));
    let smf = Smf { header, tracks: vec![track] };
    let mut bytes = Vec::new();
    // Writing to memory fails only past the SMF size limits: a track of 4 GB or an event of
    // 256 MB, which one track of a melody with a capped title cannot reach in memory.
    smf.write(&mut bytes).expect("a melody's single track stays under the SMF size limits");
    bytes
}

/// Writes `melody` to `path` as [`write_midi`] does.
pub fn write_midi_file(path: &Path, melody: &Melody, tempo_qpm: f64) -> std::io::Result<()> {
    std::fs::write(path, write_midi(melody, tempo_qpm))
}

/// Latest tick `write_midi` writes, about 8.9 million beats in: notes that start later are
/// left out and later ends are cut here, which bounds the file however wild the melody's times.
const MAX_WRITE_TICKS: u64 = u32::MAX as u64;

/// Order of events that share a tick in `write_midi`: metadata, then note-offs, then note-ons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimedOrder {
    Meta,
    NoteOff,
    NoteOn,
}

/// Beats to the nearest tick at [`WRITE_TICKS_PER_QUARTER`]; negative beats become tick 0.
fn beats_to_ticks(beats: f64) -> u64 {
    // `as` saturates: huge beats give u64::MAX rather than wrapping.
    (beats * WRITE_TICKS_PER_QUARTER as f64).round().max(0.0) as u64
}

/// The first `max_bytes` bytes of `text`, cut at a character boundary.
fn cap_bytes(text: &str, max_bytes: usize) -> &[u8] {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// A note in ticks, as read: half-open `[start_ticks, end_ticks)`, `end_ticks > start_ticks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TickNote {
    pitch: u8,
    velocity: u8,
    start_ticks: u64,
    end_ticks: u64,
}

/// A metadata value and the tick it appears at.
#[derive(Clone, Copy, Debug)]
struct Timed<T> {
    ticks: u64,
    value: T,
}

/// What one track chunk holds.
#[derive(Debug, Default)]
struct TrackData {
    /// The first track name, trimmed; `None` when absent or blank.
    name: Option<String>,
    /// Notes by channel index (drums left out), in the order they ended.
    notes_by_channel: BTreeMap<u8, Vec<TickNote>>,
    /// The first tempo, in quarter notes per minute.
    tempo_qpm: Option<Timed<f64>>,
    /// The first key signature.
    key: Option<Timed<Key>>,
    /// The first time signature.
    meter: Option<Timed<Meter>>,
}

/// A whole file, read.
#[derive(Debug)]
struct MidiFile {
    format: Format,
    ticks_per_quarter: u16,
    tracks: Vec<TrackData>,
}

impl MidiFile {
    /// The earliest value `field` picks across tracks (lowest track on a tie); in format 2 only
    /// `track_idx`'s own.
    fn first<T: Copy>(&self, track_idx: usize, field: impl Fn(&TrackData) -> Option<Timed<T>>) -> Option<T> {
        if self.format == Format::Sequential {
            return field(&self.tracks[track_idx]).map(|timed| timed.value);
        }
        let mut best: Option<Timed<T>> = None;
        for timed in self.tracks.iter().filter_map(&field) {
            if best.is_none_or(|b| timed.ticks < b.ticks) {
                best = Some(timed);
            }
        }
        best.map(|timed| timed.value)
    }

    /// The melody of `group`, the `melody_idx`-th one returned from this file.
    fn melody(&self, group: Group, path: &str, melody_idx: usize) -> Melody {
        let tpq = self.ticks_per_quarter as f64;
        let notes: Vec<Note> = group
            .top
            .iter()
            .filter_map(|n| {
                let start_beats = n.start_ticks as f64 / tpq;
                let end_beats = n.end_ticks as f64 / tpq;
                let len_beats = fit_len_beats(start_beats, end_beats)?;
                Some(Note { pitch: n.pitch, velocity: n.velocity, start_beats, len_beats })
            })
            .collect();
        let end_beats = notes.last().map_or(0.0, Note::end_beats);
        Melody {
            notes,
            end_beats,
            key: self.first(group.track_idx, |t| t.key),
            meter: self.first(group.track_idx, |t| t.meter),
            pickup_beats: 0.0,
            tempo_qpm: self.first(group.track_idx, |t| t.tempo_qpm),
            source: Source {
                path: path.to_string(),
                index: melody_idx,
                number: None,
                title: self.tracks[group.track_idx].name.clone(),
            },
        }
    }
}

/// The length of a note from `start_beats` to `end_beats` such that `start_beats + len` does
/// not pass `end_beats` in floating point, so a note never overlaps the next one by an ulp;
/// `None` when the two are equal (only for ticks beyond 2^53, where `f64` loses whole ticks).
fn fit_len_beats(start_beats: f64, end_beats: f64) -> Option<f64> {
    // `end - start` is exact when start >= end / 2 (Sterbenz); otherwise the length is at
    // least half the end, its ulp close to the end's, and a step or two down is enough.
    let mut len_beats = end_beats - start_beats;
    for _ in 0..8 {
        if start_beats + len_beats <= end_beats {
            break;
        }
        len_beats = len_beats.next_down();
    }
    (len_beats > 0.0 && start_beats + len_beats <= end_beats).then_some(len_beats)
}

/// The notes of one (track, channel) pair, reduced and scored.
#[derive(Debug)]
struct Group {
    track_idx: usize,
    /// The skyline: sorted, never overlapping.
    top: Vec<TickNote>,
    /// How melodic the group is, in thousandths (see the module documentation).
    score_milli: i64,
    /// Mean pitch of `top`.
    mean_pitch: f64,
}

impl Group {
    fn new(track_idx: usize, notes: Vec<TickNote>) -> Self {
        let num_notes = notes.len();
        let top = skyline(notes);
        let mean_pitch = top.iter().map(|n| n.pitch as f64).sum::<f64>() / top.len().max(1) as f64;
        let lowest = top.iter().map(|n| n.pitch).min().unwrap_or(0);
        let highest = top.iter().map(|n| n.pitch).max().unwrap_or(0);
        let range_semitones = (highest - lowest) as f64;
        let monophony = top.len() as f64 / num_notes.max(1) as f64;
        // Full credit from 90 % of notes kept: a divisi chord at a cadence must not hand the
        // choice to a lower voice.
        let mostly_monophonic = ((monophony - 0.5) / 0.4).clamp(0.0, 1.0);
        let enough_notes = (top.len() as f64 / 16.0).min(1.0);
        let singable_range = ((48.0 - range_semitones) / 24.0).clamp(0.0, 1.0);
        let register = ((mean_pitch - 43.0) / 30.0).clamp(0.0, 1.0);
        let score = 2.0 * mostly_monophonic + 2.0 * enough_notes + singable_range + 2.0 * register;
        Self { track_idx, top, score_milli: (score * 1000.0).round() as i64, mean_pitch }
    }
}

/// The highest voice of `notes`: where notes overlap the higher wins; a lower note cut short by
/// a higher onset is truncated, and a note that starts while one at least as high sounds is
/// dropped. The result is sorted by onset and never overlaps.
fn skyline(mut notes: Vec<TickNote>) -> Vec<TickNote> {
    notes.sort_by(|a, b| {
        a.start_ticks.cmp(&b.start_ticks).then(b.pitch.cmp(&a.pitch)).then(b.end_ticks.cmp(&a.end_ticks))
    });
    let mut top: Vec<TickNote> = Vec::with_capacity(notes.len());
    for note in notes {
        match top.last_mut() {
            Some(sounding) if note.start_ticks < sounding.end_ticks => {
                // Sorting puts the highest of simultaneous onsets first, so a higher note here
                // always starts after the sounding one and leaves it a positive length.
                if note.pitch > sounding.pitch && note.start_ticks > sounding.start_ticks {
                    sounding.end_ticks = note.start_ticks;
                    top.push(note);
                }
            }
            _ => top.push(note),
        }
    }
    top
}

/// Parses the header and every track of `bytes`, refusing damage (see the module docs).
fn read_file(bytes: &[u8], path: &str) -> Result<MidiFile, MidiError> {
    let parse_error = |source| MidiError::Parse { path: path.to_string(), source };
    let smf_bytes = if bytes.starts_with(b"RIFF") {
        const NOT_RMID: midly::ErrorKind =
            midly::ErrorKind::Invalid("a RIFF file without an RMID data chunk");
        unwrap_rmid(bytes).ok_or_else(|| parse_error(midly::Error::new(&NOT_RMID)))?
    } else {
        bytes
    };
    if let Some((header_len, division)) = header_fields(smf_bytes) {
        // midly negates the frame-rate byte of an SMPTE division, which overflows for 0x80 and
        // panics where overflow checks are on; no SMPTE division is readable here anyway.
        if division & 0x8000 != 0 {
            return Err(MidiError::SmpteTiming { path: path.to_string() });
        }
        // midly quietly reads a header chunk that runs past the end of the file.
        if 8 + header_len > smf_bytes.len() as u64 {
            return Err(MidiError::Truncated {
                path: path.to_string(),
                offset_bytes: offset_in(bytes, smf_bytes),
                needed_bytes: 8 + header_len,
                available_bytes: smf_bytes.len(),
            });
        }
    }
    let (header, track_iter) = midly::parse(smf_bytes).map_err(parse_error)?;
    let ticks_per_quarter = match header.timing {
        Timing::Metrical(tpq) if tpq.as_int() == 0 => {
            return Err(MidiError::ZeroTicksPerQuarter { path: path.to_string() })
        }
        Timing::Metrical(tpq) => tpq.as_int(),
        Timing::Timecode(..) => return Err(MidiError::SmpteTiming { path: path.to_string() }),
    };
    // The track count is not in `Header`; the fresh iterator's size hint is the declared one.
    let declared_tracks = track_iter.size_hint().0.min(u16::MAX as usize) as u16;
    let chunks = track_iter.unread();
    let chunks_offset = offset_in(bytes, chunks);
    let mut tracks = Vec::new();
    let mut rest = chunks;
    while !rest.is_empty() {
        let offset_bytes = chunks_offset + (chunks.len() - rest.len());
        let needed_bytes = match rest.get(4..8) {
            Some(len) => 8 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as u64,
            None => 8,
        };
        if needed_bytes > rest.len() as u64 {
            if tracks.len() >= declared_tracks as usize {
                // Trailing padding or junk after every declared track: nothing is lost.
                break;
            }
            return Err(MidiError::Truncated {
                path: path.to_string(),
                offset_bytes,
                needed_bytes,
                available_bytes: rest.len(),
            });
        }
        let (chunk, after) = rest.split_at(needed_bytes as usize);
        rest = after;
        if &chunk[..4] == b"MTrk" {
            tracks.push(read_track(&chunk[8..], tracks.len(), path)?);
        }
        // Any other chunk type, including a second `MThd`, is skipped as the SMF spec asks.
    }
    if tracks.len() < declared_tracks as usize {
        return Err(MidiError::MissingTracks {
            path: path.to_string(),
            declared: declared_tracks,
            found: tracks.len(),
        });
    }
    Ok(MidiFile { format: header.format, ticks_per_quarter, tracks })
}

/// Where `part`, a sub-slice of `whole`, starts in it, in bytes.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize)
}

/// The declared length and the division of an `MThd` chunk at the start of `smf_bytes`, when
/// the chunk is long enough to hold them.
fn header_fields(smf_bytes: &[u8]) -> Option<(u64, u16)> {
    if !smf_bytes.starts_with(b"MThd") || smf_bytes.len() < 14 {
        return None;
    }
    let header_len = u32::from_be_bytes([smf_bytes[4], smf_bytes[5], smf_bytes[6], smf_bytes[7]]) as u64;
    (header_len >= 6).then(|| (header_len, u16::from_be_bytes([smf_bytes[12], smf_bytes[13]])))
}

/// The Standard MIDI File inside an RMID file (`RIFF` ... `RMID` ... `data`). Like midly, a
/// chunk cut short is taken to the end of the file; the SMF checks then find the damage.
fn unwrap_rmid(bytes: &[u8]) -> Option<&[u8]> {
    let riff_len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    let riff = bytes.get(8..)?;
    let riff = &riff[..riff_len.min(riff.len())];
    let (form, mut rest) = riff.split_at_checked(4)?;
    if form != b"RMID" {
        return None;
    }
    while rest.len() >= 8 {
        let (id, len) = (&rest[..4], u32::from_le_bytes(rest[4..8].try_into().ok()?) as usize);
        let data = &rest[8..8 + len.min(rest.len() - 8)];
        if id == b"data" {
            return Some(data);
        }
        // Chunks are padded to an even length.
        rest = rest.get(8 + len + len % 2..).unwrap_or(&[]);
    }
    None
}

/// Reads the events of one track chunk's data.
fn read_track(data: &[u8], track_idx: usize, path: &str) -> Result<TrackData, MidiError> {
    let mut track = TrackData::default();
    let mut notes = NotePairing::default();
    let mut now_ticks = 0u64;
    let mut events = EventIter::new(data);
    loop {
        let unread = events.unread();
        let event = match events.next() {
            Some(Ok(event)) => event,
            None if unread.is_empty() => {
                return Err(MidiError::MissingEndOfTrack { path: path.to_string(), track_idx })
            }
            // Without midly's `strict` feature a bad event ends the iterator early; with it, it
            // is an `Err`. Either way the event at `unread` could not be read.
            _ => {
                return Err(MidiError::BadEvent {
                    path: path.to_string(),
                    track_idx,
                    offset_bytes: data.len() - unread.len(),
                })
            }
        };
        now_ticks += u64::from(event.delta.as_int());
        match event.kind {
            TrackEventKind::Midi { channel, message } => match message {
                MidiMessage::NoteOn { key, vel } if vel.as_int() > 0 => {
                    notes.note_on(channel.as_int(), key.as_int(), vel.as_int(), now_ticks)
                }
                MidiMessage::NoteOn { key, .. } | MidiMessage::NoteOff { key, .. } => {
                    notes.note_off(channel.as_int(), key.as_int(), now_ticks)
                }
                _ => {}
            },
            TrackEventKind::Meta(meta) => match meta {
                MetaMessage::EndOfTrack => break,
                MetaMessage::TrackName(name) if track.name.is_none() => track.name = decode_text(name),
                MetaMessage::Tempo(micros) if track.tempo_qpm.is_none() && micros.as_int() > 0 => {
                    let value = 60_000_000.0 / micros.as_int() as f64;
                    track.tempo_qpm = Some(Timed { ticks: now_ticks, value });
                }
                MetaMessage::TimeSignature(numerator, denominator_log2, _, _)
                    if track.meter.is_none() && numerator > 0 && denominator_log2 < 8 =>
                {
                    let value = Meter { numerator, denominator: 1 << denominator_log2 };
                    track.meter = Some(Timed { ticks: now_ticks, value });
                }
                MetaMessage::KeySignature(fifths, is_minor)
                    if track.key.is_none() && (-7..=7).contains(&fifths) =>
                {
                    let value = Key { fifths, mode: if is_minor { Mode::Minor } else { Mode::Major } };
                    track.key = Some(Timed { ticks: now_ticks, value });
                }
                _ => {}
            },
            TrackEventKind::SysEx(_) | TrackEventKind::Escape(_) => {}
        }
    }
    track.notes_by_channel = notes.finish(now_ticks);
    Ok(track)
}

/// Text of a meta event: UTF-8 when valid, else Latin-1; trimmed, `None` when blank.
fn decode_text(bytes: &[u8]) -> Option<String> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().map(|&b| b as char).collect(),
    };
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!text.is_empty()).then(|| text.to_string())
}

/// A note that has started and not yet ended.
#[derive(Clone, Copy, Debug)]
struct OpenNote {
    start_ticks: u64,
    velocity: u8,
    /// True while a note-off at `start_ticks` would belong to the earlier note of this pitch
    /// that this one cut short (see the module docs).
    owes_off_to_earlier: bool,
}

/// Pairs note-ons with note-offs per (channel, pitch), as the module docs describe.
#[derive(Default)]
struct NotePairing {
    /// Sounding notes by `(channel_idx, pitch)`. A map, not a 16 × 128 table, so that a file of
    /// many small tracks costs little.
    open: BTreeMap<(u8, u8), OpenNote>,
    /// Finished notes by channel index.
    done: BTreeMap<u8, Vec<TickNote>>,
}

impl NotePairing {
    fn note_on(&mut self, channel_idx: u8, pitch: u8, velocity: u8, now_ticks: u64) {
        if channel_idx == DRUM_CHANNEL_IDX {
            return;
        }
        let cut_short = self.open.remove(&(channel_idx, pitch));
        if let Some(earlier) = cut_short {
            self.close(channel_idx, pitch, earlier, now_ticks);
        }
        let note = OpenNote { start_ticks: now_ticks, velocity, owes_off_to_earlier: cut_short.is_some() };
        self.open.insert((channel_idx, pitch), note);
    }

    fn note_off(&mut self, channel_idx: u8, pitch: u8, now_ticks: u64) {
        let Some(open) = self.open.get_mut(&(channel_idx, pitch)) else {
            return;
        };
        if open.owes_off_to_earlier && open.start_ticks == now_ticks {
            open.owes_off_to_earlier = false;
        } else if let Some(open) = self.open.remove(&(channel_idx, pitch)) {
            self.close(channel_idx, pitch, open, now_ticks);
        }
    }

    fn close(&mut self, channel_idx: u8, pitch: u8, open: OpenNote, end_ticks: u64) {
        // Notes of zero length are dropped.
        if end_ticks > open.start_ticks {
            let note = TickNote { pitch, velocity: open.velocity, start_ticks: open.start_ticks, end_ticks };
            self.done.entry(channel_idx).or_default().push(note);
        }
    }

    /// Ends every sounding note at `end_ticks` (the End of Track) and returns the notes.
    fn finish(mut self, end_ticks: u64) -> BTreeMap<u8, Vec<TickNote>> {
        for ((channel_idx, pitch), open) in std::mem::take(&mut self.open) {
            self.close(channel_idx, pitch, open, end_ticks);
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::note::tests::melody;
    use rand::{Rng, SeedableRng};

    /// One event of a test file: its absolute tick and what it is.
    type Ev = (u64, TrackEventKind<'static>);

    fn on(ticks: u64, channel_idx: u8, pitch: u8, velocity: u8) -> Ev {
        let message = MidiMessage::NoteOn { key: u7::new(pitch), vel: u7::new(velocity) };
        (ticks, TrackEventKind::Midi { channel: u4::new(channel_idx), message })
    }

    fn off(ticks: u64, channel_idx: u8, pitch: u8) -> Ev {
        let message = MidiMessage::NoteOff { key: u7::new(pitch), vel: u7::new(64) };
        (ticks, TrackEventKind::Midi { channel: u4::new(channel_idx), message })
    }

    fn meta(ticks: u64, message: MetaMessage<'static>) -> Ev {
        (ticks, TrackEventKind::Meta(message))
    }

    /// `(pitch, start_ticks, len_ticks)` notes on `channel_idx` as on/off events.
    fn notes(channel_idx: u8, notes: &[(u8, u64, u64)]) -> Vec<Ev> {
        let mut events: Vec<Ev> = Vec::new();
        for &(pitch, start, len) in notes {
            events.push(on(start, channel_idx, pitch, 90));
            events.push(off(start + len, channel_idx, pitch));
        }
        // Offs before ons at a shared tick, as a careful writer does.
        events.sort_by_key(|(ticks, kind)| {
            (*ticks, matches!(kind, TrackEventKind::Midi { message: MidiMessage::NoteOn { .. }, .. }))
        });
        events
    }

    /// A track of `events` (in file order, ticks non-decreasing), closed by an End of Track at
    /// the last event's tick.
    fn track(events: Vec<Ev>) -> Vec<TrackEvent<'static>> {
        let end_ticks = events.last().map_or(0, |(ticks, _)| *ticks);
        track_ending_at(events, end_ticks)
    }

    fn track_ending_at(mut events: Vec<Ev>, end_ticks: u64) -> Vec<TrackEvent<'static>> {
        events.push(meta(end_ticks, MetaMessage::EndOfTrack));
        track_without_end(events)
    }

    fn track_without_end(events: Vec<Ev>) -> Vec<TrackEvent<'static>> {
        let mut now = 0;
        events
            .into_iter()
            .map(|(ticks, kind)| {
                assert!(ticks >= now, "test events out of order");
                let delta = u28::new((ticks - now) as u32);
                now = ticks;
                TrackEvent { delta, kind }
            })
            .collect()
    }

    /// The bytes of a Standard MIDI File, written by midly.
    fn smf(format: Format, ticks_per_quarter: u16, tracks: Vec<Vec<TrackEvent<'static>>>) -> Vec<u8> {
        let smf = Smf { header: Header::new(format, Timing::Metrical(u15::new(ticks_per_quarter))), tracks };
        let mut bytes = Vec::new();
        smf.write(&mut bytes).unwrap();
        bytes
    }

    /// A format-0 file at 480 ticks per quarter with `(pitch, start_ticks, len_ticks)` on channel 1.
    fn one_voice_file(voice: &[(u8, u64, u64)]) -> Vec<u8> {
        smf(Format::SingleTrack, 480, vec![track(notes(0, voice))])
    }

    /// A raw chunk: id, big-endian length, data.
    fn chunk(id: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut bytes = id.to_vec();
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    /// Size of the `MThd` chunk midly writes.
    const HEADER_CHUNK_BYTES: usize = 14;

    fn parse(bytes: &[u8], choice: MelodyChoice) -> Result<Vec<Melody>, MidiError> {
        parse_midi(bytes, "test.mid", choice)
    }

    fn parse_one(bytes: &[u8]) -> Melody {
        let mut melodies = parse(bytes, MelodyChoice::MainTrack).unwrap();
        assert_eq!(melodies.len(), 1);
        melodies.remove(0)
    }

    /// `(pitch, start_ticks, len_ticks)` of a melody read at `ticks_per_quarter`.
    fn ticks_of(melody: &Melody, ticks_per_quarter: f64) -> Vec<(u8, u64, u64)> {
        let to_ticks = |beats: f64| {
            let ticks = beats * ticks_per_quarter;
            assert!((ticks - ticks.round()).abs() < 1e-6, "{beats} beats is not on a tick");
            ticks.round() as u64
        };
        melody.notes.iter().map(|n| (n.pitch, to_ticks(n.start_beats), to_ticks(n.len_beats))).collect()
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../../tests/data/midi/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn round_trip_keeps_notes_and_metadata() {
        // A rest at the start, the lowest and highest pitches, and a repeated pitch whose
        // note-off and next note-on share a tick.
        let mut written =
            melody(&[(0, 0.75, 0.25), (127, 1.0, 0.5), (60, 1.5, 1.0), (60, 2.5, 1.0), (61, 4.0, 0.125)]);
        written.notes[1].velocity = 127;
        written.notes[2].velocity = 1;
        written.key = Some(Key { fifths: -3, mode: Mode::Minor });
        written.meter = Some(Meter { numerator: 6, denominator: 8 });
        written.source.title = Some("Round trip".to_string());
        written.end_beats = 6.0;
        let bytes = write_midi(&written, 90.0);
        for choice in [MelodyChoice::MainTrack, MelodyChoice::EveryTrack] {
            let read = parse(&bytes, choice).unwrap();
            assert_eq!(read.len(), 1);
            let read = &read[0];
            assert_eq!(read.notes, written.notes);
            assert_eq!(read.key, written.key);
            assert_eq!(read.meter, written.meter);
            // 60e6 / 90 µs per quarter is rounded to a whole microsecond.
            assert!((read.tempo_qpm.unwrap() - 90.0).abs() < 1e-4);
            // The trailing rest is not read back: the melody ends with its last note.
            assert_eq!(read.end_beats, 4.125);
            assert_eq!(read.pickup_beats, 0.0);
            let expected_source =
                Source { path: "test.mid".into(), index: 0, number: None, title: Some("Round trip".into()) };
            assert_eq!(read.source, expected_source);
        }
    }

    #[test]
    fn written_files_are_format_0_with_explicit_note_offs() {
        let mut written = melody(&[(64, 0.0, 1.0), (64, 1.0, 1.0)]);
        written.key = Some(Key { fifths: 2, mode: Mode::Dorian });
        written.meter = Some(Meter { numerator: 5, denominator: 6 }); // no MIDI spelling: left out
        let bytes = write_midi(&written, 150.0);
        let smf = Smf::parse(&bytes).unwrap();
        assert_eq!(smf.header.format, Format::SingleTrack);
        assert_eq!(smf.header.timing, Timing::Metrical(u15::new(480)));
        assert_eq!(smf.tracks.len(), 1);
        let mut now = 0;
        let mut seen = Vec::new();
        for event in &smf.tracks[0] {
            now += event.delta.as_int();
            match event.kind {
                TrackEventKind::Meta(MetaMessage::Tempo(micros)) => {
                    seen.push(format!("{now} tempo {micros}"))
                }
                TrackEventKind::Meta(MetaMessage::KeySignature(fifths, minor)) => {
                    seen.push(format!("{now} key {fifths} {minor}"))
                }
                TrackEventKind::Meta(MetaMessage::TimeSignature(..)) => seen.push(format!("{now} meter")),
                TrackEventKind::Meta(MetaMessage::EndOfTrack) => seen.push(format!("{now} end")),
                TrackEventKind::Midi { channel, message: MidiMessage::NoteOn { key, vel } } => {
                    seen.push(format!("{now} on {channel} {key} {vel}"))
                }
                TrackEventKind::Midi { channel, message: MidiMessage::NoteOff { key, .. } } => {
                    seen.push(format!("{now} off {channel} {key}"))
                }
                _ => seen.push(format!("{now} other")),
            }
        }
        assert_eq!(
            seen,
            [
                "0 tempo 400000",
                "0 key 2 false",
                "0 on 0 64 80",
                "480 off 0 64",
                "480 on 0 64 80",
                "960 off 0 64",
                "960 end"
            ]
        );
    }

    #[test]
    fn writing_rounds_to_ticks_and_repairs_bad_values() {
        // 1/1000 beat rounds to 0 ticks, so the note is kept one tick long; a start that is not
        // finite is left out; a bad tempo becomes the default.
        let mut written = melody(&[
            (60, 0.0, 0.001),
            (62, 1.0 / 3.0, 1.0 / 3.0),
            (64, f64::NAN, 1.0),
            (65, 1e300, 1.0),
            (66, f64::INFINITY, 1.0),
            // Further than one delta time reaches: bridged with empty markers.
            (67, 5_000_000.0, 1.0),
        ]);
        written.end_beats = f64::INFINITY;
        let read = parse_one(&write_midi(&written, -5.0));
        assert_eq!(ticks_of(&read, 480.0), [(60, 0, 1), (62, 160, 160), (67, 2_400_000_000, 480)]);
        assert_eq!(read.tempo_qpm, Some(DEFAULT_TEMPO_QPM));
        assert_eq!(parse_one(&write_midi(&written, f64::NAN)).tempo_qpm, Some(DEFAULT_TEMPO_QPM));
    }

    #[test]
    fn empty_melody_writes_a_file_without_notes() {
        let bytes = write_midi(&melody(&[]), 120.0);
        assert!(matches!(parse(&bytes, MelodyChoice::MainTrack), Err(MidiError::NoNotes { .. })));
    }

    #[test]
    fn times_are_ticks_over_division_exactly() {
        let voice = [(60, 0, 100), (62, 100, 200), (64, 1000, 7)];
        for tpq in [96u16, 192, 384, 1000, 1024, 10080] {
            let bytes = smf(Format::SingleTrack, tpq, vec![track(notes(0, &voice))]);
            let read = parse_one(&bytes);
            let tpq = tpq as f64;
            for (note, &(pitch, start, len)) in read.notes.iter().zip(&voice) {
                assert_eq!((note.pitch, note.start_beats), (pitch, start as f64 / tpq), "division {tpq}");
                assert_eq!(note.len_beats, (start + len) as f64 / tpq - start as f64 / tpq);
            }
            assert_eq!(read.notes.len(), 3);
            // 62 ends exactly where 64 would have started had it followed at once.
            assert!(read.notes[0].end_beats() <= read.notes[1].start_beats);
            assert_eq!(read.end_beats, 1007.0 / tpq);
        }
    }

    #[test]
    fn velocity_zero_note_on_is_a_note_off() {
        let events = vec![on(0, 0, 60, 100), on(480, 0, 60, 0), on(480, 0, 62, 70), on(960, 0, 62, 0)];
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![track(events)]));
        assert_eq!(ticks_of(&read, 480.0), [(60, 0, 480), (62, 480, 480)]);
        assert_eq!(read.notes[0].velocity, 100);
        assert_eq!(read.notes[1].velocity, 70);
    }

    #[test]
    fn overlapping_notes_of_one_pitch_split_at_the_second_onset() {
        // on@0, on@240, off@480, off@720: the second onset ends the first note, the first
        // note-off ends the newest, and the second note-off finds nothing to end.
        let events = vec![
            on(0, 0, 60, 90),
            on(240, 0, 60, 91),
            off(480, 0, 60),
            off(720, 0, 60),
            on(720, 0, 62, 90),
            off(960, 0, 62),
        ];
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![track(events)]));
        assert_eq!(ticks_of(&read, 480.0), [(60, 0, 240), (60, 240, 240), (62, 720, 240)]);
        assert_eq!(read.notes[1].velocity, 91);
    }

    #[test]
    fn note_on_before_note_off_at_a_shared_tick_keeps_both_notes() {
        // Some writers repeat a pitch as on@480 then off@480: the off belongs to the first note.
        let events = vec![on(0, 0, 60, 90), on(480, 0, 60, 90), off(480, 0, 60), off(960, 0, 60)];
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![track(events)]));
        assert_eq!(ticks_of(&read, 480.0), [(60, 0, 480), (60, 480, 480)]);
        // The usual order gives the same.
        let events = vec![on(0, 0, 60, 90), off(480, 0, 60), on(480, 0, 60, 90), off(960, 0, 60)];
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![track(events)]));
        assert_eq!(ticks_of(&read, 480.0), [(60, 0, 480), (60, 480, 480)]);
    }

    #[test]
    fn zero_length_notes_are_dropped_and_open_notes_end_with_the_track() {
        let events =
            vec![on(0, 0, 64, 90), off(0, 0, 64), on(480, 0, 65, 90), on(960, 0, 67, 90), off(1200, 0, 67)];
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![track_ending_at(events, 1920)]));
        // 65 never ends: the End of Track at 1920 ends it, and the skyline keeps its head.
        assert_eq!(ticks_of(&read, 480.0), [(65, 480, 480), (67, 960, 240)]);
        assert_eq!(read.end_beats, 2.5);
        // A file of only zero-length notes has no notes.
        let events = vec![on(0, 0, 64, 90), off(0, 0, 64)];
        let err =
            parse(&smf(Format::SingleTrack, 480, vec![track(events)]), MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::NoNotes { .. }), "{err}");
    }

    #[test]
    fn drum_channel_is_ignored() {
        let mut events =
            notes(9, &[(36, 0, 240), (38, 240, 240), (42, 0, 120), (42, 120, 120), (36, 480, 240)]);
        events.extend(notes(0, &[(72, 0, 960)]));
        events.sort_by_key(|(ticks, _)| *ticks);
        let bytes = smf(Format::SingleTrack, 480, vec![track(events)]);
        let every = parse(&bytes, MelodyChoice::EveryTrack).unwrap();
        assert_eq!(every.len(), 1);
        assert_eq!(ticks_of(&every[0], 480.0), [(72, 0, 960)]);
        let only_drums =
            smf(Format::SingleTrack, 480, vec![track(notes(9, &[(36, 0, 240), (38, 240, 240)]))]);
        let err = parse(&only_drums, MelodyChoice::EveryTrack).unwrap_err();
        assert!(matches!(err, MidiError::NoNotes { .. }), "{err}");
        assert!(err.to_string().contains("test.mid"));
    }

    /// A walking bass: many notes, low.
    fn bass_line() -> Vec<(u8, u64, u64)> {
        (0..32).map(|i| ([36, 40, 43, 45][i % 4], i as u64 * 240, 240)).collect()
    }

    /// A tune: fewer notes than the bass, in a singing register.
    fn tune() -> Vec<(u8, u64, u64)> {
        vec![
            (67, 0, 960),
            (69, 960, 480),
            (71, 1440, 480),
            (72, 1920, 1920),
            (74, 3840, 960),
            (72, 4800, 960),
            (71, 5760, 1920),
        ]
    }

    /// Block chords under the tune.
    fn chords() -> Vec<(u8, u64, u64)> {
        (0..8u64).flat_map(|bar| [(60, bar * 960, 960), (64, bar * 960, 960), (67, bar * 960, 960)]).collect()
    }

    #[test]
    fn main_track_is_the_melody_not_the_bass_or_the_chords() {
        let name = |text: &'static str| meta(0, MetaMessage::TrackName(text.as_bytes()));
        let conductor = track(vec![meta(0, MetaMessage::Tempo(u24::new(500_000)))]);
        let with_name = |label, channel_idx, voice: &[(u8, u64, u64)]| {
            let mut events = vec![name(label)];
            events.extend(notes(channel_idx, voice));
            track(events)
        };
        let tracks = vec![
            conductor,
            with_name("Bass", 1, &bass_line()),
            with_name("Chords", 2, &chords()),
            with_name("Melody", 0, &tune()),
        ];
        let bytes = smf(Format::Parallel, 480, tracks);
        let main = parse_one(&bytes);
        assert_eq!(main.source.title.as_deref(), Some("Melody"));
        assert_eq!(ticks_of(&main, 480.0), tune());
        assert_eq!(main.tempo_qpm, Some(120.0));

        let every = parse(&bytes, MelodyChoice::EveryTrack).unwrap();
        let titles: Vec<_> = every.iter().map(|m| m.source.title.as_deref().unwrap()).collect();
        assert_eq!(titles, ["Bass", "Chords", "Melody"]);
        let indices: Vec<_> = every.iter().map(|m| m.source.index).collect();
        assert_eq!(indices, [0, 1, 2]);
        // The chords are reduced to their top note.
        assert_eq!(every[1].notes.iter().map(|n| n.pitch).collect::<Vec<_>>(), [67; 8]);
    }

    #[test]
    fn format_0_channels_are_separate_groups() {
        let mut events = notes(1, &bass_line());
        events.extend(notes(0, &tune()));
        events.extend(notes(2, &chords()));
        events.sort_by_key(|(ticks, kind)| {
            (*ticks, matches!(kind, TrackEventKind::Midi { message: MidiMessage::NoteOn { .. }, .. }))
        });
        let bytes = smf(Format::SingleTrack, 480, vec![track(events)]);
        let every = parse(&bytes, MelodyChoice::EveryTrack).unwrap();
        assert_eq!(every.len(), 3);
        assert_eq!(ticks_of(&every[0], 480.0), tune()); // channel 1 comes first
        assert_eq!(ticks_of(&every[1], 480.0), bass_line());
        assert_eq!(ticks_of(&parse_one(&bytes), 480.0), tune());
    }

    #[test]
    fn equal_scores_prefer_the_higher_voice() {
        // Two monophonic voices alike in all but register: the upper wins wherever it is.
        let upper: Vec<_> = tune().iter().map(|&(p, s, l)| (p + 5, s, l)).collect();
        for (first, second, expected) in [(&tune(), &upper, "B"), (&upper, &tune(), "A")] {
            let a = [vec![meta(0, MetaMessage::TrackName(b"A"))], notes(0, first)].concat();
            let b = [vec![meta(0, MetaMessage::TrackName(b"B"))], notes(1, second)].concat();
            let bytes = smf(Format::Parallel, 480, vec![track(a), track(b)]);
            assert_eq!(parse_one(&bytes).source.title.as_deref(), Some(expected));
        }
        // Identical voices: the first one.
        let a = [vec![meta(0, MetaMessage::TrackName(b"A"))], notes(0, &tune())].concat();
        let b = [vec![meta(0, MetaMessage::TrackName(b"B"))], notes(1, &tune())].concat();
        let bytes = smf(Format::Parallel, 480, vec![track(a), track(b)]);
        assert_eq!(parse_one(&bytes).source.title.as_deref(), Some("A"));
    }

    #[test]
    fn lengths_never_make_neighbours_overlap() {
        // Every pair of touching notes at many divisions: the first never ends past the second's
        // start in floating point.
        for tpq in [3u64, 7, 96, 100, 192, 480, 1000, 1024, 10080, 32767] {
            for start in (0..20_000u64).step_by(37) {
                for len in [1u64, 2, 3, 5, 7, 11, 100, 12345] {
                    let (start_beats, end_beats) =
                        (start as f64 / tpq as f64, (start + len) as f64 / tpq as f64);
                    let len_beats = fit_len_beats(start_beats, end_beats).unwrap();
                    assert!(start_beats + len_beats <= end_beats, "{tpq} {start} {len}");
                    assert!((len_beats - len as f64 / tpq as f64).abs() <= 4.0 * f64::EPSILON * end_beats);
                }
            }
        }
        assert_eq!(fit_len_beats(1.0, 1.0), None);
    }

    fn tick_note(pitch: u8, start_ticks: u64, end_ticks: u64) -> TickNote {
        TickNote { pitch, velocity: 80, start_ticks, end_ticks }
    }

    #[test]
    fn skyline_keeps_the_highest_voice() {
        let notes = vec![
            tick_note(60, 0, 100), // cut short by 67 at 50
            tick_note(67, 50, 150),
            tick_note(64, 100, 300), // starts under 67: dropped, though it outlasts it
            tick_note(72, 200, 250),
            tick_note(55, 200, 260), // same onset as 72, lower: dropped
            tick_note(72, 250, 300), // same pitch right after: kept
            tick_note(48, 300, 400), // after everything ended: kept
            tick_note(48, 300, 350), // duplicate onset and pitch, shorter: dropped
        ];
        let top = skyline(notes);
        let got: Vec<_> = top.iter().map(|n| (n.pitch, n.start_ticks, n.end_ticks)).collect();
        assert_eq!(got, [(60, 0, 50), (67, 50, 150), (72, 200, 250), (72, 250, 300), (48, 300, 400)]);
    }

    #[test]
    fn skyline_through_the_reader() {
        // A held bass note under a moving tune: the tune cuts it and the bass never returns.
        let events = notes(0, &[(48, 0, 1920), (72, 480, 480), (74, 960, 480)]);
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![track(events)]));
        assert_eq!(ticks_of(&read, 480.0), [(48, 0, 480), (72, 480, 480), (74, 960, 480)]);
        assert_eq!(read.end_beats, 3.0);
    }

    #[test]
    fn key_time_signature_and_tempo_come_from_the_first_events() {
        let conductor = track(vec![
            meta(0, MetaMessage::Tempo(u24::new(600_000))),
            meta(0, MetaMessage::TimeSignature(6, 3, 24, 8)),
            meta(960, MetaMessage::Tempo(u24::new(1_000_000))),
            meta(960, MetaMessage::KeySignature(2, false)),
            meta(1920, MetaMessage::TimeSignature(2, 2, 24, 8)),
        ]);
        let melody_track =
            [vec![meta(0, MetaMessage::KeySignature(-3, true))], notes(0, &[(60, 0, 480), (62, 1440, 960)])]
                .concat();
        let bytes = smf(Format::Parallel, 480, vec![conductor, track(melody_track)]);
        let read = parse_one(&bytes);
        assert_eq!(read.key, Some(Key { fifths: -3, mode: Mode::Minor }));
        assert_eq!(read.meter, Some(Meter { numerator: 6, denominator: 8 }));
        assert_eq!(read.tempo_qpm, Some(100.0));
        // The tempo change does not move notes: times are beats.
        assert_eq!(ticks_of(&read, 480.0), [(60, 0, 480), (62, 1440, 960)]);

        // Out-of-range signatures are ignored rather than trusted.
        let odd = track(
            [
                vec![
                    meta(0, MetaMessage::KeySignature(9, false)),
                    meta(0, MetaMessage::TimeSignature(3, 9, 24, 8)),
                ],
                notes(0, &[(60, 0, 480)]),
            ]
            .concat(),
        );
        let read = parse_one(&smf(Format::SingleTrack, 480, vec![odd]));
        assert_eq!((read.key, read.meter, read.tempo_qpm), (None, None, None));
    }

    #[test]
    fn format_2_tracks_are_independent_songs() {
        let song = |key: i8, tempo_micros: u32, voice: &[(u8, u64, u64)]| {
            let head = vec![
                meta(0, MetaMessage::KeySignature(key, false)),
                meta(0, MetaMessage::Tempo(u24::new(tempo_micros))),
            ];
            track([head, notes(0, voice)].concat())
        };
        let bytes = smf(
            Format::Sequential,
            480,
            vec![song(1, 500_000, &[(67, 480, 480)]), song(-2, 1_000_000, &[(70, 0, 960)])],
        );
        let every = parse(&bytes, MelodyChoice::EveryTrack).unwrap();
        assert_eq!(every.len(), 2);
        assert_eq!(every[0].key, Some(Key { fifths: 1, mode: Mode::Major }));
        assert_eq!(every[0].tempo_qpm, Some(120.0));
        assert_eq!(ticks_of(&every[0], 480.0), [(67, 480, 480)]);
        assert_eq!(every[1].key, Some(Key { fifths: -2, mode: Mode::Major }));
        assert_eq!(every[1].tempo_qpm, Some(60.0));
    }

    #[test]
    fn track_names_fall_back_to_latin_1_and_blank_is_none() {
        let named = |name: &'static [u8]| {
            let events = [vec![meta(0, MetaMessage::TrackName(name))], notes(0, &[(60, 0, 480)])].concat();
            parse_one(&smf(Format::SingleTrack, 480, vec![track(events)])).source.title
        };
        assert_eq!(named("Grüß Gott".as_bytes()).as_deref(), Some("Grüß Gott"));
        assert_eq!(named(b"Gr\xfc\xdf Gott\0").as_deref(), Some("Grüß Gott"));
        assert_eq!(named(b"  \0"), None);
    }

    #[test]
    fn smpte_and_zero_divisions_are_refused() {
        let events = || track(notes(0, &[(60, 0, 100)]));
        let smpte = Smf {
            header: Header::new(Format::SingleTrack, Timing::Timecode(midly::Fps::Fps25, 40)),
            tracks: vec![events()],
        };
        let mut bytes = Vec::new();
        smpte.write(&mut bytes).unwrap();
        assert!(matches!(parse(&bytes, MelodyChoice::MainTrack), Err(MidiError::SmpteTiming { .. })));
        let zero = smf(Format::SingleTrack, 0, vec![events()]);
        assert!(matches!(parse(&zero, MelodyChoice::MainTrack), Err(MidiError::ZeroTicksPerQuarter { .. })));
    }

    /// `smf_bytes` wrapped as an RMID file, with a chunk before the data.
    fn rmid(smf_bytes: &[u8]) -> Vec<u8> {
        let riff_chunk = |id: &[u8; 4], data: &[u8]| {
            let mut bytes = id.to_vec();
            bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
            bytes.extend_from_slice(data);
            if data.len() % 2 == 1 {
                bytes.push(0);
            }
            bytes
        };
        let mut form = b"RMID".to_vec();
        form.extend(riff_chunk(b"INFO", b"odd"));
        form.extend(riff_chunk(b"data", smf_bytes));
        riff_chunk(b"RIFF", &form)
    }

    #[test]
    fn rmid_files_are_unwrapped() {
        let bytes = one_voice_file(&tune());
        assert_eq!(parse_one(&rmid(&bytes)), parse_one(&bytes));
        let cut = rmid(&bytes);
        let err = parse(&cut[..cut.len() - 3], MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::Truncated { .. }), "{err}");
        let err = parse(&rmid(&bytes)[..20], MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::Parse { .. }), "{err}");
    }

    #[test]
    fn smpte_division_with_frame_byte_0x80_is_refused_without_panicking() {
        // midly would negate -128 here.
        let mut bytes = one_voice_file(&tune());
        bytes[12..14].copy_from_slice(&[0x80, 0x28]);
        assert!(matches!(parse(&bytes, MelodyChoice::MainTrack), Err(MidiError::SmpteTiming { .. })));
        assert!(matches!(parse(&rmid(&bytes), MelodyChoice::MainTrack), Err(MidiError::SmpteTiming { .. })));
    }

    #[test]
    fn every_truncation_is_an_error_that_names_the_file() {
        let bytes = one_voice_file(&tune());
        for len in 0..bytes.len() {
            let err = parse_midi(&bytes[..len], "cut.mid", MelodyChoice::MainTrack).unwrap_err();
            assert!(err.to_string().starts_with("cut.mid: "), "{err}");
            let expected_kind = match len {
                0..=13 => matches!(err, MidiError::Parse { .. } | MidiError::Truncated { .. }),
                14 => matches!(err, MidiError::MissingTracks { declared: 1, found: 0, .. }),
                _ => matches!(err, MidiError::Truncated { offset_bytes: 14, .. }),
            };
            assert!(expected_kind, "cut at {len}: {err}");
        }
        assert!(parse(&bytes, MelodyChoice::MainTrack).is_ok());
    }

    #[test]
    fn empty_and_random_files_are_errors() {
        let err = parse_midi(&[], "empty.mid", MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::Parse { .. }));
        assert_eq!(err.to_string(), "empty.mid: not a readable MIDI file: invalid midi: not a midi file");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let len = rng.random_range(0..300);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            assert!(parse(&bytes, MelodyChoice::EveryTrack).is_err());
            // Random bytes behind a valid header: still no panic, and (almost surely) an error.
            let mut with_header = one_voice_file(&[])[..HEADER_CHUNK_BYTES].to_vec();
            with_header.append(&mut bytes);
            let _ = parse(&with_header, MelodyChoice::MainTrack);
        }
    }

    #[test]
    fn damaged_files_never_panic() {
        // Every single-byte change of a small real-looking file, parsed both ways.
        let bytes = smf(
            Format::Parallel,
            96,
            vec![track(vec![meta(0, MetaMessage::Tempo(u24::new(500_000)))]), track(notes(0, &tune()[..3]))],
        );
        for idx in 0..bytes.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0x90, 0xf0, 0xff] {
                let mut damaged = bytes.clone();
                damaged[idx] = value;
                for choice in [MelodyChoice::MainTrack, MelodyChoice::EveryTrack] {
                    if let Ok(melodies) = parse(&damaged, choice) {
                        for m in &melodies {
                            assert!(m.notes.windows(2).all(|w| w[0].end_beats() <= w[1].start_beats));
                            assert!(m.notes.iter().all(|n| n.len_beats > 0.0 && n.pitch <= 127));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_chunks_are_skipped() {
        let bytes = one_voice_file(&tune());
        let expected = parse_one(&bytes);
        let mut with_chunks = bytes[..HEADER_CHUNK_BYTES].to_vec();
        with_chunks.extend(chunk(b"XFIH", b"private data of some sequencer"));
        with_chunks.extend(chunk(b"\0\0\0\0", b""));
        with_chunks.extend_from_slice(&bytes[HEADER_CHUNK_BYTES..]);
        with_chunks.extend(chunk(b"XFKM", &[0xff; 40]));
        assert_eq!(parse_one(&with_chunks), expected);
        // Trailing padding shorter than a chunk header, after the declared tracks, is ignored.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(parse_one(&padded), expected);
    }

    #[test]
    fn garbage_chunk_that_overruns_the_file_is_truncation() {
        let bytes = one_voice_file(&tune());
        let mut garbage = bytes[..HEADER_CHUNK_BYTES].to_vec();
        let mut bogus = chunk(b"JUNK", b"");
        bogus[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
        garbage.extend(bogus);
        garbage.extend_from_slice(&bytes[HEADER_CHUNK_BYTES..]);
        let err = parse(&garbage, MelodyChoice::MainTrack).unwrap_err();
        assert!(
            matches!(err, MidiError::Truncated { offset_bytes: 14, needed_bytes: 1_000_008, .. }),
            "{err}"
        );
    }

    #[test]
    fn fewer_tracks_than_declared_is_an_error() {
        let mut bytes = one_voice_file(&tune());
        bytes[10..12].copy_from_slice(&3u16.to_be_bytes()); // the header's track count
        let err = parse(&bytes, MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::MissingTracks { declared: 3, found: 1, .. }), "{err}");
    }

    #[test]
    fn unreadable_events_and_missing_end_of_track_are_errors() {
        let header = one_voice_file(&[])[..HEADER_CHUNK_BYTES].to_vec();
        let good_track =
            smf(Format::SingleTrack, 480, vec![track(notes(0, &tune()))])[HEADER_CHUNK_BYTES..].to_vec();

        // 0xF3 (song select) is a system common message, which a file may not hold.
        let mut bad = header.clone();
        let mut data = good_track[8..].to_vec();
        data.splice(4..4, [0x00, 0xf3, 0x01]);
        bad.extend(chunk(b"MTrk", &data));
        let err = parse(&bad, MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::BadEvent { track_idx: 0, offset_bytes: 4, .. }), "{err}");

        // Running status with nothing to run on.
        let mut bad = header.clone();
        bad.extend(chunk(b"MTrk", &[0x00, 0x3c, 0x40]));
        assert!(matches!(
            parse(&bad, MelodyChoice::MainTrack),
            Err(MidiError::BadEvent { offset_bytes: 0, .. })
        ));

        let unterminated = smf(Format::SingleTrack, 480, vec![track_without_end(notes(0, &tune()))]);
        let err = parse(&unterminated, MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::MissingEndOfTrack { track_idx: 0, .. }), "{err}");

        // A meta event that claims more bytes than its track holds swallows the End of Track.
        let mut swallowing = header;
        let mut data = good_track[8..].to_vec();
        data.splice(0..0, [0x00, 0xff, 0x01, 0x7f]);
        swallowing.extend(chunk(b"MTrk", &data));
        let err = parse(&swallowing, MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::MissingEndOfTrack { .. }), "{err}");
    }

    #[test]
    fn erk_tune_written_by_abc2midi() {
        // erk10.abc X:226, "Schuerz dich Gretle": K:F, M:4/4, L:1/4,
        // | ccAF | c2cA | GFFE | F2z2. abc2midi starts every note one tick after its nominal
        // onset and ends it on time.
        let read = parse_midi(&fixture("erk10-0226.mid"), "erk10-0226.mid", MelodyChoice::MainTrack).unwrap();
        let read = &read[0];
        let abc: [(u8, u64, u64); 12] = [
            (72, 0, 1),
            (72, 1, 1),
            (69, 2, 1),
            (65, 3, 1),
            (72, 4, 2),
            (72, 6, 1),
            (69, 7, 1),
            (67, 8, 1),
            (65, 9, 1),
            (65, 10, 1),
            (64, 11, 1),
            (65, 12, 2),
        ];
        let expected: Vec<_> = abc.iter().map(|&(p, s, l)| (p, s * 480 + 1, l * 480 - 1)).collect();
        assert_eq!(ticks_of(read, 480.0), expected);
        assert_eq!(read.key, Some(Key { fifths: -1, mode: Mode::Major }));
        assert_eq!(read.meter, Some(Meter::COMMON));
        assert_eq!(read.tempo_qpm, Some(120.0));
        assert_eq!(read.end_beats, 14.0); // the z2 rest after the last note is not counted
        assert_eq!(read.source.title.as_deref(), Some("SCHUERZ DICH GRETLE"));
    }

    #[test]
    fn bach_chorale_voices() {
        // bwv323 as written by music21: a conductor track, then one track per voice, 10080 ticks
        // per quarter, three sharps minor (F# minor), 4/4.
        let bytes = fixture("bwv323.mid");
        let every = parse(&bytes, MelodyChoice::EveryTrack).unwrap();
        let titles: Vec<_> = every.iter().map(|m| m.source.title.as_deref().unwrap()).collect();
        assert_eq!(titles, ["Soprano", "Alto", "Tenor", "Bass"]);
        let main = parse_one(&bytes);
        assert_eq!(main, every[0]);
        assert_eq!(
            ticks_of(&main, 10080.0)[..5],
            [(73, 0, 20160), (76, 20160, 20160), (73, 40320, 10080), (73, 50400, 10080), (73, 60480, 10080)]
        );
        assert_eq!(main.key, Some(Key { fifths: 3, mode: Mode::Minor }));
        assert_eq!(main.meter, Some(Meter::COMMON));
        assert!(every.iter().all(|m| m.end_beats == every[0].end_beats));
    }

    #[test]
    fn music21_file_with_odd_division_tempo_map_and_chords() {
        // test14.mid: format 1, 256 ticks per quarter, two tempo events, 6/8, the first note
        // 2.5 beats in; its piano track has four-note chords whose top voice is the tune.
        let read = parse_one(&fixture("test14.mid"));
        let expected = [
            (57, 640, 128),
            (65, 768, 640),
            (64, 1408, 128),
            (68, 1536, 640),
            (69, 2176, 128),
            (70, 2304, 128),
            (71, 2432, 256),
            (71, 2688, 128),
        ];
        assert_eq!(ticks_of(&read, 256.0), expected);
        assert_eq!(read.notes[0].start_beats, 2.5);
        assert_eq!(read.meter, Some(Meter { numerator: 6, denominator: 8 }));
        assert_eq!(read.key, Some(Key::C_MAJOR));
        assert_eq!(read.tempo_qpm, Some(100.0));
        assert_eq!(read.source.title.as_deref(), Some("Piano"));
    }

    #[test]
    fn music21_file_main_track_is_the_tune_not_the_piano() {
        // test17.mid: 1024 ticks per quarter, a tune on "[Staff 1]" and two piano staves
        // (chords, and a bass), played with human timing.
        let bytes = fixture("test17.mid");
        let every = parse(&bytes, MelodyChoice::EveryTrack).unwrap();
        assert_eq!(every.len(), 3);
        let main = parse_one(&bytes);
        assert_eq!(main, every[0]);
        assert_eq!(main.source.title.as_deref(), Some("[Staff 1]"));
        assert_eq!(main.notes[0].pitch, 74);
        assert_eq!(main.notes[0].start_beats, 10.0 / 1024.0);
        assert_eq!(main.meter, Some(Meter { numerator: 3, denominator: 4 }));
        assert_eq!(main.tempo_qpm, Some(60_000_000.0 / 499_999.0));
    }

    #[test]
    fn read_midi_file_names_missing_files() {
        let err = read_midi_file(Path::new("/nonexistent/x.mid"), MelodyChoice::MainTrack).unwrap_err();
        assert!(matches!(err, MidiError::Read { .. }));
        assert!(err.to_string().starts_with("/nonexistent/x.mid: "));
    }

    #[test]
    fn write_midi_file_round_trips_through_disk() {
        let written = melody(&[(60, 0.5, 1.0), (67, 1.5, 0.5)]);
        let path = std::env::temp_dir().join(format!("antiphon-midi-test-{}.mid", std::process::id()));
        write_midi_file(&path, &written, 100.0).unwrap();
        let read = read_midi_file(&path, MelodyChoice::MainTrack);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read.unwrap()[0].notes, written.notes);
    }

    /// Reads the shared corpus's MIDI folders, when this checkout has them beside it, and
    /// prints the counts. Every file must read with both choices.
    #[test]
    fn shared_corpus_reads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/midi");
        if !root.is_dir() {
            eprintln!("skipped: no shared corpus at {}", root.display());
            return;
        }
        let mut failures = Vec::new();
        for dir in ["essen-erk-abc2midi", "bach-chorales-music21", "music21-test-files"] {
            let mut paths: Vec<_> =
                std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
            paths.sort();
            let (mut num_main, mut num_every_files, mut num_every_melodies, mut num_soprano) = (0, 0, 0, 0);
            for path in &paths {
                match read_midi_file(path, MelodyChoice::MainTrack) {
                    Ok(melodies) => {
                        num_main += melodies.len();
                        let title = melodies[0].source.title.as_deref().unwrap_or("");
                        num_soprano += usize::from(title.starts_with("Soprano"));
                    }
                    Err(err) => failures.push(err.to_string()),
                }
                match read_midi_file(path, MelodyChoice::EveryTrack) {
                    Ok(melodies) => {
                        num_every_files += 1;
                        num_every_melodies += melodies.len();
                    }
                    Err(err) => failures.push(err.to_string()),
                }
            }
            eprintln!(
                "{dir}: {} files; main track: {num_main} read ({num_soprano} titled Soprano); every track: \
                 {num_every_files} files, {num_every_melodies} melodies",
                paths.len()
            );
            if dir.starts_with("bach") {
                // The rest choose an instrument doubling the soprano or playing above it.
                assert!(num_soprano * 10 >= paths.len() * 9, "{num_soprano} of {} chorales", paths.len());
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
