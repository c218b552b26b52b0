//! Polyphonic music on a step grid: the piano roll (which pitches sound at each step and which of
//! them were struck there), the benchmark `.frames` text format, and the chord tokens a streaming
//! model reads and writes one at a time.
//! Runs on: any thread. `PitchSet`, `Frame`, `ChordCodec` and `FrameCursor` are plain `Copy`
//! values whose methods never allocate (the worker's generation step uses them); rolls, readers
//! and token lists allocate.
//!
//! # Chord tokens
//! A frame is written as its sounding pitches in ascending order, then a step token that closes
//! it. A pitch token says "this pitch sounds here": held on if it sounded in the previous frame,
//! struck otherwise. A pitch that sounded in the previous frame and is struck again has a token
//! of its own (a re-strike). The mapping from rolls to tokens is deterministic and invertible,
//! and `FrameCursor::allows` says which tokens can come next (ascending order, re-strikes only
//! of sounding pitches, at most so many voices): a model that samples only allowed tokens
//! defines an exact probability for every roll, which is what the benchmarks score.

use std::fmt;
use std::path::Path;

use crate::encode::StepGrid;
use crate::note::Note;

/// A set of MIDI pitches (bit `p` = pitch `p`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PitchSet(pub u128);

impl PitchSet {
    /// No pitch.
    pub const EMPTY: PitchSet = PitchSet(0);

    /// The set of `pitches` (values above 127 are left out).
    pub fn of(pitches: &[u8]) -> Self {
        pitches.iter().fold(Self::EMPTY, |set, &p| set.with(p))
    }

    /// This set and `pitch` (unchanged for a pitch above 127).
    pub fn with(self, pitch: u8) -> Self {
        if pitch > 127 {
            return self;
        }
        PitchSet(self.0 | 1 << pitch)
    }

    /// Whether `pitch` is in the set.
    pub fn contains(self, pitch: u8) -> bool {
        pitch <= 127 && self.0 & (1 << pitch) != 0
    }

    /// Number of pitches.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// True for the empty set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The pitches both sets hold.
    pub fn intersection(self, other: PitchSet) -> PitchSet {
        PitchSet(self.0 & other.0)
    }

    /// The pitches of this set that `other` lacks.
    pub fn difference(self, other: PitchSet) -> PitchSet {
        PitchSet(self.0 & !other.0)
    }

    /// The pitches of either set.
    pub fn union(self, other: PitchSet) -> PitchSet {
        PitchSet(self.0 | other.0)
    }

    /// Lowest pitch, if any.
    pub fn lowest(self) -> Option<u8> {
        (self.0 != 0).then(|| self.0.trailing_zeros() as u8)
    }

    /// Highest pitch, if any.
    pub fn highest(self) -> Option<u8> {
        (self.0 != 0).then(|| 127 - self.0.leading_zeros() as u8)
    }

    /// The pitches, ascending.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let p = bits.trailing_zeros() as u8;
                bits &= bits - 1;
                p
            })
        })
    }

    /// Every pitch moved by `semitones`, or `None` when one would leave 0..=127.
    pub fn transposed(self, semitones: i32) -> Option<Self> {
        if self.is_empty() {
            return Some(self);
        }
        let (lo, hi) = (self.lowest()? as i32 + semitones, self.highest()? as i32 + semitones);
        if lo < 0 || hi > 127 {
            return None;
        }
        Some(PitchSet(if semitones >= 0 { self.0 << semitones } else { self.0 >> -semitones }))
    }
}

impl fmt::Debug for PitchSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// One step of a piano roll.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The pitches sounding in the step.
    pub sounding: PitchSet,
    /// The sounding pitches whose note starts at this step (a subset of `sounding`).
    pub struck: PitchSet,
}

impl Frame {
    /// The frame of `sounding` after `previous`: a pitch that was not sounding is struck, one
    /// that was is held (the reading of the benchmarks, which record no onsets).
    pub fn after(previous: PitchSet, sounding: PitchSet) -> Self {
        Frame { sounding, struck: sounding.difference(previous) }
    }
}

/// A piece as frames on a step grid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PianoRoll {
    /// One frame per step, from the piece's start.
    pub frames: Vec<Frame>,
}

impl PianoRoll {
    /// The roll of a list of sounding sets, each pitch struck where it starts to sound.
    pub fn from_chords(chords: &[PitchSet]) -> Self {
        let mut previous = PitchSet::EMPTY;
        let frames = chords
            .iter()
            .map(|&sounding| {
                let frame = Frame::after(previous, sounding);
                previous = sounding;
                frame
            })
            .collect();
        PianoRoll { frames }
    }

    /// The roll of `notes` on `grid`: each onset and end moves to the nearest step, and a note
    /// keeps at least one step. Two notes of one pitch that overlap sound as one, struck at each
    /// onset. `len_steps` fixes the length; `None` ends the roll with its last note.
    pub fn from_notes(notes: &[Note], grid: StepGrid, len_steps: Option<usize>) -> Self {
        let spans: Vec<(u8, usize, usize)> = notes
            .iter()
            .filter(|n| n.pitch <= 127 && n.start_beats.is_finite() && n.len_beats.is_finite())
            .map(|n| {
                let start = grid.nearest_steps(n.start_beats) as usize;
                let end = (grid.nearest_steps(n.end_beats()) as usize).max(start + 1);
                (n.pitch, start, end)
            })
            .collect();
        let len = len_steps.unwrap_or_else(|| spans.iter().map(|s| s.2).max().unwrap_or(0));
        let mut frames = vec![Frame::default(); len];
        for (pitch, start, end) in spans {
            if start >= len {
                continue;
            }
            frames[start].struck = frames[start].struck.with(pitch);
            for frame in &mut frames[start..end.min(len)] {
                frame.sounding = frame.sounding.with(pitch);
            }
        }
        PianoRoll { frames }
    }

    /// The notes of the roll on `grid`: a note starts where its pitch is struck (or starts to
    /// sound) and lasts while it sounds without being struck again. Sorted by onset, then pitch.
    pub fn to_notes(&self, grid: StepGrid, velocity: u8) -> Vec<Note> {
        let step = grid.step_beats();
        let mut notes = Vec::new();
        let mut open: [Option<usize>; 128] = [None; 128];
        let close = |notes: &mut Vec<Note>, pitch: u8, start: usize, end: usize| {
            notes.push(Note {
                pitch,
                velocity,
                start_beats: start as f64 * step,
                len_beats: (end - start) as f64 * step,
            });
        };
        for (t, frame) in self.frames.iter().enumerate() {
            for pitch in 0..128u8 {
                let sounding = frame.sounding.contains(pitch);
                let restart = frame.struck.contains(pitch);
                if let Some(start) = open[pitch as usize] {
                    if !sounding || restart {
                        close(&mut notes, pitch, start, t);
                        open[pitch as usize] = None;
                    }
                }
                if sounding && open[pitch as usize].is_none() {
                    open[pitch as usize] = Some(t);
                }
            }
        }
        for (pitch, start) in open.iter().enumerate() {
            if let Some(start) = *start {
                close(&mut notes, pitch as u8, start, self.frames.len());
            }
        }
        notes.sort_by(|a, b| a.start_beats.total_cmp(&b.start_beats).then(a.pitch.cmp(&b.pitch)));
        notes
    }

    /// The roll moved by `semitones`, or `None` when a pitch would leave 0..=127.
    pub fn transposed(&self, semitones: i32) -> Option<Self> {
        let frames = self
            .frames
            .iter()
            .map(|f| {
                Some(Frame {
                    sounding: f.sounding.transposed(semitones)?,
                    struck: f.struck.transposed(semitones)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PianoRoll { frames })
    }

    /// The roll on a grid `factor` times finer: each frame becomes `factor` frames, its notes
    /// struck on the first.
    pub fn stretched(&self, factor: usize) -> Self {
        let frames = self
            .frames
            .iter()
            .flat_map(|&f| {
                std::iter::once(f).chain(std::iter::repeat_n(
                    Frame { sounding: f.sounding, struck: PitchSet::EMPTY },
                    factor.max(1) - 1,
                ))
            })
            .collect();
        PianoRoll { frames }
    }

    /// Most pitches sounding in one frame.
    pub fn max_voices(&self) -> usize {
        self.frames.iter().map(|f| f.sounding.len()).max().unwrap_or(0)
    }

    /// The sounding pitches of every frame.
    pub fn chords(&self) -> Vec<PitchSet> {
        self.frames.iter().map(|f| f.sounding).collect()
    }
}

/// What is wrong with a `.frames` file.
#[derive(Debug, thiserror::Error)]
pub enum FramesError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}, line {line}: '{text}' is not a MIDI pitch (0 to 127)")]
    BadPitch { path: String, line: usize, text: String },
    #[error("{path}, line {line}: a frame before the first '#' line that starts a sequence")]
    NoSequence { path: String, line: usize },
    #[error("{path}: no sequence (a sequence starts with a line '#')")]
    Empty { path: String },
}

/// Parses the benchmark `.frames` format: a line `#` starts a sequence, then each line is a
/// frame, its sounding MIDI pitches separated by spaces (empty for silence). `path` names the
/// file in errors.
pub fn parse_frames(text: &str, path: &str) -> Result<Vec<Vec<PitchSet>>, FramesError> {
    let mut sequences: Vec<Vec<PitchSet>> = Vec::new();
    let mut lines: Vec<&str> = text.split('\n').collect();
    // The newline that ends the last line does not start another frame.
    if lines.last() == Some(&"") {
        lines.pop();
    }
    for (idx, line) in lines.into_iter().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim() == "#" {
            sequences.push(Vec::new());
            continue;
        }
        let Some(sequence) = sequences.last_mut() else {
            return Err(FramesError::NoSequence { path: path.to_string(), line: idx + 1 });
        };
        let mut set = PitchSet::EMPTY;
        for word in line.split_whitespace() {
            let pitch = word.parse::<u8>().ok().filter(|&p| p <= 127).ok_or_else(|| {
                FramesError::BadPitch { path: path.to_string(), line: idx + 1, text: word.to_string() }
            })?;
            set = set.with(pitch);
        }
        sequence.push(set);
    }
    if sequences.is_empty() {
        return Err(FramesError::Empty { path: path.to_string() });
    }
    Ok(sequences)
}

/// Reads and parses a `.frames` file.
pub fn read_frames_file(path: &Path) -> Result<Vec<Vec<PitchSet>>, FramesError> {
    let name = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|source| FramesError::Read { path: name.clone(), source })?;
    parse_frames(&text, &name)
}

/// One chord token, decoded (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChordToken {
    /// Closes the frame.
    Step,
    /// The pitch sounds in this frame: held on if it sounded in the previous one, else struck.
    Sound(u8),
    /// The pitch, sounding in the previous frame, is struck again.
    Restrike(u8),
}

/// Token ids of the chord tokens over a pitch range: 0 is the step, then one sound token per
/// pitch from `lowest` up, then one re-strike token per pitch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChordCodec {
    /// Lowest pitch, inclusive.
    pub lowest: u8,
    /// Highest pitch, inclusive.
    pub highest: u8,
}

/// Token id of the step.
pub const STEP_TOKEN: u32 = 0;

impl ChordCodec {
    /// The 88 keys of a piano, A0 (21) to C8 (108): the benchmarks' range.
    pub const PIANO: ChordCodec = ChordCodec { lowest: 21, highest: 108 };

    /// Number of pitches in the range.
    pub fn num_pitches(&self) -> usize {
        (self.highest - self.lowest) as usize + 1
    }

    /// Number of token ids.
    pub fn vocab_len(&self) -> usize {
        1 + 2 * self.num_pitches()
    }

    /// The id of `token`, or `None` for a pitch outside the range.
    pub fn id(&self, token: ChordToken) -> Option<u32> {
        let index = |p: u8| (self.lowest..=self.highest).contains(&p).then(|| (p - self.lowest) as u32);
        match token {
            ChordToken::Step => Some(STEP_TOKEN),
            ChordToken::Sound(p) => index(p).map(|i| 1 + i),
            ChordToken::Restrike(p) => index(p).map(|i| 1 + self.num_pitches() as u32 + i),
        }
    }

    /// The token of `id`, or `None` for an id outside the vocabulary.
    pub fn token(&self, id: u32) -> Option<ChordToken> {
        let n = self.num_pitches() as u32;
        match id {
            STEP_TOKEN => Some(ChordToken::Step),
            i if i <= n => Some(ChordToken::Sound(self.lowest + (i - 1) as u8)),
            i if i <= 2 * n => Some(ChordToken::Restrike(self.lowest + (i - 1 - n) as u8)),
            _ => None,
        }
    }

    /// The pitches of `set` inside the range.
    pub fn clip(&self, set: PitchSet) -> PitchSet {
        let range = if self.highest >= 127 { u128::MAX } else { (1u128 << (self.highest + 1)) - 1 };
        PitchSet(set.0 & range & !((1u128 << self.lowest) - 1))
    }

    /// Appends the tokens of `frame` after a frame sounding `previous`. Pitches outside the range
    /// are left out (`clip` first to know which).
    pub fn encode_frame(&self, previous: PitchSet, frame: Frame, out: &mut Vec<u32>) {
        for pitch in self.clip(frame.sounding).iter() {
            let token = if previous.contains(pitch) && frame.struck.contains(pitch) {
                ChordToken::Restrike(pitch)
            } else {
                ChordToken::Sound(pitch)
            };
            out.extend(self.id(token));
        }
        out.push(STEP_TOKEN);
    }

    /// The tokens of a whole roll, from silence.
    pub fn encode(&self, roll: &PianoRoll) -> Vec<u32> {
        let mut out = Vec::with_capacity(roll.frames.len() * 4);
        let mut previous = PitchSet::EMPTY;
        for &frame in &roll.frames {
            self.encode_frame(previous, frame, &mut out);
            previous = self.clip(frame.sounding);
        }
        out
    }

    /// The roll of `tokens` (from silence): every step token closes a frame, and tokens after
    /// the last one are left out. Errors name the first token that cannot come where it is.
    pub fn decode(&self, tokens: &[u32]) -> Result<PianoRoll, String> {
        let mut cursor = FrameCursor::new(*self);
        let mut frames = Vec::new();
        for (i, &id) in tokens.iter().enumerate() {
            if !cursor.allows(id, usize::MAX) {
                return Err(format!("token {id} at position {i} cannot follow the tokens before it"));
            }
            if let Some(frame) = cursor.push(id) {
                frames.push(frame);
            }
        }
        Ok(PianoRoll { frames })
    }
}

/// Where a token stream stands: the previous frame's pitches and the frame being written. It
/// says which tokens may come next and which inputs a model reads beside the last token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCursor {
    codec: ChordCodec,
    previous: PitchSet,
    current: Frame,
}

impl FrameCursor {
    /// A stream at the start of a piece: after silence, no frame begun.
    pub fn new(codec: ChordCodec) -> Self {
        FrameCursor { codec, previous: PitchSet::EMPTY, current: Frame::default() }
    }

    /// The codec it reads.
    pub fn codec(&self) -> ChordCodec {
        self.codec
    }

    /// The pitches of the last finished frame.
    pub fn previous(&self) -> PitchSet {
        self.previous
    }

    /// The frame being written, so far.
    pub fn current(&self) -> Frame {
        self.current
    }

    /// Whether token `id` may come next in a frame of at most `max_voices` pitches: a pitch
    /// above every pitch written in this frame (a re-strike only of a pitch of the previous
    /// frame), or the step.
    pub fn allows(&self, id: u32, max_voices: usize) -> bool {
        let above = |p: u8| self.current.sounding.highest().is_none_or(|h| p > h);
        match self.codec.token(id) {
            Some(ChordToken::Step) => true,
            Some(ChordToken::Sound(p)) => above(p) && self.current.sounding.len() < max_voices,
            Some(ChordToken::Restrike(p)) => {
                above(p) && self.previous.contains(p) && self.current.sounding.len() < max_voices
            }
            None => false,
        }
    }

    /// Takes token `id` (which `allows` should have accepted); returns the frame a step closes.
    pub fn push(&mut self, id: u32) -> Option<Frame> {
        match self.codec.token(id)? {
            ChordToken::Step => {
                let frame = self.current;
                self.previous = frame.sounding;
                self.current = Frame::default();
                Some(frame)
            }
            ChordToken::Sound(p) => {
                self.current.sounding = self.current.sounding.with(p);
                if !self.previous.contains(p) {
                    self.current.struck = self.current.struck.with(p);
                }
                None
            }
            ChordToken::Restrike(p) => {
                self.current.sounding = self.current.sounding.with(p);
                self.current.struck = self.current.struck.with(p);
                None
            }
        }
    }

    /// Calls `row` with the model's context inputs beside the last token, as indices into the
    /// `2 · num_pitches` context rows: each pitch of the previous frame (`0..n`), then each pitch
    /// written so far in this frame (`n..2n`).
    pub fn context_rows(&self, mut row: impl FnMut(u32)) {
        let n = self.codec.num_pitches() as u32;
        for p in self.previous.iter() {
            row((p - self.codec.lowest) as u32);
        }
        for p in self.current.sounding.iter() {
            row(n + (p - self.codec.lowest) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_roll(rng: &mut ChaCha8Rng, codec: ChordCodec) -> PianoRoll {
        let len = rng.random_range(0..40);
        let mut previous = PitchSet::EMPTY;
        let frames = (0..len)
            .map(|_| {
                let mut sounding = PitchSet::EMPTY;
                for _ in 0..rng.random_range(0..6) {
                    sounding = sounding.with(rng.random_range(codec.lowest..=codec.highest));
                }
                // Some held pitches are struck again.
                let restruck = PitchSet(sounding.intersection(previous).0 & rng.random::<u128>());
                let frame = Frame { sounding, struck: sounding.difference(previous).union(restruck) };
                previous = sounding;
                frame
            })
            .collect();
        PianoRoll { frames }
    }

    #[test]
    fn tokens_map_rolls_one_to_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..500 {
            let roll = random_roll(&mut rng, ChordCodec::PIANO);
            let tokens = ChordCodec::PIANO.encode(&roll);
            assert_eq!(tokens.iter().filter(|&&t| t == STEP_TOKEN).count(), roll.frames.len());
            assert_eq!(ChordCodec::PIANO.decode(&tokens).unwrap(), roll);
        }
    }

    #[test]
    fn rolls_survive_notes_and_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let grid = StepGrid { steps_per_quarter: 2 };
        for _ in 0..200 {
            let roll = random_roll(&mut rng, ChordCodec::PIANO);
            let notes = roll.to_notes(grid, 80);
            assert_eq!(PianoRoll::from_notes(&notes, grid, Some(roll.frames.len())), roll);
        }
    }

    #[test]
    fn a_stretched_roll_holds_its_notes() {
        let roll = PianoRoll::from_chords(&[PitchSet::of(&[60, 64]), PitchSet::of(&[64])]);
        let grid = StepGrid { steps_per_quarter: 1 };
        let fine = StepGrid { steps_per_quarter: 2 };
        assert_eq!(roll.stretched(2).to_notes(fine, 80), roll.to_notes(grid, 80));
        assert_eq!(roll.stretched(2).frames.len(), 4);
    }

    #[test]
    fn the_cursor_refuses_what_cannot_follow() {
        let codec = ChordCodec { lowest: 60, highest: 72 };
        let id = |t| codec.id(t).unwrap();
        let mut cursor = FrameCursor::new(codec);
        assert!(!cursor.allows(id(ChordToken::Restrike(64)), 4), "nothing sounded before");
        cursor.push(id(ChordToken::Sound(64)));
        assert!(!cursor.allows(id(ChordToken::Sound(62)), 4), "pitches ascend");
        assert!(!cursor.allows(id(ChordToken::Sound(64)), 4), "a pitch once");
        assert!(cursor.allows(id(ChordToken::Sound(67)), 4));
        assert!(!cursor.allows(id(ChordToken::Sound(67)), 1), "one voice at most");
        assert_eq!(
            cursor.push(STEP_TOKEN),
            Some(Frame { sounding: PitchSet::of(&[64]), struck: PitchSet::of(&[64]) })
        );
        assert!(cursor.allows(id(ChordToken::Restrike(64)), 4));
        assert!(!cursor.allows(99, 4), "outside the vocabulary");
        let mut rows = Vec::new();
        cursor.push(id(ChordToken::Sound(67)));
        cursor.context_rows(|r| rows.push(r));
        assert_eq!(rows, vec![4, 13 + 7]);
    }

    #[test]
    fn benchmark_midi_files_read_back_to_their_frames() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/poly-benchmarks");
        for (set, steps_per_quarter) in
            [("jsb-chorales", 1), ("nottingham", 2), ("piano-midi", 2), ("musedata", 2)]
        {
            let grid = StepGrid { steps_per_quarter };
            let sequences = read_frames_file(&root.join(set).join("valid.frames")).unwrap();
            for (idx, chords) in sequences.iter().enumerate().take(6) {
                let path = root.join(set).join("valid").join(format!("{idx:04}.mid"));
                let notes = crate::midi::read_midi_notes(&path).unwrap();
                let from_midi = PianoRoll::from_notes(&notes, grid, Some(chords.len()));
                assert_eq!(from_midi.chords(), *chords, "{}", path.display());
                assert_eq!(from_midi, PianoRoll::from_chords(chords), "{}: onsets", path.display());
            }
        }
    }

    #[test]
    fn frames_files_parse_and_refuse_damage() {
        let seqs = parse_frames("#\n60 64 67\n\n62\n#\n48\n", "x.frames").unwrap();
        assert_eq!(
            seqs,
            vec![
                vec![PitchSet::of(&[60, 64, 67]), PitchSet::EMPTY, PitchSet::of(&[62])],
                vec![PitchSet::of(&[48])]
            ]
        );
        let err = parse_frames("#\n60 x\n", "bad.frames").unwrap_err().to_string();
        assert!(err.contains("bad.frames, line 2") && err.contains("'x'"), "{err}");
        assert!(parse_frames("60\n", "f").unwrap_err().to_string().contains("before the first '#'"));
        assert!(parse_frames("", "f").unwrap_err().to_string().contains("no sequence"));
    }
}
