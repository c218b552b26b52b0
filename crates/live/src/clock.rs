//! Turns the host transport into a continuous musical timeline, one block at a time.
//! Runs on: audio thread. No allocation, no locks, no candle.
//!
//! The timeline ("performance beats") equals the host's song position while the transport plays
//! and nothing jumps. A loop or position jump shifts the host position against the timeline
//! instead of moving the timeline, so a phrase being captured or an answer being played carries
//! on across the seam without a stuck or doubled note. With the transport stopped or absent the
//! timeline runs on by itself at the host tempo, or at the free-run tempo when the host gives none.

use music::Meter;

/// Differences between the host position and the one expected from the previous block that are
/// smaller than this, in beats, are rounding or tempo-ramp error, not a jump. It is about a
/// millisecond at common tempos, far below any loop a host offers.
pub const JUMP_TOLERANCE_BEATS: f64 = 1e-3;

/// Bar length assumed when the host gives no time signature: 4/4.
pub const DEFAULT_BAR_BEATS: f64 = 4.0;

/// Lowest and highest tempo the clock accepts, in quarter notes per minute; a host value
/// outside this is ignored as junk.
pub const TEMPO_RANGE_BPM: (f64, f64) = (1.0, 1000.0);

/// The transport fields the clock uses, as the host gives them (any may be missing).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostTransport {
    /// Whether the transport runs.
    pub is_playing: bool,
    /// Tempo in quarter notes per minute.
    pub tempo_bpm: Option<f64>,
    /// Song position at the block's first sample, in beats (quarter notes).
    pub pos_beats: Option<f64>,
    /// Start of the bar that holds `pos_beats`, in beats.
    pub bar_start_beats: Option<f64>,
    /// Time signature as (numerator, denominator).
    pub time_sig: Option<(i32, i32)>,
}

impl HostTransport {
    /// Bar length in beats from the time signature, or 4/4 when it is missing or junk.
    pub fn bar_beats(&self) -> f64 {
        self.meter().map_or(DEFAULT_BAR_BEATS, |m| m.bar_beats())
    }

    /// The time signature, unless it is missing or junk.
    pub fn meter(&self) -> Option<Meter> {
        match self.time_sig {
            Some((num, den)) if (1..=64).contains(&num) && [1, 2, 4, 8, 16, 32].contains(&den) => {
                Some(Meter { numerator: num as u8, denominator: den as u8 })
            }
            _ => None,
        }
    }
}

/// What changed in the transport since the previous block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClockChange {
    /// Nothing: the timeline goes on as expected.
    None,
    /// The transport started playing (the timeline now follows the host).
    Started,
    /// The transport stopped (the timeline now runs free).
    Stopped,
    /// The host position jumped by this many beats (a loop or a locate while playing); the
    /// timeline itself went on without a jump.
    Jumped { by_beats: f64 },
}

/// One block on the timeline. Its time range is half-open: `[start_beats, end_beats())`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockTime {
    /// Timeline position of the block's first sample, in beats.
    pub start_beats: f64,
    /// Length of one sample in beats at this block's tempo.
    pub beats_per_sample: f64,
    /// Samples in the block.
    pub len_samples: u32,
    /// Tempo in quarter notes per minute.
    pub tempo_bpm: f64,
    /// Bar length in beats.
    pub bar_beats: f64,
    /// The host's time signature, when it gives a valid one (`bar_beats` is its bar).
    pub meter: Option<Meter>,
    /// A bar line of the host on the timeline, when the host transport plays: bar lines lie at
    /// this plus whole multiples of `bar_beats`. `None` with a free-running clock.
    pub host_bar_origin_beats: Option<f64>,
}

impl BlockTime {
    /// Exclusive end of the block, in beats.
    pub fn end_beats(&self) -> f64 {
        self.start_beats + self.len_samples as f64 * self.beats_per_sample
    }

    /// Timeline position of the sample at `offset_samples` in the block.
    pub fn beats_at(&self, offset_samples: u32) -> f64 {
        self.start_beats + offset_samples as f64 * self.beats_per_sample
    }

    /// The sample of the block at which something at `at_beats` happens: the nearest sample,
    /// with times before the block clamped to its first sample (something late happens at once).
    /// `None` when the nearest sample lies at or after the block's end. Rounding to the nearest
    /// sample on a timeline that only depends on the sample count makes the result the same for
    /// every block size.
    pub fn offset_of(&self, at_beats: f64) -> Option<u32> {
        let offset = ((at_beats - self.start_beats) / self.beats_per_sample).round();
        if offset < self.len_samples as f64 {
            Some(offset.max(0.0) as u32)
        } else {
            None
        }
    }
}

/// Smallest multiple of `unit_beats` counted from `origin_beats` at or after `at_beats`. A
/// millionth of a beat of tolerance keeps a time that sits on a grid point on it.
pub fn next_grid_point(origin_beats: f64, unit_beats: f64, at_beats: f64) -> f64 {
    let units = ((at_beats - origin_beats) / unit_beats - 1e-6).ceil();
    origin_beats + units * unit_beats
}

/// Largest multiple of `unit_beats` counted from `origin_beats` at or before `at_beats`, with the
/// same tolerance.
pub fn prev_grid_point(origin_beats: f64, unit_beats: f64, at_beats: f64) -> f64 {
    let units = ((at_beats - origin_beats) / unit_beats + 1e-6).floor();
    origin_beats + units * unit_beats
}

/// The timeline. Holds no buffers; `reset` forgets the previous block.
#[derive(Clone, Debug)]
pub struct Clock {
    sample_rate_hz: f64,
    /// Timeline position where the next block starts, if a block came before.
    next_start_beats: Option<f64>,
    /// Host position where the next block is expected to start, while the host plays.
    next_host_beats: Option<f64>,
    /// Host position minus timeline position while the host plays.
    host_offset_beats: f64,
}

impl Clock {
    /// A clock at `sample_rate_hz` that starts at beat 0.
    pub fn new(sample_rate_hz: f32) -> Self {
        Self {
            sample_rate_hz: sample_rate_hz.max(1.0) as f64,
            next_start_beats: None,
            next_host_beats: None,
            host_offset_beats: 0.0,
        }
    }

    /// Forgets the previous block: the next block is taken as it comes, without a change.
    pub fn reset(&mut self) {
        self.next_start_beats = None;
        self.next_host_beats = None;
        self.host_offset_beats = 0.0;
    }

    /// The next block of `len_samples` samples. `free_tempo_bpm` is used when the host gives no
    /// tempo.
    pub fn advance(
        &mut self,
        host: &HostTransport,
        len_samples: u32,
        free_tempo_bpm: f64,
    ) -> (BlockTime, ClockChange) {
        let is_valid_tempo = |t: &f64| t.is_finite() && (TEMPO_RANGE_BPM.0..=TEMPO_RANGE_BPM.1).contains(t);
        let tempo_bpm = host
            .tempo_bpm
            .filter(is_valid_tempo)
            .unwrap_or(free_tempo_bpm.clamp(TEMPO_RANGE_BPM.0, TEMPO_RANGE_BPM.1));
        let beats_per_sample = tempo_bpm / 60.0 / self.sample_rate_hz;
        let host_pos_beats = host.pos_beats.filter(|p| host.is_playing && p.is_finite());
        let was_following_host = self.next_host_beats.is_some();

        let (start_beats, change) = match (host_pos_beats, self.next_host_beats, self.next_start_beats) {
            (Some(pos), Some(expected), Some(next_start)) => {
                let by_beats = pos - expected;
                if by_beats.abs() > JUMP_TOLERANCE_BEATS {
                    self.host_offset_beats = pos - next_start;
                    (next_start, ClockChange::Jumped { by_beats })
                } else {
                    (pos - self.host_offset_beats, ClockChange::None)
                }
            }
            (Some(pos), _, next_start) => {
                // Starting (or the first block): the timeline takes the host position.
                self.host_offset_beats = 0.0;
                let change = if next_start.is_some() { ClockChange::Started } else { ClockChange::None };
                (pos, change)
            }
            (None, _, next_start) => {
                let change = if was_following_host { ClockChange::Stopped } else { ClockChange::None };
                (next_start.unwrap_or(0.0), change)
            }
        };

        let bar_beats = host.bar_beats();
        let host_bar_origin_beats = host_pos_beats.map(|pos| {
            // Trust the host's bar start only when it holds the position; some hosts leave it 0.
            let bar_start = host
                .bar_start_beats
                .filter(|b| b.is_finite() && *b <= pos + 1e-6 && pos < *b + bar_beats - 1e-9)
                .unwrap_or_else(|| prev_grid_point(0.0, bar_beats, pos));
            bar_start - self.host_offset_beats
        });

        let block = BlockTime {
            start_beats,
            beats_per_sample,
            len_samples,
            tempo_bpm,
            bar_beats,
            meter: host.meter(),
            host_bar_origin_beats,
        };
        self.next_start_beats = Some(block.end_beats());
        self.next_host_beats = host_pos_beats.map(|pos| pos + len_samples as f64 * beats_per_sample);
        (block, change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn playing(pos_beats: f64, tempo_bpm: f64) -> HostTransport {
        HostTransport {
            is_playing: true,
            tempo_bpm: Some(tempo_bpm),
            pos_beats: Some(pos_beats),
            bar_start_beats: Some((pos_beats / 4.0).floor() * 4.0),
            time_sig: Some((4, 4)),
        }
    }

    #[test]
    fn beats_and_samples() {
        let mut clock = Clock::new(48_000.0);
        let (block, _) = clock.advance(&playing(8.0, 120.0), 480, 100.0);
        // 120 BPM at 48 kHz: a beat is 24 000 samples.
        assert_eq!(block.beats_per_sample, 1.0 / 24_000.0);
        assert_eq!(block.end_beats(), 8.02);
        assert_eq!(block.beats_at(240), 8.01);
        assert_eq!(block.offset_of(8.01), Some(240));
        assert_eq!(block.offset_of(8.0), Some(0));
    }

    #[test]
    fn block_edges_are_half_open_and_clamped() {
        let mut clock = Clock::new(48_000.0);
        let (block, _) = clock.advance(&playing(8.0, 120.0), 480, 100.0);
        // The block's end belongs to the next block, and so does anything less than half a
        // sample before it (it rounds to the next block's first sample).
        assert_eq!(block.offset_of(8.02), None);
        assert_eq!(block.offset_of(8.02 - 0.4 / 24_000.0), None);
        assert_eq!(block.offset_of(8.02 - 0.6 / 24_000.0), Some(479));
        assert_eq!(block.offset_of(8.02 - 0.5 / 24_000.0 + 1e-12), None);
        // Late events happen at the first sample.
        assert_eq!(block.offset_of(7.0), Some(0));
    }

    #[test]
    fn every_block_size_puts_a_time_on_the_same_sample() {
        let at_beats = 1.234_567;
        for len_samples in [1u32, 2, 3, 64, 100, 441, 4096] {
            let mut clock = Clock::new(44_100.0);
            let mut first_sample = 0u64;
            let mut found = None;
            for _ in 0..200_000 {
                let pos = first_sample as f64 * 120.0 / 60.0 / 44_100.0;
                let (block, _) = clock.advance(&playing(pos, 120.0), len_samples, 100.0);
                if let Some(offset) = block.offset_of(at_beats) {
                    found = Some(first_sample + offset as u64);
                    break;
                }
                first_sample += len_samples as u64;
            }
            // 1.234567 beats at 2 beats a second and 44.1 kHz is sample 27 222.2 → 27 222.
            assert_eq!(found, Some(27_222), "block size {len_samples}");
        }
    }

    #[test]
    fn a_loop_jump_shifts_the_host_but_not_the_timeline() {
        let mut clock = Clock::new(48_000.0);
        let (first, change) = clock.advance(&playing(15.99, 120.0), 480, 100.0);
        assert_eq!(change, ClockChange::None);
        assert_eq!(first.host_bar_origin_beats, Some(12.0));
        // The host loops from 16 back to 0.
        let (second, change) = clock.advance(&playing(0.0, 120.0), 480, 100.0);
        match change {
            ClockChange::Jumped { by_beats } => assert!((by_beats + 16.01).abs() < 1e-9),
            other => panic!("expected a jump, got {other:?}"),
        }
        assert!((second.start_beats - 16.01).abs() < 1e-9);
        // The host's bar at 0 is at 16.01 on the timeline.
        assert!((second.host_bar_origin_beats.unwrap() - 16.01).abs() < 1e-9);
        // The next block follows the host again, shifted.
        let (third, change) = clock.advance(&playing(0.02, 120.0), 480, 100.0);
        assert_eq!(change, ClockChange::None);
        assert!((third.start_beats - 16.03).abs() < 1e-9);
    }

    #[test]
    fn small_drift_is_not_a_jump() {
        let mut clock = Clock::new(48_000.0);
        clock.advance(&playing(4.0, 120.0), 480, 100.0);
        let (block, change) = clock.advance(&playing(4.0205, 120.0), 480, 100.0);
        assert_eq!(change, ClockChange::None);
        assert_eq!(block.start_beats, 4.0205);
    }

    #[test]
    fn stop_and_start() {
        let mut clock = Clock::new(48_000.0);
        clock.advance(&playing(4.0, 90.0), 480, 100.0);
        // Stopped: the timeline runs on from where it was, at the host tempo.
        let stopped = HostTransport {
            is_playing: false,
            tempo_bpm: Some(90.0),
            pos_beats: Some(4.0),
            ..Default::default()
        };
        let (block, change) = clock.advance(&stopped, 480, 100.0);
        assert_eq!(change, ClockChange::Stopped);
        assert!((block.start_beats - (4.0 + 480.0 * 1.5 / 48_000.0)).abs() < 1e-12);
        assert_eq!(block.tempo_bpm, 90.0);
        assert_eq!(block.host_bar_origin_beats, None);
        let (_, change) = clock.advance(&stopped, 480, 100.0);
        assert_eq!(change, ClockChange::None);
        // Started again somewhere else: the timeline takes the host position.
        let (block, change) = clock.advance(&playing(32.0, 90.0), 480, 100.0);
        assert_eq!(change, ClockChange::Started);
        assert_eq!(block.start_beats, 32.0);
    }

    #[test]
    fn without_a_host_the_free_tempo_runs() {
        let mut clock = Clock::new(44_100.0);
        let nothing = HostTransport::default();
        let (first, change) = clock.advance(&nothing, 441, 150.0);
        assert_eq!(change, ClockChange::None);
        assert_eq!(first.start_beats, 0.0);
        assert_eq!(first.tempo_bpm, 150.0);
        assert_eq!(first.bar_beats, 4.0);
        let (second, _) = clock.advance(&nothing, 441, 150.0);
        assert!((second.start_beats - 0.025).abs() < 1e-12);
        // Junk host tempo falls back as well.
        let junk = HostTransport { tempo_bpm: Some(f64::NAN), ..Default::default() };
        assert_eq!(clock.advance(&junk, 1, 150.0).0.tempo_bpm, 150.0);
    }

    #[test]
    fn bar_origin_comes_from_the_host_or_the_time_signature() {
        let mut clock = Clock::new(48_000.0);
        // 6/8: bars of 3 beats; a host that leaves the bar start at 0.
        let host =
            HostTransport { bar_start_beats: Some(0.0), time_sig: Some((6, 8)), ..playing(7.5, 120.0) };
        let (block, _) = clock.advance(&host, 64, 100.0);
        assert_eq!(block.bar_beats, 3.0);
        assert_eq!(block.meter, Some(Meter { numerator: 6, denominator: 8 }));
        assert_eq!(block.host_bar_origin_beats, Some(6.0));
        // A junk time signature counts as none: 4/4 bars, no meter for the model.
        let junk = HostTransport { time_sig: Some((6, 7)), ..host };
        let (block, _) = clock.advance(&junk, 64, 100.0);
        assert_eq!((block.bar_beats, block.meter), (4.0, None));
        // A host bar start that holds the position wins (a meter change earlier in the song).
        clock.reset();
        let host =
            HostTransport { bar_start_beats: Some(7.0), time_sig: Some((6, 8)), ..playing(7.5, 120.0) };
        assert_eq!(clock.advance(&host, 64, 100.0).0.host_bar_origin_beats, Some(7.0));
    }

    #[test]
    fn grid_points() {
        assert_eq!(next_grid_point(0.0, 4.0, 9.0), 12.0);
        assert_eq!(next_grid_point(0.0, 4.0, 8.0), 8.0);
        assert_eq!(next_grid_point(0.0, 4.0, 8.0 + 1e-9), 8.0);
        assert_eq!(next_grid_point(1.5, 1.0, 3.2), 3.5);
        assert_eq!(prev_grid_point(0.0, 4.0, 7.99), 4.0);
        assert_eq!(prev_grid_point(0.0, 4.0, 8.0 - 1e-9), 8.0);
    }
}
