//! Distillation: trained models ("teachers") give every training target a distribution, and
//! the model in training learns from the mean of theirs besides the symbol that came. A
//! teacher's distribution says how likely each other continuation was too, which the single
//! symbol cannot, so a small network learns more from each window; the mean of several
//! teachers is better than any one of them. This is how a model of the generation budget's
//! size learns what an ensemble knows.
//! Runs on: offline threads (xtask train, tests). Calls candle.

use candle_core::{Device, Tensor, D};

use crate::forward::SequenceForward;
use crate::trainer::{batch_tensors, config_mismatch, score_windows, window_logits, EvalConfig, EvalMetrics};
use model::io::{LoadedModel, ModelSource};
use model::side::BarReader;
use model::{ModelConfig, ModelError};
use music::Vocab;

/// One teacher: its network, and the training stream in its vocabulary.
struct Teacher {
    model: LoadedModel,
    /// The training stream, each token renumbered into the teacher's vocabulary.
    tokens: Vec<u32>,
    reader: BarReader,
    /// For each token of the student's vocabulary, the teacher's number for the same symbol.
    columns: Tensor,
}

/// The teachers of a training run (none for a plain run).
pub struct Teachers {
    members: Vec<Teacher>,
}

impl Teachers {
    /// Loads each of `sources` (a model directory, or `builtin`) and renumbers `stream` (the
    /// training stream in `student`'s vocabulary) for it. A teacher must read the data as the
    /// student does (step grid, key convention, song delimiter, bar meters) and know every
    /// symbol of the student's vocabulary; its sizes, inputs and lookback may differ.
    pub fn load(
        sources: &[String],
        student: &ModelConfig,
        stream: &[u32],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut members = Vec::with_capacity(sources.len());
        for source in sources {
            let source = ModelSource::parse(source);
            let model = LoadedModel::load_on(&source, device)?;
            if let Some(problem) = convention_mismatch(&model.config, student) {
                return Err(ModelError::Data(format!(
                    "cannot learn from {source}: it has {problem} (a teacher must read the data as the run does)"
                )));
            }
            let mut renumber = Vec::with_capacity(student.vocab.len());
            for &symbol in student.vocab.symbols() {
                let id = model.config.vocab.id(symbol).ok_or_else(|| {
                    ModelError::Data(format!(
                        "cannot learn from {source}: its vocabulary lacks the run's symbol {symbol}"
                    ))
                })?;
                renumber.push(id.0 as u32);
            }
            let tokens = stream.iter().map(|&t| renumber[t as usize]).collect();
            let columns = Tensor::from_vec(renumber, student.vocab.len(), device)?;
            let reader = BarReader::for_model(&model.config);
            members.push(Teacher { model, tokens, reader, columns });
        }
        Ok(Self { members })
    }

    /// The teachers' mean distribution over the student's vocabulary for every target of the
    /// batch of windows starting at `starts`, in the order `batch_tensors` gives the targets
    /// (`mean_distribution`). bars: the training stream's bar positions →
    /// `[window_len * batch, student vocab]`
    pub fn soft_targets(
        &self,
        bars: &[u32],
        starts: &[usize],
        window_len: usize,
        device: &Device,
    ) -> Result<Option<Tensor>, ModelError> {
        self.mean_distribution(&mut |_, teacher| {
            let (inputs, input_bars, _) =
                batch_tensors(&teacher.tokens, bars, &teacher.reader, starts, window_len, device)?;
            let logits = teacher.model.lstm.predict_time_major(&inputs, Some(&input_bars))?;
            Ok(logits.reshape(((), teacher.model.config.vocab_len()))?)
        })
    }

    /// The mean over the teachers of each one's distribution over the student's vocabulary,
    /// from the logits (`[targets, teacher vocab]`) that `logits_of` gives for teacher `k`.
    /// Mass a teacher puts on symbols the student lacks is left out and the rest renormalised.
    fn mean_distribution(
        &self,
        logits_of: &mut dyn FnMut(usize, &Teacher) -> Result<Tensor, ModelError>,
    ) -> Result<Option<Tensor>, ModelError> {
        let mut sum: Option<Tensor> = None;
        for (k, teacher) in self.members.iter().enumerate() {
            let logits = logits_of(k, teacher)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?.index_select(&teacher.columns, 1)?;
            let probs = probs.broadcast_div(&probs.sum_keepdim(D::Minus1)?)?;
            sum = Some(match sum {
                Some(sum) => (sum + probs)?,
                None => probs,
            });
        }
        Ok(sum.map(|s| s / self.members.len() as f64).transpose()?)
    }

    /// Whether the run has no teachers.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The recipe's metric (`train::evaluate`) for the teachers' mean distribution, the one
    /// the run learns from, over a validation stream in the student's vocabulary: how good a
    /// student that copied them perfectly would be. An error without teachers.
    pub fn evaluate(
        &self,
        tokens: &[u32],
        bars: &[u32],
        vocab: &Vocab,
        eval: &EvalConfig,
        progress: &mut dyn FnMut(usize),
    ) -> Result<EvalMetrics, ModelError> {
        if self.members.is_empty() {
            return Err(ModelError::Data("there are no teachers to validate".into()));
        }
        let mut streams = Vec::with_capacity(self.members.len());
        for teacher in &self.members {
            let renumber = teacher.columns.to_vec1::<u32>()?;
            let renumbered: Vec<u32> = tokens.iter().map(|&t| renumber[t as usize]).collect();
            streams.push((renumbered, teacher.model.lstm.step_weights()?));
        }
        score_windows(tokens, vocab, eval, progress, &mut |chunk| {
            let mean = self.mean_distribution(&mut |k, teacher| {
                let (tokens, weights) = &streams[k];
                window_logits(&teacher.model.lstm, weights, tokens, bars, chunk, eval.context_len)
            })?;
            Ok(mean.expect("at least one teacher").log()?)
        })
    }
}

/// The first convention in which `teacher` reads the data differently from `student`.
fn convention_mismatch(teacher: &ModelConfig, student: &ModelConfig) -> Option<String> {
    config_mismatch(teacher, student, &|what| {
        matches!(what, "step grid" | "key convention" | "song delimiter" | "bar meters")
    })
}
