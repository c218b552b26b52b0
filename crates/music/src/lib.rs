//! Pure music data: notes and melodies, meters, keys and bars, the MIDI and ABC readers, and the
//! step encoding of the main recipe with its vocabulary, and the piano roll and chord tokens of
//! polyphonic music.
//! Runs on: any thread. Readers, encoders and `Melody` allocate, so the audio thread uses only
//! the plain values (`Note`, `Meter`, `Key`, `StepGrid`, bar arithmetic); this crate depends on
//! neither nice-plug nor candle, and Cargo keeps it so.

pub mod abc;
pub mod bar;
pub mod corpus;
pub mod encode;
pub mod key;
pub mod midi;
pub mod note;
pub mod pitches;
pub mod roll;
pub mod vocab;

pub use encode::{StepGrid, Symbol};
pub use key::{Key, Mode};
pub use note::{Melody, Meter, Note, Source};
pub use pitches::{PitchClassSet, PitchRules};
pub use roll::{ChordCodec, Frame, PianoRoll, PitchSet};
pub use vocab::{TokenId, Vocab};
