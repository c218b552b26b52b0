//! Fuzzes the MIDI reader: any bytes must give melodies or a `MidiError`, never a panic, and
//! every melody it returns must keep the `Melody` invariants.
//! Runs on: the fuzzer's thread.

#![no_main]

use antiphon_music::midi::{parse_midi, MelodyChoice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    for choice in [MelodyChoice::MainTrack, MelodyChoice::EveryTrack] {
        let Ok(melodies) = parse_midi(bytes, "fuzz.mid", choice) else {
            continue;
        };
        assert!(!melodies.is_empty());
        if choice == MelodyChoice::MainTrack {
            assert_eq!(melodies.len(), 1);
        }
        for (idx, melody) in melodies.iter().enumerate() {
            assert_eq!(melody.source.index, idx);
            assert!(!melody.notes.is_empty());
            for note in &melody.notes {
                assert!(note.pitch <= 127 && (1..=127).contains(&note.velocity));
                assert!(note.start_beats.is_finite() && note.start_beats >= 0.0);
                assert!(note.len_beats.is_finite() && note.len_beats > 0.0);
            }
            for pair in melody.notes.windows(2) {
                assert!(pair[0].end_beats() <= pair[1].start_beats, "notes overlap");
            }
            let last = melody.notes.last().map_or(0.0, |n| n.end_beats());
            assert!(melody.end_beats >= last);
        }
    }
});
