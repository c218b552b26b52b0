//! Training data: reading folders of `.abc` and `.mid` files into melodies, and turning named
//! sets of melodies into token streams: key convention, filters (counted by reason), the
//! song-level train/validation split (before any augmentation), transposition augmentation,
//! and the recipe's delimiter-joined streams.
//! Runs on: offline threads (xtask train, tests).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use model::{ModelError, Transposition};
use music::bar;
use music::corpus::Collection;
use music::encode::{encode, join_runs, join_songs, DurationFilter, EncodeConfig};
use music::key::{shift_to_convention, shifts_within};
use music::midi::MelodyChoice;
use music::{Melody, Meter, StepGrid, Symbol, Vocab};

/// A named group of files or folders read in the order given. The split counts songs within
/// each set, so adding a set never moves another set's songs between train and validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSet {
    /// Name used in reports (`erk`, `folk`).
    pub name: String,
    /// Files (`.abc`, `.mid`, `.midi`) and folders (searched recursively, files in path order).
    pub paths: Vec<PathBuf>,
}

/// How kept songs are divided between training and validation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Split {
    /// Song `index % n == 0` (index among the set's kept songs) is validation: with `n = 10`
    /// the benchmark split of the corpus README.
    EveryNth { n: usize },
    /// Each song is validation with probability `fraction`, drawn from `seed`.
    Random { fraction: f64, seed: u64 },
}

impl Default for Split {
    fn default() -> Self {
        Split::EveryNth { n: 10 }
    }
}

/// What turns melodies into training streams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// The train/validation split.
    pub split: Split,
    /// Step grid of the encoding.
    pub grid: StepGrid,
    /// Allowed note and rest lengths (`only` the recipe's list, or anything `on_grid`).
    pub durations: DurationFilter,
    /// Fewest notes a song must have.
    pub min_notes: usize,
    /// Pitch range after transposition, inclusive; songs outside are dropped. `None`: the range
    /// of the kept songs.
    pub pitch_range: Option<(u8, u8)>,
    /// Key convention applied before encoding.
    pub transposition: Transposition,
    /// Add every transposition of each training song that fits the pitch range (validation
    /// songs are never augmented).
    pub augment_keys: bool,
    /// Delimiters after each song in a stream (the recipe: 64).
    pub delimiter_len: usize,
    /// Drop training songs whose encoding equals a validation song's (the same tune in two
    /// collections), so validation stays unseen.
    pub drop_validation_duplicates: bool,
    /// Snap MIDI melodies to the grid before filtering (performed or converted MIDI is rarely
    /// exactly on it); ABC times are exact and left alone.
    pub quantize_midi: bool,
    /// The meters whose bar positions the streams carry beside the tokens (`music::bar`);
    /// empty: every position is `NO_BAR_POSITION`.
    pub bar_meters: Vec<Meter>,
    /// Copies of each training song of the named sets in the training stream (a set not
    /// named has one), so a small set that validation cares most about is seen more often
    /// an epoch. Validation streams are never repeated. Left out of a saved config when empty,
    /// so the settings of runs without it read and write as before.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub oversample: BTreeMap<String, usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            split: Split::default(),
            grid: StepGrid::SIXTEENTHS,
            durations: DurationFilter::OnGrid,
            min_notes: 1,
            pitch_range: None,
            transposition: Transposition::default(),
            augment_keys: false,
            delimiter_len: 64,
            drop_validation_duplicates: true,
            quantize_midi: true,
            bar_meters: Vec::new(),
            oversample: BTreeMap::new(),
        }
    }
}

/// Reads a set's files and folders (folders recursively, in path order; the main melody of
/// each MIDI file, snapped to the grid when `cfg.quantize_midi`).
pub fn read_set(set: &DataSet, cfg: &DataConfig) -> Collection {
    let mut collection = Collection::read(&set.paths, MelodyChoice::MainTrack);
    if cfg.quantize_midi {
        collection.quantize_midi(cfg.grid);
    }
    collection
}

/// Counts for one data set, written to `train.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SetCounts {
    /// The set's name.
    pub name: String,
    /// Files read.
    pub num_files: usize,
    /// Melodies the readers returned.
    pub num_melodies: usize,
    /// Tunes or files the readers could not read.
    pub num_unreadable: usize,
    /// Songs dropped, by reason (`duration`, `off_grid`, `out_of_range`, `too_short`,
    /// `polyphonic`, `no_key`, `duplicate_of_validation`).
    pub rejected: BTreeMap<String, usize>,
    /// Songs kept after filtering (the split counts among these).
    pub num_kept: usize,
    /// Kept songs on the training side, before augmentation.
    pub num_train_songs: usize,
    /// Kept songs on the validation side.
    pub num_validation_songs: usize,
    /// Training copies added by key augmentation.
    pub num_augmented_copies: usize,
    /// Symbols of the training songs (augmented and oversampled copies included), without
    /// delimiters.
    pub num_train_song_symbols: usize,
    /// Symbols of the validation songs, without delimiters.
    pub num_validation_song_symbols: usize,
}

/// One set's validation stream.
#[derive(Clone, Debug)]
pub struct ValidationStream {
    /// The set's name.
    pub name: String,
    /// Token ids of the set's validation songs joined with delimiters.
    pub tokens: Vec<u32>,
    /// The bar position of each token (`music::bar`).
    pub bars: Vec<u32>,
}

/// Everything training needs: the vocabulary, the training stream and a validation stream per
/// set.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Every pitch of the range plus `/`, `_`, `r`.
    pub vocab: Vocab,
    /// Lowest pitch, inclusive.
    pub lowest_pitch: u8,
    /// Highest pitch, inclusive.
    pub highest_pitch: u8,
    /// Token ids of all training songs (all sets, augmented) joined with delimiters.
    pub train_tokens: Vec<u32>,
    /// The bar position of each training token (`music::bar`).
    pub train_bars: Vec<u32>,
    /// Per set with validation songs, its stream.
    pub validation: Vec<ValidationStream>,
    /// Counts per set.
    pub counts: Vec<SetCounts>,
}

/// One kept song before the split.
pub struct Kept {
    /// The melody moved into the key convention.
    pub melody: Melody,
    /// Its encoding.
    pub symbols: Vec<Symbol>,
}

impl Kept {
    /// The bar position and number (`bar::bar_step`) of each of its symbols among `meters`.
    fn bars(&self, meters: &[Meter], grid: StepGrid) -> Vec<u32> {
        bar::melody_bar_steps(&self.melody, self.symbols.len(), meters, grid)
    }
}

/// Joins per-song bar positions as `join_songs` joins their symbols.
fn join_bars<'a>(songs: impl IntoIterator<Item = &'a [u32]>, delimiter_len: usize) -> Vec<u32> {
    join_runs(songs, bar::NO_BAR_POSITION as u32, delimiter_len)
}

/// Builds the streams from named sets of melodies (in their order) under `cfg`.
pub fn build_dataset(sets: Vec<(String, Collection)>, cfg: &DataConfig) -> Result<Dataset, ModelError> {
    let encode_cfg = EncodeConfig {
        grid: cfg.grid,
        durations: cfg.durations.clone(),
        lowest_pitch: cfg.pitch_range.map_or(0, |r| r.0),
        highest_pitch: cfg.pitch_range.map_or(127, |r| r.1),
        min_notes: cfg.min_notes,
    };
    // Filter and transpose every set; the split is decided on the kept songs, before anything
    // is augmented.
    let mut counts = Vec::new();
    let mut split_sets: Vec<(Vec<Kept>, Vec<Kept>)> = Vec::new();
    for (name, read) in sets {
        let mut c = SetCounts {
            name: name.clone(),
            num_files: read.num_files,
            num_melodies: read.melodies.len(),
            num_unreadable: read.errors.len(),
            ..Default::default()
        };
        let mut kept = Vec::new();
        for melody in read.melodies {
            match keep_song(melody, cfg, &encode_cfg) {
                Ok(song) => kept.push(song),
                Err(reason) => *c.rejected.entry(reason.to_string()).or_default() += 1,
            }
        }
        c.num_kept = kept.len();
        let mut rng = match cfg.split {
            Split::Random { seed, .. } => Some(ChaCha8Rng::seed_from_u64(seed)),
            Split::EveryNth { .. } => None,
        };
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        for (idx, song) in kept.into_iter().enumerate() {
            let is_validation = match cfg.split {
                Split::EveryNth { n } => idx % n.max(1) == 0,
                Split::Random { fraction, .. } => {
                    rng.as_mut().expect("seeded above").random::<f64>() < fraction
                }
            };
            if is_validation {
                validation.push(song);
            } else {
                train.push(song);
            }
        }
        counts.push(c);
        split_sets.push((train, validation));
    }
    let all_kept = || split_sets.iter().flat_map(|(t, v)| t.iter().chain(v));
    let (lowest_pitch, highest_pitch) = match cfg.pitch_range {
        Some(range) => range,
        None => {
            let ranges: Vec<(u8, u8)> = all_kept().filter_map(|s| s.melody.pitch_range()).collect();
            let lo = ranges.iter().map(|r| r.0).min();
            let hi = ranges.iter().map(|r| r.1).max();
            match (lo, hi) {
                (Some(lo), Some(hi)) => (lo, hi),
                _ => return Err(ModelError::Data("no song survived the filters".to_string())),
            }
        }
    };
    let vocab = Vocab::for_pitch_range(lowest_pitch, highest_pitch);
    let validation_encodings: HashSet<&[Symbol]> =
        split_sets.iter().flat_map(|(_, v)| v.iter().map(|s| s.symbols.as_slice())).collect();

    let mut train_songs: Vec<Vec<Symbol>> = Vec::new();
    let mut train_song_bars: Vec<Vec<u32>> = Vec::new();
    let mut validation = Vec::new();
    for (name, &copies) in &cfg.oversample {
        if copies == 0 {
            return Err(ModelError::Data(format!("oversample {name}: copies must be at least 1")));
        }
        if !counts.iter().any(|c| &c.name == name) {
            return Err(ModelError::Data(format!("oversample {name}: no data set has that name")));
        }
    }
    for ((train, val), c) in split_sets.iter().zip(&mut counts) {
        let copies = cfg.oversample.get(&c.name).copied().unwrap_or(1);
        c.num_validation_songs = val.len();
        c.num_validation_song_symbols = val.iter().map(|s| s.symbols.len()).sum();
        for song in train {
            if cfg.drop_validation_duplicates && validation_encodings.contains(song.symbols.as_slice()) {
                *c.rejected.entry("duplicate_of_validation".to_string()).or_default() += 1;
                continue;
            }
            c.num_train_songs += 1;
            let shifts = if cfg.augment_keys {
                shifts_within(&song.melody, lowest_pitch, highest_pitch)
            } else {
                vec![0]
            };
            for shift in shifts {
                let symbols = if shift == 0 {
                    song.symbols.clone()
                } else {
                    c.num_augmented_copies += 1;
                    song.symbols.iter().map(|s| shift_symbol(*s, shift)).collect()
                };
                c.num_train_song_symbols += copies * symbols.len();
                train_song_bars.extend(std::iter::repeat_n(song.bars(&cfg.bar_meters, cfg.grid), copies));
                train_songs.extend(std::iter::repeat_n(symbols, copies));
            }
        }
        if !val.is_empty() {
            let stream = join_songs(val.iter().map(|s| s.symbols.as_slice()), cfg.delimiter_len);
            let bars: Vec<Vec<u32>> = val.iter().map(|s| s.bars(&cfg.bar_meters, cfg.grid)).collect();
            validation.push(ValidationStream {
                name: c.name.clone(),
                tokens: to_tokens(&vocab, &stream)?,
                bars: join_bars(bars.iter().map(Vec::as_slice), cfg.delimiter_len),
            });
        }
    }
    if train_songs.is_empty() {
        return Err(ModelError::Data("no training songs".to_string()));
    }
    let train_stream = join_songs(train_songs.iter().map(Vec::as_slice), cfg.delimiter_len);
    Ok(Dataset {
        train_tokens: to_tokens(&vocab, &train_stream)?,
        train_bars: join_bars(train_song_bars.iter().map(Vec::as_slice), cfg.delimiter_len),
        vocab,
        lowest_pitch,
        highest_pitch,
        validation,
        counts,
    })
}

/// Transposes and encodes one song, or names why it is dropped.
pub fn keep_song(melody: Melody, cfg: &DataConfig, encode_cfg: &EncodeConfig) -> Result<Kept, &'static str> {
    let shift = match cfg.transposition {
        Transposition::None => 0,
        Transposition::PlainSignature { key_source } => {
            shift_to_convention(&melody, key_source).ok_or("no_key")?
        }
    };
    let melody = melody.transposed(shift).ok_or("out_of_range")?;
    let symbols = encode(&melody, encode_cfg).map_err(|r| r.reason())?;
    if symbols.is_empty() {
        return Err("too_short");
    }
    Ok(Kept { melody, symbols })
}

fn shift_symbol(symbol: Symbol, semitones: i32) -> Symbol {
    match symbol {
        Symbol::Pitch(p) => Symbol::Pitch((p as i32 + semitones) as u8),
        other => other,
    }
}

fn to_tokens(vocab: &Vocab, symbols: &[Symbol]) -> Result<Vec<u32>, ModelError> {
    Ok(vocab.encode(symbols)?.into_iter().map(|t| t.0 as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    fn melody(notes: &[(u8, f64, f64)]) -> Melody {
        Melody::from_triples(notes)
    }

    /// `n` one-bar songs in C, song `i` starting on pitch `60 + i % 5`.
    fn songs(n: usize) -> Collection {
        let melodies = (0..n)
            .map(|i| {
                let p = 60 + (i % 5) as u8;
                let mut m = melody(&[(p, 0.0, 1.0), (p + 2, 1.0, 0.5), (p + 4, 1.5, 0.5), (p, 2.0, 2.0)]);
                m.key = Some(music::Key::C_MAJOR);
                m
            })
            .collect();
        Collection { melodies, num_files: 1, ..Default::default() }
    }

    #[test]
    fn every_tenth_kept_song_is_validation() {
        let mut read = songs(25);
        // A song with a 1/8-beat note is off the grid and dropped before the split counts.
        read.melodies.insert(3, melody(&[(60, 0.0, 0.125), (62, 0.125, 1.0)]));
        let cfg = DataConfig { drop_validation_duplicates: false, ..Default::default() };
        let data = build_dataset(vec![("a".into(), read)], &cfg).unwrap();
        let c = &data.counts[0];
        assert_eq!((c.num_melodies, c.num_kept, c.num_validation_songs, c.num_train_songs), (26, 25, 3, 22));
        assert_eq!(c.rejected.get("off_grid"), Some(&1));
        // Each song is 16 symbols, followed by 64 delimiters.
        assert_eq!(data.train_tokens.len(), 22 * (16 + 64));
        assert_eq!(data.validation[0].tokens.len(), 3 * (16 + 64));
        assert_eq!(data.vocab.pitch_range(), Some((60, 68)));
    }

    #[test]
    fn an_oversampled_set_repeats_its_training_songs_only() {
        let cfg = DataConfig {
            drop_validation_duplicates: false,
            oversample: BTreeMap::from([("b".to_string(), 3)]),
            ..Default::default()
        };
        let data = build_dataset(vec![("a".into(), songs(20)), ("b".into(), songs(20))], &cfg).unwrap();
        let (a, b) = (&data.counts[0], &data.counts[1]);
        assert_eq!((a.num_train_songs, b.num_train_songs), (18, 18));
        assert_eq!((a.num_train_song_symbols, b.num_train_song_symbols), (18 * 16, 3 * 18 * 16));
        assert_eq!(data.train_tokens.len(), (18 + 3 * 18) * (16 + 64));
        assert_eq!(data.train_bars.len(), data.train_tokens.len());
        assert_eq!(data.validation[1].tokens.len(), 2 * (16 + 64));

        for (name, copies, problem) in [("c", 2, "no data set"), ("b", 0, "at least 1")] {
            let cfg =
                DataConfig { oversample: BTreeMap::from([(name.to_string(), copies)]), ..Default::default() };
            let err = build_dataset(vec![("b".into(), songs(20))], &cfg).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(problem), "{err}");
        }
    }

    #[test]
    fn duplicates_of_validation_songs_leave_the_training_side() {
        let data = build_dataset(vec![("a".into(), songs(20))], &DataConfig::default()).unwrap();
        let c = &data.counts[0];
        // Songs 0 and 10 are validation; every song equal to one of them (i % 5 == 0) is dropped.
        assert_eq!(c.num_validation_songs, 2);
        assert_eq!(c.rejected.get("duplicate_of_validation"), Some(&2));
        assert_eq!(c.num_train_songs, 16);
    }

    #[test]
    fn augmentation_happens_after_the_split_and_within_the_range() {
        let cfg = DataConfig {
            augment_keys: true,
            pitch_range: Some((58, 70)),
            drop_validation_duplicates: false,
            ..Default::default()
        };
        let data = build_dataset(vec![("a".into(), songs(10))], &cfg).unwrap();
        let c = &data.counts[0];
        // Song 0 (60..64) is validation and is never copied.
        assert_eq!(c.num_validation_songs, 1);
        assert_eq!(data.validation[0].tokens.len(), 16 + 64);
        // Song i spans p..p+4 with p = 60 + i % 5; it fits 58..70 shifted by -(p-58)..=(66-p).
        // That is 9 keys, so 8 copies of each of the 9 training songs.
        assert_eq!(c.num_augmented_copies, 9 * 8);
        assert_eq!(data.vocab.pitch_range(), Some((58, 70)));
    }

    #[test]
    fn random_split_is_seeded() {
        let cfg = |seed| DataConfig {
            split: Split::Random { fraction: 0.3, seed },
            drop_validation_duplicates: false,
            ..Default::default()
        };
        let a = build_dataset(vec![("a".into(), songs(40))], &cfg(1)).unwrap();
        let b = build_dataset(vec![("a".into(), songs(40))], &cfg(1)).unwrap();
        assert_eq!(a.train_tokens, b.train_tokens);
        assert!(a.counts[0].num_validation_songs > 3 && a.counts[0].num_validation_songs < 25);
        let c = build_dataset(vec![("a".into(), songs(40))], &cfg(2)).unwrap();
        assert_ne!(a.train_tokens, c.train_tokens);
    }
}
