//! The melody LSTM of `model` as the worker's [`Continuer`]: the built-in model or a trained
//! model directory, continued one step at a time with the temperature and constraints of every
//! step. A phrase played with chords is heard by its top voice (`Phrase::quantized`).
//! Runs on: worker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use live::phrase::Phrase;
use model::chords::is_chord_config;
use model::compute::{self, DeviceChoice};
use model::generate::PhraseContinuation;
use model::io::{LoadedModel, CONFIG_FILE};
use model::sample::SamplingSettings;
use model::Device;
use music::bar::BarPhase;
use music::encode::StepGrid;
use music::{Frame, PitchSet, Symbol, TokenId};

use super::chords::ChordContinuer;
use super::{Continuer, ContinuerFactory, EngineError, ModelSource, Voicing};

/// Steps one continuation runs before the generator says it is done; a continuous answer then
/// starts over from its own output (the worker treats the end like a delimiter). 4096 steps are
/// 64 bars of sixteenths.
const MAX_CONTINUATION_STEPS: usize = 4096;

/// Loads the built-in models or a model directory (of either kind).
#[derive(Clone, Copy, Debug, Default)]
pub struct LstmFactory;

impl ContinuerFactory for LstmFactory {
    fn load(&self, choice: &ModelSource, device: DeviceChoice) -> Result<Box<dyn Continuer>, EngineError> {
        let failed = |err: model::ModelError| EngineError::ModelLoad {
            choice: choice.describe(),
            reason: err.to_string(),
        };
        if let ModelSource::Dir(path) = choice {
            let is_chords = std::fs::read(path.join(CONFIG_FILE)).is_ok_and(|bytes| is_chord_config(&bytes));
            if is_chords {
                // Chord models run on the CPU only: their step is the CPU's int8 kernel.
                return ChordContinuer::load_dir(path, device).map_err(failed);
            }
        }
        let load = |on: &Device| match (choice, on.is_cpu()) {
            (ModelSource::Builtin, true) => shared_builtin(),
            _ => LoadedModel::load_on(choice, on).map(Arc::new),
        };
        let placed = compute::place(device, load, |model| time_step(model)).map_err(failed)?;
        Ok(Box::new(LstmContinuer {
            model: placed.model,
            placement: placed.placement,
            cpu_standby: placed.cpu_standby,
            continuation: None,
            num_steps: 0,
            sounding: None,
        }))
    }

    fn load_builtin_chords(&self) -> Result<Box<dyn Continuer>, EngineError> {
        ChordContinuer::builtin().map_err(|err| EngineError::ModelLoad {
            choice: "the built-in chord model".into(),
            reason: err.to_string(),
        })
    }
}

/// The time of one generation step of `model` from a fresh state, for Auto to compare devices.
fn time_step(model: &LoadedModel) -> Result<Duration, model::ModelError> {
    let mut state = model.new_state();
    let mut logits = vec![0.0; model.config.vocab.len()];
    let token = TokenId(0);
    compute::time_per_step(|| model.step(token, &mut state, &mut logits))
}

/// The built-in model, loaded once per process and shared by every instance: loading builds
/// its tune memory's index (a fraction of a second and about 11 MB), which the instances then
/// share, as they share the weights, and a host that deactivates and reactivates a plugin (or
/// creates a new instance) gets it at once. It stays loaded while the host keeps the plugin's
/// library. Each continuation keeps its own state. Worker threads only: the lock is held while
/// the first of them loads.
pub fn shared_builtin() -> Result<Arc<LoadedModel>, model::ModelError> {
    static SHARED: Mutex<Option<Arc<LoadedModel>>> = Mutex::new(None);
    let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(model) = shared.as_ref() {
        return Ok(Arc::clone(model));
    }
    let model = Arc::new(LoadedModel::builtin()?);
    *shared = Some(Arc::clone(&model));
    Ok(model)
}

/// A loaded melody model and the continuation it writes.
pub struct LstmContinuer {
    model: Arc<LoadedModel>,
    /// Where the model runs and why (`compute::Placed::placement`).
    placement: String,
    /// The CPU's copy of the model, kept while the model runs on a GPU, to take over when a
    /// GPU step fails.
    cpu_standby: Option<Arc<LoadedModel>>,
    continuation: Option<PhraseContinuation>,
    num_steps: u64,
    /// The pitch sounding after the last step: the phrase's last note while it is held on.
    sounding: Option<u8>,
}

impl LstmContinuer {
    /// Moves to the CPU's copy of the model after the GPU failed (`why`), for good.
    fn hand_to_cpu(&mut self, why: &str) {
        let Some(cpu) = self.cpu_standby.take() else { return };
        let gpu = compute::device_name(self.model.lstm.device());
        nice_plug::prelude::nice_warn!("Antiphon: the {gpu} failed ({why}); the CPU answers from now on");
        self.placement = format!("CPU (the {gpu} {why})");
        self.model = cpu;
        self.continuation = None;
    }
}

impl Continuer for LstmContinuer {
    fn placement(&self) -> String {
        self.placement.clone()
    }

    fn grid(&self) -> StepGrid {
        self.model.config.grid
    }

    fn voicing(&self) -> Voicing {
        Voicing::Melody
    }

    fn begin(&mut self, phrase: &Phrase, bar: Option<BarPhase>, seed: u64) -> Result<(), EngineError> {
        let mut melody = phrase.quantized(self.grid()).to_melody();
        if let Some(bar) = bar {
            melody.meter = Some(bar.meter);
            melody.pickup_beats = bar.pickup_beats(self.grid());
        }
        // The last note goes on into the answer if the answer starts by holding it.
        self.sounding =
            melody.notes.last().filter(|n| n.end_beats() >= melody.end_beats - 1e-9).map(|n| n.pitch);
        let start = |model: &Arc<LoadedModel>| {
            PhraseContinuation::start(Arc::clone(model), &melody, MAX_CONTINUATION_STEPS, seed)
        };
        let continuation = match start(&self.model) {
            Ok(continuation) => Ok(continuation),
            Err(err) if self.cpu_standby.is_some() => {
                self.hand_to_cpu(&format!("it failed to read a phrase: {err}"));
                start(&self.model)
            }
            Err(err) => Err(err),
        }
        .map_err(|err| EngineError::ModelLoad {
            choice: self.model.origin.clone(),
            reason: err.to_string(),
        })?;
        self.continuation = Some(continuation);
        self.num_steps = 0;
        Ok(())
    }

    fn next_step(
        &mut self,
        settings: &SamplingSettings,
        _max_voices: usize,
    ) -> Result<Option<Frame>, EngineError> {
        let step_idx = self.num_steps;
        let continuation = self
            .continuation
            .as_mut()
            .ok_or(EngineError::Step { step_idx, reason: "no continuation was begun".into() })?;
        self.num_steps += 1;
        let symbol = match continuation.next_symbol(settings) {
            Ok(symbol) => symbol,
            Err(err) => {
                // This answer ends; the next is written on the CPU.
                if self.cpu_standby.is_some() {
                    self.hand_to_cpu(&format!("it failed at step {step_idx}: {err}"));
                }
                return Err(EngineError::Step { step_idx, reason: err.to_string() });
            }
        };
        let frame = match symbol.unwrap_or(Symbol::Delimiter) {
            Symbol::Pitch(pitch) => {
                self.sounding = Some(pitch);
                Frame { sounding: PitchSet::EMPTY.with(pitch), struck: PitchSet::EMPTY.with(pitch) }
            }
            Symbol::Hold => {
                // The phrase's last note, held into the answer, moves to the nearest pitch the
                // settings allow (the model's own pitches keep to them already).
                let held = if step_idx == 0 {
                    self.sounding.map(|p| settings.pitches.nearest(p))
                } else {
                    self.sounding
                };
                self.sounding = held;
                let sounding = held.map_or(PitchSet::EMPTY, |p| PitchSet::EMPTY.with(p));
                Frame { sounding, struck: PitchSet::EMPTY }
            }
            Symbol::Rest => {
                self.sounding = None;
                Frame::default()
            }
            Symbol::Delimiter => {
                self.sounding = None;
                return Ok(None);
            }
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use music::{Key, Mode, PitchRules};

    fn builtin() -> Box<dyn Continuer> {
        LstmFactory.load(&ModelSource::Builtin, DeviceChoice::Auto).expect("the built-in model loads")
    }

    fn constraints(key: Option<Key>) -> SamplingSettings {
        SamplingSettings {
            pitches: PitchRules::new(55, 79, key),
            may_end: false,
            ..SamplingSettings::default()
        }
    }

    /// The pitch struck at each step (`None` where none is).
    fn run(
        continuer: &mut dyn Continuer,
        seed: u64,
        temperatures: &[f32],
        c: &SamplingSettings,
    ) -> Vec<Option<u8>> {
        // A G major phrase: the model moves it to its key convention and back.
        let mut phrase = Phrase::empty(4.0);
        for (i, &pitch) in [67u8, 71, 74, 72, 71, 69, 67, 69, 71, 72, 74].iter().enumerate() {
            phrase.notes.push(music::Note::new(pitch, i as f64 * 0.5, 0.5));
        }
        phrase.len_beats = 8.0;
        continuer.begin(&phrase, None, seed).unwrap();
        temperatures
            .iter()
            .map(|&temperature| {
                let frame = continuer.next_step(&SamplingSettings { temperature, ..*c }, 1).unwrap();
                frame.expect("no end while it may not end").struck.lowest()
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_symbols_and_the_temperature_matters() {
        let mut continuer = builtin();
        assert_eq!(continuer.grid(), StepGrid::SIXTEENTHS);
        let c = constraints(None);
        let warm = run(continuer.as_mut(), 5, &[1.0; 48], &c);
        assert_eq!(warm, run(continuer.as_mut(), 5, &[1.0; 48], &c));
        assert_ne!(warm, run(continuer.as_mut(), 6, &[1.0; 48], &c));
        let mut turned = [1.0f32; 48];
        turned[24..].fill(1e-4);
        let cooled = run(continuer.as_mut(), 5, &turned, &c);
        assert_eq!(warm[..24], cooled[..24], "steps before the change moved");
        assert_ne!(warm[24..], cooled[24..], "the change did not reach later steps");
    }

    #[test]
    fn the_model_keeps_to_the_constraints_itself() {
        let mut continuer = builtin();
        let g_major = Key::from_tonic(7, Mode::Major);
        let c = constraints(Some(g_major));
        let pitches: Vec<u8> = run(continuer.as_mut(), 9, &[1.5; 256], &c).into_iter().flatten().collect();
        assert!(pitches.len() > 8, "{pitches:?}");
        assert!(pitches.iter().all(|&p| c.pitches.allows(p)), "{pitches:?}");
    }

    #[test]
    fn a_phrase_in_chords_is_heard_by_its_top_voice() {
        let mut continuer = builtin();
        let mut phrase = Phrase::empty(4.0);
        // A melody over held left-hand chords.
        for (i, &pitch) in [72u8, 74, 76, 77, 79, 77, 76, 74].iter().enumerate() {
            phrase.notes.push(music::Note::new(pitch, i as f64 * 0.5, 0.5));
            if i % 4 == 0 {
                for low in [48u8, 52, 55] {
                    phrase.notes.push(music::Note::new(low, i as f64 * 0.5, 2.0));
                }
            }
        }
        phrase.notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats));
        phrase.len_beats = 4.0;
        continuer.begin(&phrase, None, 1).unwrap();
        let c = constraints(None);
        let frames: Vec<Frame> = (0..32).map(|_| continuer.next_step(&c, 1).unwrap().unwrap()).collect();
        assert!(frames.iter().all(|f| f.sounding.len() <= 1));
        // The answer continues the melody's register, not the chords'.
        let pitches: Vec<u8> = frames.iter().filter_map(|f| f.struck.lowest()).collect();
        let mean = pitches.iter().map(|&p| p as f64).sum::<f64>() / pitches.len().max(1) as f64;
        assert!(mean > 62.0, "{pitches:?}");
    }

    #[test]
    fn instances_share_one_built_in_model() {
        let first = shared_builtin().unwrap();
        let second = shared_builtin().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "the second instance loaded its own copy");
    }

    #[test]
    fn a_chord_model_folder_loads_as_chords() {
        // A copy of the built-in chord model, as a user's models folder holds one.
        let dir = tempfile::tempdir().unwrap();
        let builtin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/models/chords");
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(builtin.join(file), dir.path().join(file)).unwrap();
        }
        let mut continuer =
            LstmFactory.load(&ModelSource::Dir(dir.path().to_path_buf()), DeviceChoice::Auto).unwrap();
        assert_eq!(continuer.voicing(), Voicing::Chords);
        assert_eq!(continuer.grid(), StepGrid { steps_per_quarter: 2 });
        let mut phrase = Phrase::empty(4.0);
        phrase.notes.push(music::Note::new(60, 0.0, 1.0));
        phrase.notes.push(music::Note::new(64, 0.0, 1.0));
        phrase.len_beats = 4.0;
        continuer.begin(&phrase, None, 3).unwrap();
        let frame = continuer.next_step(&constraints(None), 2).unwrap().unwrap();
        assert!(frame.sounding.len() <= 2);
        assert_eq!(continuer.placement(), "CPU");
        // Asked for a GPU, a chord model stays on the CPU and says why.
        let on_gpu =
            LstmFactory.load(&ModelSource::Dir(dir.path().to_path_buf()), DeviceChoice::Gpu).unwrap();
        assert_eq!(on_gpu.placement(), "CPU (chord models run on the CPU only)");
    }

    #[test]
    fn the_built_in_model_runs_where_the_device_choice_and_the_build_allow() {
        let placement = |device| LstmFactory.load(&ModelSource::Builtin, device).unwrap().placement();
        assert_eq!(placement(DeviceChoice::Cpu), "CPU (chosen)");
        if !model::compute::HAS_GPU_SUPPORT {
            assert_eq!(placement(DeviceChoice::Auto), "CPU");
            assert!(placement(DeviceChoice::Gpu).starts_with("CPU (no GPU: this build has no GPU support"));
        }
    }

    #[test]
    fn a_missing_directory_fails_with_its_path() {
        let choice = ModelSource::Dir("/no/such/antiphon/model".into());
        let err = LstmFactory.load(&choice, DeviceChoice::Auto).err().expect("a missing directory loads");
        assert!(err.to_string().contains("/no/such/antiphon/model"), "{err}");
    }
}
