//! `cargo xtask generate` writes the same notes, byte for byte, as when these files were made
//! (`tests/data/generate/`, see its README): the built-in models, the sampling and the MIDI
//! writer may change how they work, never what they give for a seed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root: the commands take paths relative to it.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `xtask generate` with `args`, writing to a temporary file, and compares what it prints
/// and writes with `tests/data/generate/{name}.txt` and `.mid`.
fn assert_generates_as_before(name: &str, args: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join(format!("{name}.mid"));
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root())
        .arg("generate")
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    let printed =
        String::from_utf8(output.stdout).unwrap().replace(&format!("{}/", out_dir.path().display()), "OUT/");
    let expected_dir = root().join("tests/data/generate");
    let expected = std::fs::read_to_string(expected_dir.join(format!("{name}.txt"))).unwrap();
    assert_eq!(printed, expected, "{name}: the printed symbols changed");
    let written = std::fs::read(&out).unwrap();
    let expected = std::fs::read(expected_dir.join(format!("{name}.mid"))).unwrap();
    assert!(written == expected, "{name}: the MIDI file changed");
}

#[test]
fn the_readme_primer() {
    assert_generates_as_before(
        "readme",
        &["--primer", "72 _ _ _ 74 _ 76 _ 77 _ _ _ 76 _ 74 _", "--bars", "4", "--seed", "1", "--scale", "C"],
    );
}

#[test]
fn an_abc_tune_hot_with_top_k() {
    let args =
        ["--primer", "tests/data/abc/erk5-first-tunes.abc", "--tune", "2", "--bars", "8", "--seed", "7"];
    let sampling = ["--temperature", "1.4", "--top-k", "20"];
    assert_generates_as_before("abc-hot", &[&args[..], &sampling[..]].concat());
}

#[test]
fn a_midi_file_cold_without_the_memory() {
    let args = ["--primer", "tests/data/midi/erk10-0226.mid", "--bars", "4", "--seed", "3"];
    assert_generates_as_before(
        "midi-cold",
        &[&args[..], &["--temperature", "0.5", "--no-memory"][..]].concat(),
    );
}

#[test]
fn a_jig_in_a_range_with_top_p() {
    let args = ["--primer", "67 _ _ 69 _ _ 71 _ _ _ _ _", "--meter", "6/8", "--pickup", "0", "--bars", "6"];
    let sampling = ["--seed", "11", "--top-p", "0.9", "--lowest", "60", "--highest", "79", "--no-end"];
    assert_generates_as_before("jig", &[&args[..], &sampling[..]].concat());
}

#[test]
fn a_reel_with_folk_wide() {
    let args = ["--model", "presets/models/folk-wide", "--primer", "tests/data/abc/AcaciaReel.abc"];
    assert_generates_as_before(
        "folkwide",
        &[&args[..], &["--bars", "4", "--seed", "5", "--scale", "E minor"][..]].concat(),
    );
}
