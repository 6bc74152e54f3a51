//! `KmsKeyUsage`: when each version of one key was last used, as the KMS plugins and the
//! key API servers report it. Internal to kubekms.
//!
//! Cluster-scoped like `KmsKeyMaterial`, and named like it (the key's UID). Each reporter
//! (one plugin, one key API replica) owns one entry of `spec.reporters` through
//! server-side apply and writes it at most once per version and use per period
//! (`granularitySeconds`, a day by default), so recording use costs no write per call. The
//! controller reads it to decide whether a deletion needs `force`, to postpone a
//! destruction when a pending key is still asked for, and to start a storage migration
//! once kube-apiserver encrypts under a new version.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::material::{KeyOwner, MAX_VERSIONS};

/// The most reporters one key's usage record holds.
pub const MAX_REPORTERS: usize = 256;

/// When each version of one KmsKey was last used, per reporter. Written only by kubekms's
/// plugins and key API servers.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "kms.kubekms.io",
    version = "v1alpha1",
    kind = "KmsKeyUsage",
    plural = "kmskeyusages",
    singular = "kmskeyusage",
    category = "kubekms-internal",
    doc = "Internal to kubekms: when each version of one KmsKey was last used.",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.owner.namespace"),
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.owner.name"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.owner == oldSelf.owner").message("owner is immutable"))]
pub struct KmsKeyUsageSpec {
    /// The KmsKey whose use this records.
    pub owner: KeyOwner,

    /// One entry per reporter, each written by that reporter only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_REPORTERS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub reporters: Vec<UsageReporter>,
}

/// What one reporter saw.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageReporter {
    /// Who reports: `plugin/<host>` or `server/<pod>`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// What kind of reporter it is.
    pub kind: ReporterKind,
    /// The length of a period: each time below is the start of the period in which the
    /// last such use happened, so the use may have happened up to this long after it.
    #[schemars(range(min = 1))]
    pub granularity_seconds: u32,
    /// Per version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_VERSIONS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["version".into()]))]
    pub versions: Vec<VersionUse>,
}

/// What kind of reporter an entry comes from.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum ReporterKind {
    /// A KMS v2 plugin: its encryptions are kube-apiserver's new DEK seeds, its
    /// decryptions kube-apiserver reading stored data.
    StoragePlugin,
    /// A key API server (gRPC or AWS API): workloads' own data.
    KeyApi,
}

/// The last uses of one version seen by one reporter.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionUse {
    #[schemars(range(min = 1))]
    pub version: u32,
    /// The period of the last encryption under this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_encrypt: Option<Time>,
    /// The period of the last decryption under this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decrypt: Option<Time>,
    /// The period of the last use refused because the key was pending deletion or the
    /// version pending destruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refused: Option<Time>,
}
