//! The built plugin in real-time mode, paced like a live host: the worker streams the answer
//! ahead of the playhead, so it starts on the bar line and matches the offline render note for
//! note. Needs `cargo xtask bundle antiphon` first. Takes about six seconds of wall time.

mod plugin_host;

use plugin_host::{notes_on, Plugin, Take};

#[test]
fn a_live_take_answers_on_time_and_like_a_bounce() {
    // Two bars of silence at 240 BPM while the model loads (as a player tunes up after
    // inserting the plugin; a debug build loads slowly), one bar of playing, a beat of silence,
    // and a one-bar answer from the next bar line (16).
    let notes: Vec<(u8, f64, f64)> =
        [62, 65, 69, 67].iter().enumerate().map(|(i, &k)| (k, 8.0 + i as f64, 1.0)).collect();
    let mut take = Take::new(240.0, notes, 21.0);
    let settings = [("Fresh Seed", "Off"), ("Seed", "3"), ("Output Channel", "2"), ("Answer Length", "1")];

    let mut live = Plugin::load();
    live.set(&settings);
    live.set_offline(false);
    take.is_paced = true;
    let mut processor = live.activate(48_000.0, 512);
    let heard = take.perform(&mut processor, 512);
    live.deactivate(processor);
    let answer = notes_on(&heard, 1);
    assert!(!answer.is_empty(), "no answer in real time");
    let sample_beats = 240.0 / 60.0 / 48_000.0;
    // On the bar line, or after a rest on the sixteenth grid from it.
    let sixteenths = (answer[0].1 - 16.0) * 4.0;
    assert!(
        answer[0].1 >= 16.0 - sample_beats && (sixteenths - sixteenths.round()).abs() * 0.25 <= sample_beats,
        "the answer began at {}, off the grid from beat 16",
        answer[0].1
    );
    assert!(answer.iter().all(|n| n.1 >= 16.0 - sample_beats && n.2 <= 20.0 + sample_beats), "{answer:?}");

    let mut bounce = Plugin::load();
    bounce.set(&settings);
    bounce.set_offline(true);
    take.is_paced = false;
    let mut processor = bounce.activate(48_000.0, 512);
    let rendered = notes_on(&take.perform(&mut processor, 512), 1);
    bounce.deactivate(processor);
    assert_eq!(answer, rendered, "the live take and the bounce differ");
}
