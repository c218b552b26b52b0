//! Who holds each key, on the way in and on the way out. Hosts send notes that overlap on one
//! key, and some send every note twice (once as a CLAP note event, once as MIDI); a synth after
//! the plugin must still hear well-formed notes, and every note-on the plugin sends must get
//! exactly one note-off. These two tables are the one place that decides it.
//! Runs on: audio thread. Fixed-size tables, no allocation, no locks.
//!
//! The policy, for each channel and key:
//! - **In** ([`HeldKeys`]): note-ons are counted until as many note-offs came. A second note-on
//!   at the very sample of the first is the same note sent in two dialects and is only counted;
//!   a later one re-strikes the key (the phrase hears a new note). Only the last note-off
//!   releases the key; a note-off for a key that is not held is a stray and is dropped.
//! - **Out** ([`SoundingNotes`]): a key may be held by the pass-through and by the answer at
//!   once. A note-on for a key that already sounds retriggers it (note-off, then note-on), and the
//!   key's note-off goes out only when its last holder lets go. So the output never has two
//!   note-ons of one key in a row, and never a note-off for a key that does not sound.

use crate::NoteMsg;

/// MIDI channels.
const NUM_CHANNELS: usize = 16;
/// MIDI keys.
const NUM_KEYS: usize = 128;

/// What an incoming note event means for its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// The key went down.
    Pressed,
    /// The key was struck again while held (overlapping notes of one pitch).
    Restruck,
    /// The same note-on again at the same sample: one note in two dialects.
    Duplicate,
    /// A note-off while more note-ons of the key are outstanding: the key stays down.
    StillHeld,
    /// The last outstanding note-on of the key ended.
    Released,
    /// A note-off for a key that is not down.
    Stray,
}

#[derive(Clone, Copy, Debug, Default)]
struct HeldKey {
    /// Note-ons without their note-off yet.
    num_ons: u8,
    /// Sample position (since the scheduler started) of the latest note-on.
    last_on_sample: u64,
}

/// The player's keys as they come in: note-ons counted per channel and key.
#[derive(Clone, Debug)]
pub struct HeldKeys {
    keys: [[HeldKey; NUM_KEYS]; NUM_CHANNELS],
}

impl Default for HeldKeys {
    fn default() -> Self {
        Self { keys: [[HeldKey::default(); NUM_KEYS]; NUM_CHANNELS] }
    }
}

impl HeldKeys {
    /// Counts a note-on of `channel`, `key` (0..=15, 0..=127) at sample position `at_sample`.
    pub fn press(&mut self, channel: u8, key: u8, at_sample: u64) -> KeyChange {
        let held = &mut self.keys[channel as usize & 15][key as usize & 127];
        let change = match held.num_ons {
            0 => KeyChange::Pressed,
            _ if held.last_on_sample == at_sample => KeyChange::Duplicate,
            _ => KeyChange::Restruck,
        };
        held.num_ons = held.num_ons.saturating_add(1);
        held.last_on_sample = at_sample;
        change
    }

    /// Counts a note-off of `channel`, `key`.
    pub fn release(&mut self, channel: u8, key: u8) -> KeyChange {
        let held = &mut self.keys[channel as usize & 15][key as usize & 127];
        match held.num_ons {
            0 => KeyChange::Stray,
            1 => {
                held.num_ons = 0;
                KeyChange::Released
            }
            _ => {
                held.num_ons -= 1;
                KeyChange::StillHeld
            }
        }
    }

    /// Releases the key at once, however many note-ons it had (a choke). Returns whether it was
    /// down.
    pub fn release_all_of(&mut self, channel: u8, key: u8) -> bool {
        let held = &mut self.keys[channel as usize & 15][key as usize & 127];
        std::mem::take(&mut held.num_ons) > 0
    }

    /// Forgets every key (after a host reset, when note-offs may never come).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Who holds a sounding output note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A note the player plays, passed through.
    Thru,
    /// A note of the answer.
    Answer,
}

impl Holder {
    fn bit(self) -> u8 {
        match self {
            Holder::Thru => 1,
            Holder::Answer => 2,
        }
    }
}

/// The notes sounding at the plugin's output, and who holds each.
#[derive(Clone, Debug)]
pub struct SoundingNotes {
    /// Bit set of [`Holder`]s per channel and key.
    holders: [[u8; NUM_KEYS]; NUM_CHANNELS],
}

impl Default for SoundingNotes {
    fn default() -> Self {
        Self { holders: [[0; NUM_KEYS]; NUM_CHANNELS] }
    }
}

impl SoundingNotes {
    /// Sends note-on `msg` for `holder`; if its key already sounds, it is retriggered: a note-off
    /// goes out first.
    pub fn start(&mut self, holder: Holder, msg: NoteMsg, emit: &mut impl FnMut(NoteMsg)) {
        let holders = &mut self.holders[msg.channel as usize & 15][msg.key as usize & 127];
        if *holders != 0 {
            emit(NoteMsg::off(msg.timing, msg.channel, msg.key));
        }
        *holders |= holder.bit();
        emit(NoteMsg { is_on: true, ..msg });
    }

    /// `holder` lets go of the key of note-off `msg`; the note-off goes out when no one else
    /// holds it. Nothing goes out when `holder` did not hold it.
    pub fn stop(&mut self, holder: Holder, msg: NoteMsg, emit: &mut impl FnMut(NoteMsg)) {
        let holders = &mut self.holders[msg.channel as usize & 15][msg.key as usize & 127];
        if *holders & holder.bit() == 0 {
            return;
        }
        *holders &= !holder.bit();
        if *holders == 0 {
            emit(NoteMsg { is_on: false, ..msg });
        }
    }

    /// Whether `holder` holds `key` on `channel`.
    pub fn is_held_by(&self, holder: Holder, channel: u8, key: u8) -> bool {
        self.holders[channel as usize & 15][key as usize & 127] & holder.bit() != 0
    }

    /// Sends a note-off at `timing` for every sounding note, whoever holds it.
    pub fn release_all(&mut self, timing: u32, emit: &mut impl FnMut(NoteMsg)) {
        for (channel, keys) in self.holders.iter_mut().enumerate() {
            for (key, holders) in keys.iter_mut().enumerate() {
                if std::mem::take(holders) != 0 {
                    emit(NoteMsg::off(timing, channel as u8, key as u8));
                }
            }
        }
    }

    /// Number of notes sounding.
    pub fn num_sounding(&self) -> usize {
        self.holders.iter().flatten().filter(|&&h| h != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(timing: u32, key: u8) -> NoteMsg {
        NoteMsg { timing, is_on: true, channel: 0, key, velocity: 0.8, voice_id: None }
    }

    #[test]
    fn a_note_sent_in_two_dialects_is_one_note() {
        let mut keys = HeldKeys::default();
        assert_eq!(keys.press(0, 60, 100), KeyChange::Pressed);
        assert_eq!(keys.press(0, 60, 100), KeyChange::Duplicate);
        assert_eq!(keys.release(0, 60), KeyChange::StillHeld);
        assert_eq!(keys.release(0, 60), KeyChange::Released);
        assert_eq!(keys.release(0, 60), KeyChange::Stray);
    }

    #[test]
    fn overlapping_notes_of_one_key_restrike_and_the_last_note_off_releases() {
        let mut keys = HeldKeys::default();
        assert_eq!(keys.press(3, 64, 0), KeyChange::Pressed);
        assert_eq!(keys.press(3, 64, 480), KeyChange::Restruck);
        // Another channel's key is its own.
        assert_eq!(keys.press(4, 64, 480), KeyChange::Pressed);
        assert_eq!(keys.release(3, 64), KeyChange::StillHeld);
        assert_eq!(keys.release(3, 64), KeyChange::Released);
        assert!(keys.release_all_of(4, 64));
        assert!(!keys.release_all_of(4, 64));
    }

    #[test]
    fn the_output_retriggers_a_sounding_key_and_releases_it_once() {
        let mut out = SoundingNotes::default();
        let mut sent = Vec::new();
        let mut emit = |m: NoteMsg| sent.push((m.timing, m.is_on, m.key));
        out.start(Holder::Thru, on(0, 60), &mut emit);
        out.start(Holder::Answer, on(10, 60), &mut emit);
        out.stop(Holder::Answer, NoteMsg::off(20, 0, 60), &mut emit);
        // A holder that does not hold the key changes nothing.
        out.stop(Holder::Answer, NoteMsg::off(25, 0, 60), &mut emit);
        assert!(out.is_held_by(Holder::Thru, 0, 60));
        out.stop(Holder::Thru, NoteMsg::off(30, 0, 60), &mut emit);
        assert_eq!(sent, vec![(0, true, 60), (10, false, 60), (10, true, 60), (30, false, 60)]);
        assert_eq!(out.num_sounding(), 0);
    }

    #[test]
    fn release_all_ends_every_sounding_note_once() {
        let mut out = SoundingNotes::default();
        let mut sent = Vec::new();
        let mut emit = |m: NoteMsg| sent.push((m.timing, m.is_on, m.channel, m.key));
        out.start(Holder::Thru, on(0, 60), &mut emit);
        out.start(Holder::Answer, NoteMsg { channel: 15, ..on(1, 127) }, &mut emit);
        out.start(Holder::Answer, on(2, 60), &mut emit);
        out.release_all(7, &mut emit);
        out.release_all(8, &mut emit);
        assert_eq!(sent[4..], [(7, false, 0, 60), (7, false, 15, 127)]);
    }
}
