//! Figures, not pass/fail tests (ignored by default):
//! - how long after a phrase ends the worker has the answer's first note ready, and
//! - how long the plugin's `process()` takes per block, through a real CLAP host.
//!
//! Run: `cargo test --release --test plugin_bench -- --ignored --nocapture --test-threads 1`
//! (`ANTIPHON_CLAP=target/bundled/antiphon.clap` after `cargo xtask bundle antiphon --release`
//! times the release bundle; without it the debug bundle is timed).

mod plugin_host;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use antiphon::engine::lstm::LstmFactory;
use antiphon::engine::{Engine, EngineStatus, ModelSlot};
use antiphon::music::note::Note;
use antiphon::music::phrase::{
    AnswerEventKind, AnswerRequest, GenSettings, KeyLock, LiveShared, Phrase, Request,
};
use plugin_host::{Plugin, Take};

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

fn describe(times: &mut [Duration]) -> String {
    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    format!(
        "mean {:.1} µs, median {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} samples)",
        mean.as_secs_f64() * 1e6,
        percentile(times, 0.5).as_secs_f64() * 1e6,
        percentile(times, 0.99).as_secs_f64() * 1e6,
        times.last().unwrap().as_secs_f64() * 1e6,
        times.len()
    )
}

/// Two bars of eighths and quarters, as the audio thread hands them over.
fn phrase() -> Phrase {
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

#[test]
#[ignore]
fn time_from_phrase_end_to_first_note() {
    let live = Arc::new(LiveShared::new());
    let model = Arc::new(ModelSlot::default());
    let (engine, channels) =
        Engine::spawn(Arc::new(LstmFactory), model, live.clone(), Arc::new(EngineStatus::default())).unwrap();
    while !live.is_model_ready.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut times = Vec::new();
    for trial in 1..=200u32 {
        let request = AnswerRequest {
            answer_id: trial,
            phrase: phrase(),
            settings: GenSettings {
                len_beats: Some(8.0),
                key_lock: KeyLock::FollowPhrase,
                lowest_pitch: 48,
                highest_pitch: 84,
            },
            seed: trial as u64,
        };
        // As the audio thread does at the phrase end: publish the answer, then hand it over.
        live.active_answer_id.store(trial, Ordering::Release);
        live.playhead_beats.store(-3.0, Ordering::Release);
        let started = Instant::now();
        channels.request_tx.send(Request::Continue(request)).unwrap();
        loop {
            let chunk = channels.chunk_rx.recv_timeout(Duration::from_secs(5)).expect("no chunk");
            if chunk.answer_id == trial
                && chunk.events.iter().any(|e| matches!(e.kind, AnswerEventKind::NoteOn { .. }))
            {
                times.push(started.elapsed());
                break;
            }
        }
        live.active_answer_id.store(0, Ordering::Release);
        // Let the worker notice the cancellation and go idle, like the gap between phrases.
        std::thread::sleep(Duration::from_millis(5));
        while channels.chunk_rx.try_recv().is_ok() {}
    }
    engine.shutdown();
    println!("phrase end → first answer note ready (built-in LSTM): {}", describe(&mut times));
}

#[test]
#[ignore]
fn process_time_per_block() {
    let notes: Vec<(u8, f64, f64)> =
        [60, 62, 64, 67, 65, 64, 62, 60].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect();
    for block_len in [64u32, 512, 4096] {
        let mut plugin = Plugin::load();
        plugin.set(&[("Output Channel", "2"), ("Answer Length", "4")]);
        plugin.set_offline(false);
        // Paced in real time, as a host calls it, so the worker keeps its lookahead.
        let mut take = Take::new(240.0, notes.clone(), 30.0);
        take.is_paced = true;
        let mut processor = plugin.activate(48_000.0, block_len);
        processor.is_timing = true;
        let heard = take.perform(&mut processor, block_len);
        let mut times = std::mem::take(&mut processor.process_times);
        plugin.deactivate(processor);
        let answer_notes = heard.iter().filter(|h| h.channel == 1 && h.is_on).count();
        println!(
            "process() at 48 kHz, {block_len}-sample blocks: {} ; {answer_notes} answer notes",
            describe(&mut times)
        );
    }
}
