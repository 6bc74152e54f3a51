//! The CRD objects converted into domain types, once, where they are watched: the data
//! paths never look at a CRD object.

use super::{
    GrantConstraints, GrantCreator, KeyPolicy, KeyReference, KmsGrant, KmsGrantSpec, KmsKey, KmsKeyMaterial,
    KmsKeyUsage, Principal, PrincipalKind, VersionTrigger,
};
use crate::domain::{
    self, Constraints, Creator, Grant, Identity, Key, KeyInfo, KeyIntent, Policy, ReporterUse, Statement,
    Usage, VersionCause, VersionMade, WrappedMaterial,
};

impl KmsKey {
    /// What the spec asks for, and whether the key is being deleted.
    pub fn intent(&self) -> KeyIntent {
        KeyIntent {
            origin: self.spec.origin,
            enabled: self.spec.enabled,
            deletion_scheduled: self.spec.deletion.scheduled,
            deletion_forced: self.spec.deletion.force,
            deleting: self.metadata.deletion_timestamp.is_some(),
            disabled_versions: self.spec.versions.iter().filter(|r| !r.enabled).map(|r| r.version).collect(),
        }
    }

    /// Which key this is, and its state and current version as the spec and `material`
    /// (the key's material object) decide them — never its status.
    pub fn info(&self, material: Option<&WrappedMaterial>) -> KeyInfo {
        Key::from(self).with_material(material).info
    }
}

/// The key without its material; [`Key::with_material`] completes it.
impl From<&KmsKey> for Key {
    fn from(key: &KmsKey) -> Self {
        let status = key.status.as_ref();
        let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.map(|t| t.0);
        let intent = key.intent();
        let (state, current_version) = intent.state(None);
        Key {
            info: KeyInfo {
                namespace: key.metadata.namespace.clone().unwrap_or_default(),
                name: key.metadata.name.clone().unwrap_or_default(),
                key_id: key.metadata.uid.clone().unwrap_or_default(),
                uid: key.metadata.uid.clone().unwrap_or_default(),
                state,
                current_version,
                refused_versions: Default::default(),
                valid_to: None,
            },
            intent,
            description: key.spec.description.clone(),
            origin: key.spec.origin,
            versions: Vec::new(),
            history: Vec::new(),
            created: time(key.metadata.creation_timestamp.as_ref()),
            next_rotation: time(status.and_then(|s| s.next_rotation_time.as_ref())),
            deletion: None,
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

impl From<&Constraints> for GrantConstraints {
    fn from(c: &Constraints) -> Self {
        let (equals, subset) = match c {
            Constraints::Equals(pairs) => (Some(pairs.clone()), None),
            Constraints::Subset(pairs) => (None, Some(pairs.clone())),
        };
        GrantConstraints { encryption_context_equals: equals, encryption_context_subset: subset }
    }
}

impl From<&domain::Principal> for Principal {
    fn from(p: &domain::Principal) -> Self {
        match p {
            domain::Principal::ServiceAccount { namespace, name } => {
                Principal::service_account(namespace, name)
            }
            domain::Principal::User(name) => {
                Principal { kind: PrincipalKind::User, name: name.clone(), namespace: None }
            }
            domain::Principal::Group(name) => {
                Principal { kind: PrincipalKind::Group, name: name.clone(), namespace: None }
            }
        }
    }
}

impl From<&GrantCreator> for Creator {
    fn from(c: &GrantCreator) -> Self {
        Creator {
            identity: Identity {
                username: c.username.clone(),
                groups: c.groups.clone(),
                ..Default::default()
            },
            parent_grant: c.parent_grant.clone(),
        }
    }
}

/// The grant the key API's CreateGrant creates: a domain grant's terms and creator, with
/// its name or, when it has none, a generated one.
impl From<&Grant> for KmsGrant {
    fn from(g: &Grant) -> Self {
        let spec = KmsGrantSpec {
            key_ref: KeyReference { name: g.key_name.clone() },
            grantee: Principal::from(&g.grantee),
            operations: g.operations.clone(),
            constraints: g.constraints.as_ref().map(GrantConstraints::from),
            expires_at: g.expires_at.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
            retiring_principal: g.retiring_principal.as_ref().map(Principal::from),
            creator: g.creator.as_ref().map(|c| GrantCreator {
                username: c.identity.username.clone(),
                groups: c.identity.groups.clone(),
                parent_grant: c.parent_grant.clone(),
            }),
        };
        let mut grant = KmsGrant::new(&g.name, spec);
        grant.metadata.namespace = Some(g.namespace.clone());
        if g.name.is_empty() {
            grant.metadata.name = None;
            grant.metadata.generate_name = Some("grant-".to_owned());
        }
        grant
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
            creator: grant.spec.creator.as_ref().map(Creator::from),
        }
    }
}

impl From<&KmsKeyUsage> for Usage {
    fn from(u: &KmsKeyUsage) -> Self {
        let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.as_ref().map(|t| t.0);
        Usage {
            reporters: u
                .spec
                .reporters
                .iter()
                .map(|r| ReporterUse {
                    name: r.name.clone(),
                    kind: match r.kind {
                        super::ReporterKind::StoragePlugin => domain::ReporterKind::StoragePlugin,
                        super::ReporterKind::KeyApi => domain::ReporterKind::KeyApi,
                    },
                    granularity: jiff::SignedDuration::from_secs(i64::from(r.granularity_seconds.max(1))),
                    versions: r
                        .versions
                        .iter()
                        .map(|v| {
                            (
                                v.version,
                                domain::VersionUse {
                                    last_encrypt: time(&v.last_encrypt),
                                    last_decrypt: time(&v.last_decrypt),
                                    last_refused: time(&v.last_refused),
                                },
                            )
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl From<&KmsKeyMaterial> for WrappedMaterial {
    fn from(m: &KmsKeyMaterial) -> Self {
        WrappedMaterial {
            key_id: m.spec.key_id().to_owned(),
            uid: m.spec.owner.uid.clone(),
            root_key_fingerprint: m.spec.root_key_fingerprint.clone(),
            destroyed: m.spec.destroyed_at.is_some(),
            deletion_time: m.spec.deletion_time.as_ref().map(|t| t.0),
            versions: m.spec.versions.iter().filter_map(|v| Some((v.version, v.wrapped.clone()?))).collect(),
            version_roots: m
                .spec
                .versions
                .iter()
                .filter(|v| v.wrapped.is_some())
                .filter_map(|v| Some((v.version, v.root_key_fingerprint.clone()?)))
                .collect(),
            destroyed_versions: m
                .spec
                .versions
                .iter()
                .filter(|v| v.destroyed_at.is_some())
                .map(|v| v.version)
                .collect(),
            version_deletions: m
                .spec
                .versions
                .iter()
                .filter_map(|v| Some((v.version, v.deletion_time.as_ref()?.0)))
                .collect(),
            deletion_refused: m.spec.deletion_refused.is_some(),
            valid_to: m
                .spec
                .imported
                .as_ref()
                .and_then(|i| i.valid_to.as_ref())
                .filter(|_| m.spec.versions.iter().any(|v| v.wrapped.is_some()))
                .map(|t| t.0),
            revision: m.metadata.resource_version.clone(),
            history: m
                .spec
                .versions
                .iter()
                .map(|v| VersionMade {
                    version: v.version,
                    created: v.created.0,
                    cause: match v.trigger {
                        VersionTrigger::Created => VersionCause::Created,
                        VersionTrigger::Scheduled => VersionCause::Scheduled,
                        VersionTrigger::OnDemand => VersionCause::OnDemand,
                        VersionTrigger::Imported => VersionCause::Imported,
                    },
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{
        Effect, GrantState, KeyOperation, KeyReference, KeyState, KmsGrantSpec, KmsGrantStatus, KmsKeySpec,
        KmsKeyStatus, PolicyStatement, Principal, PrincipalKind,
    };

    fn spec() -> KmsKeySpec {
        serde_json::from_value(serde_json::json!({})).unwrap()
    }

    #[test]
    fn the_state_comes_from_the_spec_and_the_material_never_from_status() {
        let mut key = KmsKey::new("k", spec());
        key.metadata.namespace = Some("apps".into());
        key.metadata.uid = Some("uid-1".into());
        let info = key.info(None);
        assert_eq!(
            (info.display(), info.key_id.as_str(), info.state),
            ("apps/k".into(), "uid-1", KeyState::Creating)
        );
        assert_eq!(info.current_version, None);
        let material = WrappedMaterial {
            key_id: "uid-1".into(),
            uid: "uid-1".into(),
            root_key_fingerprint: "rk".into(),
            destroyed: false,
            deletion_time: None,
            versions: vec![(1, String::new()), (2, String::new())],
            revision: None,
            ..Default::default()
        };
        // A status that claims another state and version is not believed.
        key.status = Some(KmsKeyStatus {
            state: Some(KeyState::Enabled),
            current_version: Some(1),
            ..Default::default()
        });
        key.spec.enabled = false;
        let converted = Key::from(&key).with_material(Some(&material));
        assert_eq!((converted.info.state, converted.info.current_version), (KeyState::Disabled, Some(2)));
        assert_eq!(converted.versions, [1, 2]);
        // Another key's material is not this key's.
        let other = WrappedMaterial { key_id: "uid-2".into(), uid: "uid-2".into(), ..material.clone() };
        assert_eq!(key.info(Some(&other)).current_version, None);
        // Restored from a backup: the key's keyId is its material's, not its UID.
        let restored = WrappedMaterial { key_id: "6ece15cd-0195-4985-aff9-395763ad0a3b".into(), ..material };
        let info = key.info(Some(&restored));
        assert_eq!(
            (info.key_id.as_str(), info.uid.as_str()),
            ("6ece15cd-0195-4985-aff9-395763ad0a3b", "uid-1")
        );
        assert_eq!(info.current_version, Some(2));
        assert!(converted.automatic_rotation && converted.policy.delegate_to_rbac);
    }

    #[test]
    fn the_material_tells_when_and_why_each_version_was_made() {
        let material: KmsKeyMaterial = serde_json::from_value(serde_json::json!({
            "apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsKeyMaterial", "metadata": {"name": "m"},
            "spec": {"owner": {"namespace": "apps", "name": "k", "uid": "uid-1"}, "origin": "KUBEKMS",
                     "rootKeyFingerprint": "f", "versions": [
                {"version": 1, "created": "2026-01-01T00:00:00Z", "trigger": "Created", "wrapped": "AA=="},
                {"version": 2, "created": "2026-02-01T00:00:00Z", "trigger": "Scheduled",
                 "destroyedAt": "2026-03-01T00:00:00Z"},
                {"version": 3, "created": "2026-03-01T00:00:00Z", "trigger": "OnDemand", "request": "r",
                 "wrapped": "AA=="},
            ]},
        }))
        .unwrap();
        let history = WrappedMaterial::from(&material).history;
        let causes: Vec<(u32, VersionCause)> = history.iter().map(|v| (v.version, v.cause)).collect();
        assert_eq!(
            causes,
            [(1, VersionCause::Created), (2, VersionCause::Scheduled), (3, VersionCause::OnDemand)]
        );
        assert_eq!(history[1].created, "2026-02-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap());
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
                creator: Some(GrantCreator {
                    username: "jane".into(),
                    groups: vec!["ops".into()],
                    parent_grant: Some("parent-1".into()),
                }),
            },
        );
        grant.metadata.namespace = Some("apps".into());
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
        let creator = g.creator.clone().unwrap();
        assert_eq!(
            (creator.identity.username.as_str(), creator.identity.groups.as_slice()),
            ("jane", &["ops".to_owned()][..])
        );
        assert_eq!(creator.parent_grant.as_deref(), Some("parent-1"));

        // And back, as the key API creates a grant: the same terms, and a generated name
        // when the grant has none.
        let again = KmsGrant::from(&g);
        assert_eq!(serde_json::to_value(&again.spec).unwrap(), serde_json::to_value(&grant.spec).unwrap());
        assert_eq!(
            (again.metadata.name.as_deref(), again.metadata.namespace.as_deref()),
            (Some("g"), Some("apps"))
        );
        let unnamed = KmsGrant::from(&Grant { name: String::new(), ..g });
        assert_eq!(
            (unnamed.metadata.name, unnamed.metadata.generate_name.as_deref()),
            (None, Some("grant-"))
        );
    }
}
