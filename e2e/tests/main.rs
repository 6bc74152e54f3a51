//! End-to-end tests against the real control plane that `make up` starts (etcd and
//! kube-apiserver built from the Go module proxy). Run them with `make test`, or against a
//! running `make up` with `cargo test --test e2e`; a plain `cargo test` does not build them
//! (`test = false` in Cargo.toml), so it needs no control plane.

// A test crate: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod audit;
mod aws;
mod chart;
mod crds;
mod fresh;
mod hsm;
mod import;
mod keyapi;
mod lifecycle;
mod migration;
mod plugin;
mod redteam;
mod restore;
mod rootrotate;
mod story;
mod usage;
mod versions;
