//! The LSTM generator of `model` as the worker's [`Continuer`]: the built-in model or a trained
//! model directory, continued one symbol at a time with the temperature and constraints of
//! every step.
//! Runs on: worker.

use std::sync::{Arc, Mutex};

use model::generate::PhraseContinuation;
use model::io::LoadedModel;
use model::sample::SamplingSettings;
use music::bar::BarPhase;
use music::encode::{decode, StepGrid};
use music::Symbol;

use super::{Continuer, ContinuerFactory, EngineError, ModelSource};

/// Steps one continuation runs before the generator says it is done; a continuous answer then
/// starts over from its own output (the worker treats the end like a delimiter). 4096 steps are
/// 64 bars of sixteenths.
const MAX_CONTINUATION_STEPS: usize = 4096;

/// Loads the built-in model or a model directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct LstmFactory;

impl ContinuerFactory for LstmFactory {
    fn load(&self, choice: &ModelSource) -> Result<Box<dyn Continuer>, EngineError> {
        let loaded = match choice {
            ModelSource::Builtin => shared_builtin(),
            ModelSource::Dir(path) => LoadedModel::load_dir(path).map(Arc::new),
        }
        .map_err(|err| EngineError::ModelLoad { choice: choice.describe(), reason: err.to_string() })?;
        Ok(Box::new(LstmContinuer { model: loaded, continuation: None, num_steps: 0 }))
    }
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

/// A loaded model and the continuation it writes.
pub struct LstmContinuer {
    model: Arc<LoadedModel>,
    continuation: Option<PhraseContinuation>,
    num_steps: u64,
}

impl Continuer for LstmContinuer {
    fn grid(&self) -> StepGrid {
        self.model.config.grid
    }

    fn begin(&mut self, primer: &[Symbol], bar: Option<BarPhase>, seed: u64) -> Result<(), EngineError> {
        let mut melody = decode(primer, self.grid());
        if let Some(bar) = bar {
            melody.meter = Some(bar.meter);
            melody.pickup_beats = bar.pickup_beats(self.grid());
        }
        let continuation =
            PhraseContinuation::start(Arc::clone(&self.model), &melody, MAX_CONTINUATION_STEPS, seed)
                .map_err(|err| EngineError::ModelLoad {
                    choice: self.model.origin.clone(),
                    reason: err.to_string(),
                })?;
        self.continuation = Some(continuation);
        self.num_steps = 0;
        Ok(())
    }

    fn next_symbol(&mut self, settings: &SamplingSettings) -> Result<Symbol, EngineError> {
        let step_idx = self.num_steps;
        let continuation = self
            .continuation
            .as_mut()
            .ok_or(EngineError::Step { step_idx, reason: "no continuation was begun".into() })?;
        self.num_steps += 1;
        let symbol = continuation
            .next_symbol(settings)
            .map_err(|err| EngineError::Step { step_idx, reason: err.to_string() })?;
        Ok(symbol.unwrap_or(Symbol::Delimiter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use music::encode::parse_symbols;
    use music::{Key, Mode, PitchRules};

    fn builtin() -> Box<dyn Continuer> {
        LstmFactory.load(&ModelSource::Builtin).expect("the built-in model loads")
    }

    fn constraints(key: Option<Key>) -> SamplingSettings {
        SamplingSettings {
            pitches: PitchRules::new(55, 79, key),
            may_end: false,
            ..SamplingSettings::default()
        }
    }

    fn run(
        continuer: &mut dyn Continuer,
        seed: u64,
        temperatures: &[f32],
        c: &SamplingSettings,
    ) -> Vec<Symbol> {
        // A G major phrase: the model moves it to its key convention and back.
        let primer =
            parse_symbols("67 _ _ _ 71 _ 74 _ 72 _ 71 _ 69 _ _ _ 67 _ 69 _ 71 _ 72 _ 74 _ _ _ r _ _ _")
                .unwrap();
        continuer.begin(&primer, None, seed).unwrap();
        temperatures
            .iter()
            .map(|&temperature| continuer.next_symbol(&SamplingSettings { temperature, ..*c }).unwrap())
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
        let symbols = run(continuer.as_mut(), 9, &[1.5; 256], &c);
        let pitches: Vec<u8> =
            symbols.iter().filter_map(|s| if let Symbol::Pitch(p) = s { Some(*p) } else { None }).collect();
        assert!(pitches.len() > 8, "{symbols:?}");
        assert!(pitches.iter().all(|&p| c.pitches.allows(p)), "{pitches:?}");
        // No end while it may not end.
        assert!(!symbols.contains(&Symbol::Delimiter));
    }

    #[test]
    fn instances_share_one_built_in_model() {
        let first = shared_builtin().unwrap();
        let second = shared_builtin().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "the second instance loaded its own copy");
    }

    #[test]
    fn a_missing_directory_fails_with_its_path() {
        let choice = ModelSource::Dir("/no/such/antiphon/model".into());
        let err = LstmFactory.load(&choice).err().expect("a missing directory loads");
        assert!(err.to_string().contains("/no/such/antiphon/model"), "{err}");
    }
}
