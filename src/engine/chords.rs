//! The chord LSTM of `model` as the worker's [`Continuer`]: the built-in chord model or a
//! trained chord model directory. It hears every voice of the phrase on its grid and answers
//! with chords, a frame at a time.
//! Runs on: worker.

use std::path::Path;
use std::sync::{Arc, Mutex};

use live::phrase::Phrase;
use model::chords::{ChordGenerator, ChordModel};
use model::sample::SamplingSettings;
use model::ModelError;
use music::bar::BarPhase;
use music::encode::StepGrid;
use music::{Frame, PianoRoll};

use super::{Continuer, DeviceChoice, EngineError, Voicing};

/// A chord model and the answer it writes.
pub struct ChordContinuer {
    model: Arc<ChordModel>,
    generator: Option<ChordGenerator>,
    num_steps: u64,
    /// Where it runs (always the CPU) and, where a GPU was asked for, why.
    placement: &'static str,
}

impl ChordContinuer {
    /// The built-in chord model, loaded once per process and shared by every instance.
    pub fn builtin() -> Result<Box<dyn Continuer>, ModelError> {
        static SHARED: Mutex<Option<Arc<ChordModel>>> = Mutex::new(None);
        let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let model = match shared.as_ref() {
            Some(model) => Arc::clone(model),
            None => Arc::clone(shared.insert(Arc::new(ChordModel::builtin()?))),
        };
        Ok(Box::new(ChordContinuer { model, generator: None, num_steps: 0, placement: "CPU" }))
    }

    /// A chord model directory; `device` is where the Device parameter asks it to run.
    pub fn load_dir(dir: &Path, device: DeviceChoice) -> Result<Box<dyn Continuer>, ModelError> {
        let model = Arc::new(ChordModel::load_dir(dir)?);
        let placement = match device {
            DeviceChoice::Gpu => "CPU (chord models run on the CPU only)",
            DeviceChoice::Auto | DeviceChoice::Cpu => "CPU",
        };
        Ok(Box::new(ChordContinuer { model, generator: None, num_steps: 0, placement }))
    }
}

impl Continuer for ChordContinuer {
    fn grid(&self) -> StepGrid {
        self.model.config.grid
    }

    fn voicing(&self) -> Voicing {
        Voicing::Chords
    }

    fn placement(&self) -> String {
        self.placement.to_string()
    }

    fn begin(&mut self, phrase: &Phrase, _bar: Option<BarPhase>, seed: u64) -> Result<(), EngineError> {
        let grid = self.grid();
        let len_steps = grid.nearest_steps(phrase.len_beats) as usize;
        let roll = PianoRoll::from_notes(&phrase.notes, grid, Some(len_steps));
        let failed = |err: ModelError| EngineError::Step { step_idx: 0, reason: err.to_string() };
        let mut generator = ChordGenerator::new(Arc::clone(&self.model), seed).map_err(failed)?;
        for &frame in &roll.frames {
            generator.feed_frame(frame).map_err(failed)?;
        }
        self.generator = Some(generator);
        self.num_steps = 0;
        Ok(())
    }

    fn next_step(
        &mut self,
        settings: &SamplingSettings,
        max_voices: usize,
    ) -> Result<Option<Frame>, EngineError> {
        let step_idx = self.num_steps;
        let generator = self
            .generator
            .as_mut()
            .ok_or(EngineError::Step { step_idx, reason: "no continuation was begun".into() })?;
        self.num_steps += 1;
        let frame = generator
            .next_frame(settings, max_voices)
            .map_err(|err| EngineError::Step { step_idx, reason: err.to_string() })?;
        Ok(Some(frame))
    }
}
