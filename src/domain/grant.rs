//! Grants: temporary, constrained use of a key by one principal.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::policy::KeyOperation;
use super::principal::{Identity, Principal};

/// A grant as the key API decides with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub namespace: String,
    pub name: String,
    /// The grant's id (its UID), recorded in audit lines.
    pub grant_id: String,
    /// The name of the key, in the grant's namespace.
    pub key_name: String,
    /// The keyId of the key the controller resolved the grant to, once it has.
    pub key_id: Option<String>,
    /// The state the controller gave the grant.
    pub state: Option<GrantState>,
    /// Who retired the grant through the key API, if anyone did.
    pub retired_by: Option<String>,
    /// The grant is being deleted.
    pub deleting: bool,
    pub expires_at: Option<Timestamp>,
    pub grantee: Principal,
    pub operations: Vec<KeyOperation>,
    pub constraints: Option<Constraints>,
    pub retiring_principal: Option<Principal>,
}

/// An encryption-context constraint on a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraints {
    /// The call's encryption context must equal this map exactly.
    Equals(BTreeMap<String, String>),
    /// The call's encryption context must contain every pair of this map (and may hold more).
    Subset(BTreeMap<String, String>),
}

impl Constraints {
    /// Whether a call's encryption context satisfies the constraint.
    pub fn allows(&self, context: &BTreeMap<String, String>) -> bool {
        match self {
            Constraints::Equals(equals) => equals == context,
            Constraints::Subset(subset) => subset.iter().all(|(k, v)| context.get(k) == Some(v)),
        }
    }
}

impl Grant {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the grant lets `who` do `op` on the key `key_id` with `context` at `now`: the
    /// controller marked it Active for this very key (not an earlier key of the same name),
    /// it has not expired (checked here too, not only by the controller), and its
    /// constraint holds.
    pub fn allows(
        &self,
        key_id: &str,
        who: &Identity,
        op: KeyOperation,
        context: &BTreeMap<String, String>,
        now: Timestamp,
    ) -> bool {
        self.state == Some(GrantState::Active)
            && self.key_id.as_deref() == Some(key_id)
            && self.retired_by.is_none()
            && !self.deleting
            && self.expires_at.is_none_or(|t| now < t)
            && self.operations.contains(&op)
            && self.grantee.matches(who)
            && self.constraints.as_ref().is_none_or(|c| c.allows(context))
    }

    /// Whether the grant itself lets `who` retire it: its retiring principal may; so may its
    /// grantee — but a Group grantee's members only when the grant lists `RetireGrant`, as
    /// one member would retire it for all of them.
    pub fn may_retire(&self, who: &Identity) -> bool {
        let grantee = match self.grantee {
            Principal::Group(_) => self.operations.contains(&KeyOperation::RetireGrant),
            Principal::ServiceAccount { .. } | Principal::User(_) => true,
        };
        (grantee && self.grantee.matches(who))
            || self.retiring_principal.as_ref().is_some_and(|p| p.matches(who))
    }
}

/// A grant's state.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum GrantState {
    /// The grant allows its operations.
    Active,
    /// expiresAt has passed.
    Expired,
    /// The grantee or the retiring principal retired the grant.
    Retired,
    /// The key does not exist or cannot be used; the condition says why.
    Invalid,
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn sa(ns: &str, name: &str) -> Identity {
        Identity { username: format!("system:serviceaccount:{ns}:{name}"), ..Default::default() }
    }

    fn grant(constraints: Option<Constraints>, expires: Option<&str>, state: Option<GrantState>) -> Grant {
        Grant {
            namespace: "apps".into(),
            name: "g".into(),
            grant_id: "g-1".into(),
            key_name: "k".into(),
            key_id: Some(KEY.into()),
            state,
            retired_by: None,
            deleting: false,
            expires_at: expires.map(|t| t.parse().unwrap()),
            grantee: Principal::ServiceAccount { namespace: "batch".into(), name: "nightly".into() },
            operations: vec![KeyOperation::Decrypt],
            constraints,
            retiring_principal: None,
        }
    }

    #[test]
    fn equals_constraint_needs_exact_context() {
        let c = Constraints::Equals(ctx(&[("app", "web")]));
        assert!(c.allows(&ctx(&[("app", "web")])));
        assert!(!c.allows(&ctx(&[("app", "web"), ("x", "y")])));
        assert!(!c.allows(&ctx(&[])));
    }

    #[test]
    fn subset_constraint_allows_extra_pairs() {
        let c = Constraints::Subset(ctx(&[("app", "web")]));
        assert!(c.allows(&ctx(&[("app", "web"), ("x", "y")])));
        assert!(!c.allows(&ctx(&[("app", "db")])));
        assert!(!c.allows(&ctx(&[])));
    }

    #[test]
    fn grants_need_active_state_grantee_operation_time_and_constraint() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let who = sa("batch", "nightly");
        let active = grant(None, None, Some(GrantState::Active));
        assert!(active.allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        assert!(!active.allows(KEY, &who, KeyOperation::Encrypt, &ctx(&[]), now), "operation not granted");
        assert!(
            !active.allows(KEY, &sa("batch", "other"), KeyOperation::Decrypt, &ctx(&[]), now),
            "other grantee"
        );
        assert!(
            !active.allows(KEY, &sa("other", "nightly"), KeyOperation::Decrypt, &ctx(&[]), now),
            "same name, other namespace"
        );
        for state in [None, Some(GrantState::Invalid), Some(GrantState::Expired), Some(GrantState::Retired)] {
            assert!(
                !grant(None, None, state).allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now),
                "{state:?}"
            );
        }
        let expiring = grant(None, Some("2026-06-01T00:00:01Z"), Some(GrantState::Active));
        assert!(expiring.allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        let later = now + jiff::SignedDuration::from_secs(1);
        assert!(!expiring.allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[]), later));
        let constrained =
            grant(Some(Constraints::Subset(ctx(&[("tenant", "acme")]))), None, Some(GrantState::Active));
        let matching = ctx(&[("tenant", "acme"), ("x", "y")]);
        assert!(constrained.allows(KEY, &who, KeyOperation::Decrypt, &matching, now));
        assert!(!constrained.allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[("tenant", "evil")]), now));
        let retired = Grant { retired_by: Some("someone".into()), ..active.clone() };
        assert!(!retired.allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        let deleting = Grant { deleting: true, ..active.clone() };
        assert!(!deleting.allows(KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        // A grant made for an earlier key of the same name does not carry over.
        let other_key = "7ece15cd-0195-4985-aff9-395763ad0a3b";
        assert!(!active.allows(other_key, &who, KeyOperation::Decrypt, &ctx(&[]), now));
    }

    #[test]
    fn the_grantee_or_the_retiring_principal_may_retire() {
        let g = Grant { retiring_principal: Some(Principal::User("ops".into())), ..grant(None, None, None) };
        assert!(g.may_retire(&sa("batch", "nightly")));
        assert!(g.may_retire(&Identity { username: "ops".into(), ..Default::default() }));
        assert!(!g.may_retire(&sa("batch", "other")));
    }

    #[test]
    fn a_group_grantee_retires_only_a_grant_that_lists_retire_grant() {
        let member = Identity { username: "jane".into(), groups: vec!["ops".into()], ..Default::default() };
        let group = Grant { grantee: Principal::Group("ops".into()), ..grant(None, None, None) };
        assert!(!group.may_retire(&member), "one member would retire it for every member");
        let retirable =
            Grant { operations: vec![KeyOperation::Decrypt, KeyOperation::RetireGrant], ..group.clone() };
        assert!(retirable.may_retire(&member));
        assert!(
            !retirable.may_retire(&Identity { username: "jane".into(), ..Default::default() }),
            "not a member"
        );
        // The retiring principal may, whatever the grant lists; so may a Group named as one.
        let by_group = Grant { retiring_principal: Some(Principal::Group("ops".into())), ..group };
        assert!(by_group.may_retire(&member));
    }
}
