//! The client's error type: what went wrong on a call, with the gRPC code and a hint for people.

use std::fmt;

/// Everything that can go wrong in the client library.
///
/// Each variant keeps its source so callers can inspect it; [`ClientError::hint`] turns the
/// common failures into a sentence telling a person what to try next.
#[derive(Debug)]
pub enum ClientError {
    /// The address could not be turned into a gRPC endpoint URI.
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The TCP / HTTP/2 connection could not be opened.
    Connect {
        /// The endpoint URI we dialled.
        addr: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The server answered the call with a non-OK gRPC status.
    Rpc(tonic::Status),
    /// A streamed response carried a non-empty `error_message`.
    Stream(String),
    /// The server's answer did not have the shape we expected (missing output, bad raw bytes).
    Protocol(String),
    /// The caller's input was not valid (a malformed `--input`, a bad JSON file, a bad header).
    InvalidInput(String),
    /// A file could not be read.
    Io {
        /// The path that failed.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ClientError {
    /// The gRPC status code of this error, where there is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc(status) => Some(status.code()),
            ClientError::Connect { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }

    /// A short sentence suggesting what to do about this error, for command-line users.
    pub fn hint(&self) -> Option<&'static str> {
        use tonic::Code;
        match self {
            ClientError::Connect { .. } => Some(
                "is the gateway running? start it with `infergate demo`, or point --addr / INFERGATE_ADDR at it",
            ),
            ClientError::InvalidAddress { .. } => {
                Some("give an address like 127.0.0.1:8001 or http://host:8001")
            }
            ClientError::Rpc(status) => match status.code() {
                Code::Unavailable => Some(
                    "is the gateway running and does it have a ready backend? start it with `infergate demo`",
                ),
                Code::NotFound => Some("list the models the server knows with `infergate-cli models`"),
                Code::Unimplemented => Some("the server does not implement this RPC or model"),
                Code::DeadlineExceeded => Some("the call timed out; raise the timeout or check the backend's load"),
                Code::ResourceExhausted => Some("the server shed load; retry later or lower the request rate"),
                Code::Unauthenticated | Code::PermissionDenied => {
                    Some("pass credentials with --header, e.g. --header authorization='Bearer <key>'")
                }
                Code::InvalidArgument => Some("check the input names, datatypes and shapes with the model's metadata"),
                _ => None,
            },
            ClientError::InvalidInput(_) => {
                Some("inputs are NAME:DATATYPE:SHAPE:VALUES, e.g. INPUT0:INT32:1,16:1,2,3,...")
            }
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::InvalidAddress { addr, reason } => {
                write!(f, "invalid address {addr:?}: {reason}")
            }
            ClientError::Connect { addr, source } => {
                write!(f, "UNAVAILABLE: could not connect to {addr}: {source}")?;
                // tonic's transport error says little by itself; the causes say what happened
                // (some layers repeat their cause's text, so repeats are skipped).
                let mut last = source.to_string();
                let mut cause = std::error::Error::source(source);
                while let Some(err) = cause {
                    let text = err.to_string();
                    if text != last {
                        write!(f, ": {text}")?;
                        last = text;
                    }
                    cause = err.source();
                }
                Ok(())
            }
            ClientError::Rpc(status) => {
                write!(f, "{}: {}", code_name(status.code()), status.message())
            }
            ClientError::Stream(msg) => write!(f, "stream error: {msg}"),
            ClientError::Protocol(msg) => write!(f, "unexpected response: {msg}"),
            ClientError::InvalidInput(msg) => write!(f, "invalid input: {msg}"),
            ClientError::Io { path, source } => write!(f, "{path}: {source}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } => Some(source),
            ClientError::Rpc(status) => Some(status),
            ClientError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Rpc(status)
    }
}

/// The canonical upper-case name of a gRPC status code (`UNAVAILABLE`, ...).
pub use infergate_proto::code_name;
