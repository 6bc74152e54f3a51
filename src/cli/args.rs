//! Flags that several subcommands share, declared once and flattened into each: the root
//! key, the Kubernetes connection, the key API connection.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use kubekms::audit::Rotation;
use kubekms::client::{Client, ClientError, TokenSource};
use kubekms::crypto::{Pkcs11Config, RootKey, RootKeyConfig, RootKeySource, TokenSelector};
use kubekms::domain::NamespacedName;

/// Where the root key is: a file, or a key object in a PKCS#11 token (an HSM); and, while
/// the root key is being replaced, where the previous ones are.
#[derive(Args)]
pub struct RootKeyArgs {
    /// The root key file (32 bytes, mode 0600 or stricter).
    #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
    pub root_key_file: Option<PathBuf>,
    /// A previous root key file, which the primary root key replaces: it only unwraps
    /// key versions and verifies what was derived from it (audit MACs, STS sessions, the
    /// plugin's cache) until the controller has rewrapped every version under the primary
    /// (`kubekms root-key status` says when). Repeatable; in the environment, comma-separated.
    #[arg(long, value_name = "FILE", env = "KUBEKMS_PREVIOUS_ROOT_KEY_FILE", value_delimiter = ',')]
    pub previous_root_key_file: Vec<PathBuf>,
    #[command(flatten)]
    pub pkcs11: Pkcs11Args,
}

/// The root key in a PKCS#11 token: which module, token and key, and the PIN.
#[derive(Args)]
pub struct Pkcs11Args {
    /// The PKCS#11 module (shared library) of the HSM that holds the root key, instead of
    /// a file.
    #[arg(long, value_name = "FILE", env = "KUBEKMS_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// The label of the token that holds the root key.
    #[arg(long, value_name = "LABEL", env = "KUBEKMS_PKCS11_TOKEN_LABEL")]
    pub pkcs11_token_label: Option<String>,
    /// The slot of the token that holds the root key, instead of its label.
    #[arg(long, value_name = "ID", env = "KUBEKMS_PKCS11_SLOT")]
    pub pkcs11_slot: Option<u64>,
    /// A file (mode 0600 or stricter) with the token's user PIN on one line.
    #[arg(long, value_name = "FILE", env = "KUBEKMS_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// The label (CKA_LABEL) of the root key object in the token.
    #[arg(long, value_name = "LABEL", env = "KUBEKMS_PKCS11_KEY_LABEL")]
    pub pkcs11_key_label: Option<String>,
    /// The label of a previous root key object in the same token, which the primary
    /// (--pkcs11-key-label, or --root-key-file) replaces: it only unwraps and verifies, as
    /// --previous-root-key-file does. Repeatable; in the environment, comma-separated.
    #[arg(long, value_name = "LABEL", env = "KUBEKMS_PKCS11_PREVIOUS_KEY_LABEL", value_delimiter = ',')]
    pub pkcs11_previous_key_label: Vec<String>,
}

impl Pkcs11Args {
    /// The token configuration, or `None` when no PKCS#11 flag is given.
    pub fn config(&self) -> anyhow::Result<Option<Pkcs11Config>> {
        let Some(module) = self.pkcs11_module.clone() else {
            if self.pkcs11_token_label.is_some()
                || self.pkcs11_slot.is_some()
                || self.pkcs11_pin_file.is_some()
                || self.pkcs11_key_label.is_some()
                || !self.pkcs11_previous_key_label.is_empty()
            {
                bail!("--pkcs11-… flags need --pkcs11-module");
            }
            return Ok(None);
        };
        let token = match (&self.pkcs11_token_label, self.pkcs11_slot) {
            (Some(label), None) => TokenSelector::Label(label.clone()),
            (None, Some(slot)) => TokenSelector::Slot(slot),
            _ => bail!("--pkcs11-module needs exactly one of --pkcs11-token-label and --pkcs11-slot"),
        };
        let Some(pin_file) = self.pkcs11_pin_file.clone() else {
            bail!("--pkcs11-module needs --pkcs11-pin-file (a file with the token's user PIN, mode 0600)");
        };
        let Some(key_label) = self.pkcs11_key_label.clone().filter(|l| !l.is_empty()) else {
            bail!("--pkcs11-module needs --pkcs11-key-label (the label of the root key object)");
        };
        Ok(Some(Pkcs11Config { module, token, pin_file, key_label }))
    }

    /// The previous root keys in the token (the token of [`Pkcs11Args::config`], other labels).
    fn previous(&self, token: Option<&Pkcs11Config>) -> anyhow::Result<Vec<Pkcs11Config>> {
        let mut out = Vec::new();
        for label in &self.pkcs11_previous_key_label {
            if label.is_empty() {
                bail!("--pkcs11-previous-key-label is empty");
            }
            let Some(token) = token else {
                bail!("--pkcs11-previous-key-label needs --pkcs11-module and its flags (the token it is in)");
            };
            out.push(Pkcs11Config { key_label: label.clone(), ..token.clone() });
        }
        Ok(out)
    }
}

impl RootKeyArgs {
    /// Where the root keys are, or `None` when no flag names a primary one.
    pub fn source_opt(&self) -> anyhow::Result<Option<RootKeyConfig>> {
        let token = self.pkcs11.config()?;
        let mut previous: Vec<RootKeySource> =
            self.previous_root_key_file.iter().cloned().map(RootKeySource::File).collect();
        previous.extend(self.pkcs11.previous(token.as_ref())?.into_iter().map(RootKeySource::Pkcs11));
        let primary = match (&self.root_key_file, token) {
            (Some(_), Some(_)) => bail!(
                "give either --root-key-file or --pkcs11-module (the root key is in a file or in a token, not both)"
            ),
            (Some(file), None) => RootKeySource::File(file.clone()),
            (None, Some(config)) => RootKeySource::Pkcs11(config),
            (None, None) if previous.is_empty() => return Ok(None),
            (None, None) => bail!(
                "a previous root key needs the primary one: give --root-key-file, or --pkcs11-module and its flags"
            ),
        };
        if let Some(same) = previous.iter().find(|p| **p == primary) {
            bail!("the previous root key {} is the primary root key", describe(same));
        }
        Ok(Some(RootKeyConfig { primary, previous }))
    }

    /// Where the root keys are; an error when no flag names the primary one.
    pub fn source(&self) -> anyhow::Result<RootKeyConfig> {
        self.source_opt()?
            .context("the root key is needed: give --root-key-file, or --pkcs11-module and its flags")
    }

    /// Opens the root key (with the previous ones).
    pub fn load(&self) -> anyhow::Result<RootKey> {
        Ok(RootKey::open_config(&self.source()?)?)
    }
}

/// A root key's place, for a message.
fn describe(source: &RootKeySource) -> String {
    match source {
        RootKeySource::File(path) => path.display().to_string(),
        RootKeySource::Pkcs11(config) => format!("labelled {:?} in the {}", config.key_label, config.token),
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

/// How a plugin or key API server reports the use of key versions (`KmsKeyUsage`, which
/// the controller reads before it lets a key or version be destroyed). Recording cannot be
/// turned off.
#[derive(Args)]
pub struct UsageArgs {
    /// This reporter's name in the KmsKeyUsage records it writes (one entry per reporter,
    /// written by it alone); unique per plugin and per key API replica. Default:
    /// plugin/<hostname> for the plugin, server/<$POD_NAME or hostname> for the server.
    #[arg(long, value_name = "NAME")]
    pub usage_reporter: Option<String>,
    /// The length of a usage period in seconds: the records say in which period each
    /// version was last used for encryption, decryption or a refused call, and are written
    /// at most once per key, version and kind of use per period (periods start at multiples
    /// of it since the Unix epoch).
    #[arg(long, value_name = "SECONDS", default_value_t = kubekms::usage::DEFAULT_GRANULARITY)]
    pub usage_granularity_seconds: std::num::NonZeroU32,
}

impl UsageArgs {
    /// The usage configuration of a `component` (`plugin` or `server`); `pod_env` names an
    /// environment variable that, when set, names the reporter instead of the hostname.
    pub fn config(&self, component: &str, pod_env: Option<&str>) -> kubekms::usage::k8s::UsageConfig {
        let reporter = self.usage_reporter.clone().unwrap_or_else(|| {
            let host = pod_env
                .and_then(|v| std::env::var(v).ok())
                .filter(|v| !v.is_empty())
                .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "unknown".to_owned());
            format!("{component}/{host}")
        });
        kubekms::usage::k8s::UsageConfig { reporter, granularity: self.usage_granularity_seconds }
    }
}

/// How an audit log file rotates (not standard output, which whoever reads it rotates).
#[derive(Args)]
pub struct AuditRotationArgs {
    /// Past this size the audit log file is renamed FILE.<N>, N the sequence number of its
    /// first line, and a new FILE begins; the chain goes on across them, and `kubekms audit
    /// verify FILE` checks the whole series. Bytes, or a number with Ki, Mi or Gi. 0: never
    /// rotate.
    #[arg(long, value_name = "SIZE", default_value = "100Mi", value_parser = parse_size)]
    pub audit_log_max_size: u64,
    /// How many rotated audit log files are kept; the oldest beyond it are removed (ship
    /// them elsewhere first; verify what is kept with `audit verify --from-seq`). 0: keep
    /// them all.
    #[arg(long, value_name = "N", default_value_t = Rotation::default().max_files)]
    pub audit_log_max_files: usize,
}

impl AuditRotationArgs {
    pub fn rotation(&self) -> Rotation {
        Rotation { max_size: self.audit_log_max_size, max_files: self.audit_log_max_files }
    }
}

/// A size in bytes: a whole number, alone or followed by Ki, Mi or Gi.
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    if digits.is_empty() {
        return Err(format!("{text:?} is no size: it must start with a whole number"));
    }
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => return Err(format!("{text:?} is no size: give bytes, or a number with Ki, Mi or Gi (100Mi)")),
    };
    let n: u64 =
        digits.parse().map_err(|_| format!("{text:?} is no size: it must start with a whole number"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
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
