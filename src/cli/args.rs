//! Flags that several subcommands share, declared once and flattened into each: the
//! Kubernetes connection, the key API connection, and their parsers.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use jiff::SignedDuration;

#[derive(Args)]
pub struct Common {
    /// Kubeconfig to use; by default the in-cluster service account, then $KUBECONFIG,
    /// then ~/.kube/config.
    #[arg(long, value_name = "FILE", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

#[derive(Args)]
pub struct Connection {
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
    pub service_account: Option<String>,
    /// Audience of the token kubectl creates.
    #[arg(long, value_name = "AUDIENCE", default_value = "kubekms")]
    pub audience: String,
}

impl Connection {
    /// The token source: --token-file, else $KUBEKMS_TOKEN, else --service-account.
    pub fn token(&self) -> anyhow::Result<kubekms::client::TokenSource> {
        use kubekms::client::TokenSource;
        if let Some(f) = &self.token_file {
            return Ok(TokenSource::File(f.clone()));
        }
        if let Some(sa) = &self.service_account {
            let (ns, name) = namespaced_name(sa)?;
            return Ok(TokenSource::Kubectl {
                namespace: ns.into(),
                name: name.into(),
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

    pub async fn connect(&self) -> anyhow::Result<kubekms::client::Client> {
        Ok(kubekms::client::connect(&self.server, self.ca.as_deref(), &self.token()?).await?)
    }
}

/// Splits NAMESPACE/NAME.
pub fn namespaced_name(value: &str) -> anyhow::Result<(&str, &str)> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => anyhow::bail!("{value:?} is not NAMESPACE/NAME"),
    }
}

pub fn std_duration(d: SignedDuration, flag: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from(d).with_context(|| format!("{flag} must not be negative"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_must_be_namespace_slash_name() {
        assert_eq!(namespaced_name("kube-system/k").unwrap(), ("kube-system", "k"));
        for bad in ["k", "/k", "ns/", "a/b/c", ""] {
            let err = namespaced_name(bad).unwrap_err().to_string();
            assert!(err.contains("is not NAMESPACE/NAME"), "{bad:?}: {err}");
        }
    }
}
