//! The Kubernetes side of the AWS API's management operations: SubjectAccessReviews for the
//! caller, and the object changes, written as field manager `kubekms-server`.

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::Value;

use super::admin::{AdminError, KeyAdmin};
use crate::api::{KmsAlias, KmsGrant, KmsKey};
use crate::domain::Identity;
use crate::server::BackendError;

/// Management operations through the API server.
pub struct KubeKeyAdmin(pub Client);

const MANAGER: &str = "kubekms-server";

fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() }
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() }
}

fn refused(e: kube::Error) -> AdminError {
    match e {
        kube::Error::Api(status) if status.code == 404 => AdminError::NotFound,
        kube::Error::Api(status) if status.code == 409 => AdminError::Exists,
        kube::Error::Api(status) if status.code == 422 || status.code == 400 => {
            AdminError::Invalid(status.message)
        }
        other => AdminError::Backend(BackendError::new(other)),
    }
}

#[tonic::async_trait]
impl KeyAdmin for KubeKeyAdmin {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, BackendError> {
        crate::kubeclient::review_access(&self.0, who, verb, resource, namespace, name)
            .await
            .map_err(BackendError::new)
    }

    async fn patch_key(&self, namespace: &str, name: &str, patch: &Value) -> Result<(), AdminError> {
        let api: Api<KmsKey> = Api::namespaced(self.0.clone(), namespace);
        api.patch(name, &patch_params(), &Patch::Merge(patch)).await.map(|_| ()).map_err(refused)
    }

    async fn get_key(&self, namespace: &str, name: &str) -> Result<Value, AdminError> {
        let api: Api<KmsKey> = Api::namespaced(self.0.clone(), namespace);
        let key = api.get(name).await.map_err(refused)?;
        serde_json::to_value(&key).map_err(|e| AdminError::Backend(BackendError::new(e)))
    }

    async fn create_key(&self, namespace: &str, key: &Value) -> Result<String, AdminError> {
        let api: Api<KmsKey> = Api::namespaced(self.0.clone(), namespace);
        let key: KmsKey =
            serde_json::from_value(key.clone()).map_err(|e| AdminError::Invalid(e.to_string()))?;
        let created = api.create(&post_params(), &key).await.map_err(refused)?;
        Ok(created.uid().unwrap_or_default())
    }

    async fn delete_grant(&self, namespace: &str, name: &str) -> Result<(), AdminError> {
        let api: Api<KmsGrant> = Api::namespaced(self.0.clone(), namespace);
        api.delete(name, &DeleteParams::default()).await.map(|_| ()).map_err(refused)
    }
    async fn put_alias(
        &self,
        namespace: &str,
        name: &str,
        target: &str,
        create: bool,
    ) -> Result<(), AdminError> {
        let api: Api<KmsAlias> = Api::namespaced(self.0.clone(), namespace);
        let spec = serde_json::json!({"targetKeyRef": {"name": target}});
        if create {
            let alias: KmsAlias = serde_json::from_value(serde_json::json!({
                "apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsAlias",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec,
            }))
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
            return api.create(&post_params(), &alias).await.map(|_| ()).map_err(refused);
        }
        api.patch(name, &patch_params(), &Patch::Merge(serde_json::json!({"spec": spec})))
            .await
            .map(|_| ())
            .map_err(refused)
    }

    async fn delete_alias(&self, namespace: &str, name: &str) -> Result<(), AdminError> {
        let api: Api<KmsAlias> = Api::namespaced(self.0.clone(), namespace);
        api.delete(name, &DeleteParams::default()).await.map(|_| ()).map_err(refused)
    }
}
