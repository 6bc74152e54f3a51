//! `KmsKey`: a customer-managed key.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::principal::Principal;
pub use crate::domain::{Effect, KeyOperation, KeyState, Origin};

/// A customer-managed key: versioned 256-bit key material that never leaves kubekms
/// unencrypted. The controller creates version 1, rotates on schedule or on demand,
/// enables and disables the key, and destroys its material only after a waiting period.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "kms.kubekms.io",
    version = "v1alpha1",
    kind = "KmsKey",
    plural = "kmskeys",
    singular = "kmskey",
    shortname = "kmsk",
    category = "kubekms",
    namespaced,
    status = "KmsKeyStatus",
    doc = "A customer-managed key whose versioned material never leaves kubekms unencrypted.",
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.currentVersion"),
    printcolumn(name = "Next Rotation", type_ = "string", json_path = ".status.nextRotationTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.state) || oldSelf.status.state != 'PendingDeletion' || oldSelf.spec.deletion.scheduled || !self.spec.deletion.scheduled"
    ).message(
        "the cancellation of this key's deletion has not been processed yet: wait until status.state is no longer PendingDeletion, then schedule deletion again (with a new waiting period)"
    ),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.state) || oldSelf.status.state != 'PendingDeletion' || !oldSelf.spec.deletion.scheduled || self.spec.deletion.scheduled || !self.spec.enabled"
    ).message(
        "cancelling a scheduled deletion leaves the key Disabled: set spec.enabled to false in the same change, then set it to true when the key should be used again"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeySpec {
    /// What the key is for. Free text, shown by `kubectl describe`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 8192))]
    pub description: String,

    /// The kind of key material. SYMMETRIC_DEFAULT is a 256-bit key used with AES-256-GCM.
    /// Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("keySpec is immutable"))]
    pub key_spec: KeySpec,

    /// What the key may be used for. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("keyUsage is immutable"))]
    pub key_usage: KeyUsage,

    /// Where the key material comes from: KUBEKMS generates it; EXTERNAL waits in
    /// PendingImport for material you import. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("origin is immutable"))]
    pub origin: Origin,

    /// Whether the key may be used. Setting it to false disables the key (reversibly);
    /// disabled keys refuse every cryptographic operation.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Automatic and on-demand rotation. Rotation adds a key version; earlier versions
    /// stay available for decryption until the key is destroyed.
    #[serde(default)]
    pub rotation: Rotation,

    /// Scheduling and cancelling the deletion of the key material.
    #[serde(default)]
    pub deletion: Deletion,

    /// The key policy: who may use the key for what, beyond Kubernetes RBAC.
    #[serde(default)]
    pub policy: KeyPolicy,

    /// Requests about single versions: disable one (decryption under it is refused, and
    /// can be allowed again) or schedule its destruction, with the same waiting period and
    /// cancellation as a whole key. The current version cannot be the one; a refused
    /// request is reported in the TransitionRefused condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_VERSION_REQUESTS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["version".into()]))]
    pub versions: Vec<VersionRequest>,
}

/// The most single-version requests a key's spec may hold.
pub const MAX_VERSION_REQUESTS: usize = 100;

/// A request about one key version.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionRequest {
    /// The version the request is about.
    #[schemars(range(min = 1))]
    pub version: u32,

    /// Set to false to refuse decryption under this version until it is set back to true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Scheduling and cancelling the destruction of this version's material. The version
    /// refuses decryption from the moment destruction is requested.
    #[serde(default)]
    pub destruction: Deletion,
}

fn default_true() -> bool {
    true
}

/// The kind of key material.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum KeySpec {
    /// A 256-bit symmetric key used with AES-256-GCM.
    #[default]
    #[serde(rename = "SYMMETRIC_DEFAULT")]
    SymmetricDefault,
}

/// What a key may be used for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum KeyUsage {
    /// Encryption and decryption.
    #[default]
    #[serde(rename = "ENCRYPT_DECRYPT")]
    EncryptDecrypt,
}

/// Rotation settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// Rotate automatically every periodDays days.
    #[serde(default = "default_true")]
    pub automatic: bool,

    /// Days between automatic rotations, from 90 to 2560.
    #[serde(default = "default_rotation_period")]
    #[schemars(range(min = 90, max = 2560))]
    pub period_days: u16,

    /// Requests one rotation now. Set it to a value not used before for this key (a
    /// timestamp works well); the controller rotates once per new value and reports the
    /// value it handled in status.lastOnDemandRequest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub on_demand_request: Option<String>,
}

/// The default number of days between automatic rotations.
pub const DEFAULT_ROTATION_PERIOD_DAYS: u16 = 365;

fn default_rotation_period() -> u16 {
    DEFAULT_ROTATION_PERIOD_DAYS
}

impl Default for Rotation {
    fn default() -> Self {
        Self { automatic: true, period_days: DEFAULT_ROTATION_PERIOD_DAYS, on_demand_request: None }
    }
}

/// Deletion settings. Key material is never destroyed at once: scheduling deletion
/// starts a waiting period of pendingWindowDays days during which the key is unusable and
/// the deletion can be cancelled.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!(self.scheduled && oldSelf.scheduled) || self.pendingWindowDays == oldSelf.pendingWindowDays"
).message("pendingWindowDays cannot change while deletion is scheduled: cancel the deletion and schedule it again"))]
pub struct Deletion {
    /// Set to true to schedule the destruction of the material; set back to false to
    /// cancel it before the deletion time status reports (for a whole key, together with
    /// spec.enabled: false).
    #[serde(default)]
    pub scheduled: bool,

    /// Days to wait between scheduling deletion and destroying the material, from 7 to 30.
    /// Every use attempted while the deletion is pending starts the wait anew.
    #[serde(default = "default_pending_window")]
    #[schemars(range(min = 7, max = 30))]
    pub pending_window_days: u8,

    /// Schedule the deletion even though something still needs the material: data that
    /// kube-apiserver stores under it, or a decryption within the last pendingWindowDays
    /// days. Without it such a request is refused (TransitionRefused, reason
    /// DeletionRefused) and the key stays usable. Recorded in the audit trail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// The default waiting period before key material is destroyed.
pub const DEFAULT_PENDING_WINDOW_DAYS: u8 = 30;

fn default_pending_window() -> u8 {
    DEFAULT_PENDING_WINDOW_DAYS
}

impl Default for Deletion {
    fn default() -> Self {
        Self { scheduled: false, pending_window_days: DEFAULT_PENDING_WINDOW_DAYS, force: false }
    }
}

/// A key policy. An explicit Deny always wins; otherwise a call is allowed when a statement
/// allows it, when delegateToRbac is true and Kubernetes RBAC allows the operation as a verb
/// on this kmskeys object, or when an Active KmsGrant allows it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyPolicy {
    /// Let Kubernetes RBAC grant use of the key: a SubjectAccessReview for the operation's
    /// verb (encrypt, decrypt, generatedatakey, …) on this kmskeys object.
    #[serde(default = "default_true", rename = "delegateToRBAC")]
    pub delegate_to_rbac: bool,

    /// Allow and Deny statements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub statements: Vec<PolicyStatement>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self { delegate_to_rbac: true, statements: Vec::new() }
    }
}

/// One statement of a key policy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatement {
    /// An optional name for the statement, shown in audit records and denials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub sid: Option<String>,

    /// Allow or Deny.
    pub effect: Effect,

    /// Whom the statement applies to.
    #[schemars(length(min = 1, max = 64))]
    pub principals: Vec<Principal>,

    /// Which operations the statement applies to.
    #[schemars(length(min = 1))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub operations: Vec<KeyOperation>,
}

/// The observed state of a key.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeyStatus {
    /// The key's permanent identifier (a UUID, equal to the object's UID). Never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,

    /// The key's lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<KeyState>,

    /// The version new encryptions use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u32>,

    /// Every version the key has had. Versions only grow and are never reused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["version".into()]))]
    pub versions: Vec<KeyVersionStatus>,

    /// When the current version was created by a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,

    /// When the next automatic rotation is due, while automatic rotation is on and the key
    /// is Enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,

    /// The last on-demand rotation request the controller carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_on_demand_request: Option<String>,

    /// When the key's imported material expires (an EXTERNAL key imported with validTo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<Time>,

    /// When the key material will be (or was) destroyed, while deletion is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_time: Option<Time>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// spec.enabled as of observedGeneration. Tells an attempt to enable a key pending
    /// deletion apart from a key that was enabled when its deletion was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_enabled: Option<bool>,

    /// The re-encryption of kube-apiserver's stored data after the last rotation, for a
    /// key the KMS plugin serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_migration: Option<StorageMigrationStatus>,

    /// The root keys that wrap the key's versions (destroyed ones aside), by fingerprint:
    /// during a root-key rotation, the controller rewraps every version under its primary
    /// root key, and the previous one may be removed once no key lists it here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub root_keys: Vec<RootKeyUse>,

    /// Ready, StorageMigrated, UsedWhilePendingDeletion, and conditions explaining
    /// refused transitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// How many of a key's versions one root key wraps.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootKeyUse {
    /// The root key's fingerprint (`kubekms root-key fingerprint`).
    #[schemars(length(min = 1, max = 128))]
    pub fingerprint: String,
    /// Whether it is the controller's primary root key; the others are previous root keys
    /// whose versions the controller is rewrapping (or root keys it does not have).
    pub primary: bool,
    /// The versions it wraps.
    pub versions: u32,
}

/// The storage migration that moves kube-apiserver's stored data to a new version.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageMigrationStatus {
    /// The version the stored data moves to.
    pub version: u32,
    /// Where the migration is.
    pub phase: StorageMigrationPhase,
    /// How many times it was started (a failed attempt is retried).
    #[serde(default)]
    pub attempts: u32,
    /// When the current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,
    /// When it succeeded or last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
    /// What it is waiting for, or why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The phase of a storage migration.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum StorageMigrationPhase {
    /// Waiting until every kube-apiserver encrypts under the new version.
    Waiting,
    /// StorageVersionMigrations are rewriting the stored objects.
    Running,
    /// Every stored object listed was rewritten under the new version.
    Succeeded,
    /// The last attempt failed; it is retried.
    Failed,
}

/// One key version, as status reports it (never the material).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyVersionStatus {
    /// The version number, counting from 1.
    pub version: u32,
    /// When the version was created.
    pub created: Time,
    /// Whether the version's material still exists, and whether it decrypts.
    pub state: KeyVersionState,
    /// When the version's material will be destroyed, while its destruction is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_time: Option<Time>,
    /// The start of the last period (a day) in which the version decrypted something, as
    /// the plugin and the key API reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decrypt: Option<Time>,
    /// For a key the KMS plugin serves: whether data kube-apiserver stores may still be
    /// encrypted under this version (false once a storage migration moved it all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_stored_data: Option<bool>,
}

/// The state of one key version.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum KeyVersionState {
    /// The material exists: the version decrypts, and encrypts if it is current.
    Enabled,
    /// spec.versions disables it: it refuses decryption until enabled again.
    Disabled,
    /// Its destruction is scheduled: it refuses decryption, and its material is destroyed
    /// at deletionTime unless the destruction is cancelled.
    PendingDestruction,
    /// The material has been destroyed.
    Destroyed,
    /// Imported material that reached its validTo: deleted, until the same material is
    /// imported again.
    Expired,
}
