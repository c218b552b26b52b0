//! Worker tests with a scripted continuer standing in for the model.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::timing::pop_chunk_within;
use super::*;
use live::link::WorkerLink;
use live::phrase::{
    AnswerEvent, AnswerEventKind, AnswerRequest, GenSettings, KeyLock, Phrase, Texture, LOOKAHEAD_BEATS,
};
use model::SamplingSettings;
use music::bar::BarPhase;
use music::encode::{encode, parse_symbols, EncodeConfig};
use music::note::Note;
use music::{Frame, Meter, PitchSet, Symbol};

/// What the scripted continuer was asked.
#[derive(Default)]
struct Log {
    /// Each begin's phrase as the melody encoding hears it, and its seed.
    begins: Vec<(Vec<Symbol>, u64)>,
    /// The bar phase of each begin's phrase.
    bars: Vec<Option<BarPhase>>,
    temperatures: Vec<f32>,
    /// The device each load of the built-in model asked for.
    devices: Vec<DeviceChoice>,
}

/// Plays a fixed script of melody symbols, over and over, and logs its calls.
struct Scripted {
    script: Vec<Symbol>,
    step_idx: usize,
    sounding: PitchSet,
    log: Arc<Mutex<Log>>,
    /// Where it says it runs.
    placement: String,
}

impl Continuer for Scripted {
    fn grid(&self) -> StepGrid {
        StepGrid::SIXTEENTHS
    }

    fn placement(&self) -> String {
        self.placement.clone()
    }

    fn voicing(&self) -> Voicing {
        Voicing::Melody
    }

    fn begin(&mut self, phrase: &Phrase, bar: Option<BarPhase>, seed: u64) -> Result<(), EngineError> {
        self.step_idx = 0;
        self.sounding = PitchSet::EMPTY;
        let melody = phrase.quantized(self.grid()).to_melody();
        let heard = encode(&melody, &EncodeConfig::any_on(self.grid()))?;
        let mut log = self.log.lock().unwrap();
        log.begins.push((heard, seed));
        log.bars.push(bar);
        Ok(())
    }

    fn next_step(
        &mut self,
        settings: &SamplingSettings,
        _max_voices: usize,
    ) -> Result<Option<Frame>, EngineError> {
        self.log.lock().unwrap().temperatures.push(settings.temperature);
        let symbol = self.script[self.step_idx % self.script.len()];
        self.step_idx += 1;
        let frame = match symbol {
            Symbol::Pitch(p) => Frame { sounding: PitchSet::of(&[p]), struck: PitchSet::of(&[p]) },
            Symbol::Hold => Frame { sounding: self.sounding, struck: PitchSet::EMPTY },
            Symbol::Rest => Frame::default(),
            Symbol::Delimiter => return Ok(None),
        };
        self.sounding = frame.sounding;
        Ok(Some(frame))
    }
}

/// Plays fixed chords, a frame per eighth, and logs the phrases it hears.
struct ScriptedChords {
    chords: Vec<Frame>,
    step_idx: usize,
    heard: Arc<Mutex<Vec<usize>>>,
}

impl Continuer for ScriptedChords {
    fn grid(&self) -> StepGrid {
        StepGrid { steps_per_quarter: 2 }
    }

    fn voicing(&self) -> Voicing {
        Voicing::Chords
    }

    fn begin(&mut self, phrase: &Phrase, _bar: Option<BarPhase>, _seed: u64) -> Result<(), EngineError> {
        self.step_idx = 0;
        self.heard.lock().unwrap().push(phrase.notes.len());
        Ok(())
    }

    fn next_step(
        &mut self,
        settings: &SamplingSettings,
        max_voices: usize,
    ) -> Result<Option<Frame>, EngineError> {
        let frame = self.chords[self.step_idx % self.chords.len()];
        self.step_idx += 1;
        // As a model does: the highest voices that the settings allow, at most `max_voices`.
        let allowed: Vec<u8> = frame.sounding.iter().filter(|&p| settings.pitches.allows(p)).collect();
        let kept = PitchSet::of(&allowed[allowed.len().saturating_sub(max_voices)..]);
        Ok(Some(Frame { sounding: kept, struck: frame.struck.intersection(kept) }))
    }
}

struct ScriptedFactory {
    script: Vec<Symbol>,
    log: Arc<Mutex<Log>>,
    /// Whether the built-in model fails to load as well.
    is_builtin_broken: bool,
    /// The built-in chord model's frames; `None` for a factory without one.
    chords: Option<Vec<Frame>>,
    heard_by_chords: Arc<Mutex<Vec<usize>>>,
}

impl ContinuerFactory for ScriptedFactory {
    fn load(&self, choice: &ModelSource, device: DeviceChoice) -> Result<Box<dyn Continuer>, EngineError> {
        if *choice == ModelSource::Builtin {
            self.log.lock().unwrap().devices.push(device);
        }
        match choice {
            ModelSource::Builtin if self.is_builtin_broken => {
                Err(EngineError::ModelLoad { choice: choice.describe(), reason: "also broken".into() })
            }
            ModelSource::Builtin => Ok(Box::new(Scripted {
                script: self.script.clone(),
                step_idx: 0,
                sounding: PitchSet::EMPTY,
                log: self.log.clone(),
                // As a build without GPU support places it.
                placement: match device {
                    DeviceChoice::Auto => "CPU".into(),
                    DeviceChoice::Cpu => "CPU (chosen)".into(),
                    DeviceChoice::Gpu => "CPU (no GPU: none in this test)".into(),
                },
            })),
            ModelSource::Dir(_) => {
                Err(EngineError::ModelLoad { choice: choice.describe(), reason: "broken on purpose".into() })
            }
        }
    }

    fn load_builtin_chords(&self) -> Result<Box<dyn Continuer>, EngineError> {
        match &self.chords {
            Some(chords) => Ok(Box::new(ScriptedChords {
                chords: chords.clone(),
                step_idx: 0,
                heard: self.heard_by_chords.clone(),
            })),
            None => {
                Err(EngineError::ModelLoad { choice: "chords".into(), reason: "none in this test".into() })
            }
        }
    }
}

struct Running {
    engine: Option<Engine>,
    link: Arc<WorkerLink>,
    live: Arc<LiveShared>,
    status: Arc<EngineStatus>,
    model: Arc<ModelSlot>,
    log: Arc<Mutex<Log>>,
    heard_by_chords: Arc<Mutex<Vec<usize>>>,
}

fn start(script: &str, choice: ModelSource) -> Running {
    start_with(script, Arc::new(ModelSlot::new(choice)), false)
}

fn start_with(script: &str, model: Arc<ModelSlot>, is_builtin_broken: bool) -> Running {
    start_full(script, model, is_builtin_broken, None)
}

fn start_full(
    script: &str,
    model: Arc<ModelSlot>,
    is_builtin_broken: bool,
    chords: Option<Vec<Frame>>,
) -> Running {
    let log = Arc::new(Mutex::new(Log::default()));
    let heard_by_chords = Arc::new(Mutex::new(Vec::new()));
    let script = parse_symbols(script).unwrap();
    let factory = Arc::new(ScriptedFactory {
        script,
        log: log.clone(),
        is_builtin_broken,
        chords,
        heard_by_chords: heard_by_chords.clone(),
    });
    let live = Arc::new(LiveShared::new());
    let status = Arc::new(EngineStatus::default());
    let (engine, link) = Engine::spawn(factory, model.clone(), live.clone(), status.clone()).unwrap();
    Running { engine: Some(engine), link, live, status, model, log, heard_by_chords }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn request(answer_id: u32, len_beats: Option<f64>) -> AnswerRequest {
    let mut phrase = Phrase::empty(4.0);
    phrase.len_beats = 4.0;
    phrase.notes.push(Note { pitch: 60, velocity: 90, start_beats: 0.02, len_beats: 0.98 });
    phrase.notes.push(Note { pitch: 64, velocity: 90, start_beats: 1.0, len_beats: 1.0 });
    AnswerRequest {
        answer_id,
        phrase,
        settings: GenSettings {
            texture: Texture::Auto,
            max_voices: 6,
            len_beats,
            key_lock: KeyLock::Off,
            lowest_pitch: 0,
            highest_pitch: 127,
        },
        seed: 99,
        replay_of: 0,
    }
}

impl Running {
    fn ask(&self, request: AnswerRequest) {
        self.live.active_answer_id.store(request.answer_id, Ordering::Release);
        self.live.playhead_beats.store(-2.0, Ordering::Release);
        self.link.push_request(request).unwrap();
    }

    /// Receives chunks until `until_beats` is written or the answer finishes.
    fn collect(&self, answer_id: u32, until_beats: f64) -> (Vec<AnswerEvent>, f64, bool) {
        let mut events = Vec::new();
        let (mut written, mut finished) = (0.0, false);
        let started = Instant::now();
        while written < until_beats && !finished {
            assert!(started.elapsed() < Duration::from_secs(5), "no chunk");
            if let Some(chunk) = pop_chunk_within(&self.link, Duration::from_millis(10)) {
                assert_eq!(chunk.answer_id, answer_id);
                assert!(chunk.written_until_beats >= written);
                events.extend(chunk.events.iter().copied());
                written = chunk.written_until_beats;
                finished = chunk.is_finished;
            }
        }
        (events, written, finished)
    }
}

fn on(at_beats: f64, pitch: u8) -> AnswerEvent {
    AnswerEvent { at_beats, kind: AnswerEventKind::NoteOn { pitch } }
}

fn off(at_beats: f64, pitch: u8) -> AnswerEvent {
    AnswerEvent { at_beats, kind: AnswerEventKind::NoteOff { pitch } }
}

#[test]
fn the_worker_streams_about_a_beat_ahead() {
    let w = start("67 _ 69 _ r _ 71 _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    assert_eq!(w.status.state(), EngineState::Ready);
    w.ask(request(1, Some(8.0)));
    let (events, written, _) = w.collect(1, LOOKAHEAD_BEATS);
    // The primer was the quantized phrase, from its bar line to its end.
    let primer = w.log.lock().unwrap().begins[0].clone();
    assert_eq!(primer, (parse_symbols("60 _ _ _ 64 _ _ _ r _ _ _ _ _ _ _").unwrap(), 99));
    assert_eq!(events, vec![on(0.0, 67), off(0.5, 67), on(0.5, 69)]);
    assert_eq!(written, 1.0);
    // It does not run further ahead than the lookahead.
    std::thread::sleep(Duration::from_millis(20));
    assert!(w.link.pop_chunk().is_none());
    // The playhead moves on, so does the answer.
    w.live.playhead_beats.store(1.0, Ordering::Release);
    let (events, written, _) = w.collect(1, 2.0);
    assert_eq!(events, vec![off(1.0, 69), on(1.5, 71)]);
    assert_eq!(written, 2.0);
}

#[test]
fn the_answer_ends_at_its_length() {
    let w = start("67 _ _ _ _ _ _ _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    w.ask(request(3, Some(3.0)));
    w.live.playhead_beats.store(10.0, Ordering::Release);
    let (events, written, finished) = w.collect(3, 100.0);
    assert!(finished);
    assert_eq!(written, 3.0);
    assert_eq!(events, vec![on(0.0, 67), off(2.0, 67), on(2.0, 67), off(3.0, 67)]);
    // Without the host's meter the primer has no bar phase.
    assert_eq!(w.log.lock().unwrap().bars, vec![None]);
}

#[test]
fn a_full_answer_ends_its_last_note_without_waiting_for_the_playhead() {
    let w = start("67 _ _ _ _ _ _ _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    // One beat long: exactly the first lookahead, with the playhead still before the start.
    w.ask(request(4, Some(1.0)));
    let (events, written, finished) = w.collect(4, 100.0);
    assert!(finished);
    assert_eq!(written, 1.0);
    assert_eq!(events, vec![on(0.0, 67), off(1.0, 67)]);
}

#[test]
fn the_temperature_is_read_before_every_step() {
    let w = start("60 _ _ _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    w.live.temperature.store(0.5, Ordering::Relaxed);
    w.ask(request(1, None));
    w.collect(1, LOOKAHEAD_BEATS);
    w.live.temperature.store(1.5, Ordering::Relaxed);
    w.live.playhead_beats.store(1.0, Ordering::Release);
    w.collect(1, 2.0);
    let temperatures = w.log.lock().unwrap().temperatures.clone();
    // Four steps a beat: four at 0.5, then four at 1.5.
    assert_eq!(temperatures, vec![0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5]);
}

#[test]
fn a_cancelled_answer_stops_and_a_new_request_replaces_it() {
    let w = start("60 _ 62 _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    w.ask(request(1, None));
    w.collect(1, LOOKAHEAD_BEATS);
    w.live.active_answer_id.store(0, Ordering::Release);
    w.live.playhead_beats.store(5.0, Ordering::Release);
    std::thread::sleep(Duration::from_millis(20));
    assert!(w.link.pop_chunk().is_none(), "a cancelled answer goes on");
    w.ask(request(2, Some(4.0)));
    let (events, _, _) = w.collect(2, LOOKAHEAD_BEATS);
    assert_eq!(events[0], on(0.0, 60));
}

#[test]
fn continuous_answers_start_over_after_a_delimiter() {
    let w = start("60 _ / 62 _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    let mut asked = request(1, None);
    asked.phrase.meter = Some(Meter::COMMON);
    w.ask(asked);
    w.live.playhead_beats.store(1.0, Ordering::Release);
    let (events, _, finished) = w.collect(1, 2.0);
    assert!(!finished);
    assert_eq!(&events[..3], &[on(0.0, 60), off(0.5, 60), on(0.75, 60)]);
    let log = w.log.lock().unwrap();
    assert!(log.begins.len() >= 2);
    // It starts over from its primer and its own output, with a seed of its own.
    let (restart, seed) = &log.begins[1];
    assert_eq!(&restart[restart.len() - 2..], &parse_symbols("60 _").unwrap()[..]);
    assert_eq!(*seed, 100);
    // The phrase starts on a downbeat of the host's meter. The new primer (the phrase's 16
    // steps and "60 _") is read as ending where the next step starts, the 20th ("60 _ /" were
    // written), so it starts one step into a bar.
    assert_eq!(log.bars[0], Some(BarPhase::downbeat(Meter::COMMON)));
    assert_eq!(restart.len(), 18);
    assert_eq!(log.bars[1], Some(BarPhase { meter: Meter::COMMON, step_in_bar: 1 }));
}

#[test]
fn a_delimiter_ends_a_fixed_length_answer() {
    let w = start("60 _ / 62 _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    w.ask(request(1, Some(8.0)));
    let (events, written, finished) = w.collect(1, 100.0);
    assert!(finished);
    assert_eq!(written, 0.75);
    assert_eq!(events, vec![on(0.0, 60), off(0.5, 60)]);
}

#[test]
fn a_broken_model_is_reported_and_the_builtin_one_answers() {
    let mut w = start("60", ModelSource::Dir("/models/broken".into()));
    wait_until("the fallback", || w.status.state() == EngineState::Fallback);
    let detail = w.status.detail();
    assert!(detail.contains("/models/broken") && detail.contains("broken on purpose"), "{detail}");
    assert!(detail.contains("built-in model answers instead"), "{detail}");
    assert!(w.live.is_model_ready.load(Ordering::Acquire));
    w.ask(request(1, Some(1.0)));
    let (events, _, _) = w.collect(1, 1.0);
    assert_eq!(events.first(), Some(&on(0.0, 60)));
    // Choosing the built-in model outright clears the complaint; the model answering is the
    // same, so nothing is reloaded and the audio thread's answer is not cut.
    let epoch = w.live.model_epoch.load(Ordering::Acquire);
    w.model.set(ModelSource::Builtin);
    wait_until("the status", || w.status.state() == EngineState::Ready);
    assert_eq!(w.live.model_epoch.load(Ordering::Acquire), epoch);
    assert_eq!(w.log.lock().unwrap().begins.len(), 1, "the answer was started again");
    w.engine.take().unwrap().shutdown();
    assert_eq!(w.status.state(), EngineState::Stopped);
}

#[test]
fn the_device_parameter_reloads_the_model_and_the_status_says_where_it_runs() {
    let w = start("60", ModelSource::Builtin);
    wait_until("the model", || w.status.state() == EngineState::Ready);
    assert_eq!(w.status.detail(), "the built-in model, on the CPU");
    let epoch = w.live.model_epoch.load(Ordering::Acquire);
    w.model.set_device(DeviceChoice::Gpu);
    wait_until("the reload", || w.status.detail().contains("no GPU"));
    assert_eq!(w.status.detail(), "the built-in model, on the CPU (no GPU: none in this test)");
    assert_eq!(w.status.state(), EngineState::Ready);
    assert!(w.live.model_epoch.load(Ordering::Acquire) > epoch, "what played from the old load ends");
    // The same device again loads nothing.
    w.model.set_device(DeviceChoice::Gpu);
    std::thread::sleep(Duration::from_millis(50));
    let devices = w.log.lock().unwrap().devices.clone();
    assert_eq!(devices, [DeviceChoice::Auto, DeviceChoice::Gpu]);
}

#[test]
fn with_no_model_at_all_the_worker_survives_and_notes_pass() {
    let model = Arc::new(ModelSlot::new(ModelSource::Dir("/models/broken".into())));
    let w = start_with("60", model, true);
    wait_until("the failure", || w.status.state() == EngineState::Failed);
    assert!(w.status.detail().contains("also broken"), "{}", w.status.detail());
    assert!(!w.live.is_model_ready.load(Ordering::Acquire));
    // A request now is ignored, not answered.
    w.ask(request(1, Some(4.0)));
    std::thread::sleep(Duration::from_millis(20));
    assert!(w.link.pop_chunk().is_none());
}

#[test]
fn the_model_parameter_picks_from_the_models_folder() {
    let folder = tempfile::tempdir().unwrap();
    for name in ["airs", "reels"] {
        let dir = folder.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "").unwrap();
    }
    let model = Arc::new(ModelSlot::with_library_folder(ModelSource::Builtin, folder.path().to_path_buf()));
    assert_eq!(model.slot_name(0), "Built-in");
    assert_eq!(model.slot_name(2), "reels");
    assert_eq!(model.slot_name(3), "3 (empty)");
    assert_eq!(model.slot_for_name("Reels"), Some(2));
    assert_eq!(model.slot_for_name("built-in"), Some(0));
    let w = start_with("60", model.clone(), false);
    wait_until("the built-in model", || w.status.state() == EngineState::Ready);
    // The scripted factory refuses every directory, so picking one shows in the fallback's
    // reason, which names the folder's model.
    let epoch = w.live.model_epoch.load(Ordering::Acquire);
    model.set_library_slot(2);
    wait_until("the folder's model", || w.status.state() == EngineState::Fallback);
    assert!(w.status.detail().contains("reels"), "{}", w.status.detail());
    assert!(w.live.model_epoch.load(Ordering::Acquire) > epoch);
    // A value past the folder's models says what the folder holds.
    model.set_library_slot(5);
    wait_until("the complaint", || w.status.detail().contains("holds 2 models"));
    assert_eq!(w.status.state(), EngineState::Fallback);
    // Back to 0: the saved choice, the built-in model.
    model.set_library_slot(0);
    wait_until("the built-in model again", || w.status.state() == EngineState::Ready);
}

#[test]
fn dropping_the_engine_joins_the_worker() {
    let w = start("60", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    drop(w.engine);
    assert_eq!(w.status.state(), EngineState::Stopped);
    // The worker's ends are gone.
    assert!(pop_chunk_within(&w.link, Duration::from_millis(50)).is_none());
}

#[test]
fn note_streams_turn_steps_into_starts_and_ends() {
    let frame = |sounding: &[u8], struck: &[u8]| {
        Some(Frame { sounding: PitchSet::of(sounding), struck: PitchSet::of(struck) })
    };
    let mut stream = NoteStream::new(StepGrid { steps_per_quarter: 2 }, Some(3.0));
    let mut events = Vec::new();
    // A held note that starts the answer, a chord, one voice held and one struck again, a rest.
    let steps = [
        frame(&[62], &[]),
        frame(&[60, 64, 67], &[60, 64, 67]),
        frame(&[60, 64], &[64]),
        frame(&[], &[]),
        None,
        frame(&[72], &[72]),
    ];
    for step in steps {
        stream.push(step, &mut |e| events.push(e));
    }
    assert!(stream.is_full());
    stream.finish(&mut |e| events.push(e));
    assert_eq!(
        events,
        vec![
            on(0.0, 62),
            off(0.5, 62),
            on(0.5, 60),
            on(0.5, 64),
            on(0.5, 67),
            off(1.0, 64),
            off(1.0, 67),
            on(1.0, 64),
            off(1.5, 60),
            off(1.5, 64),
            on(2.5, 72),
            off(3.0, 72)
        ]
    );
    assert!(stream.is_finished());
}

#[test]
fn a_phrase_with_chords_gets_chords_and_a_melody_a_melody() {
    let c_major =
        Frame { sounding: PitchSet::of(&[48, 60, 64, 67, 72]), struck: PitchSet::of(&[48, 60, 64, 67, 72]) };
    let held = Frame { sounding: c_major.sounding, struck: PitchSet::EMPTY };
    let w = start_full(
        "67 _ _ _",
        Arc::new(ModelSlot::new(ModelSource::Builtin)),
        false,
        Some(vec![c_major, held]),
    );
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    let mut chords = request(1, Some(2.0));
    for pitch in [48, 52, 55] {
        chords.phrase.notes.push(Note { pitch, velocity: 90, start_beats: 0.0, len_beats: 2.0 });
    }
    chords.phrase.notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats));
    chords.settings.max_voices = 3;
    chords.settings.highest_pitch = 70;
    w.ask(chords);
    w.live.playhead_beats.store(10.0, Ordering::Release);
    let (events, _, finished) = w.collect(1, 100.0);
    assert!(finished);
    // The three highest allowed voices, struck together, held, and all let go at the end.
    assert_eq!(events[..3], [on(0.0, 60), on(0.0, 64), on(0.0, 67)]);
    let ons = events.iter().filter(|e| matches!(e.kind, AnswerEventKind::NoteOn { .. })).count();
    let offs = events.iter().filter(|e| matches!(e.kind, AnswerEventKind::NoteOff { .. })).count();
    assert_eq!((ons, offs), (6, 6), "{events:?}");
    assert_eq!(*w.heard_by_chords.lock().unwrap(), vec![5], "the chord model hears every note");
    // A melody gets the melody model.
    w.live.playhead_beats.store(-2.0, Ordering::Release);
    w.ask(request(2, Some(1.0)));
    w.live.playhead_beats.store(10.0, Ordering::Release);
    let (events, _, _) = w.collect(2, 100.0);
    assert_eq!(events, vec![on(0.0, 67), off(1.0, 67)]);
    // Texture Melody answers chords with a line.
    let mut forced = request(3, Some(1.0));
    forced.phrase.notes.push(Note { pitch: 48, velocity: 90, start_beats: 0.0, len_beats: 2.0 });
    forced.settings.texture = Texture::Melody;
    w.ask(forced);
    w.live.playhead_beats.store(10.0, Ordering::Release);
    let (events, _, _) = w.collect(3, 100.0);
    assert_eq!(events, vec![on(0.0, 67), off(1.0, 67)]);
}

#[test]
fn model_choices_validate_and_round_trip() {
    assert!(ModelSource::Builtin.validate().is_ok());
    assert!(ModelSource::Dir("".into()).validate().is_err());
    assert!(ModelSource::Dir("a\0b".into()).validate().is_err());
    let json = serde_json::to_string(&ModelSource::Dir("/m".into())).unwrap();
    assert_eq!(json, r#"{"directory":"/m"}"#);
    assert_eq!(serde_json::to_string(&ModelSource::Builtin).unwrap(), r#""builtin""#);
    assert_eq!(serde_json::from_str::<ModelSource>(&json).unwrap(), ModelSource::Dir("/m".into()));
}

#[test]
fn a_variation_replays_its_events_without_the_model_and_the_editor_sees_every_answer() {
    let w = start("67 _ 69 _ r _ 71 _", ModelSource::Builtin);
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    w.ask(request(1, Some(4.0)));
    w.live.playhead_beats.store(10.0, Ordering::Release);
    let (first, _, finished) = w.collect(1, 100.0);
    assert!(finished);
    let mut second_request = request(2, Some(4.0));
    second_request.seed = 100;
    w.ask(second_request);
    w.live.playhead_beats.store(10.0, Ordering::Release);
    w.collect(2, 100.0);
    let shown = w.status.shown();
    assert_eq!(shown.variations.iter().map(|v| v.answer_id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(shown.playing, Some(2));
    assert_eq!(shown.variations[1].seed, 100);
    // The editor's notes of the first answer are its events as notes.
    let view = &shown.variations[0];
    assert!(view.is_finished);
    let notes: Vec<(u8, f64, f64)> =
        view.notes.iter().map(|n| (n.pitch, n.start_beats, n.len_beats)).collect();
    assert_eq!(
        notes,
        vec![(67, 0.0, 0.5), (69, 0.5, 0.5), (71, 1.5, 0.5), (67, 2.0, 0.5), (69, 2.5, 0.5), (71, 3.5, 0.5)]
    );
    assert!(view.first_note_ms.is_some_and(|ms| ms >= 0.0));

    let steps_before = w.log.lock().unwrap().temperatures.len();
    let mut replay = request(3, Some(4.0));
    replay.seed = 7;
    replay.replay_of = 1;
    w.ask(replay);
    w.live.playhead_beats.store(10.0, Ordering::Release);
    let (again, _, finished) = w.collect(3, 100.0);
    assert!(finished);
    assert_eq!(again, first, "note for note");
    assert_eq!(w.log.lock().unwrap().temperatures.len(), steps_before, "the model wrote nothing");
    let shown = w.status.shown();
    assert_eq!(shown.playing, Some(1));
    assert_eq!(shown.variations.len(), 2, "a replay is not a new variation");

    // Another phrase forgets the answers to the old one.
    let mut other = request(4, Some(4.0));
    other.phrase.notes[0].pitch = 62;
    w.ask(other);
    w.live.playhead_beats.store(10.0, Ordering::Release);
    w.collect(4, 100.0);
    let shown = w.status.shown();
    assert_eq!(shown.variations.iter().map(|v| v.answer_id).collect::<Vec<_>>(), vec![4]);
    assert_eq!(shown.phrase.as_ref().unwrap().notes[0].pitch, 62);
}

#[test]
fn with_the_real_model_try_again_differs_and_a_variation_comes_back_note_for_note() {
    let live = Arc::new(LiveShared::new());
    let status = Arc::new(EngineStatus::default());
    let model = Arc::new(ModelSlot::new(ModelSource::Builtin));
    let factory = Arc::new(super::lstm::LstmFactory);
    let (engine, link) = Engine::spawn(factory, model, live.clone(), status.clone()).unwrap();
    let w = Running {
        engine: Some(engine),
        link,
        live,
        status,
        model: Arc::new(ModelSlot::new(ModelSource::Builtin)),
        log: Default::default(),
        heard_by_chords: Default::default(),
    };
    wait_until("the model", || w.live.is_model_ready.load(Ordering::Acquire));
    let answer = |request: AnswerRequest| {
        let id = request.answer_id;
        w.ask(request);
        w.live.playhead_beats.store(100.0, Ordering::Release);
        let (events, _, finished) = w.collect(id, 1000.0);
        assert!(finished);
        events
    };
    let first = answer(request(1, Some(8.0)));
    // Try Again: the same phrase from the seed the audio thread derives anew.
    let mut again = request(2, Some(8.0));
    again.seed = live::answer_seed(99, true, 2);
    let second = answer(again);
    assert!(first.iter().any(|e| matches!(e.kind, AnswerEventKind::NoteOn { .. })));
    assert_ne!(first, second, "a new seed writes another answer");
    let mut replay = request(3, Some(8.0));
    replay.replay_of = 1;
    replay.seed = 12345;
    assert_eq!(answer(replay), first, "the first answer again, note for note");
}
