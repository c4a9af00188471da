//! Reading an HTTP answer's body with a cap, for every peer rekey talks to (providers
//! and Vault): a broken or hostile server that streams without end, or announces a huge
//! body, must not exhaust memory. Each caller words the error for its own peer.

/// Why a body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than the cap (announced, or streamed past it).
    TooLarge,
    /// The exchange broke (or timed out) while reading.
    Read(reqwest::Error),
}

/// Reads `resp`'s body chunk by chunk and gives up past `max` bytes (a missing or
/// lying `Content-Length` does not get past the cap).
pub async fn read_capped(
    resp: &mut reqwest::Response,
    max: usize,
) -> Result<bytes::Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if buf.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
