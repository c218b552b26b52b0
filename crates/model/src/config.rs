//! `ModelConfig`: everything needed to rebuild a trained model beside its weights (sizes,
//! vocabulary, step grid, pitch range, key convention), saved as `config.json`.
//! Runs on: worker and offline threads.

use serde::{Deserialize, Serialize};

use music::bar;
use music::key::KeySource;
use music::{Meter, StepGrid, Symbol, Vocab};

/// The newest `config.json` format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Largest hidden size `validate` accepts; far above anything worth running in a plugin.
pub const MAX_HIDDEN_SIZE: usize = 4096;
/// Most LSTM layers `validate` accepts.
pub const MAX_LAYERS: usize = 8;
/// Largest embedding width `validate` accepts.
pub const MAX_EMBEDDING_DIM: usize = 4096;

/// How a token id reaches the first LSTM layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum InputKind {
    /// A learned table of `dim` numbers per token (`embedding.weight`, `[vocab, dim]`).
    Embedding { dim: usize },
    /// The recipe's one-hot vector of vocabulary length. Multiplying a one-hot vector by
    /// `weight_ih_l0` picks one column, so it is computed as that lookup.
    OneHot,
}

impl InputKind {
    /// Width of the first LSTM layer's input for a vocabulary of `vocab_len` symbols.
    pub fn width(&self, vocab_len: usize) -> usize {
        match self {
            InputKind::Embedding { dim } => *dim,
            InputKind::OneHot => vocab_len,
        }
    }
}

/// Which key a melody is moved into before it is encoded, and moved back out of after
/// generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Transposition {
    /// Melodies keep their key.
    None,
    /// Melodies are moved so their key signature is plain (C major, A minor, D dorian...), the
    /// recipe's convention; `key_source` says how their key is found.
    PlainSignature { key_source: KeySource },
}

impl Default for Transposition {
    fn default() -> Self {
        Transposition::PlainSignature { key_source: KeySource::default() }
    }
}

/// Sizes and conventions of a melody model. Saved as `config.json` beside the weights so the
/// weights never lose their vocabulary. Fields added after format 1 carry `#[serde(default)]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Format of this file; newer than `FORMAT_VERSION` is refused at load.
    pub format_version: u32,
    /// The symbols, in token-id order: row `i` of the embedding and of the output layer.
    pub vocab: Vocab,
    /// Steps per quarter note of the encoding the model was trained on.
    pub grid: StepGrid,
    /// Embedding or one-hot input.
    pub input: InputKind,
    /// Width of each LSTM layer's hidden and cell state.
    pub hidden_size: usize,
    /// Number of stacked LSTM layers, at least 1.
    pub num_layers: usize,
    /// Probability of zeroing an activation between layers and before the output layer during
    /// training, in `[0, 1)`. Inference ignores it.
    pub dropout: f32,
    /// Lowest pitch the model knows, inclusive (MIDI number).
    pub lowest_pitch: u8,
    /// Highest pitch the model knows, inclusive (MIDI number).
    pub highest_pitch: u8,
    /// The key convention of the training data, applied to primers too.
    pub transposition: Transposition,
    /// Delimiters between songs in the training stream (the recipe: 64). Generation primes a
    /// fresh song with a run of this many.
    #[serde(default = "default_delimiter_len")]
    pub delimiter_len: usize,
    /// The meters whose bar positions the model reads beside each symbol (`music::bar`), in
    /// the order of their ids; empty for a model that reads symbols alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bar_meters: Vec<Meter>,
    /// How many bars back the model also reads: the symbols one, two... bars before each target
    /// (0 to `MAX_BAR_LOOKBACK`; needs `bar_meters`): the lookback inputs of `bar_lookback.weight`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bar_lookback: usize,
    /// How many classes of repeat the model reads (0 to `MAX_REPEAT_CLASSES`; needs
    /// `bar_meters`): beside each symbol, the one that followed the longest earlier match of the
    /// symbols just played, by its length (`data::BarReader`), the inputs of `repeat.weight`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeat_classes: usize,
    /// How many bars the model tells apart by number (0 to `MAX_BAR_NUMBERS`; needs
    /// `bar_meters`): beside each symbol, its bar's number since the song began (the pickup,
    /// then bars 1 to this many, counted again from 1 after it), the inputs of
    /// `bar_number.weight`. Where phrases begin and end, and so where a song may.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bar_numbers: usize,
}

pub fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Most bars a model may look back.
pub const MAX_BAR_LOOKBACK: usize = 4;

/// Most classes of repeat length a model may read.
pub const MAX_REPEAT_CLASSES: usize = 4;

/// Most bars a model may tell apart by number.
pub const MAX_BAR_NUMBERS: usize = 256;

/// Most inputs read beside each token: the bar position, the lookback, the repeat and the bar
/// number.
pub const MAX_SIDE_INPUTS: usize = 1 + MAX_BAR_LOOKBACK + MAX_REPEAT_CLASSES + 1;

fn default_delimiter_len() -> usize {
    64
}

/// What `ModelConfig::validate` rejects, with the offending values.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The file is from a newer build.
    #[error("format version {version} is newer than this build reads ({newest})")]
    UnsupportedVersion { version: u32, newest: u32 },
    /// The vocabulary lacks one of `_`, `r` or `/`.
    #[error("the vocabulary has no '{symbol}' symbol")]
    MissingSpecialSymbol { symbol: Symbol },
    /// The vocabulary holds no pitch at all.
    #[error("the vocabulary has no pitches")]
    NoPitches,
    /// More symbols than token ids can address.
    #[error("the vocabulary has {len} symbols; at most {max} fit a token id")]
    VocabTooLarge { len: usize, max: usize },
    /// A vocabulary pitch lies outside `lowest_pitch..=highest_pitch`.
    #[error("vocabulary pitch {pitch} is outside the pitch range {lowest}..={highest}")]
    PitchOutsideRange { pitch: u8, lowest: u8, highest: u8 },
    /// `lowest_pitch` above `highest_pitch`, or above 127.
    #[error("pitch range {lowest}..={highest} is empty or beyond MIDI's 0..=127")]
    BadPitchRange { lowest: u8, highest: u8 },
    /// Hidden size 0 or absurdly large.
    #[error("hidden size {hidden_size} is outside 1..={max}")]
    BadHiddenSize { hidden_size: usize, max: usize },
    /// No layers, or too many.
    #[error("{num_layers} LSTM layers is outside 1..={max}")]
    BadNumLayers { num_layers: usize, max: usize },
    /// Embedding width 0 or absurdly large.
    #[error("embedding width {dim} is outside 1..={max}")]
    BadEmbeddingDim { dim: usize, max: usize },
    /// Dropout outside `[0, 1)` or not a number.
    #[error("dropout {dropout} is outside [0, 1)")]
    BadDropout { dropout: f32 },
    /// A grid of 0 steps per quarter.
    #[error("a step grid of {steps_per_quarter} steps per quarter note")]
    BadGrid { steps_per_quarter: u32 },
    /// More repeat classes than `MAX_REPEAT_CLASSES`, or repeats without bar meters (whose
    /// side inputs carry them).
    #[error("{classes} classes of repeat need bar meters and are at most {max}")]
    BadRepeatClasses { classes: usize, max: usize },
    /// A lookback beyond `MAX_BAR_LOOKBACK`, or one without bar meters to count bars by.
    #[error("a lookback of {bars} bars needs bar meters and at most {max} bars")]
    BadBarLookback { bars: usize, max: usize },
    /// More bar numbers than `MAX_BAR_NUMBERS`, or bar numbers without bar meters to count by.
    #[error("{bars} bar numbers need bar meters and are at most {max}")]
    BadBarNumbers { bars: usize, max: usize },
    /// A chord model's voice limit of 0 or beyond what its step reads.
    #[error("{max_voices} voices is outside 1..={max}")]
    BadMaxVoices { max_voices: usize, max: usize },
    /// A model kind this build does not know.
    #[error("model kind '{kind}' is not one this build knows (melody, chords)")]
    UnknownKind { kind: String },
    /// A bar meter listed twice, or one whose bar is not a whole number of steps.
    #[error("bar meter {numerator}/{denominator} is listed twice or is not whole steps of the grid")]
    BadBarMeter { numerator: u8, denominator: u8 },
}

impl ModelConfig {
    /// A config for `vocab` with the given sizes and the default conventions: sixteenth grid,
    /// plain-signature transposition, pitch range from the vocabulary, 64 delimiters.
    pub fn new(vocab: Vocab, input: InputKind, hidden_size: usize, num_layers: usize, dropout: f32) -> Self {
        let (lowest_pitch, highest_pitch) = vocab.pitch_range().unwrap_or((0, 127));
        Self {
            format_version: FORMAT_VERSION,
            vocab,
            grid: StepGrid::SIXTEENTHS,
            input,
            hidden_size,
            num_layers,
            dropout,
            lowest_pitch,
            highest_pitch,
            transposition: Transposition::default(),
            delimiter_len: default_delimiter_len(),
            bar_meters: Vec::new(),
            bar_lookback: 0,
            repeat_classes: 0,
            bar_numbers: 0,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.format_version > FORMAT_VERSION {
            return Err(ConfigError::UnsupportedVersion {
                version: self.format_version,
                newest: FORMAT_VERSION,
            });
        }
        for symbol in [Symbol::Hold, Symbol::Rest, Symbol::Delimiter] {
            if self.vocab.id(symbol).is_none() {
                return Err(ConfigError::MissingSpecialSymbol { symbol });
            }
        }
        let max_vocab = u16::MAX as usize + 1;
        if self.vocab.len() > max_vocab {
            return Err(ConfigError::VocabTooLarge { len: self.vocab.len(), max: max_vocab });
        }
        let (lowest, highest) = (self.lowest_pitch, self.highest_pitch);
        if lowest > highest || highest > 127 {
            return Err(ConfigError::BadPitchRange { lowest, highest });
        }
        if self.vocab.pitch_range().is_none() {
            return Err(ConfigError::NoPitches);
        }
        for symbol in self.vocab.symbols() {
            if let Symbol::Pitch(pitch) = *symbol {
                if pitch < lowest || pitch > highest {
                    return Err(ConfigError::PitchOutsideRange { pitch, lowest, highest });
                }
            }
        }
        if self.hidden_size == 0 || self.hidden_size > MAX_HIDDEN_SIZE {
            return Err(ConfigError::BadHiddenSize { hidden_size: self.hidden_size, max: MAX_HIDDEN_SIZE });
        }
        if self.num_layers == 0 || self.num_layers > MAX_LAYERS {
            return Err(ConfigError::BadNumLayers { num_layers: self.num_layers, max: MAX_LAYERS });
        }
        if let InputKind::Embedding { dim } = self.input {
            if dim == 0 || dim > MAX_EMBEDDING_DIM {
                return Err(ConfigError::BadEmbeddingDim { dim, max: MAX_EMBEDDING_DIM });
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::BadDropout { dropout: self.dropout });
        }
        if self.grid.steps_per_quarter == 0 {
            return Err(ConfigError::BadGrid { steps_per_quarter: self.grid.steps_per_quarter });
        }
        for (idx, meter) in self.bar_meters.iter().enumerate() {
            if bar::bar_steps(*meter, self.grid).is_none() || self.bar_meters[..idx].contains(meter) {
                return Err(ConfigError::BadBarMeter {
                    numerator: meter.numerator,
                    denominator: meter.denominator,
                });
            }
        }
        if self.bar_lookback > MAX_BAR_LOOKBACK || (self.bar_lookback > 0 && self.bar_meters.is_empty()) {
            return Err(ConfigError::BadBarLookback { bars: self.bar_lookback, max: MAX_BAR_LOOKBACK });
        }
        if self.repeat_classes > MAX_REPEAT_CLASSES || (self.repeat_classes > 0 && self.bar_meters.is_empty())
        {
            return Err(ConfigError::BadRepeatClasses {
                classes: self.repeat_classes,
                max: MAX_REPEAT_CLASSES,
            });
        }
        if self.bar_numbers > MAX_BAR_NUMBERS || (self.bar_numbers > 0 && self.bar_meters.is_empty()) {
            return Err(ConfigError::BadBarNumbers { bars: self.bar_numbers, max: MAX_BAR_NUMBERS });
        }
        Ok(())
    }

    /// Rows of the bar-number table (`bar_number.weight`): unknown, the pickup, then one per
    /// numbered bar; 0 for a model without one.
    pub fn num_bar_number_rows(&self) -> usize {
        match self.bar_numbers {
            0 => 0,
            bars => bar::FIRST_BAR_NUMBER as usize + bars,
        }
    }

    /// Rows of the bar-position table (`bar_position.weight`): 0 for a model without one.
    pub fn num_bar_positions(&self) -> usize {
        if self.bar_meters.is_empty() {
            0
        } else {
            bar::num_bar_positions(&self.bar_meters, self.grid)
        }
    }

    /// Number of symbols, the width of the output layer.
    pub fn vocab_len(&self) -> usize {
        self.vocab.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid config over pitches `60..=72`.
    pub(crate) fn small_config() -> ModelConfig {
        ModelConfig::new(Vocab::for_pitch_range(60, 72), InputKind::Embedding { dim: 8 }, 16, 2, 0.1)
    }

    #[test]
    fn a_small_config_is_valid_and_round_trips_through_json() {
        let cfg = small_config();
        assert_eq!(cfg.validate(), Ok(()));
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        let back: ModelConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        assert_eq!((back.lowest_pitch, back.highest_pitch), (60, 72));
    }

    #[test]
    fn fields_added_later_have_defaults() {
        let mut value = serde_json::to_value(small_config()).unwrap();
        value.as_object_mut().unwrap().remove("delimiter_len");
        let back: ModelConfig = serde_json::from_value(value).unwrap();
        assert_eq!(back.delimiter_len, 64);
    }

    #[test]
    fn validate_names_what_it_rejects() {
        let base = small_config();
        let check = |edit: &dyn Fn(&mut ModelConfig), expected: ConfigError| {
            let mut cfg = base.clone();
            edit(&mut cfg);
            assert_eq!(cfg.validate(), Err(expected));
        };
        check(
            &|c| c.format_version = 99,
            ConfigError::UnsupportedVersion { version: 99, newest: FORMAT_VERSION },
        );
        check(&|c| c.hidden_size = 0, ConfigError::BadHiddenSize { hidden_size: 0, max: MAX_HIDDEN_SIZE });
        check(&|c| c.num_layers = 0, ConfigError::BadNumLayers { num_layers: 0, max: MAX_LAYERS });
        check(&|c| c.dropout = 1.0, ConfigError::BadDropout { dropout: 1.0 });
        check(
            &|c| c.input = InputKind::Embedding { dim: 0 },
            ConfigError::BadEmbeddingDim { dim: 0, max: MAX_EMBEDDING_DIM },
        );
        check(
            &|c| c.highest_pitch = 70,
            ConfigError::PitchOutsideRange { pitch: 71, lowest: 60, highest: 70 },
        );
        check(&|c| c.lowest_pitch = 80, ConfigError::BadPitchRange { lowest: 80, highest: 72 });
        check(&|c| c.grid = StepGrid { steps_per_quarter: 0 }, ConfigError::BadGrid { steps_per_quarter: 0 });
        check(
            &|c| c.bar_meters = vec![Meter::COMMON, Meter { numerator: 3, denominator: 4 }, Meter::COMMON],
            ConfigError::BadBarMeter { numerator: 4, denominator: 4 },
        );
        check(&|c| c.bar_lookback = 1, ConfigError::BadBarLookback { bars: 1, max: MAX_BAR_LOOKBACK });
        check(&|c| c.bar_numbers = 8, ConfigError::BadBarNumbers { bars: 8, max: MAX_BAR_NUMBERS });
        check(
            &|c| c.bar_meters = vec![Meter { numerator: 1, denominator: 64 }],
            ConfigError::BadBarMeter { numerator: 1, denominator: 64 },
        );
        check(
            &|c| c.vocab = Vocab::from_symbols([Symbol::Pitch(60), Symbol::Hold, Symbol::Rest]),
            ConfigError::MissingSpecialSymbol { symbol: Symbol::Delimiter },
        );
        check(
            &|c| c.vocab = Vocab::from_symbols([Symbol::Hold, Symbol::Rest, Symbol::Delimiter]),
            ConfigError::NoPitches,
        );
    }
}
