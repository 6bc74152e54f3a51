//! Key policies: who may do which operation with a key.

use serde::{Deserialize, Serialize};

/// The effect of a policy statement.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Effect {
    /// Allow the operations, unless a Deny statement matches.
    Allow,
    /// Refuse the operations, whatever else allows them.
    Deny,
}

/// A cryptographic operation of the key API that policies and grants control.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema,
)]
pub enum KeyOperation {
    /// Encrypt up to 4 KiB of plaintext.
    Encrypt,
    /// Decrypt a ciphertext made under this key.
    Decrypt,
    /// Return a new data key in plaintext and wrapped under this key.
    GenerateDataKey,
    /// Return a new data key wrapped under this key only.
    GenerateDataKeyWithoutPlaintext,
    /// Decrypt under this key as the source of a ReEncrypt.
    ReEncryptFrom,
    /// Encrypt under this key as the destination of a ReEncrypt.
    ReEncryptTo,
    /// Read the key's metadata.
    DescribeKey,
}

impl KeyOperation {
    /// Every operation, in a fixed order.
    pub const ALL: [KeyOperation; 7] = [
        KeyOperation::Encrypt,
        KeyOperation::Decrypt,
        KeyOperation::GenerateDataKey,
        KeyOperation::GenerateDataKeyWithoutPlaintext,
        KeyOperation::ReEncryptFrom,
        KeyOperation::ReEncryptTo,
        KeyOperation::DescribeKey,
    ];

    /// The operation's name on the wire and in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOperation::Encrypt => "Encrypt",
            KeyOperation::Decrypt => "Decrypt",
            KeyOperation::GenerateDataKey => "GenerateDataKey",
            KeyOperation::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            KeyOperation::ReEncryptFrom => "ReEncryptFrom",
            KeyOperation::ReEncryptTo => "ReEncryptTo",
            KeyOperation::DescribeKey => "DescribeKey",
        }
    }

    /// The RBAC verb on `kmskeys` that allows this operation when the key policy
    /// delegates to RBAC.
    pub fn rbac_verb(self) -> &'static str {
        match self {
            KeyOperation::Encrypt => "encrypt",
            KeyOperation::Decrypt => "decrypt",
            KeyOperation::GenerateDataKey => "generatedatakey",
            KeyOperation::GenerateDataKeyWithoutPlaintext => "generatedatakeywithoutplaintext",
            KeyOperation::ReEncryptFrom => "reencryptfrom",
            KeyOperation::ReEncryptTo => "reencryptto",
            KeyOperation::DescribeKey => "describekey",
        }
    }
}
