//! The right to grant: whether a grant's creator may create it on its key. The key API
//! decides with it before its CreateGrant creates a grant, and the controller again for
//! every grant it reconciles, so that a grant that slipped past admission gives nothing.
//!
//! In the order of every authorization, a Deny always winning:
//! 1. the key policy: a Deny of CreateGrant — or of any operation the grant would give: a
//!    creator cannot give what the policy denies it — refuses; an Allow of CreateGrant
//!    decides;
//! 2. a grant that gives the creator CreateGrant and covers the new grant (it gives nothing
//!    that grant does not, see [`Grant::covers`]): the only way CreateGrant goes onward;
//! 3. RBAC — the verb `creategrant` on the kmskeys object — when the policy delegates to it.

use std::fmt;
use std::sync::Arc;

use jiff::Timestamp;

use super::grant::Grant;
use super::policy::{Denial, KeyOperation, Policy, Verdict};
use super::principal::Identity;

/// Where a creator's right to grant came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantAuthority {
    /// A key policy statement allows the creator CreateGrant (its sid, if any).
    Policy(Option<String>),
    /// A grant gives the creator CreateGrant and covers the new grant (its id).
    Grant(String),
    /// RBAC allows the creator the verb creategrant on the key.
    Rbac,
}

impl fmt::Display for GrantAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantAuthority::Policy(Some(sid)) => write!(f, "by key policy statement {sid:?}"),
            GrantAuthority::Policy(None) => f.write_str("by a key policy statement"),
            GrantAuthority::Grant(id) => write!(f, "within grant {id}"),
            GrantAuthority::Rbac => f.write_str("by RBAC (verb creategrant on the key)"),
        }
    }
}

/// Why a creator may not create a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    #[error(
        "the grant records no creator: it was made past kubekms's admission policies, which record who creates a grant"
    )]
    NoCreator,
    #[error("the key policy denies {who} {}{}{}", denied.as_str(), statement(.sid), implied(*.op, *.denied))]
    Denied {
        who: String,
        /// What was refused: CreateGrant, or an operation the grant would give.
        op: KeyOperation,
        /// What the Deny statement names: `op`, or an operation `op` implies.
        denied: KeyOperation,
        sid: Option<String>,
    },
    #[error("{who} has no right to grant on the key: {}", no_right(*.rbac, .outgrown))]
    NoRight {
        who: String,
        /// Whether RBAC was asked (the policy delegates to it).
        rbac: bool,
        /// A grant that gives the creator CreateGrant but that the new grant outgrows.
        outgrown: Option<String>,
    },
}

fn implied(op: KeyOperation, denied: KeyOperation) -> String {
    if op == denied { String::new() } else { format!(", which {} implies", op.as_str()) }
}

fn statement(sid: &Option<String>) -> String {
    sid.as_ref().map(|s| format!(" (statement {s:?})")).unwrap_or_default()
}

fn no_right(rbac: bool, outgrown: &Option<String>) -> String {
    let via_grant = match outgrown {
        Some(id) => format!(
            "grant {id} gives it CreateGrant, but this grant gives more than that grant (an operation it does not give, a looser constraint or a later expiry)"
        ),
        None => "no grant gives it CreateGrant".to_owned(),
    };
    let rbac = if rbac {
        "RBAC does not allow it the verb creategrant on the key"
    } else {
        "the key policy does not delegate to RBAC"
    };
    format!("no key policy statement allows it CreateGrant, {via_grant}, and {rbac}")
}

/// Decides whether `creator` may create `grant` on the key `key_id` whose policy is
/// `policy`. `parents` are the grants that may give the creator the right (the key API
/// passes every grant of the key; the controller the one the grant was created within, so
/// that grants never hold each other up in a cycle); `rbac` asks RBAC for the verb
/// creategrant, and is called only when nothing else decided and the policy delegates.
pub async fn right_to_grant<E>(
    policy: &Policy,
    creator: &Identity,
    grant: &Grant,
    parents: &[Arc<Grant>],
    key_id: &str,
    now: Timestamp,
    rbac: impl AsyncFnOnce() -> Result<bool, E>,
) -> Result<Result<GrantAuthority, GrantRefusal>, E> {
    let who = || creator.username.clone();
    let given = std::iter::once(KeyOperation::CreateGrant).chain(grant.operations.iter().copied());
    for op in given {
        if let Some(Denial { sid, denied }) = policy.denial(creator, op) {
            return Ok(Err(GrantRefusal::Denied { who: who(), op, denied, sid }));
        }
    }
    if let Verdict::Allow(sid) = policy.verdict(creator, KeyOperation::CreateGrant) {
        return Ok(Ok(GrantAuthority::Policy(sid)));
    }
    let mut parents: Vec<&Grant> = parents.iter().map(Arc::as_ref).collect();
    parents.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
    if let Some(parent) = parents.iter().find(|p| p.covers(key_id, creator, grant, now)) {
        return Ok(Ok(GrantAuthority::Grant(parent.grant_id.clone())));
    }
    if policy.delegate_to_rbac && rbac().await? {
        return Ok(Ok(GrantAuthority::Rbac));
    }
    let outgrown = parents
        .iter()
        .find(|p| {
            p.in_force(key_id, now)
                && p.grantee.matches(creator)
                && p.operations.contains(&KeyOperation::CreateGrant)
        })
        .map(|p| p.grant_id.clone());
    Ok(Err(GrantRefusal::NoRight { who: who(), rbac: policy.delegate_to_rbac, outgrown }))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::convert::Infallible;

    use super::*;
    use crate::domain::{Constraints, Effect, GrantState, Principal, Statement};

    const KEY: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    fn user(name: &str) -> Identity {
        Identity { username: name.into(), groups: vec!["admins".into()], ..Default::default() }
    }

    fn statement(effect: Effect, who: Principal, ops: &[KeyOperation]) -> Statement {
        Statement {
            sid: Some(format!("{effect:?}")),
            effect,
            principals: vec![who],
            operations: ops.to_vec(),
        }
    }

    fn policy(delegate: bool, statements: Vec<Statement>) -> Policy {
        Policy { delegate_to_rbac: delegate, statements }
    }

    fn grant(id: &str, grantee: &str, ops: &[KeyOperation]) -> Grant {
        Grant {
            namespace: "apps".into(),
            name: id.into(),
            grant_id: id.into(),
            key_name: "k".into(),
            key_id: Some(KEY.into()),
            state: Some(GrantState::Active),
            retired_by: None,
            deleting: false,
            expires_at: None,
            grantee: Principal::User(grantee.into()),
            operations: ops.to_vec(),
            constraints: None,
            retiring_principal: None,
            creator: None,
        }
    }

    /// Decides for `who` creating a grant of `ops` to carol, RBAC answering `rbac`; also
    /// says whether RBAC was asked.
    async fn decide(
        policy: &Policy,
        who: &str,
        ops: &[KeyOperation],
        parents: &[Arc<Grant>],
        rbac: bool,
    ) -> (Result<GrantAuthority, GrantRefusal>, bool) {
        let asked = Cell::new(false);
        let child = Grant { grant_id: String::new(), state: None, ..grant("", "carol", ops) };
        let check = async || -> Result<bool, Infallible> {
            asked.set(true);
            Ok(rbac)
        };
        let decided = right_to_grant(policy, &user(who), &child, parents, KEY, now(), check).await;
        (decided.unwrap(), asked.get())
    }

    const DECRYPT: &[KeyOperation] = &[KeyOperation::Decrypt];

    #[tokio::test]
    async fn rbac_creategrant_is_the_right_to_grant_when_the_policy_delegates() {
        let delegating = policy(true, Vec::new());
        assert_eq!(decide(&delegating, "jane", DECRYPT, &[], true).await, (Ok(GrantAuthority::Rbac), true));
        let (refused, asked) = decide(&delegating, "jane", DECRYPT, &[], false).await;
        assert!(asked);
        assert_eq!(
            refused.unwrap_err().to_string(),
            "jane has no right to grant on the key: no key policy statement allows it CreateGrant, no grant gives it CreateGrant, and RBAC does not allow it the verb creategrant on the key"
        );
        let policy_only = policy(false, Vec::new());
        let (refused, asked) = decide(&policy_only, "jane", DECRYPT, &[], true).await;
        assert!(!asked, "a policy that does not delegate never asks RBAC");
        assert!(refused.unwrap_err().to_string().ends_with("the key policy does not delegate to RBAC"));
    }

    #[tokio::test]
    async fn a_policy_allow_decides_and_a_deny_always_wins() {
        let jane = Principal::User("jane".into());
        let allow = policy(false, vec![statement(Effect::Allow, jane.clone(), &[KeyOperation::CreateGrant])]);
        assert_eq!(
            decide(&allow, "jane", DECRYPT, &[], false).await,
            (Ok(GrantAuthority::Policy(Some("Allow".into()))), false)
        );
        // A Deny of CreateGrant wins over RBAC, a policy Allow and a grant.
        let admins = Principal::Group("admins".into());
        let deny = policy(
            true,
            vec![
                statement(Effect::Allow, admins, &[KeyOperation::CreateGrant]),
                statement(Effect::Deny, jane.clone(), &[KeyOperation::CreateGrant]),
            ],
        );
        let parent = Arc::new(grant("p", "jane", &[KeyOperation::Decrypt, KeyOperation::CreateGrant]));
        let (refused, asked) = decide(&deny, "jane", DECRYPT, &[parent], true).await;
        assert!(!asked);
        assert_eq!(
            refused,
            Err(GrantRefusal::Denied {
                who: "jane".into(),
                op: KeyOperation::CreateGrant,
                denied: KeyOperation::CreateGrant,
                sid: Some("Deny".into())
            })
        );
        // Nor can a creator give an operation the policy denies it: a Deny of Decrypt is not
        // sidestepped by a grant to someone else.
        let no_decrypt = policy(true, vec![statement(Effect::Deny, jane, DECRYPT)]);
        let (refused, _) = decide(&no_decrypt, "jane", DECRYPT, &[], true).await;
        assert_eq!(
            refused.unwrap_err().to_string(),
            r#"the key policy denies jane Decrypt (statement "Deny")"#
        );
        assert_eq!(
            decide(&no_decrypt, "jane", &[KeyOperation::Encrypt], &[], true).await.0,
            Ok(GrantAuthority::Rbac)
        );
        // Nor an operation that implies the denied one (ReEncryptFrom is Decrypt elsewhere),
        // and the reason names what the statement denies.
        let (refused, _) = decide(&no_decrypt, "jane", &[KeyOperation::ReEncryptFrom], &[], true).await;
        assert_eq!(
            refused.unwrap_err().to_string(),
            r#"the key policy denies jane Decrypt (statement "Deny"), which ReEncryptFrom implies"#
        );
    }

    #[tokio::test]
    async fn a_grant_gives_the_right_to_grant_only_within_itself() {
        let delegating = policy(true, Vec::new());
        let parent = Arc::new(grant("p", "bob", &[KeyOperation::Decrypt, KeyOperation::CreateGrant]));
        let parents = [parent.clone()];
        assert_eq!(
            decide(&delegating, "bob", DECRYPT, &parents, false).await,
            (Ok(GrantAuthority::Grant("p".into())), false),
            "the grant decides before RBAC is asked"
        );
        let onward = [KeyOperation::Decrypt, KeyOperation::CreateGrant];
        assert_eq!(
            decide(&delegating, "bob", &onward, &parents, false).await.0,
            Ok(GrantAuthority::Grant("p".into()))
        );
        let (refused, asked) = decide(&delegating, "bob", &[KeyOperation::Encrypt], &parents, false).await;
        assert!(asked, "RBAC may still give the right");
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("grant p gives it CreateGrant, but this grant gives more")
        );
        assert_eq!(
            decide(&delegating, "bob", &[KeyOperation::Encrypt], &parents, true).await.0,
            Ok(GrantAuthority::Rbac)
        );
        // Without CreateGrant a grant gives no right to grant, so none onward.
        let plain = [Arc::new(grant("q", "bob", DECRYPT))];
        let (refused, _) = decide(&policy(false, Vec::new()), "bob", DECRYPT, &plain, true).await;
        assert!(refused.unwrap_err().to_string().contains("no grant gives it CreateGrant"));
        // A grant of someone else, or one not in force, gives bob nothing.
        let mut retired = grant("r", "bob", &onward);
        retired.retired_by = Some("ops".into());
        let others = [Arc::new(grant("s", "alice", &onward)), Arc::new(retired)];
        assert!(decide(&policy(false, Vec::new()), "bob", DECRYPT, &others, true).await.0.is_err());
        // A constrained parent covers only children at least as strict.
        let mut constrained = grant("t", "bob", &onward);
        constrained.constraints = Some(Constraints::Subset([("tenant".into(), "acme".into())].into()));
        assert!(
            decide(&policy(false, Vec::new()), "bob", DECRYPT, &[Arc::new(constrained)], true)
                .await
                .0
                .is_err()
        );
    }

    #[test]
    fn an_unrecorded_creator_reads_clearly() {
        assert!(GrantRefusal::NoCreator.to_string().contains("records no creator"));
        assert_eq!(GrantAuthority::Grant("g-1".into()).to_string(), "within grant g-1");
        assert_eq!(
            GrantAuthority::Policy(Some("admins".into())).to_string(),
            r#"by key policy statement "admins""#
        );
    }
}
