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
    /// Who created the grant, as admission or the key API recorded it; `None` for a grant
    /// that no admission policy saw, which gives nothing.
    pub creator: Option<Creator>,
}

/// Who created a grant, and the grant whose CreateGrant they used, if that was their right
/// to grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creator {
    /// The creator as the API server authenticated them: user name and groups.
    pub identity: Identity,
    /// The id of the grant that gave the creator the right to grant, when the key API
    /// created this grant on the strength of it.
    pub parent_grant: Option<String>,
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

    /// Whether `child` (`None`: no constraint) allows no encryption context that `parent`
    /// does not: a grant made within another is at least as strict.
    pub fn within(child: Option<&Constraints>, parent: Option<&Constraints>) -> bool {
        let holds_all = |map: &BTreeMap<String, String>, pairs: &BTreeMap<String, String>| {
            pairs.iter().all(|(k, v)| map.get(k) == Some(v))
        };
        match (parent, child) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(Constraints::Equals(p)), Some(Constraints::Equals(c))) => p == c,
            (Some(Constraints::Equals(_)), Some(Constraints::Subset(_))) => false,
            (Some(Constraints::Subset(p)), Some(Constraints::Subset(c) | Constraints::Equals(c))) => {
                holds_all(c, p)
            }
        }
    }
}

impl Grant {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the grant is in force for the key `key_id` at `now`: the controller marked it
    /// Active for this very key (not an earlier key of the same name), it is neither retired
    /// nor being deleted, and it has not expired (checked here too, not only by the
    /// controller).
    pub fn in_force(&self, key_id: &str, now: Timestamp) -> bool {
        self.state == Some(GrantState::Active)
            && self.key_id.as_deref() == Some(key_id)
            && self.retired_by.is_none()
            && !self.deleting
            && self.expires_at.is_none_or(|t| now < t)
    }

    /// Whether the grant lets `who` do `op` on the key `key_id` with `context` at `now`: it
    /// is in force, gives `op` to `who`, and its constraint holds. Never for CreateGrant,
    /// which a grant gives only within itself ([`Grant::covers`]).
    pub fn allows(
        &self,
        key_id: &str,
        who: &Identity,
        op: KeyOperation,
        context: &BTreeMap<String, String>,
        now: Timestamp,
    ) -> bool {
        op != KeyOperation::CreateGrant
            && self.in_force(key_id, now)
            && self.operations.contains(&op)
            && self.grantee.matches(who)
            && self.constraints.as_ref().is_none_or(|c| c.allows(context))
    }

    /// Whether this grant lets `who` create `child` on the key `key_id` at `now`: it is in
    /// force, it gives `who` CreateGrant, and `child` gives nothing it does not — no other
    /// operation (so CreateGrant onward only because this grant gives it), a constraint at
    /// least as strict, and an expiry no later.
    pub fn covers(&self, key_id: &str, who: &Identity, child: &Grant, now: Timestamp) -> bool {
        self.grant_id != child.grant_id
            && self.in_force(key_id, now)
            && self.grantee.matches(who)
            && self.operations.contains(&KeyOperation::CreateGrant)
            && child.operations.iter().all(|op| self.operations.contains(op))
            && Constraints::within(child.constraints.as_ref(), self.constraints.as_ref())
            && self.expires_at.is_none_or(|end| child.expires_at.is_some_and(|t| t <= end))
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
            creator: None,
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
    fn a_constraint_within_another_is_at_least_as_strict() {
        let subset = |pairs: &[(&str, &str)]| Some(Constraints::Subset(ctx(pairs)));
        let equals = |pairs: &[(&str, &str)]| Some(Constraints::Equals(ctx(pairs)));
        let within = |child: &Option<Constraints>, parent: &Option<Constraints>| {
            Constraints::within(child.as_ref(), parent.as_ref())
        };
        let acme = subset(&[("tenant", "acme")]);
        assert!(within(&None, &None));
        assert!(within(&acme, &None), "anything is within no constraint");
        assert!(!within(&None, &acme), "no constraint is looser than any");
        assert!(within(&subset(&[("tenant", "acme"), ("app", "web")]), &acme));
        assert!(within(&equals(&[("tenant", "acme"), ("app", "web")]), &acme));
        assert!(!within(&subset(&[("app", "web")]), &acme));
        assert!(!within(&subset(&[("tenant", "evil")]), &acme));
        let exact = equals(&[("tenant", "acme")]);
        assert!(within(&exact, &exact));
        assert!(!within(&equals(&[("tenant", "acme"), ("app", "web")]), &exact));
        assert!(!within(&acme, &exact), "a subset allows more pairs than an exact match");
    }

    #[test]
    fn a_grant_covers_only_grants_within_itself() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let bob = sa("batch", "nightly");
        let parent = Grant {
            operations: vec![KeyOperation::Decrypt, KeyOperation::CreateGrant],
            constraints: Some(Constraints::Subset(ctx(&[("tenant", "acme")]))),
            expires_at: Some("2027-01-01T00:00:00Z".parse().unwrap()),
            ..grant(None, None, Some(GrantState::Active))
        };
        let child = Grant {
            grant_id: String::new(),
            grantee: Principal::User("carol".into()),
            operations: vec![KeyOperation::Decrypt],
            constraints: Some(Constraints::Equals(ctx(&[("tenant", "acme"), ("doc", "1")]))),
            expires_at: Some("2026-12-01T00:00:00Z".parse().unwrap()),
            ..grant(None, None, None)
        };
        assert!(parent.covers(KEY, &bob, &child, now));
        let onward =
            Grant { operations: vec![KeyOperation::Decrypt, KeyOperation::CreateGrant], ..child.clone() };
        assert!(parent.covers(KEY, &bob, &onward, now), "CreateGrant onward, since the parent gives it");
        let wider = Grant { operations: vec![KeyOperation::Encrypt], ..child.clone() };
        assert!(!parent.covers(KEY, &bob, &wider, now), "an operation the parent does not give");
        let looser = Grant { constraints: None, ..child.clone() };
        assert!(!parent.covers(KEY, &bob, &looser, now), "a looser constraint");
        let longer = Grant { expires_at: None, ..child.clone() };
        assert!(!parent.covers(KEY, &bob, &longer, now), "outlives the parent");
        assert!(!parent.covers(KEY, &sa("batch", "other"), &child, now), "only the parent's grantee");
        let no_right = Grant { operations: vec![KeyOperation::Decrypt], ..parent.clone() };
        assert!(
            !no_right.covers(KEY, &bob, &child, now),
            "a parent without CreateGrant gives no right to grant"
        );
        assert!(
            !no_right.covers(KEY, &bob, &onward, now),
            "a grant cannot give CreateGrant onward unless its creator may"
        );
        let invalid = Grant { state: Some(GrantState::Invalid), ..parent.clone() };
        assert!(!invalid.covers(KEY, &bob, &child, now), "a parent that is not Active covers nothing");
        let later: Timestamp = "2027-01-01T00:00:00Z".parse().unwrap();
        assert!(!parent.covers(KEY, &bob, &child, later), "an expired parent covers nothing");
        assert!(!parent.covers("7ece15cd-0195-4985-aff9-395763ad0a3b", &bob, &child, now), "another key");
        let itself = Grant { grant_id: parent.grant_id.clone(), ..onward };
        assert!(!parent.covers(KEY, &bob, &itself, now), "a grant is not its own parent");
        assert!(
            !parent.allows(KEY, &bob, KeyOperation::CreateGrant, &ctx(&[("tenant", "acme")]), now),
            "CreateGrant is never a call a grant allows"
        );
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
