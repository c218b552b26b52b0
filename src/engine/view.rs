//! What the editor shows of the worker's work: the phrase it answered, each answer to that
//! phrase as written so far (the Variations), which one plays, and how long the first note took.
//! Runs on: worker (builds and publishes a [`Shown`]), any other thread but the audio thread
//! (reads it). The lock is held only to swap or clone an `Arc`, so neither side waits on the
//! other's work.

use std::sync::{Arc, Mutex};

use live::phrase::{AnswerEvent, AnswerEventKind, Phrase};
use music::key::Key;
use music::note::{Meter, Note};

use super::Voicing;

/// Most answers to one phrase kept to play again.
pub const MAX_VARIATIONS: usize = 8;

/// Most events kept of one answer (a continuous answer goes on for ever): later ones are
/// played but not kept.
const MAX_KEPT_EVENTS: usize = 8192;

/// One answer to the phrase, as far as it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerView {
    /// The id the answer was written under; a replay of it keeps this id.
    pub answer_id: u32,
    /// Its notes in beats from the answer's start. A note still sounding where the writing
    /// stands runs to `written_until_beats`.
    pub notes: Vec<Note>,
    /// How far the answer is written, in beats from its start.
    pub written_until_beats: f64,
    /// Whether the whole answer is written.
    pub is_finished: bool,
    /// One line or chords.
    pub voicing: Voicing,
    /// The model that wrote it, in words.
    pub model: String,
    /// The key the answer keeps to (Key Lock), if any.
    pub key: Option<Key>,
    /// The key the phrase sounds in, as estimated from its notes (whatever Key Lock says).
    pub heard_key: Option<Key>,
    /// The sampler's seed.
    pub seed: u64,
    /// Milliseconds from the worker taking the phrase to the answer's first note written.
    pub first_note_ms: Option<f64>,
}

/// Everything the editor shows of the answers to the last phrase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shown {
    /// The phrase answered, in beats from its origin (a bar line); `None` before the first.
    pub phrase: Option<Phrase>,
    /// The answers kept to it, oldest first (at most [`MAX_VARIATIONS`]).
    pub variations: Vec<Arc<AnswerView>>,
    /// The id of the variation that plays or was last played.
    pub playing: Option<u32>,
}

impl Shown {
    /// The variation that plays or was last played.
    pub fn playing(&self) -> Option<&Arc<AnswerView>> {
        let id = self.playing?;
        self.variations.iter().find(|v| v.answer_id == id)
    }

    /// The phrase and the playing answer after it, as one list of notes in beats from the
    /// phrase's origin: what "Save answer" writes.
    pub fn phrase_and_answer(&self) -> Option<(Vec<Note>, f64)> {
        let phrase = self.phrase.as_ref()?;
        let answer = self.playing()?;
        let mut notes: Vec<Note> = phrase.notes.to_vec();
        notes.extend(
            answer.notes.iter().map(|n| Note { start_beats: n.start_beats + phrase.len_beats, ..*n }),
        );
        notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats).then(a.pitch.cmp(&b.pitch)));
        Some((notes, phrase.len_beats + answer.written_until_beats))
    }

    /// The host's meter of the phrase, when it gave one.
    pub fn meter(&self) -> Option<Meter> {
        self.phrase.as_ref().and_then(|p| p.meter)
    }
}

/// The worker's record of the answers to the current phrase: their events (to replay them) and
/// their views (to show them).
#[derive(Debug, Default)]
pub(super) struct Variations {
    phrase: Option<Phrase>,
    kept: Vec<Kept>,
    playing: Option<u32>,
}

#[derive(Debug)]
struct Kept {
    events: Vec<AnswerEvent>,
    view: Arc<AnswerView>,
    /// Pitch → index in `view.notes` of its note still sounding.
    open: [Option<u32>; 128],
}

impl Variations {
    /// Starts keeping a new answer to `phrase`; a different phrase than before forgets the
    /// answers to the old one.
    pub(super) fn begin(&mut self, phrase: &Phrase, view: AnswerView) {
        if self.phrase.as_ref() != Some(phrase) {
            self.phrase = Some(phrase.clone());
            self.kept.clear();
        }
        if self.kept.len() == MAX_VARIATIONS {
            self.kept.remove(0);
        }
        self.playing = Some(view.answer_id);
        self.kept.push(Kept { events: Vec::new(), view: Arc::new(view), open: [None; 128] });
    }

    /// The events of the kept answer `answer_id` to `phrase`, to play it again, and how far it
    /// was written (in beats from its start); marks it playing.
    pub(super) fn replay(&mut self, phrase: &Phrase, answer_id: u32) -> Option<(Vec<AnswerEvent>, f64)> {
        if self.phrase.as_ref() != Some(phrase) {
            return None;
        }
        let kept = self.kept.iter().find(|k| k.view.answer_id == answer_id)?;
        self.playing = Some(answer_id);
        Some((kept.events.clone(), kept.view.written_until_beats))
    }

    /// Adds written events to the answer playing, and how far it is written.
    pub(super) fn record(&mut self, events: &[AnswerEvent], written_until_beats: f64, is_finished: bool) {
        let Some(id) = self.playing else { return };
        let Some(kept) = self.kept.iter_mut().find(|k| k.view.answer_id == id) else { return };
        let view = Arc::make_mut(&mut kept.view);
        for event in events {
            if kept.events.len() >= MAX_KEPT_EVENTS {
                break;
            }
            kept.events.push(*event);
            match event.kind {
                AnswerEventKind::NoteOn { pitch } => {
                    kept.open[pitch as usize & 127] = Some(view.notes.len() as u32);
                    view.notes.push(Note {
                        pitch,
                        velocity: 100,
                        start_beats: event.at_beats,
                        len_beats: 0.0,
                    });
                }
                AnswerEventKind::NoteOff { pitch } => {
                    if let Some(idx) = kept.open[pitch as usize & 127].take() {
                        let note = &mut view.notes[idx as usize];
                        note.len_beats = (event.at_beats - note.start_beats).max(0.0);
                    }
                }
            }
        }
        view.written_until_beats = view.written_until_beats.max(written_until_beats);
        view.is_finished |= is_finished;
        for idx in kept.open.iter().flatten() {
            let note = &mut view.notes[*idx as usize];
            note.len_beats = (view.written_until_beats - note.start_beats).max(0.0);
        }
    }

    /// Sets the time to the first note of the answer playing, once.
    pub(super) fn set_first_note_ms(&mut self, ms: f64) {
        let Some(id) = self.playing else { return };
        if let Some(kept) = self.kept.iter_mut().find(|k| k.view.answer_id == id) {
            let view = Arc::make_mut(&mut kept.view);
            if view.first_note_ms.is_none() {
                view.first_note_ms = Some(ms);
            }
        }
    }

    /// What the editor is to show now.
    pub(super) fn shown(&self) -> Shown {
        Shown {
            phrase: self.phrase.clone(),
            variations: self.kept.iter().map(|k| k.view.clone()).collect(),
            playing: self.playing,
        }
    }
}

/// The worker's latest [`Shown`], for the editor.
#[derive(Debug, Default)]
pub struct ShownSlot {
    shown: Mutex<Arc<Shown>>,
}

impl ShownSlot {
    /// The latest published state.
    pub fn get(&self) -> Arc<Shown> {
        self.shown.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes `shown`. Worker.
    pub(super) fn set(&self, shown: Shown) {
        let shown = Arc::new(shown);
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = shown;
    }
}
