//! The built plugin in a real CLAP host: it answers a phrase on the promised grid point, releases
//! every note on stop, loop jumps and bypass, answers with the transport stopped, follows the
//! temperature knob ahead of the playhead, and gives the same music at every block size and
//! sample rate. Needs `cargo xtask bundle antiphon` first.

mod plugin_host;

use plugin_host::{assert_balanced, notes_on, Heard, Plugin, Processor, Take, TransportPlan};

/// The answer goes out on channel 2 (index 1), so it is told apart from the notes passed through.
const ANSWER_CHANNEL: u8 = 1;

/// A fixed seed, the answer on channel 2, offline rendering (the audio thread may wait for the
/// worker, so results do not depend on the machine's speed).
fn prepared() -> Plugin {
    let plugin = Plugin::load();
    plugin.set(&[("Fresh Seed", "Off"), ("Seed", "7"), ("Output Channel", "2")]);
    plugin.set_offline(true);
    plugin
}

/// Two bars of quarter notes from beat 0, with a leap, the last ending on beat 8.
fn two_bars() -> Vec<(u8, f64, f64)> {
    [60, 62, 64, 67, 65, 64, 62, 60].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect()
}

fn perform(plugin: &mut Plugin, sample_rate_hz: f64, block_len: u32, take: &Take) -> Vec<Heard> {
    let mut processor: Processor = plugin.activate(sample_rate_hz, block_len.max(1));
    let heard = take.perform(&mut processor, block_len);
    plugin.deactivate(processor);
    heard
}

/// Checks that the answer begins at `start_beats`: nothing before it, and its first note on the
/// sixteenth-note grid counted from there, within the first bar (a model may open with a rest).
fn assert_starts_at(answer: &[(u8, f64, f64)], start_beats: f64, tolerance_beats: f64) {
    let first = answer.first().expect("no answer").1;
    let sixteenths = (first - start_beats) * 4.0;
    assert!(
        first >= start_beats - tolerance_beats
            && (sixteenths - sixteenths.round()).abs() * 0.25 <= tolerance_beats
            && first < start_beats + 4.0,
        "the answer should begin at {start_beats}; its first note is at {first}"
    );
}

/// Beats of one sample at `sample_rate_hz` and `tempo_bpm`.
fn sample_beats(sample_rate_hz: f64, tempo_bpm: f64) -> f64 {
    tempo_bpm / 60.0 / sample_rate_hz
}

#[test]
fn the_answer_starts_on_the_bar_after_the_phrase() {
    let mut plugin = prepared();
    let heard = perform(&mut plugin, 48_000.0, 512, &Take::new(120.0, two_bars(), 24.0));
    assert_balanced(&heard);
    // The phrase passes through unchanged.
    let thru = notes_on(&heard, 0);
    assert_eq!(thru.len(), 8);
    // The last key goes up on beat 8, a beat of silence ends the phrase at 9, the answer starts
    // on the next bar line (12) and lasts two bars.
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(answer.len() >= 2, "{answer:?}");
    let tolerance = sample_beats(48_000.0, 120.0);
    assert_starts_at(&answer, 12.0, tolerance);
    for &(key, start, end) in &answer {
        assert!(
            start >= 12.0 - tolerance && end <= 20.0 + tolerance,
            "{key} {start}..{end} outside the answer"
        );
        assert!((48..=84).contains(&key), "{key} outside the pitch range");
    }
    // Velocity from the phrase: it was played at 0.8.
    let velocity = heard.iter().find(|h| h.channel == ANSWER_CHANNEL && h.is_on).unwrap().velocity;
    assert!((velocity - 102.0 / 127.0).abs() < 1e-3, "{velocity}");
}

#[test]
fn the_same_take_gives_the_same_answer() {
    let mut plugin = prepared();
    let take = Take::new(120.0, two_bars(), 24.0);
    let first = notes_on(&perform(&mut plugin, 48_000.0, 256, &take), ANSWER_CHANNEL);
    let second = notes_on(&perform(&mut plugin, 48_000.0, 256, &take), ANSWER_CHANNEL);
    assert_eq!(first, second);
    // Another seed, another answer.
    plugin.set(&[("Seed", "8")]);
    let third = notes_on(&perform(&mut plugin, 48_000.0, 256, &take), ANSWER_CHANNEL);
    assert_ne!(first, third);
}

#[test]
fn the_note_only_layout_answers_as_the_stereo_one_does() {
    let take = Take::new(120.0, two_bars(), 24.0);
    let mut stereo = prepared();
    stereo.select_layout(false);
    let with_audio = perform(&mut stereo, 48_000.0, 512, &take);
    let mut note_only = prepared();
    note_only.select_layout(true);
    let without_audio = perform(&mut note_only, 48_000.0, 512, &take);
    assert_balanced(&without_audio);
    assert!(!notes_on(&without_audio, ANSWER_CHANNEL).is_empty());
    assert_eq!(notes_on(&without_audio, 0), notes_on(&with_audio, 0));
    assert_eq!(notes_on(&without_audio, ANSWER_CHANNEL), notes_on(&with_audio, ANSWER_CHANNEL));
}

#[test]
fn a_stop_releases_the_answer() {
    let mut plugin = prepared();
    let mut take = Take::new(120.0, two_bars(), 20.0);
    take.transport = TransportPlan::StopsAt { beats: 14.3 };
    let heard = perform(&mut plugin, 48_000.0, 480, &take);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(!answer.is_empty());
    let last_end = answer.iter().map(|n| n.2).fold(0.0, f64::max);
    assert!(
        last_end <= 14.3 + 480.0 * sample_beats(48_000.0, 120.0),
        "a note sounded past the stop: {answer:?}"
    );
    assert!(answer.iter().all(|n| n.1 < 14.3), "a note started after the stop");
}

#[test]
fn loop_jumps_keep_every_note_paired() {
    let mut plugin = prepared();
    // The host loops the first four bars; the answer (12..20) runs over the seam at 16.
    let mut take = Take::new(120.0, two_bars(), 24.0);
    take.transport = TransportPlan::Looping { start_beats: 0.0, end_beats: 16.0 };
    let heard = perform(&mut plugin, 48_000.0, 333, &take);
    assert_balanced(&heard);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(answer.iter().any(|n| n.1 > 16.0), "the answer stopped at the seam: {answer:?}");
    assert!(answer.iter().all(|n| n.2 <= 20.0 + 1e-3));
    // Without the loop the answer is the same: the seam does not disturb it.
    let straight =
        notes_on(&perform(&mut plugin, 48_000.0, 333, &Take::new(120.0, two_bars(), 24.0)), ANSWER_CHANNEL);
    assert_eq!(answer, straight);

    // A one-beat loop inside the answer: a jump every beat.
    let mut take = Take::new(120.0, two_bars(), 24.0);
    take.transport = TransportPlan::Looping { start_beats: 12.0, end_beats: 13.0 };
    let heard = perform(&mut plugin, 48_000.0, 1000, &take);
    assert_balanced(&heard);
}

#[test]
fn bypass_releases_the_answer() {
    let mut plugin = prepared();
    let bypass_id = plugin.param("Bypass").id;
    let mut take = Take::new(120.0, two_bars(), 20.0);
    take.params.push((13.1, bypass_id, 1.0));
    let heard = perform(&mut plugin, 48_000.0, 256, &take);
    assert_balanced(&heard);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(!answer.is_empty() && answer.iter().all(|n| n.2 <= 13.1 + 1e-3), "{answer:?}");
}

#[test]
fn with_the_transport_stopped_it_still_answers() {
    let mut plugin = prepared();
    // The first note is the downbeat: bars start at 1.3, 5.3... The last key goes up at 4.3, a
    // beat of silence ends the phrase at 5.3, which is a bar line of the player's grid.
    let notes = vec![(60, 1.3, 1.0), (64, 2.3, 1.0), (67, 3.3, 1.0)];
    let mut take = Take::new(100.0, notes.clone(), 16.0);
    take.transport = TransportPlan::Stopped;
    let heard = perform(&mut plugin, 44_100.0, 441, &take);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(!answer.is_empty());
    assert_starts_at(&answer, 5.3, sample_beats(44_100.0, 100.0));
    assert!(answer.iter().all(|n| n.2 <= 13.3 + 1e-3));

    // No transport at all: the free-run tempo parameter sets the clock.
    plugin.set(&[("Free Tempo", "150")]);
    let mut take = Take::new(150.0, notes, 16.0);
    take.transport = TransportPlan::Absent;
    let heard = perform(&mut plugin, 44_100.0, 441, &take);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(!answer.is_empty());
    assert_starts_at(&answer, 5.3, sample_beats(44_100.0, 150.0));
}

#[test]
fn a_temperature_change_reaches_only_the_notes_after_it() {
    let mut plugin = prepared();
    plugin.set(&[("Answer Length", "4")]);
    let temperature_id = plugin.param("Temperature").id;
    let cold = plugin.value_of("Temperature", "0.05");
    let take = Take::new(120.0, two_bars(), 30.0);
    let steady = notes_on(&perform(&mut plugin, 48_000.0, 512, &take), ANSWER_CHANNEL);
    // The same take, with the knob turned down at beat 16, a third into the answer (12..28).
    let mut turned = take.clone();
    turned.params.push((16.0, temperature_id, cold));
    let changed = notes_on(&perform(&mut plugin, 48_000.0, 512, &turned), ANSWER_CHANNEL);
    plugin.set(&[("Temperature", "1.0")]);

    let before = |notes: &[(u8, f64, f64)]| {
        notes.iter().filter(|n| n.1 < 16.0).map(|n| (n.0, n.1)).collect::<Vec<_>>()
    };
    let after = |notes: &[(u8, f64, f64)]| {
        notes.iter().filter(|n| n.1 >= 17.0).map(|n| (n.0, n.1)).collect::<Vec<_>>()
    };
    assert!(!before(&steady).is_empty());
    assert_eq!(before(&steady), before(&changed), "notes before the change moved");
    // Notes more than the one-beat lookahead after the change were written at the new
    // temperature.
    assert!(!after(&changed).is_empty());
    assert_ne!(after(&steady), after(&changed), "the change did not reach later notes");
}

#[test]
fn block_sizes_and_sample_rates_give_the_same_music() {
    let take = Take::new(120.0, two_bars(), 21.0);
    let mut plugin = prepared();
    let reference = notes_on(&perform(&mut plugin, 48_000.0, 512, &take), ANSWER_CHANNEL);
    assert!(reference.len() >= 2);
    for (sample_rate_hz, block_len) in [
        (44_100.0, 1),
        (44_100.0, 4096),
        (48_000.0, 7),
        (88_200.0, 1000),
        (96_000.0, 64),
        (192_000.0, 4096),
        (192_000.0, 3),
    ] {
        let answer = notes_on(&perform(&mut plugin, sample_rate_hz, block_len, &take), ANSWER_CHANNEL);
        // Within a sample of the coarsest rate.
        let tolerance = 1.01 * sample_beats(44_100.0, 120.0);
        let same = answer.len() == reference.len()
            && answer
                .iter()
                .zip(&reference)
                .all(|(a, r)| a.0 == r.0 && (a.1 - r.1).abs() <= tolerance && (a.2 - r.2).abs() <= tolerance);
        assert!(same, "{sample_rate_hz} Hz, blocks of {block_len}:\n{answer:?}\nvs\n{reference:?}");
    }
}

#[test]
fn key_range_velocity_and_gate_shape_the_answer() {
    let mut plugin = prepared();
    plugin.set(&[
        ("Key Lock", "Fixed"),
        ("Key", "D"),
        ("Scale", "Minor"),
        ("Lowest Note", "C4"),
        ("Highest Note", "C5"),
        ("Velocity Mode", "Fixed"),
        ("Velocity", "50"),
        ("Answer Length", "4"),
    ]);
    let take = Take::new(120.0, two_bars(), 30.0);
    let full = notes_on(&perform(&mut plugin, 48_000.0, 512, &take), ANSWER_CHANNEL);
    plugin.set(&[("Gate", "50")]);
    let heard = perform(&mut plugin, 48_000.0, 512, &take);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(answer.len() >= 4, "{answer:?}");
    assert_eq!(answer.len(), full.len());
    // D natural minor: D E F G A B♭ C.
    let d_minor = [2, 4, 5, 7, 9, 10, 0];
    for (&(key, start, end), &(full_key, full_start, full_end)) in answer.iter().zip(&full) {
        assert!((60..=72).contains(&key), "{key} outside C4..C5");
        assert!(d_minor.contains(&(key % 12)), "{key} is not in D minor");
        // The same notes, each sounding half its written length (but ending at most the
        // one-beat lookahead before its written end).
        assert_eq!((key, start), (full_key, full_start));
        let written = full_end - full_start;
        let expected = (written * 0.5).max(written - 1.0);
        assert!((end - start - expected).abs() < 1e-3, "{key} lasts {} of {written}", end - start);
    }
    for h in heard.iter().filter(|h| h.channel == ANSWER_CHANNEL && h.is_on) {
        assert!((h.velocity - 50.0 / 127.0).abs() < 1e-3, "velocity {}", h.velocity);
    }
}

#[test]
fn a_fixed_seed_repeats_and_a_fresh_seed_varies() {
    // The same phrase twice: answers at 12..20 and 36..44.
    let mut notes = two_bars();
    notes.extend(two_bars().into_iter().map(|(k, s, l)| (k, s + 24.0, l)));
    let take = Take::new(120.0, notes, 46.0);
    let halves = |answer: Vec<(u8, f64, f64)>| {
        let first: Vec<_> = answer.iter().filter(|n| n.1 < 24.0).map(|n| (n.0, n.1, n.2)).collect();
        let second: Vec<_> =
            answer.iter().filter(|n| n.1 >= 24.0).map(|n| (n.0, n.1 - 24.0, n.2 - 24.0)).collect();
        (first, second)
    };
    let same = |a: &[(u8, f64, f64)], b: &[(u8, f64, f64)]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() < 1e-6 && (x.2 - y.2).abs() < 1e-6)
    };
    let mut plugin = prepared();
    let (first, second) = halves(notes_on(&perform(&mut plugin, 48_000.0, 512, &take), ANSWER_CHANNEL));
    assert!(!first.is_empty() && same(&first, &second), "a fixed seed answered the same phrase differently");
    plugin.set(&[("Fresh Seed", "On")]);
    let (first, second) = halves(notes_on(&perform(&mut plugin, 48_000.0, 512, &take), ANSWER_CHANNEL));
    assert!(
        !first.is_empty() && !second.is_empty() && !same(&first, &second),
        "fresh seeds gave the same answer"
    );
}
