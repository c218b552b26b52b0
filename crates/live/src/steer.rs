//! What the editor asks of the audio thread (answer now, try again, play a variation again) and
//! what the audio thread tells it back (the stage it is in), as single atomics.
//! Runs on: any thread. The editor writes a [`Steer`] and reads the [`Stage`]; the audio thread
//! takes the steer at the start of a block and writes the stage at its end. No allocation,
//! no lock.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// What the audio thread is doing, as the editor shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// No phrase yet, or the player is playing one.
    #[default]
    Listening = 0,
    /// Every key is up and the phrase ends when the trigger's time is reached.
    PhraseEnding = 1,
    /// The phrase went to the model and nothing of the answer has come back yet.
    Thinking = 2,
    /// The answer is written and plays (or waits for its answer point).
    Answering = 3,
    /// The player played into the answer, which stopped for them: listening again.
    Yielded = 4,
}

impl Stage {
    /// The stage a stored number stands for.
    pub fn from_u8(value: u8) -> Stage {
        match value {
            1 => Stage::PhraseEnding,
            2 => Stage::Thinking,
            3 => Stage::Answering,
            4 => Stage::Yielded,
            _ => Stage::Listening,
        }
    }

    /// How the editor names it.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Listening => "Listening",
            Stage::PhraseEnding => "Phrase ending",
            Stage::Thinking => "Thinking",
            Stage::Answering => "Answering",
            Stage::Yielded => "Yielded to you",
        }
    }
}

/// A request from the editor, carried out at the start of the next block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// End the phrase now and answer it (the Answer Now parameter's button).
    AnswerNow,
    /// A new answer to the last phrase, from a new seed, in place of the one playing or waiting.
    TryAgain,
    /// Play again the answer with this id, an earlier answer to the same phrase, note for note.
    Replay { answer_id: u32 },
}

const KIND_SHIFT: u32 = 32;
const KIND_ANSWER_NOW: u64 = 1;
const KIND_TRY_AGAIN: u64 = 2;
const KIND_REPLAY: u64 = 3;

impl Steer {
    fn encode(self) -> u64 {
        match self {
            Steer::AnswerNow => KIND_ANSWER_NOW << KIND_SHIFT,
            Steer::TryAgain => KIND_TRY_AGAIN << KIND_SHIFT,
            Steer::Replay { answer_id } => (KIND_REPLAY << KIND_SHIFT) | u64::from(answer_id),
        }
    }

    fn decode(value: u64) -> Option<Steer> {
        match value >> KIND_SHIFT {
            KIND_ANSWER_NOW => Some(Steer::AnswerNow),
            KIND_TRY_AGAIN => Some(Steer::TryAgain),
            KIND_REPLAY => Some(Steer::Replay { answer_id: value as u32 }),
            _ => None,
        }
    }
}

/// The editor's side of the audio thread: one pending steer (a newer one replaces one not yet
/// taken) and the stage.
#[derive(Debug, Default)]
pub struct SteerBox {
    pending: AtomicU64,
    stage: AtomicU8,
    /// The tempo of the last block, in quarter notes per minute (as `f64` bits; 0 before one).
    tempo_bits: AtomicU64,
}

impl SteerBox {
    /// Asks the audio thread for `steer` at its next block. Any thread.
    pub fn send(&self, steer: Steer) {
        self.pending.store(steer.encode(), Ordering::Release);
    }

    /// Takes the pending steer, if any. Audio thread.
    pub fn take(&self) -> Option<Steer> {
        Steer::decode(self.pending.swap(0, Ordering::AcqRel))
    }

    /// The stage the audio thread last reported.
    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Ordering::Acquire))
    }

    /// Reports the stage. Audio thread.
    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Release);
    }

    /// The tempo the audio thread last played at (120 before the first block).
    pub fn tempo_bpm(&self) -> f64 {
        match f64::from_bits(self.tempo_bits.load(Ordering::Relaxed)) {
            tempo if tempo > 0.0 && tempo.is_finite() => tempo,
            _ => 120.0,
        }
    }

    /// Reports the tempo. Audio thread.
    pub fn set_tempo_bpm(&self, tempo_bpm: f64) {
        self.tempo_bits.store(tempo_bpm.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steer_is_taken_once_and_a_newer_one_replaces_it() {
        let steer = SteerBox::default();
        assert_eq!(steer.take(), None);
        steer.send(Steer::TryAgain);
        steer.send(Steer::Replay { answer_id: 0xFFFF_FFFE });
        assert_eq!(steer.take(), Some(Steer::Replay { answer_id: 0xFFFF_FFFE }));
        assert_eq!(steer.take(), None);
        steer.send(Steer::AnswerNow);
        assert_eq!(steer.take(), Some(Steer::AnswerNow));
    }

    #[test]
    fn every_stage_reads_back_as_itself() {
        let steer = SteerBox::default();
        for stage in
            [Stage::Listening, Stage::PhraseEnding, Stage::Thinking, Stage::Answering, Stage::Yielded]
        {
            steer.set_stage(stage);
            assert_eq!(steer.stage(), stage);
        }
    }
}
