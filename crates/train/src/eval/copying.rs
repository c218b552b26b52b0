//! How much of a training song a continuation copies: the longest run of consecutive notes
//! that appears verbatim, in any key, in some training song. Notes are compared by the step
//! from the previous note (semitones), their lengths and the rest between them, so a copy a
//! fifth higher counts. The training songs go into one generalized suffix automaton, which
//! finds the longest common run of a query with all of them in time linear in the query.
//! Runs on: offline threads (xtask eval, tests). Pure, no model.

use music::Note;

/// Ticks per quarter note to which lengths and rests are rounded before comparing: a 1/16
/// note is 12 ticks and a triplet eighth 16, so every grid the encoder uses is exact.
pub const TICKS_PER_QUARTER: f64 = 48.0;

/// No state (the root's suffix link).
const NONE: u32 = u32::MAX;

/// One step of a melody as the index sees it: from note `i - 1` to note `i`, packed into 64
/// bits: the interval (16 bits, signed), the previous note's length, the rest between the two,
/// and this note's length (16 bits each, in ticks, saturating). A run of `k` notes is a string
/// of `k - 1` steps, and two runs match exactly when their notes agree up to transposition.
pub fn note_steps(notes: &[Note]) -> Vec<u64> {
    let ticks = |beats: f64| (beats * TICKS_PER_QUARTER).round().clamp(0.0, u16::MAX as f64) as u64;
    notes
        .windows(2)
        .map(|pair| {
            let (a, b) = (&pair[0], &pair[1]);
            let interval = (b.pitch as i32 - a.pitch as i32) as i16 as u16 as u64;
            let gap = ticks(b.start_beats - a.end_beats());
            interval << 48 | ticks(a.len_beats) << 32 | gap << 16 | ticks(b.len_beats)
        })
        .collect()
}

/// The longest run of a query found in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRun {
    /// Notes in the run: 0 for a query without notes, 1 when no two consecutive notes of the
    /// query appear in any training song.
    pub num_notes: usize,
    /// Index of the query's first note of the run.
    pub start_note_idx: usize,
    /// The training song the run was found in (its index in build order), when it is at least
    /// two notes long.
    pub song_idx: Option<usize>,
    /// Index of the run's first note in that training song.
    pub song_start_note_idx: usize,
}

/// One state of the automaton: a set of substrings that end at the same places.
#[derive(Clone, Debug)]
struct State {
    /// Length of the longest substring of this state, in steps.
    len: u32,
    /// The state of the longest suffix that ends elsewhere too (`NONE` at the root).
    link: u32,
    /// Transitions, sorted by step.
    next: Vec<(u64, u32)>,
    /// A training song in which this state's substrings occur.
    song_idx: u32,
    /// The index of the step where they end in that song.
    end_step_idx: u32,
}

impl State {
    fn new(len: u32, song_idx: u32, end_step_idx: u32) -> Self {
        Self { len, link: NONE, next: Vec::new(), song_idx, end_step_idx }
    }

    fn get(&self, step: u64) -> Option<u32> {
        self.next.binary_search_by_key(&step, |e| e.0).ok().map(|i| self.next[i].1)
    }

    fn set(&mut self, step: u64, target: u32) {
        match self.next.binary_search_by_key(&step, |e| e.0) {
            Ok(i) => self.next[i].1 = target,
            Err(i) => self.next.insert(i, (step, target)),
        }
    }
}

/// Every training song's steps in one generalized suffix automaton (at most two states per
/// step).
#[derive(Clone, Debug)]
pub struct CopyIndex {
    states: Vec<State>,
    num_songs: usize,
    num_steps: usize,
}

impl CopyIndex {
    /// Indexes the songs given, each as its sorted, monophonic notes. Song `i` of the iterator
    /// is `song_idx == Some(i)` in the runs found.
    pub fn build<'a>(songs: impl IntoIterator<Item = &'a [Note]>) -> Self {
        let mut index = Self { states: vec![State::new(0, 0, 0)], num_songs: 0, num_steps: 0 };
        for (song_idx, notes) in songs.into_iter().enumerate() {
            let mut last = 0;
            for (step_idx, step) in note_steps(notes).into_iter().enumerate() {
                last = index.extend(last, step, song_idx as u32, step_idx as u32);
                index.num_steps += 1;
            }
            index.num_songs += 1;
        }
        index
    }

    /// Songs indexed.
    pub fn num_songs(&self) -> usize {
        self.num_songs
    }

    /// Steps indexed (each song contributes one fewer than its notes).
    pub fn num_steps(&self) -> usize {
        self.num_steps
    }

    fn push(&mut self, state: State) -> u32 {
        self.states.push(state);
        (self.states.len() - 1) as u32
    }

    /// A copy of state `q` that keeps only substrings up to `len` steps long.
    fn clone_state(&mut self, q: u32, len: u32) -> u32 {
        let mut clone = self.states[q as usize].clone();
        clone.len = len;
        self.push(clone)
    }

    /// Redirects `step` transitions from `q` to `clone` along the suffix links from `p`.
    fn redirect(&mut self, mut p: u32, step: u64, q: u32, clone: u32) {
        while p != NONE && self.states[p as usize].get(step) == Some(q) {
            self.states[p as usize].set(step, clone);
            p = self.states[p as usize].link;
        }
    }

    /// Appends `step` to the song whose current end is state `last`; returns the new end.
    fn extend(&mut self, last: u32, step: u64, song_idx: u32, step_idx: u32) -> u32 {
        let last_len = self.states[last as usize].len;
        // A later song may already have this continuation; reuse it or split it off.
        if let Some(q) = self.states[last as usize].get(step) {
            if self.states[q as usize].len == last_len + 1 {
                return q;
            }
            let clone = self.clone_state(q, last_len + 1);
            self.redirect(last, step, q, clone);
            self.states[q as usize].link = clone;
            return clone;
        }
        let cur = self.push(State::new(last_len + 1, song_idx, step_idx));
        let mut p = last;
        while p != NONE && self.states[p as usize].get(step).is_none() {
            self.states[p as usize].set(step, cur);
            p = self.states[p as usize].link;
        }
        if p == NONE {
            self.states[cur as usize].link = 0;
            return cur;
        }
        let q = self.states[p as usize].get(step).expect("found above");
        if self.states[p as usize].len + 1 == self.states[q as usize].len {
            self.states[cur as usize].link = q;
        } else {
            let clone = self.clone_state(q, self.states[p as usize].len + 1);
            self.redirect(p, step, q, clone);
            self.states[q as usize].link = clone;
            self.states[cur as usize].link = clone;
        }
        cur
    }

    /// The longest run of consecutive `notes` that occurs verbatim (up to transposition) in an
    /// indexed song; the first such run when several are as long.
    pub fn longest_run(&self, notes: &[Note]) -> CopyRun {
        let mut best = CopyRun {
            num_notes: notes.len().min(1),
            start_note_idx: 0,
            song_idx: None,
            song_start_note_idx: 0,
        };
        let (mut state, mut len) = (0u32, 0u32);
        let mut best_len = 0;
        for (step_idx, step) in note_steps(notes).into_iter().enumerate() {
            while state != 0 && self.states[state as usize].get(step).is_none() {
                state = self.states[state as usize].link;
                len = self.states[state as usize].len;
            }
            match self.states[state as usize].get(step) {
                Some(next) => {
                    state = next;
                    len += 1;
                }
                None => {
                    state = 0;
                    len = 0;
                }
            }
            if len > best_len {
                best_len = len;
                let found = &self.states[state as usize];
                best = CopyRun {
                    num_notes: len as usize + 1,
                    start_note_idx: step_idx + 1 - len as usize,
                    song_idx: Some(found.song_idx as usize),
                    song_start_note_idx: (found.end_step_idx + 1 - len) as usize,
                };
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes of `(pitch, len_beats)` one after another, with no rests.
    fn line(notes: &[(u8, f64)]) -> Vec<Note> {
        let mut t = 0.0;
        notes
            .iter()
            .map(|&(p, len)| {
                let n = Note::new(p, t, len);
                t += len;
                n
            })
            .collect()
    }

    /// The longest run by brute force: every start in the query against every start in every
    /// song.
    fn brute_force(songs: &[Vec<Note>], query: &[Note]) -> usize {
        let q = note_steps(query);
        let mut best = query.len().min(1);
        for song in songs {
            let s = note_steps(song);
            for i in 0..q.len() {
                for j in 0..s.len() {
                    let n = q[i..].iter().zip(&s[j..]).take_while(|(a, b)| a == b).count();
                    if n > 0 {
                        best = best.max(n + 1);
                    }
                }
            }
        }
        best
    }

    #[test]
    fn a_transposed_copy_is_found_with_its_song() {
        let songs = [
            line(&[(60, 1.0), (62, 1.0), (64, 1.0), (65, 1.0), (67, 2.0)]),
            line(&[(69, 0.5), (67, 0.5), (65, 0.5), (64, 0.5), (62, 1.0), (60, 1.0)]),
        ];
        let index = CopyIndex::build(songs.iter().map(Vec::as_slice));
        assert_eq!((index.num_songs(), index.num_steps()), (2, 9));
        // Song 1's notes 1..=4 (67 65 64 62, eighths then a quarter) a fifth lower, after an
        // unrelated first note; then a note that breaks the run.
        let query = line(&[(50, 1.0), (60, 0.5), (58, 0.5), (57, 0.5), (55, 1.0), (40, 1.0)]);
        let run = index.longest_run(&query);
        assert_eq!(
            run,
            CopyRun { num_notes: 4, start_note_idx: 1, song_idx: Some(1), song_start_note_idx: 1 }
        );
        // The same pitches with other lengths are not a copy.
        let other_lengths = line(&[(60, 0.25), (58, 0.25), (57, 0.25), (55, 0.25)]);
        assert_eq!(index.longest_run(&other_lengths).num_notes, 1);
        assert_eq!(index.longest_run(&other_lengths).song_idx, None);
        assert_eq!(index.longest_run(&[]).num_notes, 0);
    }

    #[test]
    fn a_rest_breaks_a_copy() {
        let songs = [line(&[(60, 1.0), (62, 1.0), (64, 1.0)])];
        let index = CopyIndex::build(songs.iter().map(Vec::as_slice));
        let with_rests = vec![Note::new(60, 0.0, 1.0), Note::new(62, 1.5, 1.0), Note::new(64, 3.0, 1.0)];
        assert_eq!(index.longest_run(&with_rests).num_notes, 1);
        // A rest before the last note only: the first two notes still match.
        let one_rest = vec![Note::new(60, 0.0, 1.0), Note::new(62, 1.0, 1.0), Note::new(64, 2.5, 1.0)];
        assert_eq!(index.longest_run(&one_rest).num_notes, 2);
        assert_eq!(index.longest_run(&songs[0]).num_notes, 3);
    }

    #[test]
    fn agrees_with_brute_force_on_many_queries() {
        // Pseudo-random songs over a small alphabet, so runs of every length occur.
        let mut seed = 12345u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let mut random_line = |n: usize| -> Vec<Note> {
            let notes: Vec<(u8, f64)> =
                (0..n).map(|_| (60 + next(4) as u8, [0.5, 1.0][next(2) as usize])).collect();
            line(&notes)
        };
        let songs: Vec<Vec<Note>> = (0..20).map(|i| random_line(10 + i)).collect();
        let index = CopyIndex::build(songs.iter().map(Vec::as_slice));
        for _ in 0..200 {
            let query = random_line(12);
            let run = index.longest_run(&query);
            assert_eq!(run.num_notes, brute_force(&songs, &query));
            if let Some(song) = run.song_idx {
                // The named place really holds the run.
                let q = &note_steps(&query)[run.start_note_idx..run.start_note_idx + run.num_notes - 1];
                let s = &note_steps(&songs[song])
                    [run.song_start_note_idx..run.song_start_note_idx + run.num_notes - 1];
                assert_eq!(q, s);
            }
        }
    }
}
