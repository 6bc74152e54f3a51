//! `KmsGrant`: temporary, fine-grained use of a key by one principal.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::key::KeyOperation;
use super::principal::Principal;
pub use crate::domain::GrantState;

/// Gives one principal — a ServiceAccount of any namespace, a user or a group — the use of a
/// key for some operations, optionally only with a given encryption context and only until
/// expiresAt. A grant lives in its key's namespace; deleting it revokes it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "kms.kubekms.io",
    version = "v1alpha1",
    kind = "KmsGrant",
    plural = "kmsgrants",
    singular = "kmsgrant",
    shortname = "kmsg",
    category = "kubekms",
    namespaced,
    status = "KmsGrantStatus",
    doc = "Gives one principal temporary, fine-grained use of a KmsKey in the same namespace.",
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.keyRef.name"),
    printcolumn(name = "Grantee", type_ = "string", json_path = ".status.grantee"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".spec.expiresAt"),
    printcolumn(name = "Creator", type_ = "string", json_path = ".status.creator", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message(
    "a grant's terms cannot change: create a new grant and delete this one"
))]
pub struct KmsGrantSpec {
    /// The key the grant is for, in the grant's namespace.
    pub key_ref: KeyReference,

    /// Who receives the grant.
    pub grantee: Principal,

    /// What the grantee may do with the key.
    #[schemars(length(min = 1))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub operations: Vec<KeyOperation>,

    /// Limits the grant to calls whose encryption context matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<GrantConstraints>,

    /// When the grant stops working. Absent: the grant works until it is retired or
    /// deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Who besides the grantee may retire the grant through the key API's RetireGrant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_principal: Option<Principal>,

    /// Who created the grant. Written by admission from the request's user (the key API's
    /// CreateGrant writes its caller); leave it out. A grant gives something only while its
    /// creator has the right to grant on the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<GrantCreator>,
}

/// Who created a grant, as the API server authenticated them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantCreator {
    /// The creator's user name.
    #[schemars(length(min = 1, max = 1024))]
    pub username: String,

    /// The creator's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub groups: Vec<String>,

    /// The id of the grant whose CreateGrant gave the creator the right to make this grant,
    /// when the key API made it on the strength of that grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub parent_grant: Option<String>,
}

/// A reference to a KmsKey in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyReference {
    /// The KmsKey's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Encryption-context constraints on a grant; at most one of the two.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!(has(self.encryptionContextEquals) && has(self.encryptionContextSubset))"
).message("set at most one of encryptionContextEquals and encryptionContextSubset"))]
pub struct GrantConstraints {
    /// The call's encryption context must equal this map exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub encryption_context_equals: Option<BTreeMap<String, String>>,

    /// The call's encryption context must contain every pair of this map (and may hold more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub encryption_context_subset: Option<BTreeMap<String, String>>,
}

/// The observed state of a grant.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsGrantStatus {
    /// The grant's identifier (a UUID, equal to the object's UID), recorded in audit lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,

    /// The grant's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<GrantState>,

    /// The grantee, written out for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grantee: Option<String>,

    /// The keyId of the key the grant was resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,

    /// When and by whom the grant was retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_by: Option<String>,

    /// The user name of the grant's creator, written out for `kubectl get -o wide`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, with a reason when the grant is not Active.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
