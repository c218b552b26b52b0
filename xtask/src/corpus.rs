//! `cargo xtask corpus-check`: the Erk tunes read from ABC by our reader and from abc2midi's MIDI
//! files by our MIDI reader must encode to the same symbols. `cargo xtask corpus-stats`: what a
//! folder of songs gives as training data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use music::corpus::{encode_all, Collection, ReadError};
use music::encode::{encode, quantize, symbols_to_string, DurationFilter, EncodeConfig};
use music::key::{shift_to_convention, KeySource};
use music::midi::{parse_midi, MelodyChoice};
use music::{abc, Melody, StepGrid, Symbol, Vocab};

/// The Erk tunebooks, in the order of the benchmark split.
const ERK_FILES: [&str; 4] = ["erk5", "erk10", "erk20", "erk30"];

/// Options of `cargo xtask corpus-check`.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// The shared corpus folder (holding `essen/` and `midi/essen-erk-abc2midi/`).
    #[arg(long, default_value = "../shared/corpus")]
    corpus: PathBuf,
    /// Steps per quarter note of the grid the two sides are compared on.
    #[arg(long, default_value_t = 12)]
    steps_per_quarter: u32,
    /// Print this many examples of each class of disagreement.
    #[arg(long, default_value_t = 3)]
    examples: usize,
}

/// How one tune's two readings compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Identical,
    /// The same, except for a rest after the last note that only the ABC text writes out.
    IdenticalButTrailingRest,
    AbcUnreadable,
    MidiUnreadable,
    MidiMissing,
    OffGrid,
    /// Same onsets and lengths, some pitch differs.
    PitchesDiffer,
    /// The MIDI side is the ABC side played more than once or in another order (repeats).
    LengthDiffers,
    /// Same length, some onset or note length differs.
    RhythmDiffers,
}

impl Verdict {
    fn describe(self) -> &'static str {
        match self {
            Verdict::Identical => "identical",
            Verdict::IdenticalButTrailingRest => {
                "identical but for a trailing rest (MIDI has no rests after the last note)"
            }
            Verdict::AbcUnreadable => "ABC tune not readable",
            Verdict::MidiUnreadable => "MIDI file not readable",
            Verdict::MidiMissing => "no MIDI file for this tune",
            Verdict::OffGrid => "off the comparison grid",
            Verdict::PitchesDiffer => "same rhythm, some pitch differs",
            Verdict::LengthDiffers => "different length",
            Verdict::RhythmDiffers => "same length, some onset or duration differs",
        }
    }
}

fn compare(abc_side: &[Symbol], midi_side: &[Symbol]) -> Verdict {
    if abc_side == midi_side {
        return Verdict::Identical;
    }
    let trimmed = trim_trailing_rest(abc_side);
    if trimmed == trim_trailing_rest(midi_side) {
        return Verdict::IdenticalButTrailingRest;
    }
    if trimmed.len() != trim_trailing_rest(midi_side).len() {
        return Verdict::LengthDiffers;
    }
    let same_rhythm = trimmed
        .iter()
        .zip(trim_trailing_rest(midi_side))
        .all(|(a, b)| matches!((a, b), (Symbol::Pitch(_), Symbol::Pitch(_))) || a == b);
    if same_rhythm {
        Verdict::PitchesDiffer
    } else {
        Verdict::RhythmDiffers
    }
}

fn trim_trailing_rest(symbols: &[Symbol]) -> &[Symbol] {
    match symbols.iter().rposition(|s| matches!(s, Symbol::Pitch(_))) {
        Some(last_pitch) => {
            let end = symbols[last_pitch + 1..]
                .iter()
                .position(|s| *s != Symbol::Hold)
                .map_or(symbols.len(), |offset| last_pitch + 1 + offset);
            &symbols[..end]
        }
        None => &[],
    }
}

pub fn check(args: CheckArgs) -> Result<()> {
    let grid = StepGrid { steps_per_quarter: args.steps_per_quarter };
    let cfg = EncodeConfig { grid, ..EncodeConfig::default() };
    let midi_dir = args.corpus.join("midi/essen-erk-abc2midi");
    let mut verdicts: BTreeMap<Verdict, Vec<String>> = BTreeMap::new();
    let mut num_tunes = 0;
    for name in ERK_FILES {
        let abc_path = args.corpus.join("essen").join(format!("{name}.abc"));
        let book =
            abc::read_tunebook(&abc_path).with_context(|| format!("reading {}", abc_path.display()))?;
        for error in &book.errors {
            num_tunes += 1;
            verdicts.entry(Verdict::AbcUnreadable).or_default().push(error.to_string());
        }
        for tune in &book.tunes {
            num_tunes += 1;
            let number = tune.source.number.unwrap_or(0);
            let midi_path = midi_dir.join(format!("{name}-{number:04}.mid"));
            let label = format!("{name}.abc X:{number}");
            let (verdict, detail) = compare_tune(tune, &midi_path, &cfg);
            verdicts.entry(verdict).or_default().push(format!("{label}{detail}"));
        }
    }
    let num_midi_files = std::fs::read_dir(&midi_dir)
        .with_context(|| format!("reading {}", midi_dir.display()))?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "mid")))
        .count();

    println!(
        "Erk tunes: {num_tunes} in ABC; {num_midi_files} abc2midi MIDI files; grid {} steps per quarter",
        grid.steps_per_quarter
    );
    for (verdict, tunes) in &verdicts {
        println!("{:>6}  {}", tunes.len(), verdict.describe());
        if !matches!(verdict, Verdict::Identical | Verdict::IdenticalButTrailingRest) {
            for example in tunes.iter().take(args.examples) {
                println!("          e.g. {example}");
            }
        }
    }
    let num_agreeing: usize = [Verdict::Identical, Verdict::IdenticalButTrailingRest]
        .iter()
        .map(|v| verdicts.get(v).map_or(0, Vec::len))
        .sum();
    println!(
        "agree: {num_agreeing} of {num_tunes} ({:.1}%)",
        100.0 * num_agreeing as f64 / num_tunes.max(1) as f64
    );
    Ok(())
}

/// Compares one tune with its MIDI file: the verdict and, for a disagreement, what differs.
fn compare_tune(tune: &Melody, midi_path: &Path, cfg: &EncodeConfig) -> (Verdict, String) {
    match try_compare_tune(tune, midi_path, cfg) {
        Ok(result) => result,
        Err(result) => result,
    }
}

fn try_compare_tune(
    tune: &Melody,
    midi_path: &Path,
    cfg: &EncodeConfig,
) -> Result<(Verdict, String), (Verdict, String)> {
    let bytes = std::fs::read(midi_path).map_err(|e| (Verdict::MidiMissing, format!(": {e}")))?;
    let melodies = parse_midi(&bytes, &midi_path.display().to_string(), MelodyChoice::MainTrack)
        .map_err(|e| (Verdict::MidiUnreadable, format!(": {e}")))?;
    let midi_melody = melodies.first().ok_or((Verdict::MidiUnreadable, ": no melody".to_string()))?;
    let abc_symbols = encode(tune, cfg).map_err(|e| (Verdict::OffGrid, format!(": ABC side: {e}")))?;
    // abc2midi starts every note a tick late; snap its times to the grid before comparing.
    let midi_symbols = encode(&quantize(midi_melody, cfg.grid), cfg)
        .map_err(|e| (Verdict::OffGrid, format!(": MIDI side: {e}")))?;
    let verdict = compare(&abc_symbols, &midi_symbols);
    let detail = match verdict {
        Verdict::Identical | Verdict::IdenticalButTrailingRest => String::new(),
        _ => {
            let at = abc_symbols.iter().zip(&midi_symbols).position(|(a, b)| a != b).unwrap_or(0);
            let window = |s: &[Symbol]| symbols_to_string(&s[at.saturating_sub(4)..(at + 12).min(s.len())]);
            format!(
                ": {} vs {} symbols; first difference at step {at}: abc [{}] midi [{}]",
                abc_symbols.len(),
                midi_symbols.len(),
                window(&abc_symbols),
                window(&midi_symbols)
            )
        }
    };
    Ok((verdict, detail))
}

/// Options of `cargo xtask corpus-stats`.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// Folders or files of `.abc` and `.mid` songs (searched recursively).
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Steps per quarter note: 4 (sixteenths) or 12 (sixteenths and triplets).
    #[arg(long, default_value_t = 4)]
    steps_per_quarter: u32,
    /// Keep only the recipe's note lengths (1/4, 1/2, 3/4, 1, 3/2, 2, 3, 4 quarters).
    #[arg(long)]
    recipe_durations: bool,
    /// Move each song to the key convention (C major / A minor) before encoding.
    #[arg(long)]
    transpose: bool,
    /// From MIDI files with several tracks, take every track as a melody, not only the main one.
    #[arg(long)]
    every_track: bool,
    /// Print each read error, not only their count.
    #[arg(long)]
    verbose: bool,
}

pub fn stats(args: StatsArgs) -> Result<()> {
    let choice = if args.every_track { MelodyChoice::EveryTrack } else { MelodyChoice::MainTrack };
    for path in &args.data {
        anyhow::ensure!(path.exists(), "{}: no such file or folder", path.display());
    }
    let mut collection = Collection::read(&args.data, choice);
    let grid = StepGrid { steps_per_quarter: args.steps_per_quarter };
    collection.quantize_midi(grid);
    let cfg = EncodeConfig {
        grid,
        durations: if args.recipe_durations { DurationFilter::recipe() } else { DurationFilter::OnGrid },
        ..EncodeConfig::default()
    };
    let encoded = encode_all(&collection.melodies, &cfg, |m| {
        if args.transpose {
            shift_to_convention(m, KeySource::DeclaredThenEstimated)
        } else {
            Some(0)
        }
    });

    let mut errors_by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for error in &collection.errors {
        let kind = match error {
            ReadError::Io { .. } => "unreadable file",
            ReadError::Abc(_) => "ABC tune that did not parse",
            ReadError::Midi(_) => "MIDI file that did not parse",
        };
        *errors_by_kind.entry(kind).or_default() += 1;
        if args.verbose {
            eprintln!("{error}");
        }
    }
    let num_symbols: usize = encoded.songs.iter().map(|(_, s)| s.len()).sum();
    let vocab = Vocab::from_symbols(encoded.songs.iter().flat_map(|(_, s)| s.iter().copied()));
    let num_holds: usize = encoded.songs.iter().flat_map(|(_, s)| s).filter(|s| **s == Symbol::Hold).count();

    println!(
        "files read:      {} ({} other files skipped)",
        collection.num_files, collection.num_skipped_files
    );
    println!("tunes read:      {}", collection.melodies.len());
    for (kind, count) in &errors_by_kind {
        println!("  not read:      {count} ({kind})");
    }
    println!("tunes kept:      {}", encoded.songs.len());
    for (reason, count) in &encoded.dropped {
        println!("  dropped:       {count} ({reason})");
    }
    println!(
        "symbols:         {num_symbols} in kept songs ({:.1}% hold)",
        100.0 * num_holds as f64 / num_symbols.max(1) as f64
    );
    println!("vocabulary:      {} symbols: {}", vocab.len(), symbols_to_string(vocab.symbols()));
    if let Some((lowest, highest)) = vocab.pitch_range() {
        println!("pitch range:     {lowest}..={highest}");
    }
    Ok(())
}
