//! Antiphon: a MIDI effect that answers the phrase you play with a continuation written by an
//! LSTM. This file is wiring only: the plugin type, its host-facing constants and the exports.
//! Runs on: audio thread (`process`), main thread (everything else).

pub mod eval;
pub mod model;
pub mod music;
pub mod params;

use std::num::NonZeroU32;
use std::sync::Arc;

use nice_plug::prelude::*;

use params::AntiphonParams;

/// The plugin instance the host creates.
pub struct Antiphon {
    /// Parameters, shared with the host wrapper.
    params: Arc<AntiphonParams>,
}

impl Default for Antiphon {
    fn default() -> Self {
        Self { params: Arc::new(AntiphonParams::default()) }
    }
}

impl Plugin for Antiphon {
    const NAME: &'static str = "Antiphon";
    const VENDOR: &'static str = "Antiphon";
    const URL: &'static str = "";
    const EMAIL: &'static str = "";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    // Stereo first: some hosts (Ableton Live among them) refuse a plugin without audio, and the
    // audio is passed through untouched. The note-only layout is for hosts that offer it.
    const AUDIO_IO_LAYOUTS: &'static [AudioIOLayout] = &[
        AudioIOLayout {
            main_input_channels: NonZeroU32::new(2),
            main_output_channels: NonZeroU32::new(2),
            ..AudioIOLayout::const_default()
        },
        AudioIOLayout::const_default(),
    ];
    const MIDI_INPUT: MidiConfig = MidiConfig::Basic;
    const MIDI_OUTPUT: MidiConfig = MidiConfig::Basic;
    const SAMPLE_ACCURATE_AUTOMATION: bool = true;

    type Editor = ();
    type SysExMessage = ();
    type BackgroundTask = ();

    fn params(&self) -> Arc<dyn Params> {
        self.params.clone()
    }

    fn process(
        &mut self,
        _buffer: &mut Buffer,
        _aux: &mut AuxiliaryBuffers,
        context: &mut impl ProcessContext<Self>,
    ) -> ProcessStatus {
        let is_passing_through = self.params.pass_through.value();
        while let Some(event) = context.next_event() {
            // The host's output queue is far larger than one block's input; a full queue drops
            // the event rather than block.
            if is_passing_through {
                let _ = context.try_send_event(event);
            }
        }
        ProcessStatus::Normal
    }
}

impl ClapPlugin for Antiphon {
    const CLAP_ID: &'static str = "org.antiphon.antiphon";
    const CLAP_DESCRIPTION: Option<&'static str> =
        Some("Answers the phrase you play with a continuation written by a neural network");
    const CLAP_MANUAL_URL: Option<&'static str> = None;
    const CLAP_SUPPORT_URL: Option<&'static str> = None;
    const CLAP_FEATURES: &'static [ClapFeature] = &[ClapFeature::NoteEffect, ClapFeature::Utility];
}

impl Vst3Plugin for Antiphon {
    const VST3_CLASS_ID: [u8; 16] = *b"AntiphonMidiFx01";
    const VST3_SUBCATEGORIES: &'static [Vst3SubCategory] = &[Vst3SubCategory::Fx, Vst3SubCategory::Tools];
}

nice_export_clap!(Antiphon);
nice_export_vst3!(Antiphon);
