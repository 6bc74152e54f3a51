//! Reconciling KmsGrants: Active only while the key exists and is Enabled, Invalid (with a
//! reason) otherwise, Expired at expiresAt, Retired once the key API recorded a retirement.
//! Deleting a grant revokes it; there is nothing to clean up.

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

/// What the grant's status should be at `now`, and when to look again.
pub fn plan(grant: &KmsGrant, key: Option<&KmsKey>, now: Timestamp) -> (KmsGrantStatus, Option<Duration>) {
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
    } else if key_state != Some(KeyState::Enabled) {
        let state = key_state.map_or("not ready", KeyState::as_str);
        (GrantState::Invalid, "KeyNotEnabled", format!("KmsKey {:?} is {state}", grant.spec.key_ref.name))
    } else {
        (GrantState::Active, "Active", format!("{} may {}", grant.spec.grantee, operations(grant)))
    };
    let ready = if state == GrantState::Active { "True" } else { "False" };
    let status = KmsGrantStatus {
        grant_id: grant.uid(),
        state: Some(state),
        grantee: Some(grant.spec.grantee.to_string()),
        key_id,
        retired_by: prev.retired_by.clone(),
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

fn operations(grant: &KmsGrant) -> String {
    grant.spec.operations.iter().map(|o| o.as_str()).collect::<Vec<_>>().join(", ")
}

/// Context of the grant controller: the shared context and the key cache.
pub struct GrantContext {
    pub inner: Arc<Context>,
    pub keys: Store<KmsKey>,
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
    let (next, requeue) = plan(grant, key.as_deref(), Timestamp::now());
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
    use crate::api::{KeyOperation, KeyReference, KmsGrantSpec, KmsKeySpec, KmsKeyStatus, Principal};

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
                creator: None,
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
        let (s, requeue) = plan(&grant(None), Some(&key(KeyState::Enabled)), now);
        assert_eq!(s.state, Some(GrantState::Active));
        assert_eq!(s.grant_id.as_deref(), Some("grant-uid"));
        assert_eq!(s.key_id.as_deref(), Some("key-uid"));
        assert_eq!(s.grantee.as_deref(), Some("ServiceAccount:batch/nightly"));
        assert_eq!(requeue, None);
        let (s, _) = plan(&grant(None), Some(&key(KeyState::Disabled)), now);
        assert_eq!(s.state, Some(GrantState::Invalid));
        assert_eq!(s.conditions[0].reason, "KeyNotEnabled");
        assert!(s.conditions[0].message.contains("Disabled"));
        let (s, _) = plan(&grant(None), None, now);
        assert_eq!((s.state, s.conditions[0].reason.as_str()), (Some(GrantState::Invalid), "KeyNotFound"));
    }

    #[test]
    fn expires_at_its_time_and_retires_for_good() {
        let g = grant(Some("2026-01-01T01:00:00Z"));
        let (s, requeue) = plan(&g, Some(&key(KeyState::Enabled)), t("2026-01-01T00:00:00Z"));
        assert_eq!(s.state, Some(GrantState::Active));
        assert_eq!(requeue, Some(Duration::from_secs(3600)));
        let (s, requeue) = plan(&g, Some(&key(KeyState::Enabled)), t("2026-01-01T01:00:00Z"));
        assert_eq!(s.state, Some(GrantState::Expired));
        assert_eq!(requeue, None);

        let mut retired = grant(None);
        retired.status = Some(KmsGrantStatus {
            retired_by: Some("system:serviceaccount:batch:nightly".into()),
            ..Default::default()
        });
        let (s, _) = plan(&retired, Some(&key(KeyState::Enabled)), t("2026-01-01T00:00:00Z"));
        assert_eq!(s.state, Some(GrantState::Retired));
        assert_eq!(s.retired_by.as_deref(), Some("system:serviceaccount:batch:nightly"));
    }

    #[test]
    fn a_grant_does_not_carry_over_to_a_new_key_of_the_same_name() {
        let now = t("2026-01-01T00:00:00Z");
        let mut g = grant(None);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), now);
        g.status = Some(s);
        let mut newer = key(KeyState::Enabled);
        newer.metadata.uid = Some("another-uid".into());
        let (s, _) = plan(&g, Some(&newer), now);
        assert_eq!((s.state, s.conditions[0].reason.as_str()), (Some(GrantState::Invalid), "KeyReplaced"));
        assert_eq!(s.key_id.as_deref(), Some("key-uid"), "the grant keeps naming its own key");
    }

    #[test]
    fn an_unchanged_grant_plans_the_same_status() {
        let now = t("2026-01-01T00:00:00Z");
        let mut g = grant(None);
        let (s, _) = plan(&g, Some(&key(KeyState::Enabled)), now);
        g.status = Some(s.clone());
        let (again, _) = plan(&g, Some(&key(KeyState::Enabled)), now + jiff::SignedDuration::from_hours(5));
        assert_eq!(again, s, "no spin");
    }
}
