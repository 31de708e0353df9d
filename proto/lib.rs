//! Generated code for infergate's wire contracts, compiled from the .proto files in this
//! folder by the workspace's build.rs.
//!
//! - [`inference`]: the KServe v2 / Open Inference Protocol gRPC API with Triton's
//!   extensions (`ModelStreamInfer`, `ModelConfig`, `ModelStatistics`, `RepositoryIndex`).
//! - [`orca`]: ORCA load reports (`xds.data.orca.v3`) and the out-of-band service
//!   (`xds.service.orca.v3`).
//! - [`admin`]: infergate's control plane, `infergate.admin.v1.Admin`.
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
