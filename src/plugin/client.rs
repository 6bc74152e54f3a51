//! A KMS v2 client over a unix socket: what kube-apiserver does, for tests, benchmarks and
//! `kubekms plugin-status`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::proto::kmsv2::key_management_service_client::KeyManagementServiceClient;

/// Connects to the plugin listening on `socket`.
pub async fn connect(socket: &Path) -> Result<KeyManagementServiceClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://kubekms.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(KeyManagementServiceClient::new(channel))
}
