//! `cargo xtask generate`: continues a primer (a MIDI or ABC file, or symbols) with a model,
//! with the plugin's sampling, prints the symbols and writes MIDI.
//! Runs on: offline (a terminal).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use model::chords::{is_chord_config, ChordGenerator, ChordModel};
use model::io::CONFIG_FILE;
use model::{LoadedModel, PhraseContinuation, PitchClassSet, PitchRules, SamplingSettings};
use music::encode::{decode, parse_symbols, symbols_to_string};
use music::midi::{parse_midi, read_midi_notes, write_midi, MelodyChoice};
use music::{abc, Key, Melody, Meter, Mode, PianoRoll};

/// Continue a primer melody (or, with --chords, a polyphonic MIDI file) with a model and write
/// MIDI.
///
/// The same model, primer, settings and seed always give the same notes, as in the plugin.
/// Example: cargo xtask generate --primer "60 _ 62 _ 64 _ _ _" --bars 4 --seed 7 --out answer.mid
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Where the network runs: cpu, cuda or metal (the last two need the build feature of that
    /// name).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model directory (default: the model built into the plugin).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Leave the model's tune memory out: the network alone.
    #[arg(long)]
    no_memory: bool,
    /// The primer: a .mid or .abc file, or symbols such as "60 _ 62 _ 64 _ _ _" (a pitch starts
    /// a note, `r` a rest, `_` holds for a step). Empty: a fresh song.
    #[arg(long, default_value = "")]
    primer: String,
    /// Which tune of an ABC tunebook, or melody of a MIDI file, is the primer (0-based).
    #[arg(long, default_value_t = 0)]
    tune: usize,
    /// The primer's time signature, such as 3/4 or 6/8. Default: the file's, or 4/4 for
    /// symbols.
    #[arg(long)]
    meter: Option<String>,
    /// Beats before the primer's first bar line (a pickup). Default: the file's, or 0 for
    /// symbols.
    #[arg(long)]
    pickup: Option<f64>,
    /// Steps to generate (one step is a sixteenth on the default grid).
    #[arg(long, conflicts_with = "bars")]
    steps: Option<usize>,
    /// Bars to generate, in the primer's meter (4/4 when it has none). Default: 4 bars.
    #[arg(long)]
    bars: Option<usize>,
    /// Sampling temperature: 1 as trained, toward 0 tamer (0: always the likeliest), above 1
    /// wilder.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Choose among the k likeliest symbols only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Choose among the likeliest symbols that make up this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Allow only the notes of this scale, such as "G", "E minor", "Bb dorian".
    #[arg(long)]
    scale: Option<String>,
    /// Lowest pitch allowed (MIDI number).
    #[arg(long, default_value_t = 0)]
    lowest: u8,
    /// Highest pitch allowed (MIDI number).
    #[arg(long, default_value_t = 127)]
    highest: u8,
    /// Fill the whole length: never end the song early.
    #[arg(long)]
    no_end: bool,
    /// MIDI file to write: the primer, then the continuation.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Tempo of the MIDI file in quarter notes per minute, when the primer gives none.
    #[arg(long, default_value_t = 100.0)]
    tempo: f64,
    /// Continue with chords: the built-in chord model, or the chord model of --model (a chord
    /// model directory is recognised by itself). The primer is a .mid file, every voice heard.
    #[arg(long)]
    chords: bool,
    /// With chords: most notes sounding at once.
    #[arg(long, default_value_t = 6)]
    max_voices: usize,
}

/// The sampling settings the flags describe.
fn sampling(args: &GenerateArgs) -> Result<SamplingSettings> {
    if args.lowest > args.highest {
        bail!("--lowest {} is above --highest {}: no pitch would be allowed", args.lowest, args.highest);
    }
    Ok(SamplingSettings {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        pitches: PitchRules {
            lowest_pitch: args.lowest,
            highest_pitch: args.highest,
            pitch_classes: match &args.scale {
                Some(text) => PitchClassSet::of_key(parse_key(text)?),
                None => PitchClassSet::ALL,
            },
        },
        may_end: !args.no_end,
    })
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Values that would otherwise give nothing, or something other than asked, without a word.
    if args.steps == Some(0) || args.bars == Some(0) {
        bail!("--steps or --bars 0: nothing to generate (ask for 1 or more)");
    }
    if !(args.tempo.is_finite() && args.tempo > 0.0) {
        bail!("--tempo {}: expected quarter notes per minute, more than 0", args.tempo);
    }
    let is_chord_dir = args
        .model
        .as_ref()
        .is_some_and(|dir| std::fs::read(dir.join(CONFIG_FILE)).is_ok_and(|bytes| is_chord_config(&bytes)));
    if args.chords || is_chord_dir {
        return run_chords(&args);
    }
    let model = Arc::new(crate::load_model(args.model.as_deref(), !args.no_memory, &args.device)?);
    let mut primer = read_primer(&args.primer, args.tune, &model)?;
    if let Some(text) = &args.meter {
        primer.meter = Some(parse_meter(text)?);
    }
    if let Some(pickup) = args.pickup {
        if !(pickup.is_finite() && pickup >= 0.0) {
            bail!("--pickup {pickup}: expected beats, 0 or more");
        }
        primer.pickup_beats = pickup;
    }
    let grid = model.config.grid;
    let num_steps = match (args.steps, args.bars) {
        (Some(steps), _) => steps,
        (None, bars) => {
            let bar_beats = primer.meter.unwrap_or(Meter::COMMON).bar_beats();
            grid.nearest_steps(bar_beats * bars.unwrap_or(4) as f64) as usize
        }
    };
    let settings = sampling(&args)?;

    let mut phrase = PhraseContinuation::start(Arc::clone(&model), &primer, num_steps, args.seed)?;
    while phrase.next_symbol(&settings)?.is_some() {}
    println!("model: {}", model.origin);
    println!("moved by {} semitones into the model's key and range", phrase.shift_semitones());
    println!("{}", symbols_to_string(phrase.symbols()));

    if let Some(out) = &args.out {
        let mut song = primer.clone();
        let start_beats = phrase.start_beats();
        let continuation = phrase.melody();
        song.notes.retain(|n| n.start_beats < start_beats);
        for note in &mut song.notes {
            note.len_beats = note.len_beats.min(start_beats - note.start_beats);
        }
        song.notes.extend(continuation.notes.iter().map(|n| {
            let mut n = *n;
            n.start_beats += start_beats;
            n
        }));
        song.end_beats = start_beats + continuation.end_beats;
        let tempo = primer.tempo_qpm.unwrap_or(args.tempo);
        std::fs::write(out, write_midi(&song, tempo))
            .with_context(|| format!("writing {}", out.display()))?;
        println!(
            "wrote {} ({} primer notes, {} new)",
            out.display(),
            primer.notes.len(),
            continuation.notes.len()
        );
    }
    Ok(())
}

/// `generate` with a chord model: the primer's every voice, continued a frame at a time.
fn run_chords(args: &GenerateArgs) -> Result<()> {
    if args.device != "cpu" {
        bail!("chord models run on the CPU only (their step is the CPU's int8 kernel); leave out --device");
    }
    let model = Arc::new(match &args.model {
        Some(dir) => ChordModel::load_dir(dir),
        None => ChordModel::builtin(),
    }?);
    let grid = model.config.grid;
    let (notes, meter, tempo) = if args.primer.is_empty() {
        (Vec::new(), None, None)
    } else {
        let path = Path::new(&args.primer);
        let notes = read_midi_notes(path)
            .with_context(|| format!("reading {} (a chord primer is a .mid file)", args.primer))?;
        let first =
            parse_midi(&std::fs::read(path)?, &args.primer, MelodyChoice::MainTrack)?.into_iter().next();
        (notes, first.as_ref().and_then(|m| m.meter), first.and_then(|m| m.tempo_qpm))
    };
    let meter = match &args.meter {
        Some(text) => parse_meter(text)?,
        None => meter.unwrap_or(Meter::COMMON),
    };
    // The primer runs to the bar line at or after its last note's end.
    let end_beats = notes.iter().map(|n| n.end_beats()).fold(0.0, f64::max);
    let primer_bars = (end_beats / meter.bar_beats() - 1e-9).ceil().max(0.0);
    let primer_steps = grid.nearest_steps(primer_bars * meter.bar_beats()) as usize;
    let num_steps = match (args.steps, args.bars) {
        (Some(steps), _) => steps,
        (None, bars) => grid.nearest_steps(meter.bar_beats() * bars.unwrap_or(4) as f64) as usize,
    };
    let settings = sampling(args)?;
    let mut generator = ChordGenerator::new(Arc::clone(&model), args.seed)?;
    for &frame in &PianoRoll::from_notes(&notes, grid, Some(primer_steps)).frames {
        generator.feed_frame(frame)?;
    }
    let frames = (0..num_steps)
        .map(|_| generator.next_frame(&settings, args.max_voices))
        .collect::<Result<Vec<_>, _>>()?;
    let continuation = PianoRoll { frames }.to_notes(grid, music::note::DEFAULT_VELOCITY);
    let start_beats = primer_steps as f64 * grid.step_beats();
    println!("model: {}", model.origin);
    println!(
        "{} primer notes over {} bars, then {} notes in {} frames of {} a quarter",
        notes.len(),
        primer_bars,
        continuation.len(),
        num_steps,
        grid.steps_per_quarter
    );
    if let Some(out) = &args.out {
        let mut song = Melody::from_notes(Vec::new());
        song.notes = notes;
        song.notes.extend(
            continuation.iter().map(|n| music::Note { start_beats: n.start_beats + start_beats, ..*n }),
        );
        song.end_beats = start_beats + num_steps as f64 * grid.step_beats();
        song.meter = Some(meter);
        std::fs::write(out, write_midi(&song, tempo.unwrap_or(args.tempo)))
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The primer from a file or from symbol text (on the model's grid).
fn read_primer(text: &str, tune: usize, model: &LoadedModel) -> Result<Melody> {
    let path = Path::new(text);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if matches!(ext.as_str(), "mid" | "midi") {
        let bytes = std::fs::read(path).with_context(|| format!("reading {text}"))?;
        let melodies =
            parse_midi(&bytes, text, MelodyChoice::EveryTrack).with_context(|| format!("reading {text}"))?;
        let count = melodies.len();
        return melodies
            .into_iter()
            .nth(tune)
            .with_context(|| format!("{text} has {count} melodies, no #{tune}"));
    }
    if ext == "abc" {
        let book = abc::read_tunebook(path).with_context(|| format!("reading {text}"))?;
        let count = book.tunes.len();
        return book
            .tunes
            .into_iter()
            .nth(tune)
            .with_context(|| format!("{text} has {count} readable tunes, no #{tune}"));
    }
    let symbols = parse_symbols(text).context("the primer is neither a .mid/.abc file nor symbols")?;
    let mut melody = decode(&symbols, model.config.grid);
    melody.meter = Some(Meter::COMMON);
    Ok(melody)
}

/// "6/8" → the meter.
fn parse_meter(text: &str) -> Result<Meter> {
    let parsed = text
        .split_once('/')
        .and_then(|(n, d)| Some((n.trim().parse::<u8>().ok()?, d.trim().parse::<u8>().ok()?)));
    match parsed {
        Some((numerator, denominator)) if numerator > 0 && [1, 2, 4, 8, 16, 32].contains(&denominator) => {
            Ok(Meter { numerator, denominator })
        }
        _ => bail!("--meter {text}: expected a time signature such as 3/4 or 6/8"),
    }
}

/// "G", "F# minor", "Bb dorian" → the key.
fn parse_key(text: &str) -> Result<Key> {
    let mut words = text.split_whitespace();
    let tonic = words.next().context("--scale: empty")?;
    let mut chars = tonic.chars();
    let letter = chars.next().context("--scale: empty")?.to_ascii_uppercase();
    let mut pc: i32 = match letter {
        'C' => 0,
        'D' => 2,
        'E' => 4,
        'F' => 5,
        'G' => 7,
        'A' => 9,
        'B' => 11,
        _ => bail!("--scale {text}: the tonic must be a letter A-G"),
    };
    for accidental in chars {
        pc += match accidental {
            '#' => 1,
            'b' => -1,
            _ => bail!("--scale {text}: expected # or b after the letter"),
        };
    }
    let mode = match words.next().map(str::to_ascii_lowercase).as_deref() {
        None | Some("major") | Some("ionian") => Mode::Major,
        Some("minor") | Some("aeolian") => Mode::Minor,
        Some("dorian") => Mode::Dorian,
        Some("phrygian") => Mode::Phrygian,
        Some("lydian") => Mode::Lydian,
        Some("mixolydian") => Mode::Mixolydian,
        Some("locrian") => Mode::Locrian,
        Some(other) => bail!("--scale {text}: unknown mode {other}"),
    };
    Ok(Key::from_tonic(pc.rem_euclid(12) as u8, mode))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        generate: GenerateArgs,
    }

    #[test]
    fn options_that_would_give_nothing_are_refused_with_a_reason() {
        for (options, refusal) in [
            (&["--bars", "0"][..], "nothing to generate"),
            (&["--steps", "0"], "nothing to generate"),
            (&["--tempo", "0"], "--tempo 0"),
            (&["--lowest", "100", "--highest", "50"], "no pitch would be allowed"),
            (&["--chords", "--lowest", "90", "--highest", "80"], "no pitch would be allowed"),
        ] {
            let cli = Cli::parse_from(std::iter::once("generate").chain(options.iter().copied()));
            let err = run(cli.generate).expect_err(&format!("{options:?} is refused"));
            assert!(err.to_string().contains(refusal), "{options:?}: {err}");
        }
    }

    #[test]
    fn keys_from_text() {
        assert_eq!(parse_key("G").unwrap(), Key::from_tonic(7, Mode::Major));
        assert_eq!(parse_key("f# minor").unwrap(), Key::from_tonic(6, Mode::Minor));
        assert_eq!(parse_key("Bb Dorian").unwrap(), Key::from_tonic(10, Mode::Dorian));
        assert!(parse_key("H").is_err());
        assert!(parse_key("C blues").is_err());
    }

    #[test]
    fn meters_from_text() {
        assert_eq!(parse_meter("6/8").unwrap(), Meter { numerator: 6, denominator: 8 });
        assert_eq!(parse_meter(" 3 / 4 ").unwrap(), Meter { numerator: 3, denominator: 4 });
        for junk in ["6", "0/4", "3/5", "x/4", "4/4/4"] {
            assert!(parse_meter(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn symbol_primers_use_the_model_grid() {
        let model = LoadedModel::builtin().unwrap();
        let m = read_primer("60 _ 62 _ 64 _ _ _", 0, &model).unwrap();
        assert_eq!(m.notes.len(), 3);
        assert_eq!(m.end_beats, 2.0);
        assert!(read_primer("60 x", 0, &model).is_err());
    }
}
