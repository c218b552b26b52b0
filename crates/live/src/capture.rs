//! Captures the phrase a musician plays, on the timeline, and tells when it has ended.
//! Runs on: audio thread. No allocation, no locks, no candle.
//!
//! Notes keep the exact time of the sample they arrived on; the worker quantizes them onto its
//! model's step grid. The phrase's origin is the host bar line at or before the first note (a
//! first note up to half a sixteenth early counts as on the bar line), or the first note itself
//! when the clock runs free.

use arrayvec::ArrayVec;

use crate::phrase::{Phrase, MAX_PHRASE_NOTES};
use music::note::Note;

use super::clock::{next_grid_point, prev_grid_point};

/// How early a first note may come, in beats, and still count as on the bar line after it:
/// half a sixteenth.
const EARLY_DOWNBEAT_BEATS: f64 = 0.125;

/// How a phrase ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerMode {
    /// After a number of beats with every key up.
    Silence,
    /// After a number of bars from the phrase's first bar line.
    Bars,
    /// Only on the "answer now" trigger.
    Manual,
}

/// One note as captured, on the timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CapturedNote {
    pitch: u8,
    /// MIDI channel, 0..=15.
    channel: u8,
    velocity: u8,
    start_beats: f64,
    /// `None` while the key is down.
    end_beats: Option<f64>,
}

/// The phrase being played. Fixed capacity.
#[derive(Clone, Debug)]
pub struct Capture {
    notes: ArrayVec<CapturedNote, MAX_PHRASE_NOTES>,
    /// Bar line (or downbeat) the phrase counts from, on the timeline; set by the first note.
    origin_beats: Option<f64>,
    /// Bar length in beats, fixed by the first note.
    bar_beats: f64,
    /// Time at which the last key went up, while no key is down.
    all_up_since_beats: Option<f64>,
    /// Keys down now: bit `c` of `held[k]` is key `k` on channel `c`. Tracked even while the
    /// phrase is sealed, so the silence timer is right when capturing resumes.
    held: [u16; 128],
    /// Keys let go while their channel's sustain pedal is down, so still sounding: same layout.
    sustained: [u16; 128],
    /// Channels whose sustain pedal is down: bit `c` is channel `c`.
    pedals_down: u16,
    /// Whether capturing is paused because the phrase has been handed over for an answer.
    is_sealed: bool,
}

impl Default for Capture {
    fn default() -> Self {
        Self::new()
    }
}

impl Capture {
    /// No phrase, no keys down.
    pub fn new() -> Self {
        Self {
            notes: ArrayVec::new(),
            origin_beats: None,
            bar_beats: 4.0,
            all_up_since_beats: None,
            held: [0; 128],
            sustained: [0; 128],
            pedals_down: 0,
            is_sealed: false,
        }
    }

    /// Forgets the phrase and unseals; keys stay down.
    pub fn clear(&mut self) {
        self.notes.clear();
        self.origin_beats = None;
        self.all_up_since_beats = None;
        self.is_sealed = false;
    }

    /// Forgets the phrase, the keys and the pedals (after a host reset, when key-ups may never
    /// come).
    pub fn clear_all(&mut self) {
        self.clear();
        self.held = [0; 128];
        self.sustained = [0; 128];
        self.pedals_down = 0;
    }

    /// Whether the phrase has at least one note.
    pub fn has_notes(&self) -> bool {
        !self.notes.is_empty()
    }

    /// Whether capture is paused for an answer.
    pub fn is_sealed(&self) -> bool {
        self.is_sealed
    }

    /// Pauses capture: the phrase was handed over. Notes stay so capture can resume.
    pub fn seal(&mut self) {
        self.is_sealed = true;
    }

    /// Resumes capturing the same phrase (the player went on before the answer started).
    pub fn unseal(&mut self) {
        self.is_sealed = false;
    }

    /// Whether any key is down, or still sounds under a sustain pedal.
    pub fn is_any_key_down(&self) -> bool {
        self.held.iter().chain(&self.sustained).any(|&channels| channels != 0)
    }

    /// A key went down at `at_beats`. `host_bar_origin_beats` is a host bar line when the host
    /// plays; `bar_beats` the bar length.
    pub fn note_on(
        &mut self,
        at_beats: f64,
        channel: u8,
        key: u8,
        velocity: u8,
        host_bar_origin_beats: Option<f64>,
        bar_beats: f64,
    ) {
        let (key, channel) = (key.min(127), channel.min(15));
        self.held[key as usize] |= 1 << channel;
        self.sustained[key as usize] &= !(1 << channel);
        self.all_up_since_beats = None;
        if self.is_sealed {
            return;
        }
        if self.origin_beats.is_none() {
            self.bar_beats = bar_beats;
            self.origin_beats = Some(match host_bar_origin_beats {
                Some(origin) => prev_grid_point(origin, bar_beats, at_beats + EARLY_DOWNBEAT_BEATS),
                None => at_beats,
            });
        }
        // A retriggered key ends its previous note.
        self.end_open_note(at_beats, channel, key);
        if self.notes.is_full() {
            // Keep the most recent notes; the origin moves to the bar of the oldest one kept.
            self.notes.remove(0);
            if let (Some(origin), Some(first)) = (self.origin_beats, self.notes.first()) {
                self.origin_beats =
                    Some(prev_grid_point(origin, self.bar_beats, first.start_beats + EARLY_DOWNBEAT_BEATS));
            }
        }
        self.notes.push(CapturedNote {
            pitch: key,
            channel,
            velocity: velocity.clamp(1, 127),
            start_beats: at_beats,
            end_beats: None,
        });
    }

    /// A key went up at `at_beats`. Under its channel's sustain pedal its note sounds on.
    pub fn note_off(&mut self, at_beats: f64, channel: u8, key: u8) {
        let (key, channel) = (key.min(127), channel.min(15));
        self.held[key as usize] &= !(1 << channel);
        if self.pedals_down & (1 << channel) != 0 {
            self.sustained[key as usize] |= 1 << channel;
            return;
        }
        if !self.is_sealed {
            self.end_open_note(at_beats, channel, key);
        }
        if !self.is_any_key_down() {
            self.all_up_since_beats = Some(at_beats);
        }
    }

    /// The sustain pedal of `channel` went down or up at `at_beats`. Lifting it ends the notes
    /// it held there.
    pub fn sustain(&mut self, at_beats: f64, channel: u8, is_down: bool) {
        let bit = 1u16 << channel.min(15);
        if is_down {
            self.pedals_down |= bit;
            return;
        }
        self.pedals_down &= !bit;
        for key in 0..128u8 {
            if self.sustained[key as usize] & bit != 0 {
                self.sustained[key as usize] &= !bit;
                if !self.is_sealed {
                    self.end_open_note(at_beats, channel, key);
                }
            }
        }
        if !self.is_any_key_down() && self.all_up_since_beats.is_none() && !self.notes.is_empty() {
            self.all_up_since_beats = Some(at_beats);
        }
    }

    fn end_open_note(&mut self, at_beats: f64, channel: u8, key: u8) {
        if let Some(note) = self
            .notes
            .iter_mut()
            .rev()
            .find(|n| n.pitch == key && n.channel == channel && n.end_beats.is_none())
        {
            note.end_beats = Some(at_beats.max(note.start_beats));
        }
    }

    /// When the phrase ends under `mode`, if it has begun: for `Silence`, `silence_beats` after
    /// the last key went up; for `Bars`, `phrase_bars` bars after the origin; never for `Manual`.
    pub fn end_due_beats(&self, mode: TriggerMode, silence_beats: f64, phrase_bars: u32) -> Option<f64> {
        if self.is_sealed || self.notes.is_empty() {
            return None;
        }
        match mode {
            TriggerMode::Silence => self.all_up_since_beats.map(|t| t + silence_beats),
            TriggerMode::Bars => self.origin_beats.map(|o| o + phrase_bars.max(1) as f64 * self.bar_beats),
            TriggerMode::Manual => None,
        }
    }

    /// The phrase as it stands at `end_beats`, with keys still down cut there. Its length runs
    /// to the grid point (a multiple of `unit_beats` from the origin, a bar or a beat) at or
    /// after the last note's end; the answer's beat 0 is that point. With no notes (an "answer
    /// now" before anything was played) the phrase is empty and its origin is `end_beats`.
    /// Returns the phrase and its origin on the timeline.
    pub fn phrase_until(&self, end_beats: f64, unit_beats: f64, bar_beats_if_empty: f64) -> (Phrase, f64) {
        let origin_beats = self.origin_beats.unwrap_or(end_beats);
        let bar_beats = if self.notes.is_empty() { bar_beats_if_empty } else { self.bar_beats };
        let mut phrase = Phrase::empty(bar_beats);
        let mut last_end_beats = 0.0f64;
        for note in self.notes.iter().filter(|n| n.start_beats < end_beats) {
            let note_end = note.end_beats.unwrap_or(end_beats).min(end_beats);
            let start_beats = note.start_beats - origin_beats;
            let len_beats = (note_end - note.start_beats).max(0.0);
            last_end_beats = last_end_beats.max(start_beats + len_beats);
            phrase.notes.push(Note { pitch: note.pitch, velocity: note.velocity, start_beats, len_beats });
        }
        phrase.len_beats = next_grid_point(0.0, unit_beats, last_end_beats).max(0.0);
        (phrase, origin_beats)
    }

    /// Origin of the phrase on the timeline, once a note was played.
    pub fn origin_beats(&self) -> Option<f64> {
        self.origin_beats
    }

    /// Bar length in beats the phrase counts in, once a note was played.
    pub fn bar_beats(&self) -> Option<f64> {
        self.origin_beats.map(|_| self.bar_beats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The notes as `(pitch, start_beats, len_beats)`, rounded to a nanobeat.
    fn notes(p: &Phrase) -> Vec<(u8, f64, f64)> {
        let round = |x: f64| (x * 1e9).round() / 1e9;
        p.notes.iter().map(|n| (n.pitch, round(n.start_beats), round(n.len_beats))).collect()
    }

    #[test]
    fn the_origin_is_the_host_bar_line() {
        let mut c = Capture::new();
        // The host's bars lie at 0, 4, 8...; a note at 9.5 counts from bar 8.
        c.note_on(9.5, 0, 60, 100, Some(0.0), 4.0);
        assert_eq!(c.origin_beats(), Some(8.0));
        // A first note a little early counts from the bar line after it.
        let mut c = Capture::new();
        c.note_on(11.9, 0, 60, 100, Some(0.0), 4.0);
        assert_eq!(c.origin_beats(), Some(12.0));
        // With the clock running free, the first note is the downbeat.
        let mut c = Capture::new();
        c.note_on(3.3, 0, 60, 100, None, 4.0);
        assert_eq!(c.origin_beats(), Some(3.3));
    }

    #[test]
    fn silence_ends_the_phrase_after_all_keys_are_up() {
        let mut c = Capture::new();
        c.note_on(0.0, 0, 60, 100, Some(0.0), 4.0);
        c.note_on(0.5, 0, 64, 100, Some(0.0), 4.0);
        c.note_off(1.0, 0, 60);
        // One key is still down: no end yet.
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), None);
        c.note_off(1.5, 0, 64);
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), Some(2.5));
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 0.25, 2), Some(1.75));
        // Playing again stops the timer.
        c.note_on(2.0, 0, 62, 100, Some(0.0), 4.0);
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), None);
    }

    #[test]
    fn bars_and_manual_triggers() {
        let mut c = Capture::new();
        assert_eq!(c.end_due_beats(TriggerMode::Bars, 1.0, 2), None);
        c.note_on(5.0, 0, 60, 100, Some(0.0), 3.0);
        // Bars of 3 beats from the bar line at 3: two bars end at 9, held keys or not.
        assert_eq!(c.end_due_beats(TriggerMode::Bars, 1.0, 2), Some(9.0));
        assert_eq!(c.end_due_beats(TriggerMode::Manual, 1.0, 2), None);
    }

    #[test]
    fn the_phrase_runs_to_the_next_grid_point() {
        let mut c = Capture::new();
        c.note_on(8.0, 0, 60, 100, Some(0.0), 4.0);
        c.note_off(9.0, 0, 60);
        c.note_on(9.0, 0, 62, 80, Some(0.0), 4.0);
        c.note_off(13.1, 0, 62);
        let (bar_phrase, origin) = c.phrase_until(14.1, 4.0, 4.0);
        assert_eq!(origin, 8.0);
        assert_eq!(notes(&bar_phrase), vec![(60, 0.0, 1.0), (62, 1.0, 4.1)]);
        assert_eq!(bar_phrase.len_beats, 8.0);
        let (beat_phrase, _) = c.phrase_until(14.1, 1.0, 4.0);
        assert_eq!(beat_phrase.len_beats, 6.0);
        assert_eq!(bar_phrase.mean_velocity(), Some(90));
    }

    #[test]
    fn held_notes_are_cut_at_the_end() {
        let mut c = Capture::new();
        c.note_on(0.0, 0, 60, 100, Some(0.0), 4.0);
        let (p, _) = c.phrase_until(8.0, 4.0, 4.0);
        assert_eq!(notes(&p), vec![(60, 0.0, 8.0)]);
        assert_eq!(p.len_beats, 8.0);
    }

    #[test]
    fn an_empty_phrase_starts_where_it_ends() {
        let c = Capture::new();
        let (p, origin) = c.phrase_until(5.5, 4.0, 3.0);
        assert!(p.notes.is_empty());
        assert_eq!((origin, p.len_beats, p.bar_beats), (5.5, 0.0, 3.0));
    }

    #[test]
    fn sealing_pauses_capture_but_not_key_tracking() {
        let mut c = Capture::new();
        c.note_on(0.0, 0, 60, 100, Some(0.0), 4.0);
        c.note_off(1.0, 0, 60);
        c.seal();
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), None);
        c.note_on(2.0, 1, 67, 100, Some(0.0), 4.0);
        assert!(c.is_any_key_down());
        c.unseal();
        c.note_off(3.0, 1, 67);
        // The note played while sealed is not part of the phrase, but its key-up counts.
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), Some(4.0));
        assert_eq!(notes(&c.phrase_until(4.0, 4.0, 4.0).0), vec![(60, 0.0, 1.0)]);
    }

    #[test]
    fn a_long_phrase_keeps_its_latest_notes() {
        let mut c = Capture::new();
        for i in 0..(MAX_PHRASE_NOTES + 8) {
            let at = i as f64 * 0.5;
            c.note_on(at, 0, 60 + (i % 12) as u8, 100, Some(0.0), 4.0);
            c.note_off(at + 0.25, 0, 60 + (i % 12) as u8);
        }
        let (p, origin) = c.phrase_until(200.0, 4.0, 4.0);
        assert_eq!(p.notes.len(), MAX_PHRASE_NOTES);
        // The oldest kept note starts at 4.0 (note 8), so the origin is the bar at 4.
        assert_eq!(origin, 4.0);
        assert_eq!(p.notes[0].start_beats, 0.0);
    }

    #[test]
    fn the_sustain_pedal_holds_notes_and_the_silence_until_it_lifts() {
        let mut c = Capture::new();
        c.sustain(0.0, 0, true);
        c.note_on(0.0, 0, 48, 100, Some(0.0), 4.0);
        c.note_off(0.5, 0, 48);
        c.note_on(1.0, 0, 60, 100, Some(0.0), 4.0);
        c.note_off(1.5, 0, 60);
        // A pedal on another channel holds nothing here.
        c.sustain(1.5, 1, true);
        // Keys are up but the pedal sounds them: no silence yet.
        assert!(c.is_any_key_down());
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), None);
        // Striking a sustained key again ends its note there and starts a new one.
        c.note_on(2.0, 0, 60, 100, Some(0.0), 4.0);
        c.note_off(2.25, 0, 60);
        c.sustain(3.0, 0, false);
        assert!(!c.is_any_key_down());
        assert_eq!(c.end_due_beats(TriggerMode::Silence, 1.0, 2), Some(4.0));
        let (p, _) = c.phrase_until(4.0, 4.0, 4.0);
        assert_eq!(notes(&p), vec![(48, 0.0, 3.0), (60, 1.0, 1.0), (60, 2.0, 1.0)]);
        // Once lifted, keys end their notes as they go up.
        c.note_on(4.0, 0, 62, 100, Some(0.0), 4.0);
        c.note_off(4.5, 0, 62);
        assert_eq!(notes(&c.phrase_until(5.0, 4.0, 4.0).0)[3], (62, 4.0, 0.5));
    }

    #[test]
    fn keys_on_other_channels_are_separate() {
        let mut c = Capture::new();
        c.note_on(0.0, 0, 60, 100, Some(0.0), 4.0);
        c.note_on(0.0, 1, 60, 100, Some(0.0), 4.0);
        c.note_off(1.0, 0, 60);
        assert!(c.is_any_key_down());
        c.note_off(2.0, 1, 60);
        assert!(!c.is_any_key_down());
    }
}
