//! Generated code for infergate's wire contracts, compiled from the .proto files in this
//! folder by the workspace's build.rs.
//!
//! - [`inference`]: the KServe v2 / Open Inference Protocol gRPC API with Triton's
//!   extensions (`ModelStreamInfer`, `ModelConfig`, `ModelStatistics`, `RepositoryIndex`).
//! - [`orca`]: ORCA load reports (`xds.data.orca.v3`) and the out-of-band service
//!   (`xds.service.orca.v3`).
//! - [`admin`]: infergate's control plane, `infergate.admin.v1.Admin`.
//! - [`propagation`]: W3C trace context carried in gRPC metadata, shared by the
//!   gateway and the client (hand-written, the only part that is).
#![allow(clippy::all, clippy::unwrap_used, missing_docs)]

/// `package inference;`
pub mod inference {
    tonic::include_proto!("inference");
}

/// The xDS packages (ORCA load reporting).
pub mod xds {
    /// `xds.data`
    pub mod data {
        /// `xds.data.orca`
        pub mod orca {
            /// `package xds.data.orca.v3;`
            pub mod v3 {
                tonic::include_proto!("xds.data.orca.v3");
            }
        }
    }
    /// `xds.service`
    pub mod service {
        /// `xds.service.orca`
        pub mod orca {
            /// `package xds.service.orca.v3;`
            pub mod v3 {
                tonic::include_proto!("xds.service.orca.v3");
            }
        }
    }
}

/// ORCA messages and service under short names.
pub mod orca {
    pub use crate::xds::data::orca::v3::OrcaLoadReport;
    pub use crate::xds::service::orca::v3::*;
}

/// `package infergate.admin.v1;`
pub mod admin {
    tonic::include_proto!("infergate.admin.v1");
}

/// Encoded `FileDescriptorSet` of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/infergate_descriptor.bin"));

/// The canonical upper-case name of a gRPC status code (`UNAVAILABLE`,
/// `DEADLINE_EXCEEDED`, ...), as the gRPC specification spells it. One table for the
/// gateway's metrics, its config parsing and the client's messages.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// W3C trace context (`traceparent`, `tracestate`) carried in tonic's gRPC metadata:
/// the OpenTelemetry extractor and injector over a `MetadataMap`, one for the gateway
/// and the client alike. Reading borrows the map's values without copying them.
pub mod propagation {
    use opentelemetry::propagation::{Extractor, Injector};
    use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};

    /// Reads trace metadata from a call's metadata.
    pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

    impl Extractor for MetadataExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0
                .keys()
                .filter_map(|k| match k {
                    KeyRef::Ascii(k) => Some(k.as_str()),
                    KeyRef::Binary(_) => None,
                })
                .collect()
        }
    }

    /// Writes trace metadata into a call's metadata, replacing what was there.
    pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

    impl Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                self.0.insert(k, v);
            }
        }
    }
}
