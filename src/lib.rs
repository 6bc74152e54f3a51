//! kubekms: a key management service that lives inside Kubernetes.
//!
//! `api` holds the custom resources (the public contract).

pub mod api;
pub mod audit;
#[cfg(test)]
mod boundaries;
pub mod call;
pub mod client;
pub mod controller;
pub mod crypto;
pub mod domain;
pub mod envelope;
pub mod file_envelope;
pub mod keyring;
pub mod kubeclient;
pub mod manifests;
pub mod metering;
pub mod plugin;
pub mod proto;
pub mod server;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod usage;
