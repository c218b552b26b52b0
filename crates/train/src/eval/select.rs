//! Which songs are evaluated, and how they reach the model: the side of a training split
//! (decided exactly as training decided it, among the songs training kept), then the model's
//! key convention and range, the step grid and the duration filter, with counts by reason for
//! every song left out.
//! Runs on: offline threads (xtask eval, tests). Pure, no candle.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{keep_song, DataConfig, DataSet, Split};
use model::generate::model_shift;
use model::{ModelConfig, ModelError};
use music::bar;
use music::corpus::Collection;
use music::encode::{encode, EncodeConfig};
use music::{Melody, Symbol};

/// Which songs of each set to take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitSide {
    /// Every song read.
    #[default]
    All,
    /// The songs a training run with the data config would hold out for validation.
    Validation,
    /// The songs it would train on (before augmentation; duplicates of validation songs
    /// included).
    Training,
}

/// What became of one set's songs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SetCounts {
    /// The set's name.
    pub name: String,
    /// Files read.
    pub num_files: usize,
    /// Melodies the readers returned.
    pub num_melodies: usize,
    /// Tunes or files that could not be read.
    pub num_unreadable: usize,
    /// Songs on the other side of the split, or dropped by the training filters before it.
    pub num_outside_split: usize,
    /// Songs of the chosen side the model cannot take, by reason (`duration`, `off_grid`,
    /// `out_of_range`, `too_short`, `polyphonic`, `not_in_vocabulary`).
    pub rejected: BTreeMap<String, usize>,
    /// Songs taken.
    pub num_selected: usize,
}

/// A song ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSong {
    /// The song as read, in its own key.
    pub melody: Melody,
    /// The name of the set it came from.
    pub set_name: String,
    /// Semitones it was moved by to reach the model's key convention and range.
    pub shift_semitones: i32,
    /// Its encoding after that move, every symbol in the model's vocabulary.
    pub symbols: Vec<Symbol>,
}

impl EvalSong {
    /// The bar position and number of each of its symbols for `model` (`music::bar::bar_step`).
    pub fn bars(&self, model: &ModelConfig) -> Vec<u32> {
        bar::melody_bar_steps(&self.melody, self.symbols.len(), &model.bar_meters, model.grid)
    }
}

/// A data config matching a model that has no training summary: its grid, key convention and
/// delimiter run, and otherwise the defaults (any length on the grid).
pub fn data_config_for(model: &ModelConfig) -> DataConfig {
    DataConfig {
        grid: model.grid,
        transposition: model.transposition,
        delimiter_len: model.delimiter_len,
        ..DataConfig::default()
    }
}

/// What a model's `train.json` says about its data: the filters and split, and the named sets
/// of files it was trained on (paths as given to the training run).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingRecord {
    /// `config.data` of the summary.
    pub data: DataConfig,
    /// `config.sets` of the summary.
    pub sets: Vec<DataSet>,
}

/// Reads the data part of a training summary (`train.json`), or `None` when there is no such
/// file. Only `config.data` and `config.sets` are read, so summaries of other versions load as
/// long as those parse.
pub fn read_training_record(train_json: &Path) -> Result<Option<TrainingRecord>, ModelError> {
    let path = train_json.display().to_string();
    let bytes = match std::fs::read(train_json) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ModelError::Io { path, source }),
    };
    let summary: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|source| ModelError::ConfigParse { path: path.clone(), source })?;
    let field = |name: &str| summary.get("config").and_then(|c| c.get(name)).cloned();
    let parse_error = |source| ModelError::ConfigParse { path: path.clone(), source };
    let Some(data) = field("data") else {
        return Ok(None);
    };
    Ok(Some(TrainingRecord {
        data: serde_json::from_value(data).map_err(parse_error)?,
        sets: field("sets").map(serde_json::from_value).transpose().map_err(parse_error)?.unwrap_or_default(),
    }))
}

/// The melodies of `read` on `side` of `data`'s split, in order, and the set's counts so far.
/// The split counts among the songs `data`'s filters keep, as `build_dataset` does, so
/// `Validation` is exactly a training run's held-out songs.
pub fn split_melodies(
    name: &str,
    read: Collection,
    data: &DataConfig,
    side: SplitSide,
) -> (Vec<Melody>, SetCounts) {
    let mut counts = SetCounts {
        name: name.to_string(),
        num_files: read.num_files,
        num_melodies: read.melodies.len(),
        num_unreadable: read.errors.len(),
        ..SetCounts::default()
    };
    if side == SplitSide::All {
        return (read.melodies, counts);
    }
    let training_encode = EncodeConfig {
        grid: data.grid,
        durations: data.durations.clone(),
        lowest_pitch: data.pitch_range.map_or(0, |r| r.0),
        highest_pitch: data.pitch_range.map_or(127, |r| r.1),
        min_notes: data.min_notes,
    };
    // The same draws as `build_dataset`: one per kept song, in order.
    let mut rng = match data.split {
        Split::Random { seed, .. } => Some(ChaCha8Rng::seed_from_u64(seed)),
        Split::EveryNth { .. } => None,
    };
    let mut chosen = Vec::new();
    let mut kept_idx = 0;
    for melody in read.melodies {
        if keep_song(melody.clone(), data, &training_encode).is_err() {
            counts.num_outside_split += 1;
            continue;
        }
        let is_validation = match data.split {
            Split::EveryNth { n } => kept_idx % n.max(1) == 0,
            Split::Random { fraction, .. } => rng.as_mut().expect("seeded above").random::<f64>() < fraction,
        };
        kept_idx += 1;
        if is_validation == (side == SplitSide::Validation) {
            chosen.push(melody);
        } else {
            counts.num_outside_split += 1;
        }
    }
    (chosen, counts)
}

/// Moves `melody` into the model's key convention and range (as a primer is moved: the key
/// shift of training, then whole octaves if it would leave the range) and encodes it on the
/// model's grid under `data`'s duration filter. Returns the reason when the model cannot take it.
pub fn prepare_song(
    melody: &Melody,
    model: &ModelConfig,
    data: &DataConfig,
) -> Result<(i32, Vec<Symbol>), &'static str> {
    let shift = model_shift(melody, model.transposition, model.lowest_pitch, model.highest_pitch);
    let moved = melody.transposed(shift).ok_or("out_of_range")?;
    let cfg = EncodeConfig {
        grid: model.grid,
        durations: data.durations.clone(),
        lowest_pitch: model.lowest_pitch,
        highest_pitch: model.highest_pitch,
        min_notes: data.min_notes.max(1),
    };
    let symbols = encode(&moved, &cfg).map_err(|r| r.reason())?;
    if symbols.iter().any(|s| model.vocab.id(*s).is_none()) {
        return Err("not_in_vocabulary");
    }
    Ok((shift, symbols))
}

/// The songs chosen for an evaluation, and how they were chosen.
#[derive(Clone, Debug)]
pub struct Selection {
    /// The songs, in set order and file order.
    pub songs: Vec<EvalSong>,
    /// What became of each set's songs.
    pub sets: Vec<SetCounts>,
    /// The side of the split taken.
    pub split: SplitSide,
    /// The filters and split it was taken under.
    pub data: DataConfig,
}

/// The songs of each named set on `side`, prepared for `model`, and the counts of each set.
pub fn select_songs(
    sets: Vec<(String, Collection)>,
    data: &DataConfig,
    side: SplitSide,
    model: &ModelConfig,
) -> Selection {
    let mut songs = Vec::new();
    let mut all_counts = Vec::new();
    for (name, read) in sets {
        let (melodies, mut counts) = split_melodies(&name, read, data, side);
        for melody in melodies {
            match prepare_song(&melody, model, data) {
                Ok((shift_semitones, symbols)) => {
                    counts.num_selected += 1;
                    songs.push(EvalSong { melody, set_name: name.clone(), shift_semitones, symbols });
                }
                Err(reason) => *counts.rejected.entry(reason.to_string()).or_default() += 1,
            }
        }
        all_counts.push(counts);
    }
    Selection { songs, sets: all_counts, split: side, data: data.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::features::tests::melody;
    use model::{InputKind, Transposition};
    use music::encode::{parse_symbols, DurationFilter};
    use music::key::KeySource;
    use music::{Key, Mode, Vocab};

    /// Song `i`: a G major figure starting on `67 + i % 3`, or off the recipe's lengths when
    /// `i % 4 == 3`.
    fn collection(n: usize) -> Collection {
        let melodies = (0..n)
            .map(|i| {
                let p = 67 + (i % 3) as u8;
                let first_len = if i % 4 == 3 { 1.25 } else { 1.0 };
                let mut m = melody(&[(p, 0.0, first_len), (p + 2, first_len, 1.0)]);
                m.key = Some(Key::from_tonic(7, Mode::Major));
                m
            })
            .collect();
        Collection { melodies, num_files: 1, ..Default::default() }
    }

    fn model_config() -> ModelConfig {
        ModelConfig::new(Vocab::for_pitch_range(60, 79), InputKind::Embedding { dim: 4 }, 8, 1, 0.0)
    }

    #[test]
    fn the_validation_side_is_every_tenth_kept_song() {
        let data = DataConfig { durations: DurationFilter::recipe(), ..DataConfig::default() };
        // 30 songs, of which 7 (i % 4 == 3) fail the recipe's lengths: 23 kept, and kept songs
        // 0, 10, 20 are validation: songs 0, 13 and 26 of the collection.
        let (val, counts) = split_melodies("s", collection(30), &data, SplitSide::Validation);
        assert_eq!(val.len(), 3);
        assert_eq!(counts.num_outside_split, 27);
        let (train, _) = split_melodies("s", collection(30), &data, SplitSide::Training);
        assert_eq!(train.len(), 20);
        let first_notes: Vec<u8> = val.iter().map(|m| m.notes[0].pitch).collect();
        assert_eq!(first_notes, vec![67, 67 + 13 % 3, 67 + 26 % 3]);
        let (all, _) = split_melodies("s", collection(30), &data, SplitSide::All);
        assert_eq!(all.len(), 30);
    }

    #[test]
    fn songs_move_to_the_convention_like_training() {
        let model = model_config();
        let data = data_config_for(&model);
        // G major → C major is up a fourth: 67 69 → 72 74.
        let selection = select_songs(vec![("s".into(), collection(1))], &data, SplitSide::All, &model);
        assert_eq!(selection.sets[0].num_selected, 1);
        let songs = selection.songs;
        assert_eq!(songs[0].shift_semitones, 5);
        assert_eq!(songs[0].symbols, parse_symbols("72 _ _ _ 74 _ _ _").unwrap());
        // Without transposition the song stays; a song too wide for the range is refused.
        let plain = ModelConfig { transposition: Transposition::None, ..model.clone() };
        assert_eq!(prepare_song(&songs[0].melody, &plain, &data).unwrap().0, 0);
        let wide = melody(&[(40, 0.0, 1.0), (90, 1.0, 1.0)]);
        assert_eq!(prepare_song(&wide, &model, &data), Err("out_of_range"));
        assert!(matches!(
            model.transposition,
            Transposition::PlainSignature { key_source: KeySource::DeclaredThenEstimated }
        ));
    }
}
