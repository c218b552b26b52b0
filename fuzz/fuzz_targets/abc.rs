//! Fuzz target: arbitrary bytes, read lossily as UTF-8, into the ABC reader. It must never panic
//! and must only return melodies that keep the `Melody` invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let book = antiphon_music::abc::parse_tunebook(&text, "fuzz.abc");
    for melody in &book.tunes {
        let mut previous_end_beats = 0.0;
        for note in &melody.notes {
            assert!(note.pitch <= 127);
            assert!(note.len_beats > 0.0 && note.start_beats >= previous_end_beats - 1e-9);
            previous_end_beats = note.end_beats();
        }
        assert!(melody.end_beats >= previous_end_beats - 1e-9);
        assert!(melody.pickup_beats >= 0.0 && melody.pickup_beats.is_finite());
    }
});
