//! Streaming generation: a `Generator` keeps the LSTM state and advances one symbol per step
//! (it never re-runs a window), and a `PhraseContinuation` wraps it for melodies: it moves the
//! primer into the model's key convention and pitch range, warms the state on it, and hands
//! back symbols in the player's key.
//! Runs on: the worker thread (one `Generator` per phrase, built cheaply from an
//! `Arc<LoadedModel>`) and offline threads (xtask generate, tests).

use std::collections::VecDeque;
use std::sync::Arc;

use arrayvec::ArrayVec;

use super::config::MAX_SIDE_INPUTS;
use super::io::LoadedModel;
use super::memory::RecallCursor;
use super::sample::{Sampler, SamplingSettings};
use super::{GenState, ModelError, Transposition};
use music::bar::{self, BarClock, NO_BAR_POSITION};
use music::encode::{self, EncodeConfig};
use music::key::melody_key;
use music::{Melody, Meter, Note, StepGrid, Symbol, TokenId, Vocab};

/// Generates symbols one at a time from a model, carrying the recurrent state between steps.
/// Owns its state, so it is `Send` and the worker may keep one per phrase.
pub struct Generator {
    model: Arc<LoadedModel>,
    state: GenState,
    sampler: Sampler,
    /// Logits of the next symbol, `[vocab]`; valid once a symbol has been fed.
    logits: Vec<f32>,
    has_logits: bool,
    max_steps: Option<usize>,
    num_generated: usize,
    is_finished: bool,
    /// The bar position and number of the next song symbol fed, for a model with bar positions.
    bar_clock: Option<BarClock>,
    /// The most recent tokens fed, newest last, as far back as the model's lookback and its
    /// tune memory reach (`history_len`).
    history: VecDeque<u32>,
    history_len: usize,
    /// Where the tune memory's last search ended, for the next, one symbol longer.
    recall_cursor: RecallCursor,
}

impl Generator {
    /// A generator at the zero state whose draws follow `seed`.
    pub fn new(model: Arc<LoadedModel>, seed: u64) -> Self {
        let vocab_len = model.config.vocab_len();
        // The bar reader reads one token past its history length (the token being fed).
        let history_len = (model.lstm.bar_reader().history_len() + 1).max(model.memory_context());
        Self {
            state: model.new_state(),
            model,
            sampler: Sampler::new(seed),
            logits: vec![0.0; vocab_len],
            has_logits: false,
            max_steps: None,
            num_generated: 0,
            is_finished: false,
            bar_clock: None,
            history: VecDeque::with_capacity(history_len),
            history_len,
            recall_cursor: RecallCursor::default(),
        }
    }

    /// Counts bars from here on: the next song symbol fed or generated lies at step
    /// `step_in_bar` of a bar of `meter`. Without a call, or for a model that does not know
    /// the meter, every step is fed as `NO_BAR_POSITION`.
    pub fn set_bar(&mut self, meter: Meter, step_in_bar: i64) {
        let cfg = &self.model.config;
        self.bar_clock = BarClock::new(&cfg.bar_meters, meter, cfg.grid, step_in_bar);
    }

    /// The bar position the next song symbol will be fed at.
    pub fn bar_clock(&self) -> Option<BarClock> {
        self.bar_clock
    }

    /// The model it runs.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// The recurrent state after the symbols fed so far.
    pub fn state(&self) -> &GenState {
        &self.state
    }

    /// The logits of the next symbol after the symbols fed so far; `None` before the first.
    pub fn logits(&self) -> Option<&[f32]> {
        self.has_logits.then_some(&self.logits[..])
    }

    /// Back to the zero state with nothing generated and nothing to look back to; the RNG and
    /// the bar clock go on where they were (`set_bar` moves the clock).
    pub fn reset(&mut self) {
        self.state.reset();
        self.history.clear();
        self.recall_cursor.reset();
        self.has_logits = false;
        self.num_generated = 0;
        self.is_finished = false;
    }

    /// Restarts the random draws from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.sampler.reseed(seed);
    }

    /// Stop after this many generated symbols (`None`: only at a delimiter).
    pub fn set_max_steps(&mut self, max_steps: Option<usize>) {
        self.max_steps = max_steps;
    }

    /// Symbols generated since the last `reset`.
    pub fn num_generated(&self) -> usize {
        self.num_generated
    }

    /// True once a delimiter was generated or `max_steps` reached.
    pub fn is_finished(&self) -> bool {
        self.is_finished
    }

    /// Feeds one symbol without sampling: advances the state and computes the next logits.
    pub fn feed(&mut self, symbol: Symbol) -> Result<(), ModelError> {
        let token = self.model.config.vocab.id(symbol).ok_or(music::vocab::UnknownSymbol { symbol })?;
        self.feed_token(token)
    }

    /// Feeds a token at the bar clock's position (delimiters lie outside bars) with the tokens
    /// the model looks back to, then moves the clock on by a step.
    fn feed_token(&mut self, token: TokenId) -> Result<(), ModelError> {
        let is_song_symbol = self.model.config.vocab.symbol(token) != Symbol::Delimiter;
        let bar = match (&self.bar_clock, is_song_symbol) {
            (Some(clock), true) => clock.bar_step(),
            _ => NO_BAR_POSITION as u32,
        };
        let reader = self.model.lstm.bar_reader();
        if self.history_len > 1 {
            if self.history.len() == self.history_len {
                self.history.pop_front();
            }
            self.history.push_back(token.0 as u32);
        }
        // One slice (a move of at most the history's length, no allocation): the repeat search
        // reads it up to 63 × 24 times a step.
        let history: &[u32] = self.history.make_contiguous();
        // The bar inputs see no further back than they do in training's windows, however far
        // the memory reads.
        let reach = match reader.history_len() {
            0 => 0,
            len => len + 1,
        };
        let seen = &history[history.len().saturating_sub(reach)..];
        let earlier = |back: usize| seen.len().checked_sub(back + 1).map(|idx| seen[idx]);
        let inputs: ArrayVec<u16, MAX_SIDE_INPUTS> =
            reader.inputs(bar, earlier).iter().map(|&input| input as u16).collect();
        self.model.prefetch_memory(token, &mut self.recall_cursor);
        self.model.step_at(token, &inputs, &mut self.state, &mut self.logits)?;
        let recent = &history[history.len().saturating_sub(self.model.memory_context())..];
        self.model.mix_memory(recent, &mut self.recall_cursor, &mut self.logits);
        if let (Some(clock), true) = (&mut self.bar_clock, is_song_symbol) {
            clock.advance();
        }
        self.has_logits = true;
        Ok(())
    }

    /// Warms the state on `symbols` (all in the model's vocabulary and key convention).
    pub fn prime(&mut self, symbols: &[Symbol]) -> Result<(), ModelError> {
        let tokens = self.model.config.vocab.encode(symbols)?;
        tokens.into_iter().try_for_each(|t| self.feed_token(t))
    }

    /// Samples the next symbol under `settings`, feeds it back, and returns it; `None` once
    /// finished. With nothing fed yet, a song start (one delimiter) is fed first.
    pub fn next_symbol(&mut self, settings: &SamplingSettings) -> Result<Option<Symbol>, ModelError> {
        if self.is_finished {
            return Ok(None);
        }
        if !self.has_logits {
            self.feed(Symbol::Delimiter)?;
        }
        let token = self.sampler.sample(&self.logits, &self.model.config.vocab, settings);
        let symbol = self.model.config.vocab.symbol(token);
        self.num_generated += 1;
        if symbol == Symbol::Delimiter || self.max_steps.is_some_and(|max| self.num_generated >= max) {
            self.is_finished = true;
        }
        // A finished generator will not be asked for more, so the last step is not run.
        if !self.is_finished {
            self.feed_token(token)?;
        }
        Ok(Some(symbol))
    }
}

/// A melody continuation in progress: the primer moved into the model's key and range, the
/// generator warmed on it, and symbols handed back in the player's key. Generated time starts
/// at the primer's `end_beats` rounded to the grid; step `i` starts `i * step_beats()` after it.
pub struct PhraseContinuation {
    generator: Generator,
    /// Semitones from the player's key to the model's.
    shift_semitones: i32,
    /// Where the continuation starts, in beats of the primer's time.
    start_beats: f64,
    symbols: Vec<Symbol>,
    /// The notes decoded so far, in the player's key, times from the continuation's start.
    notes: Vec<Note>,
    /// True while the last note may still grow (no onset, rest or delimiter after it yet).
    is_last_note_open: bool,
    /// True if the primer had notes. A song without a note yet, the primer's or a generated
    /// one, may not end (a fresh song ending at once is no song; after the primer's delimiters
    /// the model often predicts more).
    primer_has_notes: bool,
}

impl PhraseContinuation {
    /// Prepares a continuation of `primer` that will stop after `max_steps` symbols (or at a
    /// delimiter, when the settings allow one). An empty primer starts a fresh song.
    pub fn start(
        model: Arc<LoadedModel>,
        primer: &Melody,
        max_steps: usize,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let cfg = &model.config;
        let shift_semitones = model_shift(primer, cfg.transposition, cfg.lowest_pitch, cfg.highest_pitch);
        let moved = fit_into_vocab(&shift_melody(primer, shift_semitones), &cfg.vocab);
        let symbols = encode_primer(&moved, cfg.grid)?;
        let start_beats = symbols.len() as f64 * cfg.grid.step_beats();
        let first_step_in_bar = bar::first_step_in_bar(primer, cfg.grid);
        let mut lead = vec![Symbol::Delimiter; cfg.delimiter_len.max(1)];
        lead.extend_from_slice(&symbols);
        let mut generator = Generator::new(model, seed);
        generator.set_max_steps(Some(max_steps));
        if let Some(meter) = primer.meter {
            generator.set_bar(meter, first_step_in_bar);
        }
        generator.prime(&lead)?;
        Ok(Self {
            generator,
            shift_semitones,
            start_beats,
            symbols: Vec::with_capacity(max_steps),
            notes: Vec::new(),
            is_last_note_open: false,
            primer_has_notes: !primer.notes.is_empty(),
        })
    }

    /// Where the continuation starts, in beats of the primer's time: the primer's end on the
    /// grid (never before its last note ends).
    pub fn start_beats(&self) -> f64 {
        self.start_beats
    }

    /// Semitones the primer was moved by to reach the model's key convention and range.
    pub fn shift_semitones(&self) -> i32 {
        self.shift_semitones
    }

    /// Length of one step in beats.
    pub fn step_beats(&self) -> f64 {
        self.generator.model().config.grid.step_beats()
    }

    /// The next symbol in the player's key, or `None` once finished. `settings` speak of the
    /// player's key too (pitch classes, range); they may change between any two steps.
    pub fn next_symbol(&mut self, settings: &SamplingSettings) -> Result<Option<Symbol>, ModelError> {
        let mut model_settings = settings.transposed(self.shift_semitones);
        model_settings.may_end &= self.primer_has_notes || !self.notes.is_empty();
        let Some(symbol) = self.generator.next_symbol(&model_settings)? else {
            return Ok(None);
        };
        let symbol = match symbol {
            Symbol::Pitch(p) => Symbol::Pitch(fold_into(p as i32 - self.shift_semitones, 0, 127)),
            other => other,
        };
        let step_beats = self.step_beats();
        let at_beats = self.symbols.len() as f64 * step_beats;
        match symbol {
            Symbol::Pitch(p) => {
                self.notes.push(Note::new(p, at_beats, step_beats));
                self.is_last_note_open = true;
            }
            Symbol::Hold => {
                if let (true, Some(last)) = (self.is_last_note_open, self.notes.last_mut()) {
                    last.len_beats += step_beats;
                }
            }
            Symbol::Rest | Symbol::Delimiter => self.is_last_note_open = false,
        }
        if self.generator.is_finished() {
            self.is_last_note_open = false;
        }
        self.symbols.push(symbol);
        Ok(Some(symbol))
    }

    /// The symbols generated so far, in the player's key.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Notes whose end is known (something other than `_` followed them, or generation
    /// finished), in the player's key, times from the continuation's start: what a player can
    /// schedule completely. A later `next_symbol` never changes them.
    pub fn finished_notes(&self) -> &[Note] {
        let num_open = usize::from(self.is_last_note_open);
        &self.notes[..self.notes.len() - num_open]
    }

    /// The note that is still sounding at the last generated step and may grow, if any.
    pub fn open_note(&self) -> Option<&Note> {
        self.notes.last().filter(|_| self.is_last_note_open)
    }

    /// The generated symbols as a melody in the player's key, times from the continuation's
    /// start. A final delimiter ends it and takes no time.
    pub fn melody(&self) -> Melody {
        let grid = self.generator.model().config.grid;
        let end = self.symbols.iter().position(|s| *s == Symbol::Delimiter).unwrap_or(self.symbols.len());
        encode::decode(&self.symbols[..end], grid)
    }
}

/// Continues `primer` by up to `num_steps` steps under `settings` (in the player's key) and
/// returns the new notes in the player's key, times from the primer's end. The same model,
/// primer, settings and seed always give the same notes.
pub fn continue_melody(
    model: &Arc<LoadedModel>,
    primer: &Melody,
    num_steps: usize,
    settings: &SamplingSettings,
    seed: u64,
) -> Result<Melody, ModelError> {
    let mut phrase = PhraseContinuation::start(Arc::clone(model), primer, num_steps, seed)?;
    while phrase.next_symbol(settings)?.is_some() {}
    Ok(phrase.melody())
}

/// Semitones that bring `primer` to the model: to its key convention, then by whole octaves
/// to the octave where the fewest notes fall outside `lowest..=highest` (the nearer octave on
/// a tie).
pub fn model_shift(primer: &Melody, transposition: Transposition, lowest: u8, highest: u8) -> i32 {
    let key_shift = match transposition {
        Transposition::None => 0,
        Transposition::PlainSignature { key_source } => {
            melody_key(primer, key_source).map_or(0, |key| key.shift_to_plain_signature())
        }
    };
    let outside = |shift: i32| {
        primer
            .notes
            .iter()
            .filter(|n| !(lowest as i32..=highest as i32).contains(&(n.pitch as i32 + shift)))
            .count()
    };
    let octaves = (-10..=10).min_by_key(|&k: &i32| (outside(key_shift + 12 * k), k.abs())).unwrap_or(0);
    key_shift + 12 * octaves
}

/// `pitch` moved by octaves into `lowest..=highest`, or clamped when the range is narrower
/// than an octave and misses its pitch class.
fn fold_into(mut pitch: i32, lowest: i32, highest: i32) -> u8 {
    while pitch < lowest && pitch + 12 <= highest {
        pitch += 12;
    }
    while pitch > highest && pitch - 12 >= lowest {
        pitch -= 12;
    }
    pitch.clamp(lowest, highest).clamp(0, 127) as u8
}

/// `melody` moved by `semitones`, each pitch folded by octaves into MIDI's range.
fn shift_melody(melody: &Melody, semitones: i32) -> Melody {
    let mut out = melody.clone();
    for note in &mut out.notes {
        note.pitch = fold_into(note.pitch as i32 + semitones, 0, 127);
    }
    out
}

/// Moves each note onto a pitch the vocabulary holds: the nearest octave of its pitch class,
/// or else the nearest pitch.
fn fit_into_vocab(melody: &Melody, vocab: &Vocab) -> Melody {
    let pitches: Vec<u8> = vocab
        .symbols()
        .iter()
        .filter_map(|s| if let Symbol::Pitch(p) = s { Some(*p) } else { None })
        .collect();
    let mut out = melody.clone();
    for note in &mut out.notes {
        if pitches.contains(&note.pitch) {
            continue;
        }
        let distance = |p: u8| {
            let d = (p as i32 - note.pitch as i32).abs();
            // Same pitch class first, then the smallest move.
            (d % 12 != 0, d)
        };
        if let Some(&best) = pitches.iter().min_by_key(|&&p| distance(p)) {
            note.pitch = best;
        }
    }
    out
}

/// Puts a played primer on the grid (`encode::quantize`: onsets and ends to the nearest step,
/// every note at least one step, overlaps cut at the next onset) and encodes it.
fn encode_primer(primer: &Melody, grid: StepGrid) -> Result<Vec<Symbol>, ModelError> {
    let mut sorted = primer.clone();
    sorted.notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats));
    let quantized = encode::quantize(&sorted, grid);
    let cfg = EncodeConfig::any_on(grid);
    Ok(encode::encode(&quantized, &cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use music::encode::parse_symbols;
    fn melody(notes: &[(u8, f64, f64)]) -> Melody {
        Melody::from_triples(notes)
    }
    use music::{Key, Mode};

    #[test]
    fn primers_are_put_on_the_grid() {
        // Slightly early and late onsets, an overlap, and a trailing rest to beat 2.
        let mut m = melody(&[(60, 0.02, 0.5), (62, 0.48, 0.7), (64, 1.0, 0.6)]);
        m.end_beats = 2.0;
        let symbols = encode_primer(&m, StepGrid::SIXTEENTHS).unwrap();
        assert_eq!(symbols, parse_symbols("60 _ 62 _ 64 _ r _").unwrap());
        // Two onsets on one step: the first note stays.
        let m = melody(&[(60, 0.0, 0.1), (67, 0.05, 0.5)]);
        assert_eq!(encode_primer(&m, StepGrid::SIXTEENTHS).unwrap(), parse_symbols("60 r").unwrap());
    }

    #[test]
    fn the_shift_reaches_the_convention_and_the_range() {
        let plain =
            Transposition::PlainSignature { key_source: music::key::KeySource::DeclaredThenEstimated };
        let mut g = melody(&[(67, 0.0, 1.0), (71, 1.0, 1.0), (74, 2.0, 1.0)]);
        g.key = Some(Key::from_tonic(7, Mode::Major));
        // G major → C major is +5, and G D B at 72..79 fit 60..84.
        assert_eq!(model_shift(&g, plain, 60, 84), 5);
        // With a range an octave lower, the same key move goes down an octave more.
        assert_eq!(model_shift(&g, plain, 48, 72), -7);
        assert_eq!(model_shift(&g, Transposition::None, 0, 127), 0);
    }

    /// A small random model over 60..=72 that reads bar positions of the common meters, the
    /// symbol a bar back and two classes of repeat.
    fn model_with_bars() -> Arc<LoadedModel> {
        use crate::lstm::{MelodyLstm, BAR_TABLE, LOOKBACK_TABLE, REPEAT_TABLE};
        use candle_core::{DType, Device, Tensor};
        use rand::{Rng, SeedableRng};
        let mut cfg = crate::config::tests::small_config();
        cfg.bar_meters = bar::COMMON_METERS.to_vec();
        cfg.bar_lookback = 1;
        cfg.repeat_classes = 2;
        let mut tensors = MelodyLstm::initial_tensors(&cfg, 3, &Device::Cpu).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for name in [BAR_TABLE, LOOKBACK_TABLE, REPEAT_TABLE] {
            let shape = tensors[name].dims().to_vec();
            let values = (0..shape.iter().product()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            tensors.insert(name.to_string(), Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Arc::new(LoadedModel::new(cfg.clone(), MelodyLstm::new(&cfg, vb).unwrap(), "test").unwrap())
    }

    #[test]
    fn a_fresh_song_does_not_end_before_its_first_note_but_may_after() {
        let model = Arc::new(LoadedModel::builtin().unwrap());
        let settings = SamplingSettings::default();
        let mut num_ended = 0;
        for seed in 0..12 {
            let mut phrase = PhraseContinuation::start(Arc::clone(&model), &melody(&[]), 1024, seed).unwrap();
            while phrase.next_symbol(&settings).unwrap().is_some() {}
            let symbols = phrase.symbols();
            let first_note = symbols.iter().position(|s| matches!(s, Symbol::Pitch(_)));
            let end = symbols.iter().position(|&s| s == Symbol::Delimiter);
            assert!(first_note.is_some(), "seed {seed}: {symbols:?}");
            if let Some(end) = end {
                assert!(first_note.unwrap() < end, "seed {seed}: {symbols:?}");
                num_ended += 1;
            }
        }
        assert!(num_ended > 0, "no song ended within 1024 steps: ending was lost altogether");
    }

    #[test]
    fn the_primer_is_fed_at_its_bar_positions() {
        let model = model_with_bars();
        let two_four = Meter { numerator: 2, denominator: 4 };
        // A one-beat pickup in 2/4: the first step is step 4 of the bar's 8; 20 steps in all.
        let mut primer =
            melody(&[(60, 0.0, 1.0), (64, 1.0, 0.5), (65, 1.5, 0.5), (67, 2.0, 2.0), (65, 4.0, 1.0)]);
        primer.key = Some(Key::C_MAJOR);
        primer.meter = Some(two_four);
        primer.pickup_beats = 1.0;
        let mut phrase = PhraseContinuation::start(Arc::clone(&model), &primer, 8, 1).unwrap();
        assert_eq!(phrase.generator.bar_clock().unwrap().step_in_bar(), 0);

        // The same state and logits by hand: the delimiters outside any bar and with nothing
        // to look back to, then each primer step at its own position with the token a bar
        // (8 steps) before the one it predicts; the repeats as training reads them off the
        // same stream.
        let cfg = &model.config;
        let none = cfg.vocab_len() as u16;
        let repeats = |fed: &[u32]| {
            let mut out = Vec::new();
            model.lstm.bar_reader().push(fed, &vec![0; fed.len()], 0, fed.len() - 1, &mut out);
            [out[2] as u16, out[3] as u16]
        };
        let mut clock = BarClock::new(&cfg.bar_meters, two_four, cfg.grid, 4).unwrap();
        let mut state = model.new_state();
        let mut logits = vec![0.0; cfg.vocab_len()];
        let delimiter = cfg.vocab.id(Symbol::Delimiter).unwrap();
        let mut fed: Vec<u32> = Vec::new();
        for _ in 0..cfg.delimiter_len {
            fed.push(delimiter.0 as u32);
            let [short, long] = repeats(&fed);
            model.step_at(delimiter, &[NO_BAR_POSITION, none, short, long], &mut state, &mut logits).unwrap();
        }
        let mut found = [0; 2];
        for symbol in parse_symbols("60 _ _ _ 64 _ 65 _ 67 _ _ _ _ _ _ _ 65 _ _ _").unwrap() {
            let token = cfg.vocab.id(symbol).unwrap();
            fed.push(token.0 as u32);
            let bar_back = fed[fed.len() - 8] as u16;
            let [short, long] = repeats(&fed);
            found[0] += usize::from(short != none);
            found[1] += usize::from(long != none);
            model.step_at(token, &[clock.id(), bar_back, short, long], &mut state, &mut logits).unwrap();
            clock.advance();
        }
        // The primer read both classes: short matches, and long ones in its run of holds.
        assert!(found[0] > 0 && found[1] > 0, "{found:?}");
        assert_eq!(phrase.generator.state(), &state);
        assert_eq!(phrase.generator.logits, logits);

        // Generated steps go on counting; without the meter nothing is counted.
        for _ in 0..3 {
            phrase.next_symbol(&SamplingSettings { may_end: false, ..SamplingSettings::default() }).unwrap();
        }
        assert_eq!(phrase.generator.bar_clock().unwrap().step_in_bar(), 3);
        primer.meter = Some(Meter { numerator: 7, denominator: 8 });
        let odd = PhraseContinuation::start(Arc::clone(&model), &primer, 8, 1).unwrap();
        assert_eq!(odd.generator.bar_clock(), None);
    }

    #[test]
    fn folding_and_vocabulary_fit() {
        assert_eq!(fold_into(50, 60, 72), 62);
        assert_eq!(fold_into(90, 60, 72), 66);
        assert_eq!(fold_into(61, 62, 64), 62);
        let vocab =
            Vocab::from_symbols([Symbol::Pitch(60), Symbol::Pitch(64), Symbol::Pitch(72), Symbol::Hold]);
        let fitted = fit_into_vocab(&melody(&[(48, 0.0, 1.0), (65, 1.0, 1.0), (64, 2.0, 1.0)]), &vocab);
        assert_eq!(fitted.notes.iter().map(|n| n.pitch).collect::<Vec<_>>(), vec![60, 64, 64]);
    }
}
