//! Pure music data: notes and melodies, the MIDI and ABC readers, the step encoding of the main
//! recipe and its vocabulary, and the fixed-capacity phrase and message types (`phrase`).
//! Runs on: worker and offline threads (xtask, tests). Allocates freely, so never on the audio
//! thread, except `phrase`, whose types the audio thread owns; never imports `nice_plug` or candle.

pub mod abc;
pub mod bar;
pub mod corpus;
pub mod encode;
pub mod key;
pub mod midi;
pub mod note;
pub mod phrase;
pub mod vocab;

pub use encode::{StepGrid, Symbol};
pub use key::{Key, Mode};
pub use note::{Melody, Meter, Note, Source};
pub use vocab::{TokenId, Vocab};
