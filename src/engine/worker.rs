//! The worker thread's loop: takes requests, loads models, writes answers ahead of the playhead.
//! Runs on: worker. Allocates and logs freely; never blocks the audio thread (it only ever
//! polls the queues this thread fills).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nice_plug::prelude::{nice_log, nice_warn};

use live::link::WorkerLink;
use live::phrase::{
    AnswerChunk, AnswerEvent, AnswerEventKind, AnswerRequest, KeyLock, LiveShared, Phrase, Texture,
    LOOKAHEAD_BEATS, MAX_PHRASE_NOTES,
};
use model::SamplingSettings;
use music::bar::BarPhase;
use music::encode::StepGrid;
use music::key::{estimate_key, Key};
use music::{Frame, PianoRoll, PitchRules, PitchSet};

use super::view::{AnswerView, Variations};
use super::{
    Continuer, ContinuerFactory, DeviceChoice, EngineError, EngineState, EngineStatus, ModelSlot,
    ModelSource, Voicing,
};

/// How long the worker sleeps between looks at the playhead while an answer is ahead of it.
const AHEAD_POLL: Duration = Duration::from_millis(1);

/// How long the worker sleeps while the player is in a phrase: the most a request waits to be
/// seen, since nothing wakes the worker (the audio thread makes no system call).
const PHRASE_POLL: Duration = Duration::from_millis(1);

/// How long the worker sleeps when idle before it looks at the queue and the model choice again.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Steps of its own output a continuous answer keeps to start over from after the model ends
/// a piece.
const CONTINUOUS_HISTORY_STEPS: usize = 256;

/// Turns the steps of an answer, one at a time, into note starts and ends in beats from the
/// answer's start: a pitch struck, or sounding where it did not, starts a note; a pitch that
/// stops sounding, or is struck again, ends its note.
#[derive(Clone, Debug)]
pub struct NoteStream {
    step_beats: f64,
    len_steps: Option<u64>,
    num_steps: u64,
    sounding: PitchSet,
    is_finished: bool,
}

impl NoteStream {
    /// A stream on `grid` that ends after `len_beats` (never, for `None`).
    pub fn new(grid: StepGrid, len_beats: Option<f64>) -> Self {
        Self {
            step_beats: grid.step_beats(),
            len_steps: len_beats.map(|len| grid.nearest_steps(len) as u64),
            num_steps: 0,
            sounding: PitchSet::EMPTY,
            is_finished: false,
        }
    }

    /// Beats written so far: the next step starts here.
    pub fn written_until_beats(&self) -> f64 {
        self.num_steps as f64 * self.step_beats
    }

    /// Steps written so far.
    pub fn num_steps(&self) -> u64 {
        self.num_steps
    }

    /// Whether the answer is complete.
    pub fn is_finished(&self) -> bool {
        self.is_finished
    }

    /// Whether the answer reached its length: the next call should be [`NoteStream::finish`].
    pub fn is_full(&self) -> bool {
        self.len_steps.is_some_and(|len| self.num_steps >= len)
    }

    /// Takes the next step; `None` (the model ended the piece) ends every sounding note, and
    /// takes its step as a rest. Ends come before starts, and pitches ascend within each.
    pub fn push(&mut self, step: Option<Frame>, out: &mut impl FnMut(AnswerEvent)) {
        if self.is_finished {
            return;
        }
        let at_beats = self.written_until_beats();
        let Some(frame) = step else {
            self.end_all(at_beats, out);
            self.num_steps += 1;
            return;
        };
        let ends = self.sounding.difference(frame.sounding).union(self.sounding.intersection(frame.struck));
        for pitch in ends.iter() {
            out(AnswerEvent { at_beats, kind: AnswerEventKind::NoteOff { pitch } });
        }
        let starts =
            frame.struck.union(frame.sounding.difference(self.sounding)).intersection(frame.sounding);
        for pitch in starts.iter() {
            out(AnswerEvent { at_beats, kind: AnswerEventKind::NoteOn { pitch } });
        }
        self.sounding = frame.sounding;
        self.num_steps += 1;
    }

    /// Ends the answer where it stands (its length is reached, the model said so, or it failed).
    pub fn finish(&mut self, out: &mut impl FnMut(AnswerEvent)) {
        let at_beats = self.written_until_beats();
        self.end_all(at_beats, out);
        self.is_finished = true;
    }

    fn end_all(&mut self, at_beats: f64, out: &mut impl FnMut(AnswerEvent)) {
        for pitch in self.sounding.iter() {
            out(AnswerEvent { at_beats, kind: AnswerEventKind::NoteOff { pitch } });
        }
        self.sounding = PitchSet::EMPTY;
    }
}

/// The answer being written.
struct ActiveAnswer {
    id: u32,
    /// Which of the worker's continuers writes it.
    voicing: Voicing,
    stream: NoteStream,
    /// How the answer's steps are sampled (the temperature is set before every step).
    sampling: SamplingSettings,
    max_voices: usize,
    is_continuous: bool,
    seed: u64,
    num_restarts: u64,
    /// The steps written, for a continuous answer to start over from.
    history: Vec<Frame>,
    /// Where in the host's bar the next step to write lies, when the host gives its meter.
    next_bar: Option<BarPhase>,
    /// An earlier answer played again in place of the model's steps.
    replay: Option<Replay>,
    /// When the worker took the request, until the first note is written (a replay is not
    /// timed).
    asked_at: Option<Instant>,
}

/// The events of an earlier answer, sent again as the playhead nears them.
struct Replay {
    events: Vec<AnswerEvent>,
    next_idx: usize,
    /// Where the earlier answer's writing stood: the replay is finished there.
    end_beats: f64,
    written_until_beats: f64,
}

impl ActiveAnswer {
    /// How far the answer is written, in beats from its start.
    fn written_until_beats(&self) -> f64 {
        match &self.replay {
            Some(replay) => replay.written_until_beats,
            None => self.stream.written_until_beats(),
        }
    }
}

pub(super) struct Worker {
    factory: Arc<dyn ContinuerFactory>,
    model: Arc<ModelSlot>,
    live: Arc<LiveShared>,
    status: Arc<EngineStatus>,
    link: Arc<WorkerLink>,
    /// The chosen model (or the built-in one standing in for it).
    continuer: Option<Box<dyn Continuer>>,
    /// The built-in model of the other voicing, for a Texture the chosen model does not write.
    companion: Option<Box<dyn Continuer>>,
    /// `ModelSlot::version` of the model loaded (or tried).
    loaded_version: Option<u64>,
    /// Whether the continuer is the built-in model (chosen, or standing in for a model that
    /// could not be used).
    is_builtin_loaded: bool,
    /// The device asked for when the continuer was loaded.
    loaded_device: DeviceChoice,
    /// The model loaded, as the status line names it ("the built-in model").
    loaded_label: String,
    answer: Option<ActiveAnswer>,
    /// A chunk the audio thread's queue had no room for yet.
    outgoing: Option<AnswerChunk>,
    /// The answers to the last phrase, to show and to play again.
    variations: Variations,
}

impl Worker {
    pub(super) fn new(
        factory: Arc<dyn ContinuerFactory>,
        model: Arc<ModelSlot>,
        live: Arc<LiveShared>,
        status: Arc<EngineStatus>,
        link: Arc<WorkerLink>,
    ) -> Self {
        Self {
            factory,
            model,
            live,
            status,
            link,
            continuer: None,
            companion: None,
            loaded_version: None,
            is_builtin_loaded: false,
            loaded_device: DeviceChoice::Auto,
            loaded_label: String::new(),
            answer: None,
            outgoing: None,
            variations: Variations::default(),
        }
    }

    pub(super) fn run(mut self) {
        while !self.link.is_closed() {
            if self.loaded_version != Some(self.model.version()) {
                self.load_model();
            }
            // Take everything queued; of several phrases only the newest is answered.
            let mut newest = None;
            while let Some(request) = self.link.pop_request() {
                newest = Some(request);
            }
            if let Some(request) = newest {
                self.start_answer(request, Instant::now());
            }
            self.write_ahead();
            if !self.has_work_due() {
                let wait = if self.answer.is_some() {
                    AHEAD_POLL
                } else if self.live.is_phrase_open.load(Ordering::Relaxed) {
                    PHRASE_POLL
                } else {
                    IDLE_POLL
                };
                std::thread::park_timeout(wait);
            }
        }
    }

    /// Whether there is answer to write or a chunk to deliver now.
    fn has_work_due(&self) -> bool {
        if self.outgoing.is_some() {
            return true;
        }
        let Some(answer) = &self.answer else { return false };
        !answer.stream.is_finished()
            && (answer.stream.is_full() || answer.written_until_beats() < self.target_beats())
    }

    /// How far the answer should be written: a lookahead past the playhead, and the first
    /// lookahead at once, before the answer starts.
    fn target_beats(&self) -> f64 {
        self.live.playhead_beats.load(Ordering::Acquire).max(0.0) + LOOKAHEAD_BEATS
    }

    fn load_model(&mut self) {
        let version = self.model.version();
        let device = self.model.device();
        let is_reload = self.loaded_version.is_some();
        self.loaded_version = Some(version);
        let chosen = self.model.resolve().and_then(|choice| {
            choice
                .validate()
                .map_err(|reason| EngineError::BadChoice { choice: choice.describe(), reason })?;
            Ok(choice)
        });
        // The built-in model answers now and would after the change too (it is chosen, or stands
        // in for a choice that cannot be used): nothing is reloaded and the answer goes on.
        let is_builtin_kept = self.is_builtin_loaded
            && self.loaded_device == device
            && !matches!(chosen, Ok(ModelSource::Dir(_)));
        if let (true, Some(continuer)) = (is_builtin_kept, &self.continuer) {
            let (state, label) = match chosen {
                Ok(choice) => (EngineState::Ready, choice.describe()),
                Err(err) => (EngineState::Fallback, builtin_stands_in(&err)),
            };
            self.status.set(state, placed(&label, &continuer.placement()));
            self.loaded_label = label;
            return;
        }
        self.loaded_device = device;
        self.answer = None;
        self.continuer = None;
        self.live.is_model_ready.store(false, Ordering::Release);
        self.live.is_model_loading.store(true, Ordering::Release);
        let what = match &chosen {
            Ok(choice) => choice.describe(),
            Err(_) => "the chosen model".to_string(),
        };
        self.status.set(EngineState::Loading, what);
        let loaded =
            chosen.and_then(|choice| self.factory.load(&choice, device).map(|continuer| (continuer, choice)));
        let outcome = match loaded {
            Ok((continuer, choice)) => {
                self.is_builtin_loaded = choice == ModelSource::Builtin;
                Ok((continuer, EngineState::Ready, choice.describe()))
            }
            // A model the user chose that does not load: say why, and answer with the built-in one.
            Err(err) => match self.factory.load(&ModelSource::Builtin, device) {
                Ok(continuer) => {
                    self.is_builtin_loaded = true;
                    Ok((continuer, EngineState::Fallback, builtin_stands_in(&err)))
                }
                Err(builtin_err) => Err(format!("{err}; the built-in model failed too: {builtin_err}")),
            },
        };
        match outcome {
            Ok((continuer, state, label)) => {
                let detail = placed(&label, &continuer.placement());
                nice_log!("Antiphon: {detail}");
                self.loaded_label = label;
                self.load_companion(continuer.voicing(), device);
                self.continuer = Some(continuer);
                self.live.is_model_ready.store(true, Ordering::Release);
                self.status.set(state, detail);
            }
            Err(detail) => {
                self.is_builtin_loaded = false;
                nice_warn!("Antiphon: {detail}; notes pass through unanswered");
                self.status.set(EngineState::Failed, detail);
            }
        }
        self.live.is_model_loading.store(false, Ordering::Release);
        if is_reload {
            // Whatever the audio thread plays from the previous model ends now.
            self.live.model_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Says in the status line where the chosen model runs now: a GPU that failed a step
    /// hands its model to the CPU.
    fn show_placement(&self) {
        let Some(continuer) = &self.continuer else { return };
        let detail = placed(&self.loaded_label, &continuer.placement());
        if self.status.detail() != detail {
            self.status.set(self.status.state(), detail);
        }
    }

    /// Loads the built-in model of the voicing the chosen model lacks (kept when it is loaded
    /// already). Without it, every answer comes from the chosen model.
    fn load_companion(&mut self, chosen: Voicing, device: DeviceChoice) {
        let wanted = match chosen {
            Voicing::Melody => Voicing::Chords,
            Voicing::Chords => Voicing::Melody,
        };
        if self.companion.as_ref().is_some_and(|c| c.voicing() == wanted) {
            return;
        }
        let loaded = match wanted {
            Voicing::Chords => self.factory.load_builtin_chords(),
            Voicing::Melody => self.factory.load(&ModelSource::Builtin, device),
        };
        self.companion = match loaded {
            Ok(companion) => Some(companion),
            Err(err) => {
                nice_warn!("Antiphon: {err}; the chosen model answers every phrase");
                None
            }
        };
    }

    /// Starts answering `request`, taken from the queue at `taken_at`.
    fn start_answer(&mut self, request: AnswerRequest, taken_at: Instant) {
        self.answer = None;
        if self.live.active_answer_id.load(Ordering::Acquire) != request.answer_id {
            return; // Already cancelled or replaced.
        }
        let wanted = match request.settings.texture {
            Texture::Melody => Voicing::Melody,
            Texture::Chords => Voicing::Chords,
            Texture::Auto if request.phrase.has_chords() => Voicing::Chords,
            Texture::Auto => Voicing::Melody,
        };
        let is_builtin = self.is_builtin_loaded;
        let chosen_voicing = self.continuer.as_ref().map(|c| c.voicing());
        let Some(continuer) = pick(&mut self.continuer, &mut self.companion, wanted) else { return };
        match begin_answer(continuer, &request) {
            Ok((mut answer, key)) => {
                let voicing = answer.voicing;
                let model = match (voicing, chosen_voicing == Some(voicing) && !is_builtin) {
                    (_, true) => self.status.detail(),
                    (Voicing::Melody, false) => "the built-in melody model".to_string(),
                    (Voicing::Chords, false) => "the built-in chord model".to_string(),
                };
                let replayed = (request.replay_of != 0)
                    .then(|| self.variations.replay(&request.phrase, request.replay_of))
                    .flatten();
                match replayed {
                    Some((events, end_beats)) => {
                        answer.replay =
                            Some(Replay { events, next_idx: 0, end_beats, written_until_beats: 0.0 });
                    }
                    None => {
                        let view = AnswerView {
                            answer_id: request.answer_id,
                            notes: Vec::new(),
                            written_until_beats: 0.0,
                            is_finished: false,
                            voicing,
                            model,
                            key,
                            heard_key: estimate_key(&request.phrase.notes),
                            seed: request.seed,
                            first_note_ms: None,
                        };
                        self.variations.begin(&request.phrase, view);
                        answer.asked_at = Some(taken_at);
                    }
                }
                self.status.shown.set(self.variations.shown());
                self.answer = Some(answer);
            }
            Err(err) => {
                nice_warn!("Antiphon: no answer: {err}");
                // Tell the audio thread there is nothing to wait for.
                let mut chunk = empty_chunk(request.answer_id);
                chunk.is_finished = true;
                self.outgoing = Some(chunk);
            }
        }
    }

    /// Writes the answer up to the target and sends what was written.
    fn write_ahead(&mut self) {
        if let Some(chunk) = self.outgoing.take() {
            if let Err(chunk) = self.link.push_chunk(chunk) {
                self.outgoing = Some(chunk);
                return;
            }
        }
        let target_beats = self.target_beats();
        let active_id = self.live.active_answer_id.load(Ordering::Acquire);
        let Some(answer) = self.answer.as_mut() else { return };
        let Some(continuer) = pick(&mut self.continuer, &mut self.companion, answer.voicing) else { return };
        if answer.id != active_id {
            self.answer = None;
            return;
        }
        if answer.stream.is_finished() {
            return;
        }
        let mut chunk = empty_chunk(answer.id);
        let written_before_beats = answer.written_until_beats();
        let mut is_cut_short = false;
        if let Some(replay) = &mut answer.replay {
            while let Some(event) = replay.events.get(replay.next_idx) {
                if event.at_beats >= target_beats || chunk.events.is_full() {
                    break;
                }
                chunk.events.push(*event);
                replay.next_idx += 1;
            }
            let is_done = replay.next_idx == replay.events.len();
            replay.written_until_beats = match replay.events.get(replay.next_idx) {
                Some(next) => next.at_beats.min(target_beats),
                None => replay.end_beats,
            };
            if is_done && replay.end_beats <= target_beats {
                answer.stream.finish(&mut |_| {});
            }
            chunk.written_until_beats = replay.written_until_beats;
            chunk.is_finished = answer.stream.is_finished();
        } else {
            let failure = write_steps(answer, continuer, &self.live, &mut chunk, target_beats);
            if let Some(err) = &failure {
                nice_warn!("Antiphon: answer cut short: {err}");
                is_cut_short = true;
            }
            self.variations.record(&chunk.events, chunk.written_until_beats, chunk.is_finished);
            let has_note = chunk.events.iter().any(|e| matches!(e.kind, AnswerEventKind::NoteOn { .. }));
            if let Some(asked_at) = answer.asked_at.filter(|_| has_note) {
                answer.asked_at = None;
                self.variations.set_first_note_ms(asked_at.elapsed().as_secs_f64() * 1e3);
            }
        }
        if is_cut_short {
            self.show_placement();
        }
        if chunk.events.is_empty() && !chunk.is_finished && chunk.written_until_beats == written_before_beats
        {
            return;
        }
        self.status.shown.set(self.variations.shown());
        if let Err(chunk) = self.link.push_chunk(chunk) {
            self.outgoing = Some(chunk);
        }
    }
}

/// Writes the model's steps of `answer` into `chunk` up to `target_beats` (or as far as the
/// chunk has room), and sets how far it is written. Returns the model's failure, which ends
/// the answer.
fn write_steps(
    answer: &mut ActiveAnswer,
    continuer: &mut dyn Continuer,
    live: &LiveShared,
    chunk: &mut AnswerChunk,
    target_beats: f64,
) -> Option<EngineError> {
    let mut failure = None;
    let grid = continuer.grid();
    // Room for the events one step can make (an end and a start per voice). A full answer
    // is finished at once, target or not, so its last notes' ends are known before the
    // answer's end is reached.
    let room = 2 * answer.max_voices.max(1);
    while chunk.events.remaining_capacity() >= room
        && (answer.stream.is_full() || answer.stream.written_until_beats() < target_beats)
    {
        let mut push = |event| chunk.events.push(event);
        if answer.stream.is_full() {
            answer.stream.finish(&mut push);
            break;
        }
        answer.sampling.temperature = live.temperature.load(Ordering::Relaxed);
        let step = match continuer.next_step(&answer.sampling, answer.max_voices) {
            Ok(step) => step,
            Err(err) => {
                answer.stream.finish(&mut push);
                failure = Some(err);
                break;
            }
        };
        answer.stream.push(step, &mut push);
        answer.next_bar = answer.next_bar.map(|b| b.shifted(1, grid));
        let Some(frame) = step else {
            if !answer.is_continuous {
                answer.stream.finish(&mut push);
                break;
            }
            // Continuous: start over from its own recent output, with a seed of its own.
            answer.num_restarts += 1;
            let tail = &answer.history[answer.history.len().saturating_sub(CONTINUOUS_HISTORY_STEPS)..];
            let primer = phrase_of(tail, grid);
            // The new primer is played as if it ended where the next step starts.
            let bar = answer.next_bar.map(|b| b.shifted(-(tail.len() as i64), grid));
            if let Err(err) = continuer.begin(&primer, bar, answer.seed.wrapping_add(answer.num_restarts)) {
                answer.stream.finish(&mut push);
                failure = Some(err);
                break;
            }
            continue;
        };
        if answer.is_continuous {
            answer.history.push(frame);
            if answer.history.len() > 2 * CONTINUOUS_HISTORY_STEPS {
                answer.history.drain(..answer.history.len() - CONTINUOUS_HISTORY_STEPS);
            }
        }
    }
    chunk.written_until_beats = answer.stream.written_until_beats();
    chunk.is_finished = answer.stream.is_finished();
    failure
}

/// The status line's detail: the model and where it runs.
fn placed(label: &str, placement: &str) -> String {
    format!("{label}, on the {placement}")
}

/// The status (and the log's warning) when the built-in model answers for a choice that could
/// not be used.
fn builtin_stands_in(err: &EngineError) -> String {
    nice_warn!("Antiphon: {err}; the built-in model answers instead");
    format!("{err}; the built-in model answers instead")
}

fn empty_chunk(answer_id: u32) -> AnswerChunk {
    AnswerChunk { answer_id, events: Default::default(), written_until_beats: 0.0, is_finished: false }
}

/// The continuer of `voicing`: the chosen model's, else its companion's, else the chosen one.
fn pick<'a>(
    continuer: &'a mut Option<Box<dyn Continuer>>,
    companion: &'a mut Option<Box<dyn Continuer>>,
    voicing: Voicing,
) -> Option<&'a mut (dyn Continuer + 'static)> {
    let chosen_fits = continuer.as_ref().is_some_and(|c| c.voicing() == voicing);
    let companion_fits = companion.as_ref().is_some_and(|c| c.voicing() == voicing);
    if !chosen_fits && companion_fits {
        return companion.as_mut().map(|c| c.as_mut());
    }
    match continuer {
        Some(c) => Some(c.as_mut()),
        None => companion.as_mut().map(|c| c.as_mut()),
    }
}

/// The steps of `frames` on `grid` as a phrase ending after the last of them (its latest notes,
/// when they are more than a phrase holds).
fn phrase_of(frames: &[Frame], grid: StepGrid) -> Phrase {
    let notes = PianoRoll { frames: frames.to_vec() }.to_notes(grid, music::note::DEFAULT_VELOCITY);
    let mut phrase = Phrase::empty(4.0);
    phrase.len_beats = frames.len() as f64 * grid.step_beats();
    phrase.notes.extend(notes[notes.len().saturating_sub(MAX_PHRASE_NOTES)..].iter().copied());
    phrase
}

/// Starts the continuer on the request's phrase and sets up the answer's stream; also gives
/// the key the answer keeps to.
fn begin_answer(
    continuer: &mut dyn Continuer,
    request: &AnswerRequest,
) -> Result<(ActiveAnswer, Option<Key>), EngineError> {
    let grid = continuer.grid();
    let settings = &request.settings;
    let key = match settings.key_lock {
        KeyLock::Off => None,
        KeyLock::FollowPhrase => estimate_key(&request.phrase.notes),
        KeyLock::Fixed(key) => Some(key),
    };
    let is_continuous = settings.len_beats.is_none();
    let sampling = SamplingSettings {
        pitches: PitchRules::new(settings.lowest_pitch, settings.highest_pitch, key),
        may_end: is_continuous,
        ..SamplingSettings::default()
    };
    let bar = request.phrase.meter.map(BarPhase::downbeat);
    continuer.begin(&request.phrase, bar, request.seed)?;
    let len_steps = grid.nearest_steps(request.phrase.len_beats) as i64;
    let max_voices = match continuer.voicing() {
        Voicing::Melody => 1,
        Voicing::Chords => settings.max_voices.max(1) as usize,
    };
    let answer = ActiveAnswer {
        next_bar: bar.map(|b| b.shifted(len_steps, grid)),
        id: request.answer_id,
        voicing: continuer.voicing(),
        stream: NoteStream::new(grid, settings.len_beats),
        sampling,
        max_voices,
        is_continuous,
        seed: request.seed,
        num_restarts: 0,
        history: if is_continuous {
            heard_frames(&request.phrase, continuer.voicing(), grid)
        } else {
            Vec::new()
        },
        replay: None,
        asked_at: None,
    };
    Ok((answer, key))
}

/// The phrase as the continuer hears it, a frame per step: every voice for chords, the top
/// voice for a melody.
fn heard_frames(phrase: &Phrase, voicing: Voicing, grid: StepGrid) -> Vec<Frame> {
    let len_steps = grid.nearest_steps(phrase.len_beats) as usize;
    let heard = match voicing {
        Voicing::Melody => phrase.quantized(grid),
        Voicing::Chords => phrase.clone(),
    };
    PianoRoll::from_notes(&heard.notes, grid, Some(len_steps)).frames
}
