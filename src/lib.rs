//! Antiphon: a MIDI effect that answers the phrase you play with a continuation written by an
//! LSTM. This file is wiring only: the plugin type, its host-facing constants and the exports;
//! the `live` crate does the audio thread's work and `engine` the worker's.
//! Runs on: audio thread (`process`, `reset`), main thread (everything else).

pub mod editor;
pub mod engine;
pub mod keep;
pub mod log;
pub mod params;
pub mod presets;

use std::num::NonZeroU32;
use std::sync::Arc;

use nice_plug::midi::{Channel as MidiChannel, Key as MidiKey, VoiceID};
use nice_plug::prelude::*;

use engine::lstm::LstmFactory;
use engine::{ContinuerFactory, Engine, EngineStatus};
use live::phrase::LiveShared;
use live::{HostTransport, NoteMsg, Scheduler};
use params::AntiphonParams;

/// The plugin instance the host creates. Creating it is cheap: no thread, no model.
pub struct Antiphon {
    /// Parameters, shared with the host wrapper.
    params: Arc<AntiphonParams>,
    /// Audio-thread state: capture, clock, playback.
    scheduler: Scheduler,
    /// Atomics shared by the audio thread and the worker.
    live: Arc<LiveShared>,
    /// The worker's state for a GUI or the host.
    status: Arc<EngineStatus>,
    /// The running worker, between `activate` and `deactivate`.
    engine: Option<Engine>,
    /// Loads the model the worker drives: the built-in LSTM or a model directory.
    factory: Arc<dyn ContinuerFactory>,
    /// The editor's size; the editor itself exists only while the host shows it.
    editor_state: Arc<nice_plug_egui::EguiEditorState>,
}

/// Keeps this library mapped until the process exits, from the first instance on. The code an
/// instance runs on a host's thread leaves per-thread destructors behind (thread-local data of
/// the libraries it links), and a host that unloads the plugin while that thread lives would
/// call into unmapped memory when the thread ends: the tests' host crashed that way at thread
/// exit, one run in ten. The cost is the mapping a host that unloads the plugin would have freed.
fn keep_library_loaded() {
    #[cfg(unix)]
    {
        static PINNED: std::sync::Once = std::sync::Once::new();
        PINNED.call_once(|| {
            // SAFETY: `dladdr` fills `info` for an address inside this library and keeps
            // `dli_fname` valid while it is loaded; `dlopen` with RTLD_NOLOAD loads nothing,
            // only marks the copy already loaded RTLD_NODELETE, and its handle is never closed.
            unsafe {
                let mut info: libc::Dl_info = std::mem::zeroed();
                let here = keep_library_loaded as *const libc::c_void;
                if libc::dladdr(here, &mut info) != 0 && !info.dli_fname.is_null() {
                    libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE);
                }
            }
        });
    }
}

impl Default for Antiphon {
    fn default() -> Self {
        keep_library_loaded();
        let live = Arc::new(LiveShared::new());
        Self {
            params: Arc::new(AntiphonParams::default()),
            scheduler: Scheduler::new(live.clone()),
            live,
            status: Arc::new(EngineStatus::default()),
            engine: None,
            factory: Arc::new(LstmFactory),
            editor_state: editor::default_state(),
        }
    }
}

impl Antiphon {
    /// The worker's state and the reason for it (the model loaded, or why none could be).
    pub fn engine_status(&self) -> &Arc<EngineStatus> {
        &self.status
    }

    /// Counters of dropped requests, late notes and lost events.
    pub fn live(&self) -> &Arc<LiveShared> {
        &self.live
    }
}

/// The transport fields the scheduler uses; missing ones are derived where the framework can.
fn host_transport(transport: &Transport) -> HostTransport {
    HostTransport {
        is_playing: transport.playing,
        tempo_bpm: transport.tempo,
        pos_beats: transport.pos_beats(),
        bar_start_beats: transport.bar_start_pos_beats(),
        time_sig: transport.time_sig_numerator.zip(transport.time_sig_denominator),
    }
}

/// Sets subnormal samples of the passed-through audio to zero: a host may hand in denormals (a
/// fading tail, a validator on purpose), and a chain that keeps them runs slowly downstream.
fn flush_subnormals(buffer: &mut Buffer) {
    for channel in buffer.as_slice() {
        for sample in channel.iter_mut() {
            if sample.is_subnormal() {
                *sample = 0.0;
            }
        }
    }
}

/// The sustain pedal's controller number.
const SUSTAIN_PEDAL_CC: u8 = 64;

/// Sends a note to the host; a refused event is counted.
fn send(context: &mut impl ProcessContext<Antiphon>, msg: NoteMsg, live: &LiveShared) {
    let voice_id = msg.voice_id.map_or(VoiceID::Wildcard, VoiceID::ID);
    let (channel, key) = (MidiChannel::Number(msg.channel), MidiKey::Number(msg.key));
    let event = if msg.is_on {
        NoteEvent::NoteOn { timing: msg.timing, voice_id, channel, key, velocity: msg.velocity }
    } else {
        NoteEvent::NoteOff { timing: msg.timing, voice_id, channel, key, velocity: msg.velocity }
    };
    if context.try_send_event(event).is_err() {
        LiveShared::bump(&live.num_lost_events);
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
    // Controllers, pitch bend and pressure too, so the pedal, the wheels and aftertouch a player
    // uses pass through to the synth (and the sustain pedal shapes the captured phrase).
    const MIDI_INPUT: MidiConfig = MidiConfig::MidiCCs;
    const MIDI_OUTPUT: MidiConfig = MidiConfig::MidiCCs;
    const SAMPLE_ACCURATE_AUTOMATION: bool = true;

    type Editor = nice_plug_egui::EguiEditor<editor::EditorApp>;
    type SysExMessage = ();
    type BackgroundTask = ();

    fn setup_logger() -> Option<bool> {
        Some(log::setup())
    }

    fn params(&self) -> Arc<dyn Params> {
        self.params.clone()
    }

    fn editor(&mut self, _executor: AsyncExecutor<Self>) -> Option<Self::Editor> {
        let (params, live, status) = (self.params.clone(), self.live.clone(), self.status.clone());
        editor::create(self.editor_state.clone(), params, live, status)
    }

    fn filter_state(state: &mut PluginState) {
        params::filter_state(state);
    }

    fn activate(
        &mut self,
        _layout: &AudioIOLayout,
        buffer_config: &BufferConfig,
        _context: &mut impl ActivateContext<Self>,
    ) -> bool {
        let is_offline = buffer_config.process_mode == ProcessMode::Offline;
        self.scheduler.configure(buffer_config.sample_rate, is_offline);
        if self.engine.is_none() {
            let spawned = Engine::spawn(
                self.factory.clone(),
                self.params.model.clone(),
                self.live.clone(),
                self.status.clone(),
            );
            match spawned {
                Ok((engine, link)) => {
                    self.scheduler.connect(link);
                    self.engine = Some(engine);
                }
                // Without a worker the plugin still passes notes through.
                Err(err) => nice_error!("Antiphon: {err}"),
            }
        }
        true
    }

    fn reset(&mut self) {
        self.scheduler.reset();
    }

    fn deactivate(&mut self) {
        drop(self.scheduler.disconnect());
        if let Some(engine) = self.engine.take() {
            engine.shutdown();
        }
    }

    fn process(
        &mut self,
        buffer: &mut Buffer,
        _aux: &mut AuxiliaryBuffers,
        context: &mut impl ProcessContext<Self>,
    ) -> ProcessStatus {
        let settings = self.params.settings();
        let transport = host_transport(context.transport());
        let live: &LiveShared = &self.live;
        let scheduler = &mut self.scheduler;
        scheduler
            .start_block(&transport, buffer.samples() as u32, &settings, &mut |msg| send(context, msg, live));
        while let Some(event) = context.next_event() {
            let (timing, is_on, is_choke, voice_id, channel, key, velocity) = match event {
                NoteEvent::NoteOn { timing, voice_id, channel, key, velocity } => {
                    (timing, true, false, voice_id, channel.number(), key.number(), velocity)
                }
                NoteEvent::NoteOff { timing, voice_id, channel, key, velocity } => {
                    (timing, false, false, voice_id, channel.number(), key.number(), velocity)
                }
                NoteEvent::Choke { timing, voice_id, channel, key } => {
                    (timing, false, true, voice_id, channel.number(), key.number(), 0.0)
                }
                other => {
                    // Controllers, bend, pressure, expression: passed on in time order, not
                    // captured; the sustain pedal also holds the phrase's notes.
                    match other {
                        NoteEvent::MidiCC { timing, channel, cc: SUSTAIN_PEDAL_CC, value } => {
                            let is_down = value >= 0.5;
                            scheduler.sustain(timing, channel, is_down, &settings, &mut |msg| {
                                send(context, msg, live)
                            });
                        }
                        _ => scheduler
                            .play_until(other.timing(), &settings, &mut |msg| send(context, msg, live)),
                    }
                    if settings.is_thru || settings.is_bypassed {
                        let _ = context.try_send_event(other);
                    }
                    continue;
                }
            };
            let (Some(channel), Some(key)) = (channel, key) else {
                // A wildcard note (every key, or every channel) of a voice: passed on as it is.
                scheduler.play_until(timing, &settings, &mut |msg| send(context, msg, live));
                if settings.is_thru || settings.is_bypassed {
                    let _ = context.try_send_event(event);
                }
                continue;
            };
            let msg = NoteMsg { timing, is_on, channel, key, velocity, voice_id: voice_id.id() };
            scheduler.note(msg, is_choke, &settings, &mut |msg| send(context, msg, live));
        }
        scheduler.end_block(&settings, &mut |msg| send(context, msg, live));
        flush_subnormals(buffer);
        // Keep being called with silent input: timers and answers run on the transport.
        ProcessStatus::KeepAlive
    }
}

impl ClapPlugin for Antiphon {
    const CLAP_ID: &'static str = "org.antiphon.antiphon";
    const CLAP_DESCRIPTION: Option<&'static str> =
        Some("Answers the phrase you play with a continuation written by a neural network");
    const CLAP_MANUAL_URL: Option<&'static str> = None;
    const CLAP_SUPPORT_URL: Option<&'static str> = None;
    const CLAP_FEATURES: &'static [ClapFeature] = &[ClapFeature::NoteEffect, ClapFeature::Utility];

    /// Device-panel pages for hosts with remote controls (Bitwig maps its controllers to them):
    /// the eight parameters a player reaches for first, then the rest of each stage.
    fn remote_controls(&self, context: &mut impl RemoteControlsContext) {
        let params = &self.params;
        context.add_section("Antiphon", |section| {
            section.add_page("Play", |page| {
                page.add_param(&params.answer.temperature);
                page.add_param(&params.answer.answer_bars);
                page.add_param(&params.listen.trigger);
                page.add_param(&params.listen.silence_beats);
                page.add_param(&params.answer.should_yield);
                page.add_param(&params.answer.is_continuous);
                page.add_param(&params.sound.key_lock);
                page.add_param(&params.listen.pass_through);
            });
            section.add_page("Answer", |page| {
                page.add_param(&params.answer.answer_start);
                page.add_param(&params.listen.phrase_bars);
                page.add_param(&params.sound.lowest_note);
                page.add_param(&params.sound.highest_note);
                page.add_param(&params.sound.velocity_mode);
                page.add_param(&params.sound.velocity);
                page.add_param(&params.sound.gate_percent);
                page.add_param(&params.sound.channel);
            });
            section.add_page("Texture, Key and Model", |page| {
                page.add_param(&params.answer.texture);
                page.add_param(&params.answer.max_voices);
                page.add_param(&params.sound.key_root);
                page.add_param(&params.sound.scale);
                page.add_param(&params.model_choice.model_select);
                page.add_param(&params.model_choice.seed);
                page.add_param(&params.model_choice.is_fresh_seed);
                page.add_param(&params.answer_now);
            });
            section.add_page("Clock and Device", |page| {
                page.add_param(&params.listen.free_tempo_bpm);
                page.add_param(&params.model_choice.device);
            });
        });
    }
}

impl Vst3Plugin for Antiphon {
    const VST3_CLASS_ID: [u8; 16] = *b"AntiphonMidiFx01";
    const VST3_SUBCATEGORIES: &'static [Vst3SubCategory] = &[Vst3SubCategory::Fx, Vst3SubCategory::Tools];
}

nice_export_clap!(Antiphon);
nice_export_vst3!(Antiphon);
