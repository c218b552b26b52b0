//! ABC notation reader: tunebooks in, one monophonic `Melody` per tune.
//! Runs on: any non-audio thread.
//!
//! Hand-written for the subset of ABC 2.1 that folk tunebooks use. Each tune goes through three
//! stages:
//! 1. **Reading** (`TuneReader`): header fields, then the body, one line at a time, into a flat
//!    list of `Event`s in written order. Keys, accidentals (which last to the bar line, for the
//!    same letter in every octave unless `%%propagate-accidentals` says otherwise), unit lengths, broken rhythm, tuplets and chords (top note kept)
//!    are resolved here, so every note event already has its MIDI pitch and its length as an
//!    exact fraction of a whole note.
//! 2. **Expansion** (`expand_repeats`): repeats, first/second endings and the `P:` play order
//!    are unrolled into the order the tune is played.
//! 3. **Timing** (`build_melody`): tied notes of one pitch merge into one note (also across bar
//!    lines and repeat boundaries) and exact times become beats.
//!
//! Deliberate simplifications: grace notes take no time, decorations (rolls, trills) are not
//! played out, only the first voice and the first part of a voice overlay (`&`) are kept, and
//! chords keep their highest note.

use std::path::Path;

use super::key::{Key, Mode};
use super::note::{Melody, Meter, Note, Source};

/// A tune the reader could not read: where it is, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: tune X:{number} (line {line}): {message}", number = display_number(*.number))]
pub struct AbcError {
    /// The tunebook's path as given to the reader.
    pub path: String,
    /// The tune's `X:` number, if its header was read.
    pub number: Option<u32>,
    /// 1-based line of the tunebook where the problem is.
    pub line: usize,
    /// What is wrong, in words.
    pub message: String,
}

fn display_number(number: Option<u32>) -> String {
    number.map_or_else(|| "?".to_string(), |n| n.to_string())
}

/// What a tunebook gave: the tunes that parsed, and an error for each one that did not.
#[derive(Debug, Default)]
pub struct TuneBook {
    /// Tunes in file order.
    pub tunes: Vec<Melody>,
    /// One entry per tune that could not be read; the others are unaffected.
    pub errors: Vec<AbcError>,
}

/// Parses ABC text holding one or more tunes. `path` is used in sources and errors only.
///
/// A tune starts at an `X:` line and ends at the next blank line or `X:` line; text outside
/// tunes (the file header, free text) is ignored. Never panics, whatever the input.
pub fn parse_tunebook(text: &str, path: &str) -> TuneBook {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = split_lines(text);
    let mut book = TuneBook::default();
    let mut index = 0;
    let mut line_idx = 0;
    while line_idx < lines.len() {
        if field_of(lines[line_idx]) != Some(b'X') {
            line_idx += 1;
            continue;
        }
        let start_idx = line_idx;
        line_idx += 1;
        while line_idx < lines.len()
            && !lines[line_idx].trim().is_empty()
            && field_of(lines[line_idx]) != Some(b'X')
        {
            line_idx += 1;
        }
        let number = parse_reference_number(&lines[start_idx][2..]);
        match read_tune(&lines[start_idx..line_idx], start_idx + 1) {
            Ok((mut melody, title)) => {
                melody.source = Source { path: path.to_string(), index, number, title };
                book.tunes.push(melody);
            }
            Err(failure) => book.errors.push(AbcError {
                path: path.to_string(),
                number,
                line: failure.line,
                message: failure.problem.to_string(),
            }),
        }
        index += 1;
    }
    book
}

/// Reads and parses an ABC file. Only I/O fails here; tunes that do not parse are in `errors`.
pub fn read_tunebook(path: &Path) -> std::io::Result<TuneBook> {
    let bytes = std::fs::read(path)?;
    // Some tunebooks are Latin-1; decode lossily rather than refuse the whole book.
    let text = String::from_utf8_lossy(&bytes);
    Ok(parse_tunebook(&text, &path.display().to_string()))
}

/// Why a tune could not be read. Becomes `AbcError::message`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum Problem {
    #[error("the header has no K: field, so the tune has no body")]
    NoKeyField,
    #[error("the tune has no notes")]
    NoNotes,
    #[error("unexpected {0:?} in the tune body")]
    UnexpectedChar(char),
    #[error("{what} is not closed on its line")]
    Unterminated { what: &'static str },
    #[error("note length {text:?} is zero or too large")]
    BadLength { text: String },
    #[error("pitch {pitch} is outside MIDI 0..=127")]
    PitchOutOfRange { pitch: i32 },
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("unknown mode {0:?}")]
    UnknownMode(String),
    #[error("unreadable meter {0:?}")]
    BadMeter(String),
    #[error("unreadable unit note length {0:?}")]
    BadUnitLength(String),
    #[error("an accidental with no note after it")]
    DanglingAccidental,
    #[error("microtonal accidental at {0:?}")]
    Microtone(String),
    #[error("unreadable tuplet {0:?}")]
    BadTuplet(String),
    #[error("unreadable ending number {0:?}")]
    BadEnding(String),
    #[error("broken rhythm {0:?} with no note before it")]
    BrokenRhythmWithoutNote(String),
    #[error("a chord with no notes")]
    EmptyChord,
    #[error("durations too fine to add up exactly")]
    LengthOverflow,
    #[error("repeats expand to more than {limit} events")]
    TooLong { limit: usize },
}

/// A problem and the 1-based line it was found on.
#[derive(Debug)]
struct Failure {
    line: usize,
    problem: Problem,
}

/// Splits at `\n`, `\r\n` and lone `\r` (old Mac tunebooks).
fn split_lines(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push(&text[start..i]);
                start = i + 1;
            }
            b'\r' => {
                lines.push(&text[start..i]);
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < bytes.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// The field letter of a line such as `K:G` (also `+:`, the field continuation), if it is one.
fn field_of(line: &str) -> Option<u8> {
    match line.as_bytes() {
        [letter, b':', ..] if letter.is_ascii_alphabetic() || *letter == b'+' => Some(*letter),
        _ => None,
    }
}

fn parse_reference_number(value: &str) -> Option<u32> {
    strip_comment(value).trim().parse().ok()
}

fn strip_comment(value: &str) -> &str {
    value.find('%').map_or(value, |at| &value[..at])
}

/// An exact non-negative fraction: note lengths in whole notes, and times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ratio {
    num: u64,
    den: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Ratio {
    const ZERO: Ratio = Ratio { num: 0, den: 1 };
    const ONE: Ratio = Ratio { num: 1, den: 1 };

    /// `num/den` in lowest terms, or `None` for a zero denominator.
    fn new(num: u64, den: u64) -> Option<Ratio> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        Some(Ratio { num: num / g, den: den / g })
    }

    fn mul(self, other: Ratio) -> Result<Ratio, Problem> {
        let g1 = gcd(self.num, other.den).max(1);
        let g2 = gcd(other.num, self.den).max(1);
        let num = (self.num / g1).checked_mul(other.num / g2);
        let den = (self.den / g2).checked_mul(other.den / g1);
        match (num, den) {
            (Some(num), Some(den)) => Ratio::new(num, den).ok_or(Problem::LengthOverflow),
            _ => Err(Problem::LengthOverflow),
        }
    }

    fn add(self, other: Ratio) -> Result<Ratio, Problem> {
        let g = gcd(self.den, other.den).max(1);
        let den = (self.den / g).checked_mul(other.den).ok_or(Problem::LengthOverflow)?;
        let a = self.num.checked_mul(den / self.den).ok_or(Problem::LengthOverflow)?;
        let b = other.num.checked_mul(den / other.den).ok_or(Problem::LengthOverflow)?;
        Ratio::new(a.checked_add(b).ok_or(Problem::LengthOverflow)?, den).ok_or(Problem::LengthOverflow)
    }

    fn is_zero(self) -> bool {
        self.num == 0
    }

    fn less_than(self, other: Ratio) -> bool {
        (self.num as u128) * (other.den as u128) < (other.num as u128) * (self.den as u128)
    }

    /// This many whole notes, in beats (quarter notes).
    fn to_beats(self) -> f64 {
        self.num as f64 * 4.0 / self.den as f64
    }
}

/// One element of a tune body in written order, with keys and lengths already applied.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    /// A note (or a chord's top note); `len` in whole notes; `is_tied` when a tie follows it.
    Note { pitch: u8, len: Ratio, is_tied: bool },
    /// A rest (`z`, `x`, `Z`), in whole notes.
    Rest { len: Ratio },
    /// A bar line of any kind.
    Bar { ends_repeat: bool, starts_repeat: bool, is_double: bool },
    /// The start of a numbered ending (`[1`, `|2`, `[1,3`): bit n set plays it on pass n.
    Ending { passes: u32 },
    /// A `P:` part label in the body.
    Part(String),
}

/// An element of the tune in played order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Played {
    Note { pitch: u8, len: Ratio, is_tied: bool },
    Rest { len: Ratio },
    Bar,
}

/// Tunes longer than this many elements after expansion are refused (a guard against inputs
/// crafted to explode, far above any real tune).
const MAX_PLAYED_EVENTS: usize = 1 << 20;
/// Largest number accepted in a length, a tuplet or a multi-measure rest.
const MAX_NUMBER: u64 = 4096;
/// Highest ending number (`[31`); pass numbers are bits of a `u32`.
const MAX_ENDING: u64 = 31;

/// Semitones above C of the letters C D E F G A B.
const LETTER_SEMITONES: [i32; 7] = [0, 2, 4, 5, 7, 9, 11];
/// Letter indices (C = 0) in the order sharps are added to a key signature: F C G D A E B.
const SHARP_ORDER: [usize; 7] = [3, 0, 4, 1, 5, 2, 6];

fn letter_index(letter: u8) -> Option<usize> {
    match letter.to_ascii_uppercase() {
        b'C' => Some(0),
        b'D' => Some(1),
        b'E' => Some(2),
        b'F' => Some(3),
        b'G' => Some(4),
        b'A' => Some(5),
        b'B' => Some(6),
        _ => None,
    }
}

/// A key as `K:` declares it: the key for `Melody::key` and the alteration of each letter.
#[derive(Clone, Copy, Debug, PartialEq)]
struct KeySpec {
    key: Option<Key>,
    /// Semitones added to each letter, C = 0 .. B = 6.
    alterations: [i8; 7],
}

impl KeySpec {
    const NONE: KeySpec = KeySpec { key: None, alterations: [0; 7] };
}

/// The signature's alteration of each letter for `fifths` sharps (positive) or flats.
fn signature_alterations(fifths: i32) -> [i8; 7] {
    let mut alterations = [0i8; 7];
    for (pos, &letter) in SHARP_ORDER.iter().enumerate() {
        let pos = pos as i32;
        if fifths > pos {
            alterations[letter] = ((fifths - pos - 1) / 7 + 1) as i8;
        }
        // Flats run the same order backwards: B E A D G C F.
        let flat_pos = 6 - pos;
        if -fifths > flat_pos {
            alterations[letter] = -(((-fifths - flat_pos - 1) / 7 + 1) as i8);
        }
    }
    alterations
}

fn parse_mode(word: &str) -> Option<Mode> {
    let lower = word.to_ascii_lowercase();
    if lower.is_empty() {
        return Some(Mode::Major);
    }
    if lower == "m" {
        return Some(Mode::Minor);
    }
    // `get` rather than slicing: the word may hold non-ASCII letters.
    match lower.get(..3)? {
        "maj" | "ion" => Some(Mode::Major),
        "min" | "aeo" => Some(Mode::Minor),
        "mix" => Some(Mode::Mixolydian),
        "dor" => Some(Mode::Dorian),
        "phr" => Some(Mode::Phrygian),
        "lyd" => Some(Mode::Lydian),
        "loc" => Some(Mode::Locrian),
        _ => None,
    }
}

/// An explicit accidental such as `^f`, `__b` or `=c` in a `K:` field: (letter, semitones).
fn parse_key_accidental(token: &str) -> Option<(usize, i8)> {
    let bytes = token.as_bytes();
    let (alteration, rest) = match bytes {
        [b'^', b'^', rest @ ..] => (2, rest),
        [b'_', b'_', rest @ ..] => (-2, rest),
        [b'^', rest @ ..] => (1, rest),
        [b'_', rest @ ..] => (-1, rest),
        [b'=', rest @ ..] => (0, rest),
        _ => return None,
    };
    match rest {
        [letter] => letter_index(*letter).map(|idx| (idx, alteration)),
        _ => None,
    }
}

/// Splits `^f_b=c` (accidentals written without spaces) into single accidentals.
fn split_accidentals(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_alphabetic() {
            parts.push(&text[start..=i]);
            start = i + 1;
        }
    }
    if start < bytes.len() {
        parts.push(&text[start..]);
    }
    parts
}

/// Parses a `K:` value. `Ok(None)` when it only sets a clef or the like and keeps the key.
fn parse_key(value: &str) -> Result<Option<KeySpec>, Problem> {
    let value = strip_comment(value).trim();
    let mut tokens: Vec<&str> = value.split_whitespace().collect();
    if tokens.is_empty() {
        return Ok(Some(KeySpec::NONE));
    }
    let first = tokens.remove(0);
    let mut spec;
    let mut extra: Vec<&str> = Vec::new();
    if first.eq_ignore_ascii_case("none") || first == "HP" {
        spec = KeySpec::NONE;
    } else if first == "Hp" {
        // Highland pipes: F and C sharp, G natural; the chanter's scale is A mixolydian.
        spec = KeySpec {
            key: Some(Key { fifths: 2, mode: Mode::Mixolydian }),
            alterations: signature_alterations(2),
        };
    } else if let Some(letter) =
        first.bytes().next().filter(|b| b.is_ascii_uppercase()).and_then(letter_index)
    {
        let rest = &first[1..];
        let (shift, rest) = match rest.as_bytes().first() {
            Some(b'#') => (7, &rest[1..]),
            Some(b'b') => (-7, &rest[1..]),
            _ => (0, rest),
        };
        let word_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (word, tail) = rest.split_at(word_len);
        if !tail.is_empty() {
            extra.push(tail);
        }
        let mut mode = parse_mode(word).ok_or_else(|| Problem::UnknownMode(word.to_string()))?;
        if word.is_empty() {
            if let Some(next_mode) =
                tokens.first().and_then(|t| parse_mode(t).filter(|_| t.len() >= 3 || *t == "m"))
            {
                mode = next_mode;
                tokens.remove(0);
            }
        }
        // Fifths of the tonic from C: F = -1, C = 0, G = 1 ... B = 5; a sharp adds seven.
        const LETTER_FIFTHS: [i32; 7] = [0, 2, 4, -1, 1, 3, 5];
        let tonic_fifths = LETTER_FIFTHS[letter] + shift;
        let fifths = tonic_fifths - mode.fifths_above_relative_major() as i32;
        let tonic_pc = ((LETTER_SEMITONES[letter] + shift / 7).rem_euclid(12)) as u8;
        let key = if (-7..=7).contains(&fifths) {
            Key { fifths: fifths as i8, mode }
        } else {
            Key::from_tonic(tonic_pc, mode)
        };
        spec = KeySpec { key: Some(key), alterations: signature_alterations(fifths) };
    } else if first.contains('=') || is_clef_word(first) {
        return Ok(None);
    } else if parse_key_accidental(first).is_some() {
        // Only accidentals: a signature of C plus them.
        spec = KeySpec::NONE;
        extra.push(first);
    } else {
        return Err(Problem::UnknownKey(first.to_string()));
    }
    extra.extend(tokens);
    for token in extra {
        if token.eq_ignore_ascii_case("exp") {
            spec.alterations = [0; 7];
            continue;
        }
        if matches!(token.as_bytes().first(), Some(b'^' | b'_' | b'=')) {
            for part in split_accidentals(token) {
                if let Some((letter, alteration)) = parse_key_accidental(part) {
                    spec.alterations[letter] = alteration;
                }
            }
        }
        // Anything else (clef=, transpose=, octave=, middle=) does not change sounding pitch
        // as written here and is ignored.
    }
    Ok(Some(spec))
}

fn is_clef_word(word: &str) -> bool {
    matches!(word.to_ascii_lowercase().as_str(), "treble" | "bass" | "alto" | "tenor" | "perc" | "clef")
}

/// Parses an `M:` value: `Ok(None)` for free meter (`none`).
fn parse_meter(value: &str) -> Result<Option<(u32, u32)>, Problem> {
    let text = strip_comment(value).trim();
    match text {
        "C" => return Ok(Some((4, 4))),
        "C|" => return Ok(Some((2, 2))),
        "" => return Ok(None),
        _ if text.eq_ignore_ascii_case("none") => return Ok(None),
        _ => {}
    }
    let bad = || Problem::BadMeter(text.to_string());
    // Skip a leading word such as FREI ("free") in front of the nominal meter.
    let body = text.trim_start_matches(|c: char| c.is_ascii_alphabetic()).trim();
    let body = body.trim_end_matches(']').trim();
    let (top, bottom) = body.split_once('/').ok_or_else(bad)?;
    let bottom: u32 = bottom.trim().parse().map_err(|_| bad())?;
    // A compound numerator such as 2+3+2.
    let top = top.trim().trim_start_matches('(').trim_end_matches(')');
    let mut numerator = 0u32;
    for part in top.split('+') {
        numerator = numerator.saturating_add(part.trim().parse::<u32>().map_err(|_| bad())?);
    }
    if numerator == 0 || numerator > 255 || bottom == 0 || bottom > 255 {
        return Err(bad());
    }
    Ok(Some((numerator, bottom)))
}

/// Parses an `L:` value such as `1/8` (or `1`).
fn parse_unit(value: &str) -> Result<Ratio, Problem> {
    let text = strip_comment(value).trim();
    let bad = || Problem::BadUnitLength(text.to_string());
    let (num, den) = match text.split_once('/') {
        Some((num, den)) => {
            (num.trim().parse::<u64>().map_err(|_| bad())?, den.trim().parse::<u64>().map_err(|_| bad())?)
        }
        None => (text.parse::<u64>().map_err(|_| bad())?, 1),
    };
    if num == 0 || num > MAX_NUMBER || den > MAX_NUMBER {
        return Err(bad());
    }
    Ratio::new(num, den).ok_or_else(bad)
}

/// Quarter notes per minute from a `Q:` value (`1/4=120`, `"Allegro" 3/8=60`, `120` in unit
/// lengths, as the deprecated form means), or `None` for a text-only tempo.
fn parse_tempo(value: &str, unit: Ratio) -> Option<f64> {
    let mut text = String::new();
    let mut in_quote = false;
    for c in strip_comment(value).chars() {
        if c == '"' {
            in_quote = !in_quote;
        } else if !in_quote {
            text.push(c);
        }
    }
    let text = text.trim();
    let (beat_whole_notes, count) = match text.split_once('=') {
        Some((beats, count)) => {
            let mut total = 0.0;
            for part in beats.split_whitespace() {
                if part.eq_ignore_ascii_case("C") || part.eq_ignore_ascii_case("L") {
                    total += unit.num as f64 / unit.den as f64;
                    continue;
                }
                let (num, den) = part.split_once('/')?;
                let (num, den) = (num.parse::<f64>().ok()?, den.parse::<f64>().ok()?);
                if den <= 0.0 {
                    return None;
                }
                total += num / den;
            }
            if total == 0.0 {
                total = unit.num as f64 / unit.den as f64;
            }
            (total, count.trim().parse::<f64>().ok()?)
        }
        None => (unit.num as f64 / unit.den as f64, text.parse::<f64>().ok()?),
    };
    let qpm = beat_whole_notes * 4.0 * count;
    (qpm.is_finite() && qpm > 0.0).then_some(qpm)
}

/// The play order of a header `P:` field (`ABA`, `A2B`, `(AB)2C`), or `None` when the value is
/// not an order of single-letter parts.
fn parse_part_order(value: &str) -> Option<Vec<String>> {
    fn group(bytes: &[u8], i: &mut usize, depth: usize, out: &mut Vec<String>) -> Option<()> {
        while *i < bytes.len() {
            let start = out.len();
            match bytes[*i] {
                b'A'..=b'Z' => {
                    out.push((bytes[*i] as char).to_string());
                    *i += 1;
                }
                b'(' if depth < 4 => {
                    *i += 1;
                    group(bytes, i, depth + 1, out)?;
                    if bytes.get(*i) != Some(&b')') {
                        return None;
                    }
                    *i += 1;
                }
                b')' if depth > 0 => return Some(()),
                b' ' | b'.' => {
                    *i += 1;
                    continue;
                }
                _ => return None,
            }
            let mut count = 0usize;
            while let Some(digit) = bytes.get(*i).filter(|b| b.is_ascii_digit()) {
                count = (count * 10 + (digit - b'0') as usize).min(16);
                *i += 1;
            }
            let item: Vec<String> = out[start..].to_vec();
            for _ in 1..count {
                if out.len() > 256 {
                    return None;
                }
                out.extend(item.iter().cloned());
            }
        }
        Some(())
    }
    let bytes = strip_comment(value).trim().as_bytes();
    let mut order = Vec::new();
    let mut i = 0;
    group(bytes, &mut i, 0, &mut order)?;
    (i == bytes.len() && !order.is_empty()).then_some(order)
}

/// Reads one tune (its lines, the first being `X:`). `first_line_no` is the 1-based line number
/// of that first line. Returns the melody (without its source) and its title.
fn read_tune(lines: &[&str], first_line_no: usize) -> Result<(Melody, Option<String>), Failure> {
    let mut reader = TuneReader::new();
    for (offset, line) in lines.iter().enumerate().skip(1) {
        let line_no = first_line_no + offset;
        reader.line(line).map_err(|problem| Failure { line: line_no, problem })?;
    }
    if reader.is_in_header {
        return Err(Failure { line: first_line_no, problem: Problem::NoKeyField });
    }
    let last_line_no = first_line_no + lines.len().saturating_sub(1);
    let melody = reader.finish().map_err(|problem| Failure { line: last_line_no, problem })?;
    Ok((melody, reader.title))
}

/// How far an accidental written in a bar reaches (`%%propagate-accidentals`, ABC 2.1
/// section 11.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Propagation {
    /// Only the note it is written on.
    Not,
    /// Notes of the same letter in the same octave, to the bar line.
    Octave,
    /// Notes of the same letter in any octave, to the bar line: the standard's default.
    #[default]
    Pitch,
}

/// State while reading one tune, header and body.
struct TuneReader {
    is_in_header: bool,
    title: Option<String>,
    /// The first meter declared: `Some(None)` after `M:none`.
    first_meter: Option<Option<Meter>>,
    /// The meter in force, as (numerator, denominator).
    meter: Option<(u32, u32)>,
    /// The unit note length (`L:`) in whole notes; `None` until set or defaulted.
    unit: Option<Ratio>,
    /// A header `Q:` waits for the unit length, which may come after it.
    header_tempo: Option<String>,
    tempo_qpm: Option<f64>,
    key: Option<Key>,
    key_alterations: [i8; 7],
    /// Accidentals written in the current bar: (carry key, semitones); the key is the letter
    /// or the diatonic step, as `propagation` says.
    bar_alterations: Vec<(i32, i8)>,
    /// How far a written accidental reaches within its bar.
    propagation: Propagation,
    /// The last note's (diatonic step, semitones), which a tie carries into the next note.
    last_note_step: Option<(i32, i8)>,
    /// Set by a tie: the next note of this step keeps the alteration, even past a bar line.
    tie_carry: Option<(i32, i8)>,
    first_voice: Option<String>,
    is_voice_active: bool,
    part_order: Option<Vec<String>>,
    events: Vec<Event>,
    /// Index in `events` of the last note or rest, for ties and broken rhythm.
    last_timed_idx: Option<usize>,
    /// Factor for the next note from a broken rhythm (`>` / `<`) before it.
    pending_broken: Option<Ratio>,
    /// Active tuplet: the factor and the notes it still applies to.
    tuplet: Option<(Ratio, u64)>,
    is_in_grace: bool,
    /// After `&`, the rest of the bar is a second voice and is skipped.
    is_in_overlay: bool,
}

impl TuneReader {
    fn new() -> Self {
        Self {
            is_in_header: true,
            title: None,
            first_meter: None,
            meter: None,
            unit: None,
            header_tempo: None,
            tempo_qpm: None,
            key: None,
            key_alterations: [0; 7],
            bar_alterations: Vec::new(),
            propagation: Propagation::default(),
            last_note_step: None,
            tie_carry: None,
            first_voice: None,
            is_voice_active: true,
            part_order: None,
            events: Vec::new(),
            last_timed_idx: None,
            pending_broken: None,
            tuplet: None,
            is_in_grace: false,
            is_in_overlay: false,
        }
    }

    fn unit(&self) -> Ratio {
        self.unit.unwrap_or(Ratio { num: 1, den: 8 })
    }

    fn line(&mut self, line: &str) -> Result<(), Problem> {
        if let Some(directive) = line.strip_prefix("%%") {
            self.directive(directive);
            return Ok(());
        }
        if line.starts_with('%') {
            return Ok(());
        }
        if let Some(letter) = field_of(line) {
            if letter == b'I' {
                self.directive(&line[2..]);
            }
            return self.field(letter, &line[2..]);
        }
        if self.is_in_header {
            // Free text before K: (a stray note line, a continued directive): not music yet.
            return Ok(());
        }
        self.music(line.as_bytes())
    }

    /// A `%%` directive or `I:` instruction; only those that change what sounds are read.
    fn directive(&mut self, text: &str) {
        let mut words = strip_comment(text).split_whitespace();
        if words.next() == Some("propagate-accidentals") {
            self.propagation = match words.next() {
                Some("not") => Propagation::Not,
                Some("octave") => Propagation::Octave,
                _ => Propagation::Pitch,
            };
        }
    }

    fn field(&mut self, letter: u8, value: &str) -> Result<(), Problem> {
        // Another voice's fields are its own; voice switches and part labels concern all voices.
        if !self.is_voice_active && !matches!(letter, b'V' | b'P') && !self.is_in_header {
            return Ok(());
        }
        match letter {
            b'T' if self.is_in_header && self.title.is_none() => {
                let title = strip_comment(value).trim();
                if !title.is_empty() {
                    self.title = Some(title.to_string());
                }
            }
            b'M' => {
                let meter = parse_meter(value)?;
                if self.first_meter.is_none() {
                    self.first_meter =
                        Some(meter.map(|(n, d)| Meter { numerator: n as u8, denominator: d as u8 }));
                }
                self.meter = meter;
            }
            b'L' => self.unit = Some(parse_unit(value)?),
            b'Q' => {
                if self.is_in_header {
                    self.header_tempo.get_or_insert_with(|| value.to_string());
                } else if self.tempo_qpm.is_none() {
                    self.tempo_qpm = parse_tempo(value, self.unit());
                }
            }
            b'K' => {
                if let Some(spec) = parse_key(value)? {
                    if self.is_in_header {
                        self.key = spec.key;
                    }
                    self.key_alterations = spec.alterations;
                }
                self.bar_alterations.clear();
                if self.is_in_header {
                    self.end_header();
                }
            }
            b'V' => {
                let id = strip_comment(value).split_whitespace().next().unwrap_or("").to_string();
                match &self.first_voice {
                    // The header only declares voices; the first one declared is kept.
                    _ if self.is_in_header => {
                        self.first_voice.get_or_insert(id);
                    }
                    None if self.last_timed_idx.is_none() => {
                        self.first_voice = Some(id);
                        self.is_voice_active = true;
                    }
                    // Music came before any V:, so that unnamed voice is the first one.
                    None => {
                        self.first_voice = Some(String::new());
                        self.is_voice_active = false;
                    }
                    Some(first) => self.is_voice_active = *first == id,
                }
            }
            b'P' => {
                if self.is_in_header {
                    self.part_order = parse_part_order(value);
                } else {
                    self.events.push(Event::Part(strip_comment(value).trim().to_string()));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end_header(&mut self) {
        self.is_in_header = false;
        if self.unit.is_none() {
            // ABC's default unit: a sixteenth below a meter of 3/4, an eighth otherwise.
            let is_short = self.meter.is_some_and(|(n, d)| (n as f64) / (d as f64) < 0.75);
            self.unit = Some(if is_short { Ratio { num: 1, den: 16 } } else { Ratio { num: 1, den: 8 } });
        }
        if let Some(tempo) = self.header_tempo.take() {
            self.tempo_qpm = parse_tempo(&tempo, self.unit());
        }
    }

    /// Reads one line of music.
    fn music(&mut self, line: &[u8]) -> Result<(), Problem> {
        let mut i = 0;
        while i < line.len() {
            let c = line[i];
            if !self.is_voice_active {
                // Skip another voice's music, but notice an inline switch back.
                if c == b'%' {
                    break;
                }
                if c == b'[' && matches!(line.get(i + 1), Some(b'V' | b'P')) && line.get(i + 2) == Some(&b':')
                {
                    i = self.inline_field(line, i)?;
                } else {
                    i += 1;
                }
                continue;
            }
            if self.is_in_grace {
                if c == b'}' {
                    self.is_in_grace = false;
                }
                i += 1;
                continue;
            }
            if self.is_in_overlay && !matches!(c, b'|' | b':' | b'%') {
                i += 1;
                continue;
            }
            match c {
                b' ' | b'\t' | b'`' | b'\\' | b'$' | b')' => i += 1,
                b'%' => break,
                b'"' => {
                    let close = find_byte(line, i + 1, b'"')
                        .ok_or(Problem::Unterminated { what: "a quoted string" })?;
                    i = close + 1;
                }
                b'!' | b'+' => i = skip_decoration(line, i),
                b'{' => {
                    self.is_in_grace = true;
                    i += 1;
                }
                b'(' => {
                    if line.get(i + 1).is_some_and(u8::is_ascii_digit) {
                        i = self.tuplet(line, i)?;
                    } else {
                        i += 1;
                    }
                }
                b'[' => match line.get(i + 1) {
                    Some(d) if d.is_ascii_digit() => i = self.ending(line, i + 1)?,
                    // An ending labelled with text (`["Coda"`): the label is skipped next.
                    Some(b'"') => i += 1,
                    Some(b'|') => i = self.bar(line, i)?,
                    Some(l) if l.is_ascii_alphabetic() && line.get(i + 2) == Some(&b':') => {
                        i = self.inline_field(line, i)?
                    }
                    _ => i = self.chord(line, i)?,
                },
                b'|' | b':' => i = self.bar(line, i)?,
                // An ending number whose bar line ended the previous line (`|\` then `2`).
                b'0'..=b'9' if matches!(self.events.last(), Some(Event::Bar { .. })) => {
                    i = self.ending(line, i)?
                }
                // A stray closing brace of a grace group that was never opened.
                b'}' => i += 1,
                b'.' | b'~' | b'H'..=b'W' | b'h'..=b'w' => i += 1,
                b'^' | b'_' | b'=' | b'A'..=b'G' | b'a'..=b'g' => {
                    let (note, next) = self.note(line, i)?;
                    i = next;
                    self.push_timed(Some(note.pitch), note.mult, note.is_tied)?;
                }
                b'z' | b'x' => {
                    i += 1;
                    let mult = parse_length(line, &mut i)?;
                    // A tie after a rest means nothing.
                    if line.get(i) == Some(&b'-') {
                        i += 1;
                    }
                    self.tie_carry = None;
                    self.push_timed(None, mult, false)?;
                }
                b'Z' => {
                    i += 1;
                    let bars = read_number(line, &mut i)?.unwrap_or(1);
                    let (n, d) = self.meter.unwrap_or((4, 4));
                    let bar = Ratio::new(n as u64, d as u64).ok_or(Problem::LengthOverflow)?;
                    let len = bar.mul(Ratio { num: bars, den: 1 })?;
                    if !len.is_zero() {
                        self.events.push(Event::Rest { len });
                        self.last_timed_idx = Some(self.events.len() - 1);
                    }
                    self.tie_carry = None;
                }
                b'y' => {
                    i += 1;
                    read_number(line, &mut i)?;
                }
                b'-' => {
                    if let Some(Event::Note { is_tied, .. }) =
                        self.last_timed_idx.and_then(|idx| self.events.get_mut(idx))
                    {
                        *is_tied = true;
                        self.tie_carry = self.last_note_step;
                    }
                    i += 1;
                }
                b'>' | b'<' => i = self.broken_rhythm(line, i)?,
                b'&' => {
                    self.is_in_overlay = true;
                    i += 1;
                }
                _ => return Err(Problem::UnexpectedChar(char_at(line, i))),
            }
        }
        Ok(())
    }

    /// Reads a note from `line[start..]`: accidental, letter, octave marks, length, tie.
    fn note(&mut self, line: &[u8], start: usize) -> Result<(ParsedNote, usize), Problem> {
        let mut i = start;
        let mut accidental: Option<i8> = None;
        match line.get(i..i + 2) {
            Some(b"^^") => {
                accidental = Some(2);
                i += 2;
            }
            Some(b"__") => {
                accidental = Some(-2);
                i += 2;
            }
            _ => match line.get(i) {
                Some(b'^') => {
                    accidental = Some(1);
                    i += 1;
                }
                Some(b'_') => {
                    accidental = Some(-1);
                    i += 1;
                }
                Some(b'=') => {
                    accidental = Some(0);
                    i += 1;
                }
                _ => {}
            },
        }
        let letter = *line.get(i).ok_or(Problem::DanglingAccidental)?;
        if accidental.is_some() && (letter.is_ascii_digit() || letter == b'/') {
            return Err(Problem::Microtone(text_at(line, start)));
        }
        let letter_idx = match letter {
            b'A'..=b'G' | b'a'..=b'g' => letter_index(letter).unwrap_or(0),
            _ => return Err(Problem::DanglingAccidental),
        };
        i += 1;
        let mut octave: i32 = if letter.is_ascii_lowercase() { 1 } else { 0 };
        while let Some(mark) = line.get(i) {
            match mark {
                b'\'' => octave += 1,
                b',' => octave -= 1,
                _ => break,
            }
            octave = octave.clamp(-20, 20);
            i += 1;
        }
        // Accidentals hold until the bar line, for the same letter in every octave by default
        // (ABC 2.1 section 11.3; abc2midi agrees). A note tied from one of the same letter and
        // octave keeps that note's pitch, as a tie across a bar line does in staff notation.
        let step = octave * 7 + letter_idx as i32;
        let carry_key = match self.propagation {
            Propagation::Pitch => letter_idx as i32,
            Propagation::Octave | Propagation::Not => step,
        };
        let carried = self.tie_carry.take().filter(|&(s, _)| s == step).map(|(_, a)| a);
        let alteration = match accidental {
            None if carried.is_some() => carried.unwrap_or(0),
            Some(a) => {
                if self.propagation != Propagation::Not {
                    match self.bar_alterations.iter_mut().find(|(k, _)| *k == carry_key) {
                        Some(entry) => entry.1 = a,
                        None => self.bar_alterations.push((carry_key, a)),
                    }
                }
                a
            }
            None => match self.bar_alterations.iter().find(|(k, _)| *k == carry_key) {
                Some(&(_, a)) => a,
                None => self.key_alterations[letter_idx],
            },
        };
        let pitch = 60 + 12 * octave + LETTER_SEMITONES[letter_idx] + alteration as i32;
        let pitch =
            u8::try_from(pitch).ok().filter(|p| *p <= 127).ok_or(Problem::PitchOutOfRange { pitch })?;
        let mult = parse_length(line, &mut i)?;
        let is_tied = line.get(i) == Some(&b'-');
        if is_tied {
            i += 1;
        }
        self.last_note_step = Some((step, alteration));
        self.tie_carry = if is_tied { self.last_note_step } else { None };
        Ok((ParsedNote { pitch, mult, is_tied }, i))
    }

    /// Reads a chord `[CEG]2` from `line[start..]` and keeps its highest note.
    fn chord(&mut self, line: &[u8], start: usize) -> Result<usize, Problem> {
        let mut i = start + 1;
        let mut top: Option<ParsedNote> = None;
        let mut first_mult: Option<Ratio> = None;
        let mut has_rest = false;
        loop {
            let c = *line.get(i).ok_or(Problem::Unterminated { what: "a chord" })?;
            match c {
                b']' => {
                    i += 1;
                    break;
                }
                b' ' | b'\t' | b'(' | b')' | b'.' | b'~' | b'H'..=b'W' | b'h'..=b'w' | b'-' => i += 1,
                b'!' | b'+' => i = skip_decoration(line, i),
                b'"' => {
                    let close = find_byte(line, i + 1, b'"')
                        .ok_or(Problem::Unterminated { what: "a quoted string" })?;
                    i = close + 1;
                }
                b'z' | b'x' => {
                    // A rest among the notes only matters if the chord has no notes.
                    i += 1;
                    first_mult.get_or_insert(parse_length(line, &mut i)?);
                    has_rest = true;
                }
                b'^' | b'_' | b'=' | b'A'..=b'G' | b'a'..=b'g' => {
                    let (note, next) = self.note(line, i)?;
                    i = next;
                    first_mult.get_or_insert(note.mult);
                    if top.is_none_or(|t| note.pitch > t.pitch) {
                        top = Some(note);
                    }
                }
                _ => return Err(Problem::UnexpectedChar(char_at(line, i))),
            }
        }
        if top.is_none() && !has_rest {
            return Err(Problem::EmptyChord);
        }
        // The chord lasts as long as its first note, times any length after the bracket.
        let outer = parse_length(line, &mut i)?;
        let mult = first_mult.unwrap_or(Ratio::ONE).mul(outer)?;
        let mut is_tied = top.is_some_and(|t| t.is_tied);
        if line.get(i) == Some(&b'-') {
            is_tied = true;
            i += 1;
        }
        self.push_timed(top.map(|t| t.pitch), mult, is_tied)?;
        Ok(i)
    }

    /// Appends a note (`pitch` given) or a rest of `mult` unit lengths, applying the tuplet
    /// and broken rhythm in force.
    fn push_timed(&mut self, pitch: Option<u8>, mult: Ratio, is_tied: bool) -> Result<(), Problem> {
        let mut len = self.unit().mul(mult)?;
        if let Some((factor, remaining)) = self.tuplet {
            len = len.mul(factor)?;
            self.tuplet = (remaining > 1).then_some((factor, remaining - 1));
        }
        if let Some(factor) = self.pending_broken.take() {
            len = len.mul(factor)?;
        }
        self.events.push(match pitch {
            Some(pitch) => Event::Note { pitch, len, is_tied },
            None => Event::Rest { len },
        });
        self.last_timed_idx = Some(self.events.len() - 1);
        Ok(())
    }

    /// `>` lengthens the note before by half and halves the note after; `<` the reverse; each
    /// extra sign halves again (`>>`: 7/4 and 1/4).
    fn broken_rhythm(&mut self, line: &[u8], start: usize) -> Result<usize, Problem> {
        let sign = line[start];
        let count = line[start..].iter().take_while(|&&b| b == sign).count();
        let end = start + count;
        let text = String::from_utf8_lossy(&line[start..end]).into_owned();
        if count > 4 {
            return Err(Problem::BrokenRhythmWithoutNote(text));
        }
        let den = 1u64 << count;
        let long = Ratio::new(2 * den - 1, den).ok_or(Problem::LengthOverflow)?;
        let short = Ratio::new(1, den).ok_or(Problem::LengthOverflow)?;
        let (before, after) = if sign == b'>' { (long, short) } else { (short, long) };
        let idx = self.last_timed_idx.ok_or_else(|| Problem::BrokenRhythmWithoutNote(text.clone()))?;
        match self.events.get_mut(idx) {
            Some(Event::Note { len, .. } | Event::Rest { len }) => *len = len.mul(before)?,
            _ => return Err(Problem::BrokenRhythmWithoutNote(text)),
        }
        self.pending_broken = Some(after);
        Ok(end)
    }

    /// Reads `(p`, `(p:q` or `(p:q:r` at `line[start]`.
    fn tuplet(&mut self, line: &[u8], start: usize) -> Result<usize, Problem> {
        let mut i = start + 1;
        let bad = |end: usize| {
            Problem::BadTuplet(String::from_utf8_lossy(&line[start..end.min(line.len())]).into_owned())
        };
        let p = read_number(line, &mut i)?.unwrap_or(0);
        let mut q = None;
        let mut r = None;
        if line.get(i) == Some(&b':') {
            i += 1;
            q = read_number(line, &mut i)?;
            if line.get(i) == Some(&b':') {
                i += 1;
                r = read_number(line, &mut i)?;
            }
        }
        if !(1..=64).contains(&p) {
            return Err(bad(i));
        }
        let is_compound = self.meter.is_some_and(|(n, _)| n % 3 == 0 && n > 3);
        let q = q.unwrap_or(match p {
            2 | 4 | 8 => 3,
            3 | 6 => 2,
            _ if is_compound => 3,
            _ => 2,
        });
        let r = r.unwrap_or(p);
        if !(1..=64).contains(&q) || !(1..=64).contains(&r) {
            return Err(bad(i));
        }
        self.tuplet = Some((Ratio::new(q, p).ok_or_else(|| bad(i))?, r));
        Ok(i)
    }

    /// Reads a bar line starting at `line[start]` (`|`, `||`, `|]`, `[|`, `|:`, `:|`, `::`,
    /// `:|]` ...) and a first/second ending number right after it.
    fn bar(&mut self, line: &[u8], start: usize) -> Result<usize, Problem> {
        let mut i = start;
        let mut is_thick = false;
        if line[i] == b'[' {
            is_thick = true;
            i += 1;
        }
        while i < line.len() && matches!(line[i], b'|' | b':') {
            i += 1;
        }
        if line.get(i) == Some(&b']') && i > start {
            is_thick = true;
            i += 1;
        }
        let token = &line[start..i];
        let pipes = token.iter().filter(|&&b| b == b'|').count();
        if token == b":" {
            // A lone colon. Right after a bar line (often the previous line's, as in `||\` then
            // `:`) it makes that bar a repeat start; elsewhere it ends a repeat.
            if let Some(Event::Bar { starts_repeat, .. }) = self.events.last_mut() {
                *starts_repeat = true;
                return Ok(i);
            }
        }
        let core: &[u8] = token.strip_prefix(b"[").unwrap_or(token);
        let core = core.strip_suffix(b"]").unwrap_or(core);
        let ends_repeat = core.first() == Some(&b':');
        let starts_repeat = core.len() > 1 && core.last() == Some(&b':');
        let is_double = pipes >= 2 || is_thick;
        self.events.push(Event::Bar { ends_repeat, starts_repeat, is_double });
        self.bar_alterations.clear();
        self.is_in_overlay = false;
        if line.get(i).is_some_and(u8::is_ascii_digit) {
            return self.ending(line, i);
        }
        Ok(i)
    }

    /// Reads an ending list (`1`, `2`, `1,3`, `1-3`) starting at the digit `line[start]`.
    fn ending(&mut self, line: &[u8], start: usize) -> Result<usize, Problem> {
        let mut i = start;
        let mut passes = 0u32;
        let bad = |end: usize| {
            Problem::BadEnding(String::from_utf8_lossy(&line[start..end.min(line.len())]).into_owned())
        };
        loop {
            let first = read_number(line, &mut i)?.ok_or_else(|| bad(i + 1))?;
            let mut last = first;
            if line.get(i) == Some(&b'-') && line.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                last = read_number(line, &mut i)?.unwrap_or(first);
            }
            if first == 0 || last > MAX_ENDING || last < first {
                return Err(bad(i));
            }
            for pass in first..=last {
                passes |= 1 << pass;
            }
            if line.get(i) == Some(&b',') && line.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
            } else {
                break;
            }
        }
        self.events.push(Event::Ending { passes });
        Ok(i)
    }

    /// Reads an inline field `[K:G]` at `line[start]` and returns the index after it.
    fn inline_field(&mut self, line: &[u8], start: usize) -> Result<usize, Problem> {
        let close = find_byte(line, start, b']').ok_or(Problem::Unterminated { what: "an inline field" })?;
        let value = String::from_utf8_lossy(&line[start + 3..close]).into_owned();
        self.field(line[start + 1], &value)?;
        Ok(close + 1)
    }

    /// Expands repeats and parts, merges ties and builds the melody.
    fn finish(&self) -> Result<Melody, Problem> {
        let mut played = Vec::new();
        let has_parts = self.events.iter().any(|e| matches!(e, Event::Part(_)));
        match &self.part_order {
            Some(order) if has_parts => {
                let mut segments: Vec<(Option<&str>, &[Event])> = Vec::new();
                let mut seg_start = 0;
                let mut label: Option<&str> = None;
                for (idx, event) in self.events.iter().enumerate() {
                    if let Event::Part(next) = event {
                        segments.push((label, &self.events[seg_start..idx]));
                        label = Some(next.as_str());
                        seg_start = idx + 1;
                    }
                }
                segments.push((label, &self.events[seg_start..]));
                // Music before the first part label is an introduction, played once.
                expand_repeats(segments[0].1, &mut played)?;
                for name in order {
                    if let Some((_, events)) = segments.iter().find(|(l, _)| *l == Some(name.as_str())) {
                        expand_repeats(events, &mut played)?;
                    }
                }
            }
            _ => expand_repeats(&self.events, &mut played)?,
        }
        let bar_len = match self.first_meter.flatten() {
            Some(m) => Ratio::new(m.numerator as u64, m.denominator as u64),
            None => None,
        };
        build_melody(&played, bar_len, self)
    }
}

/// A note as read, before the unit length, tuplets and broken rhythm are applied.
#[derive(Clone, Copy, Debug)]
struct ParsedNote {
    pitch: u8,
    /// Length in unit note lengths.
    mult: Ratio,
    is_tied: bool,
}

fn find_byte(line: &[u8], from: usize, byte: u8) -> Option<usize> {
    line.get(from..)?.iter().position(|&b| b == byte).map(|p| p + from)
}

/// Skips a `!name!` or `+name+` decoration at `line[start]`. A sign with no plausible closing
/// partner on the line (an old-style `!` line break, a stray `+`) is skipped alone.
fn skip_decoration(line: &[u8], start: usize) -> usize {
    let sign = line[start];
    if let Some(close) = find_byte(line, start + 1, sign) {
        let name = &line[start + 1..close];
        if !name.is_empty() && name.len() <= 40 && !name.iter().any(|b| b.is_ascii_whitespace() || *b == b'|')
        {
            return close + 1;
        }
    }
    start + 1
}

fn char_at(line: &[u8], i: usize) -> char {
    String::from_utf8_lossy(&line[i..(i + 4).min(line.len())]).chars().next().unwrap_or('?')
}

fn text_at(line: &[u8], i: usize) -> String {
    String::from_utf8_lossy(&line[i..(i + 6).min(line.len())]).into_owned()
}

/// Reads a decimal number at `line[*i]`, if there is one.
fn read_number(line: &[u8], i: &mut usize) -> Result<Option<u64>, Problem> {
    let start = *i;
    let mut value = 0u64;
    while let Some(digit) = line.get(*i).filter(|b| b.is_ascii_digit()) {
        value = value * 10 + (digit - b'0') as u64;
        *i += 1;
        if value > MAX_NUMBER {
            return Err(Problem::BadLength { text: text_at(line, start) });
        }
    }
    Ok((*i > start).then_some(value))
}

/// Reads a length such as `2`, `3/2`, `/2`, `/` or `//` at `line[*i]`, in unit lengths.
fn parse_length(line: &[u8], i: &mut usize) -> Result<Ratio, Problem> {
    let start = *i;
    let bad = |end: usize| Problem::BadLength {
        text: String::from_utf8_lossy(&line[start..end.min(line.len())]).into_owned(),
    };
    let num = read_number(line, i)?.unwrap_or(1);
    let mut den = 1u64;
    while line.get(*i) == Some(&b'/') {
        *i += 1;
        den = den.saturating_mul(read_number(line, i)?.unwrap_or(2));
        if den > MAX_NUMBER * 16 {
            return Err(bad(*i));
        }
    }
    if num == 0 || den == 0 {
        return Err(bad(*i));
    }
    Ratio::new(num, den).ok_or_else(|| bad(*i))
}

/// Unrolls repeats and numbered endings of `events` (written order) into `out` (played order).
///
/// A `:|` goes back to the last `|:`, or without one to the last `||`/`|]` or the start. On
/// the second and later passes, an ending whose list lacks the pass is skipped up to the ending
/// that has it. A `:|` repeats again while a later ending waits for the next pass (`[1` ... `:|`
/// `[2` ... `:|` `[3`). A pass counter drives everything, so the walk always terminates.
fn expand_repeats(events: &[Event], out: &mut Vec<Played>) -> Result<(), Problem> {
    // Endings that lie ahead of each position, up to the next repeat start.
    let mut endings_ahead = vec![0u32; events.len() + 1];
    for idx in (0..events.len()).rev() {
        endings_ahead[idx] = match &events[idx] {
            Event::Ending { passes } => endings_ahead[idx + 1] | passes,
            Event::Bar { starts_repeat: true, .. } => 0,
            _ => endings_ahead[idx + 1],
        };
    }
    let mut idx = 0;
    let mut section_start = 0;
    let mut has_explicit_start = false;
    let mut pass: u32 = 1;
    let mut is_in_ending = false;
    let mut is_skipping = false;
    let mut skipped_repeat_end = false;
    // Passes named by the endings met so far in the current section.
    let mut section_endings = 0u32;
    while idx < events.len() {
        if out.len() > MAX_PLAYED_EVENTS {
            return Err(Problem::TooLong { limit: MAX_PLAYED_EVENTS });
        }
        let event = &events[idx];
        if let Event::Ending { passes } = event {
            section_endings |= passes;
        }
        if is_skipping {
            match event {
                Event::Ending { passes } if passes & (1 << pass) != 0 => {
                    is_skipping = false;
                    is_in_ending = true;
                    idx += 1;
                    continue;
                }
                Event::Bar { starts_repeat: true, .. } => is_skipping = false,
                Event::Bar { is_double: true, .. } if skipped_repeat_end => {
                    // No ending for this pass: the repeated section is over.
                    is_skipping = false;
                    pass = 1;
                    is_in_ending = false;
                    has_explicit_start = false;
                    section_start = idx + 1;
                    section_endings = 0;
                    idx += 1;
                    continue;
                }
                Event::Bar { ends_repeat: true, .. } => {
                    skipped_repeat_end = true;
                    idx += 1;
                    continue;
                }
                _ => {
                    idx += 1;
                    continue;
                }
            }
        }
        match *event {
            Event::Note { pitch, len, is_tied } => out.push(Played::Note { pitch, len, is_tied }),
            Event::Rest { len } => out.push(Played::Rest { len }),
            Event::Part(_) => {}
            Event::Ending { passes } => {
                if passes & (1 << pass) != 0 || pass == 1 {
                    // On the first pass an ending for a later pass is played anyway: the tune
                    // has no repeat before it, and dropping its music would lose notes.
                    is_in_ending = true;
                } else {
                    is_skipping = true;
                    skipped_repeat_end = false;
                }
            }
            Event::Bar { ends_repeat, starts_repeat, is_double } => {
                out.push(Played::Bar);
                if ends_repeat {
                    // Another pass is due while some ending of the section names it (`[1,3` ...
                    // `:|` `[2,4`). A `::` ends its section: endings after it are the next one's.
                    let ahead = if starts_repeat { 0 } else { endings_ahead[idx + 1] };
                    let has_next_pass =
                        pass < MAX_ENDING as u32 && (section_endings | ahead) & (1 << (pass + 1)) != 0;
                    let should_jump = pass == 1 || (is_in_ending && has_next_pass);
                    if should_jump {
                        pass += 1;
                        is_in_ending = false;
                        idx = section_start;
                        continue;
                    }
                    pass = 1;
                    is_in_ending = false;
                    has_explicit_start = false;
                    section_start = idx + 1;
                    section_endings = 0;
                }
                if starts_repeat {
                    pass = 1;
                    is_in_ending = false;
                    has_explicit_start = true;
                    section_start = idx + 1;
                    section_endings = 0;
                } else if is_double && !ends_repeat {
                    if is_in_ending && pass > 1 {
                        // The last ending closes at a double bar.
                        pass = 1;
                        is_in_ending = false;
                        has_explicit_start = false;
                        section_start = idx + 1;
                        section_endings = 0;
                    } else if !has_explicit_start {
                        section_start = idx + 1;
                        section_endings = 0;
                    }
                }
            }
        }
        idx += 1;
    }
    Ok(())
}

/// Merges tied notes, lays the played elements end to end and fills in the melody.
fn build_melody(played: &[Played], bar_len: Option<Ratio>, reader: &TuneReader) -> Result<Melody, Problem> {
    // (pitch, start, len) in whole notes.
    let mut exact: Vec<(u8, Ratio, Ratio)> = Vec::new();
    let mut time = Ratio::ZERO;
    let mut is_tie_open = false;
    let mut first_bar: Option<Ratio> = None;
    for element in played {
        match *element {
            Played::Note { pitch, len, is_tied } => {
                match exact.last_mut() {
                    Some(last) if is_tie_open && last.0 == pitch => last.2 = last.2.add(len)?,
                    _ => exact.push((pitch, time, len)),
                }
                is_tie_open = is_tied;
                time = time.add(len)?;
            }
            Played::Rest { len } => {
                is_tie_open = false;
                time = time.add(len)?;
            }
            Played::Bar => {
                if first_bar.is_none() && !time.is_zero() {
                    first_bar = Some(time);
                }
            }
        }
    }
    if exact.is_empty() {
        return Err(Problem::NoNotes);
    }
    let pickup_beats = match (first_bar, bar_len) {
        (Some(first), Some(bar)) if first.less_than(bar) => first.to_beats(),
        _ => 0.0,
    };
    let notes =
        exact.iter().map(|&(pitch, start, len)| Note::new(pitch, start.to_beats(), len.to_beats())).collect();
    Ok(Melody {
        notes,
        end_beats: time.to_beats(),
        key: reader.key,
        meter: reader.first_meter.flatten(),
        pickup_beats,
        tempo_qpm: reader.tempo_qpm,
        source: Source::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: f64 = 1e-9;

    /// Parses `text`, which must hold exactly one tune that reads without error.
    fn read_one(text: &str) -> Melody {
        let book = parse_tunebook(text, "test.abc");
        assert!(book.errors.is_empty(), "{:?}", book.errors);
        assert_eq!(book.tunes.len(), 1);
        book.tunes.into_iter().next().unwrap()
    }

    /// A tune with the given header lines (after `X:` and `T:`) and body.
    fn tune(header: &str, body: &str) -> Melody {
        read_one(&format!("X:1\nT:Test\n{header}\n{body}\n"))
    }

    /// A tune in 4/4 and C major with quarter-note units, so lengths count beats.
    fn quarters(body: &str) -> Melody {
        tune("M:4/4\nL:1/4\nK:C", body)
    }

    fn pitches(melody: &Melody) -> Vec<u8> {
        melody.notes.iter().map(|n| n.pitch).collect()
    }

    /// Asserts the notes as (pitch, start_beats, len_beats) triples.
    #[track_caller]
    fn assert_notes(melody: &Melody, expected: &[(u8, f64, f64)]) {
        let actual: Vec<(u8, f64, f64)> =
            melody.notes.iter().map(|n| (n.pitch, n.start_beats, n.len_beats)).collect();
        let same = actual.len() == expected.len()
            && actual
                .iter()
                .zip(expected)
                .all(|(a, e)| a.0 == e.0 && (a.1 - e.1).abs() < TOLERANCE && (a.2 - e.2).abs() < TOLERANCE);
        assert!(same, "notes differ:\n  actual   {actual:?}\n  expected {expected:?}");
        assert!(melody.notes.iter().all(|n| n.velocity == crate::note::DEFAULT_VELOCITY));
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/abc").join(name)
    }

    #[test]
    fn reads_the_header_and_skips_fields_it_does_not_use() {
        let text = "%abc-2.1\nX:7\nT:First title\nT:Second title\nC:Composer\nO:Origin\nR:reel\nN:a note\n\
                    Z:transcriber\nS:source\nH:history\nB:book\nD:disc\nF:file\nG:group\nI:abc-charset utf-8\n\
                    %%MIDI program 1\nM:3/4\nL:1/8\nQ:1/4=96\nK:G\nGAB c2 d|\n";
        let melody = read_one(text);
        let expected =
            Source { path: "test.abc".into(), index: 0, number: Some(7), title: Some("First title".into()) };
        assert_eq!(melody.source, expected);
        assert_eq!(melody.meter, Some(Meter { numerator: 3, denominator: 4 }));
        assert_eq!(melody.tempo_qpm, Some(96.0));
        assert_eq!(melody.key, Some(Key { fifths: 1, mode: Mode::Major }));
        assert_notes(
            &melody,
            &[(67, 0.0, 0.5), (69, 0.5, 0.5), (71, 1.0, 0.5), (72, 1.5, 1.0), (74, 2.5, 0.5)],
        );
        assert_eq!(melody.end_beats, 3.0);
        assert_eq!(melody.pickup_beats, 0.0);
    }

    #[test]
    fn meters_and_the_default_unit_length() {
        let cases = [
            ("M:2/4", Some((2, 4)), 0.25), // below 3/4: sixteenths
            ("M:3/4", Some((3, 4)), 0.5),
            ("M:6/8", Some((6, 8)), 0.5),
            ("M:C", Some((4, 4)), 0.5),
            ("M:C|", Some((2, 2)), 0.5),
            ("M:none", None, 0.5),
            ("N:no meter at all", None, 0.5),
        ];
        for (field, meter, len_beats) in cases {
            let melody = tune(&format!("{field}\nK:C"), "C");
            let expected_meter = meter.map(|(n, d)| Meter { numerator: n, denominator: d });
            assert_eq!(melody.meter, expected_meter, "{field}");
            assert_notes(&melody, &[(60, 0.0, len_beats)]);
        }
        // An explicit unit length wins, wherever it is in the header.
        assert_notes(&tune("L:1/4\nM:2/4\nK:C", "C"), &[(60, 0.0, 1.0)]);
    }

    #[test]
    fn tempo_forms() {
        let cases = [
            ("Q:1/4=120", Some(120.0)),
            ("Q:1/2=60", Some(120.0)),
            ("Q:3/8=60", Some(90.0)),
            ("Q:120", Some(60.0)), // deprecated: unit lengths (here eighths) per minute
            ("Q:\"Allegro\" 1/4=132", Some(132.0)),
            ("Q:1/4=80 \"Slow\"", Some(80.0)),
            ("Q:\"Slowly\"", None),
        ];
        for (field, qpm) in cases {
            assert_eq!(tune(&format!("M:4/4\nL:1/8\n{field}\nK:C"), "C").tempo_qpm, qpm, "{field}");
        }
    }

    #[test]
    fn keys_modes_and_explicit_accidentals() {
        use Mode::*;
        // The pitches of C D E F G A B under each key.
        let cases: [(&str, Option<Key>, [u8; 7]); 17] = [
            ("G", Some(Key { fifths: 1, mode: Major }), [60, 62, 64, 66, 67, 69, 71]),
            ("Dm", Some(Key { fifths: -1, mode: Minor }), [60, 62, 64, 65, 67, 69, 70]),
            ("Amix", Some(Key { fifths: 2, mode: Mixolydian }), [61, 62, 64, 66, 67, 69, 71]),
            ("A Mixolydian", Some(Key { fifths: 2, mode: Mixolydian }), [61, 62, 64, 66, 67, 69, 71]),
            ("E DOR", Some(Key { fifths: 2, mode: Dorian }), [61, 62, 64, 66, 67, 69, 71]),
            ("Bb", Some(Key { fifths: -2, mode: Major }), [60, 62, 63, 65, 67, 69, 70]),
            ("F#m", Some(Key { fifths: 3, mode: Minor }), [61, 62, 64, 66, 68, 69, 71]),
            ("Glyd", Some(Key { fifths: 2, mode: Lydian }), [61, 62, 64, 66, 67, 69, 71]),
            ("E phr", Some(Key { fifths: 0, mode: Phrygian }), [60, 62, 64, 65, 67, 69, 71]),
            ("Bloc", Some(Key { fifths: 0, mode: Locrian }), [60, 62, 64, 65, 67, 69, 71]),
            ("D ionian", Some(Key { fifths: 2, mode: Major }), [61, 62, 64, 66, 67, 69, 71]),
            ("E aeo", Some(Key { fifths: 1, mode: Minor }), [60, 62, 64, 66, 67, 69, 71]),
            ("Cb", Some(Key { fifths: -7, mode: Major }), [59, 61, 63, 64, 66, 68, 70]),
            ("D exp ^f", Some(Key { fifths: 2, mode: Major }), [60, 62, 64, 66, 67, 69, 71]),
            ("Dm ^c", Some(Key { fifths: -1, mode: Minor }), [61, 62, 64, 65, 67, 69, 70]),
            ("none", None, [60, 62, 64, 65, 67, 69, 71]),
            ("Hp", Some(Key { fifths: 2, mode: Mixolydian }), [61, 62, 64, 66, 67, 69, 71]),
        ];
        for (field, key, expected) in cases {
            let melody = tune(&format!("M:4/4\nL:1/4\nK:{field} % comment"), "CDEFGAB");
            assert_eq!(melody.key, key, "K:{field}");
            assert_eq!(pitches(&melody), expected, "K:{field}");
        }
        let pipes = tune("K:HP", "CDEFGAB");
        assert_eq!((pipes.key, pitches(&pipes)), (None, vec![60, 62, 64, 65, 67, 69, 71]));
    }

    #[test]
    fn accidentals_last_to_the_bar_line_in_every_octave() {
        let melody = quarters("^F F f =F | F _B B __B | ^^C C2 z |");
        assert_eq!(pitches(&melody), [66, 66, 78, 65, 65, 70, 70, 69, 62, 62]);
        // The two other propagation modes of the standard.
        let octave = tune("M:4/4\nL:1/4\n%%propagate-accidentals octave\nK:C", "^F F f F |");
        assert_eq!(pitches(&octave), [66, 66, 77, 66]);
        let not = tune("M:4/4\nL:1/4\nI:propagate-accidentals not\nK:C", "^F F f F |");
        assert_eq!(pitches(&not), [66, 65, 77, 65]);
        // Against a key signature: a natural holds until the bar line, then the key is back.
        let in_g = tune("M:4/4\nL:1/4\nK:G", "F =F F f | F");
        assert_eq!(pitches(&in_g), [66, 65, 65, 77, 66]);
    }

    #[test]
    fn octaves_from_case_and_marks() {
        assert_eq!(pitches(&quarters("C, C c c' C,, c'' B,")), [48, 60, 72, 84, 36, 96, 59]);
    }

    #[test]
    fn note_lengths() {
        let melody = tune("M:4/4\nL:1/8\nK:C", "A2 A/2 A3/2 A/ A// A A4");
        let lens: Vec<f64> = melody.notes.iter().map(|n| n.len_beats).collect();
        assert_eq!(lens, [1.0, 0.25, 0.75, 0.25, 0.125, 0.5, 2.0]);
        assert_eq!(melody.notes[6].start_beats, 2.875);
    }

    #[test]
    fn broken_rhythm() {
        let melody = tune("M:4/4\nL:1/8\nK:C", "A>B A<B A>>B c2>d");
        assert_notes(
            &melody,
            &[
                (69, 0.0, 0.75),
                (71, 0.75, 0.25),
                (69, 1.0, 0.25),
                (71, 1.25, 0.75),
                (69, 2.0, 0.875),
                (71, 2.875, 0.125),
                (72, 3.0, 1.5),
                (74, 4.5, 0.25),
            ],
        );
    }

    #[test]
    fn tied_notes_merge_also_across_bar_lines() {
        let melody = quarters("C2- C2 | D4- | D2 E2- | E4 | F-G");
        assert_notes(
            &melody,
            &[(60, 0.0, 4.0), (62, 4.0, 6.0), (64, 10.0, 6.0), (65, 16.0, 1.0), (67, 17.0, 1.0)],
        );
        // A tie written apart from its note, and one whose next note is another pitch.
        assert_notes(&quarters("C2 - C2 | E-z"), &[(60, 0.0, 4.0), (64, 4.0, 1.0)]);
    }

    #[test]
    fn a_tie_carries_its_accidental_across_the_bar_line() {
        // The tied F stays sharp, as in staff notation; the next F of the bar is natural again.
        let melody = quarters("z2 ^F2- | F2 F2");
        assert_notes(&melody, &[(66, 2.0, 4.0), (65, 6.0, 2.0)]);
    }

    #[test]
    fn rests_leading_trailing_and_multi_measure() {
        let melody = quarters("z A x B | Z | Z2 | C z2");
        assert_notes(&melody, &[(69, 1.0, 1.0), (71, 3.0, 1.0), (60, 16.0, 1.0)]);
        assert_eq!(melody.end_beats, 19.0);
    }

    #[test]
    fn tuplets() {
        let third = 1.0 / 3.0;
        let melody = tune("M:4/4\nL:1/8\nK:C", "(3abc d2 (3:2:2ef g2 (5 zcdef");
        assert_notes(
            &melody,
            &[
                (81, 0.0, third),
                (83, third, third),
                (72, 2.0 * third, third),
                (74, 1.0, 1.0),
                (76, 2.0, third),
                (77, 2.0 + third, third),
                (79, 2.0 + 2.0 * third, 1.0),
                (72, 3.0 + 2.0 * third + 0.2, 0.2),
                (74, 3.0 + 2.0 * third + 0.4, 0.2),
                (76, 3.0 + 2.0 * third + 0.6, 0.2),
                (77, 3.0 + 2.0 * third + 0.8, 0.2),
            ],
        );
        // In compound meter, five notes take the time of three.
        let compound = tune("M:6/8\nL:1/8\nK:C", "(5CDEFG");
        assert!((compound.notes[0].len_beats - 0.5 * 3.0 / 5.0).abs() < TOLERANCE);
    }

    #[test]
    fn chords_keep_their_top_note() {
        let melody = quarters("[CEG] [E2G2c2] [CE]2 [Gc]/2 [c'E] [C2e] [Cz]");
        assert_notes(
            &melody,
            &[
                (67, 0.0, 1.0),
                (72, 1.0, 2.0),
                (64, 3.0, 2.0),
                (72, 5.0, 0.5),
                (84, 5.5, 1.0),
                (76, 6.5, 2.0),
                (60, 8.5, 1.0),
            ],
        );
        // A chord of rests is a rest; a tied chord ties its top note.
        assert_notes(&quarters("[z2] [CE]-[CE] C"), &[(64, 2.0, 2.0), (60, 4.0, 1.0)]);
    }

    #[test]
    fn grace_notes_decorations_and_annotations_take_no_time() {
        let melody = quarters("{g}A !trill!B +fermata+c .d ~e Tf uvg \"Am\"a \"^text\"b {/ag}c' !<(!d'");
        let starts: Vec<f64> = melody.notes.iter().map(|n| n.start_beats).collect();
        assert_eq!(starts, (0..11).map(f64::from).collect::<Vec<_>>());
        assert_eq!(pitches(&melody), [69, 71, 72, 74, 76, 77, 79, 81, 83, 84, 86]);
    }

    #[test]
    fn inline_fields_change_key_unit_and_tempo() {
        let melody = quarters("F [K:G] F [L:1/8] G G [M:3/4] A | [Q:1/4=100] B [P:A] [I:foo] c");
        assert_notes(
            &melody,
            &[
                (65, 0.0, 1.0),
                (66, 1.0, 1.0),
                (67, 2.0, 0.5),
                (67, 2.5, 0.5),
                (69, 3.0, 0.5),
                (71, 3.5, 0.5),
                (72, 4.0, 0.5),
            ],
        );
        assert_eq!(melody.meter, Some(Meter::COMMON));
        assert_eq!(melody.tempo_qpm, Some(100.0));
    }

    #[test]
    fn repeats_are_played_out() {
        let melody = quarters("|: C D :| E F :: G A :| B |]");
        assert_eq!(pitches(&melody), [60, 62, 60, 62, 64, 65, 64, 65, 67, 69, 67, 69, 71]);
        let starts: Vec<f64> = melody.notes.iter().map(|n| n.start_beats).collect();
        assert_eq!(starts, (0..13).map(f64::from).collect::<Vec<_>>());
        // The other spellings of the same bar lines.
        assert_eq!(pitches(&quarters("[| C |:: D :|: E :|] F")), [60, 62, 62, 64, 64, 65]);
    }

    #[test]
    fn a_repeat_without_its_start_goes_back_to_the_start_or_the_last_double_bar() {
        assert_eq!(
            pitches(&quarters("C D :| E || F G :| A [| B :|")),
            [60, 62, 60, 62, 64, 65, 67, 65, 67, 69, 71, 71]
        );
    }

    #[test]
    fn first_and_second_endings() {
        assert_eq!(pitches(&quarters("|: C [1 D :| [2 E |] F")), [60, 62, 60, 64, 65]);
        assert_eq!(pitches(&quarters("|: C |1 D :|2 E || F")), [60, 62, 60, 64, 65]);
        // Without |:, and with a section that follows the endings.
        assert_eq!(pitches(&quarters("C |1 D :|2 E |: F :|")), [60, 62, 60, 64, 65, 65]);
        // Ending lists: passes 1 and 3 take the first ending, 2 and 4 the second.
        assert_eq!(pitches(&quarters("|: C [1,3 D :| [2,4 E :|")), [60, 62, 60, 64, 60, 62, 60, 64]);
        // Three endings in a row.
        assert_eq!(pitches(&quarters("|: C [1 D :| [2 E :| [3 F |]")), [60, 62, 60, 64, 60, 65]);
        // Endings and times: the skipped first ending takes no time.
        let melody = quarters("|: C2 |1 D2 :|2 E2 |]");
        assert_notes(&melody, &[(60, 0.0, 2.0), (62, 2.0, 2.0), (60, 4.0, 2.0), (64, 6.0, 2.0)]);
    }

    #[test]
    fn ties_across_repeat_boundaries() {
        // Into a repeat: the first pass merges, the second starts afresh.
        let into = quarters("C2 D2- |: D2 E2 :|");
        assert_notes(
            &into,
            &[(60, 0.0, 2.0), (62, 2.0, 4.0), (64, 6.0, 2.0), (62, 8.0, 2.0), (64, 10.0, 2.0)],
        );
        // Out of a repeat: the tie holds only where the same pitch follows in played order.
        let out = quarters("|: C2 D2- :| D2 |]");
        assert_notes(&out, &[(60, 0.0, 2.0), (62, 2.0, 2.0), (60, 4.0, 2.0), (62, 6.0, 4.0)]);
    }

    #[test]
    fn pickup_bar_and_leading_rest() {
        let melody = tune("M:3/4\nL:1/4\nK:C", "z C | D E F | G3 |]");
        assert_eq!(melody.pickup_beats, 2.0);
        assert_eq!(melody.notes[0].start_beats, 1.0);
        assert_eq!(melody.end_beats, 8.0);
        assert_eq!(tune("M:3/4\nL:1/4\nK:C", "C D E | F3").pickup_beats, 0.0);
        // No meter, no pickup.
        assert_eq!(tune("M:none\nL:1/4\nK:C", "C | D E F |").pickup_beats, 0.0);
    }

    #[test]
    fn comments_directives_continuations_and_lyrics() {
        let body = "%%MIDI program 1\nC D % a comment with | bars :| that mean nothing\n% a comment line\nE \\\nF |\n\
                    w: la la la la\nW: words\nG4 |]";
        assert_eq!(pitches(&quarters(body)), [60, 62, 64, 65, 67]);
    }

    #[test]
    fn only_the_first_voice_is_kept() {
        let text =
            "X:1\nM:4/4\nL:1/4\nV:1 clef=treble\nV:2 clef=bass\nK:C\nV:1\nC D E F |\nV:2\nA, B, C D |\nK:D\n\
                    V:1\nG A B c |\n[V:2] z4 | [V:1] F |\n";
        let melody = read_one(text);
        // The K:D under V:2 is that voice's own: the last F stays natural.
        assert_eq!(pitches(&melody), [60, 62, 64, 65, 67, 69, 71, 72, 65]);
        // Inline switches, and a voice overlay (&) whose second line is dropped.
        let inline = quarters("[V:1] C D E F | [V:2] A B c d |\n[V:1] G A & B c | d");
        assert_eq!(pitches(&inline), [60, 62, 64, 65, 67, 69, 74]);
    }

    #[test]
    fn parts_follow_the_header_order() {
        let melody = read_one("X:1\nM:4/4\nL:1/4\nP:ABA\nK:C\nP:A\nC D :|\nP:B\nE F |]\n");
        assert_eq!(pitches(&melody), [60, 62, 60, 62, 64, 65, 60, 62, 60, 62]);
        // Without a header order the parts play as written.
        let written = read_one("X:1\nM:4/4\nL:1/4\nK:C\nP:A\nC D |]\nP:B\nE F |]\n");
        assert_eq!(pitches(&written), [60, 62, 64, 65]);
    }

    #[test]
    fn a_bad_tune_is_an_error_and_the_next_one_reads() {
        let text = "X:1\nT:good\nK:C\nCDEF|\n\n\
                    X:2\nT:bad length\nK:C\nCD A/0 E|\n\n\
                    X:3\nT:junk\nK:C\nCDEF|\n#### junk ####\n\n\
                    X:4\nK:C\nc'''''''' |\n\n\
                    X:5\nT:no key\nM:4/4\n\n\
                    X:6\nT:after\nK:C\nGABc|\n";
        let book = parse_tunebook(text, "book.abc");
        let read: Vec<(Option<u32>, usize)> =
            book.tunes.iter().map(|m| (m.source.number, m.source.index)).collect();
        assert_eq!(read, [(Some(1), 0), (Some(6), 5)]);
        assert_eq!(pitches(&book.tunes[1]), [67, 69, 71, 72]);
        let errors: Vec<(Option<u32>, usize)> = book.errors.iter().map(|e| (e.number, e.line)).collect();
        assert_eq!(errors, [(Some(2), 9), (Some(3), 15), (Some(4), 19), (Some(5), 21)]);
        assert!(book.errors[0].message.contains("/0"), "{}", book.errors[0]);
        assert!(book.errors[1].message.contains('#'), "{}", book.errors[1]);
        assert!(book.errors[2].message.contains("168"), "{}", book.errors[2]);
        assert_eq!(book.errors[0].path, "book.abc");
        assert_eq!(
            book.errors[3].to_string(),
            "book.abc: tune X:5 (line 21): the header has no K: field, so the tune has no body"
        );
    }

    #[test]
    fn malformed_pieces_are_errors() {
        for body in
            ["A0", "A/0", "^", "[CE", "\"unclosed", "(0abc", "[0 C", "C>>>>>D", "A99999", "__", "c,,,,,,,"]
        {
            let book = parse_tunebook(&format!("X:1\nK:C\n{body}\n"), "t.abc");
            assert_eq!((book.tunes.len(), book.errors.len()), (0, 1), "{body}");
        }
    }

    #[test]
    fn erk_fixture_matches_the_written_notes() {
        let book = read_tunebook(&fixture("erk5-first-tunes.abc")).unwrap();
        assert!(book.errors.is_empty(), "{:?}", book.errors);
        assert_eq!(book.tunes.len(), 6);
        let first = &book.tunes[0];
        assert_eq!(first.source.title.as_deref(), Some("Kaisari nokkur maetur mann"));
        assert_eq!(first.key, Some(Key { fifths: 1, mode: Mode::Major }));
        assert_eq!(first.meter, Some(Meter { numerator: 2, denominator: 4 }));
        assert_notes(
            &Melody { notes: first.notes[..9].to_vec(), ..first.clone() },
            &[
                (72, 0.0, 1.5),
                (72, 1.5, 0.25),
                (72, 1.75, 0.25),
                (72, 2.0, 1.5),
                (72, 3.5, 0.5),
                (72, 4.0, 0.5),
                (71, 4.5, 0.5),
                (69, 5.0, 1.0),
                (67, 6.0, 2.0),
            ],
        );
        // Tune 2 (6/8, A major): the natural of =c2 holds to the bar line, and a line break is
        // not one (abc2midi agrees), so the c that opens the next line is natural too.
        let second = &book.tunes[1];
        assert_eq!(
            pitches(&Melody { notes: second.notes[..6].to_vec(), ..second.clone() }),
            [69, 71, 72, 71, 69, 68]
        );
        let c_natural = second.notes.iter().find(|n| n.start_beats == 7.5).unwrap();
        assert_eq!(c_natural.pitch, 72);
        // The G of the first bar is sharp from the key.
        assert_eq!(second.notes[5].pitch, 68);
        let tied = second.notes.iter().find(|n| n.start_beats == 30.0).unwrap();
        assert_eq!((tied.pitch, tied.len_beats), (74, 2.5));
        assert_eq!(second.end_beats, 36.0);
        // Tune 3 starts with a one-beat pickup.
        assert_eq!(book.tunes[2].pickup_beats, 1.0);
        assert_eq!(book.tunes[5].source.index, 5);
    }

    #[test]
    fn ryans_mammoth_reel_with_triplets_graces_and_repeats() {
        let book = read_tunebook(&fixture("AcaciaReel.abc")).unwrap();
        assert!(book.errors.is_empty(), "{:?}", book.errors);
        let reel = &book.tunes[0];
        assert_eq!(reel.source.title.as_deref(), Some("Acacia -- Reel"));
        let sixth = 1.0 / 6.0;
        assert_notes(
            &Melody { notes: reel.notes[..4].to_vec(), ..reel.clone() },
            &[(62, 0.0, sixth), (64, sixth, sixth), (66, 2.0 * sixth, sixth), (67, 0.5, 0.5)],
        );
        assert!((reel.pickup_beats - 0.5).abs() < TOLERANCE);
        // Each 16-beat strain is played twice; the first repeat goes back to the pickup.
        assert!((reel.end_beats - 64.0).abs() < TOLERANCE);
        let again = reel.notes.iter().find(|n| (n.start_beats - 16.0).abs() < TOLERANCE).unwrap();
        assert_eq!(again.pitch, 62);
    }

    #[test]
    fn parts_and_voices_from_a_real_tunebook() {
        let book = read_tunebook(&fixture("book6-parts-and-voices.abc")).unwrap();
        assert!(book.errors.is_empty(), "{:?}", book.errors);
        let melody = &book.tunes[0];
        assert_eq!(melody.source.number, Some(1148));
        assert_eq!(melody.tempo_qpm, Some(90.0));
        // Parts A, B, A, each played twice: 24 + 24 + 24 beats.
        assert_eq!(melody.end_beats, 72.0);
        assert_notes(
            &Melody { notes: melody.notes[..5].to_vec(), ..melody.clone() },
            &[(73, 0.0, 0.5), (73, 0.5, 0.5), (73, 1.0, 0.5), (74, 1.5, 1.0), (74, 2.5, 0.5)],
        );
        let at = |beats: f64| melody.notes.iter().find(|n| n.start_beats == beats).map(|n| n.pitch);
        assert_eq!((at(12.0), at(24.0), at(48.0)), (Some(73), Some(76), Some(73)));
    }

    #[test]
    fn never_panics_on_cut_or_mangled_text() {
        for name in ["erk5-first-tunes.abc", "AcaciaReel.abc", "book6-parts-and-voices.abc"] {
            let text = std::fs::read_to_string(fixture(name)).unwrap();
            for end in (0..=text.len()).filter(|&end| text.is_char_boundary(end)) {
                parse_tunebook(&text[..end], name);
                parse_tunebook(&text[end..], name);
            }
            // Each byte of the fixture replaced by one of the ABC symbols in turn.
            let bytes = text.as_bytes();
            let symbols = b"|:[]()!+\"{}<>-/^_=',0123456789zZ&\\%";
            for i in 0..bytes.len() * 3 {
                let mut mangled = bytes.to_vec();
                mangled[i % bytes.len()] = symbols[i % symbols.len()];
                parse_tunebook(&String::from_utf8_lossy(&mangled), name);
            }
        }
    }

    /// Notes of a MIDI file as (pitch, on tick, off tick), and its ticks per quarter note.
    fn midi_notes(path: &Path) -> (Vec<(u8, u64, u64)>, u64) {
        let bytes = std::fs::read(path).unwrap();
        let smf = midly::Smf::parse(&bytes).unwrap();
        let ticks_per_quarter = match smf.header.timing {
            midly::Timing::Metrical(t) => t.as_int() as u64,
            midly::Timing::Timecode(..) => panic!("timecode"),
        };
        let mut notes = Vec::new();
        for track in &smf.tracks {
            let mut tick = 0u64;
            let mut open: Vec<(u8, u64)> = Vec::new();
            for event in track {
                tick += event.delta.as_int() as u64;
                if let midly::TrackEventKind::Midi { message, .. } = event.kind {
                    let (key, is_on) = match message {
                        midly::MidiMessage::NoteOn { key, vel } => (key.as_int(), vel.as_int() > 0),
                        midly::MidiMessage::NoteOff { key, .. } => (key.as_int(), false),
                        _ => continue,
                    };
                    if is_on {
                        open.push((key, tick));
                    } else if let Some(pos) = open.iter().position(|&(k, _)| k == key) {
                        let (k, on) = open.remove(pos);
                        notes.push((k, on, tick));
                    }
                }
            }
        }
        notes.sort_by_key(|n| (n.1, n.0));
        (notes, ticks_per_quarter)
    }

    /// Cross-check against abc2midi 4.84: run with
    /// `cargo test --release --lib music::abc::tests::erk_matches_abc2midi -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs the shared corpus"]
    fn erk_matches_abc2midi() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus");
        let mut classes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut num_exact = 0;
        let mut num_total = 0;
        let names = ["erk5", "erk10", "erk20", "erk30"];
        let texts: Vec<String> = names
            .iter()
            .map(|name| std::fs::read_to_string(corpus.join(format!("essen/{name}.abc"))).unwrap())
            .collect();
        let started = std::time::Instant::now();
        let num_parsed: usize = texts.iter().map(|text| parse_tunebook(text, "erk").tunes.len()).sum();
        println!("parsed {num_parsed} Erk tunes in {:?}", started.elapsed());
        for name in names {
            let book = read_tunebook(&corpus.join(format!("essen/{name}.abc"))).unwrap();
            for error in &book.errors {
                num_total += 1;
                classes.entry(format!("abc error: {}", error.message)).or_default().push(error.to_string());
            }
            for melody in &book.tunes {
                num_total += 1;
                let number = melody.source.number.unwrap();
                let midi_path = corpus.join(format!("midi/essen-erk-abc2midi/{name}-{number:04}.mid"));
                if !midi_path.exists() {
                    classes.entry("no midi file".into()).or_default().push(midi_path.display().to_string());
                    continue;
                }
                let (theirs, tpq) = midi_notes(&midi_path);
                let ours: Vec<(u8, f64, f64)> = melody
                    .notes
                    .iter()
                    .map(|n| (n.pitch, n.start_beats * tpq as f64, n.end_beats() * tpq as f64))
                    .collect();
                let id = format!("{name}-{number:04}");
                let close = |a: f64, b: u64| (a - b as f64).abs() <= 2.0;
                let class = if ours.len() != theirs.len() {
                    Some("note count differs".to_string())
                } else if ours.iter().zip(&theirs).any(|(o, t)| o.0 != t.0) {
                    Some("pitch differs".to_string())
                } else if ours.iter().zip(&theirs).any(|(o, t)| !close(o.1, t.1)) {
                    Some("onset differs".to_string())
                } else if ours.iter().zip(&theirs).any(|(o, t)| !close(o.2, t.2)) {
                    Some("end differs".to_string())
                } else {
                    None
                };
                match class {
                    None => num_exact += 1,
                    Some(class) => {
                        let first = ours
                            .iter()
                            .zip(&theirs)
                            .position(|(o, t)| o.0 != t.0 || !close(o.1, t.1) || !close(o.2, t.2))
                            .unwrap_or(ours.len().min(theirs.len()));
                        let detail = format!(
                            "{id}: at note {first}: ours {:?} theirs {:?} (ours {} notes, theirs {})",
                            ours.get(first).map(|o| (o.0, o.1 / tpq as f64, o.2 / tpq as f64)),
                            theirs.get(first).map(|t| (
                                t.0,
                                t.1 as f64 / tpq as f64,
                                t.2 as f64 / tpq as f64
                            )),
                            ours.len(),
                            theirs.len()
                        );
                        classes.entry(class).or_default().push(detail);
                    }
                }
            }
        }
        println!("{num_exact} of {num_total} Erk tunes match abc2midi exactly");
        for (class, items) in &classes {
            println!("{class}: {}", items.len());
            for item in items.iter().take(8) {
                println!("    {item}");
            }
        }
    }

    /// Parse counts over the whole ABC corpus: run with
    /// `cargo test --release --lib music::abc::tests::corpus_parse_counts -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs the shared corpus"]
    fn corpus_parse_counts() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus");
        for folder in ["essen", "ryans-mammoth", "misc-folk"] {
            let mut paths: Vec<_> = std::fs::read_dir(corpus.join(folder))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "abc"))
                .collect();
            paths.sort();
            let (mut num_tunes, mut num_errors) = (0, 0);
            let mut classes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            let started = std::time::Instant::now();
            for path in &paths {
                let book = read_tunebook(path).unwrap();
                num_tunes += book.tunes.len();
                num_errors += book.errors.len();
                for error in book.errors {
                    let class: String = error.message.split(['"', '\'']).next().unwrap_or("").to_string();
                    classes.entry(class).or_default().push(error.to_string());
                }
            }
            println!(
                "{folder}: {} files, {num_tunes} tunes read, {num_errors} errors, {:?}",
                paths.len(),
                started.elapsed()
            );
            for (class, items) in &classes {
                println!("  {class}: {}", items.len());
                for item in items.iter().take(4) {
                    println!("      {item}");
                }
            }
        }
    }
}
