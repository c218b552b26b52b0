//! The plugin's parameters: what the host automates and saves with the project.
//! Read on: audio thread (`.value()`); written by the host.

use nice_plug::prelude::*;

/// Every host-visible parameter of Antiphon. IDs are short and never change.
#[derive(Params)]
pub struct AntiphonParams {
    /// Whether the notes played into the plugin are also sent out unchanged. Most hosts route a
    /// MIDI effect's input only through the plugin, so this defaults to on.
    #[id = "thru"]
    pub pass_through: BoolParam,
}

impl Default for AntiphonParams {
    fn default() -> Self {
        Self { pass_through: BoolParam::new("MIDI Thru", true) }
    }
}
