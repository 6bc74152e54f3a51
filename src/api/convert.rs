//! The CRD objects converted into domain types, once, where they are watched: the data
//! paths never look at a CRD object.

use super::{GrantConstraints, KeyPolicy, KeyState, KmsGrant, KmsKey, KmsKeyMaterial};
use crate::domain::{self, Constraints, Grant, Key, KeyInfo, Policy, Statement, WrappedMaterial};

impl KmsKey {
    /// Which key this is, its state and current version, as its status reports them.
    pub fn info(&self) -> KeyInfo {
        let status = self.status.as_ref();
        KeyInfo {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
            key_id: self.metadata.uid.clone().unwrap_or_default(),
            state: status.and_then(|s| s.state).unwrap_or(KeyState::Creating),
            current_version: status.and_then(|s| s.current_version),
        }
    }
}

impl From<&KmsKey> for Key {
    fn from(key: &KmsKey) -> Self {
        let status = key.status.as_ref();
        let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.map(|t| t.0);
        Key {
            info: key.info(),
            description: key.spec.description.clone(),
            origin: key.spec.origin,
            versions: status.map(|s| s.versions.iter().map(|v| v.version).collect()).unwrap_or_default(),
            created: time(key.metadata.creation_timestamp.as_ref()),
            next_rotation: time(status.and_then(|s| s.next_rotation_time.as_ref())),
            deletion: time(status.and_then(|s| s.deletion_time.as_ref())),
            automatic_rotation: key.spec.rotation.automatic,
            rotation_period_days: key.spec.rotation.period_days,
            policy: Policy::from(&key.spec.policy),
        }
    }
}

impl From<&KeyPolicy> for Policy {
    fn from(policy: &KeyPolicy) -> Self {
        Policy {
            delegate_to_rbac: policy.delegate_to_rbac,
            statements: policy
                .statements
                .iter()
                .map(|s| Statement {
                    sid: s.sid.clone(),
                    effect: s.effect,
                    principals: s.principals.iter().map(domain::Principal::from).collect(),
                    operations: s.operations.clone(),
                })
                .collect(),
        }
    }
}

impl GrantConstraints {
    /// The constraint these fields set (the schema allows at most one of them).
    pub fn to_domain(&self) -> Option<Constraints> {
        match (&self.encryption_context_equals, &self.encryption_context_subset) {
            (Some(equals), _) => Some(Constraints::Equals(equals.clone())),
            (None, Some(subset)) => Some(Constraints::Subset(subset.clone())),
            (None, None) => None,
        }
    }
}

impl From<&KmsGrant> for Grant {
    fn from(grant: &KmsGrant) -> Self {
        let status = grant.status.as_ref();
        Grant {
            namespace: grant.metadata.namespace.clone().unwrap_or_default(),
            name: grant.metadata.name.clone().unwrap_or_default(),
            grant_id: grant.metadata.uid.clone().unwrap_or_default(),
            key_name: grant.spec.key_ref.name.clone(),
            key_id: status.and_then(|s| s.key_id.clone()),
            state: status.and_then(|s| s.state),
            retired_by: status.and_then(|s| s.retired_by.clone()),
            deleting: grant.metadata.deletion_timestamp.is_some(),
            expires_at: grant.spec.expires_at.as_ref().map(|t| t.0),
            grantee: domain::Principal::from(&grant.spec.grantee),
            operations: grant.spec.operations.clone(),
            constraints: grant.spec.constraints.as_ref().and_then(GrantConstraints::to_domain),
            retiring_principal: grant.spec.retiring_principal.as_ref().map(domain::Principal::from),
        }
    }
}

impl From<&KmsKeyMaterial> for WrappedMaterial {
    fn from(m: &KmsKeyMaterial) -> Self {
        WrappedMaterial {
            key_id: m.spec.owner.uid.clone(),
            root_key_fingerprint: m.spec.root_key_fingerprint.clone(),
            destroyed: m.spec.destroyed_at.is_some(),
            versions: m.spec.versions.iter().map(|v| (v.version, v.wrapped.clone())).collect(),
            revision: m.metadata.resource_version.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{
        Effect, GrantState, KeyOperation, KeyReference, KmsGrantSpec, KmsGrantStatus, KmsKeySpec,
        KmsKeyStatus, PolicyStatement, Principal, PrincipalKind,
    };

    fn spec() -> KmsKeySpec {
        serde_json::from_value(serde_json::json!({})).unwrap()
    }

    #[test]
    fn a_key_without_status_is_creating() {
        let mut key = KmsKey::new("k", spec());
        key.metadata.namespace = Some("apps".into());
        key.metadata.uid = Some("uid-1".into());
        let info = key.info();
        assert_eq!(
            (info.display(), info.key_id.as_str(), info.state),
            ("apps/k".into(), "uid-1", KeyState::Creating)
        );
        assert_eq!(info.current_version, None);
        key.status = Some(KmsKeyStatus {
            state: Some(KeyState::Enabled),
            current_version: Some(3),
            ..Default::default()
        });
        let converted = Key::from(&key);
        assert_eq!((converted.info.state, converted.info.current_version), (KeyState::Enabled, Some(3)));
        assert!(converted.automatic_rotation && converted.policy.delegate_to_rbac);
    }

    #[test]
    fn policies_and_grants_keep_every_term() {
        let mut key_spec = spec();
        key_spec.policy.statements = vec![PolicyStatement {
            sid: Some("ops".into()),
            effect: Effect::Deny,
            principals: vec![Principal { kind: PrincipalKind::Group, name: "ops".into(), namespace: None }],
            operations: vec![KeyOperation::Decrypt],
        }];
        let policy = Policy::from(&key_spec.policy);
        assert_eq!(policy.statements[0].principals, vec![domain::Principal::Group("ops".into())]);
        assert_eq!(policy.statements[0].effect, Effect::Deny);

        let pairs: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let mut grant = KmsGrant::new(
            "g",
            KmsGrantSpec {
                key_ref: KeyReference { name: "k".into() },
                grantee: Principal::service_account("batch", "nightly"),
                operations: vec![KeyOperation::Decrypt],
                constraints: Some(GrantConstraints {
                    encryption_context_equals: None,
                    encryption_context_subset: Some(pairs.clone()),
                }),
                expires_at: Some(Time("2026-06-01T00:00:00Z".parse().unwrap())),
                retiring_principal: None,
            },
        );
        grant.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        grant.status = Some(KmsGrantStatus {
            state: Some(GrantState::Active),
            key_id: Some("uid-1".into()),
            ..Default::default()
        });
        let g = Grant::from(&grant);
        assert_eq!(g.constraints, Some(Constraints::Subset(pairs)));
        assert!(g.deleting);
        assert_eq!((g.state, g.key_id.as_deref()), (Some(GrantState::Active), Some("uid-1")));
        assert_eq!(g.expires_at, Some("2026-06-01T00:00:00Z".parse().unwrap()));
    }
}
