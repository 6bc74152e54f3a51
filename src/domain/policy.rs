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
    /// Retire a grant of this key. In a grant whose grantee is a Group, it lets the group's
    /// members retire the grant (for every member); without it they cannot. A ServiceAccount
    /// or User grantee may retire its own grant without it, and the retiring principal
    /// always may. In a key policy, an Allow lets its principals retire any grant of the
    /// key and a Deny refuses them even their own; the RBAC verb is `retiregrant`.
    RetireGrant,
    /// Create a KmsGrant on the key (the right to grant). Not a cryptographic operation:
    /// it decides who may give the others, and a grant that gives it lets its grantee
    /// create grants within that grant only.
    CreateGrant,
}

impl KeyOperation {
    /// Every operation, in a fixed order.
    pub const ALL: [KeyOperation; 9] = [
        KeyOperation::Encrypt,
        KeyOperation::Decrypt,
        KeyOperation::GenerateDataKey,
        KeyOperation::GenerateDataKeyWithoutPlaintext,
        KeyOperation::ReEncryptFrom,
        KeyOperation::ReEncryptTo,
        KeyOperation::DescribeKey,
        KeyOperation::RetireGrant,
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
            KeyOperation::RetireGrant => "RetireGrant",
            KeyOperation::CreateGrant => "CreateGrant",
        }
    }

    /// The operations whose `Deny` also refuses this one (itself included): those whose
    /// result a caller allowed this operation could obtain with it — alone, with
    /// GenerateRandom, or with what it may do on keys it controls. A Deny of X refuses
    /// every operation that implies X, so no other operation hands the denied plaintext to
    /// the caller or to a key the caller controls (invariant 11):
    ///
    /// - Decrypt and ReEncryptFrom imply each other: ReEncrypt out of the key into a key the
    ///   caller controls, then Decrypt there, is Decrypt; Decrypt, then Encrypt under another
    ///   key, is ReEncrypt out of it.
    /// - Encrypt and ReEncryptTo imply each other: Encrypt under a key the caller controls,
    ///   then ReEncrypt into this one, is Encrypt; decrypting the source elsewhere, then
    ///   Encrypt, is ReEncrypt into it.
    /// - Every operation that makes a ciphertext under the key implies GenerateDataKey and
    ///   GenerateDataKeyWithoutPlaintext: GenerateRandom, then Encrypt (or ReEncryptTo of a
    ///   data key made under the caller's own key), is GenerateDataKey; and
    ///   GenerateDataKeyWithoutPlaintext, then Decrypt of its blob, is GenerateDataKey too.
    ///   GenerateDataKey does not imply Encrypt (the caller does not choose the plaintext),
    ///   nor Decrypt (the data key is new: no ciphertext made before opens with it).
    /// - DescribeKey and RetireGrant imply nothing else, and nothing else implies them: the
    ///   key name, keyId and version an operation answers with are its own result.
    pub fn implies(self) -> &'static [KeyOperation] {
        use KeyOperation::*;
        match self {
            Decrypt => &[Decrypt, ReEncryptFrom],
            ReEncryptFrom => &[ReEncryptFrom, Decrypt],
            Encrypt => &[Encrypt, ReEncryptTo, GenerateDataKey, GenerateDataKeyWithoutPlaintext],
            ReEncryptTo => &[ReEncryptTo, Encrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext],
            GenerateDataKey => &[GenerateDataKey, GenerateDataKeyWithoutPlaintext],
            GenerateDataKeyWithoutPlaintext => &[GenerateDataKeyWithoutPlaintext, GenerateDataKey],
            DescribeKey => &[DescribeKey],
            RetireGrant => &[RetireGrant],
            CreateGrant => &[CreateGrant],
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
            KeyOperation::RetireGrant => "retiregrant",
            KeyOperation::CreateGrant => "creategrant",
        }
    }

    /// The operation its wire name names, if any.
    pub fn from_name(name: &str) -> Option<KeyOperation> {
        KeyOperation::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

/// A key policy. An explicit Deny always wins — a Deny of an operation refuses every
/// operation that implies it ([`KeyOperation::implies`]); otherwise a statement that allows
/// the call (naming the operation itself) decides, and without one grants and (when the
/// policy delegates) RBAC may allow it.
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

/// The Deny statement that refuses a call, and the operation it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub sid: Option<String>,
    /// The operation the statement denies: the call's own, or one the call implies.
    pub denied: KeyOperation,
}

impl Policy {
    /// Evaluates the statements for `who` doing `op`.
    pub fn verdict(&self, who: &Identity, op: KeyOperation) -> Verdict {
        if let Some(denial) = self.denial(who, op) {
            return Verdict::Deny(denial.sid);
        }
        let allows = |s: &&Statement| {
            s.effect == Effect::Allow
                && s.operations.contains(&op)
                && s.principals.iter().any(|p| p.matches(who))
        };
        match self.statements.iter().find(allows) {
            Some(s) => Verdict::Allow(s.sid.clone()),
            None => Verdict::NoMatch,
        }
    }

    /// The first Deny statement for `who` that names `op` or an operation `op` implies
    /// (`op` itself preferred, so that the reason reads plainly when it can).
    pub fn denial(&self, who: &Identity, op: KeyOperation) -> Option<Denial> {
        let denies = |s: &&Statement| s.effect == Effect::Deny && s.principals.iter().any(|p| p.matches(who));
        op.implies().iter().find_map(|denied| {
            self.statements
                .iter()
                .filter(denies)
                .find(|s| s.operations.contains(denied))
                .map(|s| Denial { sid: s.sid.clone(), denied: *denied })
        })
    }
}

/// The README's deny table, written out row by row: a Deny of the first operation refuses
/// exactly the others. The domain and the component tests check the rule against it.
#[cfg(test)]
pub(crate) const DENY_TABLE: &[(KeyOperation, &[KeyOperation])] = {
    use KeyOperation::*;
    &[
        (Encrypt, &[Encrypt, ReEncryptTo]),
        (Decrypt, &[Decrypt, ReEncryptFrom]),
        (GenerateDataKey, &[GenerateDataKey, GenerateDataKeyWithoutPlaintext, Encrypt, ReEncryptTo]),
        (
            GenerateDataKeyWithoutPlaintext,
            &[GenerateDataKeyWithoutPlaintext, GenerateDataKey, Encrypt, ReEncryptTo],
        ),
        (ReEncryptFrom, &[ReEncryptFrom, Decrypt]),
        (ReEncryptTo, &[ReEncryptTo, Encrypt]),
        (DescribeKey, &[DescribeKey]),
        (RetireGrant, &[RetireGrant]),
        (CreateGrant, &[CreateGrant]),
    ]
};

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

    #[test]
    fn a_deny_refuses_every_operation_that_implies_it_and_nothing_else() {
        assert_eq!(DENY_TABLE.len(), KeyOperation::ALL.len(), "a row for every operation");
        let intruder = Principal::ServiceAccount { namespace: "apps".into(), name: "intruder".into() };
        for (denied, refused) in DENY_TABLE {
            let policy = Policy {
                delegate_to_rbac: false,
                statements: vec![
                    statement(Effect::Allow, intruder.clone(), &KeyOperation::ALL),
                    Statement {
                        sid: Some("no".into()),
                        ..statement(Effect::Deny, intruder.clone(), &[*denied])
                    },
                ],
            };
            for op in KeyOperation::ALL {
                let verdict = policy.verdict(&sa("apps", "intruder"), op);
                if refused.contains(&op) {
                    assert_eq!(verdict, Verdict::Deny(Some("no".into())), "Deny {denied:?} refuses {op:?}");
                    let denial = policy.denial(&sa("apps", "intruder"), op).unwrap();
                    assert_eq!(denial, Denial { sid: Some("no".into()), denied: *denied });
                } else {
                    assert_eq!(
                        verdict,
                        Verdict::Allow(Some("Allow".into())),
                        "Deny {denied:?} leaves {op:?}"
                    );
                }
                // The Deny is the intruder's alone.
                assert_eq!(policy.verdict(&sa("apps", "web"), op), Verdict::NoMatch, "{denied:?} {op:?}");
            }
        }
    }

    #[test]
    fn an_allow_allows_only_the_operation_it_names() {
        let web = Principal::ServiceAccount { namespace: "apps".into(), name: "web".into() };
        let policy = Policy {
            delegate_to_rbac: false,
            statements: vec![statement(Effect::Allow, web, &[KeyOperation::Decrypt])],
        };
        assert_eq!(
            policy.verdict(&sa("apps", "web"), KeyOperation::Decrypt),
            Verdict::Allow(Some("Allow".into()))
        );
        assert_eq!(policy.verdict(&sa("apps", "web"), KeyOperation::ReEncryptFrom), Verdict::NoMatch);
    }

    #[test]
    fn the_deny_of_the_call_itself_is_named_first() {
        let intruder = Principal::ServiceAccount { namespace: "apps".into(), name: "intruder".into() };
        let policy = Policy {
            delegate_to_rbac: false,
            statements: vec![
                Statement {
                    sid: Some("no-decrypt".into()),
                    ..statement(Effect::Deny, intruder.clone(), &[KeyOperation::Decrypt])
                },
                Statement {
                    sid: Some("no-migration".into()),
                    ..statement(Effect::Deny, intruder, &[KeyOperation::ReEncryptFrom])
                },
            ],
        };
        let who = sa("apps", "intruder");
        assert_eq!(
            policy.denial(&who, KeyOperation::ReEncryptFrom),
            Some(Denial { sid: Some("no-migration".into()), denied: KeyOperation::ReEncryptFrom })
        );
        assert_eq!(
            policy.denial(&who, KeyOperation::Decrypt),
            Some(Denial { sid: Some("no-decrypt".into()), denied: KeyOperation::Decrypt })
        );
        assert_eq!(policy.denial(&who, KeyOperation::Encrypt), None);
    }
}
