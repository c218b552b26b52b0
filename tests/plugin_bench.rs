//! Figures, not pass/fail tests (ignored by default):
//! - how long after a phrase ends the worker has the answer's first note ready, and
//! - how long the plugin's `process()` takes per block, through a real CLAP host.
//!
//! Run: `cargo test --release --test plugin_bench -- --ignored --nocapture --test-threads 1`
//! (`ANTIPHON_CLAP=target/bundled/antiphon.clap` after `cargo xtask bundle antiphon --release`
//! times the release bundle; without it the debug bundle is timed).

mod plugin_host;

use std::sync::Arc;
use std::time::Duration;

use antiphon::engine::lstm::LstmFactory;
use antiphon::engine::timing::first_note_latencies;
use live::phrase::Texture;
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

#[test]
#[ignore]
fn time_from_phrase_end_to_first_note() {
    let mut times = first_note_latencies(Arc::new(LstmFactory), Texture::Melody, 200).unwrap();
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
