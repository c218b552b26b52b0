//! The tune memory: the training songs themselves, kept beside the network, so that where the
//! symbols just played continue a passage of a song the model learned from, the prediction
//! leans toward what followed there. Folk songs travel in variants; a network of 1.5 M weights
//! cannot hold 1.4 M symbols of them verbatim, and an index of them can.
//! Runs on: the worker thread (`recall`, `mix` and `prefetch`, through the generator; none
//! allocates) and offline threads (building, fitting, eval).
//!
//! At each step the memory finds the longest suffix of the history, up to `max_context`
//! symbols, that occurs somewhere in the training stream followed by a symbol. Where that
//! suffix occurs at most `max_count` times, the symbols that followed its occurrences give a
//! distribution `m`, and the prediction becomes `(1 - λ) p + λ m`, with `p` the network's
//! softmax and `λ` read from a table by the match's length and count (longer and rarer matches
//! earn more weight). A suffix found more often says nothing the network does not already know,
//! and a history that matches nothing leaves `p` as it is. The table is fitted on held-out songs
//! (`fit_weights`), so the mixture can only be as sure of the memory as the memory has earned.
//!
//! The index: every position `p` of the stream (the symbol at `p` following the context that
//! ends at `p - 1`) is sorted by its context read backwards, `stream[p-1], stream[p-2], ...`, up
//! to `max_context` symbols. Contexts sharing a suffix then lie side by side, so a binary search
//! finds the longest match, and the lengths common to neighbours (`lcp`) give the run of
//! positions sharing it without reading the stream again. A table of the first two symbols of
//! every context narrows the search before it starts.
//!
//! A generator asks once a step, each history its last plus one symbol, and most of a search's
//! time goes to cache misses (a step's lookup touches the index cold). A `RecallCursor` keeps
//! where the last search ended; the next query is the last one with the new symbol in front, so
//! its place in the order is about where the contexts starting with that symbol begin, plus how
//! many contexts before the last place were followed by it (the last-to-first mapping of a
//! suffix array). Counts of each following symbol every `RANK_STRIDE` entries give that number
//! from one table row and a short scan, and the search gallops out from the guess: a handful
//! of reads where a binary search over the whole run of contexts makes thirty. A wrong guess
//! costs time, never a different answer. Those few reads still miss the cache, so they are
//! started early: each search begins fetching what the next guess reads, and `prefetch`,
//! called before the network's step with the symbol being fed, makes the guess and begins
//! fetching the entries around it while the step runs. The index's arrays are kept on huge
//! pages where the system offers them (`huge_pages`), so those reads rarely also walk the page
//! tables.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;
use crate::huge_pages::HugePageArray;
use crate::metrics::EvalMetrics;

/// File of a model directory holding the memory's training stream.
pub const MEMORY_FILE: &str = "memory.bin";
/// File of a model directory holding the memory's settings and fitted weights.
pub const MEMORY_CONFIG_FILE: &str = "memory.json";

/// First bytes of `memory.bin`.
const MAGIC: &[u8; 8] = b"APMEMv1\n";
/// Bytes of `memory.bin` before its symbols: the magic, the vocabulary size and the symbol count
/// (both u32, little-endian).
const HEADER_BYTES: usize = 16;
/// Symbols are stored one byte each.
pub const MAX_VOCAB: usize = 256;
/// Entries of the index between two rows of `TuneMemory::followers_before`.
const RANK_STRIDE: usize = 128;

/// How the memory is consulted and how much it is trusted. Saved as `memory.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Longest suffix of the history looked up, in symbols (the recipe's window: 64).
    pub max_context: usize,
    /// A suffix occurring more often than this is too common to add anything: no mixing.
    pub max_count: u32,
    /// Lower ends of the match-length classes after the first (which starts at 1), ascending.
    pub length_edges: Vec<usize>,
    /// Lower ends of the occurrence-count classes after the first (which starts at 1),
    /// ascending.
    pub count_edges: Vec<u32>,
    /// `λ` per class: `weights[count_class][length_class]`, each in `[0, 1)`.
    pub weights: Vec<Vec<f32>>,
    /// What the weights were fitted on, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fitted_on: Option<String>,
    /// How the model scored on each held-out set without and with the memory, once fitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<MemoryScore>,
}

/// The recipe's metric on one held-out set, the network alone and with the memory mixed in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryScore {
    /// The set's name.
    pub set: String,
    /// The network alone.
    pub network: EvalMetrics,
    /// With the memory.
    pub with_memory: EvalMetrics,
}

impl Default for MemoryConfig {
    /// The classes fitted for the built-in model, all weights zero (nothing fitted yet).
    fn default() -> Self {
        let length_edges = vec![8, 12, 16, 24, 32, 48];
        let count_edges = vec![2, 5];
        let weights = vec![vec![0.0; length_edges.len() + 1]; count_edges.len() + 1];
        Self {
            max_context: 64,
            max_count: 64,
            length_edges,
            count_edges,
            weights,
            fitted_on: None,
            scores: Vec::new(),
        }
    }
}

impl MemoryConfig {
    /// Checks the classes and weights fit together; the problem named otherwise.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_context == 0 || self.max_context > u8::MAX as usize {
            return Err(format!("max_context {} is not within 1..=255", self.max_context));
        }
        if self.max_count == 0 {
            return Err("max_count must be at least 1".to_string());
        }
        let ascending =
            |xs: &[usize]| xs.windows(2).all(|w| w[0] < w[1]) && xs.first().is_none_or(|&x| x > 1);
        if !ascending(&self.length_edges) {
            return Err(format!("length_edges {:?} must rise from above 1", self.length_edges));
        }
        let counts: Vec<usize> = self.count_edges.iter().map(|&c| c as usize).collect();
        if !ascending(&counts) {
            return Err(format!("count_edges {:?} must rise from above 1", self.count_edges));
        }
        let (rows, columns) = (self.count_edges.len() + 1, self.length_edges.len() + 1);
        if self.weights.len() != rows || self.weights.iter().any(|row| row.len() != columns) {
            return Err(format!("weights must be {rows} rows of {columns} (count classes × length classes)"));
        }
        if let Some(w) = self.weights.iter().flatten().find(|w| !(0.0..1.0).contains(*w)) {
            return Err(format!("weight {w} is not within [0, 1)"));
        }
        Ok(())
    }

    /// The class of a match of `len` symbols found `count` times: (count class, length class).
    pub fn class_of(&self, len: usize, count: u32) -> (usize, usize) {
        let length_class = self.length_edges.iter().take_while(|&&edge| len >= edge).count();
        let count_class = self.count_edges.iter().take_while(|&&edge| count >= edge).count();
        (count_class, length_class)
    }

    /// `λ` for a match of `len` symbols found `count` times.
    pub fn weight(&self, len: usize, count: u32) -> f32 {
        let (row, column) = self.class_of(len, count);
        self.weights[row][column]
    }
}

/// What the memory recalls for a history: the longest suffix found, and how often.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recall {
    /// Symbols of the longest suffix of the history found in the stream.
    pub len: usize,
    /// Times it occurs followed by a symbol (at most `max_count`).
    pub count: u32,
}

/// The training stream, indexed for the longest match of a history's suffix.
#[derive(Clone, Debug)]
pub struct TuneMemory {
    config: MemoryConfig,
    vocab_len: usize,
    /// The stream backwards (`to_bytes` turns it round again): the context before position `p` of the stream, read backwards,
    /// is `reversed[n - p..]`, with `n` the stream's length.
    reversed: HugePageArray<u8>,
    /// Start in `reversed` of every context (`n - p` for positions `p` in `1..n`), sorted by
    /// the first `max_context` symbols from there.
    order: HugePageArray<u32>,
    /// `lcp[j]`: symbols (at most `max_context`) that the contexts at `order[j - 1]` and
    /// `order[j]` share; `lcp[0] = 0`.
    lcp: HugePageArray<u8>,
    /// The symbol that followed each context of `order`.
    next: HugePageArray<u8>,
    /// For the two-symbol start `a, b` (`a * vocab_len + b`), the first entry of `order` whose
    /// context starts with it or after it; one entry more than there are starts.
    starts: Vec<u32>,
    /// Row `k` (`[vocab_len]`): how many of the entries before `k · RANK_STRIDE` each symbol
    /// followed (counts in `next`), for `RecallCursor`'s guesses.
    followers_before: HugePageArray<u32>,
}

/// Where a generator's last recall ended, so that the next, whose history is one symbol longer,
/// searches from near there (see the module's notes). A fresh cursor, or one that follows
/// another history, only makes the search slower: every answer is `TuneMemory::recall`'s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecallCursor {
    /// The entry of the index where the last query would sort.
    place: Option<u32>,
    /// The next query's newest symbol and the guess for its place, when `prefetch` made it.
    guessed: Option<(u32, u32)>,
}

impl RecallCursor {
    /// Forgets the last search: for a history that does not continue the last one.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

impl TuneMemory {
    /// Indexes `stream` (token ids below `vocab_len`) under `config`.
    pub fn build(stream: &[u8], vocab_len: usize, config: MemoryConfig) -> Result<Self, String> {
        config.validate()?;
        if vocab_len == 0 || vocab_len > MAX_VOCAB {
            return Err(format!("a vocabulary of {vocab_len} symbols does not fit one byte each"));
        }
        if let Some((idx, &bad)) = stream.iter().enumerate().find(|(_, &t)| t as usize >= vocab_len) {
            return Err(format!("symbol {idx} is token {bad}, past the vocabulary of {vocab_len}"));
        }
        if stream.len() > u32::MAX as usize {
            return Err(format!("{} symbols are more than an index of u32 holds", stream.len()));
        }
        let n = stream.len();
        let reversed: Vec<u8> = stream.iter().rev().copied().collect();
        let max_context = config.max_context;
        let context = |start: u32| {
            let start = start as usize;
            &reversed[start..n.min(start + max_context)]
        };
        let mut order: Vec<u32> = (1..n as u32).collect();
        order.sort_unstable_by(|&a, &b| context(a).cmp(context(b)).then(a.cmp(&b)));
        let mut lcp = vec![0u8; order.len()];
        for j in 1..order.len() {
            lcp[j] = common_len(context(order[j - 1]), context(order[j])) as u8;
        }
        let next: Vec<u8> = order.iter().map(|&start| reversed[start as usize - 1]).collect();
        let num_starts = vocab_len * vocab_len;
        let mut starts = vec![order.len() as u32; num_starts + 1];
        // Walk the sorted contexts once; each two-symbol start points at its first context, and
        // starts no context has point at the next one that some context has.
        let mut next_start = 0;
        for (j, &start) in order.iter().enumerate() {
            let ctx = context(start);
            // A one-symbol context sorts before every longer one of its first symbol.
            let key = if ctx.len() >= 2 { ctx[0] as usize * vocab_len + ctx[1] as usize } else { continue };
            while next_start <= key {
                starts[next_start] = j as u32;
                next_start += 1;
            }
        }
        let mut followers_before = Vec::with_capacity((next.len() / RANK_STRIDE + 1) * vocab_len);
        let mut counts = vec![0u32; vocab_len];
        for chunk in next.chunks(RANK_STRIDE) {
            followers_before.extend_from_slice(&counts);
            chunk.iter().for_each(|&symbol| counts[symbol as usize] += 1);
        }
        followers_before.extend_from_slice(&counts);
        Ok(Self {
            config,
            vocab_len,
            reversed: reversed.into(),
            order: order.into(),
            lcp: lcp.into(),
            next: next.into(),
            starts,
            followers_before: followers_before.into(),
        })
    }

    /// Reads `memory.bin` bytes (`path` names the file in errors) and indexes them.
    pub fn from_bytes(
        bytes: &[u8],
        path: &str,
        vocab_len: usize,
        config: MemoryConfig,
    ) -> Result<Self, ModelError> {
        let corrupt = |problem: String| ModelError::CorruptMemory { path: path.to_string(), problem };
        if bytes.len() < HEADER_BYTES {
            return Err(ModelError::Truncated {
                path: path.to_string(),
                expected_bytes: HEADER_BYTES as u64,
                got_bytes: bytes.len() as u64,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt("not a tune memory (its first bytes are not APMEMv1)".to_string()));
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let (stored_vocab, num_symbols) = (word(8), word(12));
        if stored_vocab != vocab_len {
            return Err(corrupt(format!(
                "written for a vocabulary of {stored_vocab} symbols, the model's has {vocab_len}"
            )));
        }
        let expected = HEADER_BYTES + num_symbols;
        if bytes.len() < expected {
            return Err(ModelError::Truncated {
                path: path.to_string(),
                expected_bytes: expected as u64,
                got_bytes: bytes.len() as u64,
            });
        }
        if bytes.len() > expected {
            return Err(corrupt(format!("{} bytes after the {num_symbols} symbols", bytes.len() - expected)));
        }
        Self::build(&bytes[HEADER_BYTES..], vocab_len, config).map_err(corrupt)
    }

    /// The bytes of `memory.bin` for this memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + self.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(self.vocab_len as u32).to_le_bytes());
        bytes.extend_from_slice(&(self.len() as u32).to_le_bytes());
        bytes.extend(self.reversed.iter().rev());
        bytes
    }

    /// Writes `memory.bin` and `memory.json` into the model directory `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| ModelError::Io { path, source }
        };
        let bin = dir.join(MEMORY_FILE);
        std::fs::write(&bin, self.to_bytes()).map_err(io(&bin))?;
        let json = dir.join(MEMORY_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.config).expect("a MemoryConfig always serialises");
        std::fs::write(&json, text + "\n").map_err(io(&json))
    }

    /// Its settings and weights.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The same index with other settings of the same `max_context` (new weights, say).
    pub fn with_config(mut self, config: MemoryConfig) -> Result<Self, String> {
        config.validate()?;
        if config.max_context != self.config.max_context {
            let stream: Vec<u8> = self.reversed.iter().rev().copied().collect();
            return Self::build(&stream, self.vocab_len, config);
        }
        self.config = config;
        Ok(self)
    }

    /// Symbols in the stream.
    pub fn len(&self) -> usize {
        self.reversed.len()
    }

    /// True for an empty stream.
    pub fn is_empty(&self) -> bool {
        self.reversed.is_empty()
    }

    /// The longest suffix of `history` (token ids, newest last; only the last `max_context`
    /// are read) found in the stream, when it occurs at most `max_count` times: how long it is,
    /// how often it occurs, and (added into `counts`, `[vocab]`, which the caller zeroes) how
    /// often each symbol followed it. `None` for an empty history, a last symbol never seen,
    /// or a suffix too common. Neither allocates nor locks.
    pub fn recall(&self, history: &[u32], counts: &mut [u32]) -> Option<Recall> {
        self.recall_near(history, &mut RecallCursor::default(), counts)
    }

    /// `recall`, searching from where `cursor` says the last search ended (its history was
    /// this one without the newest symbol), and moving the cursor to where this one ends.
    pub fn recall_near(
        &self,
        history: &[u32],
        cursor: &mut RecallCursor,
        counts: &mut [u32],
    ) -> Option<Recall> {
        let (place, guessed) = (cursor.place.take(), cursor.guessed.take());
        let query_len = history.len().min(self.config.max_context);
        if query_len == 0 || self.order.is_empty() {
            return None;
        }
        // The query, newest symbol first, as the sorted contexts read.
        let query = |k: usize| history[history.len() - 1 - k];
        if query(0) as usize >= self.vocab_len {
            return None;
        }
        let context = |j: usize| {
            let start = self.order[j] as usize;
            &self.reversed[start..self.reversed.len().min(start + self.config.max_context)]
        };
        // How many symbols the context at `j` shares with the query, and whether it sorts
        // before it.
        let compare = |j: usize| {
            let ctx = context(j);
            let shared =
                ctx.iter().take(query_len).enumerate().take_while(|&(k, &s)| s as u32 == query(k)).count();
            let is_before = if shared == query_len {
                false
            } else if shared == ctx.len() {
                true
            } else {
                (ctx[shared] as u32) < query(shared)
            };
            (shared, is_before)
        };
        let (mut lo, mut hi) = (0, self.order.len());
        if query_len >= 2 && (query(1) as usize) < self.vocab_len {
            let key = query(0) as usize * self.vocab_len + query(1) as usize;
            let (first, end) = (self.starts[key] as usize, self.starts[key + 1] as usize);
            if first < end {
                (lo, hi) = (first, end);
            }
        }
        // The first context not before the query; the longest match is at it or just before.
        // From a guess, gallop outward until the place is bracketed, then halve the bracket.
        let guess = match guessed {
            Some((symbol, guess)) if symbol == query(0) => Some(guess as usize),
            _ => place.map(|place| self.guess_after(place as usize, query(0) as usize)),
        };
        if let Some(guess) = guess {
            let guess = guess.clamp(lo, hi);
            let mut step = 1;
            if guess < hi && compare(guess).1 {
                lo = guess + 1;
                while lo + step <= hi && compare(lo + step - 1).1 {
                    lo += step;
                    step *= 2;
                }
                hi = hi.min(lo + step - 1);
            } else {
                hi = guess;
                while hi >= lo + step && !compare(hi - step).1 {
                    hi -= step;
                    step *= 2;
                }
                lo = lo.max((hi + 1).saturating_sub(step));
            }
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if compare(mid).1 {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        cursor.place = Some(lo as u32);
        // The next guess reads this place's row of counts and the stretch of `next` before it;
        // start fetching them now, while the sampler and the network's next step run.
        let (counts_row, scanned) = self.followers_up_to(lo);
        prefetch_lines(counts_row);
        prefetch_lines(scanned);
        let shared_at = |j: Option<usize>| j.filter(|&j| j < self.order.len()).map_or(0, |j| compare(j).0);
        let (before, after) = (shared_at(lo.checked_sub(1)), shared_at(Some(lo)));
        let len = before.max(after);
        if len == 0 {
            return None;
        }
        // Widen from the better neighbour over every context sharing `len` symbols, giving up
        // once there are more than `max_count`.
        let max_count = self.config.max_count as usize;
        let seed = if after >= before { lo } else { lo - 1 };
        let (mut first, mut end) = (seed, seed + 1);
        while first > 0 && self.lcp[first] as usize >= len {
            first -= 1;
            if end - first > max_count {
                return None;
            }
        }
        while end < self.order.len() && self.lcp[end] as usize >= len {
            end += 1;
            if end - first > max_count {
                return None;
            }
        }
        for &symbol in &self.next[first..end] {
            counts[symbol as usize] += 1;
        }
        Some(Recall { len, count: (end - first) as u32 })
    }

    /// Gets ready the next `recall_near` from `cursor`, whose history will end with `symbol`:
    /// makes the search's guess now (from lines the last search started fetching) and starts
    /// fetching the entries of the index around it, so that those cache misses overlap the
    /// network's step, which does not need them. Only the time of the search changes.
    pub fn prefetch(&self, cursor: &mut RecallCursor, symbol: u32) {
        let Some(place) = cursor.place else { return };
        if self.order.is_empty() {
            return;
        }
        let guess = self.guess_after(place as usize, symbol as usize).min(self.order.len() - 1);
        cursor.guessed = Some((symbol, guess as u32));
        // The entries only: reading them to fetch the contexts they point to would stall here.
        let first = guess.saturating_sub(1);
        prefetch_line(&self.order[first..]);
        prefetch_line(&self.order[guess..]);
        prefetch_line(&self.lcp[first..]);
        prefetch_line(&self.next[first..]);
    }

    /// Where a query would sort that is the one at `place` with `symbol` in front: where the
    /// contexts starting with `symbol` begin, plus the entries before `place` that `symbol`
    /// followed. Exact but for the contexts cut short by `max_context` or the stream's start;
    /// the search corrects it.
    fn guess_after(&self, place: usize, symbol: usize) -> usize {
        if symbol >= self.vocab_len {
            return 0;
        }
        let (counts_row, scanned) = self.followers_up_to(place);
        let before = counts_row[symbol] as usize + scanned.iter().filter(|&&s| s as usize == symbol).count();
        self.starts[symbol * self.vocab_len] as usize + before
    }

    /// What counts the symbols that followed the entries before `place`: the row of
    /// `followers_before` at or below it (`[vocab_len]`), and the entries of `next` from that
    /// row up to `place`.
    fn followers_up_to(&self, place: usize) -> (&[u32], &[u8]) {
        let place = place.min(self.next.len());
        let row = place / RANK_STRIDE;
        (
            &self.followers_before[row * self.vocab_len..][..self.vocab_len],
            &self.next[row * RANK_STRIDE..place],
        )
    }

    /// What fitting the weights needs of one held-out target: the network's probability of it
    /// (`p_model`), and the class of what `recall` finds for `history` and the memory's
    /// probability of `target`.
    pub fn fit_sample(&self, history: &[u32], target: usize, p_model: f64) -> FitSample {
        let mut counts = [0u32; MAX_VOCAB];
        let recalled = self.recall(history, &mut counts[..self.vocab_len]).map(|recall| {
            let class = self.config.class_of(recall.len, recall.count);
            (class, counts[target] as f64 / recall.count as f64)
        });
        FitSample { p_model, recalled }
    }

    /// Mixes the memory into a prediction: `logits` (`[vocab]`, the network's) become the
    /// log-probabilities of `(1 - λ) softmax(logits) + λ m` for what `recall` finds for
    /// `history`, or are left as they are when it finds nothing or `λ` is 0. Neither allocates
    /// nor locks. Returns what was recalled and mixed in.
    pub fn mix(&self, history: &[u32], logits: &mut [f32]) -> Option<Recall> {
        self.mix_near(history, &mut RecallCursor::default(), logits)
    }

    /// `mix`, its search started from `cursor` (`recall_near`).
    pub fn mix_near(&self, history: &[u32], cursor: &mut RecallCursor, logits: &mut [f32]) -> Option<Recall> {
        let mut counts = [0u32; MAX_VOCAB];
        let recall = self.recall_near(history, cursor, &mut counts[..self.vocab_len])?;
        let weight = self.config.weight(recall.len, recall.count);
        if weight <= 0.0 {
            return None;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_norm = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        let (keep, per_count) = (1.0 - weight, weight / recall.count as f32);
        let log_keep = keep.ln();
        for (logit, &count) in logits.iter_mut().zip(&counts) {
            // Most symbols never followed the match: their share only shrinks by `keep`, which
            // spares a logarithm each (the step's budget is a few microseconds).
            *logit = match count {
                0 => *logit - log_norm + log_keep,
                _ => (keep * (*logit - log_norm).exp() + per_count * count as f32).ln(),
            };
        }
        Some(recall)
    }
}

/// Asks the CPU to start loading the cache line holding `items`' first element (nothing for
/// an empty slice); changes nothing else.
#[inline(always)]
fn prefetch_line<T>(items: &[T]) {
    prefetch_lines(items.get(..1).unwrap_or_default());
}

/// Asks the CPU to start loading every cache line that `items` touches; changes nothing else.
#[inline(always)]
fn prefetch_lines<T>(items: &[T]) {
    const LINE: usize = 64;
    let bytes = std::mem::size_of_val(items);
    if bytes == 0 {
        return;
    }
    let start = items.as_ptr().cast::<u8>();
    // From the line holding the first byte to the one holding the last.
    let first_line = start as usize / LINE;
    let last_line = (start as usize + bytes - 1) / LINE;
    for line in first_line..=last_line {
        // The line's first byte, or the slice's own first byte on its first line.
        let at = start.wrapping_add((line * LINE).saturating_sub(start as usize));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint that neither reads into the program nor faults (and `at`
        // lies within `items`); SSE is part of every x86-64 CPU.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }
}

/// Symbols two slices share from their starts.
fn common_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One held-out target as the fit sees it: the network's probability of it, and, when the
/// memory recalled something, the class of the match and the memory's probability of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitSample {
    /// The network's probability of the symbol that came.
    pub p_model: f64,
    /// The match's (count class, length class) and the memory's probability of the symbol.
    pub recalled: Option<((usize, usize), f64)>,
}

/// Weights for `config`'s classes that minimise the mean negative log-likelihood of `samples`:
/// each class on its own (the classes share no targets), over a grid of `λ` in steps of 0.01
/// from 0 to 0.95. A class with no samples keeps 0.
pub fn fit_weights(config: &MemoryConfig, samples: &[FitSample]) -> Vec<Vec<f32>> {
    let rows = config.count_edges.len() + 1;
    let columns = config.length_edges.len() + 1;
    let mut by_class: Vec<Vec<(f64, f64)>> = vec![Vec::new(); rows * columns];
    for sample in samples {
        if let Some(((row, column), p_memory)) = sample.recalled {
            by_class[row * columns + column].push((sample.p_model, p_memory));
        }
    }
    let mut weights = vec![vec![0.0f32; columns]; rows];
    for (class, pairs) in by_class.iter().enumerate() {
        let nll = |weight: f64| -> f64 {
            pairs.iter().map(|&(p, m)| -((1.0 - weight) * p + weight * m).max(f64::MIN_POSITIVE).ln()).sum()
        };
        let best = (0..=95).map(|step| step as f64 / 100.0).fold((0.0, nll(0.0)), |best, weight| {
            let loss = nll(weight);
            if loss < best.1 {
                (weight, loss)
            } else {
                best
            }
        });
        weights[class / columns][class % columns] = best.0 as f32;
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every occurrence of the longest suffix of `history` (up to `max_context`) in `stream`
    /// followed by a symbol, found by reading the whole stream.
    fn brute_force(stream: &[u8], history: &[u32], max_context: usize) -> (usize, Vec<u32>) {
        let query: Vec<u32> = history.iter().rev().take(max_context).copied().collect();
        let mut best = (0, vec![0; 8]);
        for p in 1..stream.len() {
            let shared =
                (0..query.len().min(p)).take_while(|&k| stream[p - 1 - k] as u32 == query[k]).count();
            if shared > best.0 {
                best = (shared, vec![0; 8]);
            }
            if shared == best.0 && shared > 0 {
                best.1[stream[p] as usize] += 1;
            }
        }
        best
    }

    fn config(max_context: usize, max_count: u32) -> MemoryConfig {
        MemoryConfig { max_context, max_count, ..MemoryConfig::default() }
    }

    #[test]
    fn recall_finds_the_longest_suffix_and_what_followed_it_as_a_full_search_does() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // Few symbols, and repeated passages, so that long matches occur.
        let mut stream: Vec<u8> = (0..400).map(|_| rng.random_range(0..4)).collect();
        let passage = stream[100..140].to_vec();
        stream.extend_from_slice(&passage);
        stream.extend((0..200).map(|_| rng.random_range(0..8u8)));
        let memory = TuneMemory::build(&stream, 8, config(24, 1000)).unwrap();
        let mut num_long = 0;
        for trial in 0..2000 {
            let history: Vec<u32> = if trial % 2 == 0 {
                // A real passage, perhaps with a changed last symbol.
                let end = rng.random_range(1..stream.len());
                let start = end.saturating_sub(rng.random_range(1..40));
                let mut h: Vec<u32> = stream[start..end].iter().map(|&s| s as u32).collect();
                if trial % 4 == 0 {
                    *h.last_mut().unwrap() = rng.random_range(0..8);
                }
                h
            } else {
                (0..rng.random_range(1..30)).map(|_| rng.random_range(0..8)).collect()
            };
            let (len, expected) = brute_force(&stream, &history, 24);
            let mut counts = vec![0u32; 8];
            let recall = memory.recall(&history, &mut counts);
            if len == 0 {
                assert_eq!(recall, None, "history {history:?}");
                continue;
            }
            let recall = recall.unwrap_or_else(|| panic!("nothing recalled for {history:?}"));
            assert_eq!(recall.len, len, "history {history:?}");
            assert_eq!(counts, expected, "history {history:?}");
            assert_eq!(recall.count, expected.iter().sum::<u32>());
            num_long += (len >= 12) as usize;
        }
        assert!(num_long > 100, "only {num_long} long matches: the test should exercise them");
    }

    /// A cursor following histories one symbol at a time (passages of the stream, stretches
    /// of noise, a wrong symbol now and then, and the cut at `max_context`), readied by
    /// `prefetch` for the right symbol, the wrong one or none, and one left from another
    /// history: the answers are the plain search's every time.
    #[test]
    fn searching_from_a_cursor_answers_as_a_fresh_search() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut stream: Vec<u8> = (0..3000).map(|_| rng.random_range(0..6)).collect();
        for _ in 0..20 {
            let start = rng.random_range(0..2900);
            let passage = stream[start..start + rng.random_range(5..100)].to_vec();
            stream.extend_from_slice(&passage);
        }
        // A stride's worth of entries and more, so the rank rows and the scans are both read.
        assert!(stream.len() > 4 * RANK_STRIDE);
        let memory = TuneMemory::build(&stream, 6, config(32, 1000)).unwrap();
        let mut cursor = RecallCursor::default();
        let mut history: Vec<u32> = Vec::new();
        let mut at = 0;
        let (mut num_long, mut num_stale) = (0, 0);
        for step in 0..6000 {
            let symbol = match step % 500 {
                // Noise for a while, then back to following the stream.
                0..=20 => rng.random_range(0..6),
                _ if rng.random_range(0..30) == 0 => rng.random_range(0..6),
                _ => {
                    at = (at + 1) % stream.len();
                    stream[at] as u32
                }
            };
            if step % 700 == 0 {
                at = rng.random_range(0..stream.len());
            }
            history.push(symbol);
            // Readied for this symbol most steps, for another now and then, or not at all.
            match step % 5 {
                0 => {}
                1 => memory.prefetch(&mut cursor, (symbol + 1) % 6),
                _ => memory.prefetch(&mut cursor, symbol),
            }
            if step % 97 == 0 {
                // A cursor left from an unrelated history.
                let place = Some(rng.random_range(0..memory.order.len() as u32));
                let mut stale = RecallCursor { place, guessed: None };
                let (mut a, mut b) = (vec![0u32; 6], vec![0u32; 6]);
                assert_eq!(memory.recall_near(&history, &mut stale, &mut a), memory.recall(&history, &mut b));
                assert_eq!(a, b);
                num_stale += 1;
            }
            let (mut near, mut fresh) = (vec![0u32; 6], vec![0u32; 6]);
            let found = memory.recall_near(&history, &mut cursor, &mut near);
            assert_eq!(found, memory.recall(&history, &mut fresh), "step {step}");
            assert_eq!(near, fresh, "step {step}");
            num_long += found.is_some_and(|r| r.len >= 16) as usize;
        }
        assert!(num_long > 1000 && num_stale > 50, "{num_long} long matches, {num_stale} stale cursors");
    }

    #[test]
    fn a_suffix_found_more_often_than_max_count_recalls_nothing() {
        // "0 1" occurs three times, each followed by 2; "1" alone four times.
        let stream = vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 1, 3];
        let history = [5, 0, 1];
        let mut counts = vec![0u32; 6];
        let loose = TuneMemory::build(&stream, 6, config(8, 3)).unwrap();
        assert_eq!(loose.recall(&history, &mut counts), Some(Recall { len: 2, count: 3 }));
        assert_eq!(counts, [0, 0, 3, 0, 0, 0]);
        let strict = TuneMemory::build(&stream, 6, config(8, 2)).unwrap();
        assert_eq!(strict.recall(&history, &mut [0; 6]), None);
        assert_eq!(strict.recall(&[4], &mut [0; 6]), None, "a symbol never seen");
        assert_eq!(strict.recall(&[], &mut [0; 6]), None);
    }

    #[test]
    fn mixing_keeps_a_distribution_and_moves_it_toward_what_followed() {
        let stream = vec![0, 1, 2, 0, 1, 2, 3, 3, 3, 3];
        let mut cfg = config(8, 64);
        // Every class at 0.25.
        cfg.weights.iter_mut().flatten().for_each(|w| *w = 0.25);
        let memory = TuneMemory::build(&stream, 5, cfg).unwrap();
        let mut logits = vec![0.0f32; 5];
        let recall = memory.mix(&[0, 1], &mut logits);
        assert_eq!(recall, Some(Recall { len: 2, count: 2 }));
        let p: Vec<f32> = logits.iter().map(|l| l.exp()).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{p:?}");
        // 0.75 of the uniform 0.2, plus 0.25 of the memory's certainty of symbol 2.
        assert!((p[2] - (0.75 * 0.2 + 0.25)).abs() < 1e-6, "{p:?}");
        assert!((p[0] - 0.75 * 0.2).abs() < 1e-6, "{p:?}");
        // Nothing recalled (symbol 4 never came): the logits are left alone.
        let mut untouched = vec![1.0f32, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(memory.mix(&[0, 1, 4], &mut untouched), None);
        assert_eq!(untouched, [1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn bytes_round_trip_and_damage_is_named() {
        let memory = TuneMemory::build(&[0, 1, 2, 1, 0], 3, config(8, 64)).unwrap();
        let bytes = memory.to_bytes();
        let back = TuneMemory::from_bytes(&bytes, "m.bin", 3, config(8, 64)).unwrap();
        assert_eq!(back.to_bytes(), bytes);
        let message = |r: Result<TuneMemory, ModelError>| r.unwrap_err().to_string();
        let truncated = message(TuneMemory::from_bytes(&bytes[..bytes.len() - 1], "m.bin", 3, config(8, 64)));
        assert!(truncated.contains("m.bin") && truncated.contains("truncated"), "{truncated}");
        let other_vocab = message(TuneMemory::from_bytes(&bytes, "m.bin", 4, config(8, 64)));
        assert!(other_vocab.contains("vocabulary of 3"), "{other_vocab}");
        let mut past = bytes.clone();
        *past.last_mut().unwrap() = 7;
        let past = message(TuneMemory::from_bytes(&past, "m.bin", 3, config(8, 64)));
        assert!(past.contains("token 7"), "{past}");
        let junk = message(TuneMemory::from_bytes(b"not a memory file", "m.bin", 3, config(8, 64)));
        assert!(junk.contains("not a tune memory"), "{junk}");
    }

    #[test]
    fn fitting_picks_the_weight_that_scores_best_per_class() {
        let cfg = config(64, 64);
        // Class (0, 6): the memory is right three times in four; class (2, 0): never.
        let mut samples = Vec::new();
        for i in 0..400 {
            let m = if i % 4 == 0 { 0.0 } else { 1.0 };
            samples.push(FitSample { p_model: 0.5, recalled: Some((cfg.class_of(50, 1), m)) });
            samples.push(FitSample { p_model: 0.5, recalled: Some((cfg.class_of(3, 9), 0.0)) });
            samples.push(FitSample { p_model: 0.5, recalled: None });
        }
        let weights = fit_weights(&cfg, &samples);
        // Minimising 3 ln(0.5 + 0.5λ) + ln(0.5 - 0.5λ) gives λ = 0.5.
        assert!((weights[0][6] - 0.5).abs() < 0.011, "{weights:?}");
        assert_eq!(weights[2][0], 0.0);
        assert_eq!(weights[1][3], 0.0, "a class with no samples keeps 0");
    }

    #[test]
    fn configs_that_do_not_fit_together_are_refused() {
        let mut cfg = MemoryConfig::default();
        cfg.weights.pop();
        assert!(cfg.validate().unwrap_err().contains("rows"));
        let mut cfg = MemoryConfig::default();
        cfg.weights[0][0] = 1.0;
        assert!(cfg.validate().unwrap_err().contains("[0, 1)"));
        let cfg = MemoryConfig { length_edges: vec![8, 4], ..MemoryConfig::default() };
        assert!(cfg.validate().is_err());
        let cfg = MemoryConfig { max_context: 300, ..MemoryConfig::default() };
        assert!(cfg.validate().is_err());
    }
}
