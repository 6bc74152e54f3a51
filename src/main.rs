//! The `kubekms` binary: wires the subcommands to the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgAction, Args, Parser, Subcommand};
use jiff::SignedDuration;
use tokio_util::sync::CancellationToken;

use kubekms::controller::{self, leader::Timing, lifecycle::Calendar};
use kubekms::crypto::RootKey;

mod cli;

/// kubekms — a key management service that lives inside Kubernetes.
///
/// Keys are Kubernetes objects (KmsKey, KmsGrant in kms.kubekms.io/v1alpha1). The
/// controller manages their versioned material, the plugin lets kube-apiserver encrypt
/// Secrets in etcd under a managed key (KMS v2), and the server offers a key API to
/// workloads.
#[derive(Parser)]
#[command(name = "kubekms", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: creates key versions, rotates, enables and disables keys,
    /// schedules and carries out deletion. Runs as a leader-elected Deployment.
    Controller(ControllerArgs),
    /// Run the KMS v2 plugin beside kube-apiserver: it wraps the apiserver's DEK seed under
    /// the current version of one KmsKey, so that Secrets are encrypted in etcd.
    Plugin(PluginArgs),
    /// Run the key API for workloads: gRPC over TLS, ServiceAccount tokens, key policies,
    /// RBAC and grants, every call audited.
    Server(ServerArgs),
    /// Envelope-encrypt a file or stream of any size through the key API.
    ///
    /// Gets a data key from GenerateDataKey and encrypts in 64 KiB chunks (constant memory;
    /// truncation and reordering are detected on decrypt). The output holds the wrapped data
    /// key and the encryption context, so `kubekms decrypt` needs no key name.
    ///
    /// Exit codes: 0 ok, 1 error, 2 usage, 3 unauthenticated, 4 permission denied, 5 not
    /// found, 6 key not usable (disabled, pending deletion), 7 invalid input or decryption
    /// failed, 8 server unavailable.
    Encrypt(EncryptArgs),
    /// Decrypt what `kubekms encrypt` wrote (exit codes as for encrypt).
    ///
    /// Plaintext is written chunk by chunk, each only after it authenticated; to a file it is
    /// written to a temporary file renamed into place on success, so a failure never leaves a
    /// partial file.
    Decrypt(DecryptArgs),
    /// Create or inspect the root key that wraps every key version.
    #[command(subcommand)]
    RootKey(RootKeyCommand),
    /// Operate on KmsKeys directly (for what kubectl cannot do).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check an audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Measure latency and throughput, printed as ratios to a floor measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show how a value read from etcd is encrypted: provider, key id, annotations (never the
    /// data). Reads the raw value on standard input, for example
    /// `etcdctl get /registry/secrets/NS/NAME --print-value-only | kubekms envelope`.
    Envelope,
    /// Print manifests that are not part of the Helm chart.
    #[command(subcommand)]
    Manifests(ManifestsCommand),
    /// Print the CustomResourceDefinitions as YAML (the content of crds/).
    ///
    /// Apply them with `kubekms crds | kubectl apply --server-side -f -`.
    Crds,
}

#[derive(Subcommand)]
enum RootKeyCommand {
    /// Write a new random 256-bit root key to a file with mode 0600.
    ///
    /// Refuses to overwrite an existing file. Keep the file safe and backed up: every key
    /// version is wrapped by it, and without it no key material can be recovered.
    Create {
        /// Where to write the key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Copy a root key into a private file (mode 0600), for example from a Secret volume
    /// that only the pod's group can read: the init container of the Helm chart does this.
    Copy {
        /// The root key to copy (checked for length only).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Where to write it (replaced atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the fingerprint of a root key (a one-way identifier, safe to share).
    Fingerprint {
        /// The root key file.
        #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
        root_key_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Import your own 256-bit key material into a KmsKey with origin EXTERNAL that is
    /// PendingImport. The material is wrapped by the root key here and stored as version 1.
    ///
    /// Run it where the root key lives, as an identity allowed to create kmskeymaterials.
    /// Keep your own copy of the material: kubekms cannot export it.
    Import {
        /// The key, as NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        key: String,
        /// A file with exactly 32 bytes of raw key material, or - for standard input.
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
        /// The root key file.
        #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
        root_key_file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

/// Splits NAMESPACE/NAME.
fn namespaced_name(value: &str) -> anyhow::Result<(&str, &str)> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => anyhow::bail!("{value:?} is not NAMESPACE/NAME"),
    }
}

async fn import_key(
    key: String,
    material: PathBuf,
    root_key_file: PathBuf,
    common: Common,
) -> anyhow::Result<()> {
    let (namespace, name) = namespaced_name(&key)?;
    let root = RootKey::load(&root_key_file)?;
    let material = if material.as_os_str() == "-" {
        kubekms::keyring::read_material(std::io::stdin().lock())?
    } else {
        let file = std::fs::File::open(&material)
            .with_context(|| format!("failed to open {}", material.display()))?;
        kubekms::keyring::read_material(file)?
    };
    let client = kubekms::kubeclient::client(common.kubeconfig.as_deref()).await?;
    let key_id = kubekms::keyring::import(client, &root, namespace, name, &material).await?;
    println!(
        "imported key material into {key} (keyId {key_id}) as version 1, wrapped by root key {}",
        root.fingerprint()
    );
    Ok(())
}

#[derive(Args)]
struct Common {
    /// Kubeconfig to use; by default the in-cluster service account, then $KUBECONFIG,
    /// then ~/.kube/config.
    #[arg(long, value_name = "FILE", global = true)]
    kubeconfig: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    common: Common,
    /// The root key file (32 bytes, mode 0600 or stricter).
    #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
    root_key_file: PathBuf,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Hold a Lease so that only one replica is active.
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    leader_elect: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubekms-system")]
    leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "kubekms-controller")]
    leader_election_name: String,
    /// How long the Lease lasts without renewal (how long a crashed leader blocks others).
    #[arg(long, value_name = "DURATION", default_value = "15s")]
    lease_duration: SignedDuration,
    /// How long the leader tries to renew before it stops.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    renew_deadline: SignedDuration,
    /// How often to try to acquire or renew the Lease.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    retry_period: SignedDuration,
    /// Manage only the KmsKeys that match this label selector (for example to shard keys
    /// between controllers, or to try a new version on some keys first).
    #[arg(long, value_name = "SELECTOR")]
    selector: Option<String>,
    /// The KmsKey (NAMESPACE/NAME) of the KMS plugin. With --plugin-material-role the
    /// controller lets the plugin read this key's material and no other key's.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "plugin_material_role")]
    plugin_key: Option<String>,
    /// The ClusterRole bound to the plugin's ServiceAccount whose rules the controller keeps
    /// naming the material of --plugin-key (material is named by its key's UID, which is
    /// known only once the key exists). The chart sets both.
    #[arg(long, value_name = "NAME", requires = "plugin_key")]
    plugin_material_role: Option<String>,
    /// TEST ONLY: how long one "day" of rotation periods and deletion windows lasts. Never
    /// set this in production: it shortens the waiting period before key material is
    /// destroyed.
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    unsafe_day_length: SignedDuration,
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    common: Common,
    /// Address to serve gRPC over TLS on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// The server's TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// The server's TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// The root key file (32 bytes, mode 0600 or stricter).
    #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
    root_key_file: PathBuf,
    /// Token audience callers' tokens must be issued for (repeatable).
    #[arg(long = "audience", value_name = "AUDIENCE", default_value = "kubekms")]
    audiences: Vec<String>,
    /// How long a TokenReview result is reused (never past the token's expiry).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    token_cache_ttl: SignedDuration,
    /// How long a SubjectAccessReview result is reused, and so how long an RBAC change takes
    /// to apply.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    rbac_cache_ttl: SignedDuration,
    /// The audit log: one JSON line per call ("-" for standard output).
    #[arg(long, value_name = "FILE", default_value = "-")]
    audit_log: PathBuf,
    /// Address of the /healthz, /readyz and /metrics endpoints; none if not given.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Args)]
struct Connection {
    /// The key API's address.
    #[arg(long, value_name = "URL", env = "KUBEKMS_ADDR")]
    server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, value_name = "FILE", env = "KUBEKMS_CA")]
    ca: Option<PathBuf>,
    /// A file with the bearer token (for example a projected ServiceAccount token).
    #[arg(long, value_name = "FILE", conflicts_with = "service_account")]
    token_file: Option<PathBuf>,
    /// Get a token with `kubectl create token NAME -n NAMESPACE --audience kubekms`.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    service_account: Option<String>,
    /// Audience of the token kubectl creates.
    #[arg(long, value_name = "AUDIENCE", default_value = "kubekms")]
    audience: String,
}

impl Connection {
    /// The token source: --token-file, else $KUBEKMS_TOKEN, else --service-account.
    fn token(&self) -> anyhow::Result<kubekms::client::TokenSource> {
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

    async fn connect(&self) -> anyhow::Result<kubekms::client::Client> {
        Ok(kubekms::client::connect(&self.server, self.ca.as_deref(), &self.token()?).await?)
    }
}

/// A `key=value` pair of an encryption context.
fn context_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Args)]
struct EncryptArgs {
    #[command(flatten)]
    connection: Connection,
    /// The key, as NAMESPACE/NAME or keyId.
    #[arg(long)]
    key: String,
    /// An encryption-context pair, bound to the data key (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = context_pair)]
    context: Vec<(String, String)>,
    /// What to encrypt ("-" for standard input).
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    input: PathBuf,
    /// Where to write ("-" for standard output).
    #[arg(long = "out", value_name = "FILE", default_value = "-")]
    output: PathBuf,
    /// Print the byte count and this process's peak memory to standard error.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct DecryptArgs {
    #[command(flatten)]
    connection: Connection,
    /// A pair the file's encryption context must contain (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = context_pair)]
    context: Vec<(String, String)>,
    /// Require the file to be under this key (NAMESPACE/NAME or keyId).
    #[arg(long)]
    key: Option<String>,
    /// What to decrypt ("-" for standard input).
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    input: PathBuf,
    /// Where to write ("-" for standard output).
    #[arg(long = "out", value_name = "FILE", default_value = "-")]
    output: PathBuf,
    /// Print the byte count and this process's peak memory to standard error.
    #[arg(long)]
    verbose: bool,
}

fn report(verbose: bool, what: &str, bytes: u64) {
    if verbose {
        let peak =
            kubekms::client::peak_memory_kib().map_or_else(|| "unknown".to_owned(), |k| format!("{k} KiB"));
        eprintln!("{what} {bytes} bytes; peak memory {peak}");
    }
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    kubekms::telemetry::init_logging(args.common.log_json);
    let config = kubekms::server::Config {
        listen: args.listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        root_key_file: args.root_key_file,
        audiences: args.audiences,
        token_cache_ttl: std_duration(args.token_cache_ttl, "--token-cache-ttl")?,
        rbac_cache_ttl: std_duration(args.rbac_cache_ttl, "--rbac-cache-ttl")?,
        audit_log: args.audit_log,
        metrics_addr: args.metrics_addr,
    };
    let client = kubekms::kubeclient::client(args.common.kubeconfig.as_deref()).await?;
    kubekms::server::run(config, client, shutdown_on_signal()).await?;
    Ok(())
}

#[derive(Subcommand)]
enum ManifestsCommand {
    /// The KMS plugin as a static pod for /etc/kubernetes/manifests, and the matching
    /// EncryptionConfiguration for kube-apiserver. For clusters whose API server must never
    /// depend on a scheduled pod (install the chart with plugin.enabled=false).
    ///
    /// Every path is a path on the control-plane node. The plugin authenticates with the
    /// kubeconfig given (static pods have no ServiceAccount token): make one for the
    /// chart's <release>-plugin ServiceAccount.
    StaticPod {
        /// The KmsKey that encrypts Secrets, as NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        key: String,
        /// The kubekms image.
        #[arg(long, default_value = concat!("ghcr.io/kubekms/kubekms:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Directory for the socket kube-apiserver connects to.
        #[arg(long, value_name = "DIR", default_value = "/var/run/kubekms")]
        socket_dir: String,
        /// Directory for the plugin's cache and audit log.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/kubekms")]
        state_dir: String,
        /// The root key file.
        #[arg(long, value_name = "FILE", default_value = "/etc/kubekms/root.key")]
        root_key_file: String,
        /// The plugin's kubeconfig.
        #[arg(long, value_name = "FILE", default_value = "/etc/kubekms/plugin.kubeconfig")]
        kubeconfig: String,
        /// The (non-root) user the plugin runs as; it must own the directories and files above.
        #[arg(long, default_value_t = 65532)]
        run_as_user: i64,
        /// Port of the plugin's /healthz, /readyz and /metrics on 127.0.0.1.
        #[arg(long, default_value_t = 9465)]
        metrics_port: i32,
        /// Print only one of the two documents.
        #[arg(long, value_enum)]
        only: Option<kubekms::manifests::Part>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify that no line of an audit log was edited, removed or reordered. With the root
    /// key it also checks every line's MAC, which catches a forged or edited last line.
    /// Exits 0 when the log is intact, 1 with the first broken line otherwise.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// The root key of the component that wrote the log.
        #[arg(long, value_name = "FILE")]
        root_key_file: Option<PathBuf>,
        /// The sequence number the log must reach: `kubekms_audit_sequence` of the component
        /// as your monitoring recorded it. Lines cut from the end leave the chain intact, so
        /// only this shows them.
        #[arg(long, value_name = "N")]
        expect_seq: Option<u64>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// KMS v2 Encrypt and Decrypt over a unix socket, next to an empty gRPC call on the same
    /// kind of socket (the floor). Without --socket it runs an in-process plugin with a
    /// random key; with --socket it measures the plugin listening there.
    Plugin {
        /// A running plugin's socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Calls per measurement.
        #[arg(long, default_value_t = 20000)]
        calls: usize,
        /// Concurrent callers, each on its own connection (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Also write the rows as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// The key API's Encrypt and GenerateDataKey next to GenerateRandom (the floor: an
    /// authenticated, audited call that touches no key), against a running server.
    Keyapi {
        #[command(flatten)]
        connection: Connection,
        /// The key to use, as NAMESPACE/NAME.
        #[arg(long)]
        key: String,
        /// Calls per measurement.
        #[arg(long, default_value_t = 5000)]
        calls: usize,
        /// Concurrent callers, each on its own connection (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Also write the rows as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PluginArgs {
    #[command(flatten)]
    common: Common,
    /// The KmsKey that encrypts the cluster's Secrets.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    key: String,
    /// The unix socket kube-apiserver connects to (the `endpoint` of the EncryptionConfiguration,
    /// without `unix://`).
    #[arg(long, value_name = "PATH", default_value = "/var/run/kubekms/kms.sock")]
    socket: PathBuf,
    /// The root key file (32 bytes, mode 0600 or stricter).
    #[arg(long, value_name = "FILE", env = "KUBEKMS_ROOT_KEY_FILE")]
    root_key_file: PathBuf,
    /// Where the plugin keeps its cache of wrapped material (never plaintext), so it can
    /// start and decrypt while the API server is down.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kubekms")]
    state_dir: PathBuf,
    /// The audit log: one JSON line per Encrypt and Decrypt ("-" for standard output).
    /// Default: audit.log in the state directory.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Address of the /healthz, /readyz and /metrics endpoints; none if not given.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

async fn run_plugin(args: PluginArgs) -> anyhow::Result<()> {
    kubekms::telemetry::init_logging(args.common.log_json);
    let (namespace, name) = namespaced_name(&args.key)?;
    let config = kubekms::plugin::Config {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        socket: args.socket,
        root_key_file: args.root_key_file,
        audit_log: args.audit_log.unwrap_or_else(|| args.state_dir.join("audit.log")),
        state_dir: args.state_dir,
        metrics_addr: args.metrics_addr,
    };
    let client = match kubekms::kubeclient::client(args.common.kubeconfig.as_deref()).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no Kubernetes client; serving from the cache only");
            None
        }
    };
    kubekms::plugin::run(config, client, shutdown_on_signal()).await?;
    Ok(())
}

fn std_duration(d: SignedDuration, flag: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from(d).with_context(|| format!("{flag} must not be negative"))
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    kubekms::telemetry::init_logging(args.common.log_json);
    if args.unsafe_day_length != SignedDuration::from_hours(24) {
        anyhow::ensure!(args.unsafe_day_length.is_positive(), "--unsafe-day-length must be positive");
        tracing::warn!(day = %args.unsafe_day_length, "TEST ONLY: --unsafe-day-length shortens rotation periods and deletion windows");
    }
    let timing = Timing {
        lease_duration: std_duration(args.lease_duration, "--lease-duration")?,
        renew_deadline: std_duration(args.renew_deadline, "--renew-deadline")?,
        retry_period: std_duration(args.retry_period, "--retry-period")?,
    };
    anyhow::ensure!(
        timing.renew_deadline < timing.lease_duration,
        "--renew-deadline must be shorter than --lease-duration"
    );
    let config = controller::Config {
        root_key_file: args.root_key_file,
        metrics_addr: args.metrics_addr,
        lease: args.leader_elect.then_some((args.leader_election_namespace, args.leader_election_name)),
        identity: controller::default_identity(),
        timing,
        calendar: Calendar { day: args.unsafe_day_length },
        selector: args.selector,
        plugin_access: match (args.plugin_key, args.plugin_material_role) {
            (Some(key), Some(cluster_role)) => {
                let (key_namespace, key_name) = namespaced_name(&key).context("--plugin-key")?;
                Some(controller::PluginAccess {
                    key_namespace: key_namespace.to_owned(),
                    key_name: key_name.to_owned(),
                    cluster_role,
                })
            }
            _ => None,
        },
    };
    let client = kubekms::kubeclient::client(args.common.kubeconfig.as_deref()).await?;
    let shutdown = shutdown_on_signal();
    controller::run(config, client, shutdown).await?;
    Ok(())
}

/// A token cancelled on SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// Errors are printed as one line with their causes (no backtrace), and exit with code 1;
/// clap's usage errors exit with code 2.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

fn print_rows(rows: &[cli::bench::Row], json: Option<&std::path::Path>) -> anyhow::Result<()> {
    print!("{}", cli::bench::table(rows));
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(rows)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

/// Exit codes of the client commands, by the gRPC status the key API returned.
fn exit_code(e: &anyhow::Error) -> u8 {
    use tonic::Code;
    let client_error = e.chain().find_map(|c| c.downcast_ref::<kubekms::client::ClientError>());
    if matches!(
        client_error,
        Some(kubekms::client::ClientError::File(_) | kubekms::client::ClientError::Context(_))
    ) {
        return 7;
    }
    match client_error.and_then(|c| c.code()) {
        Some(Code::Unauthenticated) => 3,
        Some(Code::PermissionDenied) => 4,
        Some(Code::NotFound) => 5,
        Some(Code::FailedPrecondition) => 6,
        Some(Code::InvalidArgument) => 7,
        Some(Code::Unavailable) => 8,
        _ => 1,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Audit(AuditCommand::Verify { file, root_key_file, expect_seq }) => {
            let root = root_key_file.as_deref().map(RootKey::load).transpose()?;
            let verified = kubekms::audit::verify_file(&file, root.as_ref())
                .with_context(|| format!("{} is not intact", file.display()))?;
            // A verified chain starts at 1 and counts up by one: its last line is line N.
            if let Some(expected) = expect_seq
                && verified.lines < expected
            {
                anyhow::bail!(
                    "{} is not intact: it ends at sequence {}, but sequence {expected} was written (lines were cut from the end)",
                    file.display(),
                    verified.lines
                );
            }
            let how = if verified.macs_checked {
                "chain and MACs"
            } else {
                "chain only; give --root-key-file to check MACs"
            };
            println!("{}: {} lines intact ({how})", file.display(), verified.lines);
        }
        Command::Manifests(ManifestsCommand::StaticPod {
            key,
            image,
            socket_dir,
            state_dir,
            root_key_file,
            kubeconfig,
            run_as_user,
            metrics_port,
            only,
        }) => {
            namespaced_name(&key)?;
            for (flag, path) in [
                ("--socket-dir", &socket_dir),
                ("--state-dir", &state_dir),
                ("--root-key-file", &root_key_file),
                ("--kubeconfig", &kubeconfig),
            ] {
                anyhow::ensure!(
                    path.starts_with('/'),
                    "{flag} must be an absolute path on the node, got {path:?}"
                );
            }
            anyhow::ensure!(run_as_user > 0, "--run-as-user must not be root (0)");
            anyhow::ensure!(
                (1024..=65535).contains(&metrics_port),
                "--metrics-port must be from 1024 to 65535"
            );
            let pod = kubekms::manifests::StaticPod {
                key,
                image,
                socket_dir: socket_dir.trim_end_matches('/').to_owned(),
                state_dir,
                root_key_file,
                kubeconfig,
                run_as_user,
                metrics_port,
            };
            print!("{}", pod.render(only)?);
        }
        Command::Envelope => {
            let mut value = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut value)
                .context("failed to read standard input")?;
            let envelope = kubekms::envelope::parse(&value)?;
            println!("{}", serde_json::to_string_pretty(&envelope)?);
        }
        Command::Crds => {
            let yaml = kubekms::api::crds_yaml().context("failed to render the CRDs")?;
            std::io::stdout().write_all(yaml.as_bytes()).context("failed to write the CRDs")?;
        }
        Command::RootKey(RootKeyCommand::Create { out }) => {
            let key = RootKey::create(&out)?;
            println!("wrote a new root key to {} (fingerprint {})", out.display(), key.fingerprint());
        }
        Command::RootKey(RootKeyCommand::Copy { from, out }) => {
            let key = RootKey::copy(&from, &out)?;
            println!("copied the root key {} to {}", key.fingerprint(), out.display());
        }
        Command::RootKey(RootKeyCommand::Fingerprint { root_key_file }) => {
            println!("{}", RootKey::load(&root_key_file)?.fingerprint());
        }
        Command::Controller(args) => run_controller(args).await?,
        Command::Plugin(args) => run_plugin(args).await?,
        Command::Server(args) => run_server(args).await?,
        Command::Encrypt(args) => {
            let mut client = args.connection.connect().await?;
            let context = args.context.into_iter().collect();
            let n = kubekms::client::encrypt_file(&mut client, &args.key, context, &args.input, &args.output)
                .await?;
            report(args.verbose, "encrypted", n);
        }
        Command::Decrypt(args) => {
            let mut client = args.connection.connect().await?;
            let expected = args.context.into_iter().collect();
            let key = args.key.unwrap_or_default();
            let n = kubekms::client::decrypt_file(&mut client, &expected, &key, &args.input, &args.output)
                .await?;
            report(args.verbose, "decrypted", n);
        }
        Command::Bench(BenchCommand::Plugin { socket, calls, concurrency, json }) => {
            anyhow::ensure!(
                calls > 0 && concurrency.iter().all(|&c| c > 0),
                "--calls and --concurrency must be positive"
            );
            let rows = cli::bench::run_plugin_bench(socket.as_deref(), &concurrency, calls).await?;
            print_rows(&rows, json.as_deref())?;
        }
        Command::Bench(BenchCommand::Keyapi { connection, key, calls, concurrency, json }) => {
            anyhow::ensure!(
                calls > 0 && concurrency.iter().all(|&c| c > 0),
                "--calls and --concurrency must be positive"
            );
            let token = connection.token()?;
            let connect =
                async || kubekms::client::connect(&connection.server, connection.ca.as_deref(), &token).await;
            let rows = cli::bench::keyapi_rows(connect, &key, &concurrency, calls).await?;
            print_rows(&rows, json.as_deref())?;
        }
        Command::Key(KeyCommand::Import { key, material, root_key_file, common }) => {
            import_key(key, material, root_key_file, common).await?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubekms").chain(args.iter().copied()))
    }

    #[test]
    fn plugin_access_flags_come_together() {
        let base = ["controller", "--root-key-file", "/k"];
        for extra in [&["--plugin-key", "kube-system/k"][..], &["--plugin-material-role", "r"][..]] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let err = parse(&args).err().expect("one flag without the other is refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        }
        let args = [&base[..], &["--plugin-key", "kube-system/k", "--plugin-material-role", "r"]].concat();
        assert!(parse(&args).is_ok());
    }

    #[test]
    fn key_names_must_be_namespace_slash_name() {
        assert_eq!(namespaced_name("kube-system/k").unwrap(), ("kube-system", "k"));
        for bad in ["k", "/k", "ns/", "a/b/c", ""] {
            let err = namespaced_name(bad).unwrap_err().to_string();
            assert!(err.contains("is not NAMESPACE/NAME"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn expect_seq_takes_a_count() {
        assert!(parse(&["audit", "verify", "f", "--expect-seq", "12"]).is_ok());
        for bad in ["-1", "x", ""] {
            let arg = format!("--expect-seq={bad}");
            let err = parse(&["audit", "verify", "f", &arg]).err().expect(bad);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
    }
}
