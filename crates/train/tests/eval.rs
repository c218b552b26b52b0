//! The evaluation end to end: likelihood checked step by step against the model, the held-out
//! songs equal to those training validated on, and a whole run on a tiny trained model whose
//! copy runs are known by construction, and a run on tunes from `tests/data/`.

use std::path::PathBuf;
use std::sync::Arc;

use antiphon_train::data::{read_set, DataConfig, DataSet, Split};
use antiphon_train::eval::likelihood::{streaming_likelihood, windowed_likelihood};
use antiphon_train::eval::select::{data_config_for, split_melodies};
use antiphon_train::eval::{
    cut_song, file_stem_of, format_table, read_training_record, run_eval, select_songs, short_source,
    to_json, EvalReport, EvalSettings, Feature, Quiet, SplitSide, TrainingSongs,
};
use antiphon_train::trainer::{build_dataset, model_config, train, EvalConfig, ModelShape, TrainConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use model::generate::Generator;
use model::io::TRAIN_FILE;
use model::lstm::REPEAT_TABLE;
use model::{InputKind, LoadedModel, MelodyLstm, ModelConfig};
use music::corpus::Collection;
use music::encode::{join_songs, parse_symbols, DurationFilter};
use music::midi::{parse_midi, write_midi, MelodyChoice};
use music::{bar, Key, Melody, Meter, Mode, Note, Source, Symbol, TokenId, Vocab};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A fresh, empty folder for one test, removed when the guard drops.
fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("antiphon-eval-{name}-")).tempdir().unwrap()
}

/// A seeded, untrained model over pitches 60..=72 with a run of `delimiter_len` delimiters.
fn random_model(delimiter_len: usize) -> LoadedModel {
    let mut cfg =
        ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 6 }, 12, 2, 0.0);
    cfg.delimiter_len = delimiter_len;
    let tensors = MelodyLstm::initial_tensors(&cfg, 7, &Device::Cpu).unwrap();
    let lstm = MelodyLstm::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
    LoadedModel::new(cfg, lstm, "random").unwrap()
}

/// Negative log-likelihood of `target` and whether it is the arg-max, after feeding `context`
/// one step at a time from the zero state.
fn nll_after(model: &LoadedModel, context: &[Symbol], target: Symbol) -> (f64, bool) {
    let vocab = &model.config.vocab;
    let mut state = model.new_state();
    let mut logits = vec![0.0f32; vocab.len()];
    for s in context {
        model.step(vocab.id(*s).unwrap(), &mut state, &mut logits).unwrap();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_total = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    let t = vocab.id(target).unwrap().0 as usize;
    let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    (log_total - logits[t] as f64, best == t)
}

#[test]
fn streaming_likelihood_matches_stepping_by_hand() {
    let model = random_model(3);
    let song = parse_symbols("60 _ 62 r 64 _ _ 72").unwrap();
    let sums = streaming_likelihood(&model, &song, &[]).unwrap();
    // Targets: the 8 song symbols and the closing delimiter, after three delimiters.
    let mut context = parse_symbols("/ / /").unwrap();
    let (mut all, mut song_only, mut onsets) = (0.0, 0.0, 0.0);
    let mut num_correct = 0;
    for target in song.iter().copied().chain([Symbol::Delimiter]) {
        let (nll, is_best) = nll_after(&model, &context, target);
        all += nll;
        num_correct += is_best as usize;
        if target != Symbol::Delimiter {
            song_only += nll;
            if target != Symbol::Hold {
                onsets += nll;
            }
        }
        context.push(target);
    }
    let m = sums.metrics();
    assert_eq!((m.all.num_targets, m.song.num_targets, m.non_hold.num_targets), (9, 8, 5));
    assert!((m.all.loss - all / 9.0).abs() < 1e-5, "{} vs {}", m.all.loss, all / 9.0);
    assert!((m.song.loss - song_only / 8.0).abs() < 1e-5);
    assert!((m.non_hold.loss - onsets / 5.0).abs() < 1e-5);
    assert_eq!(sums.all.num_correct, num_correct);
}

/// Streamed as the plugin runs it: each target's likelihood is the generator's, primed on the
/// delimiters and the song so far, for a model whose repeat inputs read the delimiters too.
#[test]
fn streaming_likelihood_reads_what_the_generator_reads() {
    let mut cfg =
        ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 6 }, 12, 2, 0.0);
    cfg.delimiter_len = 6;
    cfg.bar_meters = bar::COMMON_METERS.to_vec();
    cfg.repeat_classes = 2;
    let mut tensors = MelodyLstm::initial_tensors(&cfg, 7, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let table = &tensors[REPEAT_TABLE];
    let values = (0..table.elem_count()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let table = Tensor::from_vec(values, table.dims(), &Device::Cpu).unwrap();
    tensors.insert(REPEAT_TABLE.to_string(), table);
    let lstm = MelodyLstm::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
    let model = Arc::new(LoadedModel::new(cfg, lstm, "random").unwrap());

    let song = parse_symbols("60 _ 62 _ 60 _ 62 _ 64 r").unwrap();
    let m = streaming_likelihood(&model, &song, &[]).unwrap().metrics();
    let mut context = vec![Symbol::Delimiter; 6];
    let mut all = 0.0;
    for target in song.iter().copied().chain([Symbol::Delimiter]) {
        let mut generator = Generator::new(Arc::clone(&model), 1);
        generator.prime(&context).unwrap();
        let logits = generator.logits().unwrap();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_total = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
        all += log_total - logits[model.config.vocab.id(target).unwrap().0 as usize] as f64;
        context.push(target);
    }
    assert_eq!(m.all.num_targets, 11);
    assert!((m.all.loss - all / 11.0).abs() < 1e-5, "{} vs {}", m.all.loss, all / 11.0);
}

#[test]
fn windowed_likelihood_matches_fresh_windows_by_hand() {
    let model = random_model(2);
    let a = parse_symbols("60 _ 62").unwrap();
    let b = parse_symbols("r 64").unwrap();
    let eval = EvalConfig { context_len: 4, batch_size: 3, ..Default::default() };
    let m = windowed_likelihood(&model, &[&a, &b], &[], &eval, &mut |_| {}).unwrap();
    // The stream: four delimiters of padding, then each song and two delimiters.
    let stream = parse_symbols("/ / / / 60 _ 62 / / r 64 / /").unwrap();
    let (mut all, mut song_only) = (0.0, 0.0);
    for i in 4..stream.len() {
        let (nll, _) = nll_after(&model, &stream[i - 4..i], stream[i]);
        all += nll;
        if stream[i] != Symbol::Delimiter {
            song_only += nll;
        }
    }
    assert_eq!((m.all.num_targets, m.song.num_targets, m.non_hold.num_targets), (9, 5, 4));
    assert!((m.all.loss - all / 9.0).abs() < 1e-5, "{} vs {}", m.all.loss, all / 9.0);
    assert!((m.song.loss - song_only / 5.0).abs() < 1e-5);
}

/// One bar each of 4/4: 4, 5, 3 and 4 notes.
const FIGURES: [&[(u8, f64)]; 4] = [
    &[(60, 1.0), (62, 1.0), (64, 1.0), (65, 1.0)],
    &[(67, 0.5), (65, 0.5), (64, 0.5), (62, 0.5), (60, 2.0)],
    &[(64, 1.0), (67, 1.0), (72, 2.0)],
    &[(71, 0.5), (72, 0.5), (74, 1.0), (72, 2.0)],
];

/// Song `i` of the tiny corpus: nine bars of 4/4 cycling through the figures from figure
/// `i % 4`, moved up `shift` semitones, in C major moved likewise; tune number `i` of
/// `tiny.abc`.
fn cycle_song(i: usize, shift: i32) -> Melody {
    let mut notes = Vec::new();
    let mut t = 0.0;
    for bar in 0..9 {
        for &(p, len) in FIGURES[(i + bar) % 4] {
            notes.push(Note::new((p as i32 + shift) as u8, t, len));
            t += len;
        }
    }
    let mut m = Melody::from_notes(notes);
    m.meter = Some(Meter::COMMON);
    m.key = Some(Key::from_tonic(shift.rem_euclid(12) as u8, Mode::Major));
    m.source =
        Source { path: "tests/tiny.abc".to_string(), index: i, number: Some(i as u32 + 1), title: None };
    m
}

/// Twelve songs, every fourth one in G major (a fourth below), which training moves back to C.
fn cycle_corpus() -> Collection {
    let melodies = (0..12).map(|i| cycle_song(i, if i % 4 == 1 { -5 } else { 0 })).collect();
    Collection { melodies, num_files: 1, ..Default::default() }
}

fn tiny_train_config() -> TrainConfig {
    TrainConfig {
        data: DataConfig {
            drop_validation_duplicates: false,
            delimiter_len: 8,
            durations: DurationFilter::recipe(),
            ..Default::default()
        },
        model: ModelShape {
            input: InputKind::Embedding { dim: 8 },
            hidden_size: 24,
            num_layers: 1,
            dropout: 0.0,
            ..Default::default()
        },
        window_len: 32,
        window_stride: 16,
        batch_size: 8,
        epochs: 6,
        patience: 0,
        learning_rate: 1e-2,
        warmup_steps: 5,
        eval: EvalConfig { context_len: 16, ..Default::default() },
        ..Default::default()
    }
}

#[test]
fn the_validation_side_is_what_training_validated_on() {
    let cfg = tiny_train_config();
    let data = build_dataset(vec![("tiny".into(), cycle_corpus())], &cfg.data).unwrap();
    let model_cfg = model_config(&cfg, &data);
    let selection =
        select_songs(vec![("tiny".into(), cycle_corpus())], &cfg.data, SplitSide::Validation, &model_cfg);
    let songs = &selection.songs;
    // Songs 0 and 10 of 12.
    assert_eq!(selection.sets[0].num_selected, 2);
    assert_eq!(selection.sets[0].num_outside_split, 10);
    assert_eq!(songs[1].melody.source.index, 10);
    let symbols: Vec<&[Symbol]> = songs.iter().map(|s| s.symbols.as_slice()).collect();
    let stream = join_songs(symbols, cfg.data.delimiter_len);
    let tokens: Vec<u32> =
        model_cfg.vocab.encode(&stream).unwrap().iter().map(|t: &TokenId| t.0 as u32).collect();
    assert_eq!(tokens, data.validation[0].tokens);
}

#[test]
fn a_whole_evaluation_on_a_tiny_trained_model() {
    let cfg = tiny_train_config();
    let data = build_dataset(vec![("tiny".into(), cycle_corpus())], &cfg.data).unwrap();
    let scratch = scratch_dir("tiny-model");
    let dir = scratch.path().to_path_buf();
    train(&cfg, &data, &dir, &Device::Cpu, false, &mut antiphon_train::trainer::Quiet).unwrap();
    let model = Arc::new(LoadedModel::load_dir(&dir).unwrap());

    let selection =
        select_songs(vec![("tiny".into(), cycle_corpus())], &cfg.data, SplitSide::Validation, &model.config);
    let songs = &selection.songs;
    let (train_melodies, _) = split_melodies("tiny", cycle_corpus(), &cfg.data, SplitSide::Training);
    assert_eq!(train_melodies.len(), 10);
    // Evaluated songs are left out even when the training data holds them.
    let everything = cycle_corpus().melodies;
    let exclude: Vec<&Source> = songs.iter().map(|s| &s.melody.source).collect();
    let training = TrainingSongs::new(&everything, &exclude);
    assert_eq!(training.len(), 10);

    let settings = EvalSettings { temperatures: vec![0.5, 1.5], num_worst: 3, ..Default::default() };
    let output = run_eval(&model, &selection, Some(&training), &settings, &mut Quiet).unwrap();
    let report = &output.report;

    // Likelihood: every song symbol counted both ways, and better than guessing.
    let num_symbols: usize = songs.iter().map(|s| s.symbols.len()).sum();
    assert_eq!(report.num_song_symbols, num_symbols);
    assert_eq!(report.streaming.song.num_targets, num_symbols);
    assert_eq!(report.streaming.all.num_targets, num_symbols + songs.len());
    assert_eq!(report.windowed.song.num_targets, num_symbols);
    assert_eq!(report.windowed.all.num_targets, num_symbols + songs.len() * 8);
    let uniform = (model.config.vocab_len() as f64).ln();
    assert!(report.streaming.song.loss < uniform, "{} vs {uniform}", report.streaming.song.loss);
    assert!(report.windowed.song.loss < uniform);

    // Continuations: both songs have nine bars. Bars 5-8 are one full cycle of the figures,
    // 16 notes, which every training song holds in full (in C or G): the human copy run is 16.
    let c = report.continuations.as_ref().unwrap();
    assert_eq!(c.num_songs, 2);
    assert_eq!(c.num_training_songs, 10);
    let human = c.real_copying.unwrap();
    assert_eq!((human.median_notes, human.p95_notes, human.max_notes), (16.0, 16.0, 16));
    assert_eq!(c.real_worst.len(), 2);
    assert_eq!(c.real_worst[0].num_notes, 16);
    for song in &report.songs {
        let cont = song.continuation.as_ref().unwrap();
        assert_eq!((cont.real_num_notes, cont.real_copy_notes), (16, Some(16)));
        assert_eq!(cont.generated.len(), 2);
    }
    // The real continuations are identical cycles, so every real feature has no spread.
    let pitch_range = c.real.iter().find(|f| f.feature == Feature::PitchRange).unwrap();
    assert_eq!((pitch_range.mean, pitch_range.std), (Some(14.0), Some(0.0)));
    let in_key = c.real.iter().find(|f| f.feature == Feature::InKeyShare).unwrap();
    assert_eq!(in_key.mean, Some(1.0));
    assert_eq!(c.generated.len(), 2);
    for t in &c.generated {
        assert_eq!(t.features.len(), Feature::ALL.len());
        for f in &t.features {
            let s = f.vs_real.unwrap();
            assert!((0.0..=1.0).contains(&s.overlap) && s.kl >= 0.0, "{f:?}");
        }
        let copying = t.copying.unwrap();
        assert!(copying.max_notes as f64 >= copying.median_notes);
        assert!(t.mean_num_notes > 0.0);
    }

    // The continuations follow the primer in the song's own key and fill the window.
    assert_eq!(output.continued.len(), 2);
    let first = &output.continued[0];
    assert_eq!(first.cut, cut_song(&songs[first.song_idx].melody, 4, 4).unwrap());
    for (_, melody) in &first.generated {
        assert_eq!(melody.end_beats, 16.0);
        assert!(melody.notes.iter().all(|n| n.end_beats() <= 16.0 + 1e-9));
    }
    let joined = first.joined(0);
    assert_eq!(joined.end_beats, 32.0);
    assert_eq!(joined.notes.len(), first.cut.primer.notes.len() + first.generated[0].1.notes.len());

    // The same seed gives the same report; the JSON reads back; the table names the figures.
    let again = run_eval(&model, &selection, Some(&training), &settings, &mut Quiet).unwrap();
    assert_eq!(&again.report, report);
    let back: EvalReport = serde_json::from_str(&to_json(report)).unwrap();
    assert_eq!(back.songs.len(), 2);
    let table = format_table(report);
    for needle in
        ["windows of 64, song symbols", "streaming, onsets", "pitch classes", "T=1.5", "real continuations"]
    {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
}

#[test]
fn songs_too_short_to_continue_still_get_likelihood() {
    let model = Arc::new(random_model(4));
    let mut short = Melody::from_notes(vec![Note::new(60, 0.0, 1.0), Note::new(64, 1.0, 3.0)]);
    short.key = Some(Key::C_MAJOR);
    let collection = Collection { melodies: vec![short], num_files: 1, ..Default::default() };
    let selection = select_songs(
        vec![("s".into(), collection)],
        &data_config_for(&model.config),
        SplitSide::All,
        &model.config,
    );
    let output = run_eval(&model, &selection, None, &EvalSettings::default(), &mut Quiet).unwrap();
    assert!(output.report.continuations.is_none());
    assert_eq!(output.report.streaming.song.num_targets, 16);
    assert!(format_table(&output.report).contains("no continuations"));
}

#[test]
fn the_eval_runs_on_tunes_from_the_test_data() {
    let set = DataSet {
        name: "fixtures".to_string(),
        paths: vec![
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/abc/erk5-first-tunes.abc")),
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/midi/erk10-0226.mid")),
        ],
    };
    let mut cfg = tiny_train_config();
    cfg.data.split = Split::EveryNth { n: 3 };
    cfg.data.durations = DurationFilter::OnGrid;
    cfg.epochs = 2;
    cfg.sets = vec![set.clone()];
    let read = || read_set(&set, &cfg.data);
    assert!(read().errors.is_empty(), "{:?}", read().errors);
    assert_eq!(read().melodies.len(), 7);
    let data = build_dataset(vec![("fixtures".into(), read())], &cfg.data).unwrap();
    let scratch = scratch_dir("fixtures-model");
    let dir = scratch.path().to_path_buf();
    train(&cfg, &data, &dir, &Device::Cpu, false, &mut antiphon_train::trainer::Quiet).unwrap();
    let model = Arc::new(LoadedModel::load_dir(&dir).unwrap());
    // The model directory's train.json gives the same filters, split and sets back.
    let record = read_training_record(&dir.join(TRAIN_FILE)).unwrap().unwrap();
    assert_eq!(record.data, cfg.data);
    assert_eq!(record.sets, vec![set.clone()]);
    let from_disk = record.data;

    // Every third of the seven tunes is held out: X:1 and X:4 of the ABC file, and the MIDI
    // file (snapped to the grid as training snaps it).
    let selection =
        select_songs(vec![("fixtures".into(), read())], &from_disk, SplitSide::Validation, &model.config);
    let sources: Vec<String> = selection.songs.iter().map(|s| short_source(&s.melody.source)).collect();
    assert_eq!(sources, ["erk5-first-tunes.abc X:1", "erk5-first-tunes.abc X:4", "erk10-0226.mid #0"]);
    let (train_songs, _) = split_melodies("fixtures", read(), &from_disk, SplitSide::Training);
    let training = TrainingSongs::new(&train_songs, &[]);
    assert_eq!(training.len(), 4);
    let settings = EvalSettings { max_window_targets: Some(200), ..Default::default() };
    let output = run_eval(&model, &selection, Some(&training), &settings, &mut Quiet).unwrap();
    let report = &output.report;
    assert_eq!(report.windowed.all.num_targets, 200);
    assert_eq!(report.streaming.song.num_targets, report.num_song_symbols);
    assert!(report.streaming.song.loss.is_finite() && report.streaming.song.loss > 0.0);
    let c = report.continuations.as_ref().unwrap();
    // Only X:1 (22 bars of 2/4) has 8 bars; X:4 has a half-note pickup and seven bars of 4/2,
    // the MIDI tune 14 beats.
    assert!(c.num_songs == 1 && c.real_copying.is_some() && c.generated[0].copying.is_some());

    // A continuation written as MIDI reads back with the primer's notes and the new ones.
    let continued = &output.continued[0];
    let joined = continued.joined(0);
    let bytes = write_midi(&joined, 100.0);
    let back = parse_midi(&bytes, "continuation.mid", MelodyChoice::MainTrack).unwrap();
    assert_eq!(back[0].notes.len(), joined.notes.len());
    assert_eq!(file_stem_of(&selection.songs[continued.song_idx].melody.source), "erk5-first-tunes-X1");
}
