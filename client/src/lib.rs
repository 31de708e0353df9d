//! infergate's client library: a typed KServe v2 gRPC client, tensor encoding helpers, a
//! raw-bytes codec, and the load generator behind `infergate-cli bench`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), infergate_client::ClientError> {
//! let client = infergate_client::Client::connect("127.0.0.1:8001")
//!     .await?
//!     .with_header("x-tenant", "team-a")?;
//! let (sum, diff) = client.infer_simple([1; 16], [2; 16]).await?;
//! assert_eq!(sum[0], 3);
//! assert_eq!(diff[0], -1);
//! let tokens = client.generate("hello", 4).await?;
//! # let _ = tokens; Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
mod client;
mod error;
pub mod input;
pub mod raw;
pub mod tensor;
pub mod trace;

pub use client::{
    connect_channel, endpoint, endpoint_uri, generate_request, parse_header, read_stream_response,
    use_tls, Client, TlsOptions, FINAL_RESPONSE_PARAM, MAX_MESSAGE_BYTES,
};
pub use error::{code_name, ClientError};
pub use input::{parse_infer_json, parse_input_flag, InferSpec};
pub use tensor::{build_request, decode_output, decode_outputs, Tensor, TensorData};

/// The generated KServe v2 types, re-exported for convenience.
pub use infergate_proto::inference as proto;
