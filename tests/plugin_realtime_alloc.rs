//! The audio thread's code never allocates: the scheduler, wired to a real worker thread with
//! the plugin's continuer, runs a long session (phrases, answers, a loop jump, stop and start,
//! bypass, a host reset, continuous mode, "answer now", a turning temperature knob) with every
//! block inside an allocation guard. The worker allocates on its own thread, outside the guard.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use antiphon::engine::lstm::LstmFactory;
use antiphon::engine::{Engine, EngineStatus};
use antiphon::params::AntiphonParams;
use live::phrase::LiveShared;
use live::{HostTransport, NoteMsg, Scheduler, Settings, TriggerMode};
use nice_assert_no_alloc::{assert_no_alloc, reset_violation_count, violation_count};

const SAMPLE_RATE_HZ: f64 = 48_000.0;
const BLOCK_LEN: u32 = 256;
const TEMPO_BPM: f64 = 120.0;

/// What the session does at a beat, for blocks starting in `[from, to)` of the session's time.
fn settings_at(beats: f64, base: Settings) -> Settings {
    let mut s = base;
    // The knob sweeps all the time.
    s.temperature = 0.05 + 1.9 * ((beats * 0.37).sin() * 0.5 + 0.5) as f32;
    if (44.0..46.0).contains(&beats) {
        s.is_bypassed = true;
    }
    if (60.0..80.0).contains(&beats) {
        s.is_continuous = true;
    }
    if (84.0..100.0).contains(&beats) {
        s.trigger = TriggerMode::Manual;
        s.is_answer_now = beats >= 90.0;
    }
    s
}

/// Host position for the session time `beats`: plays, loops back at 28 (to 20) once, stops at
/// 50 and starts again at 54.
fn transport_at(beats: f64) -> HostTransport {
    let playing = !(50.0..54.0).contains(&beats);
    let pos = if beats >= 28.0 { beats - 8.0 } else { beats };
    HostTransport {
        is_playing: playing,
        tempo_bpm: Some(TEMPO_BPM),
        pos_beats: Some(pos),
        bar_start_beats: Some((pos / 4.0).floor() * 4.0),
        time_sig: Some((4, 4)),
    }
}

/// Played notes as (key, start_beats, len_beats) of session time.
fn played() -> Vec<(u8, f64, f64)> {
    let mut notes = Vec::new();
    for phrase_start in [0.0, 22.0, 56.0, 84.0] {
        for (i, key) in [60u8, 64, 67, 65, 64, 62].into_iter().enumerate() {
            notes.push((key, phrase_start + i as f64 * 0.75, 0.5));
        }
    }
    // Playing over an answer: it yields.
    notes.push((72, 14.5, 0.25));
    notes
}

fn session(is_offline: bool) -> (usize, usize) {
    let live = Arc::new(LiveShared::new());
    let status = Arc::new(EngineStatus::default());
    let params = AntiphonParams::default();
    let (engine, link) =
        Engine::spawn(Arc::new(LstmFactory), params.model.clone(), live.clone(), status).unwrap();
    let mut scheduler = Scheduler::new(live.clone());
    scheduler.configure(SAMPLE_RATE_HZ as f32, is_offline);
    scheduler.connect(link);
    let started = Instant::now();
    while !live.is_model_ready.load(Ordering::Acquire) {
        assert!(started.elapsed() < Duration::from_secs(5), "no model");
        std::thread::sleep(Duration::from_millis(1));
    }

    let base = Settings { channel: 1, ..params.settings() };
    let beats_per_sample = TEMPO_BPM / 60.0 / SAMPLE_RATE_HZ;
    let sample_of = |beats: f64| (beats / beats_per_sample).round() as u64;
    let mut inputs: Vec<(u64, NoteMsg)> = Vec::new();
    for (key, start, len) in played() {
        let note =
            |is_on| NoteMsg { timing: 0, is_on, channel: 0, key, velocity: 0.7, voice_id: Some(key as i32) };
        inputs.push((sample_of(start), note(true)));
        inputs.push((sample_of(start + len), note(false)));
    }
    inputs.sort_by_key(|(s, n)| (*s, n.is_on));

    // Room for everything the session sends, so recording it never allocates.
    let mut out: Vec<NoteMsg> = Vec::with_capacity(1 << 16);
    let mut block_inputs: Vec<NoteMsg> = Vec::with_capacity(64);
    let end_sample = sample_of(110.0);
    let reset_sample = sample_of(17.0);
    reset_violation_count();
    let mut sample = 0u64;
    while sample < end_sample {
        let beats = sample as f64 * beats_per_sample;
        let settings = settings_at(beats, base);
        let transport = transport_at(beats);
        block_inputs.clear();
        for (at, note) in inputs.iter().filter(|(s, _)| (sample..sample + BLOCK_LEN as u64).contains(s)) {
            block_inputs.push(NoteMsg { timing: (at - sample) as u32, ..*note });
        }
        let is_reset = (sample..sample + BLOCK_LEN as u64).contains(&reset_sample);
        assert_no_alloc(|| {
            if is_reset {
                scheduler.reset();
            }
            let mut emit = |msg: NoteMsg| out.push(msg);
            scheduler.start_block(&transport, BLOCK_LEN, &settings, &mut emit);
            for note in &block_inputs {
                scheduler.note(*note, false, &settings, &mut emit);
            }
            scheduler.end_block(&settings, &mut emit);
            // The plugin reads its parameters on the audio thread too.
            std::hint::black_box(params.settings());
        });
        sample += BLOCK_LEN as u64;
        if !is_offline {
            // A little slower than flat out, so the worker keeps its lookahead.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let violations = violation_count() as usize;
    drop(scheduler.disconnect());
    engine.shutdown();
    let answer_notes = out.iter().filter(|m| m.channel == 1 && m.is_on).count();
    (violations, answer_notes)
}

#[test]
fn the_audio_thread_never_allocates() {
    for is_offline in [true, false] {
        let (violations, answer_notes) = session(is_offline);
        assert_eq!(violations, 0, "the audio thread allocated {violations} times (offline: {is_offline})");
        // The session did exercise the answer paths.
        assert!(answer_notes > 20, "only {answer_notes} answer notes (offline: {is_offline})");
    }
}

#[test]
fn the_guard_catches_an_allocation() {
    reset_violation_count();
    assert_no_alloc(|| std::hint::black_box(vec![1u8; 16]));
    assert_eq!(violation_count(), 1);
}
