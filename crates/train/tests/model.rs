//! The melody model end to end: a golden LSTM step, save and load, each broken model file,
//! a tiny training run, and seeded, constrained, streaming generation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use antiphon_train::data::DataConfig;
use antiphon_train::distill::Teachers;
use antiphon_train::trainer::{
    build_dataset, evaluate, evaluate_with_memory, model_config, score_predictions, train,
    window_predictions, Dataset, EvalConfig, LrSchedule, ModelShape, Quiet, TrainConfig, TrainObserver,
    TrainSummary, CHECKPOINT_DIR,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use model::io::{read_model_config, save_model, ModelSource, CONFIG_FILE, TRAIN_FILE, WEIGHTS_FILE};
use model::memory::{fit_weights, MemoryConfig, TuneMemory, MEMORY_CONFIG_FILE, MEMORY_FILE};
use model::{
    continue_melody, Generator, InputKind, LoadedModel, MelodyLstm, ModelConfig, ModelError,
    PhraseContinuation, PitchRules, SamplingSettings,
};
use music::bar::{self, BarClock};
use music::corpus::Collection;
use music::encode::parse_symbols;
use music::{Key, Melody, Meter, Mode, Note, StepGrid, Symbol, TokenId, Vocab};

/// A melody from `(pitch, start_beats, len_beats)` triples.
fn melody(notes: &[(u8, f64, f64)]) -> Melody {
    Melody::from_notes(notes.iter().map(|&(p, s, l)| Note::new(p, s, l)).collect())
}

/// A fresh, empty folder for one test, removed when the guard drops.
fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("antiphon-model-{name}-")).tempdir().unwrap()
}

/// The golden model's config: pitches 60..=64, embedding 3, two layers of 4.
fn golden_config() -> ModelConfig {
    ModelConfig::new(Vocab::for_pitch_range(60, 64), InputKind::Embedding { dim: 3 }, 4, 2, 0.0)
}

/// Tensor `t` of `cfg` (in `tensor_shapes` order) holds `0.5 sin(0.7 (i + 1) + 1.3 (t + 1))` at
/// flat index `i`, as `tests/data/golden_lstm.py` builds it.
fn formula_model(cfg: &ModelConfig) -> LoadedModel {
    let mut tensors = HashMap::new();
    for (t, (name, shape)) in MelodyLstm::tensor_shapes(cfg).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> =
            (0..n).map(|i| (0.5 * (0.7 * (i as f64 + 1.0) + 1.3 * (t as f64 + 1.0)).sin()) as f32).collect();
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
    }
    let lstm = MelodyLstm::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
    LoadedModel::new(cfg.clone(), lstm, "formula").unwrap()
}

/// A seeded, untrained model over pitches 55..=79.
fn random_model(input: InputKind, seed: u64) -> LoadedModel {
    let cfg = ModelConfig::new(Vocab::for_pitch_range(55, 79), input, 24, 2, 0.0);
    let tensors = MelodyLstm::initial_tensors(&cfg, seed, &Device::Cpu).unwrap();
    let lstm = MelodyLstm::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
    LoadedModel::new(cfg, lstm, "random").unwrap()
}

#[derive(serde::Deserialize)]
struct Golden {
    tokens: Vec<u16>,
    logits: Vec<Vec<f64>>,
    h: Vec<Vec<f64>>,
    c: Vec<Vec<f64>>,
}

#[test]
fn golden_lstm_steps() {
    let golden: Golden = serde_json::from_str(include_str!("../../../tests/data/golden_lstm.json")).unwrap();
    let model = formula_model(&golden_config());
    let mut state = model.new_state();
    let mut logits = vec![0.0f32; 8];
    for (token, expected) in golden.tokens.iter().zip(&golden.logits) {
        model.step(TokenId(*token), &mut state, &mut logits).unwrap();
        for (got, want) in logits.iter().zip(expected) {
            assert!((*got as f64 - want).abs() < 1e-5, "logit {got} vs {want}");
        }
    }
    for layer in 0..2 {
        for (got, want) in
            state.h[layer].iter().zip(&golden.h[layer]).chain(state.c[layer].iter().zip(&golden.c[layer]))
        {
            assert!((*got as f64 - want).abs() < 1e-5, "state {got} vs {want}");
        }
    }
}

/// Logits after feeding `ids` one step at a time.
fn logits_after(model: &LoadedModel, ids: &[u16]) -> Vec<f32> {
    let mut state = model.new_state();
    let mut logits = vec![0.0; model.config.vocab_len()];
    for &id in ids {
        model.step(TokenId(id), &mut state, &mut logits).unwrap();
    }
    logits
}

#[test]
fn save_then_load_gives_the_same_logits() {
    for input in [InputKind::Embedding { dim: 6 }, InputKind::OneHot] {
        let model = random_model(input, 11);
        let scratch = scratch_dir(&format!("save-{}", matches!(input, InputKind::OneHot)));
        let dir = scratch.path().to_path_buf();
        save_model(&dir, &model.config, &model.lstm).unwrap();
        let loaded = LoadedModel::load_dir(&dir).unwrap();
        assert_eq!(loaded.config, model.config);
        let ids = [3, 25, 26, 7, 27];
        assert_eq!(logits_after(&loaded, &ids), logits_after(&model, &ids));
        // The same bytes load from memory too.
        let from_bytes = LoadedModel::from_bytes(
            &std::fs::read(dir.join(CONFIG_FILE)).unwrap(),
            &std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
            "memory",
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(logits_after(&from_bytes, &ids), logits_after(&model, &ids));
    }
}

#[test]
fn the_builtin_model_loads_and_generates() {
    let model = LoadedModel::builtin().unwrap();
    let memory = model.memory.as_ref().expect("the built-in model ships its tune memory");
    assert!(memory.len() > 1_000_000, "{} symbols", memory.len());
    assert!(memory.config().weights.iter().flatten().any(|&w| w > 0.1), "{:?}", memory.config().weights);
    answers_a_phrase(model);
}

#[test]
fn the_shipped_folk_wide_model_loads_and_generates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../presets/models/folk-wide");
    let model = LoadedModel::load_dir(&dir).unwrap();
    assert!(model.memory.as_ref().is_some_and(|m| m.len() > 2_000_000), "folk-wide ships its tune memory");
    answers_a_phrase(model);
}

/// Checks `model` and lets it answer a bar-long phrase with eight beats.
fn answers_a_phrase(model: LoadedModel) {
    let model = Arc::new(model);
    assert_eq!(model.config.validate(), Ok(()));
    let primer = melody(&[(60, 0.0, 1.0), (64, 1.0, 1.0), (67, 2.0, 2.0)]);
    let settings = SamplingSettings { may_end: false, ..Default::default() };
    let out = continue_melody(&model, &primer, 32, &settings, 1).unwrap();
    assert_eq!(out.end_beats, 8.0);
    assert!(!out.notes.is_empty(), "an answer with no notes");
}

/// A saved good model, and its tensors by name.
fn saved_model(name: &str) -> (tempfile::TempDir, PathBuf, HashMap<String, Tensor>) {
    let model = formula_model(&golden_config());
    let scratch = scratch_dir(name);
    let dir = scratch.path().to_path_buf();
    save_model(&dir, &model.config, &model.lstm).unwrap();
    (scratch, dir, model.lstm.named_tensors().into_iter().collect())
}

fn write_tensors(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join(WEIGHTS_FILE)).unwrap();
}

#[test]
fn a_truncated_weights_file_is_named_as_such() {
    let (_scratch, dir, _) = saved_model("truncated");
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    match LoadedModel::load_dir(&dir) {
        Err(ModelError::Truncated { path: p, expected_bytes, got_bytes }) => {
            assert!(p.ends_with(WEIGHTS_FILE));
            assert_eq!(expected_bytes, bytes.len() as u64);
            assert_eq!(got_bytes, bytes.len() as u64 - 10);
        }
        other => panic!("{other:?}"),
    }
    // Cut inside the header, and before the header length.
    std::fs::write(&path, &bytes[..20]).unwrap();
    assert!(matches!(LoadedModel::load_dir(&dir), Err(ModelError::Truncated { .. })));
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(matches!(LoadedModel::load_dir(&dir), Err(ModelError::Truncated { expected_bytes: 8, .. })));
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let (_scratch, dir, mut tensors) = saved_model("shape");
    tensors.insert("lstm.weight_hh_l1".into(), Tensor::zeros((16, 5), DType::F32, &Device::Cpu).unwrap());
    write_tensors(&dir, &tensors);
    match LoadedModel::load_dir(&dir) {
        Err(ModelError::ShapeMismatch { name, expected, got, .. }) => {
            assert_eq!(name, "lstm.weight_hh_l1");
            assert_eq!((expected, got), (vec![16, 4], vec![16, 5]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_vocabulary_mismatch_is_named() {
    let (_scratch, dir, _) = saved_model("vocab");
    // The config now lists pitches 60..=66 (10 symbols); the weights are for 8.
    let mut cfg = golden_config();
    cfg.vocab = Vocab::for_pitch_range(60, 66);
    cfg.highest_pitch = 66;
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&cfg).unwrap()).unwrap();
    match LoadedModel::load_dir(&dir) {
        Err(ModelError::VocabMismatch { config_len, weights_len, .. }) => {
            assert_eq!((config_len, weights_len), (10, 8))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_nan_weight_is_named() {
    let (_scratch, dir, mut tensors) = saved_model("nan");
    let mut values = tensors["head.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[5] = f32::NAN;
    values[6] = f32::INFINITY;
    tensors.insert("head.weight".into(), Tensor::from_vec(values, (8, 4), &Device::Cpu).unwrap());
    write_tensors(&dir, &tensors);
    match LoadedModel::load_dir(&dir) {
        Err(ModelError::NonFinite { name, num_bad, .. }) => {
            assert_eq!((name.as_str(), num_bad), ("head.weight", 2))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_files_and_tensors_are_named() {
    let (_scratch, dir, mut tensors) = saved_model("missing");
    tensors.remove("head.bias");
    write_tensors(&dir, &tensors);
    assert!(
        matches!(LoadedModel::load_dir(&dir), Err(ModelError::MissingTensor { name, .. }) if name == "head.bias")
    );

    tensors.insert("head.bias".into(), Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap());
    tensors.insert("extra".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
    write_tensors(&dir, &tensors);
    assert!(
        matches!(LoadedModel::load_dir(&dir), Err(ModelError::UnexpectedTensor { name, .. }) if name == "extra")
    );

    std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    match LoadedModel::load_dir(&dir) {
        Err(ModelError::MissingFile { path }) => assert!(path.ends_with(CONFIG_FILE)),
        other => panic!("{other:?}"),
    }
    std::fs::write(dir.join(CONFIG_FILE), "{\"format_version\": 1}").unwrap();
    assert!(matches!(LoadedModel::load_dir(&dir), Err(ModelError::ConfigParse { .. })));
    let mut cfg = golden_config();
    cfg.hidden_size = 0;
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&cfg).unwrap()).unwrap();
    assert!(matches!(LoadedModel::load_dir(&dir), Err(ModelError::InvalidConfig { .. })));
}

/// A saved good model with a tune memory of `stream` whose weights are all `weight`.
fn saved_model_with_memory(name: &str, stream: &[u8], weight: f32) -> (tempfile::TempDir, PathBuf) {
    let (scratch, dir, _) = saved_model(name);
    let mut cfg = MemoryConfig { max_context: 8, ..MemoryConfig::default() };
    cfg.weights.iter_mut().flatten().for_each(|w| *w = weight);
    TuneMemory::build(stream, golden_config().vocab_len(), cfg).unwrap().save(&dir).unwrap();
    (scratch, dir)
}

#[test]
fn a_tune_memory_loads_with_its_model_and_each_damaged_file_is_named() {
    // Golden vocabulary: pitches 60..=64 are tokens 0..=4, then `/`, `_`, `r`.
    let stream = [5, 0, 6, 2, 6, 4, 6, 5, 0, 6, 2, 6, 3, 6, 5];
    let (_scratch, dir) = saved_model_with_memory("memory", &stream, 0.5);
    let model = LoadedModel::load_dir(&dir).unwrap();
    assert_eq!(model.memory.as_ref().map(|m| m.len()), Some(stream.len()));
    let error = |dir: &Path| LoadedModel::load_dir(dir).unwrap_err().to_string();

    let bin = dir.join(MEMORY_FILE);
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() - 3]).unwrap();
    let message = error(&dir);
    assert!(message.contains(MEMORY_FILE) && message.contains("truncated"), "{message}");
    let mut past_vocab = bytes.clone();
    past_vocab[20] = 9;
    std::fs::write(&bin, &past_vocab).unwrap();
    let message = error(&dir);
    assert!(message.contains(MEMORY_FILE) && message.contains("token 9"), "{message}");
    std::fs::write(&bin, &bytes).unwrap();

    let json = dir.join(MEMORY_CONFIG_FILE);
    let text = std::fs::read_to_string(&json).unwrap();
    std::fs::write(&json, "{\"max_context\": ").unwrap();
    let message = error(&dir);
    assert!(message.contains(MEMORY_CONFIG_FILE) && message.contains("not memory settings"), "{message}");
    std::fs::write(&json, text.replace("0.5", "1.5")).unwrap();
    let message = error(&dir);
    assert!(message.contains(MEMORY_CONFIG_FILE) && message.contains("1.5"), "{message}");
    std::fs::write(&json, &text).unwrap();

    std::fs::remove_file(&bin).unwrap();
    assert!(
        matches!(LoadedModel::load_dir(&dir), Err(ModelError::MissingFile { path }) if path.ends_with(MEMORY_FILE))
    );
    std::fs::write(&bin, &bytes).unwrap();
    std::fs::remove_file(&json).unwrap();
    let message = error(&dir);
    assert!(message.contains(MEMORY_FILE) && message.contains(MEMORY_CONFIG_FILE), "{message}");

    // A memory written for another vocabulary.
    let mut other = golden_config();
    other.vocab = Vocab::for_pitch_range(60, 66);
    let cfg = MemoryConfig { max_context: 8, ..MemoryConfig::default() };
    std::fs::remove_file(&bin).unwrap();
    TuneMemory::build(&stream, other.vocab_len(), cfg).unwrap().save(&dir).unwrap();
    let message = error(&dir);
    assert!(message.contains(MEMORY_FILE) && message.contains("vocabulary of 10"), "{message}");
}

#[test]
fn generation_mixes_the_tune_memory_into_every_step() {
    // After `60 _ 62 _` the memory has only ever seen 64 come next.
    let stream = [5, 0, 6, 2, 6, 4, 6, 6, 5, 0, 6, 2, 6, 4, 6, 5];
    let (_scratch, dir) = saved_model_with_memory("memory-generation", &stream, 0.5);
    let with_memory = Arc::new(LoadedModel::load_dir(&dir).unwrap());
    let network = LoadedModel::load_dir(&dir).unwrap().with_memory(None);
    let primer = parse_symbols("/ 60 _ 62 _").unwrap();
    let mut generator = Generator::new(Arc::clone(&with_memory), 1);
    generator.prime(&primer).unwrap();
    let mut state = network.new_state();
    let mut logits = vec![0.0; network.config.vocab_len()];
    for s in &primer {
        network.step(network.config.vocab.id(*s).unwrap(), &mut state, &mut logits).unwrap();
    }
    let softmax = |l: &[f32]| {
        let sum: f32 = l.iter().map(|x| x.exp()).sum();
        l.iter().map(|x| x.exp() / sum).collect::<Vec<f32>>()
    };
    let (p, mixed) = (softmax(&logits), softmax(generator.logits().unwrap()));
    for (idx, (&p, &q)) in p.iter().zip(&mixed).enumerate() {
        // Token 4 is pitch 64; the match is `/ 60 _ 62 _`, five symbols found twice.
        let expected = 0.5 * p + if idx == 4 { 0.5 } else { 0.0 };
        assert!((q - expected).abs() < 1e-5, "token {idx}: {q} against {expected}");
    }
    // Greedy generation follows the memory where it is sure, and repeats for a seed.
    let settings = SamplingSettings { temperature: 0.0, may_end: false, ..Default::default() };
    assert_eq!(generator.next_symbol(&settings).unwrap(), Some(Symbol::Pitch(64)));
    let out = |seed| {
        continue_melody(
            &with_memory,
            &melody(&[(60, 0.0, 0.5), (62, 0.5, 0.5)]),
            32,
            &SamplingSettings { may_end: false, ..Default::default() },
            seed,
        )
        .unwrap()
    };
    assert_eq!(out(3), out(3));
}

/// Twelve short songs in C major built from a few stepwise figures, so a tiny model can learn
/// something in a few dozen steps.
fn tiny_corpus() -> Collection {
    let figures: [&[u8]; 4] =
        [&[60, 62, 64, 65, 67], &[67, 65, 64, 62, 60], &[60, 64, 67, 64, 60], &[64, 62, 60, 62, 64]];
    let melodies = (0..12)
        .map(|i| {
            let mut notes = Vec::new();
            let mut t = 0.0;
            for f in 0..3 {
                for &p in figures[(i + f) % 4] {
                    notes.push((p, t, 0.5));
                    t += 0.5;
                }
                notes.push((60, t, 1.5));
                t += 1.5;
            }
            let mut m = melody(&notes);
            m.key = Some(Key::C_MAJOR);
            m
        })
        .collect();
    Collection { melodies, num_files: 1, ..Default::default() }
}

fn tiny_train_config(epochs: usize) -> TrainConfig {
    TrainConfig {
        data: DataConfig { drop_validation_duplicates: false, delimiter_len: 8, ..Default::default() },
        model: ModelShape {
            input: InputKind::Embedding { dim: 8 },
            hidden_size: 24,
            num_layers: 1,
            dropout: 0.0,
            ..Default::default()
        },
        window_len: 16,
        window_stride: 8,
        batch_size: 8,
        epochs,
        patience: 0,
        learning_rate: 1e-2,
        warmup_steps: 5,
        eval: EvalConfig { context_len: 16, max_targets: Some(40), ..Default::default() },
        ..Default::default()
    }
}

/// `corpus` as the one set "tiny", under `cfg`'s data settings.
fn tiny_data(corpus: Collection, cfg: &TrainConfig) -> Dataset {
    build_dataset(vec![("tiny".into(), corpus)], &cfg.data).unwrap()
}

/// A tiny model trained from scratch for 4 epochs into `dir`: its settings, data and record.
fn trained_tiny_model(dir: &Path) -> (TrainConfig, Dataset, TrainSummary) {
    let cfg = tiny_train_config(4);
    let data = tiny_data(tiny_corpus(), &cfg);
    let summary = train(&cfg, &data, dir, &Device::Cpu, false, &mut Quiet).unwrap();
    (cfg, data, summary)
}

#[test]
fn a_tiny_model_learns_and_resumes() {
    let data = tiny_data(tiny_corpus(), &tiny_train_config(1));
    let scratch = scratch_dir("train");
    let dir = scratch.path().to_path_buf();
    let summary = train(&tiny_train_config(4), &data, &dir, &Device::Cpu, false, &mut Quiet).unwrap();
    assert_eq!(summary.epochs.len(), 4);
    let first = &summary.epochs[0];
    let last = &summary.epochs[3];
    assert!(last.train_loss < first.train_loss * 0.75, "{} → {}", first.train_loss, last.train_loss);
    let (first_val, last_val) = (first.validation[0].1.all.loss, last.validation[0].1.all.loss);
    assert!(last_val < first_val, "{first_val} → {last_val}");
    assert!(summary.num_params > 0 && summary.symbols_per_s > 0.0);
    // Epochs were judged on 40 targets; the kept weights at the end on all of them.
    assert_eq!(first.validation[0].1.all.num_targets, 40);
    let stream_len = data.validation[0].tokens.len();
    assert_eq!(summary.final_validation[0].1.all.num_targets, stream_len - 16);
    // The best epoch's weights form a loadable model directory with its summary.
    let loaded = LoadedModel::load_dir(&dir).unwrap();
    assert_eq!(loaded.config.vocab, data.vocab);
    assert!(dir.join(TRAIN_FILE).exists());

    // Two more epochs pick up where the run stopped.
    let resumed = train(&tiny_train_config(6), &data, &dir, &Device::Cpu, true, &mut Quiet).unwrap();
    assert_eq!(resumed.epochs.len(), 6);
    assert_eq!(resumed.resumed_after_epochs, vec![4]);
    for (a, b) in resumed.epochs.iter().zip(&summary.epochs) {
        assert_eq!(a.epoch, b.epoch);
        assert!((a.train_loss - b.train_loss).abs() < 1e-12);
    }
    assert!(resumed.epochs[5].train_loss < summary.epochs[0].train_loss);
}

/// A tiny model's tune memory, fitted on its held-out songs, lowers their loss: one of them is
/// also a training song (the tiny data keeps duplicates), which the memory holds verbatim and
/// a network of four epochs does not. Fitted and scored on the same songs, so this checks the
/// mechanics; the built-in model's weights are fitted on another set than the one it is judged on.
#[test]
fn a_tiny_models_tune_memory_lowers_its_held_out_loss() {
    let scratch = scratch_dir("memory-fit");
    let (cfg, data, _) = trained_tiny_model(scratch.path());
    let model = LoadedModel::load_dir(scratch.path()).unwrap();
    assert!(model.memory.is_none(), "training writes no memory");
    let stream: Vec<u8> = data.train_tokens.iter().map(|&t| t as u8).collect();
    let memory = TuneMemory::build(&stream, data.vocab.len(), MemoryConfig::default()).unwrap();
    let val = &data.validation[0];
    let eval = EvalConfig { max_targets: None, ..cfg.eval.clone() };
    let (targets, rows) =
        window_predictions(&model.lstm, &val.tokens, &val.bars, &eval, &mut |_| {}).unwrap();
    assert_eq!(targets.len(), val.tokens.len() - eval.context_len);
    let samples: Vec<_> = targets
        .iter()
        .zip(&rows)
        .map(|(&idx, row)| {
            let target = val.tokens[idx] as usize;
            let sum: f32 = row.iter().map(|l| l.exp()).sum();
            let p_model = (row[target].exp() / sum) as f64;
            memory.fit_sample(&val.tokens[idx - eval.context_len..idx], target, p_model)
        })
        .collect();
    let mut memory_cfg = memory.config().clone();
    memory_cfg.weights = fit_weights(&memory_cfg, &samples);
    let memory = memory.with_config(memory_cfg).unwrap();
    let network = evaluate(&model.lstm, &val.tokens, &val.bars, &data.vocab, &eval, &mut |_| {}).unwrap();
    let mixed = evaluate_with_memory(
        &model.lstm,
        Some(&memory),
        &val.tokens,
        &val.bars,
        &data.vocab,
        &eval,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(mixed.all.num_targets, network.all.num_targets);
    // The same figures from the predictions made once.
    let again = score_predictions(&val.tokens, &targets, &rows, &data.vocab, Some(&memory), eval.context_len);
    assert!((again.all.loss - mixed.all.loss).abs() < 1e-5, "{} against {}", again.all.loss, mixed.all.loss);
    assert!(mixed.all.loss < 0.5 * network.all.loss, "{} → {}", network.all.loss, mixed.all.loss);

    // Saved beside the network, it comes back with the model and speaks in generation.
    memory.save(scratch.path()).unwrap();
    let model = Arc::new(LoadedModel::load_dir(scratch.path()).unwrap());
    assert_eq!(model.memory.as_ref().map(|m| m.config()), Some(memory.config()));
    let primer = melody(&[(60, 0.0, 0.5), (62, 0.5, 0.5), (64, 1.0, 0.5)]);
    let settings = SamplingSettings { may_end: false, ..Default::default() };
    assert!(!continue_melody(&model, &primer, 32, &settings, 2).unwrap().notes.is_empty());
}

/// With a smallest context, only the targets predicted from at least that many symbols of
/// their window count: half of each 16-symbol window at 9, over the same windows, and the
/// run's record says so; a smallest context no window reaches is refused before any training.
#[test]
fn a_smallest_context_leaves_the_early_targets_out() {
    let data = tiny_data(tiny_corpus(), &tiny_train_config(1));
    let run = |min_context| {
        let scratch = scratch_dir("context");
        let cfg = TrainConfig { min_context, ..tiny_train_config(1) };
        train(&cfg, &data, scratch.path(), &Device::Cpu, false, &mut Quiet)
    };
    let every = run(0).unwrap().epochs[0].train_symbols;
    assert_eq!(run(1).unwrap().epochs[0].train_symbols, every);
    let late = run(9).unwrap();
    assert_eq!(late.epochs[0].train_symbols * 2, every);
    // The run's record keeps the setting, and leaves it out where every position counted.
    assert_eq!(serde_json::to_value(&late.config).unwrap()["min_context"], 9);
    assert!(serde_json::to_value(tiny_train_config(1)).unwrap().get("min_context").is_none());
    let err = run(17).unwrap_err().to_string();
    assert!(err.contains("smallest context of 17") && err.contains("windows of 16"), "{err}");
}

/// Collects the notices a training run gives.
#[derive(Default)]
struct Notices(Vec<String>);
impl TrainObserver for Notices {
    fn on_notice(&mut self, message: &str) {
        self.0.push(message.to_string());
    }
}

/// A run stopped after 2 epochs and resumed for 2 more is the 4-epoch run: AdamW's moments
/// and the weight average come back with the weights. Without them (a checkpoint from before
/// they were saved), the run still resumes, says so, and goes elsewhere.
#[test]
fn a_resumed_run_continues_exactly() {
    // A cosine's shape depends on the planned epochs; a step schedule's only on the epoch.
    let config = |epochs| TrainConfig {
        weight_average: 0.9,
        schedule: LrSchedule::Step { every_epochs: 1, factor: 0.7 },
        ..tiny_train_config(epochs)
    };
    let data = tiny_data(tiny_corpus(), &config(1));
    let whole_dir = scratch_dir("whole");
    let whole = train(&config(4), &data, whole_dir.path(), &Device::Cpu, false, &mut Quiet).unwrap();

    let mut resumed_runs = Vec::new();
    for keep_optimizer in [true, false] {
        let scratch = scratch_dir("halves");
        let dir = scratch.path();
        train(&config(2), &data, dir, &Device::Cpu, false, &mut Quiet).unwrap();
        let optimizer_file = dir.join(CHECKPOINT_DIR).join("optimizer.safetensors");
        assert!(optimizer_file.exists());
        if !keep_optimizer {
            std::fs::remove_file(&optimizer_file).unwrap();
        }
        let mut notices = Notices::default();
        let resumed = train(&config(4), &data, dir, &Device::Cpu, true, &mut notices).unwrap();
        assert_eq!(resumed.resumed_after_epochs, vec![2]);
        if keep_optimizer {
            assert_eq!(notices.0, Vec::<String>::new());
        } else {
            assert_eq!(notices.0.len(), 1);
            let notice = &notices.0[0];
            assert!(notice.starts_with(&optimizer_file.display().to_string()), "{notice}");
            assert!(notice.contains("start afresh"), "{notice}");
        }
        resumed_runs.push(resumed);
    }

    let gap = |run: &TrainSummary, epoch: usize| {
        let (a, b) = (&run.epochs[epoch], &whole.epochs[epoch]);
        let train_gap = (a.train_loss - b.train_loss).abs();
        let validation_gap = (a.validation[0].1.all.loss - b.validation[0].1.all.loss).abs();
        train_gap.max(validation_gap)
    };
    for epoch in 2..4 {
        assert!(
            gap(&resumed_runs[0], epoch) < 1e-5,
            "epoch {}: off by {}",
            epoch + 1,
            gap(&resumed_runs[0], epoch)
        );
    }
    assert!(
        gap(&resumed_runs[1], 2) > 1e-3,
        "a cold optimiser should change epoch 3: {}",
        gap(&resumed_runs[1], 2)
    );
}

/// An optimiser file left from an earlier epoch (a run killed between writing it and the
/// weights) is not paired with newer weights: the run says so and starts the optimiser cold.
#[test]
fn a_stale_optimizer_checkpoint_is_refused() {
    let data = tiny_data(tiny_corpus(), &tiny_train_config(1));
    let scratch = scratch_dir("stale");
    let dir = scratch.path();
    train(&tiny_train_config(1), &data, dir, &Device::Cpu, false, &mut Quiet).unwrap();
    let optimizer_file = dir.join(CHECKPOINT_DIR).join("optimizer.safetensors");
    let after_epoch_1 = std::fs::read(&optimizer_file).unwrap();
    train(&tiny_train_config(2), &data, dir, &Device::Cpu, true, &mut Quiet).unwrap();
    std::fs::write(&optimizer_file, after_epoch_1).unwrap();

    let mut notices = Notices::default();
    let resumed = train(&tiny_train_config(3), &data, dir, &Device::Cpu, true, &mut notices).unwrap();
    assert_eq!(resumed.epochs.len(), 3);
    assert_eq!(
        notices.0,
        vec![format!(
            "{}: written after another epoch than the resumed weights' (2): AdamW's moments and the \
             weight average start afresh from the resumed weights",
            optimizer_file.display()
        )]
    );
}

/// Locked dropout and DropConnect on the recurrent weights, together: a tiny model still
/// learns, and a weight drop outside [0, 1) is refused before any training.
#[test]
fn a_tiny_model_learns_under_locked_dropout_and_weight_drop() {
    let mut cfg = tiny_train_config(4);
    cfg.model.dropout = 0.2;
    cfg.model.locked_dropout = true;
    cfg.model.weight_drop = 0.3;
    let data = tiny_data(tiny_corpus(), &cfg);
    let scratch = scratch_dir("regularised");
    let summary = train(&cfg, &data, scratch.path(), &Device::Cpu, false, &mut Quiet).unwrap();
    let (first, last) = (&summary.epochs[0], &summary.epochs[3]);
    assert!(last.train_loss < first.train_loss * 0.8, "{} → {}", first.train_loss, last.train_loss);
    let (first_val, last_val) = (first.validation[0].1.all.loss, last.validation[0].1.all.loss);
    assert!(last_val < first_val, "{first_val} → {last_val}");
    assert_eq!(summary.config.model.weight_drop, 0.3);

    cfg.model.weight_drop = 1.0;
    let refused = scratch_dir("refused");
    let err = train(&cfg, &data, refused.path(), &Device::Cpu, false, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("weight drop 1 is outside [0, 1)"), "{err}");
    assert!(!refused.path().join(TRAIN_FILE).exists());
}

/// Fine-tuning: a run started from a trained model begins where that model stands, encodes its
/// data in that model's vocabulary, and is refused, naming both, when its sizes differ.
#[test]
fn a_run_starts_from_a_trained_model() {
    let scratch = scratch_dir("fine-tune");
    let base_dir = scratch.path().join("base");
    let (_, data, base) = trained_tiny_model(&base_dir);
    let base_loss = base.best_validation[0].1.all.loss;
    let fresh_first_loss = base.epochs[0].validation[0].1.all.loss;

    // A song reaching above the base's highest pitch is dropped rather than growing the
    // vocabulary, and a near-zero learning rate leaves the base's validation loss in place.
    let base_config = read_model_config(&ModelSource::Dir(base_dir.clone())).unwrap();
    let mut tune_cfg = tiny_train_config(1);
    tune_cfg.adopt_base(&base_config);
    tune_cfg.init_from = Some(base_dir.display().to_string());
    tune_cfg.learning_rate = 1e-9;
    let mut corpus = tiny_corpus();
    let mut high = melody(&[(60, 0.0, 1.0), (base_config.highest_pitch + 12, 1.0, 1.0)]);
    high.key = Some(Key::C_MAJOR);
    corpus.melodies.push(high);
    let tune_data = tiny_data(corpus, &tune_cfg);
    assert_eq!(tune_data.vocab, base_config.vocab);
    assert_eq!(tune_data.counts[0].num_kept, data.counts[0].num_kept);
    let tuned_dir = scratch.path().join("tuned");
    let tuned = train(&tune_cfg, &tune_data, &tuned_dir, &Device::Cpu, false, &mut Quiet).unwrap();
    let tuned_loss = tuned.epochs[0].validation[0].1.all.loss;
    assert!((tuned_loss - base_loss).abs() < 1e-4, "base {base_loss}, fine-tuned {tuned_loss}");
    assert!(tuned_loss < fresh_first_loss - 0.2, "fresh {fresh_first_loss}, fine-tuned {tuned_loss}");
    assert_eq!(LoadedModel::load_dir(&tuned_dir).unwrap().config, base_config);
    // The base was validated first, on the same targets.
    assert!((tuned.base_validation[0].1.all.loss - base_loss).abs() < 1e-9);

    // A run that only makes the model worse keeps the base, as epoch 0.
    tune_cfg.learning_rate = 5.0;
    tune_cfg.grad_clip_norm = 0.0;
    let worse_dir = scratch.path().join("worse");
    let worse = train(&tune_cfg, &tune_data, &worse_dir, &Device::Cpu, false, &mut Quiet).unwrap();
    assert!(worse.epochs[0].validation[0].1.all.loss > base_loss + 0.1, "{:?}", worse.epochs[0]);
    assert_eq!(worse.best_epoch, Some(0));
    let ids: Vec<u16> = (0..base_config.vocab_len() as u16).collect();
    let base_model = LoadedModel::load_dir(&base_dir).unwrap();
    assert_eq!(
        logits_after(&LoadedModel::load_dir(&worse_dir).unwrap(), &ids),
        logits_after(&base_model, &ids)
    );

    // Other sizes do not fit its weights.
    tune_cfg.model.hidden_size = 32;
    let refused = scratch.path().join("refused");
    let err =
        train(&tune_cfg, &tune_data, &refused, &Device::Cpu, false, &mut Quiet).unwrap_err().to_string();
    assert!(
        err.contains(&base_dir.display().to_string()) && err.contains("size 1×24, the run's 1×32"),
        "{err}"
    );
    assert!(!refused.join(TRAIN_FILE).exists());
}

/// Distillation: the teachers' targets are their own next-symbol distributions over each
/// window, a smaller student learns from them alone, and a teacher that reads the data another
/// way, or lacks one of the run's symbols, is refused by name.
#[test]
fn a_student_learns_from_its_teachers() {
    let scratch = scratch_dir("distill");
    let teacher_dir = scratch.path().join("teacher");
    let (cfg, data, taught) = trained_tiny_model(&teacher_dir);
    let teacher_loss = taught.best_validation[0].1.all.loss;
    let teacher = LoadedModel::load_dir(&teacher_dir).unwrap();

    // With one teacher, the targets are its softmax after each window's prefix, from the zero
    // state, in the trainer's target order (time-major).
    let source = teacher_dir.display().to_string();
    let student_cfg = model_config(&cfg, &data);
    let teachers =
        Teachers::load(std::slice::from_ref(&source), &student_cfg, &data.train_tokens, &Device::Cpu)
            .unwrap();
    let (starts, window) = ([3usize, 20], 6);
    let soft = teachers.soft_targets(&data.train_bars, &starts, window, &Device::Cpu).unwrap().unwrap();
    let soft = soft.to_vec2::<f32>().unwrap();
    assert_eq!(soft.len(), starts.len() * window);
    for (b, &start) in starts.iter().enumerate() {
        let mut state = teacher.new_state();
        let mut logits = vec![0.0; teacher.config.vocab_len()];
        for t in 0..window {
            let token = TokenId(data.train_tokens[start + t] as u16);
            teacher.step(token, &mut state, &mut logits).unwrap();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            let row = &soft[t * starts.len() + b];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            for (got, l) in row.iter().zip(&logits) {
                assert!((got - (l - max).exp() / sum).abs() < 1e-5, "window {b}, step {t}");
            }
        }
    }

    // A student of another size, taught by the teacher alone, learns the tunes from it.
    let mut student = tiny_train_config(8);
    student.model.hidden_size = 16;
    student.teachers = vec![source.clone()];
    student.teacher_weight = 1.0;
    let student_dir = scratch.path().join("student");
    let summary = train(&student, &data, &student_dir, &Device::Cpu, false, &mut Quiet).unwrap();
    let (first, last) = (&summary.epochs[0], &summary.epochs[7]);
    let (first_val, last_val) = (first.validation[0].1.all.loss, last.validation[0].1.all.loss);
    // It comes close to the teacher it copies (the tunes' uniform guess is ln 11 ≈ 2.4 nats).
    assert!(last_val < first_val - 0.15, "{first_val} → {last_val}");
    assert!(last_val < teacher_loss + 0.1, "student {last_val}, teacher {teacher_loss}");
    assert_eq!(summary.config.teachers, vec![source.clone()]);
    // Before training, the run scores what it learns from: one teacher's mean is that teacher.
    let alone = &summary.teachers_validation[0].1.all;
    assert!((alone.loss - teacher_loss).abs() < 1e-5, "{} against {teacher_loss}", alone.loss);

    // Two teachers' mean, window by window: each predicts every target from exactly the
    // `context_len` symbols before it, from the zero state, and their probabilities average.
    let student_model = LoadedModel::load_dir(&student_dir).unwrap();
    let pair = [source.clone(), student_dir.display().to_string()];
    let both = Teachers::load(&pair, &student_cfg, &data.train_tokens, &Device::Cpu).unwrap();
    let stream = &data.validation[0];
    let eval = &EvalConfig { max_targets: None, ..student.eval.clone() };
    let got = both.evaluate(&stream.tokens, &stream.bars, &data.vocab, eval, &mut |_| {}).unwrap();
    let mut nll = 0.0;
    for i in eval.context_len..stream.tokens.len() {
        let mut mean = 0.0;
        for model in [&teacher, &student_model] {
            let mut state = model.new_state();
            let mut logits = vec![0.0; model.config.vocab_len()];
            for &token in &stream.tokens[i - eval.context_len..i] {
                model.step(TokenId(token as u16), &mut state, &mut logits).unwrap();
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            mean += ((logits[stream.tokens[i] as usize] - max).exp() / sum) as f64 / 2.0;
        }
        nll -= mean.ln();
    }
    let want = nll / (stream.tokens.len() - eval.context_len) as f64;
    assert_eq!(got.all.num_targets, stream.tokens.len() - eval.context_len);
    assert!((got.all.loss - want).abs() < 1e-5, "{} against {want}", got.all.loss);

    // Another song delimiter reads the stream differently.
    let mut other = tiny_train_config(1);
    other.data.delimiter_len = 4;
    other.teachers = vec![source.clone()];
    let other_data = tiny_data(tiny_corpus(), &other);
    let refused = scratch.path().join("refused");
    let err = train(&other, &other_data, &refused, &Device::Cpu, false, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains(&source) && err.contains("song delimiter 8, the run's 4"), "{err}");
    assert!(!refused.join(TRAIN_FILE).exists());

    // A song above the teacher's range gives the run symbols the teacher cannot predict; the
    // first of them is named.
    let mut corpus = tiny_corpus();
    let mut high = melody(&[(60, 0.0, 1.0), (teacher.config.highest_pitch + 2, 1.0, 1.0)]);
    high.key = Some(Key::C_MAJOR);
    corpus.melodies.push(high);
    let wider = tiny_data(corpus, &student);
    let err = train(&student, &wider, &refused, &Device::Cpu, false, &mut Quiet).unwrap_err().to_string();
    let missing = teacher.config.highest_pitch + 1;
    assert!(err.contains(&source) && err.contains(&format!("lacks the run's symbol {missing}")), "{err}");
}

/// The built-in model is a base too: a short run on a few tunes starts from it and keeps its
/// sizes and bar inputs.
#[test]
fn a_run_starts_from_the_builtin_model() {
    let builtin = read_model_config(&ModelSource::Builtin).unwrap();
    let mut cfg = tiny_train_config(1);
    cfg.adopt_base(&builtin);
    cfg.init_from = Some("builtin".to_string());
    cfg.learning_rate = 1e-4;
    cfg.max_batches_per_epoch = Some(2);
    let data = tiny_data(tiny_corpus(), &cfg);
    let scratch = scratch_dir("from-builtin");
    let summary = train(&cfg, &data, scratch.path(), &Device::Cpu, false, &mut Quiet).unwrap();
    assert_eq!(
        summary.num_params,
        LoadedModel::builtin()
            .unwrap()
            .lstm
            .named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum::<usize>()
    );
    // The built-in model knows these stepwise tunes in C from the start: far below the
    // vocabulary's uniform guess.
    let loss = summary.epochs[0].validation[0].1.all.loss;
    assert!(loss < 0.5 * (builtin.vocab_len() as f64).ln(), "{loss}");
    assert_eq!(LoadedModel::load_dir(scratch.path()).unwrap().config, builtin);
}

/// The tiny corpus in 4/4, and settings for `epochs` that read bar positions of the common
/// meters.
fn common_time_data(epochs: usize) -> (TrainConfig, Dataset) {
    let mut corpus = tiny_corpus();
    for m in &mut corpus.melodies {
        m.meter = Some(Meter::COMMON);
    }
    let mut cfg = tiny_train_config(epochs);
    cfg.data.bar_meters = bar::COMMON_METERS.to_vec();
    let data = tiny_data(corpus, &cfg);
    (cfg, data)
}

/// Songs in 4/4 whose every figure starts on a downbeat: a model trained with bar positions keeps
/// its meters, learns a table for them, and reads them when stepping.
#[test]
fn a_model_trained_with_bar_positions_keeps_and_reads_them() {
    let (cfg, data) = common_time_data(3);
    let downbeat = BarClock::new(&bar::COMMON_METERS, Meter::COMMON, StepGrid::SIXTEENTHS, 0).unwrap().id();
    assert_eq!(data.train_bars.len(), data.train_tokens.len());
    assert_eq!(bar::step_position(data.train_bars[0]), downbeat);
    // Each song is three bars (three figures of four beats), numbered 1 to 3 (2 to 4 as bar
    // steps carry them: 1 is a pickup).
    let num_downbeats = data.train_bars.iter().filter(|&&b| bar::step_position(b) == downbeat).count();
    assert_eq!(num_downbeats, data.counts[0].num_train_songs * 3);
    let numbers: Vec<u16> =
        data.train_bars[..48].iter().step_by(16).map(|&b| bar::step_bar_number(b)).collect();
    assert_eq!(numbers, vec![2, 3, 4]);
    let scratch = scratch_dir("bars");
    let dir = scratch.path().to_path_buf();
    let summary = train(&cfg, &data, &dir, &Device::Cpu, false, &mut Quiet).unwrap();
    assert!(summary.epochs[2].train_loss < summary.epochs[0].train_loss);

    let loaded = LoadedModel::load_dir(&dir).unwrap();
    assert_eq!(loaded.config.bar_meters, bar::COMMON_METERS.to_vec());
    let table = loaded.lstm.bar_table().unwrap().abs().unwrap().max_all().unwrap();
    assert!(table.to_scalar::<f32>().unwrap() > 0.0, "the bar table learned nothing");
    // The same token at the downbeat and at no known position gives other logits.
    let token = loaded.config.vocab.id(Symbol::Pitch(60)).unwrap();
    let logits = |bar| {
        let mut state = loaded.new_state();
        let mut logits = vec![0.0; loaded.config.vocab_len()];
        loaded.step_at(token, &[bar], &mut state, &mut logits).unwrap();
        logits
    };
    assert_ne!(logits(downbeat), logits(bar::NO_BAR_POSITION));
}

/// A model trained with bar numbers keeps how many it tells apart, learns a table for them,
/// and reads them when stepping: the same symbol at the same place in the first and the third
/// bar of a song gives other logits.
#[test]
fn a_model_trained_with_bar_numbers_keeps_and_reads_them() {
    let (mut cfg, data) = common_time_data(2);
    cfg.model.bar_numbers = 4;
    let scratch = scratch_dir("bar-numbers");
    let dir = scratch.path().to_path_buf();
    train(&cfg, &data, &dir, &Device::Cpu, false, &mut Quiet).unwrap();

    let loaded = LoadedModel::load_dir(&dir).unwrap();
    assert_eq!(loaded.config.bar_numbers, 4);
    let table =
        loaded.lstm.named_tensors().into_iter().find(|(name, _)| name == "bar_number.weight").unwrap().1;
    assert_eq!(table.dims()[0], 6);
    let largest = table.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(largest > 0.0, "the bar-number table learned nothing");
    let token = loaded.config.vocab.id(Symbol::Pitch(60)).unwrap();
    let downbeat = BarClock::new(&bar::COMMON_METERS, Meter::COMMON, StepGrid::SIXTEENTHS, 0).unwrap().id();
    // The inputs beside a token: its bar position, then its bar number's row (no lookback or
    // repeats here).
    let logits = |number_row: u16| {
        let mut state = loaded.new_state();
        let mut logits = vec![0.0; loaded.config.vocab_len()];
        loaded.step_at(token, &[downbeat, number_row], &mut state, &mut logits).unwrap();
        logits
    };
    assert_ne!(logits(2), logits(4));
    // A row past the table is refused, not read out of bounds.
    let mut state = loaded.new_state();
    let mut out = vec![0.0; loaded.config.vocab_len()];
    let err = loaded.step_at(token, &[downbeat, 6], &mut state, &mut out).unwrap_err();
    assert!(err.to_string().contains("bar number"), "{err}");
}

/// Repeat inputs added to a trained model without them start at zero, so the run starts from
/// the model's own function, and then learn; a model that has them keeps their number.
#[test]
fn repeat_inputs_added_to_a_trained_model_start_from_it() {
    let (cfg, data) = common_time_data(2);
    let scratch = scratch_dir("repeats");
    let base_dir = scratch.path().join("base");
    let base = train(&cfg, &data, &base_dir, &Device::Cpu, false, &mut Quiet).unwrap();

    let base_config = read_model_config(&ModelSource::Dir(base_dir.clone())).unwrap();
    let mut tune_cfg = tiny_train_config(2);
    tune_cfg.adopt_base(&base_config);
    tune_cfg.init_from = Some(base_dir.display().to_string());
    tune_cfg.model.repeat_classes = 2;
    let tuned_dir = scratch.path().join("tuned");
    let tuned = train(&tune_cfg, &data, &tuned_dir, &Device::Cpu, false, &mut Quiet).unwrap();
    let base_loss = base.best_validation[0].1.all.loss;
    assert!((tuned.base_validation[0].1.all.loss - base_loss).abs() < 1e-9, "{:?}", tuned.base_validation);
    let loaded = LoadedModel::load_dir(&tuned_dir).unwrap();
    assert_eq!(loaded.config.repeat_classes, 2);
    let table = loaded.lstm.named_tensors().into_iter().find(|(name, _)| name == "repeat.weight").unwrap().1;
    let largest = table.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(largest > 0.0, "the repeat table learned nothing");
    // The same step with and without a repeated symbol gives other logits.
    let token = loaded.config.vocab.id(Symbol::Pitch(60)).unwrap();
    let none = loaded.config.vocab_len() as u16;
    let logits = |short| {
        let mut state = loaded.new_state();
        let mut logits = vec![0.0; loaded.config.vocab_len()];
        loaded.step_at(token, &[bar::NO_BAR_POSITION, short, none], &mut state, &mut logits).unwrap();
        logits
    };
    assert_ne!(logits(token.0), logits(none));

    // From a model with repeats, another number of them does not fit its weights.
    let mut other = tune_cfg.clone();
    other.init_from = Some(tuned_dir.display().to_string());
    other.model.repeat_classes = 1;
    let err = train(&other, &data, &scratch.path().join("refused"), &Device::Cpu, false, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("repeat classes 2, the run's 1"), "{err}");
}

#[test]
fn generation_is_seeded() {
    let model = Arc::new(random_model(InputKind::Embedding { dim: 8 }, 3));
    let primer = melody(&[(62, 0.0, 0.5), (66, 0.5, 0.5), (69, 1.0, 1.0)]);
    let settings = SamplingSettings { temperature: 1.2, may_end: false, ..Default::default() };
    let a = continue_melody(&model, &primer, 64, &settings, 42).unwrap();
    let b = continue_melody(&model, &primer, 64, &settings, 42).unwrap();
    let c = continue_melody(&model, &primer, 64, &settings, 43).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.notes, c.notes);
    assert_eq!(a.end_beats, 16.0);
}

#[test]
fn generation_obeys_scale_and_range_in_the_players_key() {
    let model = Arc::new(random_model(InputKind::OneHot, 5));
    // A primer in E major: the model works in C major, the constraints speak of E major.
    let mut primer = melody(&[(64, 0.0, 1.0), (68, 1.0, 1.0), (71, 2.0, 1.0), (76, 3.0, 1.0)]);
    primer.key = Some(Key::from_tonic(4, Mode::Major));
    let settings = SamplingSettings {
        temperature: 2.0,
        pitches: PitchRules::new(64, 76, Some(Key::from_tonic(4, Mode::Major))),
        may_end: false,
        ..Default::default()
    };
    let mut num_notes = 0;
    for seed in 0..5 {
        let out = continue_melody(&model, &primer, 200, &settings, seed).unwrap();
        for note in &out.notes {
            assert!(Key::from_tonic(4, Mode::Major).contains(note.pitch), "{} outside E major", note.pitch);
            assert!((64..=76).contains(&note.pitch), "{} outside the range", note.pitch);
        }
        num_notes += out.notes.len();
    }
    assert!(num_notes > 20, "only {num_notes} notes");
}

#[test]
fn the_generator_streams_one_symbol_per_step() {
    let model = Arc::new(random_model(InputKind::Embedding { dim: 8 }, 9));
    let vocab = model.config.vocab.clone();
    let primer = parse_symbols("/ 60 _ 62 _ 64 _ _ _").unwrap();
    let mut generator = Generator::new(Arc::clone(&model), 1);
    generator.prime(&primer).unwrap();
    generator.set_max_steps(Some(40));

    // The same path stepped by hand: greedy steps must pick the arg-max of these logits.
    let mut state = model.new_state();
    let mut logits = vec![0.0; vocab.len()];
    for s in &primer {
        model.step(vocab.id(*s).unwrap(), &mut state, &mut logits).unwrap();
    }
    let mut generated = Vec::new();
    for step in 0..40 {
        // The temperature changes between steps: odd steps greedy, even steps sampled.
        let temperature = if step % 2 == 1 { 0.0 } else { 1.0 };
        let settings = SamplingSettings { temperature, ..Default::default() };
        let Some(symbol) = generator.next_symbol(&settings).unwrap() else { break };
        if temperature == 0.0 {
            let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(symbol, vocab.symbol(TokenId(best as u16)), "step {step}");
        }
        model.step(vocab.id(symbol).unwrap(), &mut state, &mut logits).unwrap();
        generated.push(symbol);
        if symbol == Symbol::Delimiter {
            break;
        }
    }
    assert!(generator.is_finished());
    assert_eq!(generator.next_symbol(&SamplingSettings::default()).unwrap(), None);
    assert_eq!(generated.len(), generator.num_generated());
    // After a reset the same seed path repeats only if reseeded.
    generator.reset();
    generator.reseed(1);
    assert_eq!(generator.num_generated(), 0);
    assert!(!generator.is_finished());
}

#[test]
fn a_phrase_continuation_hands_back_the_players_key() {
    let model = Arc::new(random_model(InputKind::Embedding { dim: 8 }, 4));
    // G major, declared: the model hears it moved up a fourth to C major.
    let mut primer = melody(&[(67, 0.0, 1.0), (71, 1.0, 1.0), (74, 2.0, 2.0)]);
    primer.key = Some(Key::from_tonic(7, Mode::Major));
    let mut phrase = PhraseContinuation::start(Arc::clone(&model), &primer, 48, 8).unwrap();
    assert_eq!(phrase.shift_semitones(), 5);
    assert_eq!(phrase.step_beats(), 0.25);
    let g_major = SamplingSettings {
        pitches: PitchRules::new(0, 127, Some(Key::from_tonic(7, Mode::Major))),
        may_end: false,
        ..Default::default()
    };
    while let Some(symbol) = phrase.next_symbol(&g_major).unwrap() {
        if let Symbol::Pitch(p) = symbol {
            assert!(Key::from_tonic(7, Mode::Major).contains(p), "{p}");
        }
        // Finished notes never change, and with the open one they are the whole melody so far.
        let mut so_far = phrase.finished_notes().to_vec();
        so_far.extend(phrase.open_note().copied());
        assert_eq!(so_far, phrase.melody().notes);
        if let Some(open) = phrase.open_note() {
            assert_eq!(open.end_beats(), phrase.symbols().len() as f64 * 0.25);
        }
    }
    assert_eq!(phrase.symbols().len(), 48);
    assert_eq!(phrase.melody().end_beats, 12.0);
    assert_eq!(phrase.finished_notes(), phrase.melody().notes.as_slice());
    assert!(phrase.open_note().is_none());
}

#[test]
fn a_generator_moves_to_another_thread() {
    fn assert_send<T: Send>(_: &T) {}
    let model = Arc::new(random_model(InputKind::OneHot, 1));
    let generator = Generator::new(Arc::clone(&model), 0);
    assert_send(&generator);
    let handle = std::thread::spawn(move || {
        let mut generator = generator;
        generator.next_symbol(&SamplingSettings::default()).unwrap()
    });
    assert!(handle.join().unwrap().is_some());
}
