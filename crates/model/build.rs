//! Deflates the built-in models' weights and tune memory into `OUT_DIR`, where
//! `include_bytes!` embeds them: the bundles carry about 2.1 MB less, and the worker inflates
//! each once per process when it first loads the model (`io::inflate_builtin`). The weights'
//! f32 tensors are deflated in byte planes (`src/byte_planes.rs`), which saves 0.3 MB more.
//! Runs on: the build.

use std::path::{Path, PathBuf};

#[path = "src/byte_planes.rs"]
mod byte_planes;

/// The files deflated, under `presets/models`: each becomes `OUT_DIR/<dir>-<file>.deflate`.
const FILES: [(&str, &str); 3] =
    [("default", "model.safetensors"), ("default", "memory.bin"), ("chords", "model.safetensors")];

fn main() {
    let presets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../presets/models");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (dir, file) in FILES {
        let source = presets.join(dir).join(file);
        println!("cargo:rerun-if-changed={}", source.display());
        let mut bytes =
            std::fs::read(&source).unwrap_or_else(|err| panic!("reading {}: {err}", source.display()));
        if file.ends_with(".safetensors") {
            byte_planes::rearrange(
                &mut bytes,
                byte_planes::F32Bytes::Interleaved,
                byte_planes::F32Bytes::Planes,
            )
            .unwrap_or_else(|err| panic!("{}: {err}", source.display()));
        }
        let deflated = miniz_oxide::deflate::compress_to_vec(&bytes, 9);
        let target = out.join(format!("{dir}-{file}.deflate"));
        std::fs::write(&target, deflated).unwrap_or_else(|err| panic!("writing {}: {err}", target.display()));
    }
}
