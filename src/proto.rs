//! Code generated from `proto/` at build time (see build.rs).

/// The Kubernetes KMS v2 plugin API and kube-apiserver's stored envelope (package `v2`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod kmsv2 {
    tonic::include_proto!("v2");
}

/// The kubekms key API for workloads (package `kubekms.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod keyapi {
    tonic::include_proto!("kubekms.v1");
}
