//! The plugin's parameters: what the host automates and saves with the project, the model
//! choice saved beside them, and the check that refuses junk in a saved state.
//! Read on: audio thread (`.value()`, through [`AntiphonParams::settings`]); written by the host.
//! The model choice is read and written on the main thread and the worker only.

use std::sync::Arc;

use nice_plug::params::persist::PersistentField;
use nice_plug::prelude::*;

use crate::engine::{DeviceChoice, ModelLibrary, ModelSlot, ModelSource, MAX_LIBRARY_MODELS};
use live::phrase::{KeyLock, Texture, MAX_ANSWER_VOICES};
use live::{AnswerStart, Settings, TriggerMode, VelocityMode};
use music::{Key, Mode};

/// Temperature range: near-greedy to wild. 1.0 is the model as trained.
pub const TEMPERATURE_RANGE: (f32, f32) = (0.05, 2.0);

/// Silence that ends a phrase, in beats (inclusive range).
pub const SILENCE_BEATS_RANGE: (f32, f32) = (0.25, 8.0);

/// Phrase and answer lengths, in bars (inclusive range).
pub const BARS_RANGE: (i32, i32) = (1, 16);

/// Free-run tempo range, in quarter notes per minute.
pub const FREE_TEMPO_RANGE_BPM: (f32, f32) = (30.0, 300.0);

/// How a phrase ends, as the host shows it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerParam {
    /// After the silence setting with every key up.
    #[id = "silence"]
    #[name = "Silence"]
    Silence,
    /// After the phrase length in bars.
    #[id = "bars"]
    #[name = "Bars"]
    Bars,
    /// Only on "Answer Now".
    #[id = "manual"]
    #[name = "Manual"]
    Manual,
}

/// Where an answer starts, as the host shows it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerStartParam {
    /// On the first bar line at or after the phrase's end.
    #[id = "bar"]
    #[name = "Next Bar"]
    NextBar,
    /// On the first beat at or after the phrase's end.
    #[id = "beat"]
    #[name = "Next Beat"]
    NextBeat,
}

/// One line or chords, as the host shows it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextureParam {
    /// Chords to a phrase played with chords, one line to a melody.
    #[id = "auto"]
    #[name = "Auto"]
    Auto,
    /// Always one line (the top voice of chords is heard).
    #[id = "melody"]
    #[name = "Melody"]
    Melody,
    /// Always chords.
    #[id = "chords"]
    #[name = "Chords"]
    Chords,
}

/// The scale constraint, as the host shows it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLockParam {
    /// Any pitch in the range.
    #[id = "off"]
    #[name = "Off"]
    Off,
    /// The key estimated from the phrase.
    #[id = "follow"]
    #[name = "Follow Phrase"]
    FollowPhrase,
    /// The Key and Scale parameters.
    #[id = "fixed"]
    #[name = "Fixed"]
    Fixed,
}

/// Tonic of the fixed key.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRootParam {
    /// Tonic C.
    #[id = "c"]
    #[name = "C"]
    C,
    /// Tonic C#/Db.
    #[id = "cs"]
    #[name = "C#/Db"]
    CSharp,
    /// Tonic D.
    #[id = "d"]
    #[name = "D"]
    D,
    /// Tonic D#/Eb.
    #[id = "ds"]
    #[name = "D#/Eb"]
    DSharp,
    /// Tonic E.
    #[id = "e"]
    #[name = "E"]
    E,
    /// Tonic F.
    #[id = "f"]
    #[name = "F"]
    F,
    /// Tonic F#/Gb.
    #[id = "fs"]
    #[name = "F#/Gb"]
    FSharp,
    /// Tonic G.
    #[id = "g"]
    #[name = "G"]
    G,
    /// Tonic G#/Ab.
    #[id = "gs"]
    #[name = "G#/Ab"]
    GSharp,
    /// Tonic A.
    #[id = "a"]
    #[name = "A"]
    A,
    /// Tonic A#/Bb.
    #[id = "as"]
    #[name = "A#/Bb"]
    ASharp,
    /// Tonic B.
    #[id = "b"]
    #[name = "B"]
    B,
}

/// Scale of the fixed key.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleParam {
    /// The major scale (mode).
    #[id = "major"]
    #[name = "Major"]
    Major,
    /// The minor scale (mode).
    #[id = "minor"]
    #[name = "Minor"]
    Minor,
    /// The dorian scale (mode).
    #[id = "dorian"]
    #[name = "Dorian"]
    Dorian,
    /// The phrygian scale (mode).
    #[id = "phrygian"]
    #[name = "Phrygian"]
    Phrygian,
    /// The lydian scale (mode).
    #[id = "lydian"]
    #[name = "Lydian"]
    Lydian,
    /// The mixolydian scale (mode).
    #[id = "mixolydian"]
    #[name = "Mixolydian"]
    Mixolydian,
    /// The locrian scale (mode).
    #[id = "locrian"]
    #[name = "Locrian"]
    Locrian,
}

impl ScaleParam {
    fn mode(self) -> Mode {
        match self {
            ScaleParam::Major => Mode::Major,
            ScaleParam::Minor => Mode::Minor,
            ScaleParam::Dorian => Mode::Dorian,
            ScaleParam::Phrygian => Mode::Phrygian,
            ScaleParam::Lydian => Mode::Lydian,
            ScaleParam::Mixolydian => Mode::Mixolydian,
            ScaleParam::Locrian => Mode::Locrian,
        }
    }
}

/// Where answer velocities come from, as the host shows it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VelocityModeParam {
    /// The phrase's mean velocity.
    #[id = "phrase"]
    #[name = "From Phrase"]
    FromPhrase,
    /// The Velocity parameter.
    #[id = "fixed"]
    #[name = "Fixed"]
    Fixed,
}

/// Where the model runs, as the host shows it.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceParam {
    /// The faster of the CPU and the GPU for the model loaded, timed when it loads.
    #[id = "auto"]
    #[name = "Auto"]
    Auto,
    /// The CPU.
    #[id = "cpu"]
    #[name = "CPU"]
    Cpu,
    /// The GPU (in a build with GPU support), else the CPU with the reason shown.
    #[id = "gpu"]
    #[name = "GPU"]
    Gpu,
}

impl DeviceParam {
    /// The device choice it stands for.
    pub fn choice(self) -> DeviceChoice {
        match self {
            Self::Auto => DeviceChoice::Auto,
            Self::Cpu => DeviceChoice::Cpu,
            Self::Gpu => DeviceChoice::Gpu,
        }
    }
}

/// Every host-visible parameter of Antiphon. IDs are short and never change.
#[derive(Params)]
pub struct AntiphonParams {
    /// The host's bypass: notes pass through untouched; the answer stops with note-offs.
    #[id = "bypass"]
    pub bypass: BoolParam,
    /// Turning this on ends the phrase now and answers it (any trigger mode). Turn it off
    /// again to re-arm; a momentary button does both.
    #[id = "now"]
    pub answer_now: BoolParam,
    /// How a phrase is heard and when it ends.
    #[nested(group = "Listen")]
    pub listen: ListenParams,
    /// When and how long the answer plays, and how free it is.
    #[nested(group = "Answer")]
    pub answer: AnswerParams,
    /// Which notes the answer may use and how they sound.
    #[nested(group = "Sound")]
    pub sound: SoundParams,
    /// Which model answers, and its seed.
    #[nested(group = "Model")]
    pub model_choice: ModelParams,
    /// The model choice the worker loads from: the Model parameter's pick and the saved choice.
    pub model: Arc<ModelSlot>,
    /// The saved model choice (built in, or a trained model directory) of `model`, saved with
    /// the project.
    #[persist = "model"]
    pub saved_model: SavedModel,
    /// The name of the models-folder model the Model parameter picks, saved with the project so
    /// it reopens by name (`filter_state` turns it back into the parameter's position).
    #[persist = "model-pick"]
    pub model_pick: ModelPick,
}

/// The parameters of the Listen group: how a phrase is heard and when it ends.
#[derive(Params)]
pub struct ListenParams {
    /// Whether the notes played into the plugin are also sent out unchanged. Most hosts route a
    /// MIDI effect's input only through the plugin, so this defaults to on.
    #[id = "thru"]
    pub pass_through: BoolParam,
    /// How a phrase ends.
    #[id = "trigger"]
    pub trigger: EnumParam<TriggerParam>,
    /// Beats with every key up that end a phrase, in trigger mode Silence.
    #[id = "silence"]
    pub silence_beats: FloatParam,
    /// Bars that make a phrase, in trigger mode Bars.
    #[id = "phrbars"]
    pub phrase_bars: IntParam,
    /// Tempo of the free-running clock when the host gives none, in quarter notes per minute.
    #[id = "tempo"]
    pub free_tempo_bpm: FloatParam,
}

/// The parameters of the Answer group: when and how long the answer plays, and how free it is.
#[derive(Params)]
pub struct AnswerParams {
    /// Softmax temperature for sampling. 1.0 = model as trained. Reaches notes about a beat
    /// ahead of the playhead.
    #[id = "temp"]
    pub temperature: FloatParam,
    /// Where the answer starts.
    #[id = "start"]
    pub answer_start: EnumParam<AnswerStartParam>,
    /// Length of an answer in bars.
    #[id = "ansbars"]
    pub answer_bars: IntParam,
    /// The answer stops when the player plays again.
    #[id = "yield"]
    pub should_yield: BoolParam,
    /// The answer extends itself until stopped, instead of ending after its length.
    #[id = "contin"]
    pub is_continuous: BoolParam,
    /// One line or chords.
    #[id = "texture"]
    pub texture: EnumParam<TextureParam>,
    /// Most notes a chord answer sounds at once.
    #[id = "voices"]
    pub max_voices: IntParam,
}

/// The parameters of the Sound group: which notes the answer may use and how they sound.
#[derive(Params)]
pub struct SoundParams {
    /// Scale constraint of the answer.
    #[id = "keylock"]
    pub key_lock: EnumParam<KeyLockParam>,
    /// Tonic of the fixed key.
    #[id = "keyroot"]
    pub key_root: EnumParam<KeyRootParam>,
    /// Scale of the fixed key.
    #[id = "scale"]
    pub scale: EnumParam<ScaleParam>,
    /// Lowest answer note, as a MIDI note number.
    #[id = "lownote"]
    pub lowest_note: IntParam,
    /// Highest answer note, as a MIDI note number.
    #[id = "highnote"]
    pub highest_note: IntParam,
    /// Where answer velocities come from.
    #[id = "velmode"]
    pub velocity_mode: EnumParam<VelocityModeParam>,
    /// Fixed answer velocity.
    #[id = "vel"]
    pub velocity: IntParam,
    /// Share of each written note length that sounds, in percent.
    #[id = "gate"]
    pub gate_percent: FloatParam,
    /// MIDI channel of the answer, 1..=16.
    #[id = "chan"]
    pub channel: IntParam,
}

/// The parameters of the Model group: which model answers, and its seed.
#[derive(Params)]
pub struct ModelParams {
    /// Seed of the sampler: the same phrase and seed give the same answer.
    #[id = "seed"]
    pub seed: IntParam,
    /// Derive a new seed for every answer (from Seed, so a session stays reproducible).
    #[id = "fresh"]
    pub is_fresh_seed: BoolParam,
    /// Which model answers: 0 is the saved choice below (the built-in model unless the project
    /// names a directory); 1 and up are the models of the user's models folder, by name
    /// (`engine::library`). The worker loads it.
    #[id = "modelsel"]
    pub model_select: IntParam,
    /// Where the model runs: Auto, CPU or GPU. The worker loads the model there (chord models
    /// always run on the CPU); a GPU that is missing or fails leaves it on the CPU, and the
    /// status line says why.
    #[id = "device"]
    pub device: EnumParam<DeviceParam>,
}

/// The saved model choice of a model slot, as the project keeps it.
pub struct SavedModel(Arc<ModelSlot>);

/// The Model parameter's pick of a model slot as a name, as the project keeps it.
pub struct ModelPick(Arc<ModelSlot>);

impl<'a> PersistentField<'a, Option<String>> for ModelPick {
    fn set(&self, name: Option<String>) {
        self.0.restore_pick(name);
    }

    fn map<F, R>(&self, f: F) -> R
    where
        F: Fn(&Option<String>) -> R,
    {
        f(&self.0.picked_name())
    }
}

impl Default for AntiphonParams {
    fn default() -> Self {
        let bars = |name: &str, default: i32| {
            IntParam::new(name, default, IntRange::Linear { min: BARS_RANGE.0, max: BARS_RANGE.1 })
                .with_unit(" bars")
        };
        let note = |name: &str, default: i32| {
            IntParam::new(name, default, IntRange::Linear { min: 0, max: 127 })
                .with_value_to_string(formatters::v2s_i32_key_formatter())
                .with_string_to_value(formatters::s2v_i32_key_formatter())
        };
        let model = Arc::new(ModelSlot::new(ModelSource::Builtin));
        Self {
            bypass: BoolParam::new("Bypass", false).make_bypass(),
            answer_now: BoolParam::new("Answer Now", false),
            listen: ListenParams {
                pass_through: BoolParam::new("MIDI Thru", true),
                trigger: EnumParam::new("Trigger", TriggerParam::Silence),
                silence_beats: FloatParam::new(
                    "Silence",
                    1.0,
                    FloatRange::Linear { min: SILENCE_BEATS_RANGE.0, max: SILENCE_BEATS_RANGE.1 },
                )
                .with_step_size(0.25)
                .with_unit(" beats")
                .with_value_to_string(formatters::v2s_f32_rounded(2)),
                phrase_bars: bars("Phrase Length", 2),
                free_tempo_bpm: FloatParam::new(
                    "Free Tempo",
                    120.0,
                    FloatRange::Linear { min: FREE_TEMPO_RANGE_BPM.0, max: FREE_TEMPO_RANGE_BPM.1 },
                )
                .with_step_size(0.1)
                .with_unit(" BPM")
                .with_value_to_string(formatters::v2s_f32_rounded(1)),
            },
            answer: AnswerParams {
                temperature: FloatParam::new(
                    "Temperature",
                    1.0,
                    FloatRange::Skewed {
                        min: TEMPERATURE_RANGE.0,
                        max: TEMPERATURE_RANGE.1,
                        factor: FloatRange::skew_factor(-1.0),
                    },
                )
                .with_step_size(0.01)
                .with_value_to_string(formatters::v2s_f32_rounded(2)),
                answer_start: EnumParam::new("Answer Start", AnswerStartParam::NextBar),
                answer_bars: bars("Answer Length", 2),
                should_yield: BoolParam::new("Yield", true),
                is_continuous: BoolParam::new("Continuous", false),
                texture: EnumParam::new("Texture", TextureParam::Auto),
                max_voices: IntParam::new(
                    "Max Voices",
                    6,
                    IntRange::Linear { min: 1, max: MAX_ANSWER_VOICES as i32 },
                ),
            },
            sound: SoundParams {
                key_lock: EnumParam::new("Key Lock", KeyLockParam::Off),
                key_root: EnumParam::new("Key", KeyRootParam::C),
                scale: EnumParam::new("Scale", ScaleParam::Major),
                lowest_note: note("Lowest Note", 48),
                highest_note: note("Highest Note", 84),
                velocity_mode: EnumParam::new("Velocity Mode", VelocityModeParam::FromPhrase),
                velocity: IntParam::new("Velocity", 100, IntRange::Linear { min: 1, max: 127 }),
                gate_percent: FloatParam::new("Gate", 100.0, FloatRange::Linear { min: 10.0, max: 100.0 })
                    .with_step_size(1.0)
                    .with_unit(" %")
                    .with_value_to_string(formatters::v2s_f32_rounded(0)),
                channel: IntParam::new("Output Channel", 1, IntRange::Linear { min: 1, max: 16 }),
            },
            model_choice: ModelParams {
                model_select: model_select_param(&model),
                seed: IntParam::new("Seed", 1, IntRange::Linear { min: 0, max: 9999 }),
                is_fresh_seed: BoolParam::new("Fresh Seed", true),
                device: device_param(&model),
            },
            saved_model: SavedModel(model.clone()),
            model_pick: ModelPick(model.clone()),
            model,
        }
    }
}

/// The Model parameter: shows and parses the names of `slot`'s models, and hands its value to
/// `slot` (an atomic store, so the host may set it from the audio thread).
fn model_select_param(slot: &Arc<ModelSlot>) -> IntParam {
    let (shows, parses, hears) = (slot.clone(), slot.clone(), slot.clone());
    IntParam::new("Model", 0, IntRange::Linear { min: 0, max: MAX_LIBRARY_MODELS as i32 })
        .with_value_to_string(Arc::new(move |value| shows.slot_name(value.max(0) as usize)))
        .with_string_to_value(Arc::new(move |text| parses.slot_for_name(text).map(|s| s as i32)))
        .with_callback(Arc::new(move |value| hears.set_library_slot(value)))
}

/// The Device parameter: hands its value to `slot` (an atomic store).
fn device_param(slot: &Arc<ModelSlot>) -> EnumParam<DeviceParam> {
    let hears = slot.clone();
    EnumParam::new("Device", DeviceParam::Auto)
        .with_callback(Arc::new(move |value: DeviceParam| hears.set_device(value.choice())))
}

impl AntiphonParams {
    /// The parameters as the scheduler reads them for one block. Audio thread: no allocation.
    pub fn settings(&self) -> Settings {
        let key_lock = match self.sound.key_lock.value() {
            KeyLockParam::Off => KeyLock::Off,
            KeyLockParam::FollowPhrase => KeyLock::FollowPhrase,
            KeyLockParam::Fixed => KeyLock::Fixed(Key::from_tonic(
                self.sound.key_root.value().to_index() as u8,
                self.sound.scale.value().mode(),
            )),
        };
        Settings {
            is_bypassed: self.bypass.value(),
            is_thru: self.listen.pass_through.value(),
            temperature: self.answer.temperature.value(),
            trigger: match self.listen.trigger.value() {
                TriggerParam::Silence => TriggerMode::Silence,
                TriggerParam::Bars => TriggerMode::Bars,
                TriggerParam::Manual => TriggerMode::Manual,
            },
            silence_beats: self.listen.silence_beats.value() as f64,
            phrase_bars: self.listen.phrase_bars.value().max(1) as u32,
            is_answer_now: self.answer_now.value(),
            answer_start: match self.answer.answer_start.value() {
                AnswerStartParam::NextBar => AnswerStart::NextBar,
                AnswerStartParam::NextBeat => AnswerStart::NextBeat,
            },
            answer_bars: self.answer.answer_bars.value().max(1) as u32,
            should_yield: self.answer.should_yield.value(),
            is_continuous: self.answer.is_continuous.value(),
            texture: match self.answer.texture.value() {
                TextureParam::Auto => Texture::Auto,
                TextureParam::Melody => Texture::Melody,
                TextureParam::Chords => Texture::Chords,
            },
            max_voices: self.answer.max_voices.value().clamp(1, MAX_ANSWER_VOICES as i32) as u8,
            key_lock,
            lowest_pitch: self.sound.lowest_note.value().clamp(0, 127) as u8,
            highest_pitch: self.sound.highest_note.value().clamp(0, 127) as u8,
            velocity_mode: match self.sound.velocity_mode.value() {
                VelocityModeParam::FromPhrase => VelocityMode::FromPhrase,
                VelocityModeParam::Fixed => VelocityMode::Fixed,
            },
            velocity: self.sound.velocity.value().clamp(1, 127) as u8,
            gate: (self.sound.gate_percent.value() as f64 / 100.0).clamp(0.1, 1.0),
            channel: (self.sound.channel.value().clamp(1, 16) - 1) as u8,
            seed: self.model_choice.seed.value().max(0) as u32,
            is_fresh_seed: self.model_choice.is_fresh_seed.value(),
            free_tempo_bpm: self.listen.free_tempo_bpm.value() as f64,
        }
    }
}

impl<'a> PersistentField<'a, ModelSource> for SavedModel {
    fn set(&self, new_value: ModelSource) {
        // A choice that cannot be right leaves the current one.
        if new_value.validate().is_ok() {
            self.0.set(new_value);
        }
    }

    fn map<F, R>(&self, f: F) -> R
    where
        F: Fn(&ModelSource) -> R,
    {
        f(&self.0.get())
    }
}

/// Removes from a saved state every entry that would not load cleanly: parameters with unknown
/// ids, values of the wrong type, outside their range or not finite, and a model choice that
/// does not parse or validate. What is removed keeps its current (on a fresh instance, default)
/// value. Main thread, just before a state loads.
pub fn filter_state(state: &mut PluginState) {
    let reference = AntiphonParams::default();
    let param_map = reference.param_map();
    state.params.retain(|id, value| {
        let Some((_, ptr, _)) = param_map.iter().find(|(param_id, _, _)| param_id == id) else {
            return false;
        };
        is_value_valid(*ptr, value)
    });
    if let Some(text) = state.fields.get("model") {
        let is_valid =
            serde_json::from_str::<ModelSource>(text).is_ok_and(|choice| choice.validate().is_ok());
        if !is_valid {
            state.fields.remove("model");
        }
    }
    // A project saved with a model of the folder names it: the parameter's position follows the
    // name in today's list, or falls back to 0 (the model slot then reports the name missing).
    // Older projects saved only the position, which is kept.
    match state.fields.get("model-pick").map(|text| serde_json::from_str::<Option<String>>(text)) {
        Some(Ok(Some(name))) => {
            let slot = ModelLibrary::user().slot_of(&name).unwrap_or(0);
            state.params.insert("modelsel".to_string(), nice_plug::plugin::ParamValue::I32(slot as i32));
        }
        Some(Ok(None)) | None => {}
        Some(Err(_)) => {
            state.fields.remove("model-pick");
        }
    }
}

fn is_value_valid(ptr: ParamPtr, value: &nice_plug::plugin::ParamValue) -> bool {
    use nice_plug::plugin::ParamValue;
    // SAFETY: `ptr` points into `AntiphonParams` values that `filter_state` keeps alive for the
    // whole call; these calls only read the parameter's range.
    let (min, max, step_count) =
        unsafe { (ptr.preview_plain(0.0), ptr.preview_plain(1.0), ptr.step_count()) };
    let in_range = |v: f32| v.is_finite() && v >= min.min(max) && v <= max.max(min);
    match (ptr, value) {
        (ParamPtr::FloatParam(_), ParamValue::F32(v)) => in_range(*v),
        (ParamPtr::IntParam(_), ParamValue::I32(v)) => in_range(*v as f32),
        (ParamPtr::BoolParam(_), ParamValue::Bool(_)) => true,
        (ParamPtr::EnumParam(_), ParamValue::I32(idx)) => {
            step_count.is_some_and(|n| (0..=n as i32).contains(idx))
        }
        // Enum ids the parameter does not know are ignored by the framework itself.
        (ParamPtr::EnumParam(_), ParamValue::String(_)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nice_plug::plugin::ParamValue;

    fn state(params: &[(&str, ParamValue)], model: Option<&str>) -> PluginState {
        PluginState {
            version: "0.1.0".into(),
            params: params.iter().map(|(id, v)| (id.to_string(), v.clone())).collect(),
            fields: model.map(|m| ("model".to_string(), m.to_string())).into_iter().collect(),
        }
    }

    #[test]
    fn defaults_become_settings() {
        let settings = AntiphonParams::default().settings();
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn ids_are_unique_and_short() {
        let params = AntiphonParams::default();
        let map = params.param_map();
        let mut ids: Vec<&str> = map.iter().map(|(id, _, _)| id.as_str()).collect();
        assert!(ids.iter().all(|id| id.len() <= 8), "{ids:?}");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), map.len());
    }

    #[test]
    fn good_state_is_kept() {
        let mut s = state(
            &[
                ("temp", ParamValue::F32(0.5)),
                ("ansbars", ParamValue::I32(4)),
                ("yield", ParamValue::Bool(false)),
                ("trigger", ParamValue::String("bars".into())),
                ("scale", ParamValue::I32(6)),
            ],
            Some(r#"{"directory":"/home/me/models/reels"}"#),
        );
        let before = s.clone();
        filter_state(&mut s);
        assert_eq!(s.params.keys().collect::<Vec<_>>(), before.params.keys().collect::<Vec<_>>());
        assert_eq!(s.fields, before.fields);
    }

    #[test]
    fn junk_entries_are_removed() {
        let mut s = state(
            &[
                ("temp", ParamValue::F32(f32::NAN)),
                ("silence", ParamValue::F32(100.0)),
                ("ansbars", ParamValue::I32(0)),
                ("yield", ParamValue::I32(1)),
                ("scale", ParamValue::I32(7)),
                ("nonesuch", ParamValue::Bool(true)),
                ("chan", ParamValue::I32(16)),
            ],
            Some(r#"{"directory":""}"#),
        );
        filter_state(&mut s);
        assert_eq!(s.params.keys().collect::<Vec<_>>(), vec!["chan"]);
        assert!(s.fields.is_empty());
        let mut s = state(&[], Some("not json"));
        filter_state(&mut s);
        assert!(s.fields.is_empty());
    }

    #[test]
    fn the_model_slot_refuses_bad_choices() {
        let params = AntiphonParams::default();
        let epoch = params.model.epoch();
        PersistentField::set(&params.saved_model, ModelSource::Dir("  ".into()));
        assert_eq!(params.model.get(), ModelSource::Builtin);
        assert_eq!(params.model.epoch(), epoch);
        PersistentField::set(&params.saved_model, ModelSource::Dir("/tmp/m".into()));
        assert_eq!(params.model.get(), ModelSource::Dir("/tmp/m".into()));
        assert_eq!(params.model.epoch(), epoch + 1);
        assert_eq!(
            PersistentField::map(&params.saved_model, |c| c.clone()),
            ModelSource::Dir("/tmp/m".into())
        );
    }
}
