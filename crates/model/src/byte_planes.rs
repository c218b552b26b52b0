//! The layout the built-in models' weights are embedded in: each f32 tensor's bytes regrouped
//! into four planes (every value's lowest byte, then every value's second byte, and so on).
//! Trained weights share their sign and exponent bytes far more than their low mantissa bytes,
//! so the planes deflate about 10 % smaller than the values side by side; the regrouping is
//! exact, and int8 tensors and the header are left as they are.
//! Runs on: the build (`build.rs` includes this file) and the worker thread, when it inflates
//! a built-in model.

use std::ops::Range;

use safetensors::{Dtype, SafeTensors};

/// How the bytes of a safetensors file's f32 tensors lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Bytes {
    /// Each value's four bytes together, as the format stores them.
    Interleaved,
    /// Four planes per tensor: byte 0 of every value, then byte 1, then 2, then 3.
    Planes,
}

/// Rearranges the data of every f32 tensor of the safetensors file `file` from `from` to `to`;
/// the problem named where the header cannot be read.
pub fn rearrange(file: &mut [u8], from: F32Bytes, to: F32Bytes) -> Result<(), String> {
    if from == to {
        return Ok(());
    }
    let mut scratch = Vec::new();
    for range in f32_ranges(file)? {
        let data = &mut file[range];
        let values = data.len() / 4;
        scratch.clear();
        scratch.extend_from_slice(data);
        for value in 0..values {
            for byte in 0..4 {
                let (interleaved, planar) = (value * 4 + byte, byte * values + value);
                match to {
                    F32Bytes::Planes => data[planar] = scratch[interleaved],
                    F32Bytes::Interleaved => data[interleaved] = scratch[planar],
                }
            }
        }
    }
    Ok(())
}

/// Where in `file` the data of each f32 tensor lies.
fn f32_ranges(file: &[u8]) -> Result<Vec<Range<usize>>, String> {
    let (header_len, metadata) = SafeTensors::read_metadata(file)
        .map_err(|err| format!("cannot read the safetensors header: {err}"))?;
    let data_start = 8 + header_len;
    let mut ranges = Vec::new();
    for info in metadata.tensors().values().filter(|info| info.dtype == Dtype::F32) {
        let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
        if end > file.len() || start > end || (end - start) % 4 != 0 {
            return Err(format!(
                "an f32 tensor's data ({start}..{end}) does not fit the file's {} bytes",
                file.len()
            ));
        }
        ranges.push(start..end);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file with an f32 tensor of `values` and an int8 tensor of `bytes`.
    fn file(values: &[f32], bytes: &[i8]) -> Vec<u8> {
        let f32_data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let i8_data: Vec<u8> = bytes.iter().map(|&b| b as u8).collect();
        let tensors = [
            ("a", safetensors::tensor::TensorView::new(Dtype::F32, vec![values.len()], &f32_data).unwrap()),
            ("b", safetensors::tensor::TensorView::new(Dtype::I8, vec![bytes.len()], &i8_data).unwrap()),
        ];
        safetensors::serialize(tensors, None).unwrap()
    }

    #[test]
    fn planes_group_each_byte_of_the_values_and_come_back_exactly() {
        let values = [1.5f32, -2.25, 3.0e-7, f32::MAX, -0.0];
        let original = file(&values, &[-127, 5, 127]);
        let mut planes = original.clone();
        rearrange(&mut planes, F32Bytes::Interleaved, F32Bytes::Planes).unwrap();
        assert_ne!(planes, original);
        let tensors = SafeTensors::deserialize(&planes).unwrap();
        let a = tensors.tensor("a").unwrap().data().to_vec();
        let highest_bytes: Vec<u8> = values.iter().map(|v| v.to_le_bytes()[3]).collect();
        assert_eq!(&a[3 * values.len()..], highest_bytes.as_slice());
        assert_eq!(tensors.tensor("b").unwrap().data(), &[129, 5, 127], "int8 data is left alone");

        rearrange(&mut planes, F32Bytes::Planes, F32Bytes::Interleaved).unwrap();
        assert_eq!(planes, original);
    }

    #[test]
    fn a_damaged_header_is_named_and_the_bytes_are_left_alone() {
        let mut junk = b"\x10\0\0\0\0\0\0\0{\"a\": nonsense}".to_vec();
        let before = junk.clone();
        let err = rearrange(&mut junk, F32Bytes::Planes, F32Bytes::Interleaved).unwrap_err();
        assert!(err.contains("safetensors header"), "{err}");
        assert_eq!(junk, before);
    }
}
