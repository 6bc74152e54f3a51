//! Authorization, in three layers as in AWS KMS: the key policy (an explicit Deny always
//! wins), Kubernetes RBAC when the policy delegates to it (a SubjectAccessReview for the
//! operation's verb on the kmskeys object), and KmsGrants.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

use super::auth::Identity;
use crate::api::{Effect, GrantState, KeyOperation, KeyPolicy, KmsGrant, Principal};

/// What the key policy says about one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// A Deny statement matches (its sid, if any).
    Deny(Option<String>),
    /// An Allow statement matches and no Deny does.
    Allow(Option<String>),
    /// No statement matches.
    NoMatch,
}

fn matches(principals: &[Principal], who: &Identity) -> bool {
    principals.iter().any(|p| p.matches(&who.username, &who.groups))
}

/// Evaluates the key policy's statements.
pub fn policy_verdict(policy: &KeyPolicy, who: &Identity, op: KeyOperation) -> PolicyVerdict {
    let applicable =
        || policy.statements.iter().filter(|s| s.operations.contains(&op) && matches(&s.principals, who));
    if let Some(s) = applicable().find(|s| s.effect == Effect::Deny) {
        return PolicyVerdict::Deny(s.sid.clone());
    }
    match applicable().find(|s| s.effect == Effect::Allow) {
        Some(s) => PolicyVerdict::Allow(s.sid.clone()),
        None => PolicyVerdict::NoMatch,
    }
}

/// Whether `grant` lets `who` do `op` on the key `key_id` with `context` at `now`: the
/// controller marked it Active for this very key (not an earlier key of the same name), it
/// has not expired (checked here too, not only by the controller), and its constraint holds.
pub fn grant_allows(
    grant: &KmsGrant,
    key_id: &str,
    who: &Identity,
    op: KeyOperation,
    context: &BTreeMap<String, String>,
    now: Timestamp,
) -> bool {
    let status = grant.status.as_ref();
    status.and_then(|s| s.state) == Some(GrantState::Active)
        && status.and_then(|s| s.key_id.as_deref()) == Some(key_id)
        && status.and_then(|s| s.retired_by.as_ref()).is_none()
        && grant.metadata.deletion_timestamp.is_none()
        && grant.spec.expires_at.as_ref().is_none_or(|t| now < t.0)
        && grant.spec.operations.contains(&op)
        && grant.spec.grantee.matches(&who.username, &who.groups)
        && grant.spec.constraints.as_ref().is_none_or(|c| c.allows(context))
}

/// Why an RBAC check could not be made.
#[derive(Debug, thiserror::Error)]
#[error("failed to create a SubjectAccessReview")]
pub struct RbacError(#[source] pub kube::Error);

/// Asks Kubernetes RBAC whether `who` may use `verb` on the kmskeys object.
#[tonic::async_trait]
pub trait RbacChecker: Send + Sync + 'static {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, RbacError>;
}

type SarKey = (String, String, Vec<String>, BTreeMap<String, Vec<String>>, String, String, String);

/// SubjectAccessReviews, with answers cached for a short, bounded time.
pub struct SarChecker {
    client: Client,
    ttl: Duration,
    cache: Mutex<HashMap<SarKey, (bool, Instant)>>,
}

impl SarChecker {
    pub fn new(client: Client, ttl: Duration) -> Self {
        SarChecker { client, ttl, cache: Mutex::new(HashMap::new()) }
    }
}

#[tonic::async_trait]
impl RbacChecker for SarChecker {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, RbacError> {
        let key: SarKey = (
            who.username.clone(),
            who.uid.clone(),
            who.groups.clone(),
            who.extra.clone(),
            verb.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        );
        if let Ok(cache) = self.cache.lock()
            && let Some((allowed, _)) = cache.get(&key).filter(|(_, at)| at.elapsed() < self.ttl)
        {
            return Ok(*allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.username.clone()),
                uid: (!who.uid.is_empty()).then(|| who.uid.clone()),
                groups: Some(who.groups.clone()),
                extra: (!who.extra.is_empty()).then(|| who.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(crate::api::GROUP.to_owned()),
                    version: Some(crate::api::VERSION.to_owned()),
                    resource: Some("kmskeys".to_owned()),
                    namespace: Some(namespace.to_owned()),
                    name: Some(name.to_owned()),
                    verb: Some(verb.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let result = api.create(&PostParams::default(), &review).await.map_err(RbacError)?;
        let allowed = result.status.is_some_and(|s| s.allowed && s.denied != Some(true));
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(key, (allowed, Instant::now()));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{
        GrantConstraints, KeyReference, KmsGrantSpec, KmsGrantStatus, PolicyStatement, PrincipalKind,
    };

    fn sa(ns: &str, name: &str) -> Identity {
        Identity {
            username: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")],
            ..Default::default()
        }
    }

    fn statement(effect: Effect, principal: Principal, ops: &[KeyOperation]) -> PolicyStatement {
        PolicyStatement {
            sid: Some(format!("{effect:?}")),
            effect,
            principals: vec![principal],
            operations: ops.to_vec(),
        }
    }

    #[test]
    fn explicit_deny_wins_over_allow() {
        let group = Principal {
            kind: PrincipalKind::Group,
            name: "system:serviceaccounts:apps".into(),
            namespace: None,
        };
        let policy = KeyPolicy {
            delegate_to_rbac: false,
            statements: vec![
                statement(Effect::Allow, group.clone(), &[KeyOperation::Encrypt, KeyOperation::Decrypt]),
                statement(
                    Effect::Deny,
                    Principal::service_account("apps", "intruder"),
                    &[KeyOperation::Decrypt],
                ),
            ],
        };
        assert_eq!(
            policy_verdict(&policy, &sa("apps", "web"), KeyOperation::Decrypt),
            PolicyVerdict::Allow(Some("Allow".into()))
        );
        assert_eq!(
            policy_verdict(&policy, &sa("apps", "intruder"), KeyOperation::Decrypt),
            PolicyVerdict::Deny(Some("Deny".into()))
        );
        assert_eq!(
            policy_verdict(&policy, &sa("apps", "intruder"), KeyOperation::Encrypt),
            PolicyVerdict::Allow(Some("Allow".into()))
        );
        assert_eq!(
            policy_verdict(&policy, &sa("other", "web"), KeyOperation::Encrypt),
            PolicyVerdict::NoMatch
        );
        assert_eq!(
            policy_verdict(&policy, &sa("apps", "web"), KeyOperation::GenerateDataKey),
            PolicyVerdict::NoMatch
        );
    }

    fn grant(
        constraints: Option<GrantConstraints>,
        expires: Option<&str>,
        state: Option<GrantState>,
    ) -> KmsGrant {
        let mut g = KmsGrant::new(
            "g",
            KmsGrantSpec {
                key_ref: KeyReference { name: "k".into() },
                grantee: Principal::service_account("batch", "nightly"),
                operations: vec![KeyOperation::Decrypt],
                constraints,
                expires_at: expires.map(|t| Time(t.parse().unwrap())),
                retiring_principal: None,
            },
        );
        g.status = Some(KmsGrantStatus { state, key_id: Some(KEY.into()), ..Default::default() });
        g
    }

    const KEY: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn grants_need_active_state_grantee_operation_time_and_constraint() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let who = sa("batch", "nightly");
        let active = grant(None, None, Some(GrantState::Active));
        assert!(grant_allows(&active, KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        assert!(
            !grant_allows(&active, KEY, &who, KeyOperation::Encrypt, &ctx(&[]), now),
            "operation not granted"
        );
        assert!(
            !grant_allows(&active, KEY, &sa("batch", "other"), KeyOperation::Decrypt, &ctx(&[]), now),
            "other grantee"
        );
        assert!(
            !grant_allows(&active, KEY, &sa("other", "nightly"), KeyOperation::Decrypt, &ctx(&[]), now),
            "same name, other namespace"
        );
        for state in [None, Some(GrantState::Invalid), Some(GrantState::Expired), Some(GrantState::Retired)] {
            assert!(
                !grant_allows(&grant(None, None, state), KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now),
                "{state:?}"
            );
        }
        let expiring = grant(None, Some("2026-06-01T00:00:01Z"), Some(GrantState::Active));
        assert!(grant_allows(&expiring, KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        assert!(!grant_allows(
            &expiring,
            KEY,
            &who,
            KeyOperation::Decrypt,
            &ctx(&[]),
            now + jiff::SignedDuration::from_secs(1)
        ));
        let subset = GrantConstraints {
            encryption_context_subset: Some(ctx(&[("tenant", "acme")])),
            encryption_context_equals: None,
        };
        let constrained = grant(Some(subset), None, Some(GrantState::Active));
        assert!(grant_allows(
            &constrained,
            KEY,
            &who,
            KeyOperation::Decrypt,
            &ctx(&[("tenant", "acme"), ("x", "y")]),
            now
        ));
        assert!(!grant_allows(
            &constrained,
            KEY,
            &who,
            KeyOperation::Decrypt,
            &ctx(&[("tenant", "evil")]),
            now
        ));
        let mut retired = grant(None, None, Some(GrantState::Active));
        retired.status.as_mut().unwrap().retired_by = Some("someone".into());
        assert!(!grant_allows(&retired, KEY, &who, KeyOperation::Decrypt, &ctx(&[]), now));
        // A grant made for an earlier key of the same name does not carry over.
        assert!(!grant_allows(
            &active,
            "7ece15cd-0195-4985-aff9-395763ad0a3b",
            &who,
            KeyOperation::Decrypt,
            &ctx(&[]),
            now
        ));
    }
}
