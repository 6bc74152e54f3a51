//! The AWS API's management operations, carried out as object changes the controller then
//! reconciles — EnableKey patches `spec.enabled`, ScheduleKeyDeletion `spec.deletion`,
//! TagResource the labels, CreateKey creates a KmsKey, RevokeGrant deletes a KmsGrant — and
//! authorized as the caller's own Kubernetes rights on the object it changes: a
//! SubjectAccessReview for what `kubectl` would need (`patch kmskeys`, `create kmskeys`,
//! `get kmskeys`, `list kmsgrants`, `delete kmsgrants`). Each is audited through the call
//! pipeline. The object store is a trait ([`KeyAdmin`]); its Kubernetes side is
//! `aws/k8s.rs`.

use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};

use super::AwsApi;
use super::ops::{Named, account, parse};
use super::protocol::{AwsFault, key_arn};
use crate::audit::AuditEvent;
use crate::domain::{Constraints, Identity, Key, KeyState, Origin, Principal};
use crate::server::BackendError;
use crate::server::auth::TokenReviewer;
use crate::server::authz::RbacChecker;
use crate::server::directory::KeyDirectory;
use crate::server::service::{GrantWriter, describe};

/// The management operations served.
pub const OPERATIONS: &[&str] = &[
    "CreateKey",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "RotateKeyOnDemand",
    "TagResource",
    "UntagResource",
    "ListResourceTags",
    "GetKeyPolicy",
    "ListKeyPolicies",
    "UpdateKeyDescription",
    "ListGrants",
    "ListRetirableGrants",
    "RevokeGrant",
    "ListAliases",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
];

/// Why the object store refused a change.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the object does not exist")]
    NotFound,
    #[error("the API server refused the change: {0}")]
    Invalid(String),
    #[error("the object exists already")]
    Exists,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Where management operations change objects, and whom RBAC lets change them.
#[tonic::async_trait]
pub trait KeyAdmin: Send + Sync + 'static {
    /// Whether RBAC allows `who` `verb` on `resource` (of kms.kubekms.io) `namespace/name`
    /// (`name` empty: the collection).
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, BackendError>;
    /// Merge-patches the KmsKey.
    async fn patch_key(&self, namespace: &str, name: &str, patch: &Value) -> Result<(), AdminError>;
    /// The KmsKey as JSON.
    async fn get_key(&self, namespace: &str, name: &str) -> Result<Value, AdminError>;
    /// Creates a KmsKey from JSON; returns its keyId (UID).
    async fn create_key(&self, namespace: &str, key: &Value) -> Result<String, AdminError>;
    /// Deletes a KmsGrant.
    async fn delete_grant(&self, namespace: &str, name: &str) -> Result<(), AdminError>;
    /// Creates the KmsAlias `namespace/name` naming the key `target` (or, with `create`
    /// false, points the existing one at it).
    async fn put_alias(
        &self,
        namespace: &str,
        name: &str,
        target: &str,
        create: bool,
    ) -> Result<(), AdminError>;
    /// Deletes a KmsAlias.
    async fn delete_alias(&self, namespace: &str, name: &str) -> Result<(), AdminError>;
}

fn backend(_: BackendError) -> AwsFault {
    AwsFault::new(503, "DependencyTimeoutException", "cannot reach the Kubernetes API server right now")
}

fn admin_fault(e: AdminError) -> AwsFault {
    match e {
        AdminError::NotFound => AwsFault::client("NotFoundException", "the object is gone"),
        AdminError::Invalid(m) => AwsFault::validation(m),
        AdminError::Exists => AwsFault::client("AlreadyExistsException", "the object exists already"),
        AdminError::Backend(b) => backend(b),
    }
}

fn invalid_state(key: &Key, wanted: &str) -> AwsFault {
    AwsFault::client(
        "KMSInvalidStateException",
        format!("{} is {}; {wanted}", key_ref(key), key.info.state.as_str()),
    )
}

fn key_ref(key: &Key) -> String {
    key.info.display()
}

/// A principal as AWS names it: a ServiceAccount by its role ARN.
fn aws_principal(p: &Principal) -> String {
    match p {
        Principal::ServiceAccount { namespace, name } => super::sts::RoleArn::of(namespace, name),
        Principal::User(name) => name.clone(),
        Principal::Group(name) => format!("group:{name}"),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Tag {
    tag_key: String,
    tag_value: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct AdminIn {
    key_id: Option<String>,
    pending_window_in_days: Option<i64>,
    rotation_period_in_days: Option<i64>,
    tags: Vec<Tag>,
    tag_keys: Vec<String>,
    alias_name: Option<String>,
    retiring_principal: Option<String>,
    target_key_id: Option<String>,
    grant_id: Option<String>,
    policy_name: Option<String>,
    description: Option<String>,
    key_usage: Option<String>,
    key_spec: Option<String>,
    customer_master_key_spec: Option<String>,
    origin: Option<String>,
    policy: Option<String>,
    multi_region: Option<bool>,
    custom_key_store_id: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
}

fn unsupported(what: &str) -> AwsFault {
    AwsFault::client("UnsupportedOperationException", format!("kubekms does not serve {what}"))
}

fn labels(tags: &[Tag]) -> Value {
    Value::Object(tags.iter().map(|t| (t.tag_key.clone(), json!(t.tag_value))).collect())
}

impl<T, R, D, G> AwsApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory + Clone,
    G: GrantWriter,
{
    /// Runs the management operation `op` (one of [`OPERATIONS`]) for `who`, audited.
    pub(super) async fn admin(
        &self,
        op: &'static str,
        who: &Identity,
        request_id: &str,
        body: &[u8],
    ) -> Result<Value, AwsFault> {
        let started = Instant::now();
        let mut event = AuditEvent {
            request_id: request_id.to_owned(),
            principal: who.username.clone(),
            operation: op,
            ..Default::default()
        };
        let outcome = self.admin_inner(op, who, body, &mut event).await;
        self.finish(started, event, outcome).await
    }

    /// The key `value` names, once RBAC lets `who` `verb` it; a key that does not exist and
    /// one the caller may not change get the same answer, but where telling them apart
    /// tells nothing of another namespace ([`AwsApi::refused`]).
    async fn admin_key(
        &self,
        who: &Identity,
        value: Option<&str>,
        verb: &str,
        event: &mut AuditEvent,
    ) -> Result<std::sync::Arc<Key>, AwsFault> {
        let admin = self.store()?;
        let name = self.required_key(who, value)?;
        let named = Named::Request(value.unwrap_or_default());
        let denied = || {
            AwsFault::client(
                "AccessDeniedException",
                format!("key {:?} does not exist or you may not {verb} it", value.unwrap_or_default()),
            )
        };
        let Some(key) = self.keys.resolve(&name) else {
            return Err(self.refused(who, named, None, denied()));
        };
        event.key = Some(key.info.display());
        event.key_id = Some(key.info.key_id.clone());
        if !admin.allowed(who, verb, "kmskeys", &key.info.namespace, &key.info.name).await.map_err(backend)? {
            return Err(self.refused(who, named, Some(&key.info.namespace), denied()));
        }
        Ok(key)
    }

    /// Where management operations change objects (this server may have none).
    fn store(&self) -> Result<&dyn KeyAdmin, AwsFault> {
        self.admin.as_deref().ok_or_else(|| unsupported("management operations on this server"))
    }

    fn arn_of(&self, key: &Key) -> String {
        key_arn(&self.settings.region, &key.info.namespace, &key.info.key_id)
    }

    async fn patch(&self, key: &Key, patch: Value) -> Result<(), AwsFault> {
        let admin = self.store()?;
        admin.patch_key(&key.info.namespace, &key.info.name, &patch).await.map_err(admin_fault)
    }

    async fn admin_inner(
        &self,
        op: &'static str,
        who: &Identity,
        body: &[u8],
        event: &mut AuditEvent,
    ) -> Result<Value, AwsFault> {
        let r: AdminIn = parse(body)?;
        let key_id = r.key_id.as_deref();
        match op {
            "EnableKey" | "DisableKey" => {
                let key = self.admin_key(who, key_id, "patch", event).await?;
                if matches!(key.info.state, KeyState::PendingDeletion | KeyState::Destroyed) {
                    return Err(invalid_state(&key, "cancel its deletion first"));
                }
                self.patch(&key, json!({"spec": {"enabled": op == "EnableKey"}})).await?;
                Ok(json!({}))
            }
            "ScheduleKeyDeletion" => {
                let window = r.pending_window_in_days.unwrap_or(30);
                if !(7..=30).contains(&window) {
                    return Err(AwsFault::validation(format!(
                        "1 validation error detected: Value '{window}' at 'pendingWindowInDays' failed to satisfy constraint: Member must have value between 7 and 30"
                    )));
                }
                let key = self.admin_key(who, key_id, "patch", event).await?;
                if key.intent.deletion_scheduled || key.info.state == KeyState::Destroyed {
                    return Err(invalid_state(&key, "its deletion is scheduled already"));
                }
                self.patch(
                    &key,
                    json!({"spec": {"deletion": {"scheduled": true, "pendingWindowDays": window}}}),
                )
                .await?;
                let deletion = jiff::Timestamp::now().as_second() + window * 86_400;
                Ok(json!({
                    "KeyId": self.arn_of(&key),
                    "DeletionDate": deletion,
                    "KeyState": "PendingDeletion",
                    "PendingWindowInDays": window,
                }))
            }
            "CancelKeyDeletion" => {
                let key = self.admin_key(who, key_id, "patch", event).await?;
                if !key.intent.deletion_scheduled {
                    return Err(invalid_state(&key, "its deletion is not scheduled"));
                }
                // As in AWS KMS, a key whose deletion is cancelled stays disabled.
                self.patch(&key, json!({"spec": {"enabled": false, "deletion": {"scheduled": false}}}))
                    .await?;
                Ok(json!({ "KeyId": self.arn_of(&key) }))
            }
            "EnableKeyRotation" | "DisableKeyRotation" => {
                let period = r.rotation_period_in_days;
                if let Some(p) = period.filter(|p| !(90..=2560).contains(p)) {
                    return Err(AwsFault::validation(format!(
                        "1 validation error detected: Value '{p}' at 'rotationPeriodInDays' failed to satisfy constraint: Member must have value between 90 and 2560"
                    )));
                }
                let key = self.admin_key(who, key_id, "patch", event).await?;
                if key.origin == Origin::External {
                    return Err(unsupported("automatic rotation of a key with imported material"));
                }
                match key.info.state {
                    KeyState::Disabled => {
                        return Err(AwsFault::client(
                            "DisabledException",
                            format!("{} is Disabled", key_ref(&key)),
                        ));
                    }
                    KeyState::PendingDeletion | KeyState::Destroyed => {
                        return Err(invalid_state(&key, "its rotation cannot change"));
                    }
                    _ => {}
                }
                let mut rotation = json!({"automatic": op == "EnableKeyRotation"});
                if let (Some(p), "EnableKeyRotation") = (period, op) {
                    rotation["periodDays"] = json!(p);
                }
                self.patch(&key, json!({"spec": {"rotation": rotation}})).await?;
                Ok(json!({}))
            }
            "RotateKeyOnDemand" => {
                let key = self.admin_key(who, key_id, "patch", event).await?;
                if key.origin == Origin::External {
                    return Err(unsupported("on-demand rotation of a key with imported material"));
                }
                match key.info.state {
                    KeyState::Enabled => {}
                    KeyState::Disabled => {
                        return Err(AwsFault::client(
                            "DisabledException",
                            format!("{} is Disabled", key_ref(&key)),
                        ));
                    }
                    _ => return Err(invalid_state(&key, "only an Enabled key rotates")),
                }
                // Any value not used before requests one rotation.
                let request = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S").to_string();
                self.patch(&key, json!({"spec": {"rotation": {"onDemandRequest": request}}})).await?;
                Ok(json!({ "KeyId": self.arn_of(&key) }))
            }
            "TagResource" | "UntagResource" => {
                let key = self.admin_key(who, key_id, "patch", event).await?;
                let patch = if op == "TagResource" {
                    labels(&r.tags)
                } else {
                    Value::Object(r.tag_keys.iter().map(|k| (k.clone(), Value::Null)).collect())
                };
                self.patch(&key, json!({"metadata": {"labels": patch}})).await.map_err(|f| match f.code {
                    "ValidationException" => AwsFault::client("TagException", f.message),
                    _ => f,
                })?;
                Ok(json!({}))
            }
            "ListResourceTags" | "GetKeyPolicy" => {
                let key = self.admin_key(who, key_id, "get", event).await?;
                let admin = self.store()?;
                let object = admin.get_key(&key.info.namespace, &key.info.name).await.map_err(admin_fault)?;
                if op == "GetKeyPolicy" {
                    if r.policy_name.as_deref().is_some_and(|p| p != "default") {
                        return Err(AwsFault::client(
                            "NotFoundException",
                            "the only key policy is \"default\"",
                        ));
                    }
                    let policy = object["spec"].get("policy").cloned().unwrap_or(json!({}));
                    return Ok(json!({ "Policy": policy.to_string(), "PolicyName": "default" }));
                }
                let tags: Vec<Value> = object["metadata"]["labels"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| json!({"TagKey": k, "TagValue": v})).collect())
                    .unwrap_or_default();
                Ok(json!({ "Tags": tags, "Truncated": false }))
            }
            "ListKeyPolicies" => {
                self.admin_key(who, key_id, "get", event).await?;
                Ok(json!({ "PolicyNames": ["default"], "Truncated": false }))
            }
            "UpdateKeyDescription" => {
                let description = r
                    .description
                    .as_deref()
                    .ok_or_else(|| AwsFault::validation("Description is required"))?;
                if description.len() > 8192 {
                    return Err(AwsFault::validation("Description is longer than 8192 characters"));
                }
                let key = self.admin_key(who, key_id, "patch", event).await?;
                self.patch(&key, json!({"spec": {"description": description}})).await?;
                Ok(json!({}))
            }
            "ListGrants" => self.list_grants(who, &r, event).await,
            "ListRetirableGrants" => self.list_retirable_grants(who, &r).await,
            "RevokeGrant" => {
                let grant_id =
                    r.grant_id.as_deref().ok_or_else(|| AwsFault::validation("GrantId is required"))?;
                let key = self.admin_key(who, key_id, "get", event).await?;
                let admin = self.store()?;
                let grant = self
                    .keys
                    .grants(&key.info.namespace, &key.info.name)
                    .into_iter()
                    .find(|g| g.grant_id == grant_id)
                    .ok_or_else(|| {
                        AwsFault::client("NotFoundException", format!("no grant {grant_id} on this key"))
                    })?;
                event.grant_id = Some(grant.grant_id.clone());
                if !admin
                    .allowed(who, "delete", "kmsgrants", &grant.namespace, &grant.name)
                    .await
                    .map_err(backend)?
                {
                    return Err(AwsFault::client(
                        "AccessDeniedException",
                        format!(
                            "{} may not delete kmsgrants {}/{}",
                            who.username, grant.namespace, grant.name
                        ),
                    ));
                }
                admin.delete_grant(&grant.namespace, &grant.name).await.map_err(admin_fault)?;
                Ok(json!({}))
            }
            "CreateKey" => self.create_key(who, r, event).await,
            "ListAliases" => self.list_aliases(who, &r, event).await,
            "CreateAlias" | "UpdateAlias" | "DeleteAlias" => self.change_alias(op, who, &r, event).await,
            other => Err(AwsFault::client("UnknownOperationException", format!("unknown operation {other}"))),
        }
    }

    async fn list_grants(
        &self,
        who: &Identity,
        r: &AdminIn,
        event: &mut AuditEvent,
    ) -> Result<Value, AwsFault> {
        let limit = super::protocol::limit(r.limit, 50, 100)?;
        let key = self.admin_key(who, r.key_id.as_deref(), "get", event).await?;
        let admin = self.store()?;
        if !admin.allowed(who, "list", "kmsgrants", &key.info.namespace, "").await.map_err(backend)? {
            return Err(AwsFault::client(
                "AccessDeniedException",
                format!("{} may not list kmsgrants in {}", who.username, key.info.namespace),
            ));
        }
        let mut grants = self.keys.grants(&key.info.namespace, &key.info.name);
        grants.retain(|g| r.grant_id.as_deref().is_none_or(|id| id == g.grant_id));
        Ok(self.grants_page(grants, r, limit))
    }

    /// ListRetirableGrants: the grants, of any key, that `RetiringPrincipal` may retire — for
    /// a caller asking about itself (its role ARN or an assumed-role ARN of it).
    async fn list_retirable_grants(&self, who: &Identity, r: &AdminIn) -> Result<Value, AwsFault> {
        let limit = super::protocol::limit(r.limit, 50, 100)?;
        let value = r
            .retiring_principal
            .as_deref()
            .ok_or_else(|| AwsFault::validation("RetiringPrincipal is required"))?;
        let named = super::ops::principal(value);
        let principal = match named.kind.as_str() {
            "ServiceAccount" => Principal::ServiceAccount { namespace: named.namespace, name: named.name },
            _ => Principal::User(named.name),
        };
        if !principal.matches(who) {
            return Err(AwsFault::client(
                "AccessDeniedException",
                format!("{} may list only the grants it may retire itself", who.username),
            ));
        }
        let grants = self.keys.grants_where(&|g| g.retiring_principal.as_ref() == Some(&principal));
        Ok(self.grants_page(grants, r, limit))
    }

    /// One page of grants, by grantId.
    fn grants_page(
        &self,
        mut grants: Vec<std::sync::Arc<crate::domain::Grant>>,
        r: &AdminIn,
        limit: usize,
    ) -> Value {
        grants.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
        super::protocol::page(
            "Grants",
            &grants,
            r.marker.as_deref(),
            limit,
            |g| &g.grant_id,
            |g| self.grant_entry(g),
        )
    }

    /// A grant as ListGrants and ListRetirableGrants answer it.
    fn grant_entry(&self, g: &crate::domain::Grant) -> Value {
        let key = self.keys.resolve(&format!("{}/{}", g.namespace, g.key_name));
        let mut out = json!({
            "KeyId": key.map(|k| self.arn_of(&k)).unwrap_or_default(),
            "GrantId": g.grant_id,
            "Name": g.name,
            "GranteePrincipal": aws_principal(&g.grantee),
            "Operations": g.operations.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
            "IssuingAccount": g.namespace,
        });
        if let Some(p) = &g.retiring_principal {
            out["RetiringPrincipal"] = json!(aws_principal(p));
        }
        match &g.constraints {
            Some(Constraints::Equals(m)) => out["Constraints"] = json!({"EncryptionContextEquals": m}),
            Some(Constraints::Subset(m)) => out["Constraints"] = json!({"EncryptionContextSubset": m}),
            None => {}
        }
        out
    }

    /// CreateAlias, UpdateAlias, DeleteAlias: the caller's RBAC on the kmsaliases object
    /// (create, patch, delete), and for a target `get` on that key, which must be in the
    /// alias's namespace.
    async fn change_alias(
        &self,
        op: &str,
        who: &Identity,
        r: &AdminIn,
        event: &mut AuditEvent,
    ) -> Result<Value, AwsFault> {
        let value = r.alias_name.as_deref().ok_or_else(|| AwsFault::validation("AliasName is required"))?;
        let name = super::protocol::parse_alias_name(value).ok_or_else(|| {
            AwsFault::validation(format!(
                "AliasName {value:?} must be alias/ and 1–250 lowercase letters, digits and '-' (kubekms keeps aliases as KmsAlias objects)"
            ))
        })?;
        if name == "aws" || name.starts_with("aws-") {
            return Err(AwsFault::validation("alias names aws and aws-… are reserved"));
        }
        let ns = account(who).ok_or_else(|| {
            AwsFault::client("AccessDeniedException", "only ServiceAccounts have an account for aliases")
        })?;
        let store = self.store()?;
        let verb = match op {
            "CreateAlias" => "create",
            "UpdateAlias" => "patch",
            _ => "delete",
        };
        if !store
            .allowed(who, verb, "kmsaliases", ns, if verb == "create" { "" } else { name })
            .await
            .map_err(backend)?
        {
            return Err(AwsFault::client(
                "AccessDeniedException",
                format!("{} may not {verb} kmsaliases {ns}/{name}", who.username),
            ));
        }
        let not_found = || AwsFault::client("NotFoundException", format!("Alias {value} is not found"));
        if op == "DeleteAlias" {
            store.delete_alias(ns, name).await.map_err(|e| match e {
                AdminError::NotFound => not_found(),
                other => admin_fault(other),
            })?;
            return Ok(json!({}));
        }
        let key = self.admin_key(who, r.target_key_id.as_deref(), "get", event).await?;
        if key.info.namespace != ns {
            return Err(AwsFault::validation(format!(
                "an alias names a key of its own account: {} is not in {ns}",
                self.arn_of(&key)
            )));
        }
        store.put_alias(ns, name, &key.info.name, op == "CreateAlias").await.map_err(|e| match e {
            AdminError::NotFound => not_found(),
            AdminError::Exists => {
                AwsFault::client("AlreadyExistsException", format!("Alias {value} already exists"))
            }
            other => admin_fault(other),
        })?;
        Ok(json!({}))
    }

    /// ListAliases: the aliases of the caller's namespace (RBAC `list kmsaliases`), or of
    /// one key.
    async fn list_aliases(
        &self,
        who: &Identity,
        r: &AdminIn,
        event: &mut AuditEvent,
    ) -> Result<Value, AwsFault> {
        let limit = super::protocol::limit(r.limit, 50, 100)?;
        let ns = account(who).ok_or_else(|| {
            AwsFault::client("AccessDeniedException", "only ServiceAccounts have an account for aliases")
        })?;
        let store = self.store()?;
        if !store.allowed(who, "list", "kmsaliases", ns, "").await.map_err(backend)? {
            return Err(AwsFault::client(
                "AccessDeniedException",
                format!("{} may not list kmsaliases in {ns}", who.username),
            ));
        }
        let only = match r.key_id.as_deref() {
            None => None,
            Some(_) => Some(self.admin_key(who, r.key_id.as_deref(), "get", event).await?),
        };
        let mut aliases = self.keys.aliases_in(ns);
        aliases.retain(|a| only.as_ref().is_none_or(|k| k.info.name == a.target_key));
        aliases.sort_by(|a, b| a.name.cmp(&b.name));
        let out = super::protocol::page(
            "Aliases",
            &aliases,
            r.marker.as_deref(),
            limit,
            |a| &a.name,
            |a| {
                let mut out = json!({
                    "AliasName": format!("{}{}", crate::domain::ALIAS_PREFIX, a.name),
                    "AliasArn": super::protocol::alias_arn(&self.settings.region, ns, &a.name),
                });
                if let Some(key) = self.keys.resolve(&format!("{ns}/{}", a.target_key)) {
                    out["TargetKeyId"] = json!(key.info.key_id);
                }
                out
            },
        );
        Ok(out)
    }

    async fn create_key(
        &self,
        who: &Identity,
        r: AdminIn,
        event: &mut AuditEvent,
    ) -> Result<Value, AwsFault> {
        let admin = self.store()?;
        if r.policy.is_some() {
            return Err(unsupported(
                "AWS key policies: CreateKey takes the default policy (delegate to RBAC); write spec.policy with kubectl",
            ));
        }
        if r.multi_region == Some(true) {
            return Err(unsupported("multi-Region keys"));
        }
        if r.custom_key_store_id.is_some() {
            return Err(AwsFault::client(
                "CustomKeyStoreNotFoundException",
                "kubekms has no custom key stores",
            ));
        }
        for spec in [r.key_spec.as_deref(), r.customer_master_key_spec.as_deref()].into_iter().flatten() {
            if spec != "SYMMETRIC_DEFAULT" {
                return Err(unsupported(&format!("KeySpec {spec} (only SYMMETRIC_DEFAULT)")));
            }
        }
        if let Some(usage) = r.key_usage.as_deref().filter(|u| *u != "ENCRYPT_DECRYPT") {
            return Err(unsupported(&format!("KeyUsage {usage} (only ENCRYPT_DECRYPT)")));
        }
        let origin = match r.origin.as_deref() {
            None | Some("AWS_KMS") => "KUBEKMS",
            Some("EXTERNAL") => "EXTERNAL",
            Some(other) => return Err(unsupported(&format!("Origin {other}"))),
        };
        let ns = account(who).ok_or_else(|| {
            AwsFault::client(
                "AccessDeniedException",
                "only ServiceAccounts have an account to create keys in",
            )
        })?;
        if !admin.allowed(who, "create", "kmskeys", ns, "").await.map_err(backend)? {
            return Err(AwsFault::client(
                "AccessDeniedException",
                format!("{} may not create kmskeys in namespace {ns}", who.username),
            ));
        }
        let object = json!({
            "apiVersion": "kms.kubekms.io/v1alpha1",
            "kind": "KmsKey",
            "metadata": {"generateName": "key-", "namespace": ns, "labels": labels(&r.tags)},
            "spec": {"description": r.description.unwrap_or_default(), "origin": origin},
        });
        let key_id = admin.create_key(ns, &object).await.map_err(|e| match e {
            AdminError::Invalid(m) => AwsFault::client("TagException", m),
            other => admin_fault(other),
        })?;
        event.key_id = Some(key_id.clone());
        // The controller makes version 1 within moments; answer with what the key API
        // then sees (Creating, if it has not yet).
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let key = self.keys.resolve(&key_id);
            match key {
                Some(k) if k.info.state != KeyState::Creating || Instant::now() >= deadline => {
                    event.key = Some(k.info.display());
                    return Ok(json!({ "KeyMetadata": self.key_metadata(&describe(&k)) }));
                }
                None if Instant::now() >= deadline => {
                    return Ok(json!({ "KeyMetadata": {
                        "AWSAccountId": ns, "KeyId": key_id, "Arn": key_arn(&self.settings.region, ns, &key_id),
                        "KeyState": "Creating", "Enabled": false, "KeyManager": "CUSTOMER",
                        "KeySpec": "SYMMETRIC_DEFAULT", "KeyUsage": "ENCRYPT_DECRYPT",
                    }}));
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_are_named_as_aws_names_them() {
        let sa = Principal::ServiceAccount { namespace: "batch".into(), name: "nightly".into() };
        assert_eq!(aws_principal(&sa), "arn:aws:iam::batch:role/nightly");
        assert_eq!(aws_principal(&Principal::User("alice".into())), "alice");
        assert_eq!(aws_principal(&Principal::Group("ops".into())), "group:ops");
        let tags = [Tag { tag_key: "team".into(), tag_value: "shop".into() }];
        assert_eq!(labels(&tags), json!({"team": "shop"}));
    }
}
