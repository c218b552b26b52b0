//! Fuzzes the header of a model's `model.safetensors`: the fuzzer's bytes become the JSON header
//! (with its length in front, as the format has it) before the shipped model's tensor data, so
//! the reader meets lying offsets, shapes and types over real data. It loads or is refused with
//! the file named (`common::model_dir`).
//! Runs on: the fuzzer's thread.

#![no_main]

#[path = "common/model_dir.rs"]
mod model_dir;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// The shipped weights' tensor data: what follows their header.
fn tensor_data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| {
        let weights =
            std::fs::read(model_dir::shipped_dir().join("model.safetensors")).expect("the shipped weights");
        let header_len = u64::from_le_bytes(weights[..8].try_into().expect("8 bytes")) as usize;
        weights[8 + header_len..].to_vec()
    })
}

fuzz_target!(|header: &[u8]| {
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(tensor_data());
    model_dir::load_with("model.safetensors", &file);
});
