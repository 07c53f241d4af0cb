//! The one place that chooses the binary encoding of messages.
//!
//! postcard (with serde) rather than bincode: bincode is discontinued upstream and flagged as
//! unmaintained (RUSTSEC-2025-0141). Swapping encodings means changing this file only.

use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    #[error("malformed message: {0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let encoded = postcard::to_extend(value, std::mem::take(out)).map_err(CodecError::Encode)?;
    *out = encoded;
    Ok(())
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes exactly one value from `bytes`; hostile input yields an error, never a panic.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(CodecError::Decode)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(value)
}
