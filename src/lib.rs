//! kubekms: a key management service that lives inside Kubernetes.
//!
//! `api` holds the custom resources (the public contract).

pub mod api;
pub mod controller;
pub mod crypto;
pub mod keyring;
pub mod kubeclient;
pub mod telemetry;
