//! The terms of a CreateGrant request, checked and turned into a domain grant before the
//! key API authorizes it: every term the KmsGrant schema would refuse is refused here first,
//! with a message that names it.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;

use crate::domain::{Constraints, Grant, Key, KeyOperation, Principal};
use crate::proto::keyapi::{CreateGrantRequest, Principal as WirePrincipal};

/// The most pairs an encryption-context constraint may hold (as the schema says).
const MAX_CONSTRAINT_PAIRS: usize = 64;

/// Why a CreateGrant request's terms are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantRequestError {
    #[error(
        "name {0:?} is not a valid KmsGrant name (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253)"
    )]
    Name(String),
    #[error("grantee is required")]
    GranteeRequired,
    #[error("{field}: kind {kind:?} is not ServiceAccount, User or Group")]
    PrincipalKind { field: &'static str, kind: String },
    #[error("{field}: name must be 1 to 253 characters")]
    PrincipalName { field: &'static str },
    #[error("{field}: a ServiceAccount needs a namespace of 1 to 63 characters")]
    PrincipalNamespace { field: &'static str },
    #[error("{field}: a namespace is only for a ServiceAccount")]
    PrincipalNotNamespaced { field: &'static str },
    #[error("operations: at least one is required")]
    NoOperations,
    #[error("operations: {0:?} is not an operation ({all})", all = every_operation())]
    UnknownOperation(String),
    #[error("operations: {0} is listed twice")]
    DuplicateOperation(&'static str),
    #[error("set at most one of encryption_context_equals and encryption_context_subset")]
    TwoConstraints,
    #[error("{0}: at most {MAX_CONSTRAINT_PAIRS} pairs")]
    ConstraintTooLarge(&'static str),
    #[error("expires_at {0:?} is not an RFC 3339 time")]
    ExpiresAt(String),
}

/// Every operation's wire name, as the refusal of an unknown one lists them.
fn every_operation() -> String {
    KeyOperation::ALL.map(KeyOperation::as_str).join(", ")
}

fn valid_name(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 253
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

fn principal(field: &'static str, p: &WirePrincipal) -> Result<Principal, GrantRequestError> {
    if p.name.is_empty() || p.name.len() > 253 {
        return Err(GrantRequestError::PrincipalName { field });
    }
    match p.kind.as_str() {
        "ServiceAccount" if p.namespace.is_empty() || p.namespace.len() > 63 => {
            Err(GrantRequestError::PrincipalNamespace { field })
        }
        "ServiceAccount" => {
            Ok(Principal::ServiceAccount { namespace: p.namespace.clone(), name: p.name.clone() })
        }
        "User" | "Group" if !p.namespace.is_empty() => {
            Err(GrantRequestError::PrincipalNotNamespaced { field })
        }
        "User" => Ok(Principal::User(p.name.clone())),
        "Group" => Ok(Principal::Group(p.name.clone())),
        other => Err(GrantRequestError::PrincipalKind { field, kind: other.to_owned() }),
    }
}

fn operations(names: &[String]) -> Result<Vec<KeyOperation>, GrantRequestError> {
    if names.is_empty() {
        return Err(GrantRequestError::NoOperations);
    }
    let mut ops = Vec::with_capacity(names.len());
    for name in names {
        let op =
            KeyOperation::from_name(name).ok_or_else(|| GrantRequestError::UnknownOperation(name.clone()))?;
        if ops.contains(&op) {
            return Err(GrantRequestError::DuplicateOperation(op.as_str()));
        }
        ops.push(op);
    }
    Ok(ops)
}

fn constraints(req: &CreateGrantRequest) -> Result<Option<Constraints>, GrantRequestError> {
    let pairs = |field, map: &HashMap<String, String>| {
        if map.len() > MAX_CONSTRAINT_PAIRS {
            return Err(GrantRequestError::ConstraintTooLarge(field));
        }
        Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>())
    };
    match (req.encryption_context_equals.is_empty(), req.encryption_context_subset.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Err(GrantRequestError::TwoConstraints),
        (false, true) => {
            Ok(Some(Constraints::Equals(pairs("encryption_context_equals", &req.encryption_context_equals)?)))
        }
        (true, false) => {
            Ok(Some(Constraints::Subset(pairs("encryption_context_subset", &req.encryption_context_subset)?)))
        }
    }
}

/// The grant `req` asks for on `key`, without a creator (the key API records its caller
/// once it has authorized it) and without an id or a state (the API server and the
/// controller give those).
pub fn requested_grant(req: &CreateGrantRequest, key: &Key) -> Result<Grant, GrantRequestError> {
    if !req.name.is_empty() && !valid_name(&req.name) {
        return Err(GrantRequestError::Name(req.name.clone()));
    }
    let grantee = principal("grantee", req.grantee.as_ref().ok_or(GrantRequestError::GranteeRequired)?)?;
    let expires_at = match req.expires_at.as_str() {
        "" => None,
        text => Some(text.parse::<Timestamp>().map_err(|_| GrantRequestError::ExpiresAt(text.to_owned()))?),
    };
    Ok(Grant {
        namespace: key.info.namespace.clone(),
        name: req.name.clone(),
        grant_id: String::new(),
        key_name: key.info.name.clone(),
        key_id: None,
        state: None,
        retired_by: None,
        deleting: false,
        expires_at,
        grantee,
        operations: operations(&req.operations)?,
        constraints: constraints(req)?,
        retiring_principal: req
            .retiring_principal
            .as_ref()
            .map(|p| principal("retiring_principal", p))
            .transpose()?,
        creator: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Policy;

    fn key() -> Key {
        crate::testing::enabled_key(
            "apps",
            "k",
            "uid-1",
            Policy { delegate_to_rbac: true, statements: Vec::new() },
        )
    }

    fn wire(kind: &str, name: &str, namespace: &str) -> Option<WirePrincipal> {
        Some(WirePrincipal { kind: kind.into(), name: name.into(), namespace: namespace.into() })
    }

    fn request() -> CreateGrantRequest {
        CreateGrantRequest {
            key: "apps/k".into(),
            name: "nightly".into(),
            grantee: wire("ServiceAccount", "nightly", "batch"),
            operations: vec!["Decrypt".into(), "DescribeKey".into()],
            encryption_context_subset: [("tenant".to_owned(), "acme".to_owned())].into(),
            expires_at: "2030-01-01T00:00:00Z".into(),
            retiring_principal: wire("User", "ops", ""),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_becomes_the_grant_it_names() {
        let g = requested_grant(&request(), &key()).unwrap();
        assert_eq!((g.namespace.as_str(), g.name.as_str(), g.key_name.as_str()), ("apps", "nightly", "k"));
        assert_eq!(
            g.grantee,
            Principal::ServiceAccount { namespace: "batch".into(), name: "nightly".into() }
        );
        assert_eq!(g.operations, [KeyOperation::Decrypt, KeyOperation::DescribeKey]);
        assert_eq!(g.constraints, Some(Constraints::Subset([("tenant".into(), "acme".into())].into())));
        assert_eq!(g.expires_at, Some("2030-01-01T00:00:00Z".parse().unwrap()));
        assert_eq!(g.retiring_principal, Some(Principal::User("ops".into())));
        assert!(g.creator.is_none() && g.state.is_none() && g.grant_id.is_empty());
        let unnamed =
            requested_grant(&CreateGrantRequest { name: String::new(), ..request() }, &key()).unwrap();
        assert!(unnamed.name.is_empty(), "the API server generates a name");
    }

    #[test]
    fn bad_terms_are_refused_naming_them() {
        let refused = |req: CreateGrantRequest| requested_grant(&req, &key()).unwrap_err().to_string();
        for (req, expected) in [
            (CreateGrantRequest { name: "Bad_Name".into(), ..request() }, "is not a valid KmsGrant name"),
            (CreateGrantRequest { grantee: None, ..request() }, "grantee is required"),
            (CreateGrantRequest { grantee: wire("Robot", "r", ""), ..request() }, r#"grantee: kind "Robot""#),
            (
                CreateGrantRequest { grantee: wire("ServiceAccount", "sa", ""), ..request() },
                "needs a namespace",
            ),
            (CreateGrantRequest { grantee: wire("User", "", ""), ..request() }, "grantee: name must be"),
            (
                CreateGrantRequest { grantee: wire("Group", "g", "ns"), ..request() },
                "only for a ServiceAccount",
            ),
            (
                CreateGrantRequest { retiring_principal: wire("User", "u", "ns"), ..request() },
                "retiring_principal: a namespace",
            ),
            (CreateGrantRequest { operations: vec![], ..request() }, "at least one is required"),
            (
                CreateGrantRequest { operations: vec!["decrypt".into()], ..request() },
                r#""decrypt" is not an operation"#,
            ),
            (
                CreateGrantRequest { operations: vec!["Decrypt".into(), "Decrypt".into()], ..request() },
                "Decrypt is listed twice",
            ),
            (
                CreateGrantRequest {
                    encryption_context_equals: [("a".to_owned(), "b".to_owned())].into(),
                    ..request()
                },
                "at most one of",
            ),
            (
                CreateGrantRequest {
                    encryption_context_subset: (0..65).map(|i| (i.to_string(), String::new())).collect(),
                    ..request()
                },
                "encryption_context_subset: at most 64 pairs",
            ),
            (CreateGrantRequest { expires_at: "tomorrow".into(), ..request() }, r#"expires_at "tomorrow""#),
        ] {
            let message = refused(req);
            assert!(message.contains(expected), "expected {expected:?} in {message:?}");
        }
        let all: Vec<String> = KeyOperation::ALL.iter().map(|o| o.as_str().to_owned()).collect();
        assert_eq!(
            requested_grant(&CreateGrantRequest { operations: all, ..request() }, &key()).unwrap().operations,
            KeyOperation::ALL
        );
    }
}
