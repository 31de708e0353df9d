//! gRPC message framing and protobuf peeking: how the gateway reads the few fields it
//! routes on (model name, version, id) straight from the request bytes.
//!
//! The gateway never decodes tensors. A request body is cut into length-prefixed gRPC
//! messages ([`Deframer`]), and each message is walked at its top level only
//! ([`peek_route`]): length-delimited fields are skipped by their length, so the cost is
//! one pass over the field headers, not over the payload. A message that arrives in a
//! single HTTP/2 DATA frame is sliced without copying; one split across frames is copied
//! once into a buffer sized from its length prefix.

use bytes::{Buf, Bytes, BytesMut};
use std::fmt;

/// Size of the gRPC length-prefixed message header: compressed flag + u32 length.
pub const HEADER_LEN: usize = 5;

/// One gRPC message, still framed exactly as it came (header and payload), so it can be
/// forwarded as it is.
#[derive(Clone, Debug)]
pub struct Message {
    framed: Bytes,
}

impl Message {
    /// Frames `payload` as an uncompressed gRPC message (one copy; used only for the
    /// gateway's own small messages).
    pub fn encode(payload: &[u8]) -> Self {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&[0]);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
        Message {
            framed: buf.freeze(),
        }
    }

    /// Whether the sender compressed the payload (`grpc-encoding`).
    pub fn compressed(&self) -> bool {
        self.framed.first().is_some_and(|flag| *flag != 0)
    }

    /// The protobuf payload.
    pub fn payload(&self) -> Bytes {
        self.framed.slice(HEADER_LEN..)
    }

    /// Header and payload, ready to forward.
    pub fn framed(&self) -> Bytes {
        self.framed.clone()
    }

    /// Bytes on the wire, header included.
    pub fn wire_len(&self) -> usize {
        self.framed.len()
    }
}

/// Why a request body could not be cut into messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the configured limit.
    TooLarge { len: usize, limit: usize },
    /// The compressed flag is neither 0 nor 1.
    BadFlag(u8),
    /// The body ended inside a message.
    Truncated { have: usize, want: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, limit } => write!(
                f,
                "message of {len} bytes exceeds the gateway's limit of {limit} bytes (max_message_bytes)"
            ),
            FrameError::BadFlag(flag) => {
                write!(f, "malformed gRPC frame: compressed flag is {flag}, not 0 or 1")
            }
            FrameError::Truncated { have, want } => write!(
                f,
                "request body ended inside a message: {have} of {want} bytes received"
            ),
        }
    }
}

/// Cuts a stream of body chunks into gRPC messages, checking each length prefix against
/// the size limit before any of the payload is buffered.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    limit: usize,
}

impl Deframer {
    /// A deframer that refuses messages larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Deframer {
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Feeds one body chunk and appends every message it completes to `out`.
    pub fn push(&mut self, mut chunk: Bytes, out: &mut Vec<Message>) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            // Fast path: whole messages inside this chunk are sliced, not copied.
            while let Some(want) = self.complete_len(&chunk)? {
                out.push(Message {
                    framed: chunk.split_to(want),
                });
            }
            if chunk.is_empty() {
                return Ok(());
            }
            if chunk.len() >= HEADER_LEN {
                let want = self.check_header(&chunk)?;
                self.buf.reserve(want);
            }
        }
        self.buf.extend_from_slice(&chunk);
        while let Some(want) = self.complete_len(&self.buf)? {
            out.push(Message {
                framed: self.buf.split_to(want).freeze(),
            });
            if let Some(next) = self.header_len(&self.buf)? {
                self.buf.reserve(next.saturating_sub(self.buf.len()));
            }
        }
        Ok(())
    }

    /// Called at end of body: fails if a message was left incomplete.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = self.header_len(&self.buf)?.unwrap_or(HEADER_LEN);
        Err(FrameError::Truncated {
            have: self.buf.len(),
            want,
        })
    }

    fn check_header(&self, bytes: &[u8]) -> Result<usize, FrameError> {
        let flag = bytes[0];
        if flag > 1 {
            return Err(FrameError::BadFlag(flag));
        }
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        Ok(HEADER_LEN + len)
    }

    fn header_len(&self, bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Ok(None);
        }
        self.check_header(bytes).map(Some)
    }

    fn complete_len(&self, bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        Ok(self.header_len(bytes)?.filter(|want| bytes.len() >= *want))
    }
}

/// The fields of a request the gateway routes on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteKey {
    /// `model_name` (ModelInferRequest) or `name` (metadata, config, statistics).
    pub model: String,
    /// `model_version` / `version`; empty means the backend's choice.
    pub version: String,
    /// `id` (ModelInferRequest only); echoed in errors so callers can match them.
    pub id: String,
}

/// Why a payload is not a well-formed protobuf message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekError(pub String);

impl fmt::Display for PeekError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads fields 1 (model name), 2 (version) and, when `with_id`, 3 (id) from a protobuf
/// payload, walking every top-level field so that a malformed message is caught here
/// rather than by the backend. Those field numbers are the same in `ModelInferRequest`,
/// `ModelMetadataRequest`, `ModelConfigRequest` and `ModelStatisticsRequest`.
pub fn peek_route(mut payload: &[u8], with_id: bool) -> Result<RouteKey, PeekError> {
    let mut key = RouteKey::default();
    while payload.has_remaining() {
        let tag = read_varint(&mut payload)
            .ok_or_else(|| PeekError("malformed protobuf: truncated field tag".into()))?;
        let field = tag >> 3;
        let wire_type = (tag & 7) as u8;
        if field == 0 {
            return Err(PeekError("malformed protobuf: field number 0".into()));
        }
        match wire_type {
            0 => {
                read_varint(&mut payload).ok_or_else(|| {
                    PeekError(format!(
                        "malformed protobuf: truncated varint in field {field}"
                    ))
                })?;
            }
            1 | 5 => {
                let width = if wire_type == 1 { 8 } else { 4 };
                if payload.remaining() < width {
                    return Err(PeekError(format!(
                        "malformed protobuf: truncated fixed-width field {field}"
                    )));
                }
                payload.advance(width);
            }
            2 => {
                let len = read_varint(&mut payload).ok_or_else(|| {
                    PeekError(format!(
                        "malformed protobuf: truncated length of field {field}"
                    ))
                })? as usize;
                if payload.remaining() < len {
                    return Err(PeekError(format!(
                        "malformed protobuf: field {field} announces {len} bytes, {} remain",
                        payload.remaining()
                    )));
                }
                let value = &payload[..len];
                let slot = match field {
                    1 => Some(&mut key.model),
                    2 => Some(&mut key.version),
                    3 if with_id => Some(&mut key.id),
                    _ => None,
                };
                if let Some(slot) = slot {
                    *slot = std::str::from_utf8(value)
                        .map_err(|_| {
                            PeekError(format!("malformed protobuf: field {field} is not UTF-8"))
                        })?
                        .to_owned();
                }
                payload.advance(len);
            }
            other => {
                return Err(PeekError(format!(
                    "malformed protobuf: field {field} has unsupported wire type {other}"
                )))
            }
        }
    }
    Ok(key)
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::ModelInferRequest;
    use prost::Message as _;

    fn request() -> Vec<u8> {
        ModelInferRequest {
            model_name: "simple".into(),
            model_version: "1".into(),
            id: "req-7".into(),
            raw_input_contents: vec![vec![7u8; 300]],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn peeks_routing_fields_and_skips_tensors() {
        let key = peek_route(&request(), true).expect("well-formed");
        assert_eq!(key.model, "simple");
        assert_eq!(key.version, "1");
        assert_eq!(key.id, "req-7");
    }

    #[test]
    fn truncated_payload_is_rejected_with_the_field_named() {
        let bytes = request();
        let err = peek_route(&bytes[..bytes.len() - 10], true).expect_err("truncated");
        assert!(err.0.contains("field 7"), "{err}");
        assert!(peek_route(&[0xff, 0xff], true).is_err());
        assert!(peek_route(&[0x0f], true).is_err(), "wire type 7");
    }

    #[test]
    fn deframer_slices_whole_messages_and_joins_split_ones() {
        let a = Message::encode(&request());
        let b = Message::encode(b"\x0a\x01x");
        let mut joined = BytesMut::new();
        joined.extend_from_slice(&a.framed());
        joined.extend_from_slice(&b.framed());
        let joined = joined.freeze();

        let mut out = Vec::new();
        let mut d = Deframer::new(1 << 20);
        d.push(joined.clone(), &mut out).expect("ok");
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].payload().as_ref(), b"\x0a\x01x");

        // The same bytes cut every 7 bytes give the same messages.
        let mut out2 = Vec::new();
        let mut d2 = Deframer::new(1 << 20);
        for start in (0..joined.len()).step_by(7) {
            let end = (start + 7).min(joined.len());
            d2.push(joined.slice(start..end), &mut out2).expect("ok");
        }
        d2.finish().expect("complete");
        assert_eq!(out2.len(), 2);
        assert_eq!(out2[0].framed(), a.framed());
    }

    #[test]
    fn deframer_refuses_oversized_before_buffering() {
        let mut d = Deframer::new(10);
        let mut out = Vec::new();
        let err = d
            .push(Bytes::from_static(&[0, 0, 0, 1, 0]), &mut out)
            .expect_err("too large");
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 256,
                limit: 10
            }
        );
        let mut d = Deframer::new(10);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 4, 1]), &mut out)
            .expect("partial");
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { have: 6, want: 9 })
        ));
        assert!(matches!(
            Deframer::new(10).push(Bytes::from_static(&[9, 0, 0, 0, 0]), &mut out),
            Err(FrameError::BadFlag(9))
        ));
    }
}
