//! Building a Kubernetes client the same way in every subcommand.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

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
