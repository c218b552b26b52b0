//! A seeded random host drives the built plugin as real hosts do: any sample rate, block sizes
//! from 1 to 4096 samples, tempo and time signature changes, loops and locates, stop and start,
//! blocks without transport, resets and reactivation, parameter automation, notes on several
//! channels in both dialects (a note sent as a CLAP event and as MIDI at the same sample is
//! one note), overlapping notes of one key, chokes, controllers, pitch bend and pressure. After
//! every block it checks what the plugin sent: events lie in the block, in time order; notes
//! alternate on and off per channel and key; a note is passed through at its sample and sounds
//! until the player lets go of the key, then ends unless an answer note holds the key too;
//! controllers, pitch bend and pressure come out unchanged, at their sample and in order,
//! exactly while MIDI Thru (or bypass) is on; an answer note plays only on the answer channel,
//! never while bypassed and never within a second of a stop; a stop, bypass, reset or
//! reactivation releases what the plugin played. At the end every note-on has its note-off and
//! the state survives saving and loading. A second, quicker test pins down four cases: a key struck
//! twice before its note-off, a note sent in both dialects, a phrase under the sustain pedal,
//! and a host that never sends a transport. Needs `cargo xtask bundle antiphon` first.
//!
//! Every run plays seeds `0..SCENARIOS`. `ANTIPHON_RANDOM_HOST_SEEDS=N` plays seeds `0..N` (or
//! `A..B` those from A to B - 1), `ANTIPHON_RANDOM_HOST_SEED=S` replays seed S alone. A
//! scenario rendered in real-time mode (its summary line says so) depends on how fast the
//! worker runs, so its replay may differ from the failing run; offline ones replay exactly.
//! `ANTIPHON_RANDOM_HOST_TRACE=1` prints every block that sends or gets something.

mod plugin_host;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use plugin_host::{sort_inputs, HostTransport, Input, Output, Plugin, Processor, Sent};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Scenarios per run: about a minute in a debug build on two cores.
const SCENARIOS: u64 = 60;

const SAMPLE_RATES_HZ: [f64; 5] = [44_100.0, 48_000.0, 88_200.0, 96_000.0, 192_000.0];

const TIME_SIGS: [(u16, u16); 8] = [(4, 4), (3, 4), (6, 8), (5, 4), (7, 8), (2, 4), (12, 8), (5, 8)];

/// The most samples a block holds (the host's `max_frames_count`), unless an activation picks
/// one of `SMALLER_MAX_BLOCK_LENS`.
const MAX_BLOCK_LEN: u32 = 4096;

const SMALLER_MAX_BLOCK_LENS: [u32; 4] = [128, 512, 1024, 2048];

/// Keys half the notes use: few, so a key is often struck again while it still sounds.
const CROWDED_KEYS: [u8; 3] = [60, 62, 64];

/// How much faster than real time a real-time scenario runs: slow enough that the worker keeps
/// up with most answers, fast enough that the test stays short.
const REAL_TIME_SPEEDUP: f64 = 6.0;

/// The sustain pedal's controller number.
const SUSTAIN_PEDAL_CC: u8 = 64;

/// Parameters the host automates during a scenario, each with the values it picks from and how
/// often it is picked among them (weight).
const AUTOMATED: [(&str, &[&str], u32); 11] = [
    ("MIDI Thru", &["On", "On", "On", "Off"], 3),
    ("Temperature", &["0.05", "0.3", "0.7", "1.0", "1.5", "2.0"], 3),
    ("Trigger", &["Silence", "Silence", "Silence", "Bars", "Bars", "Manual"], 2),
    ("Answer Length", &["1", "2", "3", "4"], 2),
    ("Continuous", &["Off", "Off", "On"], 2),
    ("Yield", &["On", "Off"], 2),
    ("Output Channel", &["1", "1", "2", "10", "16"], 2),
    ("Gate", &["10", "50", "75", "100"], 2),
    ("Silence", &["0.25", "0.5", "1", "2"], 1),
    ("Answer Now", &["On", "Off"], 1),
    ("Bypass", &["Off", "On"], 1),
];

/// Automated parameters that start off: on from the start they would waste the scenario.
const STARTING_OFF: [&str; 2] = ["Answer Now", "Bypass"];

/// The seeds this run plays (see the module doc).
fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("ANTIPHON_RANDOM_HOST_SEED") {
        return vec![seed.trim().parse().expect("ANTIPHON_RANDOM_HOST_SEED is a seed number")];
    }
    let Ok(spec) = std::env::var("ANTIPHON_RANDOM_HOST_SEEDS") else {
        return (0..SCENARIOS).collect();
    };
    let number = |text: &str| -> u64 {
        text.trim().parse().expect("ANTIPHON_RANDOM_HOST_SEEDS is a count N or a range A..B")
    };
    match spec.split_once("..") {
        Some((first, end)) => (number(first)..number(end)).collect(),
        None => (0..number(&spec)).collect(),
    }
}

/// Writes straight to stderr, past the test harness's capture: if the plugin aborts (an
/// allocation on the audio thread does), the last line still names the seed.
fn progress(args: fmt::Arguments) {
    let mut stderr = std::io::stderr();
    let _ = stderr.write_fmt(args);
    let _ = stderr.flush();
}

#[test]
fn a_random_host_gets_well_formed_notes_and_every_controller() {
    let seeds = seeds();
    let bundle = Plugin::load();
    let started = Instant::now();
    let mut num_answered = 0;
    for &seed in &seeds {
        progress(format_args!("random host seed {seed}: "));
        let scenario_started = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| Scenario::new(&bundle, seed).run())) {
            Ok(summary) => {
                progress(format_args!("{summary}, {:.1} s\n", scenario_started.elapsed().as_secs_f64()));
                num_answered += usize::from(summary.num_answer_notes > 0);
            }
            Err(panic) => {
                progress(format_args!(
                    "FAILED; replay it with ANTIPHON_RANDOM_HOST_SEED={seed} cargo test --test \
                     plugin_random_host a_random_host -- --nocapture\n"
                ));
                resume_unwind(panic);
            }
        }
    }
    progress(format_args!(
        "random host: {} scenarios, {num_answered} with answers, in {:.1} s\n",
        seeds.len(),
        started.elapsed().as_secs_f64()
    ));
    // The checks on answers only mean something if answers were played: most scenarios leave
    // the player room for one.
    if seeds.len() >= 20 {
        assert!(
            num_answered * 3 >= seeds.len(),
            "only {num_answered} of {} scenarios got an answer",
            seeds.len()
        );
    }
}

/// Picks one of `items`.
fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// Where notes go besides the pass-through, as the parameters stand.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Routing {
    is_thru: bool,
    is_bypassed: bool,
    /// 0-based channel of the answer.
    answer_channel: u8,
}

impl Routing {
    /// Whether an incoming note or controller is passed on.
    fn passes(&self) -> bool {
        self.is_thru || self.is_bypassed
    }
}

/// The keys the plugin counts as held, kept as its policy says: note-ons are counted until as
/// many note-offs came; a note-on at the very sample of the previous one is a duplicate (one
/// note in two dialects); a choke ends the key at once; a reset forgets every key.
#[derive(Default)]
struct HeldKeys {
    /// (channel, key) → (note-ons without their note-off, sample of the latest note-on).
    keys: HashMap<(u8, u8), (u32, u64)>,
}

impl HeldKeys {
    /// Counts a note-on at `at_sample`; false when it duplicates the previous one.
    fn press(&mut self, channel: u8, key: u8, at_sample: u64) -> bool {
        let (num_ons, last_on) = self.keys.entry((channel, key)).or_insert((0, 0));
        let is_duplicate = *num_ons > 0 && *last_on == at_sample;
        *num_ons += 1;
        *last_on = at_sample;
        !is_duplicate
    }

    /// Counts a note-off; true when it ends the key's last note-on.
    fn release(&mut self, channel: u8, key: u8) -> bool {
        match self.keys.get_mut(&(channel, key)) {
            Some((num_ons, _)) if *num_ons > 0 => {
                *num_ons -= 1;
                *num_ons == 0
            }
            _ => false,
        }
    }

    /// Ends the key at once; true when it was down.
    fn choke(&mut self, channel: u8, key: u8) -> bool {
        self.keys.remove(&(channel, key)).is_some_and(|(num_ons, _)| num_ons > 0)
    }

    fn holds(&self, channel: u8, key: u8) -> bool {
        self.keys.get(&(channel, key)).is_some_and(|&(num_ons, _)| num_ons > 0)
    }
}

/// What sounds at the plugin's output: (channel, key) → the scenario sample its note-on came.
#[derive(Default)]
struct Sounding {
    notes: HashMap<(u8, u8), u64>,
}

impl Sounding {
    /// Takes a note-on or note-off; an error says how it breaks the alternation.
    fn note(&mut self, is_on: bool, channel: u8, key: u8, at_sample: u64) -> Result<(), String> {
        match (is_on, self.notes.get(&(channel, key))) {
            (true, Some(since)) => Err(format!(
                "a second note-on of channel {channel} key {key} at {at_sample}; it sounds since {since}"
            )),
            (false, None) => {
                Err(format!("a note-off of channel {channel} key {key} at {at_sample}, which is silent"))
            }
            (true, None) => {
                self.notes.insert((channel, key), at_sample);
                Ok(())
            }
            (false, Some(_)) => {
                self.notes.remove(&(channel, key));
                Ok(())
            }
        }
    }

    /// The sounding keys the player does not hold, as (channel, key, since).
    fn unheld(&self, held: &HeldKeys) -> Vec<(u8, u8, u64)> {
        let mut notes: Vec<(u8, u8, u64)> = self
            .notes
            .iter()
            .filter(|((channel, key), _)| !held.holds(*channel, *key))
            .map(|(&(channel, key), &since)| (channel, key, since))
            .collect();
        notes.sort_unstable();
        notes
    }

    /// Every sounding key, as (channel, key, since).
    fn all(&self) -> Vec<(u8, u8, u64)> {
        self.unheld(&HeldKeys::default())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TransportMode {
    Playing,
    Stopped,
    /// No transport at all: every block gets `None`.
    Absent,
}

/// The host's transport as the random host runs it.
struct HostClock {
    mode: TransportMode,
    tempo_bpm: f64,
    /// Song position at the next block's first sample, in beats.
    pos_beats: f64,
    time_sig: (u16, u16),
    bar_origin_beats: f64,
    loop_beats: Option<(f64, f64)>,
}

impl HostClock {
    fn transport(&self) -> Option<HostTransport> {
        (self.mode != TransportMode::Absent).then(|| HostTransport {
            is_playing: self.mode == TransportMode::Playing,
            tempo_bpm: self.tempo_bpm,
            pos_beats: self.pos_beats,
            loop_beats: self.loop_beats,
            time_sig: self.time_sig,
            bar_origin_beats: self.bar_origin_beats,
        })
    }
}

/// How the host sizes its blocks for a while.
#[derive(Clone, Copy, Debug)]
enum BlockSizes {
    /// The same size every block, as most hosts do.
    Fixed(u32),
    /// 1 to 8 samples (a host splitting at every automation point).
    Tiny,
    /// Any size from 1 to the maximum, block by block.
    Mixed,
}

/// How a note ends.
#[derive(Clone, Copy, Debug)]
enum NoteEnd {
    Clap,
    MidiNoteOff,
    /// A MIDI note-on of velocity 0.
    MidiZeroVelocity,
    Choke,
}

/// What a scenario did, for its summary line.
#[derive(Default)]
struct Summary {
    sample_rates_hz: Vec<f64>,
    is_offline: bool,
    is_note_only: bool,
    audio_secs: f64,
    num_blocks: usize,
    num_notes_in: usize,
    num_notes_out: usize,
    num_answer_notes: usize,
    num_midi_passed: usize,
    num_stops: usize,
    num_resets: usize,
    num_reactivations: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let rates: Vec<String> = self.sample_rates_hz.iter().map(|r| format!("{r}")).collect();
        write!(
            f,
            "{} Hz, {}, {}, {:.1} s of audio in {} blocks; {} notes in, {} out ({} answer), {} \
             controllers passed, {} stops, {} resets, {} reactivations",
            rates.join("/"),
            if self.is_offline { "offline" } else { "real time" },
            if self.is_note_only { "note-only" } else { "stereo" },
            self.audio_secs,
            self.num_blocks,
            self.num_notes_in,
            self.num_notes_out,
            self.num_answer_notes,
            self.num_midi_passed,
            self.num_stops,
            self.num_resets,
            self.num_reactivations
        )
    }
}

/// One parameter the host automates: its id and the CLAP values of its choices.
struct Automated {
    name: &'static str,
    id: u32,
    weight: u32,
    choices: Vec<(&'static str, f64)>,
}

/// What a block's inputs oblige the plugin to send.
struct Expected {
    /// The routing from each offset on (parameter changes come first at their sample).
    routings: Vec<(u32, Routing)>,
    /// Note-ons to pass through at their sample: (offset, channel, key).
    notes: Vec<(u32, u8, u8)>,
    /// Controllers, pitch bend and pressure to pass through unchanged: (offset, bytes).
    midi: Vec<(u32, [u8; 3])>,
    /// Where the pass-through starts or stops holding a key: (offset, (channel, key), holds).
    thru: Vec<(u32, (u8, u8), bool)>,
}

impl Expected {
    fn routing_at(&self, offset: u32) -> Routing {
        self.routings.iter().rev().find(|(at, _)| *at <= offset).unwrap().1
    }
}

/// A note the plugin sent in a block.
struct BlockNote {
    offset: u32,
    /// (channel, key).
    key: (u8, u8),
    is_on: bool,
    /// A note-on that is no pass-through.
    is_answer: bool,
}

/// One seeded run of the random host against a fresh instance.
struct Scenario {
    seed: u64,
    rng: ChaCha8Rng,
    plugin: Plugin,
    processor: Option<Processor>,
    sample_rate_hz: f64,
    automated: Vec<Automated>,
    /// Samples since the scenario started (over every activation).
    now: u64,
    end: u64,
    clock: HostClock,
    /// Whether the previous block's transport played.
    was_playing: bool,
    block_sizes: BlockSizes,
    block_sizes_until: u64,
    /// Inputs scheduled at a scenario sample: note-offs, and everything the player does.
    pending: Vec<(u64, Input)>,
    /// The player plays a phrase until this sample, then rests until the next switch.
    is_in_phrase: bool,
    phrase_switch_at: u64,
    /// Where the last note played ends.
    phrase_end: u64,
    next_note_at: u64,
    next_controller_at: u64,
    next_param_at: u64,
    next_note_id: u32,
    /// Channels the player plays on.
    channels: Vec<u8>,
    /// Channels whose sustain pedal is down.
    pedals_down: HashSet<u8>,
    /// After a stop, no key goes down in a block that starts before this sample; the stop is
    /// checked at the end of the block that reaches it.
    quiet_until: Option<u64>,
    routing: Routing,
    held: HeldKeys,
    sounding: Sounding,
    /// Keys the pass-through holds at the output: passed through and not yet let go.
    thru_notes: HashSet<(u8, u8)>,
    /// Keys an answer note-on sounded, until the key falls silent. A key may stay here after
    /// the answer let go of it while the pass-through holds it: the plugin sends nothing then.
    answer_notes: HashSet<(u8, u8)>,
    /// Set by a reset or reactivation: what sounded then, which the next block must release.
    to_release: Option<Vec<(u8, u8)>>,
    summary: Summary,
    /// When a real-time scenario started playing: its blocks are paced against this.
    paced_since: Option<Instant>,
    /// Whether every block with inputs or outputs is printed (`ANTIPHON_RANDOM_HOST_TRACE`).
    is_tracing: bool,
}

/// Fails the scenario, naming its seed and where it was.
macro_rules! check {
    ($scenario:expr, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            panic!("seed {} at sample {}: {}", $scenario.seed, $scenario.now, format!($($arg)+));
        }
    };
}

impl Scenario {
    /// A fresh instance from `bundle`'s entry with random settings, not yet active.
    fn new(bundle: &Plugin, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut plugin = bundle.another();
        let automated: Vec<Automated> = AUTOMATED
            .iter()
            .map(|&(name, texts, weight)| Automated {
                name,
                id: plugin.param(name).id,
                weight,
                choices: texts.iter().map(|&text| (text, plugin.value_of(name, text))).collect(),
            })
            .collect();
        let seed_text = rng.random_range(0..10_000).to_string();
        let free_tempo_text = format!("{:.1}", rng.random_range(40.0..240.0));
        let mut settings: Vec<(&str, &str)> = vec![
            ("Seed", seed_text.as_str()),
            ("Fresh Seed", pick(&mut rng, &["On", "Off"])),
            ("Phrase Length", pick(&mut rng, &["1", "2"])),
            ("Answer Start", pick(&mut rng, &["Next Bar", "Next Beat"])),
            ("Free Tempo", free_tempo_text.as_str()),
        ];
        for &(name, texts, _) in &AUTOMATED {
            settings.push((name, if STARTING_OFF.contains(&name) { "Off" } else { pick(&mut rng, texts) }));
        }
        plugin.set(&settings);
        let is_tracing = std::env::var_os("ANTIPHON_RANDOM_HOST_TRACE").is_some();
        if is_tracing {
            eprintln!("settings {settings:?}");
        }
        let routing = Routing {
            is_thru: plugin.value("MIDI Thru") >= 0.5,
            is_bypassed: plugin.value("Bypass") >= 0.5,
            answer_channel: plugin.text("Output Channel").parse::<u8>().expect("a channel number") - 1,
        };
        let is_note_only = rng.random_bool(0.3);
        plugin.select_layout(is_note_only);
        // Offline, the audio thread waits for the worker, so a seed replays exactly.
        let is_offline = rng.random_bool(0.9);
        plugin.set_offline(is_offline);

        let sample_rate_hz = pick(&mut rng, &SAMPLE_RATES_HZ);
        let tempo_bpm = rng.random_range(40.0..240.0);
        let mode = match rng.random_range(0..10) {
            0..=5 => TransportMode::Playing,
            6 => TransportMode::Stopped,
            _ => TransportMode::Absent,
        };
        let loop_beats = rng.random_bool(0.3).then(|| {
            let start = pick(&mut rng, &[0.0, 4.0, 8.0]);
            (start, start + pick(&mut rng, &[2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]))
        });
        let clock = HostClock {
            mode,
            tempo_bpm,
            pos_beats: if rng.random_bool(0.5) { 0.0 } else { rng.random_range(0.0..64.0) },
            time_sig: pick(&mut rng, &TIME_SIGS),
            bar_origin_beats: 0.0,
            loop_beats,
        };
        // Long enough at the scenario's tempo for a phrase, its answer and some more, but not
        // minutes of audio at 40 BPM.
        let beats = rng.random_range(32.0..64.0);
        let secs = (beats * 60.0 / tempo_bpm).clamp(8.0, 40.0);
        let channels = match rng.random_range(0..4) {
            0 | 1 => vec![0],
            2 => vec![0, 1],
            _ => vec![0, 9, 15],
        };
        Self {
            seed,
            rng,
            plugin,
            processor: None,
            sample_rate_hz,
            automated,
            now: 0,
            end: (secs * sample_rate_hz) as u64,
            clock,
            was_playing: false,
            block_sizes: BlockSizes::Mixed,
            block_sizes_until: 0,
            pending: Vec::new(),
            is_in_phrase: false,
            phrase_switch_at: 0,
            phrase_end: 0,
            next_note_at: 0,
            next_controller_at: 0,
            next_param_at: 0,
            next_note_id: 0,
            channels,
            pedals_down: HashSet::new(),
            quiet_until: None,
            routing,
            held: HeldKeys::default(),
            sounding: Sounding::default(),
            thru_notes: HashSet::new(),
            answer_notes: HashSet::new(),
            to_release: None,
            summary: Summary {
                sample_rates_hz: vec![sample_rate_hz],
                is_offline,
                is_note_only,
                ..Summary::default()
            },
            paced_since: None,
            is_tracing,
        }
    }

    /// Plays the scenario, ends it cleanly, checks the end and the saved state.
    fn run(mut self) -> Summary {
        self.activate();
        if !self.summary.is_offline {
            self.paced_since = Some(Instant::now());
        }
        let secs = self.rng.random_range(0.5..4.0);
        self.next_param_at = self.samples(secs);
        while self.now < self.end {
            self.block();
        }
        self.finish();
        self.summary
    }

    fn samples(&self, secs: f64) -> u64 {
        (secs * self.sample_rate_hz) as u64
    }

    fn samples_of_beats(&self, beats: f64) -> u64 {
        self.samples(beats * 60.0 / self.clock.tempo_bpm).max(1)
    }

    /// The next block's length, from the current way of sizing blocks, at most the maximum the
    /// plugin was activated with.
    fn block_len(&mut self) -> u32 {
        let max_block_len = self.processor.as_ref().unwrap().max_block_len;
        if self.now >= self.block_sizes_until {
            let (sizes, secs) = match self.rng.random_range(0..10) {
                0..=4 => {
                    let len = pick(&mut self.rng, &[32, 64, 128, 256, 441, 512, 1000, 1024, 2048, 4096]);
                    (BlockSizes::Fixed(len), self.rng.random_range(0.5..4.0))
                }
                5 => (BlockSizes::Tiny, self.rng.random_range(0.002..0.03)),
                _ => (BlockSizes::Mixed, self.rng.random_range(0.5..4.0)),
            };
            self.block_sizes = sizes;
            self.block_sizes_until = self.now + self.samples(secs);
        }
        let len = match self.block_sizes {
            BlockSizes::Fixed(len) => len,
            BlockSizes::Tiny => self.rng.random_range(1..=8),
            BlockSizes::Mixed => self.rng.random_range(1..=max_block_len),
        };
        len.min(max_block_len)
    }

    /// Whether an event that happens `per_sec` times a second on average happens in `secs`.
    fn happens(&mut self, per_sec: f64, secs: f64) -> bool {
        self.rng.random_bool((per_sec * secs).min(1.0))
    }

    fn is_quiet(&self) -> bool {
        self.quiet_until.is_some_and(|until| self.now < until)
    }

    /// The host changes its transport at a block boundary, as hosts do.
    fn change_transport(&mut self, secs: f64) {
        if self.happens(1.0 / 12.0, secs) {
            self.clock.tempo_bpm = if self.rng.random_bool(0.5) {
                self.rng.random_range(40.0..240.0)
            } else {
                (self.clock.tempo_bpm * self.rng.random_range(0.9..1.1)).clamp(40.0, 240.0)
            };
        }
        if self.happens(1.0 / 20.0, secs) {
            self.clock.time_sig = pick(&mut self.rng, &TIME_SIGS);
            self.clock.bar_origin_beats = self.clock.pos_beats;
        }
        if self.happens(1.0 / 20.0, secs) {
            self.clock.loop_beats = match self.clock.loop_beats {
                Some(_) => None,
                None => {
                    let start = (self.clock.pos_beats - self.rng.random_range(0.0..8.0)).max(0.0).floor();
                    Some((start, start + pick(&mut self.rng, &[1.0, 2.0, 4.0, 8.0])))
                }
            };
        }
        match self.clock.mode {
            TransportMode::Playing => {
                if self.happens(1.0 / 15.0, secs) {
                    self.clock.mode = TransportMode::Stopped;
                } else if self.happens(1.0 / 40.0, secs) {
                    self.clock.mode = TransportMode::Absent;
                } else if self.happens(1.0 / 20.0, secs) {
                    // A locate: anywhere from the start to a few bars on.
                    self.clock.pos_beats = self.rng.random_range(0.0..self.clock.pos_beats + 16.0);
                }
            }
            // A stop is checked a second after it, with the transport still stopped.
            _ if self.is_quiet() => {}
            TransportMode::Stopped => {
                if self.happens(1.0 / 4.0, secs) {
                    self.clock.mode = TransportMode::Playing;
                    if self.rng.random_bool(0.3) {
                        self.clock.pos_beats = self.rng.random_range(0.0..32.0);
                    }
                }
            }
            TransportMode::Absent => {
                if self.happens(1.0 / 8.0, secs) {
                    self.clock.mode = pick(&mut self.rng, &[TransportMode::Playing, TransportMode::Stopped]);
                }
            }
        }
        if let (TransportMode::Playing, Some((start, end))) = (self.clock.mode, self.clock.loop_beats) {
            if self.clock.pos_beats >= end {
                self.clock.pos_beats = start + (self.clock.pos_beats - end) % (end - start);
            }
        }
    }

    /// The host resets the plugin, or deactivates and reactivates it (maybe at another sample
    /// rate), between blocks.
    fn maybe_restart(&mut self, secs: f64) {
        if self.happens(1.0 / 40.0, secs) {
            self.processor.as_mut().unwrap().reset();
            self.summary.num_resets += 1;
            self.forget_keys();
        } else if self.happens(1.0 / 40.0, secs) {
            let processor = self.processor.take().unwrap();
            self.plugin.deactivate(processor);
            if self.rng.random_bool(0.3) {
                let sample_rate_hz = pick(&mut self.rng, &SAMPLE_RATES_HZ);
                // The same time left, counted at the new rate.
                self.end =
                    self.now + ((self.end - self.now) as f64 * sample_rate_hz / self.sample_rate_hz) as u64;
                self.sample_rate_hz = sample_rate_hz;
                self.summary.sample_rates_hz.push(sample_rate_hz);
            }
            self.activate();
            self.summary.num_reactivations += 1;
            self.forget_keys();
        }
    }

    /// Activates the plugin at the current sample rate, with the largest block size or a smaller
    /// one.
    fn activate(&mut self) {
        let max_block_len = if self.rng.random_bool(0.7) {
            MAX_BLOCK_LEN
        } else {
            pick(&mut self.rng, &SMALLER_MAX_BLOCK_LENS)
        };
        self.processor = Some(self.plugin.activate(self.sample_rate_hz, max_block_len));
    }

    /// After a reset the plugin forgets the keys held, and must release what it played in the
    /// next block.
    fn forget_keys(&mut self) {
        self.held = HeldKeys::default();
        self.thru_notes.clear();
        self.answer_notes.clear();
        let mut sounding: Vec<(u8, u8)> = self.sounding.notes.keys().copied().collect();
        sounding.sort_unstable();
        self.to_release = Some(sounding);
    }

    /// Schedules a note the player plays at `at`, with its end.
    fn play_note(&mut self, at: u64) {
        let beat_samples = self.samples_of_beats(1.0) as f64;
        let rng = &mut self.rng;
        let channel = pick(rng, &self.channels);
        let key = match rng.random_range(0..20) {
            0..=9 => pick(rng, &CROWDED_KEYS),
            10 => pick(rng, &[0, 127]),
            _ => rng.random_range(36..=96),
        };
        let velocity_midi: u8 = rng.random_range(1..=127);
        let velocity = if rng.random_bool(0.02) { 0.0 } else { f64::from(velocity_midi) / 127.0 };
        let len_samples = if rng.random_bool(0.1) {
            rng.random_range(1..=64)
        } else {
            ((rng.random_range(0.1..2.0) * beat_samples) as u64).max(1)
        };
        let end = at + len_samples;
        self.phrase_end = self.phrase_end.max(end);
        let note_id = rng.random_bool(0.5).then(|| {
            self.next_note_id += 1;
            self.next_note_id
        });
        let off_id = note_id.filter(|_| rng.random_bool(0.7));
        let ending = match rng.random_range(0..20) {
            0..=11 => NoteEnd::Clap,
            12..=15 => NoteEnd::MidiNoteOff,
            16..=18 => NoteEnd::MidiZeroVelocity,
            _ => NoteEnd::Choke,
        };
        let clap_on = Input::Note { offset: 0, is_on: true, channel, key, velocity, note_id };
        let midi_on = Input::Midi { offset: 0, data: [0x90 | channel, key, velocity_midi] };
        let clap_off = |ending| match ending {
            NoteEnd::Choke => Input::Choke { offset: 0, channel, key },
            _ => Input::Note { offset: 0, is_on: false, channel, key, velocity: 0.5, note_id: off_id },
        };
        let midi_off = |ending| match ending {
            NoteEnd::MidiZeroVelocity => Input::Midi { offset: 0, data: [0x90 | channel, key, 0] },
            NoteEnd::Choke => Input::Choke { offset: 0, channel, key },
            _ => Input::Midi { offset: 0, data: [0x80 | channel, key, 64] },
        };
        self.summary.num_notes_in += 1;
        match rng.random_range(0..10) {
            // A CLAP note.
            0..=4 => {
                self.pending.push((at, clap_on));
                self.pending.push((end, clap_off(ending)));
            }
            // A MIDI note.
            5 | 6 => {
                self.pending.push((at, midi_on));
                self.pending.push((end, midi_off(ending)));
            }
            // The same note in both dialects, in either order; the note-offs at the same
            // sample or a little apart.
            _ => {
                let is_midi_first = rng.random_bool(0.5);
                let second_end = if rng.random_bool(0.7) { end } else { end + rng.random_range(1..=500) };
                let (first, second) = if is_midi_first { (midi_on, clap_on) } else { (clap_on, midi_on) };
                self.pending.push((at, first));
                self.pending.push((at, second));
                let midi_ending = match ending {
                    NoteEnd::Clap => NoteEnd::MidiNoteOff,
                    other => other,
                };
                self.pending.push((end, clap_off(ending)));
                self.pending.push((second_end, midi_off(midi_ending)));
            }
        }
    }

    /// Schedules a controller, pitch bend or pressure message at `at`.
    fn move_controller(&mut self, at: u64) {
        let rng = &mut self.rng;
        let channel = pick(rng, &self.channels);
        let data = match rng.random_range(0..20) {
            0..=7 => [0xb0 | channel, 1, rng.random_range(0..=127)],
            8..=10 => [0xb0 | channel, 7, rng.random_range(0..=127)],
            11..=15 => {
                let bend: u16 = rng.random_range(0..16_384);
                [0xe0 | channel, (bend & 0x7f) as u8, (bend >> 7) as u8]
            }
            16 => [0xd0 | channel, rng.random_range(0..=127), 0],
            _ => {
                // The pedal goes the other way; any value from 64 up holds.
                let is_down = !self.pedals_down.contains(&channel);
                if is_down {
                    self.pedals_down.insert(channel);
                } else {
                    self.pedals_down.remove(&channel);
                }
                let value = if is_down { rng.random_range(64..=127) } else { rng.random_range(0..64) };
                [0xb0 | channel, SUSTAIN_PEDAL_CC, value]
            }
        };
        self.pending.push((at, Input::Midi { offset: 0, data }));
    }

    /// Schedules a parameter change at `at`.
    fn automate(&mut self, at: u64) {
        let total: u32 = self.automated.iter().map(|a| a.weight).sum();
        let mut draw = self.rng.random_range(0..total);
        let idx = self.automated.iter().position(|a| {
            if draw < a.weight {
                return true;
            }
            draw -= a.weight;
            false
        });
        let automated = &self.automated[idx.unwrap()];
        let (_, value) = automated.choices[self.rng.random_range(0..automated.choices.len())];
        // "Answer now" answers even an empty phrase, which would sound in the second after a
        // stop where nothing may.
        if automated.name == "Answer Now" && self.is_quiet() {
            return;
        }
        self.pending.push((at, Input::Param { offset: 0, id: automated.id, value }));
    }

    /// The player's and the host's inputs in `[now, now + len)`, in the order they are sent.
    fn inputs(&mut self, len: u32) -> Vec<Input> {
        let block_end = self.now + u64::from(len);
        while self.next_note_at < block_end {
            let at = self.next_note_at.max(self.now);
            if at >= self.phrase_switch_at {
                self.is_in_phrase = !self.is_in_phrase;
                if self.is_in_phrase {
                    let beats = self.rng.random_range(1.0..8.0);
                    self.phrase_switch_at = at + self.samples_of_beats(beats);
                } else {
                    // A rest counts from the last key up, so the phrase ends and is answered
                    // (unless the player comes in again too early, which happens too).
                    let beats = self.rng.random_range(2.0..16.0);
                    self.phrase_switch_at = at.max(self.phrase_end) + self.samples_of_beats(beats);
                    self.next_note_at = self.phrase_switch_at;
                    continue;
                }
            }
            if !self.is_quiet() {
                self.play_note(at);
            }
            // A chord now and then: keys struck at the same sample.
            let gap = if self.rng.random_bool(0.2) {
                0
            } else {
                let gap_beats = self.rng.random_range(0.1..1.0);
                self.samples_of_beats(gap_beats)
            };
            self.next_note_at = at + gap;
        }
        while self.next_controller_at < block_end {
            let at = self.next_controller_at.max(self.now);
            self.move_controller(at);
            let secs = self.rng.random_range(0.05..1.5);
            self.next_controller_at = at + self.samples(secs);
        }
        while self.next_param_at < block_end {
            let at = self.next_param_at.max(self.now);
            self.automate(at);
            let secs = self.rng.random_range(0.2..5.0);
            self.next_param_at = at + self.samples(secs);
        }
        self.take_pending(block_end)
    }

    /// The scheduled inputs before `block_end`, at their offsets in the block starting now.
    fn take_pending(&mut self, block_end: u64) -> Vec<Input> {
        // Stable: inputs at one sample keep the order they were scheduled in.
        self.pending.sort_by_key(|&(at, _)| at);
        let num_due = self.pending.partition_point(|&(at, _)| at < block_end);
        let mut inputs: Vec<Input> =
            self.pending.drain(..num_due).map(|(at, input)| input.at((at - self.now) as u32)).collect();
        sort_inputs(&mut inputs);
        inputs
    }

    /// One block of the running scenario.
    fn block(&mut self) {
        let mut len = self.block_len();
        // The host's moves come four times as often while the plugin plays notes of its own
        // (an answer), where they are most likely to leave one hanging.
        let is_answering = !self.sounding.unheld(&self.held).is_empty();
        let secs = f64::from(len) / self.sample_rate_hz * if is_answering { 4.0 } else { 1.0 };
        self.maybe_restart(secs);
        self.change_transport(secs);
        // A reactivation may have lowered the largest block.
        len = len.min(self.processor.as_ref().unwrap().max_block_len);
        let beats_per_sample = self.clock.tempo_bpm / 60.0 / self.sample_rate_hz;
        if let (TransportMode::Playing, Some((_, end))) = (self.clock.mode, self.clock.loop_beats) {
            // The block ends where the loop jumps back, as hosts do.
            let to_end = ((end - self.clock.pos_beats) / beats_per_sample).ceil().max(1.0);
            len = len.min(to_end as u32);
        }
        self.note_stop();
        let inputs = self.inputs(len);
        self.process(len, &inputs);
    }

    /// Notes a stop of the transport the next block starts with: for a second no key goes
    /// down, then what sounds is checked.
    fn note_stop(&mut self) {
        let is_playing = self.clock.mode == TransportMode::Playing;
        if self.was_playing && !is_playing {
            self.summary.num_stops += 1;
            self.quiet_until = Some(self.now + self.samples(1.0));
        }
        self.was_playing = is_playing;
    }

    /// Works out what the block's inputs oblige the plugin to send, following the routing and
    /// the held keys through them in the order the plugin gets them.
    fn expect(&mut self, inputs: &[Input]) -> Expected {
        let mut expected = Expected {
            routings: vec![(0, self.routing)],
            notes: Vec::new(),
            midi: Vec::new(),
            thru: Vec::new(),
        };
        for input in inputs {
            let (offset, channel, key, is_on) = match *input {
                Input::Param { offset, id, value } => {
                    let automated = self.automated.iter().find(|a| a.id == id).unwrap();
                    let text = automated.choices.iter().find(|c| c.1 == value).unwrap().0;
                    match automated.name {
                        "MIDI Thru" => self.routing.is_thru = text == "On",
                        "Bypass" => self.routing.is_bypassed = text == "On",
                        "Output Channel" => self.routing.answer_channel = text.parse::<u8>().unwrap() - 1,
                        _ => continue,
                    }
                    expected.routings.push((offset, self.routing));
                    continue;
                }
                Input::Note { offset, is_on, channel, key, .. } => (offset, channel, key, is_on),
                Input::Choke { offset, channel, key } => {
                    if self.held.choke(channel, key) {
                        expected.thru.push((offset, (channel, key), false));
                    }
                    continue;
                }
                Input::Midi { offset, data: [status, key, velocity] } => match status & 0xf0 {
                    0x80 | 0x90 => (offset, status & 0x0f, key, status & 0xf0 == 0x90 && velocity > 0),
                    _ => {
                        if self.routing.passes() {
                            expected.midi.push((offset, [status, key, velocity]));
                        }
                        continue;
                    }
                },
            };
            if !is_on {
                if self.held.release(channel, key) {
                    expected.thru.push((offset, (channel, key), false));
                }
            } else if self.held.press(channel, key, self.now + u64::from(offset)) && self.routing.passes() {
                expected.notes.push((offset, channel, key));
                expected.thru.push((offset, (channel, key), true));
            }
        }
        expected
    }

    /// Sends one block, checks what comes back against what was sent, and moves the host on.
    fn process(&mut self, len: u32, inputs: &[Input]) {
        let transport = self.clock.transport();
        let mut expected = self.expect(inputs);
        let processor = self.processor.as_mut().unwrap();
        let first_sample = processor.next_sample;
        // The harness checks that every event lies in the block and that times never go back.
        let outputs: Vec<Output> = processor.process(len, transport.as_ref(), inputs);
        if self.is_tracing && !(inputs.is_empty() && outputs.is_empty()) {
            let sent: Vec<(u64, Sent)> = outputs.iter().map(|o| (o.sample - first_sample, o.sent)).collect();
            eprintln!("block at {} of {len}, {transport:?}:\n  in {inputs:?}\n  out {sent:?}", self.now);
        }
        let sounding_before: HashSet<(u8, u8)> = self.sounding.notes.keys().copied().collect();
        let mut sent_notes: Vec<BlockNote> = Vec::new();
        let mut sent_midi: Vec<(u32, [u8; 3])> = Vec::new();
        for output in &outputs {
            let offset = (output.sample - first_sample) as u32;
            let at = self.now + u64::from(offset);
            let (is_on, channel, key) = match output.sent {
                Sent::Note { is_on, channel, key, .. } => (is_on, channel, key),
                Sent::Choke { channel, key } => (false, channel, key),
                Sent::Midi(data) => {
                    sent_midi.push((offset, data));
                    continue;
                }
                Sent::Other { type_id } => {
                    check!(self, false, "the plugin sent an event of CLAP type {type_id}");
                    continue;
                }
            };
            if let Err(problem) = self.sounding.note(is_on, channel, key, at) {
                check!(self, false, "{problem}");
            }
            let mut is_answer = false;
            if is_on {
                self.summary.num_notes_out += 1;
                if let Some(idx) = expected.notes.iter().position(|&n| n == (offset, channel, key)) {
                    expected.notes.swap_remove(idx);
                } else {
                    let routing = expected.routing_at(offset);
                    check!(
                        self,
                        !routing.is_bypassed && channel == routing.answer_channel,
                        "note-on of channel {channel} key {key} at {at} is no pass-through and no \
                         answer note ({routing:?})"
                    );
                    check!(
                        self,
                        self.quiet_until.is_none_or(|until| at >= until),
                        "an answer note-on of channel {channel} key {key} at {at}, within a second of \
                         a stop"
                    );
                    self.summary.num_answer_notes += 1;
                    is_answer = true;
                }
            }
            sent_notes.push(BlockNote { offset, key: (channel, key), is_on, is_answer });
        }
        check!(
            self,
            expected.notes.is_empty(),
            "notes not passed through at their sample: {:?}",
            expected.notes
        );
        check!(
            self,
            sent_midi == expected.midi,
            "controllers passed through (offset, bytes):\n{sent_midi:?}\ninstead of\n{:?}",
            expected.midi
        );
        self.summary.num_midi_passed += sent_midi.len();
        if let Some(released) = self.to_release.take() {
            let still: Vec<_> =
                released.iter().filter(|&&k| !sent_notes.iter().any(|n| n.key == k)).collect();
            check!(self, still.is_empty(), "after a reset these (channel, key) sound on: {still:?}");
        }
        self.check_holders(&expected.thru, &sent_notes, sounding_before);

        self.now += u64::from(len);
        self.summary.num_blocks += 1;
        self.summary.audio_secs += f64::from(len) / self.sample_rate_hz;
        if let Some(since) = self.paced_since {
            let due_secs = self.summary.audio_secs / REAL_TIME_SPEEDUP;
            if let Some(wait) = Duration::from_secs_f64(due_secs).checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if self.routing.is_bypassed {
            let unheld = self.sounding.unheld(&self.held);
            check!(self, unheld.is_empty(), "bypassed, yet notes the player does not hold sound: {unheld:?}");
        }
        if self.quiet_until.is_some_and(|until| self.now >= until) {
            self.quiet_until = None;
            let unheld = self.sounding.unheld(&self.held);
            check!(
                self,
                unheld.is_empty(),
                "a second after the stop, notes the player does not hold sound: {unheld:?}"
            );
        }
        if self.clock.mode == TransportMode::Playing {
            self.clock.pos_beats += f64::from(len) * self.clock.tempo_bpm / 60.0 / self.sample_rate_hz;
        }
    }

    /// Replays the block sample by sample, the pass-through's holds (`thru`: offset, key, holds)
    /// beside the notes sent, and checks the end of each sample: a key that sounds is held by
    /// the pass-through or by an answer note, and a key the pass-through holds has not fallen
    /// silent. `sounding` is what sounded before the block.
    fn check_holders(
        &mut self,
        thru: &[(u32, (u8, u8), bool)],
        sent: &[BlockNote],
        mut sounding: HashSet<(u8, u8)>,
    ) {
        let mut offsets: Vec<u32> = thru.iter().map(|t| t.0).chain(sent.iter().map(|n| n.offset)).collect();
        offsets.sort_unstable();
        offsets.dedup();
        let (mut thru_idx, mut sent_idx) = (0, 0);
        for offset in offsets {
            let mut keys = Vec::new();
            while let Some(&(_, key, holds)) = thru.get(thru_idx).filter(|t| t.0 == offset) {
                if holds {
                    self.thru_notes.insert(key);
                } else {
                    self.thru_notes.remove(&key);
                }
                keys.push(key);
                thru_idx += 1;
            }
            while let Some(note) = sent.get(sent_idx).filter(|n| n.offset == offset) {
                if note.is_on {
                    sounding.insert(note.key);
                    if note.is_answer {
                        self.answer_notes.insert(note.key);
                    }
                } else {
                    sounding.remove(&note.key);
                }
                keys.push(note.key);
                sent_idx += 1;
            }
            let at = self.now + u64::from(offset);
            for (channel, key) in keys {
                if sounding.contains(&(channel, key)) {
                    check!(
                        self,
                        self.thru_notes.contains(&(channel, key))
                            || self.answer_notes.contains(&(channel, key)),
                        "channel {channel} key {key} sounds at {at}, though the player let go of it and \
                         no answer played it"
                    );
                } else {
                    check!(
                        self,
                        !self.thru_notes.contains(&(channel, key)),
                        "channel {channel} key {key} fell silent at {at} while the player holds it"
                    );
                    self.answer_notes.remove(&(channel, key));
                }
            }
        }
    }

    /// Ends the scenario as a host ends a session: stops the transport (starting it first if it
    /// was not playing), lets go of every key and pedal, runs a second and more, then checks
    /// that nothing sounds, deactivates, and checks that the state survives saving and loading.
    fn finish(&mut self) {
        self.next_note_at = u64::MAX;
        self.next_controller_at = u64::MAX;
        self.next_param_at = u64::MAX;
        if self.clock.mode != TransportMode::Playing {
            self.clock.mode = TransportMode::Playing;
            self.note_stop();
            let len = self.block_len();
            let inputs = self.take_pending(self.now + u64::from(len));
            self.process(len, &inputs);
        }
        self.clock.mode = TransportMode::Stopped;
        self.note_stop();
        // Every scheduled note-off now, then the pedals up.
        for (at, _) in &mut self.pending {
            *at = self.now;
        }
        let mut pedals: Vec<u8> = self.pedals_down.drain().collect();
        pedals.sort_unstable();
        for channel in pedals {
            self.pending
                .push((self.now, Input::Midi { offset: 0, data: [0xb0 | channel, SUSTAIN_PEDAL_CC, 0] }));
        }
        let until = self.now + self.samples(1.0) + 1;
        while self.now < until {
            let len = self.block_len().min((until - self.now) as u32).max(1);
            let inputs = self.take_pending(self.now + u64::from(len));
            self.process(len, &inputs);
        }
        check!(self, self.pending.is_empty(), "inputs left unsent: {:?}", self.pending);
        let sounding = self.sounding.all();
        check!(self, sounding.is_empty(), "notes without their note-off at the end: {sounding:?}");
        let processor = self.processor.take().unwrap();
        self.plugin.deactivate(processor);

        let saved = self.plugin.save_state();
        let fresh = self.plugin.another();
        check!(self, fresh.load_state(&saved), "a fresh instance refused the saved state");
        let resaved = fresh.save_state();
        check!(
            self,
            resaved == saved,
            "the state changed through a fresh instance:\n{}\n{}",
            String::from_utf8_lossy(&saved),
            String::from_utf8_lossy(&resaved)
        );
        check!(self, self.plugin.load_state(&saved), "the instance refused its own state");
        let resaved = self.plugin.save_state();
        check!(
            self,
            resaved == saved,
            "the state changed through loading it back:\n{}\n{}",
            String::from_utf8_lossy(&saved),
            String::from_utf8_lossy(&resaved)
        );
    }
}

/// Sample rate of the targeted cases.
const CASE_RATE_HZ: f64 = 48_000.0;

/// Samples of a beat at 120 BPM and `CASE_RATE_HZ`.
const CASE_BEAT: u64 = 24_000;

/// A fresh instance rendering offline with a fixed seed and `settings`, active at 48 kHz.
fn case_plugin(settings: &[(&str, &str)]) -> (Plugin, Processor) {
    let mut plugin = Plugin::load();
    plugin.set(&[("Fresh Seed", "Off"), ("Seed", "7")]);
    plugin.set(settings);
    plugin.set_offline(true);
    let processor = plugin.activate(CASE_RATE_HZ, MAX_BLOCK_LEN);
    (plugin, processor)
}

/// Plays `inputs` (at samples from the start) until `end`, in blocks whose lengths cycle through
/// `block_lens`, with `transport` for the block starting at a sample. Returns what came out.
fn play_case(
    processor: &mut Processor,
    end: u64,
    block_lens: &[u32],
    inputs: &[(u64, Input)],
    transport: impl Fn(u64) -> Option<HostTransport>,
) -> Vec<Output> {
    let mut outputs = Vec::new();
    let mut now = 0;
    for &len in block_lens.iter().cycle() {
        if now >= end {
            break;
        }
        let len = len.min((end - now) as u32);
        let block_end = now + u64::from(len);
        let block_inputs: Vec<Input> = inputs
            .iter()
            .filter(|(at, _)| (now..block_end).contains(at))
            .map(|&(at, input)| input.at((at - now) as u32))
            .collect();
        let first_sample = processor.next_sample;
        for output in processor.process(len, transport(now).as_ref(), &block_inputs) {
            outputs.push(Output { sample: output.sample - first_sample + now, ..output });
        }
        now = block_end;
    }
    outputs
}

/// 4/4 at 120 BPM, playing from beat 0.
fn playing_from_zero(sample: u64) -> Option<HostTransport> {
    Some(HostTransport::common_time(true, 120.0, sample as f64 / CASE_BEAT as f64))
}

/// The notes of `channel` and `key`, as (sample, is_on).
fn notes_of(outputs: &[Output], channel: u8, key: u8) -> Vec<(u64, bool)> {
    outputs
        .iter()
        .filter_map(Output::note)
        .filter(|n| n.channel == channel && n.key == key)
        .map(|n| (n.sample, n.is_on))
        .collect()
}

/// Checks that on and off alternate for every channel and key, starting with on, and that
/// nothing sounds at the end.
fn assert_paired(outputs: &[Output]) {
    let mut sounding = Sounding::default();
    for note in outputs.iter().filter_map(Output::note) {
        sounding.note(note.is_on, note.channel, note.key, note.sample).unwrap();
    }
    assert!(sounding.notes.is_empty(), "stuck notes: {:?}", sounding.all());
}

/// The note-ons on `channel`, as samples.
fn note_ons_on(outputs: &[Output], channel: u8) -> Vec<u64> {
    outputs
        .iter()
        .filter_map(Output::note)
        .filter(|n| n.is_on && n.channel == channel)
        .map(|n| n.sample)
        .collect()
}

/// A CLAP note-on (velocity 0.8) or note-off.
fn clap_note(is_on: bool, channel: u8, key: u8, note_id: Option<u32>) -> Input {
    Input::Note { offset: 0, is_on, channel, key, velocity: if is_on { 0.8 } else { 0.0 }, note_id }
}

/// A MIDI message in the MIDI dialect.
fn midi(data: [u8; 3]) -> Input {
    Input::Midi { offset: 0, data }
}

#[test]
fn hosts_quirks_give_well_formed_notes_and_answers() {
    // (a) A key struck again before its note-off (overlapping clip notes): the second note-on
    // retriggers it, and only the last note-off ends it.
    let (mut plugin, mut processor) = case_plugin(&[("Trigger", "Manual")]);
    let inputs = [
        (100, clap_note(true, 0, 60, None)),
        (1000, clap_note(true, 0, 60, None)),
        (1500, clap_note(false, 0, 60, None)),
        (2000, clap_note(false, 0, 60, None)),
    ];
    let outputs = play_case(&mut processor, 4800, &[256], &inputs, playing_from_zero);
    assert_eq!(notes_of(&outputs, 0, 60), [(100, true), (1000, false), (1000, true), (2000, false)]);
    assert_eq!(outputs.len(), 4, "{outputs:?}");

    // (b) Each note sent as a CLAP event and as MIDI at the same sample is one note; it ends
    // with the last of its two note-offs.
    let inputs = [
        (300, clap_note(true, 2, 64, Some(7))),
        (300, midi([0x92, 64, 100])),
        (900, clap_note(false, 2, 64, Some(7))),
        (900, midi([0x82, 64, 0])),
        (1200, midi([0x92, 67, 90])),
        (1200, clap_note(true, 2, 67, None)),
        (1700, clap_note(false, 2, 67, None)),
        (1750, midi([0x92, 67, 0])),
    ];
    let outputs = play_case(&mut processor, 4800, &[256, 1], &inputs, playing_from_zero);
    assert_eq!(notes_of(&outputs, 2, 64), [(300, true), (900, false)]);
    assert_eq!(notes_of(&outputs, 2, 67), [(1200, true), (1750, false)]);
    assert_eq!(outputs.len(), 4, "{outputs:?}");
    plugin.deactivate(processor);

    // (c) A phrase played with the sustain pedal down ends a beat of silence after the pedal
    // lifts (9.5 + 1 beats), so the answer starts on the bar after that (12), not on bar 8 as
    // the keys alone would have it. The pedal passes through at its samples.
    let (mut plugin, mut processor) = case_plugin(&[
        ("Trigger", "Silence"),
        ("Silence", "1"),
        ("Answer Start", "Next Bar"),
        ("Answer Length", "2"),
        ("Output Channel", "2"),
    ]);
    let pedal_up_at = CASE_BEAT * 19 / 2;
    let mut inputs =
        vec![(0, midi([0xb0, SUSTAIN_PEDAL_CC, 127])), (pedal_up_at, midi([0xb0, SUSTAIN_PEDAL_CC, 0]))];
    for (beat, key) in [60u8, 62, 64, 65].into_iter().enumerate() {
        let at = beat as u64 * CASE_BEAT;
        inputs.push((at, clap_note(true, 0, key, None)));
        inputs.push((at + CASE_BEAT / 2, clap_note(false, 0, key, None)));
    }
    let outputs = play_case(&mut processor, 24 * CASE_BEAT, &[512], &inputs, playing_from_zero);
    let pedal: Vec<(u64, [u8; 3])> = outputs
        .iter()
        .filter_map(|o| match o.sent {
            Sent::Midi(data) => Some((o.sample, data)),
            _ => None,
        })
        .collect();
    assert_eq!(pedal, [(0, [0xb0, SUSTAIN_PEDAL_CC, 127]), (pedal_up_at, [0xb0, SUSTAIN_PEDAL_CC, 0])]);
    let answer = note_ons_on(&outputs, 1);
    assert!(!answer.is_empty(), "no answer: {outputs:?}");
    assert!(
        answer[0] >= 12 * CASE_BEAT,
        "the answer began at beat {} under the pedal",
        answer[0] as f64 / CASE_BEAT as f64
    );
    assert_eq!(
        notes_of(&outputs, 0, 60),
        [(0, true), (CASE_BEAT / 2, false)],
        "the keys pass through as played"
    );
    assert_paired(&outputs);
    plugin.deactivate(processor);

    // (d) A host that never sends a transport: the free clock (Free Tempo) times the phrase, the
    // answer comes after it on its one bar (8..12) and every note ends. One note comes in both
    // dialects; blocks of every size.
    let (mut plugin, mut processor) = case_plugin(&[
        ("Trigger", "Silence"),
        ("Silence", "1"),
        ("Answer Length", "1"),
        ("Output Channel", "2"),
        ("Free Tempo", "120"),
    ]);
    let mut inputs = Vec::new();
    for (beat, key) in [67u8, 65, 64, 62].into_iter().enumerate() {
        let at = beat as u64 * CASE_BEAT + 5;
        inputs.push((at, clap_note(true, 0, key, None)));
        inputs.push((at + CASE_BEAT / 2, clap_note(false, 0, key, None)));
    }
    inputs.push((CASE_BEAT + 5, midi([0x90, 65, 100])));
    inputs.push((CASE_BEAT * 3 / 2 + 5, midi([0x80, 65, 0])));
    let outputs = play_case(&mut processor, 16 * CASE_BEAT, &[1, 7, 64, 4096, 333, 2048], &inputs, |_| None);
    assert_eq!(notes_of(&outputs, 0, 65), [(CASE_BEAT + 5, true), (CASE_BEAT * 3 / 2 + 5, false)]);
    let answer = note_ons_on(&outputs, 1);
    assert!(!answer.is_empty(), "no answer without a transport: {outputs:?}");
    // One sample of rounding either way.
    assert!(
        answer.iter().all(|&at| at + 1 >= 8 * CASE_BEAT + 5 && at < 12 * CASE_BEAT + 6),
        "answer notes outside beats 8..12: {answer:?}"
    );
    assert_paired(&outputs);
    plugin.deactivate(processor);
}
