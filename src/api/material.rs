//! `KmsKeyMaterial`: the wrapped versions of one key. Internal to kubekms.
//!
//! Cluster-scoped on purpose: deleting a namespace must not destroy key material (that
//! needs the waiting period), and no built-in role grants access to it, so only kubekms's
//! own identities (and cluster administrators) can read it. It is never a `Secret`: the KMS
//! plugin encrypts Secrets, and reading key material must not depend on the plugin.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::key::Origin;

/// The most versions a key may have: the bound of `KmsKeyMaterial.spec.versions` in the
/// schema, which a test checks against the generated CRD.
pub const MAX_VERSIONS: usize = 1000;

/// The key-version material of one KmsKey, each version wrapped by the root key. Written
/// only by the kubekms controller; versions are only ever added, until the material is
/// destroyed after the key's deletion waiting period.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "kms.kubekms.io",
    version = "v1alpha1",
    kind = "KmsKeyMaterial",
    plural = "kmskeymaterials",
    singular = "kmskeymaterial",
    category = "kubekms-internal",
    doc = "Internal to kubekms: the wrapped key-version material of one KmsKey.",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.owner.namespace"),
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.owner.name"),
    printcolumn(name = "Destroyed", type_ = "date", json_path = ".spec.destroyedAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.owner == oldSelf.owner").message("owner is immutable"))]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.destroyedAt) || (has(self.destroyedAt) && self.destroyedAt == oldSelf.destroyedAt && size(self.versions) == 0)"
).message("destroyed material stays destroyed"))]
#[x_kube(validation = Rule::new(
    "has(self.destroyedAt) || oldSelf.versions.all(o, self.versions.exists(v, v.version == o.version))"
).message("key versions are never removed before the material is destroyed (a destroyed version stays listed, without its material)"))]
#[x_kube(validation = Rule::new(
    "has(self.destroyedAt) || self.rootKeyFingerprint == oldSelf.rootKeyFingerprint"
).message("rootKeyFingerprint is immutable"))]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.deletionTime) || !has(self.deletionTime) || timestamp(self.deletionTime) >= timestamp(oldSelf.deletionTime)"
).message("a promised deletion time never moves earlier: cancel the deletion, then schedule it again"))]
#[x_kube(validation = Rule::new(
    "has(self.keyId) == has(oldSelf.keyId) && (!has(self.keyId) || self.keyId == oldSelf.keyId)"
).message("keyId is immutable"))]
#[x_kube(validation = Rule::new(
    "has(self.destroyedAt) || !has(oldSelf.imported) || (has(self.imported) && self.imported.commitment == oldSelf.imported.commitment)"
).message("the commitment to imported material is immutable"))]
pub struct KmsKeyMaterialSpec {
    /// The KmsKey this material belongs to.
    pub owner: KeyOwner,

    /// Where the material came from.
    pub origin: Origin,

    /// The key's keyId, which every ciphertext made under it names: a UUID fixed when the
    /// material is first made (the key's UID then) and kept when `kubekms keyring restore`
    /// recreates the key in another cluster, where its UID differs. Absent in material made
    /// before kubekms recorded it; the keyId is then `owner.uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 36, max = 36))]
    pub key_id: Option<String>,

    /// The fingerprint of the root key the material was first made under, which wraps
    /// every version that does not name a root key of its own.
    #[schemars(length(min = 1, max = 128))]
    pub root_key_fingerprint: String,

    /// The versions, in order. An existing version never changes.
    #[serde(default)]
    #[schemars(length(max = MAX_VERSIONS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["version".into()]))]
    pub versions: Vec<MaterialVersion>,

    /// When the material will be destroyed: fixed by the controller when it first sees the
    /// key's deletion requested (that moment plus the waiting period), removed when the
    /// deletion is cancelled. This, not the KmsKey's status, is what the controller, the
    /// plugin and the key API go by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_time: Option<Time>,

    /// When the material was destroyed. Set once, with versions emptied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<Time>,

    /// For a key the KMS plugin serves: what kube-apiserver's stored data still needs, as
    /// the controller's last finished storage migration established it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageRecord>,

    /// The controller refused the deletion the KmsKey asks for (without force), because
    /// something still needs the key: the key stays usable while the spec asks for the
    /// same. Removed when the spec no longer asks for deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_refused: Option<DeletionRefusal>,

    /// For an EXTERNAL key waiting for its material: the wrapping key the controller
    /// published for it (see KmsKeyImport). Removed when material is imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_wrapping: Option<super::import::ImportWrapping>,

    /// For an EXTERNAL key whose material was imported: a commitment to that material and
    /// when it expires (the controller then deletes it, and takes only the same material
    /// again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<super::import::ImportedMaterial>,
}

impl KmsKeyMaterialSpec {
    /// The key's keyId: the one recorded, or (material made before kubekms recorded it)
    /// the UID of its key.
    pub fn key_id(&self) -> &str {
        self.key_id.as_deref().unwrap_or(&self.owner.uid)
    }

    /// The fingerprint of the root key that wraps `version`.
    pub fn root_of<'a>(&'a self, version: &'a MaterialVersion) -> &'a str {
        version.root_key_fingerprint.as_deref().unwrap_or(&self.root_key_fingerprint)
    }
}

/// What kube-apiserver's stored data needs of a key, after a storage migration.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageRecord {
    /// Every stored object is encrypted under this version or a later one.
    #[schemars(range(min = 1))]
    pub oldest_version_in_use: u32,
    /// When the migration that established it finished.
    pub migrated_at: Time,
    /// The resources it rewrote (`secrets`, `configmaps`, `<resource>.<group>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

/// Why the controller refused a deletion.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletionRefusal {
    /// When it was refused.
    pub at: Time,
    /// What still needs the key.
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// The KmsKey a KmsKeyMaterial belongs to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyOwner {
    /// The key's namespace.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// The key's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key's UID, which names this object (and, unless `keyId` says otherwise, is
    /// the key's keyId).
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
}

/// One key version's wrapped material.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.version == oldSelf.version && self.created == oldSelf.created && self.trigger == oldSelf.trigger && has(self.request) == has(oldSelf.request) && (!has(self.request) || self.request == oldSelf.request)"
).message("an existing key version never changes"))]
#[x_kube(validation = Rule::new(
    "has(oldSelf.destroyedAt) ? (has(self.destroyedAt) && self.destroyedAt == oldSelf.destroyedAt && !has(self.wrapped)) : (has(self.destroyedAt) ? !has(self.wrapped) : (has(oldSelf.expiredAt) || has(self.expiredAt) || (has(self.wrapped) && (self.wrapped == oldSelf.wrapped || has(self.rootKeyFingerprint) != has(oldSelf.rootKeyFingerprint) || (has(self.rootKeyFingerprint) && self.rootKeyFingerprint != oldSelf.rootKeyFingerprint)))))"
).message("a version's material never changes (it is only rewrapped, under another root key, or deleted when imported material expires, and then only imported again), and once destroyed stays destroyed"))]
#[x_kube(validation = Rule::new("!has(self.expiredAt) || self.trigger == 'Imported'").message(
    "only imported material expires"
))]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.deletionTime) || !has(self.deletionTime) || timestamp(self.deletionTime) >= timestamp(oldSelf.deletionTime)"
).message("a promised version destruction time never moves earlier: cancel it, then schedule it again"))]
#[x_kube(validation = Rule::new("has(self.wrapped) != (has(self.destroyedAt) || has(self.expiredAt))").message(
    "a version has either its wrapped material or destroyedAt (or, imported material that expired, expiredAt)"
))]
pub struct MaterialVersion {
    /// The version number, counting from 1.
    #[schemars(range(min = 1))]
    pub version: u32,
    /// When the version was created.
    pub created: Time,
    /// What created the version.
    pub trigger: VersionTrigger,
    /// The on-demand rotation request that created the version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub request: Option<String>,
    /// The version's 256-bit material wrapped by the root key (base64 of the kubekms
    /// wrapped-material format: format byte, nonce, AES-256-GCM ciphertext and tag).
    /// Absent once the version is destroyed, or while imported material has expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub wrapped: Option<String>,
    /// The fingerprint of the root key that wraps this version, when it is not the
    /// material's `rootKeyFingerprint` (the version was made or rewrapped after a root-key
    /// rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub root_key_fingerprint: Option<String>,
    /// When the version's material will be destroyed: fixed by the controller when it
    /// first sees the version's destruction requested, removed when that is cancelled;
    /// it only ever moves later (a use attempted meanwhile postpones it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_time: Option<Time>,
    /// When the version's material was destroyed (before the key's). Its number is never
    /// used again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<Time>,
    /// When the version's imported material expired and was deleted (its validTo). Removed
    /// when the same material is imported again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<Time>,
}

/// What created a key version.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum VersionTrigger {
    /// Version 1, made when the key was created.
    Created,
    /// An automatic rotation.
    Scheduled,
    /// An on-demand rotation (spec.rotation.onDemandRequest).
    OnDemand,
    /// Imported key material (origin EXTERNAL).
    Imported,
}
