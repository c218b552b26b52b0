//! The built plugin in a real CLAP host, played with both hands: a phrase of chords gets a
//! polyphonic answer starting on the promised bar line, within Max Voices and the pitch range,
//! every note released, the same at every block size; a melody still gets one line, and
//! Texture Melody answers chords with one line. Needs `cargo xtask bundle antiphon` first.

mod plugin_host;

use plugin_host::{assert_balanced, notes_on, Plugin, Processor, Take};

/// The answer goes out on channel 2 (index 1).
const ANSWER_CHANNEL: u8 = 1;

fn prepared() -> Plugin {
    let plugin = Plugin::load();
    plugin.set(&[("Fresh Seed", "Off"), ("Seed", "3"), ("Output Channel", "2"), ("Max Voices", "4")]);
    plugin.set_offline(true);
    plugin
}

/// Two bars of a left hand holding triads under a right-hand melody, the last key up on beat 8.
fn two_hands() -> Vec<(u8, f64, f64)> {
    let mut notes = Vec::new();
    for (bar, triad) in [[48u8, 52, 55], [53, 57, 60]].iter().enumerate() {
        for &key in triad {
            notes.push((key, bar as f64 * 4.0, 4.0));
        }
    }
    for (i, &key) in [72u8, 74, 76, 77, 76, 74, 72, 71].iter().enumerate() {
        notes.push((key, i as f64, 1.0));
    }
    notes.sort_by(|a, b| a.1.total_cmp(&b.1));
    notes
}

fn perform(plugin: &mut Plugin, block_len: u32, take: &Take) -> Vec<plugin_host::Heard> {
    let mut processor: Processor = plugin.activate(48_000.0, block_len.max(1));
    let heard = take.perform(&mut processor, block_len);
    plugin.deactivate(processor);
    heard
}

/// Most answer notes sounding at once.
fn max_sounding(answer: &[(u8, f64, f64)]) -> usize {
    answer.iter().map(|a| answer.iter().filter(|b| b.1 <= a.1 && a.1 < b.2).count()).max().unwrap_or(0)
}

#[test]
fn chords_are_answered_with_chords_at_every_block_size() {
    let mut plugin = prepared();
    let take = Take::new(120.0, two_hands(), 24.0);
    let heard = perform(&mut plugin, 512, &take);
    assert_balanced(&heard);
    assert_eq!(notes_on(&heard, 0).len(), two_hands().len(), "every note played passes through");
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(!answer.is_empty());
    // A beat of silence ends the phrase at 9; the answer fills the two bars from 12.
    let first = answer.iter().map(|n| n.1).fold(f64::INFINITY, f64::min);
    assert!((12.0 - 1e-3..16.0).contains(&first), "the answer starts at {first}");
    assert!(answer.iter().all(|n| n.1 >= 12.0 - 1e-3 && n.2 <= 20.0 + 1e-3), "{answer:?}");
    assert!(answer.iter().all(|n| (48..=84).contains(&n.0)), "outside the pitch range: {answer:?}");
    let voices = max_sounding(&answer);
    assert!((2..=4).contains(&voices), "{voices} voices at once: {answer:?}");
    for block_len in [1, 7, 4096] {
        let again = perform(&mut plugin, block_len, &take);
        assert_balanced(&again);
        let same = notes_on(&again, ANSWER_CHANNEL);
        let close = same.len() == answer.len()
            && same
                .iter()
                .zip(&answer)
                .all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-3 && (a.2 - b.2).abs() < 1e-3);
        assert!(close, "blocks of {block_len}:\n{same:?}\nvs\n{answer:?}");
    }
}

#[test]
fn a_melody_gets_a_line_and_texture_melody_answers_chords_with_one() {
    let mut plugin = prepared();
    let melody: Vec<(u8, f64, f64)> =
        [60u8, 62, 64, 67, 65, 64, 62, 60].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect();
    let heard = perform(&mut plugin, 256, &Take::new(120.0, melody, 24.0));
    assert_balanced(&heard);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(answer.len() >= 2 && max_sounding(&answer) == 1, "{answer:?}");

    plugin.set(&[("Texture", "Melody")]);
    let heard = perform(&mut plugin, 256, &Take::new(120.0, two_hands(), 24.0));
    assert_balanced(&heard);
    let answer = notes_on(&heard, ANSWER_CHANNEL);
    assert!(answer.len() >= 2 && max_sounding(&answer) == 1, "{answer:?}");
    // It continues the top voice, not the left hand.
    let mean = answer.iter().map(|n| n.0 as f64).sum::<f64>() / answer.len() as f64;
    assert!(mean > 62.0, "{answer:?}");
}
