//! The plugin's real-time side (the plugin's audio thread, with no candle and no model): captures the played phrase on the host's timeline, hands it to
//! the worker, and plays the answer the worker streams back, sample-accurately and without a
//! stuck note.
//! Runs on: audio thread (`Scheduler::start_block`, `note`, `end_block`, `reset`); main thread
//! (`new`, `configure`, `connect`, `disconnect`). No allocation, no locks, no logging, no candle:
//! everything is sized when the scheduler is built.
//!
//! A block is driven in time order: `start_block` reads the transport and takes what the worker
//! sent, `note` handles each incoming note at its sample (first playing everything due before
//! it), and `end_block` plays the rest of the block. Outgoing notes are handed to a callback in
//! non-decreasing sample order.

pub mod capture;
pub mod clock;
pub mod keys;
pub mod link;
pub mod phrase;
pub mod playback;
pub mod steer;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::keys::{HeldKeys, Holder, KeyChange, SoundingNotes};
use crate::link::WorkerLink;
use crate::phrase::{
    AnswerEventKind, AnswerRequest, GenSettings, KeyLock, LiveShared, Phrase, Texture, LOOKAHEAD_BEATS,
};
use crate::steer::{Stage, Steer};

pub use capture::{Capture, TriggerMode};
pub use clock::{BlockTime, Clock, ClockChange, HostTransport};
pub use playback::{Due, Playback};

/// An answer note due this far in the past, in beats, when it arrives still plays at once;
/// later than that it is dropped and counted.
pub const LATE_TOLERANCE_BEATS: f64 = 0.125;

/// Longest an offline render waits for the worker in one block. Offline, the host does not need
/// real time, so waiting makes a bounce come out the same as a live performance that kept up.
pub const MAX_OFFLINE_WAIT: Duration = Duration::from_secs(5);

/// Upper bound on timed actions handled between two incoming events; far above what a block
/// holds, it only guards against a loop that would not end.
const MAX_ACTIONS_PER_SPAN: usize = 1024;

/// Where an answer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerStart {
    /// On the first bar line at or after the end of the phrase.
    NextBar,
    /// On the first beat at or after the end of the phrase.
    NextBeat,
}

/// Where the answer's velocities come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VelocityMode {
    /// The mean velocity of the phrase.
    FromPhrase,
    /// The fixed velocity setting.
    Fixed,
}

/// The parameters as one block sees them. Built from the plugin's parameters every block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// The host bypasses the plugin: notes pass through untouched, nothing is captured or played.
    pub is_bypassed: bool,
    /// Incoming notes are passed on as well.
    pub is_thru: bool,
    /// Softmax temperature, handed to the worker live.
    pub temperature: f32,
    /// How a phrase ends.
    pub trigger: TriggerMode,
    /// Beats with every key up that end a phrase (`TriggerMode::Silence`).
    pub silence_beats: f64,
    /// Bars that make a phrase (`TriggerMode::Bars`).
    pub phrase_bars: u32,
    /// The "answer now" trigger; turning it on ends the phrase at once.
    pub is_answer_now: bool,
    /// Where the answer starts.
    pub answer_start: AnswerStart,
    /// Length of an answer in bars.
    pub answer_bars: u32,
    /// The answer stops when the player plays again.
    pub should_yield: bool,
    /// The answer goes on, extending itself, until it is stopped.
    pub is_continuous: bool,
    /// One line or chords.
    pub texture: Texture,
    /// Most notes a chord answer sounds at once.
    pub max_voices: u8,
    /// Scale constraint of the answer.
    pub key_lock: KeyLock,
    /// Lowest answer pitch, inclusive.
    pub lowest_pitch: u8,
    /// Highest answer pitch, inclusive.
    pub highest_pitch: u8,
    /// Where answer velocities come from.
    pub velocity_mode: VelocityMode,
    /// Fixed answer velocity, 1..=127.
    pub velocity: u8,
    /// Fraction of each written note length that sounds, 0.1..=1.
    pub gate: f64,
    /// MIDI channel of the answer, 0..=15.
    pub channel: u8,
    /// Seed of the sampler.
    pub seed: u32,
    /// Derive a new seed for every answer from `seed`.
    pub is_fresh_seed: bool,
    /// Tempo of the free-running clock when the host gives none, in quarter notes per minute.
    pub free_tempo_bpm: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            is_bypassed: false,
            is_thru: true,
            temperature: 1.0,
            trigger: TriggerMode::Silence,
            silence_beats: 1.0,
            phrase_bars: 2,
            is_answer_now: false,
            answer_start: AnswerStart::NextBar,
            answer_bars: 2,
            should_yield: true,
            is_continuous: false,
            texture: Texture::Auto,
            max_voices: 6,
            key_lock: KeyLock::Off,
            lowest_pitch: 48,
            highest_pitch: 84,
            velocity_mode: VelocityMode::FromPhrase,
            velocity: 100,
            gate: 1.0,
            channel: 0,
            seed: 1,
            is_fresh_seed: true,
            free_tempo_bpm: 120.0,
        }
    }
}

/// A note event, in or out, at a sample of the block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoteMsg {
    /// Sample offset in the block.
    pub timing: u32,
    /// Note-on (true) or note-off.
    pub is_on: bool,
    /// MIDI channel, 0..=15.
    pub channel: u8,
    /// MIDI key, 0..=127.
    pub key: u8,
    /// Velocity, 0..=1.
    pub velocity: f32,
    /// The host's note id, passed through with the note; `None` for the answer's own notes.
    pub voice_id: Option<i32>,
}

impl NoteMsg {
    /// A note-off at sample `timing` of the block, without a host note id.
    pub fn off(timing: u32, channel: u8, key: u8) -> Self {
        Self { timing, is_on: false, channel, key, velocity: 0.0, voice_id: None }
    }
}

/// The answer being played or waited for.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Answer {
    id: u32,
    /// Timeline position of the answer's beat 0.
    start_beats: f64,
    /// Timeline position where it ends; `None` in continuous mode.
    end_beats: Option<f64>,
    /// A bar line of the answer's grid, and its bar length.
    grid_origin_beats: f64,
    bar_beats: f64,
    /// Mean velocity of the phrase it answers.
    phrase_velocity: u8,
    /// Beats from the answer's start up to which the worker has written.
    written_until_beats: f64,
    is_finished: bool,
    /// Offline only: the worker once failed to keep up within `MAX_OFFLINE_WAIT`, so the render
    /// no longer waits for this answer (it takes what arrives, as a live take would).
    is_worker_stalled: bool,
}

/// The last phrase sent to the worker and where its answer was placed, so that the same phrase
/// can be answered again (the editor's Try Again and Variations).
#[derive(Clone, Debug)]
struct LastAsked {
    phrase: Phrase,
    answer: Answer,
}

/// A timed action inside a block, in the order actions at the same sample happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    NoteOff { sounding_idx: usize },
    AnswerEnd,
    PhraseEnd,
    NoteOn,
}

/// The audio thread's state. Build it (and `configure`, `connect` it) on the main thread.
pub struct Scheduler {
    live: Arc<LiveShared>,
    link: Option<Arc<WorkerLink>>,
    clock: Clock,
    capture: Capture,
    playback: Playback,
    answer: Option<Answer>,
    block: BlockTime,
    cursor_samples: u32,
    /// The player's keys as they come in (note-ons counted, duplicates told apart).
    held_keys: HeldKeys,
    /// What sounds at the output, passed through or answered: every note-on sent goes through
    /// it, so every one gets its note-off.
    output: SoundingNotes,
    /// Samples processed since the scheduler was built: the time base that tells one note sent
    /// in two dialects from a key struck twice.
    samples_elapsed: u64,
    /// Set by `reset`: everything sounding is released at the start of the next block.
    needs_release: bool,
    was_answer_now: bool,
    was_bypassed: bool,
    model_epoch_seen: u32,
    /// A request the worker's queue had no room for; a newer one replaces it.
    outbox: Option<AnswerRequest>,
    num_requests: u64,
    last_answer_id: u32,
    is_offline: bool,
    /// Kept from the last phrase end; a copy, so it never allocates.
    last_asked: Option<LastAsked>,
    /// The player played into the answer since the last phrase ended (the editor says so).
    has_yielded: bool,
}

impl Scheduler {
    /// A scheduler that shares `live` with its worker. Cheap: no thread, no model.
    pub fn new(live: Arc<LiveShared>) -> Self {
        let clock = Clock::new(44_100.0);
        let block = BlockTime {
            start_beats: 0.0,
            beats_per_sample: 1.0 / 22_050.0,
            len_samples: 0,
            tempo_bpm: 120.0,
            bar_beats: 4.0,
            meter: None,
            host_bar_origin_beats: None,
        };
        Self {
            live,
            link: None,
            clock,
            capture: Capture::new(),
            playback: Playback::default(),
            answer: None,
            block,
            cursor_samples: 0,
            held_keys: HeldKeys::default(),
            output: SoundingNotes::default(),
            samples_elapsed: 0,
            needs_release: false,
            was_answer_now: false,
            was_bypassed: false,
            model_epoch_seen: 0,
            outbox: None,
            num_requests: 0,
            last_answer_id: 0,
            is_offline: false,
            last_asked: None,
            has_yielded: false,
        }
    }

    /// Sets the sample rate and whether the host renders offline (where the audio thread may wait
    /// for the worker). Main thread, while not processing.
    pub fn configure(&mut self, sample_rate_hz: f32, is_offline: bool) {
        self.clock = Clock::new(sample_rate_hz);
        self.is_offline = is_offline;
    }

    /// Connects the worker's queues. Main thread, while not processing.
    pub fn connect(&mut self, link: Arc<WorkerLink>) {
        self.link = Some(link);
        self.model_epoch_seen = self.live.model_epoch.load(Ordering::Acquire);
    }

    /// Disconnects the worker's queues and hands them back so they are dropped off the audio
    /// thread. Main thread, while not processing.
    pub fn disconnect(&mut self) -> Option<Arc<WorkerLink>> {
        self.outbox = None;
        self.link.take()
    }

    /// Forgets the phrase, the answer and the transport. Notes that sound get their note-offs at
    /// the start of the next block, since `reset` itself cannot send events.
    pub fn reset(&mut self) {
        self.needs_release = true;
        self.capture.clear_all();
        self.held_keys.clear();
        self.clock.reset();
        self.last_asked = None;
        self.live.active_answer_id.store(0, Ordering::Release);
    }

    /// Whether an answer is being played or waited for.
    pub fn is_answering(&self) -> bool {
        self.answer.is_some()
    }

    /// Number of answer notes sounding now.
    pub fn num_sounding(&self) -> usize {
        self.playback.num_sounding()
    }

    /// Number of notes sounding at the output now, passed through or answered.
    pub fn num_sounding_out(&self) -> usize {
        self.output.num_sounding()
    }

    /// The current block on the timeline.
    pub fn block_time(&self) -> &BlockTime {
        &self.block
    }

    /// Starts a block of `len_samples` samples: advances the clock, handles transport changes,
    /// bypass, a model change and the "answer now" trigger, and takes the worker's chunks.
    pub fn start_block(
        &mut self,
        transport: &HostTransport,
        len_samples: u32,
        settings: &Settings,
        emit: &mut impl FnMut(NoteMsg),
    ) {
        let (block, change) = self.clock.advance(transport, len_samples, settings.free_tempo_bpm);
        self.block = block;
        self.cursor_samples = 0;
        self.live.temperature.store(settings.temperature, Ordering::Relaxed);

        if self.needs_release {
            self.needs_release = false;
            self.cancel_answer(0, emit);
            self.output.release_all(0, emit);
        }
        if matches!(change, ClockChange::Started | ClockChange::Stopped) {
            // The answer was promised on the old timeline; a new take starts listening afresh.
            self.cancel_answer(0, emit);
            self.capture.clear();
            self.last_asked = None;
        }
        let model_epoch = self.live.model_epoch.load(Ordering::Acquire);
        if model_epoch != self.model_epoch_seen {
            self.model_epoch_seen = model_epoch;
            self.cancel_answer(0, emit);
            self.capture.clear();
        }
        if settings.is_bypassed {
            if !self.was_bypassed {
                self.cancel_answer(0, emit);
                self.capture.clear();
            }
            self.was_bypassed = true;
            self.was_answer_now = settings.is_answer_now;
            return;
        }
        self.was_bypassed = false;

        self.flush_outbox();
        self.take_chunks();

        if settings.is_answer_now && !self.was_answer_now && self.answer.is_none() {
            self.end_phrase(self.block.start_beats, settings);
        }
        self.was_answer_now = settings.is_answer_now;
        match self.live.steer.take() {
            Some(Steer::AnswerNow) if self.answer.is_none() => {
                self.end_phrase(self.block.start_beats, settings)
            }
            Some(Steer::TryAgain) => self.ask_again(0, settings, emit),
            Some(Steer::Replay { answer_id }) => self.ask_again(answer_id, settings, emit),
            _ => {}
        }

        if let Some(answer) = &mut self.answer {
            if answer.end_beats.is_none() && !settings.is_continuous {
                // Continuous mode was turned off: finish at the next bar line.
                let at = self.block.start_beats.max(answer.start_beats);
                answer.end_beats =
                    Some(clock::next_grid_point(answer.grid_origin_beats, answer.bar_beats, at));
            }
        }
    }

    /// Handles an incoming note at its sample (which must not go back in time within the
    /// block), after everything due before it. A note-on sent again at the same sample (a host
    /// that sends both dialects) is one note; a note-off counts only when it ends the last
    /// note-on of its key (`keys`). `is_choke` ends the key at once, however often it was struck.
    pub fn note(
        &mut self,
        note: NoteMsg,
        is_choke: bool,
        settings: &Settings,
        emit: &mut impl FnMut(NoteMsg),
    ) {
        let timing = note.timing.min(self.block.len_samples.saturating_sub(1)).max(self.cursor_samples);
        self.advance_to(timing, settings, emit);
        let at_beats = self.block.beats_at(timing);
        let (key, channel) = (note.key.min(127), note.channel.min(15));
        let out = NoteMsg { timing, key, channel, ..note };
        if !note.is_on {
            let is_released = match is_choke {
                true => self.held_keys.release_all_of(channel, key),
                false => self.held_keys.release(channel, key) == KeyChange::Released,
            };
            if is_released {
                self.output.stop(Holder::Thru, out, emit);
                self.capture.note_off(at_beats, channel, key);
            }
            return;
        }
        if self.held_keys.press(channel, key, self.samples_elapsed + u64::from(timing))
            == KeyChange::Duplicate
        {
            return;
        }
        if settings.is_bypassed || settings.is_thru {
            self.output.start(Holder::Thru, out, emit);
        }
        if settings.is_bypassed {
            return;
        }
        if let Some(answer) = self.answer {
            if settings.should_yield {
                let is_pending = at_beats < answer.start_beats;
                self.cancel_answer(timing, emit);
                self.has_yielded = true;
                if is_pending && settings.trigger != TriggerMode::Bars {
                    // The player went on before the answer began: the phrase goes on too.
                    self.capture.unseal();
                } else {
                    self.capture.clear();
                }
            }
        }
        let velocity = (note.velocity.clamp(0.0, 1.0) * 127.0).round() as u8;
        self.capture.note_on(
            at_beats,
            channel,
            key,
            velocity,
            self.block.host_bar_origin_beats,
            self.block.bar_beats,
        );
    }

    /// The sustain pedal of `channel` (0..=15) went down or up at sample `timing`, after
    /// everything due before it. While it is down, keys let go still count as held for the
    /// Silence trigger, and the phrase hears their notes sound on until it lifts. The caller
    /// passes the controller itself on with the other controllers.
    pub fn sustain(
        &mut self,
        timing: u32,
        channel: u8,
        is_down: bool,
        settings: &Settings,
        emit: &mut impl FnMut(NoteMsg),
    ) {
        self.play_until(timing, settings, emit);
        if !settings.is_bypassed {
            let at_beats = self.block.beats_at(self.cursor_samples);
            self.capture.sustain(at_beats, channel.min(15), is_down);
        }
    }

    /// Handles everything due before `timing` (a sample of the block), so that an event the
    /// caller sends at `timing` stays in order.
    pub fn play_until(&mut self, timing: u32, settings: &Settings, emit: &mut impl FnMut(NoteMsg)) {
        let timing = timing.min(self.block.len_samples).max(self.cursor_samples);
        self.advance_to(timing, settings, emit);
    }

    /// Plays the rest of the block and tells the worker where the playhead is.
    pub fn end_block(&mut self, settings: &Settings, emit: &mut impl FnMut(NoteMsg)) {
        if !settings.is_bypassed {
            self.advance_to(self.block.len_samples, settings, emit);
        }
        self.cursor_samples = self.block.len_samples;
        self.samples_elapsed += u64::from(self.block.len_samples);
        self.publish_playhead(self.block.end_beats());
        let is_phrase_open =
            self.capture.is_any_key_down() || self.capture.has_notes() || self.answer.is_some();
        self.live.is_phrase_open.store(is_phrase_open, Ordering::Relaxed);
        self.live.steer.set_stage(self.stage(settings));
        self.live.steer.set_tempo_bpm(self.block.tempo_bpm);
    }

    /// What the scheduler is doing, as the editor shows it.
    fn stage(&self, settings: &Settings) -> Stage {
        match &self.answer {
            Some(answer) if answer.written_until_beats > 0.0 || answer.is_finished => Stage::Answering,
            Some(_) => Stage::Thinking,
            None if self.capture.has_notes()
                && !self.capture.is_any_key_down()
                && settings.trigger != TriggerMode::Manual =>
            {
                Stage::PhraseEnding
            }
            None if self.has_yielded => Stage::Yielded,
            None => Stage::Listening,
        }
    }

    /// Handles every timed action before `limit_samples`, in time order.
    fn advance_to(&mut self, limit_samples: u32, settings: &Settings, emit: &mut impl FnMut(NoteMsg)) {
        if settings.is_bypassed {
            self.cursor_samples = self.cursor_samples.max(limit_samples);
            return;
        }
        let min_len_beats = self.block.beats_per_sample;
        for _ in 0..MAX_ACTIONS_PER_SPAN {
            let limit_beats = self.block.beats_at(limit_samples);
            self.wait_for_worker(limit_beats);
            let mut next: Option<(u32, Action, f64)> = None;
            let mut consider = |at_beats: f64, action: Action| {
                if let Some(offset) = self.block.offset_of(at_beats) {
                    let offset = offset.max(self.cursor_samples);
                    if offset < limit_samples && next.is_none_or(|(o, a, _)| (offset, action) < (o, a)) {
                        next = Some((offset, action, at_beats));
                    }
                }
            };
            match &self.answer {
                None => {
                    if let Some(at) = self.capture.end_due_beats(
                        settings.trigger,
                        settings.silence_beats,
                        settings.phrase_bars,
                    ) {
                        consider(at, Action::PhraseEnd);
                    }
                }
                Some(answer) => {
                    if let Some(end) = answer.end_beats {
                        consider(end, Action::AnswerEnd);
                    }
                    if answer.is_finished && self.playback.is_idle() {
                        consider(self.block.beats_at(self.cursor_samples), Action::AnswerEnd);
                    }
                    match self.playback.next_due(settings.gate, min_len_beats) {
                        Some((at, Due::Off { sounding_idx })) => {
                            consider(at, Action::NoteOff { sounding_idx })
                        }
                        Some((at, Due::On)) => consider(at.max(answer.start_beats), Action::NoteOn),
                        None => {}
                    }
                }
            }
            let Some((offset, action, at_beats)) = next else { break };
            self.cursor_samples = offset;
            match action {
                Action::NoteOff { sounding_idx } => {
                    if let Some(note) = self.playback.end_sounding(sounding_idx) {
                        self.output.stop(Holder::Answer, NoteMsg::off(offset, note.channel, note.key), emit);
                    }
                }
                Action::AnswerEnd => {
                    self.cancel_answer(offset, emit);
                    self.capture.clear();
                }
                Action::PhraseEnd => self.end_phrase(at_beats, settings),
                Action::NoteOn => self.start_answer_note(offset, settings, emit),
            }
        }
        self.cursor_samples = self.cursor_samples.max(limit_samples);
    }

    fn start_answer_note(&mut self, offset: u32, settings: &Settings, emit: &mut impl FnMut(NoteMsg)) {
        let Some(answer) = self.answer else { return };
        let velocity = match settings.velocity_mode {
            VelocityMode::FromPhrase => answer.phrase_velocity,
            VelocityMode::Fixed => settings.velocity,
        };
        let at_beats = self.block.beats_at(offset);
        let channel = settings.channel.min(15);
        if let Some(note) = self.playback.start_next(channel, at_beats) {
            if let Some(idx) = self
                .playback
                .is_sounding(note.key, note.channel)
                .filter(|&i| i + 1 < self.playback.num_sounding())
            {
                // The same key still sounds (a gate rounding edge): end it first so on/off pair up.
                if let Some(old) = self.playback.end_sounding(idx) {
                    self.output.stop(Holder::Answer, NoteMsg::off(offset, old.channel, old.key), emit);
                }
            }
            let on = NoteMsg {
                timing: offset,
                is_on: true,
                channel: note.channel,
                key: note.key,
                velocity: velocity.clamp(1, 127) as f32 / 127.0,
                voice_id: None,
            };
            self.output.start(Holder::Answer, on, emit);
        } else {
            LiveShared::bump(&self.live.num_lost_events);
        }
    }

    /// Ends the phrase at `at_beats` and asks the worker for an answer.
    fn end_phrase(&mut self, at_beats: f64, settings: &Settings) {
        if self.is_offline && self.link.is_some() {
            // Offline, a model still loading is waited for (bounded), as a live player would
            // have waited before playing.
            let started = Instant::now();
            while self.live.is_model_loading.load(Ordering::Acquire) && started.elapsed() < MAX_OFFLINE_WAIT {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        if self.link.is_none() || !self.live.is_model_ready.load(Ordering::Acquire) {
            // No model: notes only pass through.
            self.capture.clear();
            return;
        }
        let bar_beats = self.capture.bar_beats().unwrap_or(self.block.bar_beats);
        let unit_beats = match settings.answer_start {
            AnswerStart::NextBar => bar_beats,
            AnswerStart::NextBeat => 1.0,
        };
        let (mut phrase, phrase_origin_beats) = self.capture.phrase_until(at_beats, unit_beats, bar_beats);
        phrase.meter = self.block.meter.filter(|m| m.bar_beats() == bar_beats);
        // An empty phrase ("answer now" before anything was played) answers on the host's grid.
        let grid_origin_beats = if self.capture.has_notes() {
            phrase_origin_beats
        } else {
            self.block.host_bar_origin_beats.unwrap_or(at_beats)
        };
        let start_beats = clock::next_grid_point(grid_origin_beats, unit_beats, at_beats);
        let phrase_velocity = phrase.mean_velocity().unwrap_or(settings.velocity);
        self.num_requests += 1;
        let seed = answer_seed(settings.seed, settings.is_fresh_seed, self.num_requests);
        self.ask(phrase, start_beats, grid_origin_beats, bar_beats, phrase_velocity, seed, 0, settings);
    }

    /// Answers the last phrase again in place of the answer playing or waiting: anew from a
    /// fresh seed, or, with `replay_of`, as the earlier answer with that id went. The new answer
    /// starts at the first point at or after now that lies whole bars from where the last one
    /// started, so it keeps its place in the bar. Nothing happens while the player is in a new
    /// phrase, or before any phrase was answered.
    fn ask_again(&mut self, replay_of: u32, settings: &Settings, emit: &mut impl FnMut(NoteMsg)) {
        let Some(last) = &self.last_asked else { return };
        if self.capture.has_notes() && !self.capture.is_sealed() {
            return;
        }
        let place = last.answer;
        let phrase = last.phrase.clone();
        self.cancel_answer(0, emit);
        let start_beats = clock::next_grid_point(place.start_beats, place.bar_beats, self.block.start_beats);
        self.num_requests += 1;
        let seed = answer_seed(settings.seed, true, self.num_requests);
        let (origin, bar_beats, velocity) = (place.grid_origin_beats, place.bar_beats, place.phrase_velocity);
        self.ask(phrase, start_beats, origin, bar_beats, velocity, seed, replay_of, settings);
    }

    /// Sends `phrase` to the worker for an answer that starts at `start_beats` on the timeline
    /// and waits for it.
    #[allow(clippy::too_many_arguments)]
    fn ask(
        &mut self,
        phrase: Phrase,
        start_beats: f64,
        grid_origin_beats: f64,
        bar_beats: f64,
        phrase_velocity: u8,
        seed: u64,
        replay_of: u32,
        settings: &Settings,
    ) {
        if self.link.is_none() || !self.live.is_model_ready.load(Ordering::Acquire) {
            self.capture.clear();
            return;
        }
        let len_beats = (!settings.is_continuous).then(|| settings.answer_bars.max(1) as f64 * bar_beats);
        self.last_answer_id = self.last_answer_id.wrapping_add(1).max(1);
        let answer = Answer {
            id: self.last_answer_id,
            start_beats,
            end_beats: len_beats.map(|len| start_beats + len),
            grid_origin_beats,
            bar_beats,
            phrase_velocity,
            written_until_beats: 0.0,
            is_finished: false,
            is_worker_stalled: false,
        };
        let (lowest_pitch, highest_pitch) = if settings.lowest_pitch <= settings.highest_pitch {
            (settings.lowest_pitch, settings.highest_pitch)
        } else {
            (settings.highest_pitch, settings.lowest_pitch)
        };
        let request = AnswerRequest {
            answer_id: answer.id,
            phrase,
            settings: GenSettings {
                texture: settings.texture,
                max_voices: settings.max_voices,
                len_beats,
                key_lock: settings.key_lock,
                lowest_pitch,
                highest_pitch,
            },
            seed,
            replay_of,
        };
        self.last_asked = Some(LastAsked { phrase: request.phrase.clone(), answer });
        self.has_yielded = false;
        self.answer = Some(answer);
        self.capture.seal();
        self.live.active_answer_id.store(answer.id, Ordering::Release);
        self.publish_playhead(self.block.end_beats());
        if self.outbox.take().is_some() {
            LiveShared::bump(&self.live.num_dropped_requests);
        }
        self.outbox = Some(request);
        self.flush_outbox();
    }

    /// Ends the answer now: every sounding answer note gets its note-off at `offset`.
    fn cancel_answer(&mut self, offset: u32, emit: &mut impl FnMut(NoteMsg)) {
        let output = &mut self.output;
        self.playback.release_all(|note| {
            output.stop(Holder::Answer, NoteMsg::off(offset, note.channel, note.key), emit)
        });
        if let Some(answer) = self.answer.take() {
            if matches!(&self.outbox, Some(r) if r.answer_id == answer.id) {
                // It never reached the worker.
                self.outbox = None;
                LiveShared::bump(&self.live.num_dropped_requests);
            }
        }
        self.live.active_answer_id.store(0, Ordering::Release);
    }

    fn publish_playhead(&self, at_beats: f64) {
        if let Some(answer) = &self.answer {
            self.live.playhead_beats.store(at_beats - answer.start_beats, Ordering::Release);
        }
    }

    fn flush_outbox(&mut self) {
        let (Some(link), Some(request)) = (&self.link, self.outbox.take()) else { return };
        if let Err(request) = link.push_request(request) {
            self.outbox = Some(request);
        }
    }

    /// Takes every chunk the worker has sent into the playback queue.
    fn take_chunks(&mut self) {
        let Some(link) = &self.link else { return };
        let now_beats = self.block.beats_at(self.cursor_samples);
        while let Some(chunk) = link.pop_chunk() {
            let Some(answer) = &mut self.answer else { continue };
            if chunk.answer_id != answer.id {
                continue;
            }
            for event in &chunk.events {
                let at_beats = answer.start_beats + event.at_beats;
                match event.kind {
                    AnswerEventKind::NoteOn { pitch } => {
                        match self.playback.push_on(pitch, at_beats, now_beats, LATE_TOLERANCE_BEATS) {
                            Ok(()) => {}
                            Err(playback::Refused::Late) => LiveShared::bump(&self.live.num_late_notes),
                            Err(playback::Refused::Full) => LiveShared::bump(&self.live.num_lost_events),
                        }
                    }
                    AnswerEventKind::NoteOff { pitch } => self.playback.push_off(pitch, at_beats),
                }
            }
            answer.written_until_beats = answer.written_until_beats.max(chunk.written_until_beats);
            answer.is_finished |= chunk.is_finished;
        }
    }

    /// Offline only: waits (bounded) until the worker has written the answer a lookahead past
    /// `until_beats` on the timeline, as far ahead as it keeps in real time, so a render comes
    /// out as a live take that kept up would. In real time nothing waits.
    fn wait_for_worker(&mut self, until_beats: f64) {
        let Some(answer) = self.answer else { return };
        if !self.is_offline || self.link.is_none() {
            return;
        }
        let until_answer_beats = until_beats - answer.start_beats;
        let mut needed_beats = until_answer_beats.max(0.0) + LOOKAHEAD_BEATS;
        if let Some(end) = answer.end_beats {
            needed_beats = needed_beats.min(end - answer.start_beats);
        }
        if answer.is_finished || answer.is_worker_stalled || answer.written_until_beats >= needed_beats {
            return;
        }
        self.live.playhead_beats.fetch_max(until_answer_beats, Ordering::AcqRel);
        let started = Instant::now();
        while started.elapsed() < MAX_OFFLINE_WAIT {
            self.flush_outbox();
            self.take_chunks();
            match &self.answer {
                Some(a) if !a.is_finished && a.written_until_beats < needed_beats => {}
                _ => return,
            }
            if self.live.model_epoch.load(Ordering::Acquire) != self.model_epoch_seen {
                // The model changed: the answer ends at the next block, nothing more comes.
                return;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        if let Some(answer) = &mut self.answer {
            answer.is_worker_stalled = true;
        }
    }
}

/// The seed of the answer to request number `num_requests`: the seed itself, or with
/// `is_fresh` a new one derived from it for every request (SplitMix64).
pub fn answer_seed(seed: u32, is_fresh: bool, num_requests: u64) -> u64 {
    if !is_fresh {
        return seed as u64;
    }
    let mut z = (seed as u64) ^ num_requests.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
