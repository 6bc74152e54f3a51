//! Key policies: who may do which operation with a key.

use serde::{Deserialize, Serialize};

use super::principal::{Identity, Principal};

/// The effect of a policy statement.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Effect {
    /// Allow the operations, unless a Deny statement matches.
    Allow,
    /// Refuse the operations, whatever else allows them.
    Deny,
}

/// An operation of the key API that policies and grants control: the cryptographic ones,
/// DescribeKey, and CreateGrant — the right to grant, a policy operation that no
/// cryptographic call checks.
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
    /// Create a KmsGrant on the key (the right to grant). Not a cryptographic operation:
    /// it decides who may give the others, and a grant that gives it lets its grantee
    /// create grants within that grant only.
    CreateGrant,
}

impl KeyOperation {
    /// Every operation, in a fixed order.
    pub const ALL: [KeyOperation; 8] = [
        KeyOperation::Encrypt,
        KeyOperation::Decrypt,
        KeyOperation::GenerateDataKey,
        KeyOperation::GenerateDataKeyWithoutPlaintext,
        KeyOperation::ReEncryptFrom,
        KeyOperation::ReEncryptTo,
        KeyOperation::DescribeKey,
        KeyOperation::CreateGrant,
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
            KeyOperation::CreateGrant => "CreateGrant",
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
            KeyOperation::CreateGrant => "creategrant",
        }
    }

    /// The operation its wire name names, if any.
    pub fn from_name(name: &str) -> Option<KeyOperation> {
        KeyOperation::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

/// A key policy. An explicit Deny always wins; otherwise a statement that allows the call
/// decides, and without one grants and (when the policy delegates) RBAC may allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Whether Kubernetes RBAC may allow what no statement does.
    pub delegate_to_rbac: bool,
    pub statements: Vec<Statement>,
}

/// One statement of a key policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sid: Option<String>,
    pub effect: Effect,
    pub principals: Vec<Principal>,
    pub operations: Vec<KeyOperation>,
}

/// What the key policy says about one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A Deny statement matches (its sid, if any).
    Deny(Option<String>),
    /// An Allow statement matches and no Deny does.
    Allow(Option<String>),
    /// No statement matches.
    NoMatch,
}

impl Policy {
    /// Evaluates the statements for `who` doing `op`.
    pub fn verdict(&self, who: &Identity, op: KeyOperation) -> Verdict {
        let applicable = || {
            self.statements
                .iter()
                .filter(|s| s.operations.contains(&op) && s.principals.iter().any(|p| p.matches(who)))
        };
        if let Some(s) = applicable().find(|s| s.effect == Effect::Deny) {
            return Verdict::Deny(s.sid.clone());
        }
        match applicable().find(|s| s.effect == Effect::Allow) {
            Some(s) => Verdict::Allow(s.sid.clone()),
            None => Verdict::NoMatch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sa(ns: &str, name: &str) -> Identity {
        Identity {
            username: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")],
            ..Default::default()
        }
    }

    fn statement(effect: Effect, principal: Principal, ops: &[KeyOperation]) -> Statement {
        Statement {
            sid: Some(format!("{effect:?}")),
            effect,
            principals: vec![principal],
            operations: ops.to_vec(),
        }
    }

    #[test]
    fn every_operation_has_a_wire_name_and_a_verb() {
        for op in KeyOperation::ALL {
            assert_eq!(KeyOperation::from_name(op.as_str()), Some(op));
            assert_eq!(op.rbac_verb(), op.as_str().to_ascii_lowercase(), "{op:?}");
            let wire = serde_json::to_value(op).unwrap();
            assert_eq!(wire, op.as_str(), "serde and as_str agree");
        }
        assert_eq!(KeyOperation::CreateGrant.rbac_verb(), "creategrant");
        assert_eq!(KeyOperation::from_name("creategrant"), None, "wire names are case-sensitive");
    }

    #[test]
    fn explicit_deny_wins_over_allow() {
        let group = Principal::Group("system:serviceaccounts:apps".into());
        let intruder = Principal::ServiceAccount { namespace: "apps".into(), name: "intruder".into() };
        let policy = Policy {
            delegate_to_rbac: false,
            statements: vec![
                statement(Effect::Allow, group, &[KeyOperation::Encrypt, KeyOperation::Decrypt]),
                statement(Effect::Deny, intruder, &[KeyOperation::Decrypt]),
            ],
        };
        assert_eq!(
            policy.verdict(&sa("apps", "web"), KeyOperation::Decrypt),
            Verdict::Allow(Some("Allow".into()))
        );
        assert_eq!(
            policy.verdict(&sa("apps", "intruder"), KeyOperation::Decrypt),
            Verdict::Deny(Some("Deny".into()))
        );
        assert_eq!(
            policy.verdict(&sa("apps", "intruder"), KeyOperation::Encrypt),
            Verdict::Allow(Some("Allow".into()))
        );
        assert_eq!(policy.verdict(&sa("other", "web"), KeyOperation::Encrypt), Verdict::NoMatch);
        assert_eq!(policy.verdict(&sa("apps", "web"), KeyOperation::GenerateDataKey), Verdict::NoMatch);
    }
}
