//! `KmsAlias`: a second name of a key, movable to another key of the same namespace.

use kube::{CustomResource, KubeSchema, ResourceExt};
use serde::{Deserialize, Serialize};

use super::grant::KeyReference;
use crate::domain::Alias;

/// Names a KmsKey of the same namespace: alias/<metadata.name> in the AWS API,
/// <namespace>/alias/<metadata.name> in the key API and the CLI, wherever a key is named.
/// Point targetKeyRef at another key to move it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, KubeSchema)]
#[kube(
    group = "kms.kubekms.io",
    version = "v1alpha1",
    kind = "KmsAlias",
    plural = "kmsaliases",
    singular = "kmsalias",
    shortname = "kmsa",
    category = "kubekms",
    namespaced,
    doc = "A second name of a KmsKey in the same namespace (alias/NAME in the AWS API), movable to another key.",
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([a-z0-9-]{0,248}[a-z0-9])?$')").message(
        "an alias name is lowercase letters, digits and '-' (AWS allows no '.'), at most 250 characters"
    ),
    validation = Rule::new("self.metadata.name != 'aws' && !self.metadata.name.startsWith('aws-')").message(
        "alias names aws and aws-… are reserved (as AWS reserves alias/aws/)"
    ),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetKeyRef.name"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct KmsAliasSpec {
    /// The key the alias names, in the alias's namespace.
    pub target_key_ref: KeyReference,
}

impl From<&KmsAlias> for Alias {
    fn from(alias: &KmsAlias) -> Self {
        Alias {
            namespace: alias.namespace().unwrap_or_default(),
            name: alias.name_any(),
            uid: alias.uid().unwrap_or_default(),
            target_key: alias.spec.target_key_ref.name.clone(),
        }
    }
}
