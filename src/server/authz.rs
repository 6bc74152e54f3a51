//! Authorization, in three layers as in AWS KMS: the key policy (an explicit Deny always
//! wins), KmsGrants, and Kubernetes RBAC when the policy delegates to it (a
//! SubjectAccessReview for the operation's verb on the kmskeys object). One
//! [`Authorizer`] decides for every API the server speaks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::BackendError;
use super::cache::{AnswerMetrics, Answers, Cached};
use crate::domain::{
    Denial, Grant, GrantAuthority, GrantRefusal, Identity, Key, KeyOperation, Verdict, right_to_grant,
};

/// Asks Kubernetes RBAC whether `who` may use `verb` on the kmskeys object.
#[tonic::async_trait]
pub trait RbacChecker: Send + Sync + 'static {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, BackendError>;
}

/// How long and how many RBAC answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long an answer is reused, and so how long an RBAC change takes to apply.
    pub ttl: Duration,
    /// How many "allowed" answers are kept; the least recently used makes room.
    pub size: usize,
    /// How many "denied" answers are kept, apart from the allowed ones (so that questions
    /// about keys a caller may not use cannot push out the answers others are served from).
    pub denied_size: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings { ttl: Duration::from_secs(10), size: 10_000, denied_size: 1_000 }
    }
}

/// What one RBAC question is: who (username, uid, groups, extra), verb, namespace, name.
type Question = (String, String, Vec<String>, BTreeMap<String, Vec<String>>, String, String, String);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RbacCacheLabels {
    /// `key-api` (gRPC) or `aws` (the AWS KMS API).
    api: &'static str,
    /// `allowed` or `denied`.
    answer: &'static str,
}

/// The RBAC caches' metrics: how full they are and what made room.
#[derive(Clone, Debug, Default)]
pub struct RbacCacheMetrics(AnswerMetrics<RbacCacheLabels>);

impl RbacCacheMetrics {
    /// Registers `kubekms_server_rbac_cache_entries` and `…_evicted_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = RbacCacheMetrics::default();
        m.0.register(registry, "kubekms_server_rbac_cache", "SubjectAccessReview answers", "API and answer");
        m
    }
}

/// An [`RbacChecker`] whose answers are kept for a short time, in a bounded cache.
pub struct CachedRbac<R> {
    inner: R,
    ttl: Duration,
    cache: Mutex<Answers<Question, (), Instant>>,
    /// Its name in metric labels, and its metrics.
    name: &'static str,
    metrics: RbacCacheMetrics,
}

impl<R> CachedRbac<R> {
    pub fn new(inner: R, settings: &CacheSettings) -> Self {
        CachedRbac {
            inner,
            ttl: settings.ttl,
            cache: Mutex::new(Answers::new(settings.size, settings.denied_size)),
            name: "key-api",
            metrics: RbacCacheMetrics::default(),
        }
    }

    /// Reports to `metrics` under the label `api` (`key-api`, `aws`).
    pub fn with_metrics(self, api: &'static str, metrics: RbacCacheMetrics) -> Self {
        CachedRbac { name: api, metrics, ..self }
    }

    /// The checker asked when no answer is cached.
    pub fn inner(&self) -> &R {
        &self.inner
    }
}

#[tonic::async_trait]
impl<R: RbacChecker> RbacChecker for CachedRbac<R> {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, BackendError> {
        let question: Question = (
            who.username.clone(),
            who.uid.clone(),
            who.groups.clone(),
            who.extra.clone(),
            verb.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        );
        let now = Instant::now();
        match self.cache.lock().ok().and_then(|mut cache| cache.get(&question, now)) {
            Some(Cached::Yes(())) => return Ok(true),
            Some(Cached::No) => return Ok(false),
            None => {}
        }
        let allowed = self.inner.allowed(who, verb, namespace, name).await?;
        if let Ok(mut cache) = self.cache.lock() {
            let answer = if allowed { Cached::Yes(()) } else { Cached::No };
            cache.insert_reported(question, answer, now + self.ttl, &self.metrics.0, |allowed| {
                RbacCacheLabels { api: self.name, answer: if allowed { "allowed" } else { "denied" } }
            });
        }
        Ok(allowed)
    }
}

/// Why a call is not authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("{who} is denied {} on key {key} by the key policy{}", op.as_str(), statement(.sid, *.op, *.denied))]
    DeniedByPolicy { who: String, op: KeyOperation, key: String, sid: Option<String>, denied: KeyOperation },
    #[error(
        "{who} may not {} with key {key}: no key policy statement, grant{} allows it",
        op.as_str(),
        if *.rbac { " or RBAC rule" } else { "" }
    )]
    NotAllowed { who: String, op: KeyOperation, key: String, rbac: bool },
    #[error("{who} may not create this grant on key {key}: {refusal}")]
    MayNotGrant { who: String, key: String, refusal: GrantRefusal },
    #[error("failed to authorize the call with Kubernetes RBAC")]
    Rbac(#[source] BackendError),
}

/// Which statement denied the call, and — when it names another operation — which one.
fn statement(sid: &Option<String>, op: KeyOperation, denied: KeyOperation) -> String {
    match (sid, op == denied) {
        (Some(s), true) => format!(" (statement {s:?})"),
        (None, true) => String::new(),
        (Some(s), false) => {
            format!(" (statement {s:?} denies {}, which {} implies)", denied.as_str(), op.as_str())
        }
        (None, false) => format!(" (a statement denies {}, which {} implies)", denied.as_str(), op.as_str()),
    }
}

/// What allowed a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// A key policy statement (its sid, if any).
    Policy(Option<String>),
    /// A grant (its id).
    Grant(String),
    /// Kubernetes RBAC.
    Rbac,
}

impl Allowed {
    /// The grant that allowed the call, for the audit line.
    pub fn grant_id(&self) -> Option<String> {
        match self {
            Allowed::Grant(id) => Some(id.clone()),
            _ => None,
        }
    }
}

/// Decides whether a caller may do an operation with a key.
pub struct Authorizer<R> {
    rbac: R,
}

impl<R: RbacChecker> Authorizer<R> {
    pub fn new(rbac: R) -> Self {
        Authorizer { rbac }
    }

    /// Key policy (an explicit Deny wins, and a Deny of an operation `op` implies refuses
    /// `op` too), then the key's `grants`, then RBAC when the policy delegates to it.
    pub async fn authorize(
        &self,
        who: &Identity,
        key: &Key,
        op: KeyOperation,
        context: &BTreeMap<String, String>,
        grants: &[Arc<Grant>],
        now: Timestamp,
    ) -> Result<Allowed, AuthzError> {
        let granted = || {
            let grant = grants.iter().find(|g| g.allows(&key.info.uid, who, op, context, now))?;
            Some(grant.grant_id.clone())
        };
        self.decide(who, key, op, granted).await
    }

    /// Whether `who` may retire `grant`, a grant of `key` (`None` when the key is gone),
    /// decided as any operation is: the key policy for `RetireGrant` (a Deny wins), then the
    /// grant itself ([`Grant::may_retire`]), then the RBAC verb `retiregrant`.
    pub async fn authorize_retire(
        &self,
        who: &Identity,
        key: Option<&Key>,
        grant: &Grant,
    ) -> Result<Allowed, AuthzError> {
        let granted = || grant.may_retire(who).then(|| grant.grant_id.clone());
        match key {
            Some(key) => self.decide(who, key, KeyOperation::RetireGrant, granted).await,
            None => granted().map(Allowed::Grant).ok_or_else(|| AuthzError::NotAllowed {
                who: who.username.clone(),
                op: KeyOperation::RetireGrant,
                key: format!("{}/{}", grant.namespace, grant.key_name),
                rbac: false,
            }),
        }
    }

    /// Policy, then `granted` (the id of a grant that allows the call), then RBAC.
    async fn decide(
        &self,
        who: &Identity,
        key: &Key,
        op: KeyOperation,
        granted: impl FnOnce() -> Option<String>,
    ) -> Result<Allowed, AuthzError> {
        if let Some(Denial { sid, denied }) = key.policy.denial(who, op) {
            return Err(AuthzError::DeniedByPolicy {
                who: who.username.clone(),
                op,
                key: key.info.display(),
                sid,
                denied,
            });
        }
        if let Verdict::Allow(sid) = key.policy.verdict(who, op) {
            return Ok(Allowed::Policy(sid));
        }
        if let Some(grant_id) = granted() {
            return Ok(Allowed::Grant(grant_id));
        }
        let delegate = key.policy.delegate_to_rbac;
        if delegate
            && self
                .rbac
                .allowed(who, op.rbac_verb(), &key.info.namespace, &key.info.name)
                .await
                .map_err(AuthzError::Rbac)?
        {
            return Ok(Allowed::Rbac);
        }
        Err(AuthzError::NotAllowed { who: who.username.clone(), op, key: key.info.display(), rbac: delegate })
    }

    /// Whether `who` may create `grant` on `key` (CreateGrant): in the same order, the key
    /// policy (a Deny of CreateGrant or of an operation the grant gives wins), then one of
    /// the key's `grants` that gives `who` CreateGrant and covers the new grant, then RBAC
    /// (the verb creategrant) when the policy delegates to it.
    pub async fn authorize_grant(
        &self,
        who: &Identity,
        key: &Key,
        grant: &Grant,
        grants: &[Arc<Grant>],
        now: Timestamp,
    ) -> Result<GrantAuthority, AuthzError> {
        let (namespace, name) = (&key.info.namespace, &key.info.name);
        let rbac =
            async || self.rbac.allowed(who, KeyOperation::CreateGrant.rbac_verb(), namespace, name).await;
        right_to_grant(&key.policy, who, grant, grants, &key.info.uid, now, rbac)
            .await
            .map_err(AuthzError::Rbac)?
            .map_err(|refusal| AuthzError::MayNotGrant {
                who: who.username.clone(),
                key: key.info.display(),
                refusal,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::domain::{Effect, GrantState, Policy, Principal, Statement};

    /// Allows what `allow` names as (username, verb), counts the reviews; fails for "broken".
    struct Scripted {
        allow: Vec<(&'static str, &'static str)>,
        asked: AtomicUsize,
    }

    #[tonic::async_trait]
    impl RbacChecker for Scripted {
        async fn allowed(&self, who: &Identity, verb: &str, _: &str, _: &str) -> Result<bool, BackendError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if who.username == "broken" {
                return Err(BackendError::new(std::io::Error::other("down")));
            }
            Ok(self.allow.iter().any(|(u, v)| *u == who.username && *v == verb))
        }
    }

    fn key(delegate: bool, statements: Vec<Statement>) -> Key {
        crate::testing::enabled_key("apps", "k", "uid-1", Policy { delegate_to_rbac: delegate, statements })
    }

    /// The statement "no-mallory": a Deny of Decrypt to the user mallory.
    fn no_decrypt_for_mallory() -> Statement {
        Statement {
            sid: Some("no-mallory".into()),
            effect: Effect::Deny,
            principals: vec![Principal::User("mallory".into())],
            operations: vec![KeyOperation::Decrypt],
        }
    }

    fn user(name: &str) -> Identity {
        Identity { username: name.into(), ..Default::default() }
    }

    fn grant_to(name: &str) -> Arc<Grant> {
        Arc::new(Grant {
            namespace: "apps".into(),
            name: "g".into(),
            grant_id: "grant-1".into(),
            key_name: "k".into(),
            key_id: Some("uid-1".into()),
            state: Some(GrantState::Active),
            retired_by: None,
            deleting: false,
            expires_at: None,
            grantee: Principal::User(name.into()),
            operations: vec![KeyOperation::Decrypt],
            constraints: None,
            retiring_principal: None,
            creator: None,
        })
    }

    async fn decide(
        authz: &Authorizer<Scripted>,
        key: &Key,
        who: &str,
        grants: &[Arc<Grant>],
    ) -> Result<Allowed, AuthzError> {
        authz
            .authorize(
                &user(who),
                key,
                KeyOperation::Decrypt,
                &BTreeMap::new(),
                grants,
                Timestamp::UNIX_EPOCH,
            )
            .await
    }

    #[tokio::test]
    async fn a_deny_wins_over_grants_and_rbac() {
        let authz =
            Authorizer::new(Scripted { allow: vec![("mallory", "decrypt")], asked: AtomicUsize::new(0) });
        let k = key(true, vec![no_decrypt_for_mallory()]);
        let err = decide(&authz, &k, "mallory", &[grant_to("mallory")]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"mallory is denied Decrypt on key apps/k by the key policy (statement "no-mallory")"#
        );
        assert_eq!(authz.rbac.asked.load(Ordering::SeqCst), 0, "RBAC is not asked once a Deny matched");
    }

    #[tokio::test]
    async fn a_deny_of_decrypt_refuses_re_encrypt_out_of_the_key_and_says_why() {
        let authz = Authorizer::new(Scripted {
            allow: vec![("mallory", "reencryptfrom")],
            asked: AtomicUsize::new(0),
        });
        let k = key(true, vec![no_decrypt_for_mallory()]);
        let err = authz
            .authorize(
                &user("mallory"),
                &k,
                KeyOperation::ReEncryptFrom,
                &BTreeMap::new(),
                &[],
                Timestamp::UNIX_EPOCH,
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"mallory is denied ReEncryptFrom on key apps/k by the key policy (statement "no-mallory" denies Decrypt, which ReEncryptFrom implies)"#
        );
        assert_eq!(authz.rbac.asked.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rbac_answers_are_kept_for_their_lifetime_and_denials_apart() {
        let scripted = Scripted { allow: vec![("alice", "decrypt")], asked: AtomicUsize::new(0) };
        let settings = CacheSettings { ttl: Duration::from_secs(10), size: 2, denied_size: 3 };
        let mut registry = Registry::default();
        let metrics = RbacCacheMetrics::register(&mut registry);
        let rbac = CachedRbac::new(scripted, &settings).with_metrics("aws", metrics);
        let asked = || rbac.inner().asked.load(Ordering::SeqCst);
        assert!(rbac.allowed(&user("alice"), "decrypt", "apps", "k").await.unwrap());
        assert!(rbac.allowed(&user("alice"), "decrypt", "apps", "k").await.unwrap());
        assert_eq!(asked(), 1, "answered from the cache");
        // A flood of denied questions stays within its own bound.
        for i in 0..100 {
            assert!(!rbac.allowed(&user("mallory"), "decrypt", "apps", &format!("k{i}")).await.unwrap());
        }
        assert_eq!(rbac.cache.lock().unwrap().len(), (1, 3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"kubekms_server_rbac_cache_entries{api="aws",answer="allowed"} 1"#,
            r#"kubekms_server_rbac_cache_entries{api="aws",answer="denied"} 3"#,
            r#"kubekms_server_rbac_cache_evicted_total{api="aws",answer="denied"} 97"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(
            !text.contains(r#"evicted_total{api="aws",answer="allowed"}"#),
            "no allowed answer made room:\n{text}"
        );
        assert!(rbac.allowed(&user("alice"), "decrypt", "apps", "k").await.unwrap());
        assert_eq!(asked(), 101, "alice's answer survived the flood");
        // Past its lifetime an answer is asked for again.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(rbac.allowed(&user("alice"), "decrypt", "apps", "k").await.unwrap());
        assert_eq!(asked(), 102);
        // Errors are not cached.
        assert!(rbac.allowed(&user("broken"), "decrypt", "apps", "k").await.is_err());
        assert!(rbac.allowed(&user("broken"), "decrypt", "apps", "k").await.is_err());
        assert_eq!(asked(), 104);
    }

    #[tokio::test]
    async fn grants_then_rbac_only_when_the_policy_delegates() {
        let authz =
            Authorizer::new(Scripted { allow: vec![("alice", "decrypt")], asked: AtomicUsize::new(0) });
        let delegating = key(true, Vec::new());
        assert_eq!(
            decide(&authz, &delegating, "bob", &[grant_to("bob")]).await.unwrap(),
            Allowed::Grant("grant-1".into())
        );
        assert_eq!(authz.rbac.asked.load(Ordering::SeqCst), 0, "a grant answers without RBAC");
        assert_eq!(decide(&authz, &delegating, "alice", &[]).await.unwrap(), Allowed::Rbac);
        let err = decide(&authz, &delegating, "carol", &[]).await.unwrap_err();
        assert!(err.to_string().ends_with("no key policy statement, grant or RBAC rule allows it"), "{err}");

        let policy_only = key(false, Vec::new());
        let err = decide(&authz, &policy_only, "alice", &[]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "alice may not Decrypt with key apps/k: no key policy statement, grant allows it"
        );
        assert_eq!(
            authz.rbac.asked.load(Ordering::SeqCst),
            2,
            "a policy that does not delegate never asks RBAC"
        );

        let err = decide(&authz, &delegating, "broken", &[]).await.unwrap_err();
        assert!(matches!(err, AuthzError::Rbac(_)));
    }

    /// A grant of Decrypt to carol, as CreateGrant asks for it.
    fn new_grant() -> Grant {
        Grant {
            grant_id: String::new(),
            state: None,
            grantee: Principal::User("carol".into()),
            ..(*grant_to("carol")).clone()
        }
    }

    #[tokio::test]
    async fn creategrant_goes_policy_then_grants_then_rbac_and_a_deny_wins() {
        let authz =
            Authorizer::new(Scripted { allow: vec![("alice", "creategrant")], asked: AtomicUsize::new(0) });
        let now = Timestamp::UNIX_EPOCH;
        let decide = async |key: &Key, who: &str, grants: &[Arc<Grant>]| {
            authz.authorize_grant(&user(who), key, &new_grant(), grants, now).await
        };
        let delegating = key(true, Vec::new());
        assert_eq!(decide(&delegating, "alice", &[]).await.unwrap(), GrantAuthority::Rbac);
        let err = decide(&delegating, "carol", &[]).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("carol may not create this grant on key apps/k: carol has no right to grant"),
            "{err}"
        );
        assert!(matches!(err, AuthzError::MayNotGrant { .. }));

        // A grant that gives bob Decrypt and CreateGrant lets him give Decrypt, before RBAC.
        let asked = authz.rbac.asked.load(Ordering::SeqCst);
        let mut parent = (*grant_to("bob")).clone();
        parent.operations.push(KeyOperation::CreateGrant);
        let parents = [Arc::new(parent)];
        assert_eq!(
            decide(&delegating, "bob", &parents).await.unwrap(),
            GrantAuthority::Grant("grant-1".into())
        );
        assert_eq!(authz.rbac.asked.load(Ordering::SeqCst), asked, "the grant decided");

        // A policy Allow of CreateGrant decides on a key that does not delegate; a Deny
        // wins over RBAC creategrant.
        let bob = Principal::User("bob".into());
        let allow = Statement {
            sid: Some("grantors".into()),
            effect: Effect::Allow,
            principals: vec![bob.clone()],
            operations: vec![KeyOperation::CreateGrant],
        };
        let policy_only = key(false, vec![allow]);
        assert_eq!(
            decide(&policy_only, "bob", &[]).await.unwrap(),
            GrantAuthority::Policy(Some("grantors".into()))
        );
        assert!(
            decide(&policy_only, "alice", &[]).await.is_err(),
            "RBAC does not count on a policy-only key"
        );
        let deny = Statement {
            sid: Some("no-alice".into()),
            effect: Effect::Deny,
            principals: vec![Principal::User("alice".into())],
            operations: vec![KeyOperation::CreateGrant],
        };
        let err = decide(&key(true, vec![deny]), "alice", &[]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"alice may not create this grant on key apps/k: the key policy denies alice CreateGrant (statement "no-alice")"#
        );
        let err = decide(&delegating, "broken", &[]).await.unwrap_err();
        assert!(matches!(err, AuthzError::Rbac(_)));
    }
}
