//! A pass-through gRPC codec over `bytes::Bytes`, so the load generator can send a request it
//! encoded once, many times, without re-encoding it per call.
//!
//! ```no_run
//! # async fn demo(channel: tonic::transport::Channel, body: bytes::Bytes) -> Result<(), tonic::Status> {
//! use infergate_client::raw::{RawCodec, MODEL_INFER_PATH};
//! let mut grpc = tonic::client::Grpc::new(channel);
//! grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
//! let path = tonic::codegen::http::uri::PathAndQuery::from_static(MODEL_INFER_PATH);
//! let reply: tonic::Response<bytes::Bytes> =
//!     grpc.unary(tonic::Request::new(body), path, RawCodec).await?;
//! # Ok(()) }
//! ```

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;

/// The path of `inference.GRPCInferenceService/ModelInfer`.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A codec whose messages are already-encoded protobuf bytes, in both directions.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// Writes pre-encoded message bytes into the frame as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

/// Hands back each received message's bytes undecoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}

/// Sends one pre-encoded unary request on `channel` to `path` and returns the response's
/// undecoded bytes (with headers and trailers in the response metadata).
pub async fn unary_raw(
    channel: Channel,
    path: PathAndQuery,
    request: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    grpc.unary(request, path, RawCodec).await
}
