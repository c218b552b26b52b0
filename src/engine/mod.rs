//! The worker thread: one per plugin instance, it owns the model, takes phrases from the audio
//! thread and streams answers back a little ahead of the playhead.
//! Runs on: worker (the thread `Engine::spawn` starts); `Engine` itself, `ModelSlot::set` and
//! `EngineStatus` readers run on the main thread. Never on the audio thread: it allocates, logs
//! and loads files.
//!
//! The worker drives a [`Continuer`]: it hands it the captured phrase as notes and takes back
//! the answer one grid step at a time, as the pitches that sound and are struck at that step
//! (a `music::Frame`; one pitch at most for a melody model, several for a chord model).
//! Encoding the notes for the network is the continuer's business. The worker turns the steps
//! into note starts and ends in beats and sends them in fixed-capacity chunks.

pub mod chords;
pub mod library;
pub mod lstm;
pub mod timing;
pub mod view;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

pub use model::compute::DeviceChoice;
pub use model::io::ModelSource;
use model::SamplingSettings;

use live::link::WorkerLink;
use live::phrase::{LiveShared, Phrase};
use music::bar::BarPhase;
use music::encode::{Reject, StepGrid};
use music::Frame;

pub use library::{LibraryModel, ModelLibrary, MAX_LIBRARY_MODELS};
pub use view::{AnswerView, Shown};
pub use worker::NoteStream;

/// The model choice shared by the parameters (which save and restore it), the main thread (which
/// may change it) and the worker (which loads it).
///
/// Two things choose: the Model parameter, which names a model of the user's models folder
/// ([`ModelLibrary`]) or, at 0, defers to the saved choice, which is the built-in model unless a
/// project or script set a directory. The audio thread only stores the parameter's value (an
/// atomic store, through the parameter's callback); everything else here is for other threads.
#[derive(Debug, Default)]
pub struct ModelSlot {
    choice: Mutex<ModelSource>,
    /// Bumped on every change of `choice`, so the worker notices without taking the lock.
    epoch: AtomicU32,
    /// The Model parameter's value.
    library_slot: AtomicU32,
    /// The Device parameter's value, as [`DeviceChoice`] 0 Auto, 1 CPU, 2 GPU.
    device: AtomicU8,
    /// The models folder to list; `None` for the user's ([`library::user_models_folder`]).
    library_folder: Option<PathBuf>,
    /// The folder's models, read the first time they are needed.
    library: OnceLock<ModelLibrary>,
    /// The models-folder model a restored project picked by name, when the folder no longer
    /// holds it: the worker says so and the built-in model answers.
    missing_pick: Mutex<Option<String>>,
}

impl ModelSlot {
    /// A slot holding `choice`, with the user's models folder.
    pub fn new(choice: ModelSource) -> Self {
        Self { choice: Mutex::new(choice), ..Default::default() }
    }

    /// A slot holding `choice`, listing the models of `folder` instead of the user's.
    pub fn with_library_folder(choice: ModelSource, folder: PathBuf) -> Self {
        Self { choice: Mutex::new(choice), library_folder: Some(folder), ..Default::default() }
    }

    /// The saved choice, which the Model parameter's value 0 stands for.
    pub fn get(&self) -> ModelSource {
        self.choice.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the saved choice; a running worker loads it soon after if the Model parameter
    /// defers to it. Setting the same choice again changes nothing.
    pub fn set(&self, choice: ModelSource) {
        let mut current = self.choice.lock().unwrap_or_else(|e| e.into_inner());
        if *current != choice {
            *current = choice;
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Counts changes of the saved choice; compare two readings to see whether it changed.
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Takes the Model parameter's value. Real-time safe: one atomic store.
    pub fn set_library_slot(&self, slot: i32) {
        self.library_slot.store(slot.clamp(0, u16::MAX.into()) as u32, Ordering::Release);
    }

    /// The Model parameter's value as last stored.
    pub fn library_slot(&self) -> usize {
        self.library_slot.load(Ordering::Acquire) as usize
    }

    /// Takes the Device parameter's value. Real-time safe: one atomic store.
    pub fn set_device(&self, choice: DeviceChoice) {
        let value = match choice {
            DeviceChoice::Auto => 0,
            DeviceChoice::Cpu => 1,
            DeviceChoice::Gpu => 2,
        };
        self.device.store(value, Ordering::Release);
    }

    /// The Device parameter's value as last stored.
    pub fn device(&self) -> DeviceChoice {
        match self.device.load(Ordering::Acquire) {
            1 => DeviceChoice::Cpu,
            2 => DeviceChoice::Gpu,
            _ => DeviceChoice::Auto,
        }
    }

    /// Changes whenever the model to load, or where it runs, may have: the saved choice or
    /// the Model or Device parameter.
    pub fn version(&self) -> u64 {
        let device = u64::from(self.device.load(Ordering::Acquire));
        (u64::from(self.epoch()) << 32)
            | (device << 16)
            | u64::from(self.library_slot.load(Ordering::Acquire))
    }

    /// The models the Model parameter chooses among. Reads the folder on the first call.
    pub fn library(&self) -> &ModelLibrary {
        self.library.get_or_init(|| match &self.library_folder {
            Some(folder) => ModelLibrary::scan(folder),
            None => ModelLibrary::user(),
        })
    }

    /// The name of the models-folder model the Model parameter picks now; `None` at 0 (the
    /// saved choice) or past the folder's models. Saved with the project, so a project reopens
    /// the model it used however the folder's list has changed since.
    pub fn picked_name(&self) -> Option<String> {
        self.library().get(self.library_slot()).map(|model| model.name.clone())
    }

    /// Takes the model name a project saved: when the folder no longer holds it, the worker
    /// says so (and the built-in model answers) until another model is picked. Main thread,
    /// while a state loads (the parameter itself was set from the name in `params::filter_state`).
    pub fn restore_pick(&self, name: Option<String>) {
        let missing = name.filter(|name| self.library().slot_of(name).is_none());
        let mut pick = self.missing_pick.lock().unwrap_or_else(|e| e.into_inner());
        if *pick != missing {
            *pick = missing;
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// What the worker should load now: the parameter's model of the folder, or the saved
    /// choice when the parameter is 0. A parameter past the folder's models, or a project's
    /// model that the folder no longer holds, is an error.
    pub fn resolve(&self) -> Result<ModelSource, EngineError> {
        let slot = self.library_slot();
        let mut missing_pick = self.missing_pick.lock().unwrap_or_else(|e| e.into_inner());
        if slot != 0 {
            // Another model was picked since the project loaded.
            *missing_pick = None;
        } else if let Some(name) = missing_pick.as_ref() {
            return Err(EngineError::BadChoice {
                choice: format!("the model '{name}' this project uses"),
                reason: match &self.library().folder {
                    Some(folder) => format!("{} no longer holds it", folder.display()),
                    None => "this system has no models folder".into(),
                },
            });
        }
        drop(missing_pick);
        if slot == 0 {
            return Ok(self.get());
        }
        let library = self.library();
        match library.get(slot) {
            Some(model) => Ok(ModelSource::Dir(model.path.clone())),
            None => Err(EngineError::BadChoice {
                choice: format!("model {slot} of the models folder"),
                reason: match &library.folder {
                    Some(folder) => format!("{} holds {} models", folder.display(), library.models.len()),
                    None => "this system has no models folder".into(),
                },
            }),
        }
    }

    /// How the Model parameter shows `slot`: the saved choice's name at 0, else the folder's
    /// model name.
    pub fn slot_name(&self, slot: usize) -> String {
        if slot == 0 {
            return match self.get() {
                ModelSource::Builtin => "Built-in".to_string(),
                ModelSource::Dir(path) => {
                    let name = path.file_name().unwrap_or(path.as_os_str());
                    format!("Saved: {}", name.to_string_lossy())
                }
            };
        }
        match self.library().get(slot) {
            Some(model) => model.name.clone(),
            None => format!("{slot} (empty)"),
        }
    }

    /// The Model parameter's value for a typed name: "built-in", a folder model's name, or a
    /// number; also every text `slot_name` shows ("Saved: ...", "3 (empty)"), so a value shown
    /// reads back as itself.
    pub fn slot_for_name(&self, text: &str) -> Option<usize> {
        let text = text.trim();
        let is_saved_choice = text.get(..6).is_some_and(|start| start.eq_ignore_ascii_case("saved:"));
        if text.eq_ignore_ascii_case("built-in") || text.eq_ignore_ascii_case("builtin") || is_saved_choice {
            return Some(0);
        }
        let number = text.strip_suffix("(empty)").unwrap_or(text).trim();
        self.library().slot_of(text).or_else(|| number.parse().ok().filter(|&s| s <= MAX_LIBRARY_MODELS))
    }
}

/// What went wrong in the worker or with a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A saved or picked model choice that cannot be right.
    #[error("{choice} cannot be used: {reason}")]
    BadChoice { choice: String, reason: String },
    /// The model could not be loaded.
    #[error("could not load {choice}: {reason}")]
    ModelLoad { choice: String, reason: String },
    /// The model failed while writing an answer.
    #[error("the model failed at step {step_idx}: {reason}")]
    Step { step_idx: u64, reason: String },
    /// The captured phrase did not fit the model's encoding.
    #[error("the phrase could not be encoded: {0}")]
    Encode(#[from] Reject),
    /// The worker thread could not be started.
    #[error("could not start the worker thread: {0}")]
    Spawn(String),
}

/// Whether a continuer writes one line or chords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Voicing {
    /// At most one note at a step.
    Melody,
    /// Several notes at a step.
    Chords,
}

/// Anything that continues music on a step grid, one step at a time: the model the worker
/// drives. Implemented for the melody LSTM in [`lstm`] and the chord LSTM in [`chords`].
pub trait Continuer: Send {
    /// The step grid the continuer writes on (steps per quarter note).
    fn grid(&self) -> StepGrid;

    /// One line or chords.
    fn voicing(&self) -> Voicing;

    /// Starts a new continuation of `phrase`, forgetting any earlier one. The phrase holds the
    /// notes as played (every voice, exact times in beats from its origin) and ends where the
    /// continuation starts; it may have no notes. `bar` says where in which bar the phrase's
    /// origin lies, when the host's time signature and bar lines are known. `seed` seeds the
    /// sampler: the same phrase, bar, seed and settings must give the same steps.
    fn begin(&mut self, phrase: &Phrase, bar: Option<BarPhase>, seed: u64) -> Result<(), EngineError>;

    /// The next step: the pitches sounding in it and which of them are struck there, sampled
    /// as `settings` say (temperature, pitches; the worker sets the temperature anew before
    /// every step), with at most `max_voices` pitches. `None` when the model ends the piece
    /// (only where `settings.may_end`).
    fn next_step(
        &mut self,
        settings: &SamplingSettings,
        max_voices: usize,
    ) -> Result<Option<Frame>, EngineError>;

    /// Where the model runs and, where it is not the CPU or not the device chosen, why: "CPU",
    /// "CUDA GPU (Auto: ...)", "CPU (no GPU: ...)". Shown in the status line.
    fn placement(&self) -> String {
        "CPU".to_string()
    }
}

/// Loads continuers: the built-in models or a model directory. Called on the worker thread.
pub trait ContinuerFactory: Send + Sync {
    /// Loads the model `choice` names (a directory may hold a melody or a chord model) on the
    /// device `device` asks for, or on the CPU where that device is missing or fails.
    fn load(&self, choice: &ModelSource, device: DeviceChoice) -> Result<Box<dyn Continuer>, EngineError>;

    /// Loads the built-in chord model.
    fn load_builtin_chords(&self) -> Result<Box<dyn Continuer>, EngineError>;
}

/// What the worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EngineState {
    /// No worker runs (the plugin is not active).
    Stopped = 0,
    /// The worker loads a model.
    Loading = 1,
    /// A model is loaded; phrases are answered.
    Ready = 2,
    /// No model could be loaded; notes only pass through. `EngineStatus::detail` says why.
    Failed = 3,
    /// The chosen model could not be loaded, so the built-in one answers.
    /// `EngineStatus::detail` says why.
    Fallback = 4,
}

/// The worker's state and the reason behind it, for the GUI and the host. Written by the worker
/// (and by `Engine` on start and stop), read by anyone but the audio thread.
#[derive(Debug)]
pub struct EngineStatus {
    state: AtomicU8,
    detail: Mutex<String>,
    /// The phrase answered last and the answers to it, for the editor.
    shown: view::ShownSlot,
}

impl Default for EngineStatus {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(EngineState::Stopped as u8),
            detail: Mutex::new(String::new()),
            shown: Default::default(),
        }
    }
}

impl EngineStatus {
    /// The current state.
    pub fn state(&self) -> EngineState {
        match self.state.load(Ordering::Acquire) {
            1 => EngineState::Loading,
            2 => EngineState::Ready,
            3 => EngineState::Failed,
            4 => EngineState::Fallback,
            _ => EngineState::Stopped,
        }
    }

    /// What the state is about: the model loaded, or why loading failed.
    pub fn detail(&self) -> String {
        self.detail.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The phrase answered last and the answers to it.
    pub fn shown(&self) -> Arc<Shown> {
        self.shown.get()
    }

    fn set(&self, state: EngineState, detail: String) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = detail;
        self.state.store(state as u8, Ordering::Release);
    }
}

/// A running worker thread. Dropping it stops and joins the thread.
pub struct Engine {
    link: Arc<WorkerLink>,
    thread: Option<JoinHandle<()>>,
    status: Arc<EngineStatus>,
}

impl Engine {
    /// Starts a worker that loads the model in `model` with `factory` and answers requests.
    /// Main thread (the plugin's `activate`).
    pub fn spawn(
        factory: Arc<dyn ContinuerFactory>,
        model: Arc<ModelSlot>,
        live: Arc<LiveShared>,
        status: Arc<EngineStatus>,
    ) -> Result<(Engine, Arc<WorkerLink>), EngineError> {
        let link = Arc::new(WorkerLink::new());
        // Candle computes on rayon's global pool. Built here, its threads are named as the
        // model's and not, as they would be when the worker first used it, after the worker.
        // Once per process: later calls find it built and change nothing.
        let _ =
            rayon::ThreadPoolBuilder::new().thread_name(|idx| format!("antiphon-pool{idx}")).build_global();
        status.set(EngineState::Loading, model.get().describe());
        // Before the thread runs, so the audio thread never asks a worker that has no model yet.
        live.is_model_ready.store(false, Ordering::Release);
        live.is_model_loading.store(true, Ordering::Release);
        let worker = worker::Worker::new(factory, model, live, status.clone(), link.clone());
        let thread = std::thread::Builder::new()
            .name("antiphon-worker".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::Spawn(e.to_string()))?;
        let engine = Engine { link: link.clone(), thread: Some(thread), status };
        Ok((engine, link))
    }

    /// Stops the worker and waits for it. Main thread (the plugin's `deactivate`).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        // The worker sees the flag within a poll (it is woken at once; a model load in progress
        // finishes first).
        self.link.close();
        thread.thread().unpark();
        let _ = thread.join();
        self.status.set(EngineState::Stopped, String::new());
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
