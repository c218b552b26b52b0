//! How long the worker takes from a phrase's end to the answer's first note: the figure a
//! musician feels. Shared by `cargo xtask bench` and the plugin's benchmark test.
//! Runs on: the calling thread (offline), driving a real worker thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ContinuerFactory, Engine, EngineError, EngineStatus, ModelSlot};
use live::link::WorkerLink;
use live::phrase::AnswerChunk;
use live::phrase::{AnswerEventKind, AnswerRequest, GenSettings, KeyLock, LiveShared, Phrase, Texture};
use music::note::Note;

/// Two bars of eighths and quarters in D major, as the audio thread hands a phrase over.
pub fn sample_phrase() -> Phrase {
    let mut phrase = Phrase::empty(4.0);
    let mut at = 0.0;
    for (i, pitch) in [62u8, 64, 66, 67, 69, 71, 69, 67, 66, 64, 62, 64].into_iter().enumerate() {
        let len = if i % 3 == 2 { 1.0 } else { 0.5 };
        phrase.notes.push(Note { pitch, velocity: 90, start_beats: at, len_beats: len * 0.95 });
        at += len;
    }
    phrase.len_beats = 8.0;
    phrase
}

/// `sample_phrase`'s melody over a left hand holding a triad a bar: a phrase the chord model
/// answers.
pub fn sample_chord_phrase() -> Phrase {
    let mut phrase = sample_phrase();
    for (bar, triad) in [[50u8, 54, 57], [55, 59, 62]].iter().enumerate() {
        for &pitch in triad {
            phrase.notes.push(Note { pitch, velocity: 80, start_beats: bar as f64 * 4.0, len_beats: 3.9 });
        }
    }
    phrase.notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats));
    phrase
}

/// Starts a worker with `factory`'s built-in models and times, `trials` times, from handing it
/// a phrase (as the audio thread does at the phrase's end) until a chunk with the answer's first
/// note-on arrives. An answer that opens with a long rest is not waited for in musical time:
/// the playhead jumps to what was written, so the figure is the worker's work alone. Between trials the answer is cancelled and the worker left to go idle, as
/// between phrases.
/// The answer is written with `texture`, to `sample_chord_phrase` for chords and
/// `sample_phrase` otherwise.
pub fn first_note_latencies(
    factory: Arc<dyn ContinuerFactory>,
    texture: Texture,
    trials: u32,
) -> Result<Vec<Duration>, EngineError> {
    let live = Arc::new(LiveShared::new());
    let status = Arc::new(EngineStatus::default());
    let (engine, link) =
        Engine::spawn(factory, Arc::new(ModelSlot::default()), live.clone(), status.clone())?;
    let started = Instant::now();
    while !live.is_model_ready.load(Ordering::Acquire) {
        if started.elapsed() > Duration::from_secs(30) || status.state() == super::EngineState::Failed {
            return Err(EngineError::ModelLoad {
                choice: "the built-in model".into(),
                reason: status.detail(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut times = Vec::with_capacity(trials as usize);
    for trial in 1..=trials {
        let request = AnswerRequest {
            answer_id: trial,
            phrase: if texture == Texture::Chords { sample_chord_phrase() } else { sample_phrase() },
            settings: GenSettings {
                texture,
                max_voices: 6,
                len_beats: Some(8.0),
                key_lock: KeyLock::FollowPhrase,
                lowest_pitch: 48,
                highest_pitch: 84,
            },
            seed: u64::from(trial),
            replay_of: 0,
        };
        live.active_answer_id.store(trial, Ordering::Release);
        live.playhead_beats.store(-3.0, Ordering::Release);
        // As the audio thread sets it while the phrase that just ended was played (the worker
        // then polls every millisecond): give it the time of a short phrase to notice.
        live.is_phrase_open.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(40));
        let sent = Instant::now();
        if link.push_request(request).is_err() {
            return Err(EngineError::Step { step_idx: 0, reason: "the request queue is full".into() });
        }
        loop {
            let chunk = pop_chunk_within(&link, Duration::from_secs(5))
                .ok_or_else(|| EngineError::Step { step_idx: 0, reason: "no answer within 5 s".into() })?;
            if chunk.answer_id != trial {
                continue;
            }
            if chunk.events.iter().any(|e| matches!(e.kind, AnswerEventKind::NoteOn { .. })) {
                times.push(sent.elapsed());
                break;
            }
            if chunk.is_finished {
                return Err(EngineError::Step {
                    step_idx: 0,
                    reason: format!("answer {trial} has no notes"),
                });
            }
            // The answer opens with a rest longer than the lookahead: move the playhead on at
            // once, so what is timed is the work up to the first note, not the rest's length.
            live.playhead_beats.store(chunk.written_until_beats, Ordering::Release);
        }
        live.active_answer_id.store(0, Ordering::Release);
        std::thread::sleep(Duration::from_millis(5));
        live.is_phrase_open.store(false, Ordering::Relaxed);
        while link.pop_chunk().is_some() {}
    }
    engine.shutdown();
    Ok(times)
}

/// The next chunk from the worker, waiting at most `limit` for it (the caller is not the audio
/// thread, so it may sleep).
pub fn pop_chunk_within(link: &WorkerLink, limit: Duration) -> Option<AnswerChunk> {
    let started = Instant::now();
    loop {
        if let Some(chunk) = link.pop_chunk() {
            return Some(chunk);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}
