//! A trained model on disk and in memory: the model directory (`model.safetensors`,
//! `config.json`, `train.json`, and the tune memory's `memory.bin` and `memory.json` where it
//! has one), strict validation at load, and the built-in default model.
//! Runs on: the worker thread (loading) and offline threads (saving). Reads whole files into
//! memory (a buffered read, never mmap), so a file changing under a running host cannot fault.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use safetensors::{Dtype, SafeTensors};

use super::byte_planes::{self, F32Bytes};
use super::config::{InputKind, ModelConfig};
use super::lstm::{GenState, MelodyLstm, StepWeights};
use super::memory::{MemoryConfig, Recall, RecallCursor, TuneMemory, MEMORY_CONFIG_FILE, MEMORY_FILE};
use super::ModelError;
use music::TokenId;

/// The weights file of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The `ModelConfig` file of a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The training summary of a model directory (data, split, epochs, losses).
pub const TRAIN_FILE: &str = "train.json";

/// The built-in model's config, embedded at compile time.
const BUILTIN_CONFIG: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../presets/models/default/config.json"));
/// The built-in model's weights, deflated by `build.rs` (f32 tensors in byte planes) and
/// embedded at compile time.
const BUILTIN_WEIGHTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/default-model.safetensors.deflate"));
/// The built-in model's tune memory settings, embedded at compile time.
const BUILTIN_MEMORY_CONFIG: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../presets/models/default/memory.json"));
/// The built-in model's tune memory, deflated by `build.rs` and embedded at compile time.
const BUILTIN_MEMORY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/default-memory.bin.deflate"));
/// Where the built-in model came from, for error messages.
const BUILTIN_ORIGIN: &str = "built-in model (presets/models/default)";

/// Headers beyond this size are refused as corrupt, as the safetensors crate does.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// A validated model ready to run: its config and its network. Immutable once loaded, so the
/// worker shares it as `Arc<LoadedModel>` and builds a cheap `Generator` from it per phrase.
#[derive(Debug)]
pub struct LoadedModel {
    /// Sizes, vocabulary and conventions.
    pub config: ModelConfig,
    /// The network.
    pub lstm: MelodyLstm,
    /// Where it was loaded from (a directory, or the built-in model), for messages.
    pub origin: String,
    /// Its training songs, indexed, mixed into every prediction (`memory`); `None` for a model
    /// without one, or with it set aside.
    pub memory: Option<TuneMemory>,
    /// The weights arranged for one step of one sequence.
    step_weights: StepWeights,
}

impl LoadedModel {
    /// Loads and validates a model directory onto the CPU.
    pub fn load_dir(dir: &Path) -> Result<Self, ModelError> {
        Self::load_dir_on(dir, &Device::Cpu)
    }

    /// Loads and validates a model directory onto `device`.
    pub fn load_dir_on(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_on(&ModelSource::Dir(dir.to_path_buf()), device)
    }

    /// Loads and validates a model directory or the built-in model onto `device`.
    pub fn load_on(source: &ModelSource, device: &Device) -> Result<Self, ModelError> {
        let (config, tensors) = read_model_parts(source, device)?;
        let memory = read_memory(source, config.vocab_len())?;
        Ok(Self::from_tensors(config, tensors, &source.to_string(), device)?.with_memory(memory))
    }

    /// Loads a model from the bytes of its `config.json` and `model.safetensors`. `origin`
    /// names it in errors.
    pub fn from_bytes(
        config_json: &[u8],
        weights: &[u8],
        origin: &str,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config = parse_config(config_json, &format!("{origin}/{CONFIG_FILE}"))?;
        let tensors = read_weights(weights, &format!("{origin}/{WEIGHTS_FILE}"), &config, device)?;
        Self::from_tensors(config, tensors, origin, device)
    }

    /// The default model built into the plugin (trained on folk melodies), on the CPU.
    pub fn builtin() -> Result<Self, ModelError> {
        Self::load_on(&ModelSource::Builtin, &Device::Cpu)
    }

    fn from_tensors(
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        origin: &str,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let lstm = MelodyLstm::new(&config, VarBuilder::from_tensors(tensors, DType::F32, device))?;
        Self::new(config, lstm, origin)
    }

    /// A model from a network already built (for tests and freshly trained weights), without a
    /// tune memory.
    pub fn new(config: ModelConfig, lstm: MelodyLstm, origin: &str) -> Result<Self, ModelError> {
        let step_weights = lstm.step_weights()?;
        Ok(Self { config, lstm, origin: origin.to_string(), memory: None, step_weights })
    }

    /// The same model with `memory` (or none) as its tune memory.
    pub fn with_memory(mut self, memory: Option<TuneMemory>) -> Self {
        self.memory = memory;
        self
    }

    /// Symbols of history the tune memory reads (0 without one).
    pub fn memory_context(&self) -> usize {
        self.memory.as_ref().map_or(0, |m| m.config().max_context)
    }

    /// Readies the tune memory's next search (`TuneMemory::prefetch`), for a history that will
    /// end with `token`: called before `step_at`, its cache misses overlap the step.
    pub fn prefetch_memory(&self, token: TokenId, cursor: &mut RecallCursor) {
        if let Some(memory) = &self.memory {
            memory.prefetch(cursor, token.0 as u32);
        }
    }

    /// Mixes the tune memory, if the model has one, into the next symbol's `logits` (`[vocab]`,
    /// as `step` wrote them) for the tokens fed so far (`history`, newest last): they become
    /// log-probabilities. `cursor` is where the last call's search ended, for a history one
    /// symbol shorter (`RecallCursor`). Neither allocates nor locks. Returns what the memory
    /// recalled.
    pub fn mix_memory(
        &self,
        history: &[u32],
        cursor: &mut RecallCursor,
        logits: &mut [f32],
    ) -> Option<Recall> {
        self.memory.as_ref()?.mix_near(history, cursor, logits)
    }

    /// A zero recurrent state sized for this model.
    pub fn new_state(&self) -> GenState {
        GenState::zeros(self.config.num_layers, self.config.hidden_size)
    }

    /// Feeds `token` to one sequence: updates `state` and writes the next symbol's logits
    /// (`[vocab]`) into `logits`. Generation goes through here only, so a faster step kernel
    /// can take over without touching its callers.
    pub fn step(&self, token: TokenId, state: &mut GenState, logits: &mut [f32]) -> Result<(), ModelError> {
        self.step_at(token, &[], state, logits)
    }

    /// `step` for a token with its bar inputs: its step's bar position (`music::bar`), then the
    /// tokens one, two... bars before the next step (`BarReader`); missing ones read as none,
    /// and a model without bar inputs ignores them.
    pub fn step_at(
        &self,
        token: TokenId,
        bars: &[u16],
        state: &mut GenState,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        Ok(self.lstm.step(&self.step_weights, token, bars, state, logits)?)
    }
}

/// A model to read: a model directory, or the one built in. Projects save the plugin's choice
/// in this form (`"builtin"` or `{"directory": PATH}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// The built-in model (`presets/models/default`).
    #[default]
    Builtin,
    /// A model directory (`config.json` and `model.safetensors`).
    #[serde(rename = "directory")]
    Dir(PathBuf),
}

impl ModelSource {
    /// Checks the source can be what a user picked: a directory path must be non-empty, without
    /// NUL bytes and of a sane length. Whether it loads is found out by loading it.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Builtin => Ok(()),
            Self::Dir(path) if path.as_os_str().to_string_lossy().trim().is_empty() => {
                Err("the path is empty".into())
            }
            Self::Dir(path)
                if path.as_os_str().to_string_lossy().contains('\0') || path.as_os_str().len() > 4096 =>
            {
                Err("the path is not a usable path".into())
            }
            Self::Dir(_) => Ok(()),
        }
    }

    /// How a musician reads it: "the built-in model", or "the model in PATH".
    pub fn describe(&self) -> String {
        match self {
            Self::Builtin => "the built-in model".to_string(),
            Self::Dir(path) => format!("the model in {}", path.display()),
        }
    }

    /// `builtin`, or else a directory path (write `./builtin` for a folder of that name).
    pub fn parse(text: &str) -> Self {
        if text == "builtin" {
            Self::Builtin
        } else {
            Self::Dir(PathBuf::from(text))
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin => f.write_str(BUILTIN_ORIGIN),
            Self::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// The bytes of a built-in model's file that `build.rs` deflated; the problem named otherwise.
pub(crate) fn inflate_builtin(deflated: &[u8]) -> Result<Vec<u8>, String> {
    miniz_oxide::inflate::decompress_to_vec(deflated)
        .map_err(|err| format!("cannot inflate the embedded copy: {err}"))
}

/// A built-in model's `model.safetensors`, which `build.rs` deflated with its f32 tensors in
/// byte planes (`byte_planes`), as the file was; the problem named otherwise.
pub(crate) fn inflate_builtin_weights(deflated: &[u8]) -> Result<Vec<u8>, String> {
    let mut file = inflate_builtin(deflated)?;
    byte_planes::rearrange(&mut file, F32Bytes::Planes, F32Bytes::Interleaved)?;
    Ok(file)
}

/// Reads and validates a model's config.
pub fn read_model_config(source: &ModelSource) -> Result<ModelConfig, ModelError> {
    match source {
        ModelSource::Builtin => parse_config(BUILTIN_CONFIG, &format!("{BUILTIN_ORIGIN}/{CONFIG_FILE}")),
        ModelSource::Dir(dir) => {
            let path = dir.join(CONFIG_FILE);
            parse_config(&read_file(&path)?, &path.display().to_string())
        }
    }
}

/// Reads and validates a model's config and weights, the weights as f32 on `device`.
pub fn read_model_parts(
    source: &ModelSource,
    device: &Device,
) -> Result<(ModelConfig, HashMap<String, Tensor>), ModelError> {
    let config = read_model_config(source)?;
    let tensors = match source {
        ModelSource::Builtin => {
            let path = format!("{BUILTIN_ORIGIN}/{WEIGHTS_FILE}");
            let bytes = inflate_builtin_weights(BUILTIN_WEIGHTS)
                .map_err(|reason| ModelError::CorruptWeights { path: path.clone(), reason })?;
            read_weights(&bytes, &path, &config, device)?
        }
        ModelSource::Dir(dir) => {
            let path = dir.join(WEIGHTS_FILE);
            read_weights(&read_file(&path)?, &path.display().to_string(), &config, device)?
        }
    };
    Ok((config, tensors))
}

/// Reads the tune memory of a model directory, or the built-in one: `None` for a directory
/// without `memory.json`.
pub fn read_memory(source: &ModelSource, vocab_len: usize) -> Result<Option<TuneMemory>, ModelError> {
    let (config_bytes, config_path, bytes, path) = match source {
        ModelSource::Builtin => {
            let path = format!("{BUILTIN_ORIGIN}/{MEMORY_FILE}");
            let bytes = inflate_builtin(BUILTIN_MEMORY)
                .map_err(|problem| ModelError::CorruptMemory { path: path.clone(), problem })?;
            (
                Cow::Borrowed(BUILTIN_MEMORY_CONFIG),
                format!("{BUILTIN_ORIGIN}/{MEMORY_CONFIG_FILE}"),
                Cow::Owned(bytes),
                path,
            )
        }
        ModelSource::Dir(dir) => {
            let (config_path, path) = (dir.join(MEMORY_CONFIG_FILE), dir.join(MEMORY_FILE));
            if !config_path.exists() {
                if path.exists() {
                    return Err(ModelError::CorruptMemory {
                        path: path.display().to_string(),
                        problem: format!("found without the {MEMORY_CONFIG_FILE} that says how to use it"),
                    });
                }
                return Ok(None);
            }
            (
                Cow::Owned(read_file(&config_path)?),
                config_path.display().to_string(),
                Cow::Owned(read_file(&path)?),
                path.display().to_string(),
            )
        }
    };
    let config: MemoryConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
        ModelError::CorruptMemory { path: config_path.clone(), problem: format!("not memory settings: {e}") }
    })?;
    config.validate().map_err(|problem| ModelError::CorruptMemory { path: config_path, problem })?;
    TuneMemory::from_bytes(&bytes, &path, vocab_len, config).map(Some)
}

/// Writes `model.safetensors` and `config.json` of `lstm` into `dir` (created if needed).
/// `train.json` is the trainer's to write.
pub fn save_model(dir: &Path, config: &ModelConfig, lstm: &MelodyLstm) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?;
    save_weights(&dir.join(WEIGHTS_FILE), lstm)?;
    save_config(&dir.join(CONFIG_FILE), config)
}

/// Writes the network's tensors as safetensors (f32, on the CPU).
pub fn save_weights(path: &Path, lstm: &MelodyLstm) -> Result<(), ModelError> {
    let tensors = lstm
        .named_tensors()
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    save_tensors(path, tensors)
}

/// Name suffix of the tensor that holds, for a weight matrix stored as int8, each row's grid
/// exponent (int8, one per row): the matrix is `q · 2^e` row by row (see `int8`).
pub const GRID_EXPONENTS_SUFFIX: &str = ".grid_exponents";

/// Writes `tensors` as safetensors, moved to the CPU, as they are typed; except that an f32
/// matrix whose every row lies on its int8 grid (a quantized model's LSTM weights) is stored as
/// its int8 integers and the rows' exponents, a quarter of the bytes for the same values.
pub fn save_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Result<(), ModelError> {
    let mut stored: Vec<(String, StoredTensor)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_device(&Device::Cpu)?;
        match crate::int8::grid_integers(&tensor)? {
            Some((integers, exponents)) => {
                let rows = exponents.len();
                stored.push((
                    format!("{name}{GRID_EXPONENTS_SUFFIX}"),
                    StoredTensor::int8(vec![rows], exponents),
                ));
                stored.push((name, StoredTensor::int8(tensor.dims().to_vec(), integers)));
            }
            None => stored.push((name, StoredTensor::Tensor(tensor))),
        }
    }
    safetensors::serialize_to_file(stored, None, path).map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// A tensor to write: candle's, or int8 bytes of a matrix on its grid.
enum StoredTensor {
    Tensor(Tensor),
    Int8 { shape: Vec<usize>, bytes: Vec<u8> },
}

impl StoredTensor {
    fn int8(shape: Vec<usize>, values: Vec<i8>) -> Self {
        StoredTensor::Int8 { shape, bytes: values.into_iter().map(|v| v as u8).collect() }
    }
}

impl safetensors::View for StoredTensor {
    fn dtype(&self) -> Dtype {
        match self {
            StoredTensor::Tensor(t) => safetensors::View::dtype(t),
            StoredTensor::Int8 { .. } => Dtype::I8,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            StoredTensor::Tensor(t) => t.dims(),
            StoredTensor::Int8 { shape, .. } => shape,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            StoredTensor::Tensor(t) => safetensors::View::data(t),
            StoredTensor::Int8 { bytes, .. } => Cow::Borrowed(bytes),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            StoredTensor::Tensor(t) => safetensors::View::data_len(t),
            StoredTensor::Int8 { bytes, .. } => bytes.len(),
        }
    }
}

/// The tensor `name` of `file` as f32 on the CPU: as stored, or, stored as int8, its integers
/// times their rows' grid scales (exactly the values that were saved).
fn load_tensor(file: &SafeTensors, name: &str, path: &str) -> Result<Tensor, ModelError> {
    let view = file
        .tensor(name)
        .map_err(|_| ModelError::MissingTensor { path: path.to_string(), name: name.into() })?;
    if view.dtype() != Dtype::I8 {
        return Ok(candle_core::safetensors::Load::load(&view, &Device::Cpu)?);
    }
    let corrupt = |reason: String| ModelError::CorruptWeights { path: path.to_string(), reason };
    let exponents_name = format!("{name}{GRID_EXPONENTS_SUFFIX}");
    let exponents = file
        .tensor(&exponents_name)
        .map_err(|_| corrupt(format!("{name} is stored as int8 without its {exponents_name}")))?;
    let (rows, cols) = match view.shape() {
        [rows, cols] => (*rows, *cols),
        shape => return Err(corrupt(format!("{name} is stored as int8 but has the shape {shape:?}"))),
    };
    if exponents.dtype() != Dtype::I8 || exponents.shape() != [rows] {
        return Err(corrupt(format!("{exponents_name} is not one int8 exponent for each of {rows} rows")));
    }
    let integers: Vec<i8> = view.data().iter().map(|&b| b as i8).collect();
    let exponents: Vec<i8> = exponents.data().iter().map(|&b| b as i8).collect();
    let values = crate::int8::from_grid(&integers, &exponents, cols).map_err(corrupt)?;
    Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
}

/// Every tensor of the safetensors file at `path`, on `device`, as stored (a matrix stored as
/// int8 comes back as its f32 values); a truncated or otherwise unreadable file is told apart
/// in the error.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, ModelError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: shown.clone(), source })?;
    check_length(&bytes, &shown)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::CorruptWeights { path: shown.clone(), reason: e.to_string() })?;
    let mut out = HashMap::new();
    for name in file.names() {
        if name.ends_with(GRID_EXPONENTS_SUFFIX) {
            continue;
        }
        out.insert(name.to_string(), load_tensor(&file, name, &shown)?.to_device(device)?);
    }
    Ok(out)
}

/// Writes `config` as pretty JSON.
pub fn save_config(path: &Path, config: &ModelConfig) -> Result<(), ModelError> {
    let json = serde_json::to_string_pretty(config).expect("a ModelConfig always serialises");
    std::fs::write(path, json + "\n")
        .map_err(|source| ModelError::Io { path: path.display().to_string(), source })
}

/// Reads a whole file; a missing file is `MissingFile`.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile { path: path.display().to_string() },
        _ => ModelError::Io { path: path.display().to_string(), source },
    })
}

/// Parses and validates `config.json`.
pub fn parse_config(bytes: &[u8], path: &str) -> Result<ModelConfig, ModelError> {
    let config: ModelConfig = serde_json::from_slice(bytes)
        .map_err(|source| ModelError::ConfigParse { path: path.to_string(), source })?;
    config.validate().map_err(|problem| ModelError::InvalidConfig { path: path.to_string(), problem })?;
    Ok(config)
}

/// Reads safetensors `bytes` and checks them against `config`: every tensor present with its
/// shape, nothing extra, a float type, every value finite. Returns the tensors as f32 on
/// `device`. `path` names the file in errors.
pub fn read_weights(
    bytes: &[u8],
    path: &str,
    config: &ModelConfig,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    read_expected_tensors(bytes, path, MelodyLstm::tensor_shapes(config), device, |name, shape, got| {
        shape_error(path, name, shape, got, config)
    })
}

/// `read_weights` for any network: `expected` lists every tensor's name and shape, and
/// `mismatch` words a tensor whose shape differs (name, expected, found).
pub fn read_expected_tensors(
    bytes: &[u8],
    path: &str,
    expected: Vec<(String, Vec<usize>)>,
    device: &Device,
    mismatch: impl Fn(&str, &[usize], &[usize]) -> ModelError,
) -> Result<HashMap<String, Tensor>, ModelError> {
    check_length(bytes, path)?;
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::CorruptWeights { path: path.to_string(), reason: e.to_string() })?;
    for (name, shape) in &expected {
        let view = file
            .tensor(name)
            .map_err(|_| ModelError::MissingTensor { path: path.to_string(), name: name.clone() })?;
        if view.shape() != shape.as_slice() {
            return Err(mismatch(name, shape, view.shape()));
        }
    }
    let is_expected = |stored: &str| {
        let base = stored.strip_suffix(GRID_EXPONENTS_SUFFIX).unwrap_or(stored);
        expected.iter().any(|(name, _)| name == base)
    };
    if let Some(extra) = file.names().into_iter().find(|n| !is_expected(n)) {
        return Err(ModelError::UnexpectedTensor { path: path.to_string(), name: extra.to_string() });
    }
    let mut out = HashMap::with_capacity(expected.len());
    for (name, _) in expected {
        let view = file.tensor(&name).expect("checked above");
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::I8) {
            return Err(ModelError::UnsupportedDtype {
                path: path.to_string(),
                name,
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let tensor = load_tensor(&file, &name, path)?.to_dtype(DType::F32)?;
        let num_bad = tensor.flatten_all()?.to_vec1::<f32>()?.iter().filter(|x| !x.is_finite()).count();
        if num_bad > 0 {
            return Err(ModelError::NonFinite { path: path.to_string(), name, num_bad });
        }
        out.insert(name, tensor.to_device(device)?);
    }
    Ok(out)
}

/// A truncated file is told apart from other damage by comparing its length with what the
/// header announces: 8 bytes of header length, the header, then the data.
fn check_length(bytes: &[u8], path: &str) -> Result<(), ModelError> {
    let truncated = |expected_bytes: u64| ModelError::Truncated {
        path: path.to_string(),
        expected_bytes,
        got_bytes: bytes.len() as u64,
    };
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(truncated(8));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(ModelError::CorruptWeights {
            path: path.to_string(),
            reason: format!("header length {header_len} is implausible"),
        });
    }
    let Some(header) = bytes.get(8..8 + header_len as usize) else {
        return Err(truncated(8 + header_len));
    };
    let header: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| ModelError::CorruptWeights { path: path.to_string(), reason: format!("header: {e}") })?;
    let data_end = header
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(_, info)| info.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    // `data_end` is whatever the file claims; `8 + header_len` is bounded above.
    let Some(expected) = (8 + header_len).checked_add(data_end) else {
        return Err(ModelError::CorruptWeights {
            path: path.to_string(),
            reason: format!("data offset {data_end} is implausible"),
        });
    };
    if (bytes.len() as u64) < expected {
        return Err(truncated(expected));
    }
    Ok(())
}

/// A shape mismatch, reported as a vocabulary mismatch when only the vocabulary dimension
/// differs.
fn shape_error(
    path: &str,
    name: &str,
    expected: &[usize],
    got: &[usize],
    config: &ModelConfig,
) -> ModelError {
    let vocab_dim = match name {
        "embedding.weight" | "head.weight" | "head.bias" => Some(0),
        "lstm.weight_ih_l0" if config.input == InputKind::OneHot => Some(1),
        _ => None,
    };
    if let Some(dim) = vocab_dim {
        let others_agree = expected.len() == got.len()
            && expected.iter().zip(got).enumerate().all(|(i, (e, g))| i == dim || e == g);
        if others_agree {
            return ModelError::VocabMismatch {
                path: path.to_string(),
                name: name.to_string(),
                config_len: expected[dim],
                weights_len: got[dim],
            };
        }
    }
    ModelError::ShapeMismatch {
        path: path.to_string(),
        name: name.to_string(),
        expected: expected.to_vec(),
        got: got.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weights file of `header` (its length in front, as the format has it) and `data`.
    fn weights_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    /// The embedded copies, deflated with their f32 tensors in byte planes, inflate to the
    /// files in `presets/models` byte for byte.
    #[test]
    fn the_builtin_models_inflate_to_their_files() {
        let presets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../presets/models");
        let builtins = [
            ("default/model.safetensors", inflate_builtin_weights(BUILTIN_WEIGHTS)),
            ("default/memory.bin", inflate_builtin(BUILTIN_MEMORY)),
            ("chords/model.safetensors", inflate_builtin_weights(crate::chords::BUILTIN_WEIGHTS)),
        ];
        for (file, inflated) in builtins {
            let on_disk = std::fs::read(presets.join(file)).unwrap();
            assert!(inflated.unwrap() == on_disk, "{file} differs from its embedded copy");
        }
    }

    #[test]
    fn a_matrix_on_its_int8_grid_is_stored_as_int8_and_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut on_grid: Vec<f32> = (0..64 * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for row in on_grid.chunks_mut(32) {
            crate::int8::round_row(row);
        }
        let off_grid: Vec<f32> = (0..64 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
        let tensors = HashMap::from([
            ("on".to_string(), Tensor::from_vec(on_grid.clone(), (64, 32), &Device::Cpu).unwrap()),
            ("off".to_string(), Tensor::from_vec(off_grid.clone(), (64, 32), &Device::Cpu).unwrap()),
        ]);
        let path = dir.path().join("w.safetensors");
        save_tensors(&path, tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.tensor("on").unwrap().dtype(), Dtype::I8);
        assert_eq!(file.tensor("off").unwrap().dtype(), Dtype::F32);
        // 64 rows of 32 int8 weights and 64 exponents, against 8 KiB of f32.
        assert!(bytes.len() < 64 * 32 * 4 + 64 * 32 + 64 + 400, "{} bytes", bytes.len());
        let back = read_tensors(&path, &Device::Cpu).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["on"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), on_grid);
        assert_eq!(back["off"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), off_grid);
        let expected = vec![("on".to_string(), vec![64, 32]), ("off".to_string(), vec![64, 32])];
        let read = read_expected_tensors(&bytes, "w.safetensors", expected, &Device::Cpu, |name, _, _| {
            ModelError::MissingTensor { path: String::new(), name: name.into() }
        })
        .unwrap();
        assert_eq!(read["on"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), on_grid);

        // The integers without their exponents are refused by name.
        let header = r#"{"on":{"dtype":"I8","shape":[1,2],"data_offsets":[0,2]}}"#;
        let err = read_expected_tensors(
            &weights_file(header, &[1, 2]),
            "w.safetensors",
            vec![("on".to_string(), vec![1, 2])],
            &Device::Cpu,
            |name, _, _| ModelError::MissingTensor { path: String::new(), name: name.into() },
        )
        .unwrap_err();
        assert!(err.to_string().contains("on is stored as int8 without its on.grid_exponents"), "{err}");
    }

    #[test]
    fn a_header_that_claims_more_data_than_exists_is_refused_by_name() {
        // An offset near u64::MAX once overflowed the length check (found by the
        // `safetensors_header` fuzz target).
        let huge = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#;
        let err = check_length(&weights_file(huge, &[0; 4]), "m/model.safetensors").unwrap_err();
        assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
        assert!(err.to_string().contains("m/model.safetensors"), "{err}");
        // A plainly short file is truncated; a whole one passes.
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let short = check_length(&weights_file(header, &[0; 4]), "m/model.safetensors").unwrap_err();
        assert!(matches!(short, ModelError::Truncated { .. }), "{short}");
        assert!(check_length(&weights_file(header, &[0; 8]), "m/model.safetensors").is_ok());
    }
}
