//! Scheduler tests against a fake transport and a fake worker (the test plays the worker's part
//! through the real queues).

use super::*;
use crate::phrase::{AnswerChunk, AnswerEvent, MAX_CHUNK_EVENTS};
use crate::steer::{Stage, Steer};

/// A scheduler wired to channels the test holds, a host transport in 4/4 and a record of
/// everything sent out, at absolute sample positions.
struct Rig {
    sched: Scheduler,
    live: Arc<LiveShared>,
    link: Arc<WorkerLink>,
    sample_rate_hz: f64,
    tempo_bpm: f64,
    is_playing: bool,
    /// Host position minus `next_sample * beats_per_sample` (changed by loop jumps).
    host_shift_beats: f64,
    next_sample: u64,
    out: Vec<(u64, NoteMsg)>,
}

/// A played note: (key, start_beats, len_beats) on the host timeline.
type Played = (u8, f64, f64);

impl Rig {
    fn new() -> Self {
        Self::with_request_queue(8)
    }

    fn with_request_queue(len: usize) -> Self {
        let live = Arc::new(LiveShared::new());
        live.is_model_ready.store(true, Ordering::Release);
        let link = Arc::new(WorkerLink::with_capacities(len, 64));
        let mut sched = Scheduler::new(live.clone());
        sched.configure(48_000.0, false);
        sched.connect(link.clone());
        Self {
            sched,
            live,
            link,
            sample_rate_hz: 48_000.0,
            tempo_bpm: 120.0,
            is_playing: true,
            host_shift_beats: 0.0,
            next_sample: 0,
            out: Vec::new(),
        }
    }

    fn beats_per_sample(&self) -> f64 {
        self.tempo_bpm / 60.0 / self.sample_rate_hz
    }

    fn sample_of(&self, beats: f64) -> u64 {
        (beats / self.beats_per_sample()).round() as u64
    }

    fn host_pos_beats(&self) -> f64 {
        self.next_sample as f64 * self.beats_per_sample() + self.host_shift_beats
    }

    /// Runs blocks of `block_len` samples until the timeline (without jumps: the host position)
    /// reaches `until_beats`, feeding the played notes that fall in each block.
    fn run(&mut self, until_beats: f64, block_len: u32, settings: &Settings, played: &[Played]) {
        let mut inputs: Vec<(u64, NoteMsg)> = Vec::new();
        for &(key, start, len) in played {
            let note = |is_on| NoteMsg { timing: 0, is_on, channel: 0, key, velocity: 0.8, voice_id: None };
            inputs.push((self.sample_of(start), note(true)));
            inputs.push((self.sample_of(start + len), note(false)));
        }
        inputs.sort_by_key(|(s, n)| (*s, n.is_on));
        let end_sample = self.sample_of(until_beats);
        while self.next_sample < end_sample {
            let len = block_len.min((end_sample - self.next_sample) as u32);
            self.block(len, settings, &inputs);
        }
    }

    fn block(&mut self, len: u32, settings: &Settings, inputs: &[(u64, NoteMsg)]) {
        let pos = self.host_pos_beats();
        let transport = HostTransport {
            is_playing: self.is_playing,
            tempo_bpm: Some(self.tempo_bpm),
            pos_beats: Some(pos),
            bar_start_beats: Some((pos / 4.0 + 1e-9).floor() * 4.0),
            time_sig: Some((4, 4)),
        };
        let first = self.next_sample;
        let out = &mut self.out;
        let mut emit = |msg: NoteMsg| out.push((first + msg.timing as u64, msg));
        self.sched.start_block(&transport, len, settings, &mut emit);
        for (sample, note) in inputs.iter().filter(|(s, _)| (first..first + len as u64).contains(s)) {
            let note = NoteMsg { timing: (sample - first) as u32, ..*note };
            self.sched.note(note, false, settings, &mut emit);
        }
        self.sched.end_block(settings, &mut emit);
        self.next_sample += len as u64;
    }

    fn take_request(&self) -> AnswerRequest {
        self.link.pop_request().expect("a request")
    }

    /// Sends a chunk of `(at_beats, is_on, pitch)` events, answer-relative.
    fn send(&self, answer_id: u32, events: &[(f64, bool, u8)], written_until_beats: f64, is_finished: bool) {
        let mut chunk =
            AnswerChunk { answer_id, events: Default::default(), written_until_beats, is_finished };
        for &(at_beats, is_on, pitch) in events {
            let kind =
                if is_on { AnswerEventKind::NoteOn { pitch } } else { AnswerEventKind::NoteOff { pitch } };
            chunk.events.push(AnswerEvent { at_beats, kind });
        }
        self.link.push_chunk(chunk).unwrap();
    }

    /// Answer notes sent (channel `channel`, no voice id), as (sample, is_on, key).
    fn answer_out(&self, channel: u8) -> Vec<(u64, bool, u8)> {
        self.out
            .iter()
            .filter(|(_, m)| m.channel == channel && m.voice_id.is_none())
            .map(|(s, m)| (*s, m.is_on, m.key))
            .collect()
    }

    /// Checks that output is in time order and every note-on has its note-off.
    fn assert_balanced(&self) {
        let mut sounding = std::collections::HashMap::<(u8, u8), i32>::new();
        let mut last = 0;
        for (sample, msg) in &self.out {
            assert!(*sample >= last, "out of order at {sample}");
            last = *sample;
            let count = sounding.entry((msg.channel, msg.key)).or_default();
            *count += if msg.is_on { 1 } else { -1 };
            assert!(
                *count >= 0 && *count <= 1,
                "key {} channel {} at {sample}: {count}",
                msg.key,
                msg.channel
            );
        }
        let stuck: Vec<_> = sounding.iter().filter(|(_, c)| **c != 0).collect();
        assert!(stuck.is_empty(), "stuck notes {stuck:?}");
    }
}

/// Two bars of quarter notes from beat 0 (the last ends on beat 8).
fn two_bars() -> Vec<Played> {
    [60, 62, 64, 65, 67, 65, 64, 62].iter().enumerate().map(|(i, &k)| (k, i as f64, 1.0)).collect()
}

fn settings() -> Settings {
    Settings { channel: 1, is_fresh_seed: false, seed: 42, ..Settings::default() }
}

#[test]
fn the_answer_starts_on_the_bar_after_the_silence() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(8.99, 256, &s, &two_bars());
    assert!(rig.link.has_no_requests(), "the phrase ended early");
    rig.run(9.01, 256, &s, &[]);
    let request = rig.take_request();
    assert_eq!(request.seed, 42);
    assert_eq!(request.phrase.notes.len(), 8);
    assert_eq!(request.phrase.len_beats, 8.0);
    // The host's 4/4 travels with the phrase, whose origin is its bar line.
    assert_eq!(request.phrase.meter, Some(music::Meter::COMMON));
    assert_eq!(request.settings.len_beats, Some(8.0));
    assert_eq!(rig.live.active_answer_id.load(Ordering::Acquire), request.answer_id);
    // The worker writes two notes.
    rig.send(request.answer_id, &[(0.0, true, 70), (1.5, false, 70), (1.5, true, 72)], 2.0, false);
    rig.send(request.answer_id, &[(2.0, false, 72)], 2.0, false);
    rig.run(21.0, 256, &s, &[]);
    let bps = rig.beats_per_sample();
    let at = |beats: f64| (beats / bps).round() as u64;
    assert_eq!(
        rig.answer_out(1),
        vec![(at(12.0), true, 70), (at(13.5), false, 70), (at(13.5), true, 72), (at(14.0), false, 72)]
    );
    // Velocity from the phrase (0.8 of 127 rounds to 102).
    let on = rig.out.iter().find(|(_, m)| m.channel == 1 && m.is_on).unwrap().1;
    assert_eq!((on.velocity * 127.0).round(), 102.0);
    // The answer ended after two bars, and the phrase passed through on channel 0.
    assert!(!rig.sched.is_answering());
    assert_eq!(rig.live.active_answer_id.load(Ordering::Acquire), 0);
    assert_eq!(rig.answer_out(0).len(), 16);
    rig.assert_balanced();
}

#[test]
fn next_beat_and_bars_triggers() {
    let mut rig = Rig::new();
    let s = Settings { answer_start: AnswerStart::NextBeat, silence_beats: 0.5, ..settings() };
    rig.run(2.8, 100, &s, &[(60, 0.0, 1.0), (62, 1.25, 1.0)]);
    // Silence from 2.25 for half a beat: ends at 2.75, the answer starts at beat 3, the phrase
    // runs to the beat after its last note.
    let request = rig.take_request();
    assert_eq!(request.phrase.len_beats, 3.0);
    rig.send(request.answer_id, &[(0.0, true, 64), (0.5, false, 64)], 1.0, true);
    rig.run(4.0, 100, &s, &[]);
    assert_eq!(rig.answer_out(1), vec![(rig.sample_of(3.0), true, 64), (rig.sample_of(3.5), false, 64)]);

    // Bars: one bar from the bar line before the first note, held keys or not.
    let mut rig = Rig::new();
    let s = Settings { trigger: TriggerMode::Bars, phrase_bars: 1, ..settings() };
    let held = [(60, 4.5, 4.0)];
    rig.run(6.0, 128, &s, &held);
    assert!(rig.link.has_no_requests());
    rig.run(8.01, 128, &s, &held);
    let request = rig.take_request();
    assert_eq!(request.phrase.len_beats, 4.0);
    assert!((request.phrase.notes[0].start_beats - 0.5).abs() < 1e-9);
    // The key is still down at the bar line: the note is cut there.
    assert!((request.phrase.notes[0].len_beats - 3.5).abs() < 1e-9);
    rig.send(request.answer_id, &[(0.0, true, 64), (0.5, false, 64)], 1.0, true);
    let resume = rig.next_sample;
    rig.run(9.0, 128, &s, &held);
    // The answer starts on the bar line that ended the phrase; this fake worker only answers
    // after two blocks, so the note plays that much late (within the tolerance).
    assert_eq!(rig.answer_out(1)[0], (resume, true, 64));
    assert!(resume - rig.sample_of(8.0) <= 256);
    rig.run(12.0, 128, &s, &held);
    rig.assert_balanced();
}

#[test]
fn answer_now_ends_the_phrase_at_once() {
    let mut rig = Rig::new();
    let s = Settings { trigger: TriggerMode::Manual, ..settings() };
    rig.run(10.0, 64, &s, &two_bars());
    assert!(rig.link.has_no_requests(), "manual mode waits");
    let now = Settings { is_answer_now: true, ..s };
    rig.run(10.1, 64, &now, &[]);
    let request = rig.take_request();
    assert_eq!(request.phrase.notes.len(), 8);
    // Holding the trigger on does not fire again.
    rig.run(11.0, 64, &now, &[]);
    assert!(rig.link.has_no_requests());
}

#[test]
fn a_stop_releases_the_answer() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 512, &s, &two_bars());
    let request = rig.take_request();
    rig.send(request.answer_id, &[(0.0, true, 70)], 1.0, false);
    rig.run(12.5, 512, &s, &[]);
    assert_eq!(rig.sched.num_sounding(), 1);
    rig.is_playing = false;
    let stop_sample = rig.next_sample;
    rig.run(13.0, 512, &s, &[]);
    assert_eq!(rig.answer_out(1).last(), Some(&(stop_sample, false, 70)));
    assert!(!rig.sched.is_answering());
    rig.assert_balanced();
}

#[test]
fn a_loop_jump_carries_the_answer_over_the_seam() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 480, &s, &two_bars());
    let request = rig.take_request();
    rig.send(
        request.answer_id,
        &[(0.0, true, 70), (3.0, false, 70), (3.0, true, 71), (6.0, false, 71)],
        6.0,
        true,
    );
    rig.run(14.0, 480, &s, &[]);
    // The host loops from 14 back to 12: the timeline goes on, so does the answer.
    rig.host_shift_beats = -2.0;
    rig.run(20.0, 480, &s, &[]);
    let at = |beats: f64| rig.sample_of(beats);
    assert_eq!(
        rig.answer_out(1),
        vec![(at(12.0), true, 70), (at(15.0), false, 70), (at(15.0), true, 71), (at(18.0), false, 71)]
    );
    rig.assert_balanced();
}

#[test]
fn a_tempo_change_moves_the_rest_of_the_answer_with_the_beat() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 240, &s, &two_bars());
    let request = rig.take_request();
    rig.send(
        request.answer_id,
        &[
            (0.0, true, 70),
            (1.0, false, 70),
            (1.0, true, 71),
            (2.0, false, 71),
            (2.0, true, 72),
            (3.0, false, 72),
        ],
        3.0,
        true,
    );
    // At 120 BPM up to beat 12.5, half a beat into the first answer note.
    rig.run(12.5, 240, &s, &[]);
    let change_sample = rig.next_sample;
    // The host doubles the tempo; its position goes on from 12.5 without a jump.
    rig.tempo_bpm = 240.0;
    rig.host_shift_beats = 12.5 - change_sample as f64 * rig.beats_per_sample();
    while rig.host_pos_beats() < 16.0 {
        rig.block(240, &s, &[]);
    }
    // Beat 13 is now half a beat at 240 BPM after the change: 6,000 samples, not 12,000.
    let samples_per_beat = 60.0 / 240.0 * 48_000.0;
    let after = |beats: f64| change_sample + ((beats - 12.5) * samples_per_beat).round() as u64;
    assert_eq!(
        rig.answer_out(1),
        vec![
            (12 * 24_000, true, 70),
            (after(13.0), false, 70),
            (after(13.0), true, 71),
            (after(14.0), false, 71),
            (after(14.0), true, 72),
            (after(15.0), false, 72)
        ]
    );
    rig.assert_balanced();
}

#[test]
fn playing_again_makes_the_answer_yield() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.send(request.answer_id, &[(0.0, true, 70), (4.0, false, 70)], 4.0, false);
    rig.run(14.0, 256, &s, &[(72, 13.25, 0.5)]);
    let cut = rig.sample_of(13.25);
    assert_eq!(rig.answer_out(1), vec![(rig.sample_of(12.0), true, 70), (cut, false, 70)]);
    assert!(!rig.sched.is_answering());
    // The played note starts a new phrase, answered after its own silence.
    rig.run(15.0, 256, &s, &[]);
    let second = rig.take_request();
    assert_eq!(second.phrase.notes.len(), 1);
    assert!(second.answer_id != request.answer_id);

    // Without yield the answer goes on and the note only passes through.
    let mut rig = Rig::new();
    let s = Settings { should_yield: false, ..settings() };
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.send(request.answer_id, &[(0.0, true, 70), (4.0, false, 70)], 4.0, false);
    rig.run(18.0, 256, &s, &[(72, 13.25, 0.5)]);
    assert_eq!(rig.answer_out(1), vec![(rig.sample_of(12.0), true, 70), (rig.sample_of(16.0), false, 70)]);
    rig.assert_balanced();
}

#[test]
fn playing_on_before_the_answer_starts_extends_the_phrase() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 256, &s, &two_bars());
    let first = rig.take_request();
    // More notes at 10..11: the pending answer is cancelled, the phrase continues.
    rig.run(12.5, 256, &s, &[(69, 10.0, 1.0)]);
    let second = rig.take_request();
    assert_eq!(second.phrase.notes.len(), 9);
    assert_eq!(second.phrase.len_beats, 12.0);
    assert!(second.answer_id > first.answer_id);
    assert!(rig.answer_out(1).is_empty());
}

#[test]
fn reset_and_bypass_release_everything() {
    let mut rig = Rig::new();
    let s = Settings { should_yield: false, ..settings() };
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.send(request.answer_id, &[(0.0, true, 70)], 1.0, false);
    rig.run(12.5, 256, &s, &[(50, 12.1, 10.0)]);
    // A note passed through and an answer note sound. The host resets.
    rig.sched.reset();
    let after_reset = rig.next_sample;
    rig.run(13.0, 256, &s, &[]);
    let released: Vec<_> =
        rig.out.iter().filter(|(t, _)| *t == after_reset).map(|(_, m)| (m.key, m.is_on)).collect();
    assert!(released.contains(&(70, false)) && released.contains(&(50, false)), "{released:?}");

    // Bypass: the answer stops and notes pass through untouched even with thru off.
    let mut rig = Rig::new();
    let s = Settings { is_thru: false, ..settings() };
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.send(request.answer_id, &[(0.0, true, 70)], 1.0, false);
    rig.run(12.5, 256, &s, &[]);
    let bypassed = Settings { is_bypassed: true, ..s };
    let bypass_sample = rig.next_sample;
    rig.run(14.0, 256, &bypassed, &[(55, 13.0, 0.5)]);
    assert!(rig.out.contains(&(
        bypass_sample,
        NoteMsg { timing: 0, is_on: false, channel: 1, key: 70, velocity: 0.0, voice_id: None }
    )));
    assert_eq!(
        rig.answer_out(0).iter().map(|(_, on, k)| (*on, *k)).collect::<Vec<_>>(),
        vec![(true, 55), (false, 55)]
    );
    rig.assert_balanced();
}

#[test]
fn a_passed_note_keeps_its_note_off_when_thru_goes_off() {
    let mut rig = Rig::new();
    let on = settings();
    let off = Settings { is_thru: false, ..on };
    rig.run(1.0, 64, &on, &[(60, 0.5, 5.0)]);
    rig.run(8.0, 64, &off, &[(60, 0.5, 5.0)]);
    assert_eq!(rig.answer_out(0), vec![(rig.sample_of(0.5), true, 60), (rig.sample_of(5.5), false, 60)]);
}

#[test]
fn the_gate_shortens_answer_notes() {
    let mut rig = Rig::new();
    let s = Settings { gate: 0.5, ..settings() };
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.send(
        request.answer_id,
        &[(0.0, true, 70), (2.0, false, 70), (2.0, true, 71), (3.0, false, 71)],
        3.0,
        true,
    );
    rig.run(16.0, 256, &s, &[]);
    let at = |beats: f64| rig.sample_of(beats);
    assert_eq!(
        rig.answer_out(1),
        vec![(at(12.0), true, 70), (at(13.0), false, 70), (at(14.0), true, 71), (at(14.5), false, 71)]
    );
}

#[test]
fn late_notes_are_dropped_and_counted() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.run(13.0, 256, &s, &[]);
    // Notes for beats 12 and 12.9 arrive at 13: the first is long gone, the second just late.
    rig.send(
        request.answer_id,
        &[(0.0, true, 70), (0.5, false, 70), (0.9, true, 71), (2.0, false, 71)],
        2.0,
        true,
    );
    rig.run(15.0, 256, &s, &[]);
    assert_eq!(rig.answer_out(1), vec![(rig.sample_of(13.0), true, 71), (rig.sample_of(14.0), false, 71)]);
    assert_eq!(rig.live.num_late_notes.load(Ordering::Relaxed), 1);
}

#[test]
fn the_stopped_transport_answers_on_its_own_clock() {
    let mut rig = Rig::new();
    rig.is_playing = false;
    let s = Settings { free_tempo_bpm: 90.0, ..settings() };
    // The host gives a tempo (120), so the free clock runs at 120, not 90. The first note is the
    // downbeat.
    let phrase: Vec<Played> = vec![(60, 1.3, 1.0), (62, 2.3, 1.0)];
    rig.run(4.5, 256, &s, &phrase);
    let request = rig.take_request();
    assert_eq!(request.phrase.notes[0].start_beats, 0.0);
    assert_eq!(request.phrase.len_beats, 4.0);
    rig.send(request.answer_id, &[(0.0, true, 70), (1.0, false, 70)], 1.0, true);
    rig.run(7.0, 256, &s, &[]);
    // Silence ends at 4.3; the next bar of the player's own grid is at 1.3 + 4.
    let at = rig.sample_of(5.3);
    let answer = rig.answer_out(1);
    assert!(answer[0].0.abs_diff(at) <= 1, "{answer:?} vs {at}");
    rig.assert_balanced();
}

#[test]
fn continuous_answers_stop_at_the_bar_when_turned_off() {
    let mut rig = Rig::new();
    let s = Settings { is_continuous: true, ..settings() };
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    assert_eq!(request.settings.len_beats, None);
    let mut events = Vec::new();
    for i in 0..16 {
        events.push((i as f64, true, 70 + (i % 3) as u8));
        events.push((i as f64 + 1.0, false, 70 + (i % 3) as u8));
    }
    for part in events.chunks(MAX_CHUNK_EVENTS) {
        rig.send(request.answer_id, part, part.last().unwrap().0, false);
    }
    rig.run(21.5, 256, &s, &[]);
    assert!(rig.sched.is_answering());
    let stop = Settings { is_continuous: false, ..s };
    rig.run(26.0, 256, &stop, &[]);
    assert!(!rig.sched.is_answering());
    let last = *rig.answer_out(1).last().unwrap();
    assert_eq!(last, (rig.sample_of(24.0), false, 70 + (11 % 3) as u8));
    rig.assert_balanced();
}

#[test]
fn a_full_queue_keeps_the_newest_request() {
    let mut rig = Rig::with_request_queue(1);
    let s = Settings { silence_beats: 0.25, ..settings() };
    // Three phrases, each interrupting the answer to the one before.
    rig.run(4.0, 128, &s, &[(60, 0.0, 0.5)]);
    rig.run(8.0, 128, &s, &[(62, 4.0, 0.5)]);
    rig.run(12.0, 128, &s, &[(64, 8.0, 0.5)]);
    assert_eq!(rig.live.num_dropped_requests.load(Ordering::Relaxed), 1);
    let first = rig.take_request();
    assert_eq!(first.phrase.notes[0].pitch, 60);
    rig.run(12.1, 128, &s, &[]);
    let newest = rig.take_request();
    assert_eq!(newest.phrase.notes[0].pitch, 64);
}

#[test]
fn without_a_model_notes_only_pass_through() {
    let mut rig = Rig::new();
    rig.live.is_model_ready.store(false, Ordering::Release);
    rig.run(16.0, 256, &settings(), &two_bars());
    assert!(rig.link.has_no_requests());
    assert_eq!(rig.answer_out(0).len(), 16);
}

#[test]
fn a_model_change_ends_the_answer() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.5, 256, &s, &two_bars());
    let request = rig.take_request();
    rig.send(request.answer_id, &[(0.0, true, 70)], 1.0, false);
    rig.run(12.5, 256, &s, &[]);
    rig.live.model_epoch.fetch_add(1, Ordering::AcqRel);
    let at = rig.next_sample;
    rig.run(13.0, 256, &s, &[]);
    assert_eq!(rig.answer_out(1).last(), Some(&(at, false, 70)));
    assert!(!rig.sched.is_answering());
}

#[test]
fn seeds() {
    assert_eq!(answer_seed(5, false, 9), 5);
    assert_ne!(answer_seed(5, true, 1), answer_seed(5, true, 2));
    assert_eq!(answer_seed(5, true, 1), answer_seed(5, true, 1));
}

#[test]
fn try_again_answers_the_same_phrase_anew_from_the_next_bar_and_ends_what_plays() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(9.01, 256, &s, &two_bars());
    assert_eq!(rig.live.steer.stage(), Stage::Thinking);
    let first = rig.take_request();
    rig.send(first.answer_id, &[(0.0, true, 70), (3.0, false, 70)], 4.0, false);
    rig.run(13.0, 256, &s, &[]);
    assert_eq!(rig.live.steer.stage(), Stage::Answering);
    // Beat 13: the answer's first note sounds. Try Again ends it now and asks again.
    rig.live.steer.send(Steer::TryAgain);
    rig.run(13.1, 256, &s, &[]);
    let again = rig.take_request();
    assert_ne!(again.answer_id, first.answer_id);
    assert_eq!(again.phrase, first.phrase);
    assert_ne!(again.seed, first.seed, "a new seed even with Fresh Seed off");
    assert_eq!(again.replay_of, 0);
    let bps = rig.beats_per_sample();
    let at = |beats: f64| (beats / bps).round() as u64;
    let off = rig.answer_out(1).into_iter().find(|(_, is_on, key)| !is_on && *key == 70).unwrap();
    assert!(off.0 >= at(13.0) && off.0 < at(13.1), "the playing note ends at once: {off:?}");
    // The new answer starts on the next bar line, whole bars from the first answer's start.
    rig.send(again.answer_id, &[(0.0, true, 74), (1.0, false, 74)], 2.0, true);
    rig.run(19.0, 256, &s, &[]);
    assert!(rig.answer_out(1).contains(&(at(16.0), true, 74)), "{:?}", rig.answer_out(1));

    // A variation is asked for by the id it was written under.
    rig.live.steer.send(Steer::Replay { answer_id: first.answer_id });
    rig.run(19.1, 256, &s, &[]);
    let replay = rig.take_request();
    assert_eq!(replay.replay_of, first.answer_id);
    assert_eq!(replay.phrase, first.phrase);
    rig.run(30.0, 256, &s, &[]);
    rig.assert_balanced();
}

#[test]
fn try_again_waits_for_a_phrase_and_leaves_a_new_one_alone() {
    let mut rig = Rig::new();
    let s = settings();
    rig.live.steer.send(Steer::TryAgain);
    rig.run(1.0, 256, &s, &[]);
    assert!(rig.link.has_no_requests(), "nothing was answered yet");
    rig.run(9.01, 256, &s, &two_bars());
    let first = rig.take_request();
    rig.send(first.answer_id, &[], 8.0, true);
    rig.run(21.0, 256, &s, &[]);
    // The player starts a new phrase: Try Again does not cut in.
    let new_phrase = [(60, 21.0, 2.0)];
    rig.run(22.0, 256, &s, &new_phrase);
    assert_eq!(rig.live.steer.stage(), Stage::Listening);
    rig.live.steer.send(Steer::TryAgain);
    rig.run(22.5, 256, &s, &new_phrase);
    assert!(rig.link.has_no_requests());
    rig.run(30.0, 256, &s, &new_phrase);
    assert_eq!(rig.take_request().phrase.notes.len(), 1, "the new phrase is answered");
    rig.assert_balanced();
}

#[test]
fn the_stage_follows_the_phrase_the_answer_and_a_yield() {
    let mut rig = Rig::new();
    let s = settings();
    rig.run(0.5, 256, &s, &[(60, 0.25, 0.5)]);
    assert_eq!(rig.live.steer.stage(), Stage::Listening, "a key is down");
    rig.run(1.0, 256, &s, &[(60, 0.25, 0.5)]);
    assert_eq!(rig.live.steer.stage(), Stage::PhraseEnding);
    rig.run(1.9, 256, &s, &[]);
    let request = rig.take_request();
    assert_eq!(rig.live.steer.stage(), Stage::Thinking);
    rig.send(request.answer_id, &[(0.0, true, 70), (2.0, false, 70)], 2.0, false);
    rig.run(4.5, 256, &s, &[]);
    assert_eq!(rig.live.steer.stage(), Stage::Answering);
    rig.run(5.0, 256, &s, &[(62, 4.6, 2.0)]);
    assert_eq!(rig.live.steer.stage(), Stage::Yielded, "the answer stopped for the player");
    rig.run(6.7, 256, &s, &[(62, 4.6, 2.0)]);
    assert_eq!(rig.live.steer.stage(), Stage::PhraseEnding);
    assert_eq!(rig.live.steer.tempo_bpm(), 120.0);
    rig.run(12.0, 256, &s, &[]);
    rig.assert_balanced();
}
