//! Fixed-capacity phrase and message types that cross the thread boundary between the audio
//! thread (this crate's `Scheduler`) and the worker (the plugin's `engine`): the captured phrase, the request for an answer,
//! the streamed answer events, and the live values both sides share through atomics.
//!
//! Runs on: audio thread and worker. Nothing here allocates except
//! [`Phrase::to_melody`] (worker only): building, moving or dropping an [`AnswerRequest`] or
//! an [`AnswerChunk`] never touches the allocator, so the audio thread may own and drop them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use arrayvec::ArrayVec;
use atomic_float::{AtomicF32, AtomicF64};

use music::encode::StepGrid;
use music::key::Key;
use music::note::{Melody, Meter, Note};

use crate::steer::SteerBox;

/// Most notes one captured phrase keeps; older notes are dropped first when a player goes on
/// longer than this without a pause.
pub const MAX_PHRASE_NOTES: usize = 256;

/// Most answer events one chunk from the worker carries.
pub const MAX_CHUNK_EVENTS: usize = 64;

/// How far ahead of the playhead the worker writes the answer, in beats. Notes closer to the
/// playhead than this are already fixed; a temperature change reaches the notes after it.
pub const LOOKAHEAD_BEATS: f64 = 1.0;

/// A phrase as played, on the audio thread's timeline but relative to the phrase's origin.
///
/// The origin is a bar line of the host (or, with the transport stopped, the first note's onset,
/// which then counts as a downbeat). Times are beats (quarter notes); notes keep the exact,
/// unquantized timing of the player until [`Phrase::quantized`] puts them on a grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Phrase {
    /// The notes, sorted by onset, relative to the origin. May overlap (the player's legato) until
    /// quantized.
    pub notes: ArrayVec<Note, MAX_PHRASE_NOTES>,
    /// Exclusive end of the phrase in beats from the origin: the bar line (or beat, when answers
    /// start on the next beat) at or after the last note's end. A trailing rest fills the gap.
    pub len_beats: f64,
    /// Length of one bar in beats (4.0 in 4/4, 3.0 in 6/8).
    pub bar_beats: f64,
    /// The host's time signature, when it gives one (its bars are `bar_beats` long): the origin
    /// is a downbeat of it.
    pub meter: Option<Meter>,
}

impl Phrase {
    /// An empty phrase of no length in the given bar length.
    pub fn empty(bar_beats: f64) -> Self {
        Self { notes: ArrayVec::new(), len_beats: 0.0, bar_beats, meter: None }
    }

    /// The phrase with every onset and end moved to the nearest point of `grid`, reduced to its
    /// top voice the way the melody encoding needs it (the skyline): of notes starting on the
    /// same step the highest stays; a note that starts under a higher note still sounding is
    /// accompaniment and is left out, unless the higher note ends within a step of it (legato
    /// playing, where the next note goes down before the last is let go); a note ends where the
    /// next kept one starts. Notes keep at least one step; notes that start at or after
    /// `len_beats` are dropped. Allocation-free.
    pub fn quantized(&self, grid: StepGrid) -> Phrase {
        let step_beats = grid.step_beats();
        let len_steps = grid.nearest_steps(self.len_beats);
        let mut out = Phrase {
            notes: ArrayVec::new(),
            len_beats: len_steps as f64 * step_beats,
            bar_beats: self.bar_beats,
            meter: self.meter,
        };
        // (start_steps, end_steps, note) of the note being built; it is pushed once the next
        // kept onset fixes where it must end.
        let mut open: Option<(u32, u32, Note)> = None;
        for note in &self.notes {
            let start_steps = grid.nearest_steps(note.start_beats);
            if start_steps >= len_steps {
                continue;
            }
            let end_steps = grid.nearest_steps(note.end_beats()).max(start_steps + 1).min(len_steps);
            if let Some((open_start, open_end, open_note)) = open {
                if open_start == start_steps {
                    // Two onsets on one step: the melody is usually on top.
                    if note.pitch > open_note.pitch {
                        open = Some((start_steps, end_steps, *note));
                    }
                    continue;
                }
                let is_under = note.pitch < open_note.pitch && open_end > start_steps + 1;
                if is_under {
                    continue;
                }
                push_steps(&mut out, open_start, open_end.min(start_steps), open_note, step_beats);
            }
            open = Some((start_steps, end_steps, *note));
        }
        if let Some((open_start, open_end, open_note)) = open {
            push_steps(&mut out, open_start, open_end, open_note, step_beats);
        }
        out
    }

    /// Whether the phrase was played with chords or two hands rather than as one line: at least
    /// two notes, and a quarter of them, sound together with another note for at least an
    /// eighth of a beat and half the shorter note (a legato overlap is shorter).
    pub fn has_chords(&self) -> bool {
        let notes = &self.notes;
        let overlaps = |a: &Note, b: &Note| {
            let shared = a.end_beats().min(b.end_beats()) - a.start_beats.max(b.start_beats);
            shared >= 0.125 && shared >= 0.5 * a.len_beats.min(b.len_beats)
        };
        let in_chords = notes
            .iter()
            .enumerate()
            .filter(|&(i, a)| notes.iter().enumerate().any(|(j, b)| i != j && overlaps(a, b)))
            .count();
        in_chords >= 2 && 4 * in_chords >= notes.len()
    }

    /// The phrase as a [`Melody`] from its origin to `len_beats`, in the given meter. Allocates:
    /// worker only.
    pub fn to_melody(&self) -> Melody {
        let mut melody = Melody::from_notes(self.notes.to_vec());
        melody.end_beats = self.len_beats.max(melody.end_beats);
        melody.meter = meter_of_bar(self.bar_beats);
        melody
    }

    /// Mean MIDI velocity of the notes, or `None` for a phrase without notes.
    pub fn mean_velocity(&self) -> Option<u8> {
        if self.notes.is_empty() {
            return None;
        }
        let sum: u32 = self.notes.iter().map(|n| n.velocity as u32).sum();
        Some(((sum + self.notes.len() as u32 / 2) / self.notes.len() as u32).clamp(1, 127) as u8)
    }
}

/// Pushes a note of `[start_steps, end_steps)` when it still has a length.
fn push_steps(out: &mut Phrase, start_steps: u32, end_steps: u32, note: Note, step_beats: f64) {
    if end_steps > start_steps && !out.notes.is_full() {
        out.notes.push(Note {
            pitch: note.pitch,
            velocity: note.velocity,
            start_beats: start_steps as f64 * step_beats,
            len_beats: (end_steps - start_steps) as f64 * step_beats,
        });
    }
}

/// The meter whose bar lasts `bar_beats` quarter notes, in quarters (3.0 → 3/4) or, for a
/// fractional bar, in eighths (3.5 → 7/8). `None` when it fits neither.
fn meter_of_bar(bar_beats: f64) -> Option<Meter> {
    let eighths = bar_beats * 2.0;
    if (eighths - eighths.round()).abs() > 1e-9 || !(1.0..=64.0).contains(&eighths) {
        return None;
    }
    let eighths = eighths.round() as u8;
    Some(if eighths.is_multiple_of(2) {
        Meter { numerator: eighths / 2, denominator: 4 }
    } else {
        Meter { numerator: eighths, denominator: 8 }
    })
}

/// Which pitches an answer may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLock {
    /// Any pitch in the range.
    Off,
    /// Only the scale of the key estimated from the phrase.
    FollowPhrase,
    /// Only the scale of this key.
    Fixed(Key),
}

/// Whether an answer is one line or chords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Texture {
    /// Chords to a phrase played with chords, one line to a melody.
    #[default]
    Auto,
    /// One line, whatever was played (a phrase with chords is heard by its top voice).
    Melody,
    /// Chords, whatever was played.
    Chords,
}

/// Most voices an answer may sound at once (the Max Voices parameter's top).
pub const MAX_ANSWER_VOICES: u8 = 12;

/// What the worker needs to know to write an answer, fixed when the phrase ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenSettings {
    /// One line or chords.
    pub texture: Texture,
    /// Most notes a chord answer sounds at once, 1..=`MAX_ANSWER_VOICES`.
    pub max_voices: u8,
    /// Length of the answer in beats; `None` in continuous mode, where the answer goes on until
    /// the audio thread ends it.
    pub len_beats: Option<f64>,
    /// Scale constraint.
    pub key_lock: KeyLock,
    /// Lowest pitch of the answer, inclusive.
    pub lowest_pitch: u8,
    /// Highest pitch of the answer, inclusive; at or above `lowest_pitch`.
    pub highest_pitch: u8,
}

/// A request for an answer to `phrase`. Fixed capacity: no heap inside.
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerRequest {
    /// Non-zero id, new for every request; chunks carry it back so the audio thread can drop
    /// those of an answer it no longer plays.
    pub answer_id: u32,
    /// The phrase to continue. Its end (`len_beats`) is the answer's beat 0.
    pub phrase: Phrase,
    /// Length, scale and range of the answer.
    pub settings: GenSettings,
    /// Seed of the sampler: the same phrase, settings, seed and temperatures give the same notes.
    pub seed: u64,
    /// Non-zero to play again, note for note, the earlier answer with this id to the same
    /// phrase (the editor's Variations); the worker writes a new answer from `seed` when it no
    /// longer keeps that one.
    pub replay_of: u32,
}

/// What happens at an answer event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerEventKind {
    /// A note of this pitch starts.
    NoteOn { pitch: u8 },
    /// The note of this pitch that sounds ends.
    NoteOff { pitch: u8 },
}

/// One note start or end of an answer, in beats from the answer's start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnswerEvent {
    /// Time in beats from the answer's beat 0; chunks deliver events in non-decreasing time, an
    /// end before a start at the same time.
    pub at_beats: f64,
    /// Start or end.
    pub kind: AnswerEventKind,
}

/// Worker → audio thread: the next piece of an answer. Same rule: no heap inside.
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerChunk {
    /// The answer these events belong to.
    pub answer_id: u32,
    /// Events in non-decreasing time, continuing the previous chunk.
    pub events: ArrayVec<AnswerEvent, MAX_CHUNK_EVENTS>,
    /// Beats from the answer's start up to which the answer is written (exclusive): no later chunk
    /// holds an event before it.
    pub written_until_beats: f64,
    /// True when the worker has written the whole answer; no chunk follows.
    pub is_finished: bool,
}

/// Values the audio thread and the worker share without locks. The audio thread writes the
/// playhead, the active answer and the temperature; the worker writes the model state; both
/// bump the counters.
#[derive(Debug)]
pub struct LiveShared {
    /// Softmax temperature, written from the parameter by the audio thread every block, read by
    /// the worker before every generated step.
    pub temperature: AtomicF32,
    /// End of the latest processed block in beats from the active answer's start (negative
    /// before the answer starts). Written by the audio thread, read by the worker to stay
    /// [`LOOKAHEAD_BEATS`] ahead.
    pub playhead_beats: AtomicF64,
    /// Id of the answer the audio thread plays or waits for; 0 for none. The worker drops an
    /// answer whose id is no longer this one.
    pub active_answer_id: AtomicU32,
    /// Bumped by the worker whenever it installs or loses a model; the audio thread ends an
    /// answer in progress when it changes.
    pub model_epoch: AtomicU32,
    /// Whether the worker has a model that can answer. Without one, notes only pass through.
    pub is_model_ready: AtomicBool,
    /// Whether the worker is loading a model (an offline render waits for it).
    pub is_model_loading: AtomicBool,
    /// Requests that never reached the worker: the queue was full, and the answer was
    /// cancelled (or a newer phrase replaced it) before there was room.
    pub num_dropped_requests: AtomicU32,
    /// Answer notes that arrived too late to play.
    pub num_late_notes: AtomicU32,
    /// Events lost because a fixed queue was full or the host refused an output event.
    pub num_lost_events: AtomicU32,
    /// Whether a request may come soon: a key is down, a phrase is captured, or an answer plays.
    /// Written by the audio thread every block; the worker then looks for requests every
    /// millisecond rather than every few, since nothing wakes it.
    pub is_phrase_open: AtomicBool,
    /// The editor's requests to the audio thread, and the stage it reports back.
    pub steer: SteerBox,
}

impl LiveShared {
    /// Initial values: temperature 1, no answer, no model.
    pub fn new() -> Self {
        Self {
            temperature: AtomicF32::new(1.0),
            playhead_beats: AtomicF64::new(0.0),
            active_answer_id: AtomicU32::new(0),
            model_epoch: AtomicU32::new(0),
            is_model_ready: AtomicBool::new(false),
            is_model_loading: AtomicBool::new(false),
            num_dropped_requests: AtomicU32::new(0),
            num_late_notes: AtomicU32::new(0),
            num_lost_events: AtomicU32::new(0),
            is_phrase_open: AtomicBool::new(false),
            steer: SteerBox::default(),
        }
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU32) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for LiveShared {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phrase from `(pitch, start_beats, len_beats)` triples.
    fn phrase(notes: &[(u8, f64, f64)], len_beats: f64) -> Phrase {
        let mut p = Phrase::empty(4.0);
        p.len_beats = len_beats;
        for &(pitch, start_beats, len) in notes {
            p.notes.push(Note { pitch, velocity: 90, start_beats, len_beats: len });
        }
        p
    }

    fn triples(p: &Phrase) -> Vec<(u8, f64, f64)> {
        p.notes.iter().map(|n| (n.pitch, n.start_beats, n.len_beats)).collect()
    }

    #[test]
    fn quantization_rounds_to_the_nearest_step() {
        // Slightly early, slightly late, and a sixteenth off by less than half a step.
        let p = phrase(&[(60, -0.03, 0.98), (62, 1.04, 0.45), (64, 1.6, 0.2)], 4.0);
        let q = p.quantized(StepGrid::SIXTEENTHS);
        assert_eq!(triples(&q), vec![(60, 0.0, 1.0), (62, 1.0, 0.5), (64, 1.5, 0.25)]);
        assert_eq!(q.len_beats, 4.0);
    }

    #[test]
    fn half_a_step_rounds_up() {
        let q = phrase(&[(60, 0.125, 0.5)], 4.0).quantized(StepGrid::SIXTEENTHS);
        assert_eq!(triples(&q), vec![(60, 0.25, 0.5)]);
    }

    #[test]
    fn quantized_phrases_are_monophonic() {
        // A chord (highest wins), legato overlap (cut at the next onset), a grace note shorter
        // than a step (kept at one step).
        let p = phrase(&[(60, 0.0, 1.0), (67, 0.02, 1.0), (64, 0.9, 1.2), (65, 2.5, 0.05)], 4.0);
        let q = p.quantized(StepGrid::SIXTEENTHS);
        assert_eq!(triples(&q), vec![(67, 0.0, 1.0), (64, 1.0, 1.0), (65, 2.5, 0.25)]);
        // The encoding accepts it.
        assert!(music::encode::encode(&q.to_melody(), &Default::default()).is_ok());
    }

    #[test]
    fn the_top_voice_is_kept_and_the_hand_below_left_out() {
        // A held melody note with a left-hand note struck under it, then a legato step down
        // whose overlap is under a step.
        let p = phrase(&[(72, 0.0, 2.0), (48, 0.5, 1.0), (71, 2.0, 1.04), (69, 3.0, 1.0)], 4.0);
        let q = p.quantized(StepGrid::SIXTEENTHS);
        assert_eq!(triples(&q), vec![(72, 0.0, 2.0), (71, 2.0, 1.0), (69, 3.0, 1.0)]);
    }

    #[test]
    fn chords_are_told_from_a_line() {
        let line = phrase(&[(60, 0.0, 1.02), (62, 1.0, 1.0), (64, 2.0, 1.0)], 4.0);
        assert!(!line.has_chords(), "a legato line");
        let chords = phrase(&[(60, 0.0, 2.0), (64, 0.0, 2.0), (67, 0.01, 2.0), (62, 2.0, 2.0)], 4.0);
        assert!(chords.has_chords());
        let two_hands = phrase(&[(48, 0.0, 4.0), (72, 0.0, 1.0), (74, 1.0, 1.0), (76, 2.0, 2.0)], 4.0);
        assert!(two_hands.has_chords(), "a held bass under a melody");
    }

    #[test]
    fn notes_past_the_end_are_cut_or_dropped() {
        let p = phrase(&[(60, 3.5, 2.0), (62, 4.2, 1.0)], 4.0);
        let q = p.quantized(StepGrid::SIXTEENTHS);
        assert_eq!(triples(&q), vec![(60, 3.5, 0.5)]);
    }

    #[test]
    fn melody_keeps_the_trailing_rest_and_meter() {
        let mut p = phrase(&[(60, 0.0, 1.0)], 3.0);
        p.bar_beats = 3.0;
        let m = p.quantized(StepGrid::SIXTEENTHS).to_melody();
        assert_eq!(m.end_beats, 3.0);
        assert_eq!(m.meter, Some(Meter { numerator: 3, denominator: 4 }));
        assert_eq!(meter_of_bar(3.5), Some(Meter { numerator: 7, denominator: 8 }));
        assert_eq!(meter_of_bar(0.3), None);
    }

    #[test]
    fn mean_velocity_rounds() {
        let mut p = phrase(&[(60, 0.0, 1.0), (62, 1.0, 1.0)], 2.0);
        p.notes[0].velocity = 100;
        p.notes[1].velocity = 51;
        assert_eq!(p.mean_velocity(), Some(76));
        assert_eq!(Phrase::empty(4.0).mean_velocity(), None);
    }
}
