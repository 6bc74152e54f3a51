//! Every read and write the reconcilers make of the API server, one method each, behind
//! the [`Cluster`] trait: [`KubeCluster`] talks to the API server; the reconcilers' tests
//! record the calls, which pins the order in which a reconcile writes.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::storagemigration::v1::StorageVersionMigration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, Recorder};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::Error;
use crate::api::{
    KmsGrant, KmsGrantStatus, KmsKey, KmsKeyMaterial, KmsKeyStatus, KmsKeyUsage, StorageMigrationStatus,
};
use crate::domain::Identity;
use crate::keyring::{MaterialStore, Owner};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "kubekms-controller";
/// The field manager of the condition that reports a key that cannot be created.
pub const ERROR_FIELD_MANAGER: &str = "kubekms-controller-errors";
/// The field manager of the storage migration's status (its own, so that it never takes
/// over or drops what the key reconciler applies, nor the other way round).
pub const MIGRATION_FIELD_MANAGER: &str = "kubekms-migration";
/// The label every StorageVersionMigration kubekms creates carries.
pub const MIGRATION_SELECTOR: &str = "app.kubernetes.io/managed-by=kubekms";

/// What the reconcilers do to the cluster.
#[tonic::async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// Adds or removes the key's finalizer; `resource_version` makes it fail rather than
    /// overwrite a concurrent change of the list.
    async fn set_finalizer(
        &self,
        key: &KmsKey,
        finalizer: &str,
        resource_version: Option<String>,
        present: bool,
    ) -> Result<(), Error>;
    /// The material object of the key `key_id`, read from the API server.
    async fn material(&self, key_id: &str) -> Result<Option<KmsKeyMaterial>, Error>;
    /// The usage record of the key `key_id` (none before anything reported a use).
    async fn usage(&self, key_id: &str) -> Result<Option<KmsKeyUsage>, Error>;
    /// Removes a destroyed key's usage record (gone already is fine).
    async fn delete_usage(&self, key_id: &str) -> Result<(), Error>;
    /// Creates `owner`'s material object (or returns the one a previous attempt made).
    async fn create_material(&self, owner: &Owner, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error>;
    /// Replaces a material object, failing with a conflict if it changed meanwhile.
    async fn replace_material(&self, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error>;
    /// Removes a destroyed key's material object (its tombstone).
    async fn delete_material(&self, key_id: &str) -> Result<(), Error>;
    /// Writes the key's status (server-side apply); returns the new resourceVersion.
    async fn patch_key_status(
        &self,
        namespace: &str,
        name: &str,
        status: &KmsKeyStatus,
    ) -> Result<Option<String>, Error>;
    /// The key as the API server has it now (not as the watch cache does).
    async fn fresh_key(&self, namespace: &str, name: &str) -> Option<KmsKey>;
    /// Writes state Creating and a Ready condition onto exactly `resource_version` of the
    /// key, under a field manager of its own. Best effort.
    async fn report_creating(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<String>,
        ready: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
    );
    /// Writes a grant's status (server-side apply).
    async fn patch_grant_status(
        &self,
        namespace: &str,
        name: &str,
        status: &KmsGrantStatus,
    ) -> Result<(), Error>;
    /// Whether RBAC allows `who` (a grant's creator) `verb` on the KmsKey `namespace/key`
    /// (a SubjectAccessReview).
    async fn rbac_allows(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        key: &str,
    ) -> Result<bool, Error>;
    /// Keeps the ClusterRole `role` to [`plugin_role_rules`]: reading the material object
    /// `key_id`, and writing the plugin's entry of the usage record `key_id`.
    async fn apply_plugin_role(&self, role: &str, key_id: &str) -> Result<(), Error>;
    /// The API server's clock.
    async fn server_time(&self) -> Result<Timestamp, Error>;
    /// Publishes an Event about `object` (failures are logged, never fatal).
    async fn publish(&self, object: &ObjectReference, event: Event);
    /// Every StorageVersionMigration kubekms created ([`MIGRATION_SELECTOR`]).
    async fn migrations(&self) -> Result<Vec<StorageVersionMigration>, Error>;
    /// Creates a StorageVersionMigration and returns it as stored; one that exists already
    /// (by name) is left as is and returned.
    async fn create_migration(
        &self,
        migration: &StorageVersionMigration,
    ) -> Result<StorageVersionMigration, Error>;
    /// Deletes a StorageVersionMigration (one that is gone already is fine).
    async fn delete_migration(&self, name: &str) -> Result<(), Error>;
    /// Writes the key's storage migration status and its StorageMigrated condition
    /// (server-side apply under [`MIGRATION_FIELD_MANAGER`]).
    async fn patch_migration_status(
        &self,
        namespace: &str,
        name: &str,
        migration: Option<&StorageMigrationStatus>,
        condition: &Condition,
    ) -> Result<(), Error>;
}

/// What the KMS plugin of the key `key_id` may do, one rule per purpose, each naming that
/// key's objects (both named by the key's UID) and no other:
/// - get its `KmsKeyMaterial`, to unwrap the key's versions;
/// - get and server-side apply its `KmsKeyUsage`, to report which versions kube-apiserver
///   uses (get reads back what the plugin reported before a restart). An apply that
///   creates the record, before any reporter wrote it, takes `create` as well (the API
///   server checks it with the object's name, so resourceNames holds). Admission lets only
///   kubekms's identities write it.
///
/// The controller holds each of these rights itself (RBAC lets nobody grant more than it
/// has).
pub fn plugin_role_rules(key_id: &str) -> serde_json::Value {
    json!([
        {
            "apiGroups": [crate::api::GROUP],
            "resources": ["kmskeymaterials"],
            "resourceNames": [key_id],
            "verbs": ["get"],
        },
        {
            "apiGroups": [crate::api::GROUP],
            "resources": ["kmskeyusages"],
            "resourceNames": [key_id],
            "verbs": ["get", "create", "patch"],
        },
    ])
}

/// The cluster through the API server.
pub struct KubeCluster {
    client: Client,
    recorder: Recorder,
    materials: MaterialStore,
}

impl KubeCluster {
    pub fn new(client: Client, recorder: Recorder) -> Self {
        KubeCluster { materials: MaterialStore::new(client.clone()), client, recorder }
    }

    fn keys(&self, namespace: &str) -> Api<KmsKey> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

#[tonic::async_trait]
impl Cluster for KubeCluster {
    async fn set_finalizer(
        &self,
        key: &KmsKey,
        finalizer: &str,
        resource_version: Option<String>,
        present: bool,
    ) -> Result<(), Error> {
        let mut finalizers: Vec<String> =
            key.finalizers().iter().filter(|f| *f != finalizer).cloned().collect();
        if present {
            finalizers.push(finalizer.to_owned());
        }
        let patch = json!({
            "metadata": {"resourceVersion": resource_version, "finalizers": finalizers}
        });
        self.keys(&key.namespace().unwrap_or_default())
            .patch(&key.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(if present { Error::AddFinalizer } else { Error::RemoveFinalizer })
    }

    async fn material(&self, key_id: &str) -> Result<Option<KmsKeyMaterial>, Error> {
        Ok(self.materials.get(key_id).await?)
    }

    async fn usage(&self, key_id: &str) -> Result<Option<KmsKeyUsage>, Error> {
        Api::<KmsKeyUsage>::all(self.client.clone()).get_opt(key_id).await.map_err(Error::ReadUsage)
    }

    async fn delete_usage(&self, key_id: &str) -> Result<(), Error> {
        match Api::<KmsKeyUsage>::all(self.client.clone()).delete(key_id, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::DeleteUsage(e)),
        }
    }

    async fn create_material(&self, owner: &Owner, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        Ok(self.materials.create(owner, object).await?)
    }

    async fn replace_material(&self, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        Ok(self.materials.replace(object).await?)
    }

    async fn delete_material(&self, key_id: &str) -> Result<(), Error> {
        Ok(self.materials.delete(key_id).await?)
    }

    async fn patch_key_status(
        &self,
        namespace: &str,
        name: &str,
        status: &KmsKeyStatus,
    ) -> Result<Option<String>, Error> {
        let body = json!({
            "apiVersion": "kms.kubekms.io/v1alpha1",
            "kind": "KmsKey",
            "status": status,
        });
        self.keys(namespace)
            .patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))
            .await
            .map(|k| k.resource_version())
            .map_err(Error::PatchStatus)
    }

    async fn fresh_key(&self, namespace: &str, name: &str) -> Option<KmsKey> {
        self.keys(namespace).get_opt(name).await.ok().flatten()
    }

    async fn report_creating(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<String>,
        ready: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
    ) {
        let body = json!({
            "apiVersion": "kms.kubekms.io/v1alpha1",
            "kind": "KmsKey",
            "metadata": {"resourceVersion": resource_version},
            "status": {"state": crate::api::KeyState::Creating, "conditions": [ready]},
        });
        let _ = self
            .keys(namespace)
            .patch_status(name, &PatchParams::apply(ERROR_FIELD_MANAGER).force(), &Patch::Apply(body))
            .await;
    }

    async fn patch_grant_status(
        &self,
        namespace: &str,
        name: &str,
        status: &KmsGrantStatus,
    ) -> Result<(), Error> {
        let api: Api<KmsGrant> = Api::namespaced(self.client.clone(), namespace);
        let body = json!({"apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsGrant", "status": status});
        api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))
            .await
            .map(|_| ())
            .map_err(Error::PatchStatus)
    }

    async fn rbac_allows(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        key: &str,
    ) -> Result<bool, Error> {
        crate::kubeclient::review_key_access(&self.client, who, verb, namespace, key)
            .await
            .map_err(Error::AccessReview)
    }

    async fn apply_plugin_role(&self, role: &str, key_id: &str) -> Result<(), Error> {
        let body = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": plugin_role_rules(key_id),
        });
        let api: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(self.client.clone());
        api.patch(role, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))
            .await
            .map(|_| ())
            .map_err(|e| Error::PluginAccess(role.to_owned(), e))
    }

    /// From the `Date` header of a request to `/version`.
    async fn server_time(&self) -> Result<Timestamp, Error> {
        let request = http::Request::get("/version")
            .body(kube::client::Body::empty())
            .map_err(|e| Error::ApiServerClock(e.to_string()))?;
        let response = self.client.send(request).await.map_err(|e| Error::ApiServerClock(e.to_string()))?;
        let date = response
            .headers()
            .get(http::header::DATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::ApiServerClock("no Date header".into()))?;
        jiff::fmt::rfc2822::parse(date)
            .map(|z| z.timestamp())
            .map_err(|e| Error::ApiServerClock(format!("unreadable Date header {date:?}: {e}")))
    }

    async fn publish(&self, object: &ObjectReference, event: Event) {
        if let Err(e) = self.recorder.publish(&event, object).await {
            tracing::warn!(error = %e, reason = %event.reason, "failed to publish an Event");
        }
    }

    async fn migrations(&self) -> Result<Vec<StorageVersionMigration>, Error> {
        let api: Api<StorageVersionMigration> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default().labels(MIGRATION_SELECTOR)).await;
        list.map(|l| l.items).map_err(Error::ListMigrations)
    }

    async fn create_migration(
        &self,
        migration: &StorageVersionMigration,
    ) -> Result<StorageVersionMigration, Error> {
        let api: Api<StorageVersionMigration> = Api::all(self.client.clone());
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match api.create(&params, migration).await {
            Ok(created) => Ok(created),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                api.get(&migration.name_any()).await.map_err(Error::CreateMigration)
            }
            Err(e) => Err(Error::CreateMigration(e)),
        }
    }

    async fn delete_migration(&self, name: &str) -> Result<(), Error> {
        let api: Api<StorageVersionMigration> = Api::all(self.client.clone());
        match api.delete(name, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::DeleteMigration(e)),
        }
    }

    async fn patch_migration_status(
        &self,
        namespace: &str,
        name: &str,
        migration: Option<&StorageMigrationStatus>,
        condition: &Condition,
    ) -> Result<(), Error> {
        let mut status = json!({"conditions": [condition]});
        if let Some(m) = migration {
            status["storageMigration"] = json!(m);
        }
        let body = json!({"apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsKey", "status": status});
        self.keys(namespace)
            .patch_status(name, &PatchParams::apply(MIGRATION_FIELD_MANAGER).force(), &Patch::Apply(body))
            .await
            .map(|_| ())
            .map_err(Error::PatchStatus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_reads_the_material_and_reports_the_usage_of_its_key_only() {
        let rules = plugin_role_rules("uid-1");
        let rules = rules.as_array().unwrap();
        assert_eq!(rules.len(), 2, "one rule per purpose");
        for rule in rules {
            assert_eq!(rule["resourceNames"], json!(["uid-1"]), "{rule}");
            assert_eq!(rule["apiGroups"], json!(["kms.kubekms.io"]));
        }
        assert_eq!(
            (&rules[0]["resources"], &rules[0]["verbs"]),
            (&json!(["kmskeymaterials"]), &json!(["get"]))
        );
        assert_eq!(
            (&rules[1]["resources"], &rules[1]["verbs"]),
            (&json!(["kmskeyusages"]), &json!(["get", "create", "patch"]))
        );
    }
}
