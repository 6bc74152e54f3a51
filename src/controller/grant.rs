//! Reconciling KmsGrants: Active only while the key exists and is Enabled and the grant's
//! creator has the right to grant on it, Invalid (with a reason) otherwise, Expired at
//! expiresAt, Retired once the key API recorded a retirement. Deleting a grant revokes it;
//! there is nothing to clean up.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use super::lifecycle::{READY, condition};
use super::metrics::{ErrorLabels, KindLabels, ResultLabels};
use super::{Context, Error};
use crate::api::{GrantState, KeyState, KmsGrant, KmsGrantStatus, KmsKey};
use crate::audit::AuditEvent;
use crate::domain::{self, GrantAuthority, GrantRefusal, KeyOperation, Policy, right_to_grant};

/// What the controller found about the grant's creator: where their right to grant on the
/// key comes from, or why they have none.
pub type CreatorCheck = Result<GrantAuthority, GrantRefusal>;

/// What the grant's status should be at `now`, and when to look again. `creator` is the
/// check of the creator's right to grant on `key` (`None`: not checked, which gives nothing).
pub fn plan(
    grant: &KmsGrant,
    key: Option<&KmsKey>,
    creator: Option<&CreatorCheck>,
    now: Timestamp,
) -> (KmsGrantStatus, Option<Duration>) {
    let prev = grant.status.clone().unwrap_or_default();
    let generation = grant.metadata.generation.unwrap_or(0);
    let expires = grant.spec.expires_at.as_ref().map(|t| t.0);
    let key_state = key.and_then(|k| k.status.as_ref()).and_then(|s| s.state);
    // A grant is for the key it first resolved to: a later key of the same name (the first
    // destroyed and deleted) is another key, which the grant does not cover.
    let key_uid = key.and_then(|k| k.uid());
    let key_id = prev.key_id.clone().or_else(|| key_uid.clone());
    let replaced = prev.key_id.is_some() && key_uid.is_some() && key_uid != prev.key_id;
    let (state, reason, message) = if let Some(by) = &prev.retired_by {
        (GrantState::Retired, "Retired", format!("retired by {by}"))
    } else if expires.is_some_and(|t| now >= t) {
        (
            GrantState::Expired,
            "Expired",
            format!("expired at {}", expires.map(|t| t.to_string()).unwrap_or_default()),
        )
    } else if key.is_none() {
        (
            GrantState::Invalid,
            "KeyNotFound",
            format!("KmsKey {:?} does not exist in this namespace", grant.spec.key_ref.name),
        )
    } else if replaced {
        (
            GrantState::Invalid,
            "KeyReplaced",
            format!(
                "KmsKey {:?} is another key than the one this grant was made for (keyId {}); create a new grant",
                grant.spec.key_ref.name,
                prev.key_id.clone().unwrap_or_default()
            ),
        )
    } else if let Some(refusal) = refusal(creator) {
        (
            GrantState::Invalid,
            "CreatorNotAuthorized",
            format!(
                "the grant gives nothing: its creator may not grant on KmsKey {:?}: {refusal}. Have someone with the right to grant (the RBAC verb creategrant on the key, or a key policy statement that allows CreateGrant) create it",
                grant.spec.key_ref.name
            ),
        )
    } else if key_state != Some(KeyState::Enabled) {
        let state = key_state.map_or("not ready", KeyState::as_str);
        (GrantState::Invalid, "KeyNotEnabled", format!("KmsKey {:?} is {state}", grant.spec.key_ref.name))
    } else {
        let granted_by = match (grant.spec.creator.as_ref(), creator) {
            (Some(c), Some(Ok(authority))) => format!(" (granted by {}, {authority})", c.username),
            _ => String::new(),
        };
        (
            GrantState::Active,
            "Active",
            format!("{} may {}{granted_by}", grant.spec.grantee, operations(grant)),
        )
    };
    let ready = if state == GrantState::Active { "True" } else { "False" };
    let status = KmsGrantStatus {
        grant_id: grant.uid(),
        state: Some(state),
        grantee: Some(grant.spec.grantee.to_string()),
        key_id,
        retired_by: prev.retired_by.clone(),
        creator: grant.spec.creator.as_ref().map(|c| c.username.clone()),
        observed_generation: Some(generation),
        conditions: vec![condition(&prev.conditions, READY, ready, reason, message, generation, now)],
    };
    let requeue = match (state, expires) {
        (GrantState::Active | GrantState::Invalid, Some(t)) => {
            Some(Duration::try_from(t.duration_since(now)).unwrap_or_default().max(Duration::from_secs(1)))
        }
        _ => None,
    };
    (status, requeue)
}

/// Why the creator check gives the grant nothing, if it does.
fn refusal(creator: Option<&CreatorCheck>) -> Option<String> {
    match creator {
        Some(Ok(_)) => None,
        Some(Err(refusal)) => Some(refusal.to_string()),
        None => Some("its right to grant was not checked".to_owned()),
    }
}

fn operations(grant: &KmsGrant) -> String {
    grant.spec.operations.iter().map(|o| o.as_str()).collect::<Vec<_>>().join(", ")
}

/// Context of the grant controller: the shared context, the key cache and the grant cache.
pub struct GrantContext {
    pub inner: Arc<Context>,
    pub keys: Store<KmsKey>,
    pub grants: Store<KmsGrant>,
}

/// Whether the grant's creator may create it on `key` now: the key policy, the grant it
/// was created within (the only one considered, so that grants never hold each other up),
/// then RBAC — the same decision the key API's CreateGrant makes.
async fn check_creator(
    ctx: &GrantContext,
    grant: &KmsGrant,
    key: &KmsKey,
    now: Timestamp,
) -> Result<CreatorCheck, Error> {
    let child = domain::Grant::from(grant);
    let Some(creator) = child.creator.as_ref() else {
        return Ok(Err(GrantRefusal::NoCreator));
    };
    let namespace = key.namespace().unwrap_or_default();
    let parents: Vec<Arc<domain::Grant>> = match creator.parent_grant.as_deref() {
        Some(id) => ctx
            .grants
            .state()
            .into_iter()
            .filter(|g| {
                g.namespace().as_deref() == Some(namespace.as_str()) && g.uid().as_deref() == Some(id)
            })
            .map(|g| Arc::new(domain::Grant::from(g.as_ref())))
            .collect(),
        None => Vec::new(),
    };
    let (cluster, key_name) = (ctx.inner.cluster.clone(), key.name_any());
    let rbac = async || {
        let verb = KeyOperation::CreateGrant.rbac_verb();
        cluster.rbac_allows(&creator.identity, verb, &namespace, &key_name).await
    };
    let policy = Policy::from(&key.spec.policy);
    let key_id = key.uid().unwrap_or_default();
    right_to_grant(&policy, &creator.identity, &child, &parents, &key_id, now, rbac).await
}

pub async fn reconcile(grant: Arc<KmsGrant>, ctx: Arc<GrantContext>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_grant(&grant, &ctx).await;
    let m = &ctx.inner.metrics;
    m.reconcile_seconds
        .get_or_create(&KindLabels { kind: "KmsGrant" })
        .observe(started.elapsed().as_secs_f64());
    let outcome = if result.is_ok() { "ok" } else { "error" };
    m.reconciles.get_or_create(&ResultLabels { kind: "KmsGrant", result: outcome }).inc();
    if let Err(e) = &result {
        m.errors.get_or_create(&ErrorLabels { kind: "KmsGrant", category: e.category() }).inc();
    }
    result
}

pub fn error_policy(_grant: Arc<KmsGrant>, error: &Error, _ctx: Arc<GrantContext>) -> Action {
    tracing::warn!(error = %error, category = error.category(), "grant reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn reconcile_grant(grant: &KmsGrant, ctx: &GrantContext) -> Result<Action, Error> {
    if grant.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = grant.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let key = ctx.keys.get(&ObjectRef::new(&grant.spec.key_ref.name).within(&ns));
    let now = Timestamp::now();
    let creator = match key.as_deref() {
        Some(key) => Some(check_creator(ctx, grant, key, now).await?),
        None => None,
    };
    let (next, requeue) = plan(grant, key.as_deref(), creator.as_ref(), now);
    let prev = grant.status.clone().unwrap_or_default();
    if next == prev {
        return Ok(requeue.map_or(Action::requeue(Duration::from_secs(3600)), Action::requeue));
    }
    let (reason, warning) = match next.state {
        Some(GrantState::Active) => ("GrantActive", false),
        Some(GrantState::Expired) => ("GrantExpired", false),
        Some(GrantState::Retired) => ("GrantRetired", false),
        _ => ("GrantInvalid", true),
    };
    let note = next.conditions.first().map(|c| c.message.clone());
    let changed = next.state != prev.state;
    if changed {
        // Audited before status reports it, as for keys.
        let event = AuditEvent {
            component: "controller",
            request_id: uuid::Uuid::new_v4().to_string(),
            principal: super::key::requester(grant),
            operation: reason,
            key: Some(format!("{ns}/{}", grant.spec.key_ref.name)),
            key_id: next.key_id.clone(),
            grant_id: next.grant_id.clone(),
            result: if warning { "Refused" } else { "OK" },
            reason: note.clone(),
            ..Default::default()
        };
        ctx.inner.audit.record(&event).map_err(Error::Audit)?;
    }
    ctx.inner.cluster.patch_grant_status(&ns, &grant.name_any(), &next).await?;
    if changed {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note,
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        ctx.inner.cluster.publish(&grant.object_ref(&()), event).await;
    }
    Ok(requeue.map_or(Action::requeue(Duration::from_secs(3600)), Action::requeue))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    use super::*;
    use crate::api::{
        GrantCreator, KeyOperation, KeyReference, KmsGrantSpec, KmsKeySpec, KmsKeyStatus, Principal,
    };

    /// The creator check of a creator who may grant (through RBAC).
    const MAY: Option<&CreatorCheck> = Some(&Ok(GrantAuthority::Rbac));

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn grant(expires: Option<&str>) -> KmsGrant {
        let mut g = KmsGrant::new(
            "g",
            KmsGrantSpec {
                key_ref: KeyReference { name: "k".into() },
                grantee: Principal::service_account("batch", "nightly"),
                operations: vec![KeyOperation::Decrypt, KeyOperation::DescribeKey],
                constraints: None,
                expires_at: expires.map(|e| Time(t(e))),
                retiring_principal: None,
                creator: Some(GrantCreator {
                    username: "jane".into(),
                    groups: vec!["system:authenticated".into()],
                    parent_grant: None,
                }),
            },
        );
        g.metadata.uid = Some("grant-uid".into());
        g.metadata.namespace = Some("ns".into());
        g.metadata.generation = Some(1);
        g
    }

    fn key(state: KeyState) -> KmsKey {
        let spec: KmsKeySpec = serde_json::from_value(json!({})).unwrap();
        let mut k = KmsKey::new("k", spec);
        k.metadata.uid = Some("key-uid".into());
        k.status = Some(KmsKeyStatus { state: Some(state), ..Default::default() });
        k
    }

    #[test]
    fn active_only_while_the_key_is_enabled() {
        let now = t("2026-01-01T00:00:00Z");
        let (s, requeue) = plan(&grant(None), Some(&key(KeyState::Enabled)), MAY, now);
        assert_eq!(s.state, Some(GrantState::Active));
        assert_eq!(s.grant_id.as_deref(), Some("grant-uid"));
        assert_eq!(s.key_id.as_deref(), Some("key-uid"));
        assert_eq!(s.grantee.as_deref(), Some("ServiceAccount:batch/nightly"));
        assert_eq!(requeue, None);
        let (s, _) = plan(&grant(None), Some(&key(KeyState::Disabled)), MAY, now);
        assert_eq!(s.state, Some(GrantState::Invalid));
        assert_eq!(s.conditions[0].reason, "KeyNotEnabled");
        assert!(s.conditions[0].message.contains("Disabled"));
        let (s, _) = plan(&grant(None), None, MAY, now);
        assert_eq!((s.state, s.conditions[0].reason.as_str()), (Some(GrantState::Invalid), "KeyNotFound"));
    }

    #[test]
    fn expires_at_its_time_and_retires_for_good() {
        let g = grant(Some("2026-01-01T01:00:00Z"));
        let (s, requeue) = plan(&g, Some(&key(KeyState::Enabled)), MAY, t("2026-01-01T00:00:00Z"));
        assert_eq!(s.state, Some(GrantState::Active));
        assert_eq!(requeue, Some(Duration::from_secs(3600)));
        let (s, requeue) = plan(&g, Some(&key(KeyState::Enabled)), MAY, t("2026-01-01T01:00:00Z"));
        assert_eq!(s.state, Some(GrantState::Expired));
        assert_eq!(requeue, None);

        let mut retired = grant(None);
        retired.status = Some(KmsGrantStatus {
            retired_by: Some("system:serviceaccount:batch:nightly".into()),
            ..Default::default()
        });
        let (s, _) = plan(&retired, Some(&key(KeyState::Enabled)), MAY, t("2026-01-01T00:00:00Z"));
        assert_eq!(s.state, Some(GrantState::Retired));
        assert_eq!(s.retired_by.as_deref(), Some("system:serviceaccount:batch:nightly"));
    }

    #[test]
    fn a_grant_does_not_carry_over_to_a_new_key_of_the_same_name() {
        let now = t("2026-01-01T00:00:00Z");
        let mut g = grant(None);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), MAY, now);
        g.status = Some(s);
        let mut newer = key(KeyState::Enabled);
        newer.metadata.uid = Some("another-uid".into());
        let (s, _) = plan(&g, Some(&newer), MAY, now);
        assert_eq!((s.state, s.conditions[0].reason.as_str()), (Some(GrantState::Invalid), "KeyReplaced"));
        assert_eq!(s.key_id.as_deref(), Some("key-uid"), "the grant keeps naming its own key");
    }

    #[test]
    fn a_creator_without_the_right_to_grant_gives_nothing() {
        let now = t("2026-01-01T00:00:00Z");
        let refused: CreatorCheck =
            Err(GrantRefusal::NoRight { who: "jane".into(), rbac: true, outgrown: None });
        let (s, requeue) = plan(&grant(None), Some(&key(KeyState::Enabled)), Some(&refused), now);
        assert_eq!(
            (s.state, s.conditions[0].reason.as_str()),
            (Some(GrantState::Invalid), "CreatorNotAuthorized")
        );
        assert_eq!(s.conditions[0].status, "False");
        let message = &s.conditions[0].message;
        assert!(
            message.starts_with(
                r#"the grant gives nothing: its creator may not grant on KmsKey "k": jane has no right"#
            ),
            "{message}"
        );
        assert!(message.contains("creategrant"), "{message}");
        assert_eq!(s.creator.as_deref(), Some("jane"), "the creator is recorded whatever the verdict");
        assert_eq!(requeue, None);
        // A creator the policy denies, an unrecorded creator, or no check at all: the same.
        let denied: CreatorCheck = Err(GrantRefusal::Denied {
            who: "jane".into(),
            op: KeyOperation::CreateGrant,
            denied: KeyOperation::CreateGrant,
            sid: Some("no".into()),
        });
        let unrecorded: CreatorCheck = Err(GrantRefusal::NoCreator);
        for check in [Some(&denied), Some(&unrecorded), None] {
            let (s, _) = plan(&grant(None), Some(&key(KeyState::Enabled)), check, now);
            assert_eq!(s.conditions[0].reason, "CreatorNotAuthorized", "{check:?}");
        }
        // The creator is checked before the key's state, after whether the key exists at all.
        let (s, _) = plan(&grant(None), Some(&key(KeyState::Disabled)), Some(&refused), now);
        assert_eq!(s.conditions[0].reason, "CreatorNotAuthorized");
        let (s, _) = plan(&grant(None), None, None, now);
        assert_eq!(s.conditions[0].reason, "KeyNotFound");
        // An Active grant says who granted it, and with what right.
        let within: CreatorCheck = Ok(GrantAuthority::Grant("parent-uid".into()));
        let (s, _) = plan(&grant(None), Some(&key(KeyState::Enabled)), Some(&within), now);
        assert_eq!(s.state, Some(GrantState::Active));
        assert_eq!(
            s.conditions[0].message,
            "ServiceAccount:batch/nightly may Decrypt, DescribeKey (granted by jane, within grant parent-uid)"
        );
    }

    #[test]
    fn a_grant_the_creator_lost_the_right_to_goes_invalid_and_back() {
        let now = t("2026-01-01T00:00:00Z");
        let mut g = grant(None);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), MAY, now);
        g.status = Some(s);
        let lost: CreatorCheck =
            Err(GrantRefusal::NoRight { who: "jane".into(), rbac: true, outgrown: None });
        let later = now + jiff::SignedDuration::from_secs(60);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), Some(&lost), later);
        assert_eq!(s.state, Some(GrantState::Invalid));
        assert_eq!(s.conditions[0].last_transition_time, Time(later));
        g.status = Some(s);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), MAY, later);
        assert_eq!(s.state, Some(GrantState::Active), "the right back, the grant back");
    }

    #[test]
    fn an_unchanged_grant_plans_the_same_status() {
        let now = t("2026-01-01T00:00:00Z");
        let mut g = grant(None);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), MAY, now);
        g.status = Some(s.clone());
        let (again, _) =
            plan(&g, Some(&key(KeyState::Enabled)), MAY, now + jiff::SignedDuration::from_hours(5));
        assert_eq!(again, s, "no spin");
    }
}
