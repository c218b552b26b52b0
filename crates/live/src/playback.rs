//! The answer's notes on their way out: a fixed queue of notes the worker has written and a
//! fixed table of the notes that sound, so that every note-on gets its note-off.
//! Runs on: audio thread. No allocation, no locks, no candle.
//!
//! The worker streams note starts and ends separately (a note's end is not known when it
//! starts). A start waits in the queue until its time; an end finds its note, in the queue or
//! already sounding. The gate shortens a note once both ends are known.

use arrayvec::ArrayVec;

use crate::phrase::LOOKAHEAD_BEATS;

/// Most answer notes waiting to start. The worker writes about a beat ahead, a handful of notes.
pub const MAX_QUEUED_NOTES: usize = 256;

/// Most answer notes sounding at once. The answer is monophonic; a note's end and the next start
/// can meet, so two would do.
pub const MAX_SOUNDING_NOTES: usize = 16;

/// A fixed-capacity first-in first-out queue of `Copy` items.
#[derive(Clone, Debug)]
pub struct FixedQueue<T: Copy, const N: usize> {
    items: [Option<T>; N],
    head_idx: usize,
    len: usize,
}

impl<T: Copy, const N: usize> Default for FixedQueue<T, N> {
    fn default() -> Self {
        Self { items: [None; N], head_idx: 0, len: 0 }
    }
}

impl<T: Copy, const N: usize> FixedQueue<T, N> {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `item`; gives it back when the queue is full.
    pub fn push_back(&mut self, item: T) -> Result<(), T> {
        if self.len == N {
            return Err(item);
        }
        self.items[(self.head_idx + self.len) % N] = Some(item);
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the oldest item.
    pub fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let item = self.items[self.head_idx].take();
        self.head_idx = (self.head_idx + 1) % N;
        self.len -= 1;
        item
    }

    /// The oldest item.
    pub fn front(&self) -> Option<&T> {
        if self.len == 0 {
            None
        } else {
            self.items[self.head_idx].as_ref()
        }
    }

    /// The item `idx` places from the front, mutably.
    pub fn get_mut(&mut self, idx: usize) -> Option<&mut T> {
        if idx >= self.len {
            return None;
        }
        self.items[(self.head_idx + idx) % N].as_mut()
    }

    /// Removes every item.
    pub fn clear(&mut self) {
        while self.pop_front().is_some() {}
    }
}

/// An answer note waiting to start, on the timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
struct QueuedNote {
    pitch: u8,
    start_beats: f64,
    /// Unquantized end as written, once the worker has written it.
    end_beats: Option<f64>,
}

/// An answer note that sounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoundingNote {
    /// MIDI key.
    pub key: u8,
    /// MIDI channel, 0..=15, as sent with the note-on.
    pub channel: u8,
    /// When it started, on the timeline.
    pub start_beats: f64,
    /// Where the worker ended it, once known.
    pub end_beats: Option<f64>,
}

/// What is due next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Due {
    /// The sounding note at this index ends.
    Off { sounding_idx: usize },
    /// The first queued note starts.
    On,
}

/// Why a note from the worker was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It should have started too long ago.
    Late,
    /// The queue was full.
    Full,
}

/// The answer's queue and sounding notes. Fixed capacity.
#[derive(Clone, Debug, Default)]
pub struct Playback {
    queue: FixedQueue<QueuedNote, MAX_QUEUED_NOTES>,
    sounding: ArrayVec<SoundingNote, MAX_SOUNDING_NOTES>,
    /// Whether the latest note start from the worker was refused, so its end must be ignored.
    is_latest_refused: bool,
}

impl Playback {
    /// Takes a note start at `at_beats` on the timeline. A start more than `late_tolerance_beats`
    /// before `now_beats` is refused as late; one within the tolerance plays at once.
    pub fn push_on(
        &mut self,
        pitch: u8,
        at_beats: f64,
        now_beats: f64,
        late_tolerance_beats: f64,
    ) -> Result<(), Refused> {
        self.is_latest_refused = true;
        if at_beats < now_beats - late_tolerance_beats {
            return Err(Refused::Late);
        }
        self.queue
            .push_back(QueuedNote { pitch, start_beats: at_beats, end_beats: None })
            .map_err(|_| Refused::Full)?;
        self.is_latest_refused = false;
        Ok(())
    }

    /// Takes a note end at `at_beats`: the latest open note of `pitch`, queued or sounding, ends
    /// there. Ends of refused starts are ignored.
    pub fn push_off(&mut self, pitch: u8, at_beats: f64) {
        if self.is_latest_refused {
            return;
        }
        for idx in (0..self.queue.len()).rev() {
            if let Some(note) = self.queue.get_mut(idx) {
                if note.pitch == pitch && note.end_beats.is_none() {
                    note.end_beats = Some(at_beats.max(note.start_beats));
                    return;
                }
            }
        }
        if let Some(note) = self.sounding.iter_mut().rev().find(|n| n.key == pitch && n.end_beats.is_none()) {
            note.end_beats = Some(at_beats.max(note.start_beats));
        }
    }

    /// When the sounding note at `idx` ends: its start plus `gate` (0..=1) of its written length,
    /// but at least `min_len_beats` after its start, and at most [`LOOKAHEAD_BEATS`] before its
    /// written end. A note's end is written only about that far ahead, so a gated end earlier
    /// than that could not be known in time; the cap keeps the result the same however the
    /// worker's chunks fall. `None` while its end is not written.
    pub fn off_beats(&self, idx: usize, gate: f64, min_len_beats: f64) -> Option<f64> {
        let note = self.sounding.get(idx)?;
        let end = note.end_beats?;
        let gated = note.start_beats + (end - note.start_beats) * gate.clamp(0.0, 1.0);
        Some(
            gated
                .max(end - LOOKAHEAD_BEATS)
                .max(note.start_beats + min_len_beats)
                .min(end.max(note.start_beats + min_len_beats)),
        )
    }

    /// The earliest thing due and its time; an end comes before a start at the same time.
    pub fn next_due(&self, gate: f64, min_len_beats: f64) -> Option<(f64, Due)> {
        let mut best: Option<(f64, Due)> = None;
        for idx in 0..self.sounding.len() {
            if let Some(off) = self.off_beats(idx, gate, min_len_beats) {
                if best.is_none_or(|(t, _)| off < t) {
                    best = Some((off, Due::Off { sounding_idx: idx }));
                }
            }
        }
        if let Some(first) = self.queue.front() {
            if best.is_none_or(|(t, _)| first.start_beats < t) {
                best = Some((first.start_beats, Due::On));
            }
        }
        best
    }

    /// Removes and returns the sounding note at `idx` (its note-off is being sent).
    pub fn end_sounding(&mut self, idx: usize) -> Option<SoundingNote> {
        (idx < self.sounding.len()).then(|| self.sounding.remove(idx))
    }

    /// Starts the first queued note on `channel` at `at_beats`. Returns it, or `None` when the
    /// queue is empty or the sounding table is full (the note is then dropped).
    pub fn start_next(&mut self, channel: u8, at_beats: f64) -> Option<SoundingNote> {
        let queued = self.queue.pop_front()?;
        let note =
            SoundingNote { key: queued.pitch, channel, start_beats: at_beats, end_beats: queued.end_beats };
        self.sounding.try_push(note).ok()?;
        Some(note)
    }

    /// Whether a note of `key` on `channel` sounds.
    pub fn is_sounding(&self, key: u8, channel: u8) -> Option<usize> {
        self.sounding.iter().position(|n| n.key == key && n.channel == channel)
    }

    /// Whether nothing is queued or sounding.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.sounding.is_empty()
    }

    /// Drops every queued note and removes the sounding ones, handing each to `release` so its
    /// note-off can be sent.
    pub fn release_all(&mut self, mut release: impl FnMut(SoundingNote)) {
        self.queue.clear();
        self.is_latest_refused = true;
        while let Some(note) = self.sounding.pop() {
            release(note);
        }
    }

    /// Number of notes sounding.
    pub fn num_sounding(&self) -> usize {
        self.sounding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_queue_wraps_around() {
        let mut q: FixedQueue<u32, 3> = FixedQueue::default();
        for round in 0..5 {
            assert!(q.push_back(round * 10).is_ok());
            assert!(q.push_back(round * 10 + 1).is_ok());
            assert_eq!(q.pop_front(), Some(round * 10));
            assert_eq!(q.pop_front(), Some(round * 10 + 1));
        }
        q.push_back(1).unwrap();
        q.push_back(2).unwrap();
        q.push_back(3).unwrap();
        assert_eq!(q.push_back(4), Err(4));
        *q.get_mut(2).unwrap() = 30;
        assert_eq!(q.front(), Some(&1));
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.pop_front(), None);
    }

    #[test]
    fn starts_and_ends_pair_up() {
        let mut p = Playback::default();
        p.push_on(60, 1.0, 0.0, 0.1).unwrap();
        p.push_off(60, 2.0);
        p.push_on(62, 2.0, 0.0, 0.1).unwrap();
        assert_eq!(p.next_due(1.0, 0.0), Some((1.0, Due::On)));
        let first = p.start_next(0, 1.0).unwrap();
        assert_eq!(first.end_beats, Some(2.0));
        // The end of 60 and the start of 62 meet: the end comes first.
        assert_eq!(p.next_due(1.0, 0.0), Some((2.0, Due::Off { sounding_idx: 0 })));
        p.end_sounding(0).unwrap();
        assert_eq!(p.next_due(1.0, 0.0), Some((2.0, Due::On)));
        p.start_next(0, 2.0).unwrap();
        // 62 has no end yet: nothing is due.
        assert_eq!(p.next_due(1.0, 0.0), None);
        // Its end arrives once it sounds.
        p.push_off(62, 3.5);
        assert_eq!(p.next_due(1.0, 0.0), Some((3.5, Due::Off { sounding_idx: 0 })));
    }

    #[test]
    fn the_gate_shortens_notes_but_not_below_the_minimum() {
        let mut p = Playback::default();
        p.push_on(60, 0.0, 0.0, 0.1).unwrap();
        p.push_off(60, 0.5);
        p.start_next(3, 0.0).unwrap();
        assert_eq!(p.off_beats(0, 0.5, 0.0), Some(0.25));
        assert_eq!(p.off_beats(0, 0.0, 0.01), Some(0.01));
        assert_eq!(p.off_beats(0, 1.0, 0.0), Some(0.5));
        // A long note ends no earlier than a lookahead before its written end.
        p.push_on(62, 1.0, 0.0, 0.1).unwrap();
        p.push_off(62, 5.0);
        p.start_next(3, 1.0).unwrap();
        assert_eq!(p.off_beats(1, 0.5, 0.0), Some(5.0 - LOOKAHEAD_BEATS));
        assert_eq!(p.off_beats(1, 0.9, 0.0), Some(4.6));
    }

    #[test]
    fn late_starts_are_refused_and_their_ends_ignored() {
        let mut p = Playback::default();
        assert_eq!(p.push_on(60, 1.0, 1.5, 0.25), Err(Refused::Late));
        p.push_off(60, 2.0);
        assert!(p.is_idle());
        // Slightly late is fine: it plays at once.
        p.push_on(62, 1.4, 1.5, 0.25).unwrap();
        assert_eq!(p.next_due(1.0, 0.0), Some((1.4, Due::On)));
    }

    #[test]
    fn a_full_queue_refuses() {
        let mut p = Playback::default();
        for i in 0..MAX_QUEUED_NOTES {
            p.push_on(60, i as f64, 0.0, 0.1).unwrap();
            p.push_off(60, i as f64 + 0.5);
        }
        assert_eq!(p.push_on(61, 1000.0, 0.0, 0.1), Err(Refused::Full));
    }

    #[test]
    fn release_all_hands_back_every_sounding_note() {
        let mut p = Playback::default();
        p.push_on(60, 0.0, 0.0, 0.1).unwrap();
        p.push_on(64, 0.0, 0.0, 0.1).unwrap();
        p.push_on(67, 5.0, 0.0, 0.1).unwrap();
        p.start_next(0, 0.0).unwrap();
        p.start_next(1, 0.0).unwrap();
        assert_eq!(p.is_sounding(64, 1), Some(1));
        let mut released = Vec::new();
        p.release_all(|n| released.push((n.key, n.channel)));
        released.sort();
        assert_eq!(released, vec![(60, 0), (64, 1)]);
        assert!(p.is_idle());
    }
}
