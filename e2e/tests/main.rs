//! End-to-end tests against the real control plane that `make up` starts (etcd and
//! kube-apiserver built from the Go module proxy). Run them with `make test`.

// A test crate: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod chart;
mod crds;
mod keyapi;
mod lifecycle;
mod plugin;
