//! Fuzzes a model directory's `memory.bin` (the tune memory's songs): any bytes load or are
//! refused with the file named (`common::model_dir`).
//! Runs on: the fuzzer's thread.

#![no_main]

#[path = "common/model_dir.rs"]
mod model_dir;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| model_dir::load_with("memory.bin", bytes));
