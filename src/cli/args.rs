//! Flags that several subcommands share, declared once and flattened into each: the root
//! key, the Kubernetes connection, the key API connection.

use std::path::PathBuf;

use clap::Args;

use kubekms::client::{Client, ClientError, TokenSource};
use kubekms::crypto::{RootKey, RootKeyError};
use kubekms::domain::NamespacedName;

/// Where the root key comes from (today a file; PKCS#11 options join this group later).
#[derive(Args)]
pub struct RootKeyArgs {
    /// The root key file (32 bytes, mode 0600 or stricter).
    #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
    pub root_key_file: PathBuf,
}

impl RootKeyArgs {
    /// Loads the root key.
    pub fn load(&self) -> Result<RootKey, RootKeyError> {
        RootKey::load(&self.root_key_file)
    }
}

/// How an in-cluster component reaches the API server, and how it logs.
#[derive(Args)]
pub struct KubeArgs {
    /// Kubeconfig to use; by default the in-cluster service account, then $KUBECONFIG,
    /// then ~/.kube/config.
    #[arg(long, value_name = "FILE", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

impl KubeArgs {
    /// Starts logging, as text or as JSON lines.
    pub fn init_logging(&self) {
        kubekms::telemetry::init_logging(self.log_json);
    }

    /// A client of the API server.
    pub async fn client(&self) -> Result<kube::Client, kubekms::kubeclient::ClientError> {
        kubekms::kubeclient::client(self.kubeconfig.as_deref()).await
    }
}

/// How a client reaches the key API, and with which token.
#[derive(Args)]
pub struct KeyApiArgs {
    /// The key API's address.
    #[arg(long, value_name = "URL", env = "KUBEKMS_ADDR")]
    pub server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, value_name = "FILE", env = "KUBEKMS_CA")]
    pub ca: Option<PathBuf>,
    /// A file with the bearer token (for example a projected ServiceAccount token).
    #[arg(long, value_name = "FILE", conflicts_with = "service_account")]
    pub token_file: Option<PathBuf>,
    /// Get a token with `kubectl create token NAME -n NAMESPACE --audience kubekms`.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub service_account: Option<NamespacedName>,
    /// Audience of the token kubectl creates.
    #[arg(long, value_name = "AUDIENCE", default_value = "kubekms")]
    pub audience: String,
}

impl KeyApiArgs {
    /// The token source: --token-file, else $KUBEKMS_TOKEN, else --service-account.
    pub fn token(&self) -> anyhow::Result<TokenSource> {
        if let Some(f) = &self.token_file {
            return Ok(TokenSource::File(f.clone()));
        }
        if let Some(sa) = &self.service_account {
            return Ok(TokenSource::Kubectl {
                namespace: sa.namespace().to_owned(),
                name: sa.name().to_owned(),
                audience: self.audience.clone(),
            });
        }
        match std::env::var("KUBEKMS_TOKEN") {
            Ok(t) if !t.is_empty() => Ok(TokenSource::Literal(zeroize::Zeroizing::new(t))),
            _ => anyhow::bail!(
                "no token: give --token-file, set KUBEKMS_TOKEN, or give --service-account NAMESPACE/NAME"
            ),
        }
    }

    /// Connects with the token `token()` gives.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        Ok(self.connect_with(&self.token()?).await?)
    }

    /// Connects with `token` (a caller that connects many times gets the token once).
    pub async fn connect_with(&self, token: &TokenSource) -> Result<Client, ClientError> {
        kubekms::client::connect(&self.server, self.ca.as_deref(), token).await
    }
}
