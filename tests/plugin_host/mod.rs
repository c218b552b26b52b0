//! A small CLAP host for the plugin tests: loads the built bundle with clack-host, sets
//! parameters, saves and loads state, and performs scripted takes (a transport, played notes,
//! parameter changes) at any sample rate and block size, recording every note the plugin sends.
//! Blocks can also be driven one at a time with any input (CLAP notes with or without note ids,
//! chokes, MIDI messages, parameter changes) and any transport, and return every event the plugin
//! sent, notes and MIDI alike.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clack_extensions::gui::{GuiSize, HostGui, HostGuiImpl};
use clack_host::events::event_types::{
    MidiEvent, NoteChokeEvent, NoteOffEvent, NoteOnEvent, ParamValueEvent, TransportEvent, TransportFlags,
};
use clack_host::events::{EventFlags, EventHeader, UnknownEvent};
use clack_host::prelude::*;
use clack_host::utils::BeatTime;
use clap_sys::ext::audio_ports_config::{
    clap_audio_ports_config, clap_plugin_audio_ports_config, CLAP_EXT_AUDIO_PORTS_CONFIG,
};
use clap_sys::ext::gui::{
    clap_plugin_gui, clap_window, clap_window_handle, CLAP_EXT_GUI, CLAP_WINDOW_API_X11,
};
use clap_sys::ext::params::{clap_param_info, clap_plugin_params, CLAP_EXT_PARAMS};
use clap_sys::ext::remote_controls::{
    clap_plugin_remote_controls, clap_remote_controls_page, CLAP_EXT_REMOTE_CONTROLS,
};
use clap_sys::ext::render::{clap_plugin_render, CLAP_EXT_RENDER, CLAP_RENDER_OFFLINE, CLAP_RENDER_REALTIME};
use clap_sys::ext::state::{clap_plugin_state, CLAP_EXT_STATE};
use clap_sys::id::CLAP_INVALID_ID;
use clap_sys::plugin::clap_plugin;

/// The plugin's CLAP id.
pub const PLUGIN_ID: &CStr = c"org.antiphon.antiphon";

struct TestShared;

impl SharedHandler<'_> for TestShared {
    fn request_restart(&self) {}
    fn request_process(&self) {}
    fn request_callback(&self) {}
}

/// The host's side of the gui extension: a fixed-size window that refuses to change.
impl HostGuiImpl for TestShared {
    fn resize_hints_changed(&self) {}
    fn request_resize(&self, _new_size: GuiSize) -> Result<(), HostError> {
        Err(HostError::Message("the test window keeps its size"))
    }
    fn request_show(&self) -> Result<(), HostError> {
        Ok(())
    }
    fn request_hide(&self) -> Result<(), HostError> {
        Ok(())
    }
    fn closed(&self, _was_destroyed: bool) {}
}

struct TestHost;

impl HostHandlers for TestHost {
    type Shared<'a> = TestShared;
    type MainThread<'a> = ();
    type AudioProcessor<'a> = ();

    fn declare_extensions(builder: &mut HostExtensions<Self>, _shared: &Self::Shared<'_>) {
        builder.register::<HostGui>();
    }
}

/// Where the built plugin is: `$ANTIPHON_CLAP`, or the debug bundle in `bundled-debug/` of the
/// target folder (where `cargo xtask bundle antiphon` puts it: the allocation checks are on).
/// Fails with a message that says how to build it when it is missing or older than the sources.
pub fn bundle_path() -> PathBuf {
    if let Ok(path) = std::env::var("ANTIPHON_CLAP") {
        return PathBuf::from(path);
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir =
        std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| manifest_dir.join("target"));
    let candidates = [target_dir.join("bundled-debug/antiphon.clap")];
    let Some(path) = candidates.iter().find(|p| p.exists()) else {
        panic!(
            "the plugin bundle is missing ({}): build it first with `cargo xtask bundle antiphon` \
             (a debug build, so the allocation checks are on), or point ANTIPHON_CLAP at a bundle",
            candidates[0].display()
        );
    };
    let bundle_time = std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
    if let Some((source, _)) = newest_source(&manifest_dir.join("src")).filter(|(_, t)| *t > bundle_time) {
        panic!(
            "the plugin bundle {} is older than {}: rebuild it with `cargo xtask bundle antiphon`",
            path.display(),
            source.display()
        );
    }
    path.clone()
}

fn newest_source(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let found = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry.metadata().and_then(|m| m.modified()).ok().map(|t| (path, t))
        } else {
            None
        };
        if let Some((p, t)) = found {
            if newest.as_ref().is_none_or(|(_, n)| t > *n) {
                newest = Some((p, t));
            }
        }
    }
    newest
}

/// A parameter as the plugin describes it.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub id: u32,
    pub name: String,
    /// The group the host lists it under (CLAP's module path); empty for none.
    pub module: String,
    /// Highest CLAP value: 1 for continuous parameters, the step count for stepped ones.
    pub max_value: f64,
}

/// A loaded plugin instance on the test's main thread.
pub struct Plugin {
    instance: PluginInstance<TestHost>,
    /// The loaded bundle, kept while the instance lives and shared with `another`.
    entry: PluginEntry,
    params: HashMap<String, ParamInfo>,
    /// Audio ports each way of the selected layout.
    num_audio_ports: usize,
}

impl Plugin {
    /// Loads the built bundle and creates an instance.
    pub fn load() -> Self {
        let path = bundle_path();
        // SAFETY: the bundle is our own plugin, built from this repository.
        let entry =
            unsafe { PluginEntry::load(&path) }.unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        Self::from_entry(entry)
    }

    /// A new instance, with default parameters, from the bundle this one was loaded from.
    pub fn another(&self) -> Self {
        Self::from_entry(self.entry.clone())
    }

    fn from_entry(entry: PluginEntry) -> Self {
        let host = HostInfo::new("Antiphon tests", "Antiphon", "https://example.org", "0.1").unwrap();
        let instance =
            PluginInstance::<TestHost>::new(|_| TestShared, |_| (), &entry, PLUGIN_ID, &host).unwrap();
        let mut plugin = Self { instance, entry, params: HashMap::new(), num_audio_ports: 1 };
        plugin.read_params();
        plugin
    }

    fn raw(&self) -> &clap_plugin {
        self.instance.raw_instance()
    }

    /// A copy of the extension's table of functions.
    fn extension<T: Copy>(&self, id: &CStr) -> T {
        let raw = self.raw();
        // SAFETY: a CLAP plugin returns a pointer to a static extension struct of the type its
        // id names, or null.
        unsafe {
            let ptr = (raw.get_extension.unwrap())(raw, id.as_ptr()) as *const T;
            assert!(!ptr.is_null(), "the plugin lacks {id:?}");
            *ptr
        }
    }

    fn read_params(&mut self) {
        let ext: clap_plugin_params = self.extension(CLAP_EXT_PARAMS);
        // SAFETY: plain calls of the params extension on the main thread, with valid pointers.
        unsafe {
            let count = (ext.count.unwrap())(self.raw());
            for idx in 0..count {
                let mut info: clap_param_info = std::mem::zeroed();
                assert!((ext.get_info.unwrap())(self.raw(), idx, &mut info));
                let name = CStr::from_ptr(info.name.as_ptr()).to_string_lossy().into_owned();
                let module = CStr::from_ptr(info.module.as_ptr()).to_string_lossy().into_owned();
                self.params
                    .insert(name.clone(), ParamInfo { id: info.id, name, module, max_value: info.max_value });
            }
        }
    }

    /// The parameter with this display name.
    pub fn param(&self, name: &str) -> &ParamInfo {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name:?}; there are {:?}", self.params.keys()))
    }

    /// The remote-control pages the plugin declares: each page's name and parameter ids.
    pub fn remote_control_pages(&self) -> Vec<(String, Vec<u32>)> {
        let ext: clap_plugin_remote_controls = self.extension(CLAP_EXT_REMOTE_CONTROLS);
        // SAFETY: plain calls of the remote-controls extension on the main thread, with a page
        // struct that outlives each call.
        unsafe {
            let count = (ext.count.unwrap())(self.raw());
            (0..count)
                .map(|idx| {
                    let mut page: clap_remote_controls_page = std::mem::zeroed();
                    assert!((ext.get.unwrap())(self.raw(), idx, &mut page));
                    let name = CStr::from_ptr(page.page_name.as_ptr()).to_string_lossy().into_owned();
                    let ids = page.param_ids.iter().copied().filter(|&id| id != CLAP_INVALID_ID).collect();
                    (name, ids)
                })
                .collect()
        }
    }

    /// Names of every parameter.
    pub fn param_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.params.keys().cloned().collect();
        names.sort();
        names
    }

    /// The CLAP value the plugin reads from `text` for parameter `name`.
    pub fn value_of(&self, name: &str, text: &str) -> f64 {
        let ext: clap_plugin_params = self.extension(CLAP_EXT_PARAMS);
        let text = CString::new(text).unwrap();
        let mut value = f64::NAN;
        // SAFETY: as above.
        let ok = unsafe {
            (ext.text_to_value.unwrap())(self.raw(), self.param(name).id, text.as_ptr(), &mut value)
        };
        assert!(ok, "{name} does not read {text:?}");
        value
    }

    /// The parameter's current CLAP value.
    pub fn value(&self, name: &str) -> f64 {
        let ext: clap_plugin_params = self.extension(CLAP_EXT_PARAMS);
        let mut value = f64::NAN;
        // SAFETY: as above.
        assert!(unsafe { (ext.get_value.unwrap())(self.raw(), self.param(name).id, &mut value) });
        value
    }

    /// The parameter's current value as the plugin displays it.
    pub fn text(&self, name: &str) -> String {
        let ext: clap_plugin_params = self.extension(CLAP_EXT_PARAMS);
        let mut buffer = [0 as c_char; 256];
        // SAFETY: as above; the buffer's capacity is passed.
        unsafe {
            let id = self.param(name).id;
            assert!((ext.value_to_text.unwrap())(self.raw(), id, self.value(name), buffer.as_mut_ptr(), 256));
            CStr::from_ptr(buffer.as_ptr()).to_string_lossy().into_owned()
        }
    }

    /// Sets parameters outside processing, through the params extension's flush.
    pub fn set(&self, changes: &[(&str, &str)]) {
        let mut events = EventBuffer::new();
        for (name, text) in changes {
            let value = self.value_of(name, text);
            events.push(&ParamValueEvent::new(0, ClapId::new(self.param(name).id), Pckn::match_all(), value));
        }
        let mut out = EventBuffer::new();
        let ext: clap_plugin_params = self.extension(CLAP_EXT_PARAMS);
        let (input, mut output) = (events.as_input(), out.as_output());
        // SAFETY: as above; the event lists live across the call.
        unsafe { (ext.flush.unwrap())(self.raw(), input.as_raw(), output.as_raw()) };
    }

    /// Creates the editor and shows it embedded in the X11 window that `make_parent` creates
    /// for its size in pixels (and returns), as a host opens a plugin window.
    pub fn open_editor(&self, make_parent: impl FnOnce(u32, u32) -> u64) {
        let gui: clap_plugin_gui = self.extension(CLAP_EXT_GUI);
        let (mut width, mut height) = (0u32, 0u32);
        // SAFETY: the gui extension's calls, in the order CLAP prescribes, on the main thread,
        // with pointers that outlive each call.
        unsafe {
            assert!((gui.is_api_supported.unwrap())(self.raw(), CLAP_WINDOW_API_X11.as_ptr(), false));
            assert!((gui.create.unwrap())(self.raw(), CLAP_WINDOW_API_X11.as_ptr(), false), "gui.create");
            assert!((gui.get_size.unwrap())(self.raw(), &mut width, &mut height));
            let parent = make_parent(width, height);
            let window = clap_window {
                api: CLAP_WINDOW_API_X11.as_ptr(),
                specific: clap_window_handle { x11: parent },
            };
            assert!((gui.set_parent.unwrap())(self.raw(), &window), "gui.set_parent");
            assert!((gui.show.unwrap())(self.raw()), "gui.show");
        }
    }

    /// Hides and destroys the editor.
    pub fn close_editor(&self) {
        let gui: clap_plugin_gui = self.extension(CLAP_EXT_GUI);
        // SAFETY: as in `open_editor`, after it.
        unsafe {
            (gui.hide.unwrap())(self.raw());
            (gui.destroy.unwrap())(self.raw());
        }
    }

    /// Tells the plugin whether the host renders offline. Before `activate`.
    pub fn set_offline(&self, is_offline: bool) {
        let ext: clap_plugin_render = self.extension(CLAP_EXT_RENDER);
        let mode = if is_offline { CLAP_RENDER_OFFLINE } else { CLAP_RENDER_REALTIME };
        // SAFETY: as above.
        assert!(unsafe { (ext.set.unwrap())(self.raw(), mode) });
    }

    /// The plugin's saved state.
    pub fn save_state(&self) -> Vec<u8> {
        let ext: clap_plugin_state = self.extension(CLAP_EXT_STATE);
        let mut bytes = Vec::new();
        let mut stream = clack_host::stream::OutputStream::from_writer(&mut bytes);
        // SAFETY: as above; the stream lives across the call.
        assert!(unsafe { (ext.save.unwrap())(self.raw(), stream.as_raw_mut()) });
        bytes
    }

    /// Loads a saved state; false when the plugin refuses it.
    pub fn load_state(&self, bytes: &[u8]) -> bool {
        let ext: clap_plugin_state = self.extension(CLAP_EXT_STATE);
        let mut reader = bytes;
        let mut stream = clack_host::stream::InputStream::from_reader(&mut reader);
        // SAFETY: as above.
        unsafe { (ext.load.unwrap())(self.raw(), stream.as_raw_mut()) }
    }

    /// Picks the note-only layout (no audio ports) or the stereo pass-through one, through the
    /// audio-ports-config extension. Before `activate`.
    pub fn select_layout(&mut self, is_note_only: bool) {
        let ext: clap_plugin_audio_ports_config = self.extension(CLAP_EXT_AUDIO_PORTS_CONFIG);
        // SAFETY: as above.
        let count = unsafe { (ext.count.unwrap())(self.raw()) };
        assert_eq!(count, 2, "the plugin offers stereo and note-only layouts");
        // nice-plug numbers the layouts in `AUDIO_IO_LAYOUTS` order: stereo, then note-only.
        let config_id = u32::from(is_note_only);
        // SAFETY: as above.
        let mut info: clap_audio_ports_config = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `info` outlives the call.
        let is_found = unsafe { (ext.get.unwrap())(self.raw(), config_id, &mut info) };
        assert!(is_found);
        assert_eq!(info.input_port_count == 0 && info.output_port_count == 0, is_note_only);
        // SAFETY: as above.
        assert!(unsafe { (ext.select.unwrap())(self.raw(), config_id) });
        self.num_audio_ports = if is_note_only { 0 } else { 1 };
    }

    /// Activates with the layout chosen (stereo unless `select_layout` said otherwise) and
    /// starts processing.
    pub fn activate(&mut self, sample_rate_hz: f64, max_block_len: u32) -> Processor {
        let config = PluginAudioConfiguration {
            sample_rate: sample_rate_hz,
            min_frames_count: 1,
            max_frames_count: max_block_len,
        };
        let stopped = self.instance.activate(|_, _| (), config).expect("activation");
        let started = stopped.start_processing().expect("start processing");
        let len = max_block_len as usize;
        Processor {
            started,
            sample_rate_hz,
            buffers: [vec![0.0; len], vec![0.0; len], vec![0.0; len], vec![0.0; len]],
            input_ports: AudioPorts::with_capacity(2, 1),
            output_ports: AudioPorts::with_capacity(2, 1),
            out_events: EventBuffer::with_capacity(1024),
            in_events: EventBuffer::with_capacity(1024),
            next_sample: 0,
            max_block_len,
            process_times: Vec::new(),
            is_timing: false,
            num_audio_ports: self.num_audio_ports,
        }
    }

    /// Stops processing and deactivates.
    pub fn deactivate(&mut self, processor: Processor) {
        let stopped = processor.started.stop_processing();
        self.instance.deactivate(stopped);
    }
}

/// The host transport for one block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostTransport {
    pub is_playing: bool,
    pub tempo_bpm: f64,
    /// Song position at the block's first sample, in beats.
    pub pos_beats: f64,
    /// Active loop, in beats (start inclusive, end exclusive).
    pub loop_beats: Option<(f64, f64)>,
    /// Time signature as (numerator, denominator).
    pub time_sig: (u16, u16),
    /// A bar line of the time signature, in beats: bars start here plus whole bars (where the
    /// host's meter last changed, say).
    pub bar_origin_beats: f64,
}

impl HostTransport {
    /// A transport in 4/4 from beat 0, without a loop.
    pub fn common_time(is_playing: bool, tempo_bpm: f64, pos_beats: f64) -> Self {
        Self { is_playing, tempo_bpm, pos_beats, loop_beats: None, time_sig: (4, 4), bar_origin_beats: 0.0 }
    }

    /// Length of a bar of the time signature, in beats (quarter notes).
    pub fn bar_beats(&self) -> f64 {
        let (numerator, denominator) = self.time_sig;
        f64::from(numerator) * 4.0 / f64::from(denominator)
    }
}

/// Something the host sends into a block, at a sample offset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Input {
    /// A CLAP note-on or note-off on `channel` (0..=15), with the host's note id or none.
    Note { offset: u32, is_on: bool, channel: u8, key: u8, velocity: f64, note_id: Option<u32> },
    /// A CLAP note choke: the key ends at once.
    Choke { offset: u32, channel: u8, key: u8 },
    /// A MIDI 1.0 message in the MIDI dialect: notes, controllers, pitch bend, pressure (a
    /// two-byte message is padded with a zero).
    Midi { offset: u32, data: [u8; 3] },
    /// A parameter change: the parameter's id and its CLAP value.
    Param { offset: u32, id: u32, value: f64 },
}

impl Input {
    /// A CLAP note-on on the first channel, without a note id.
    pub fn note_on(offset: u32, key: u8, velocity: f64) -> Self {
        Input::Note { offset, is_on: true, channel: 0, key, velocity, note_id: None }
    }

    /// A CLAP note-off on the first channel, without a note id.
    pub fn note_off(offset: u32, key: u8) -> Self {
        Input::Note { offset, is_on: false, channel: 0, key, velocity: 0.0, note_id: None }
    }

    /// Sample offset in the block.
    pub fn offset(&self) -> u32 {
        match *self {
            Input::Note { offset, .. }
            | Input::Choke { offset, .. }
            | Input::Midi { offset, .. }
            | Input::Param { offset, .. } => offset,
        }
    }

    /// The same input at another offset.
    pub fn at(mut self, new_offset: u32) -> Self {
        match &mut self {
            Input::Note { offset, .. }
            | Input::Choke { offset, .. }
            | Input::Midi { offset, .. }
            | Input::Param { offset, .. } => *offset = new_offset,
        }
        self
    }

    /// Whether this starts a note, in either dialect (a MIDI note-on of velocity 0 is a note-off).
    pub fn is_note_on(&self) -> bool {
        match *self {
            Input::Note { is_on, .. } => is_on,
            Input::Midi { data: [status, _, velocity], .. } => status & 0xf0 == 0x90 && velocity > 0,
            Input::Choke { .. } | Input::Param { .. } => false,
        }
    }
}

/// Puts a block's inputs in the order `Processor::process` sends them: by offset, and at one
/// offset parameter changes first, note-ons last, everything else in between in the order given
/// (so a note that ends where the same key starts again ends first).
pub fn sort_inputs(inputs: &mut [Input]) {
    inputs.sort_by_key(|i| (i.offset(), !matches!(i, Input::Param { .. }), i.is_note_on()));
}

/// What the plugin sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sent {
    /// A note-on or note-off: a CLAP note event, or (`is_midi`) a MIDI note message (a MIDI
    /// note-on of velocity 0 reads as a note-off). `channel` is 0-based.
    Note { is_on: bool, channel: u8, key: u8, velocity: f64, is_midi: bool },
    /// A CLAP note choke of one key.
    Choke { channel: u8, key: u8 },
    /// Any other MIDI message (controllers, pitch bend, pressure), as its three bytes.
    Midi([u8; 3]),
    /// An event of another CLAP type (note end, parameter value...), by its type id.
    Other { type_id: u16 },
}

/// An event the plugin sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Output {
    /// Sample position from the start of processing.
    pub sample: u64,
    pub sent: Sent,
}

/// A note the plugin sent, in either dialect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SentNote {
    /// Sample position from the start of processing.
    pub sample: u64,
    pub is_on: bool,
    pub key: u8,
    /// 0-based MIDI channel.
    pub channel: u8,
    pub velocity: f64,
}

impl Output {
    /// The note-on or note-off this is, if it is one.
    pub fn note(&self) -> Option<SentNote> {
        match self.sent {
            Sent::Note { is_on, channel, key, velocity, .. } => {
                Some(SentNote { sample: self.sample, is_on, key, channel, velocity })
            }
            _ => None,
        }
    }
}

/// A CLAP note event's channel and key, which must name one key on one channel: the tests send
/// no wildcard notes, so the plugin has none to pass on.
fn note_target(channel: i16, key: i16, what: &str) -> (u8, u8) {
    assert!(
        (0..16).contains(&channel) && (0..128).contains(&key),
        "the plugin sent a {what} for channel {channel}, key {key}"
    );
    (channel as u8, key as u8)
}

/// Reads one output event.
fn read_sent(event: &UnknownEvent) -> Sent {
    if let Some(on) = event.as_event::<NoteOnEvent>() {
        let raw = on.as_raw();
        let (channel, key) = note_target(raw.channel, raw.key, "note-on");
        return Sent::Note { is_on: true, channel, key, velocity: raw.velocity, is_midi: false };
    }
    if let Some(off) = event.as_event::<NoteOffEvent>() {
        let raw = off.as_raw();
        let (channel, key) = note_target(raw.channel, raw.key, "note-off");
        return Sent::Note { is_on: false, channel, key, velocity: raw.velocity, is_midi: false };
    }
    if let Some(choke) = event.as_event::<NoteChokeEvent>() {
        let raw = choke.as_raw();
        let (channel, key) = note_target(raw.channel, raw.key, "choke");
        return Sent::Choke { channel, key };
    }
    if let Some(midi) = event.as_event::<MidiEvent>() {
        let data = midi.data();
        let (status, channel, key, velocity) = (data[0] & 0xf0, data[0] & 0x0f, data[1], data[2]);
        return match status {
            0x90 | 0x80 => Sent::Note {
                is_on: status == 0x90 && velocity > 0,
                channel,
                key,
                velocity: f64::from(velocity) / 127.0,
                is_midi: true,
            },
            _ => Sent::Midi(data),
        };
    }
    Sent::Other { type_id: event.header().type_id() }
}

/// A started audio processor with its buffers.
pub struct Processor {
    started: StartedPluginAudioProcessor<TestHost>,
    pub sample_rate_hz: f64,
    buffers: [Vec<f32>; 4],
    input_ports: AudioPorts,
    output_ports: AudioPorts,
    in_events: EventBuffer,
    out_events: EventBuffer,
    /// Samples processed so far.
    pub next_sample: u64,
    pub max_block_len: u32,
    /// How long each `process` call took, when `is_timing` is set.
    pub process_times: Vec<Duration>,
    pub is_timing: bool,
    /// Audio ports each way: 1 (stereo) or 0 (the note-only layout).
    num_audio_ports: usize,
}

impl Processor {
    /// Processes one block of `len` samples and returns what the plugin sent. Inputs are sent in
    /// `sort_inputs` order. Checks that every output event lies inside the block and that their
    /// times never go back, as CLAP requires.
    pub fn process(&mut self, len: u32, transport: Option<&HostTransport>, inputs: &[Input]) -> Vec<Output> {
        assert!(len >= 1 && len <= self.max_block_len);
        self.in_events.clear();
        self.out_events.clear();
        let mut sorted: Vec<Input> = inputs.to_vec();
        sort_inputs(&mut sorted);
        let pckn = |channel: u8, key: u8, note_id: Option<u32>| {
            let note_id = note_id.map_or(Match::All, Match::Specific);
            Pckn::new(0u16, u16::from(channel), u16::from(key), note_id)
        };
        for input in &sorted {
            match *input {
                Input::Note { offset, is_on: true, channel, key, velocity, note_id } => {
                    self.in_events.push(&NoteOnEvent::new(offset, pckn(channel, key, note_id), velocity))
                }
                Input::Note { offset, is_on: false, channel, key, velocity, note_id } => {
                    self.in_events.push(&NoteOffEvent::new(offset, pckn(channel, key, note_id), velocity))
                }
                Input::Choke { offset, channel, key } => {
                    self.in_events.push(&NoteChokeEvent::new(offset, pckn(channel, key, None)))
                }
                Input::Midi { offset, data } => self.in_events.push(&MidiEvent::new(offset, 0, data)),
                Input::Param { offset, id, value } => self.in_events.push(&ParamValueEvent::new(
                    offset,
                    ClapId::new(id),
                    Pckn::match_all(),
                    value,
                )),
            }
        }
        let transport_event = transport.map(transport_event);
        let len_usize = len as usize;
        let [in_l, in_r, out_l, out_r] = &mut self.buffers;
        let mut no_ports: [clap_sys::audio_buffer::clap_audio_buffer; 0] = [];
        let (input_audio, mut output_audio) = if self.num_audio_ports == 0 {
            // clack-host takes the block length from the audio buffers, so with none it is
            // given outright, as a host does for a note-only plugin.
            // SAFETY: no buffers, so none is shorter than `len`.
            unsafe {
                (
                    InputAudioBuffers::from_raw_buffers(&[], len),
                    OutputAudioBuffers::from_raw_buffers(&mut no_ports, len),
                )
            }
        } else {
            let input_audio = self.input_ports.with_input_buffers([AudioPortBuffer {
                latency: 0,
                channels: AudioPortBufferType::f32_input_only(
                    [&mut in_l[..len_usize], &mut in_r[..len_usize]].into_iter().map(InputChannel::constant),
                ),
            }]);
            let output_audio = self.output_ports.with_output_buffers([AudioPortBuffer {
                latency: 0,
                channels: AudioPortBufferType::f32_output_only(
                    [&mut out_l[..len_usize], &mut out_r[..len_usize]].into_iter(),
                ),
            }]);
            (input_audio, output_audio)
        };
        let started = Instant::now();
        self.started
            .process(
                &input_audio,
                &mut output_audio,
                &self.in_events.as_input(),
                &mut self.out_events.as_output(),
                Some(self.next_sample),
                transport_event.as_ref(),
            )
            .expect("process");
        if self.is_timing {
            self.process_times.push(started.elapsed());
        }
        let mut outputs = Vec::new();
        let mut last_time = 0;
        for event in self.out_events.iter() {
            let time = event.header().time();
            let sent = read_sent(event);
            assert!(time < len, "{sent:?} at {time} in a block of {len}");
            assert!(time >= last_time, "{sent:?} at {time} after an event at {last_time}");
            last_time = time;
            outputs.push(Output { sample: self.next_sample + u64::from(time), sent });
        }
        self.next_sample += len as u64;
        outputs
    }

    /// The host's `reset` on the audio thread: the plugin forgets what it was doing, as after
    /// a locate or a glitch; `next_sample` goes on.
    pub fn reset(&mut self) {
        self.started.reset();
    }
}

fn transport_event(t: &HostTransport) -> TransportEvent {
    let mut flags =
        TransportFlags::HAS_TEMPO | TransportFlags::HAS_BEATS_TIMELINE | TransportFlags::HAS_TIME_SIGNATURE;
    if t.is_playing {
        flags |= TransportFlags::IS_PLAYING;
    }
    if t.loop_beats.is_some() {
        flags |= TransportFlags::IS_LOOP_ACTIVE;
    }
    let (loop_start, loop_end) = t.loop_beats.unwrap_or((0.0, 0.0));
    let bar_beats = t.bar_beats();
    let bars = ((t.pos_beats - t.bar_origin_beats) / bar_beats + 1e-9).floor();
    let (numerator, denominator) = t.time_sig;
    TransportEvent {
        header: EventHeader::new_core(0, EventFlags::empty()),
        flags,
        song_pos_beats: BeatTime::from_float(t.pos_beats),
        song_pos_seconds: Default::default(),
        tempo: t.tempo_bpm,
        tempo_inc: 0.0,
        loop_start_beats: BeatTime::from_float(loop_start),
        loop_end_beats: BeatTime::from_float(loop_end),
        loop_start_seconds: Default::default(),
        loop_end_seconds: Default::default(),
        bar_start: BeatTime::from_float(t.bar_origin_beats + bars * bar_beats),
        bar_number: bars as i32,
        time_signature_numerator: numerator,
        time_signature_denominator: denominator,
    }
}

/// How the host's transport behaves during a take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TransportPlan {
    /// Playing from beat 0.
    Playing,
    /// Playing from beat 0, looping over `[start, end)` once the position reaches `end`.
    Looping { start_beats: f64, end_beats: f64 },
    /// Playing from beat 0 and stopping at this point of the take.
    StopsAt { beats: f64 },
    /// Stopped all along, with the host tempo given.
    Stopped,
    /// No transport information at all.
    Absent,
}

/// A scripted take: the notes a player plays and the knobs they turn, in beats of the take's
/// own continuous time (the transport may loop or stop; the take goes on).
#[derive(Clone, Debug)]
pub struct Take {
    pub tempo_bpm: f64,
    pub transport: TransportPlan,
    /// (key, start_beats, len_beats).
    pub notes: Vec<(u8, f64, f64)>,
    /// (at_beats, param id, CLAP value).
    pub params: Vec<(f64, u32, f64)>,
    pub end_beats: f64,
    /// Pace blocks at real time (for real-time mode runs).
    pub is_paced: bool,
    /// Pace by spinning rather than sleeping, for a thread that may make no system call.
    pub is_spin_paced: bool,
}

/// A note the plugin sent during a take, placed on the take's time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heard {
    pub beats: f64,
    pub is_on: bool,
    pub key: u8,
    pub channel: u8,
    pub velocity: f64,
}

impl Take {
    pub fn new(tempo_bpm: f64, notes: Vec<(u8, f64, f64)>, end_beats: f64) -> Self {
        Self {
            tempo_bpm,
            transport: TransportPlan::Playing,
            notes,
            params: Vec::new(),
            end_beats,
            is_paced: false,
            is_spin_paced: false,
        }
    }

    /// Plays the take through `processor` in blocks of `block_len` (the last block of each
    /// stretch may be shorter: blocks also end where the host loops or stops, as hosts do).
    pub fn perform(&self, processor: &mut Processor, block_len: u32) -> Vec<Heard> {
        let sample_rate_hz = processor.sample_rate_hz;
        let beats_per_sample = self.tempo_bpm / 60.0 / sample_rate_hz;
        let sample_of = |beats: f64| (beats / beats_per_sample).round() as u64;
        let mut inputs: Vec<(u64, Input)> = Vec::new();
        for &(key, start, len) in &self.notes {
            inputs.push((sample_of(start), Input::note_on(0, key, 0.8)));
            inputs.push((sample_of(start + len), Input::note_off(0, key)));
        }
        for &(at, id, value) in &self.params {
            inputs.push((sample_of(at), Input::Param { offset: 0, id, value }));
        }
        // Where blocks must end: loop ends, the stop.
        let mut cuts: Vec<u64> = Vec::new();
        match self.transport {
            TransportPlan::Looping { start_beats, end_beats } => {
                let (first, period) = (sample_of(end_beats), sample_of(end_beats) - sample_of(start_beats));
                let mut at = first;
                while at < sample_of(self.end_beats) {
                    cuts.push(at);
                    at += period;
                }
            }
            TransportPlan::StopsAt { beats } => cuts.push(sample_of(beats)),
            _ => {}
        }
        let first_sample = processor.next_sample;
        let end_sample = first_sample + sample_of(self.end_beats);
        let started = Instant::now();
        let mut heard = Vec::new();
        let mut sample = first_sample;
        while sample < end_sample {
            let take_sample = sample - first_sample;
            let mut len = (block_len as u64).min(end_sample - sample);
            if let Some(cut) = cuts.iter().find(|&&c| c > take_sample && c < take_sample + len) {
                len = cut - take_sample;
            }
            let take_beats = take_sample as f64 * beats_per_sample;
            let transport = match self.transport {
                TransportPlan::Playing => Some(HostTransport::common_time(true, self.tempo_bpm, take_beats)),
                TransportPlan::Looping { start_beats, end_beats } => {
                    let mut pos_samples = take_sample;
                    let (loop_start, loop_end) = (sample_of(start_beats), sample_of(end_beats));
                    if pos_samples >= loop_end {
                        pos_samples = loop_start + (pos_samples - loop_end) % (loop_end - loop_start);
                    }
                    Some(HostTransport {
                        loop_beats: Some((start_beats, end_beats)),
                        ..HostTransport::common_time(
                            true,
                            self.tempo_bpm,
                            pos_samples as f64 * beats_per_sample,
                        )
                    })
                }
                TransportPlan::StopsAt { beats } => Some(HostTransport::common_time(
                    take_beats < beats - beats_per_sample / 2.0,
                    self.tempo_bpm,
                    take_beats.min(beats),
                )),
                TransportPlan::Stopped => Some(HostTransport::common_time(false, self.tempo_bpm, 0.0)),
                TransportPlan::Absent => None,
            };
            let block_inputs: Vec<Input> = inputs
                .iter()
                .filter(|(s, _)| (take_sample..take_sample + len).contains(s))
                .map(|(s, input)| input.at((s - take_sample) as u32))
                .collect();
            let outputs = processor.process(len as u32, transport.as_ref(), &block_inputs);
            for note in outputs.iter().filter_map(Output::note) {
                heard.push(Heard {
                    beats: (note.sample - first_sample) as f64 * beats_per_sample,
                    is_on: note.is_on,
                    key: note.key,
                    channel: note.channel,
                    velocity: note.velocity,
                });
            }
            sample += len;
            if self.is_paced {
                let due = Duration::from_secs_f64((sample - first_sample) as f64 / sample_rate_hz);
                if self.is_spin_paced {
                    while started.elapsed() < due {
                        std::hint::spin_loop();
                    }
                } else if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        heard
    }
}

/// Checks that every note-on has its note-off, no key sounds twice at once on a channel, and
/// times never go back. Returns the notes as (key, channel, start_beats, end_beats).
pub fn assert_balanced(heard: &[Heard]) -> Vec<(u8, u8, f64, f64)> {
    let mut sounding: HashMap<(u8, u8), f64> = HashMap::new();
    let mut notes = Vec::new();
    let mut last_beats = f64::NEG_INFINITY;
    for h in heard {
        assert!(h.beats >= last_beats, "events out of order at {}", h.beats);
        last_beats = h.beats;
        if h.is_on {
            assert!(
                sounding.insert((h.key, h.channel), h.beats).is_none(),
                "key {} channel {} started twice (at {})",
                h.key,
                h.channel,
                h.beats
            );
        } else {
            let start = sounding
                .remove(&(h.key, h.channel))
                .unwrap_or_else(|| panic!("note-off without note-on: {h:?}"));
            notes.push((h.key, h.channel, start, h.beats));
        }
    }
    assert!(sounding.is_empty(), "stuck notes: {sounding:?}");
    notes.sort_by(|a, b| a.2.total_cmp(&b.2));
    notes
}

/// The notes heard on `channel`, as (key, start_beats, end_beats), in order.
pub fn notes_on(heard: &[Heard], channel: u8) -> Vec<(u8, f64, f64)> {
    let filtered: Vec<Heard> = heard.iter().copied().filter(|h| h.channel == channel).collect();
    assert_balanced(&filtered).into_iter().map(|(k, _, s, e)| (k, s, e)).collect()
}

/// Names of this process's threads.
pub fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
                names.push(name.trim().to_string());
            }
        }
    }
    names
}

pub use clack_host::events::Match;
