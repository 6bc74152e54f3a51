//! Building a Kubernetes client the same way in every subcommand, and the API server calls
//! that more than one component makes.

use std::path::Path;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::domain::Identity;

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to read kubeconfig {0}")]
    Read(String, #[source] kube::config::KubeconfigError),
    #[error("failed to load the Kubernetes client configuration")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("failed to find a Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("failed to build the Kubernetes client")]
    Build(#[source] kube::Error),
}

/// A client from `kubeconfig` when given, else from the environment: in-cluster service
/// account, `$KUBECONFIG`, or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).map_err(|e| ClientError::Read(path.display().to_string(), e))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(ClientError::Config)?
        }
        None => Config::infer().await.map_err(ClientError::Infer)?,
    };
    Client::try_from(config).map_err(ClientError::Build)
}

/// Drops `metadata.managedFields` from a watched object before it is cached: more than half
/// of a stored KmsKey, and never read by kubekms.
pub fn drop_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Keeps of `metadata.managedFields` only who wrote and when (manager, operation,
/// subresource, time), without the field sets that make up most of its size: enough to
/// name who requested a change.
pub fn slim_managed_fields<K: kube::Resource>(object: &mut K) {
    if let Some(entries) = object.meta_mut().managed_fields.as_mut() {
        for entry in entries {
            entry.fields_v1 = None;
        }
    }
}

/// Who last changed the object's spec or metadata, as the API server's managedFields name
/// them (the field manager — `kubectl-patch`, a GitOps controller …), leaving out the
/// managers listed in `ours`.
pub fn last_writer<K: kube::Resource>(object: &K, ours: &[&str]) -> Option<String> {
    object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| e.subresource.as_deref().unwrap_or_default().is_empty())
        .filter(|e| e.manager.as_deref().is_some_and(|m| !ours.contains(&m)))
        .max_by_key(|e| e.time.as_ref().map(|t| t.0))
        .and_then(|e| e.manager.clone())
}

/// Whether RBAC allows `who` the verb `verb` on the KmsKey `namespace/name`: a
/// SubjectAccessReview for the user, uid, groups and extra the API server authenticated,
/// for every component that asks RBAC about a kmskeys verb.
pub async fn review_key_access(
    client: &Client,
    who: &Identity,
    verb: &str,
    namespace: &str,
    name: &str,
) -> Result<bool, kube::Error> {
    review_access(client, who, verb, "kmskeys", namespace, name).await
}

/// The same for any resource of kubekms's API group (`kmsgrants`, …).
pub async fn review_access(
    client: &Client,
    who: &Identity,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<bool, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(who.username.clone()),
            uid: (!who.uid.is_empty()).then(|| who.uid.clone()),
            groups: Some(who.groups.clone()),
            extra: (!who.extra.is_empty()).then(|| who.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(crate::api::GROUP.to_owned()),
                version: Some(crate::api::VERSION.to_owned()),
                resource: Some(resource.to_owned()),
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                verb: Some(verb.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let result = api.create(&PostParams::default(), &review).await?;
    Ok(result.status.is_some_and(|s| s.allowed && s.denied != Some(true)))
}

/// How a watch waits before it tries the API server again after an error: 0.5 s, doubling
/// up to 5 s, back to 0.5 s once a watch delivers again. Used for every watch and for each
/// controller's trigger streams. kube-runtime's default grows to 30 s and, as a
/// controller's trigger backoff, pauses all of that controller's watches at each error of
/// any of them: after a kube-apiserver restart (refused connections, then 403 while its
/// authorizer syncs, then 410 for every watch's old resourceVersion) that added up to more
/// than a minute in which the controller saw nothing — a rotation request included. A
/// handful of watches retrying every 5 s costs an API server nothing.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(500);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let now = self.next;
        self.next = (now * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};

    use super::*;
    use crate::api::KmsKey;

    fn entry(manager: &str, second: i64, subresource: Option<&str>) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Update".into()),
            subresource: subresource.map(Into::into),
            time: Some(Time(jiff::Timestamp::from_second(second).unwrap())),
            fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {}}))),
            ..Default::default()
        }
    }

    #[test]
    fn the_last_writer_of_the_spec_is_named_and_the_field_sets_dropped() {
        let mut key = KmsKey::new("k", serde_json::from_value(serde_json::json!({})).unwrap());
        key.metadata.managed_fields = Some(vec![
            entry("kubectl-client-side-apply", 10, None),
            entry("kubectl-patch", 20, None),
            entry("kubekms-controller", 30, Some("status")),
            entry("kubekms-controller", 40, None),
        ]);
        slim_managed_fields(&mut key);
        assert!(key.metadata.managed_fields.iter().flatten().all(|e| e.fields_v1.is_none()));
        assert_eq!(last_writer(&key, &["kubekms-controller"]).as_deref(), Some("kubectl-patch"));
        key.metadata.managed_fields = None;
        assert_eq!(last_writer(&key, &[]), None);
    }

    #[test]
    fn a_watch_retries_within_five_seconds_and_starts_over_once_it_delivers() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let waits: Vec<u64> = b.by_ref().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(std::time::Duration::from_millis(500)));
    }
}
