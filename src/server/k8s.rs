//! The key API's adapters to the API server: TokenReview, SubjectAccessReview, the grant
//! retirement write, and the watches that keep the [`Directory`] current. Everything the
//! service decides with arrives here as domain types.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::BackendError;
use super::auth::TokenReviewer;
use super::authz::RbacChecker;
use super::directory::{Directory, Feed};
use super::service::{CreateGrantError, GrantWriter};
use crate::api::{KmsAlias, KmsGrant, KmsKey, KmsKeyMaterial};
use crate::domain::{Alias, Grant, Identity, Key, WrappedMaterial};
use crate::kubeclient::WatchBackoff;

/// The real reviewer: a TokenReview on the API server.
pub struct KubeTokenReviewer(pub Client);

#[tonic::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<Option<Identity>, BackendError> {
        let api: Api<TokenReview> = Api::all(self.0.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(audiences.to_vec()) },
            ..Default::default()
        };
        let result = api.create(&PostParams::default(), &review).await.map_err(BackendError::new)?;
        let Some(status) = result.status else { return Ok(None) };
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        // The API server only authenticates a token for an audience it was issued for;
        // check the answer names one of ours all the same.
        let granted = status.audiences.unwrap_or_default();
        if !granted.iter().any(|a| audiences.contains(a)) {
            return Ok(None);
        }
        let user = status.user.unwrap_or_default();
        Ok(Some(Identity {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        }))
    }
}

/// SubjectAccessReviews on the API server (cached by [`super::authz::CachedRbac`] in the
/// wiring).
pub struct KubeSar(pub Client);

#[tonic::async_trait]
impl RbacChecker for KubeSar {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, BackendError> {
        crate::kubeclient::review_key_access(&self.0, who, verb, namespace, name)
            .await
            .map_err(BackendError::new)
    }
}

/// Writes grants through the API server, as field manager `kubekms-server`: retirements on
/// the status subresource, and the grants CreateGrant creates.
pub struct KubeGrantWriter(pub Client);

#[tonic::async_trait]
impl GrantWriter for KubeGrantWriter {
    async fn retire(&self, grant: &Grant, by: &str) -> Result<(), BackendError> {
        let api: Api<KmsGrant> = Api::namespaced(self.0.clone(), &grant.namespace);
        // retiredBy is the server's field and final; the controller, which owns state,
        // turns it into Retired.
        let patch = serde_json::json!({
            "apiVersion": "kms.kubekms.io/v1alpha1",
            "kind": "KmsGrant",
            "status": {"retiredBy": by},
        });
        api.patch_status(
            &grant.name,
            &kube::api::PatchParams::apply("kubekms-server"),
            &kube::api::Patch::Apply(patch),
        )
        .await
        .map(|_| ())
        .map_err(BackendError::new)
    }

    async fn create(&self, grant: &Grant) -> Result<(String, String), CreateGrantError> {
        let api: Api<KmsGrant> = Api::namespaced(self.0.clone(), &grant.namespace);
        let params = PostParams { field_manager: Some("kubekms-server".to_owned()), ..Default::default() };
        match api.create(&params, &KmsGrant::from(grant)).await {
            Ok(created) => Ok((created.uid().unwrap_or_default(), created.name_any())),
            Err(kube::Error::Api(status)) if status.code == 409 => Err(CreateGrantError::Exists),
            Err(kube::Error::Api(status)) if status.code == 422 => {
                Err(CreateGrantError::Invalid(status.message))
            }
            Err(e) => Err(CreateGrantError::Backend(BackendError::new(e))),
        }
    }
}

/// Keeps `directory` current with a watch on `api`, converting each object once. `listed`
/// fires when the watch has listed everything for the first time.
fn feed<K, D>(
    api: Api<K>,
    directory: Arc<Directory>,
    listed: oneshot::Sender<()>,
    shutdown: CancellationToken,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    D: for<'a> From<&'a K> + Send + Sync + 'static,
    Directory: Feed<D>,
{
    let mut listed = Some(listed);
    let mut initial: Vec<D> = Vec::new();
    let stream =
        watcher(api, watcher::Config::default()).backoff(WatchBackoff::default()).for_each(move |event| {
            match event {
                Ok(watcher::Event::Apply(object)) => directory.apply(D::from(&object)),
                Ok(watcher::Event::Delete(object)) => directory.delete(&D::from(&object)),
                Ok(watcher::Event::Init) => initial.clear(),
                Ok(watcher::Event::InitApply(object)) => initial.push(D::from(&object)),
                Ok(watcher::Event::InitDone) => {
                    directory.replace_all(std::mem::take(&mut initial));
                    if let Some(tx) = listed.take() {
                        let _ = tx.send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
            }
            futures::future::ready(())
        });
    tokio::spawn(async move {
        tokio::select! {
            () = stream => {}
            () = shutdown.cancelled() => {}
        }
    });
}

/// Starts the watches of keys, material and grants that feed `directory`; resolves once
/// each has listed everything (so that no call sees an empty directory).
pub async fn watch_directory(client: &Client, directory: &Arc<Directory>, shutdown: &CancellationToken) {
    let (keys, materials, grants, aliases) =
        (oneshot::channel(), oneshot::channel(), oneshot::channel(), oneshot::channel());
    feed::<KmsKeyMaterial, WrappedMaterial>(
        Api::all(client.clone()),
        directory.clone(),
        materials.0,
        shutdown.clone(),
    );
    feed::<KmsKey, Key>(Api::all(client.clone()), directory.clone(), keys.0, shutdown.clone());
    feed::<KmsGrant, Grant>(Api::all(client.clone()), directory.clone(), grants.0, shutdown.clone());
    feed::<KmsAlias, Alias>(Api::all(client.clone()), directory.clone(), aliases.0, shutdown.clone());
    let _ = tokio::join!(keys.1, materials.1, grants.1, aliases.1);
}
