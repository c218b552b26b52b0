//! A tiny chord model trained on a few real chorales (the JSB benchmark's frames): the loss
//! falls, a run resumes where it stopped, and the trained model generates deterministically per
//! seed inside the key, range and voice limit it is given.

use std::path::Path;
use std::sync::Arc;

use antiphon_train::chords::{train_chords, ChordTrainConfig, ChordTrainSummary, RollSet};
use antiphon_train::trainer::Quiet;
use model::chords::{ChordGenerator, ChordModel};
use model::SamplingSettings;
use music::{Frame, Key, Mode, PitchRules, PitchSet, StepGrid};

fn chorales(split: &str, count: usize) -> RollSet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/poly-benchmarks/jsb-chorales")
        .join(format!("{split}.frames"));
    let mut set = RollSet::default();
    set.add_frames_file(&path).unwrap();
    set.rolls.truncate(count);
    set
}

fn tiny(epochs: usize) -> ChordTrainConfig {
    ChordTrainConfig {
        hidden_size: 48,
        max_voices: 4,
        batch_size: 8,
        window_len: 64,
        epochs,
        patience: 10,
        learning_rate: 1e-2,
        dropout: 0.0,
        restrikes: false,
        ..ChordTrainConfig::default()
    }
}

fn train(cfg: &ChordTrainConfig, out: &Path, resume: bool) -> ChordTrainSummary {
    let grid = StepGrid { steps_per_quarter: 1 };
    train_chords(cfg, grid, &chorales("train", 40), &chorales("valid", 10), out, resume, &mut Quiet).unwrap()
}

#[test]
fn a_tiny_chord_model_learns_resumes_and_keeps_to_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let first = train(&tiny(2), dir.path(), false);
    assert_eq!(first.epochs.len(), 2);
    let resumed = train(&tiny(4), dir.path(), true);
    assert_eq!(resumed.epochs.len(), 4, "the run goes on from epoch 3");
    // The first two epochs are kept as they were (read back from train.json).
    for (kept, before) in resumed.epochs[..2].iter().zip(&first.epochs) {
        assert_eq!(kept.epoch, before.epoch);
        assert!(
            (kept.valid_nll - before.valid_nll).abs() < 1e-9
                && (kept.train_loss - before.train_loss).abs() < 1e-9
        );
    }
    let (start, end) = (resumed.epochs[0].valid_nll, resumed.epochs[3].valid_nll);
    assert!(end < start - 0.5, "validation NLL per frame went from {start} to {end}");
    assert!(resumed.epochs[3].train_loss < resumed.epochs[0].train_loss);

    let model = Arc::new(ChordModel::load_dir(dir.path()).unwrap());
    let c_major = Key::from_tonic(0, Mode::Major);
    let settings = SamplingSettings {
        temperature: 1.2,
        pitches: PitchRules::new(55, 79, Some(c_major)),
        ..Default::default()
    };
    let generate = |seed: u64, max_voices: usize| -> Vec<Frame> {
        let mut generator = ChordGenerator::new(Arc::clone(&model), seed).unwrap();
        generator.feed_frame(Frame::after(PitchSet::EMPTY, PitchSet::of(&[60, 64, 67, 72]))).unwrap();
        (0..64).map(|_| generator.next_frame(&settings, max_voices).unwrap()).collect()
    };
    let frames = generate(3, 2);
    assert_eq!(frames, generate(3, 2), "the same seed, the same frames");
    assert_ne!(frames, generate(4, 2));
    for frame in frames.iter().chain(&generate(5, 4)) {
        assert!(frame.sounding.iter().all(|p| settings.pitches.allows(p)), "{frame:?}");
    }
    assert!(frames.iter().all(|f| f.sounding.len() <= 2));
    assert!(generate(5, 4).iter().any(|f| f.sounding.len() > 2), "several voices are used");
}

#[test]
fn a_folder_of_midi_is_read_with_every_voice_and_its_onsets() {
    let dir = tempfile::tempdir().unwrap();
    let chorales =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/midi/bach-chorales-music21");
    for name in ["bwv1.6.mid", "bwv10.7.mid", "bwv101.7.mid"] {
        std::fs::copy(chorales.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("broken.mid"), b"MThd\0\0\0\x06junk").unwrap();
    let mut set = RollSet::default();
    let mut skipped = Vec::new();
    set.add_midi(dir.path(), StepGrid { steps_per_quarter: 2 }, &mut |reason| skipped.push(reason)).unwrap();
    assert_eq!(set.rolls.len(), 3);
    assert!(skipped.len() == 1 && skipped[0].contains("broken.mid"), "{skipped:?}");
    for roll in &set.rolls {
        assert!(roll.max_voices() >= 4, "four voices of a chorale: {}", roll.max_voices());
    }
    // Real onsets: some pitch is struck again while it sounded in the step before.
    let restruck = set
        .rolls
        .iter()
        .flat_map(|r| r.frames.windows(2))
        .any(|w| !w[1].struck.intersection(w[0].sounding).is_empty());
    assert!(restruck, "no repeated note was read as struck again");
}
