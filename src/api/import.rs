//! `KmsKeyImport`: importing your own material into a KmsKey with origin EXTERNAL without
//! the root key, as AWS KMS's GetParametersForImport and ImportKeyMaterial do.
//!
//! The controller makes one per EXTERNAL key that waits for material, with the key's name
//! in its namespace, and publishes in its status an RSA-3072 public wrapping key and an
//! import token valid for 24 hours. The importer writes the material wrapped under that
//! public key, with the token, into its spec: that update (RBAC `update` or `patch` on
//! `kmskeyimports`, resourceNames the key's name) is the right to import into that key,
//! and nothing else is needed — not the root key, not access to the key material.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The submission: material wrapped under the published wrapping key, and the token that
/// came with it. The controller handles each new generation once and reports the outcome
/// in the Imported condition.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, KubeSchema)]
#[kube(
    group = "kms.kubekms.io",
    version = "v1alpha1",
    kind = "KmsKeyImport",
    plural = "kmskeyimports",
    singular = "kmskeyimport",
    shortname = "kmsi",
    category = "kubekms",
    namespaced,
    status = "KmsKeyImportStatus",
    doc = "Imports material into the EXTERNAL KmsKey of the same name: the controller publishes a wrapping key and token in status; the importer submits wrapped material in spec.",
    printcolumn(
        name = "Imported",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Imported\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Imported\")].reason"
    ),
    printcolumn(name = "Valid To", type_ = "date", json_path = ".status.parametersValidTo"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeyImportSpec {
    /// The import token published in status, unchanged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 512))]
    pub import_token: String,

    /// The 256-bit key material wrapped with RSAES_OAEP_SHA_256 under status.publicKey:
    /// base64 of 384 bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub encrypted_key_material: String,

    /// When the imported material expires (optional; as AWS KMS's ValidTo): at that time
    /// the key refuses every operation, its material is deleted and it is PendingImport
    /// again, waiting for the same material. Without it, the material never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<Time>,
}

/// What the controller publishes: the wrapping key and token of the current import window,
/// and the outcome of the last submission.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeyImportStatus {
    /// RSAES_OAEP_SHA_256: RSAES-OAEP with SHA-256 and MGF1-SHA-256, no label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapping_algorithm: Option<String>,

    /// RSA_3072.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapping_key_spec: Option<String>,

    /// The public wrapping key: base64 of its DER SubjectPublicKeyInfo. Absent while the
    /// key does not wait for material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,

    /// The import token to submit with the material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_token: Option<String>,

    /// When the wrapping key and token expire; a new pair is published then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_valid_to: Option<Time>,

    /// The metadata.generation whose submission the Imported condition reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Imported: True once material is imported, False with the reason a submission was
    /// refused (InvalidImportToken, ExpiredImportToken, WrongKey, WrongWrappingKey,
    /// InvalidCiphertext, DecryptionFailed, InvalidMaterialLength, InvalidValidTo,
    /// IncorrectKeyMaterial, NotPendingImport).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// The wrapping key of a key that waits for imported material, kept in its material
/// object: only kubekms reads it, and its private half is sealed under a key derived from
/// the root key (never in plaintext).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportWrapping {
    /// The public half: base64 of its DER SubjectPublicKeyInfo.
    #[schemars(length(min = 1, max = 1024))]
    pub public_key: String,
    /// The private half, sealed (base64 of the kubekms sealed format).
    #[schemars(length(min = 1, max = 4096))]
    pub sealed_private_key: String,
    /// When the wrapping key stops being accepted.
    pub valid_to: Time,
    /// Submissions that did not decrypt under it; at the limit it is replaced, so that
    /// failed decryptions are no oracle on it.
    #[serde(default)]
    pub failed_decryptions: u32,
}

/// What the material object remembers of imported material, so that the same material
/// (and only it) can be imported again once it has expired and been deleted.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportedMaterial {
    /// A commitment to the material: base64 of HMAC-SHA256 keyed by the material over the
    /// key's keyId. It reveals nothing of the material, and outlives the root key.
    #[schemars(length(min = 44, max = 44))]
    pub commitment: String,
    /// When the material expires, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<Time>,
}
