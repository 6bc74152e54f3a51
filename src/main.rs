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
    /// TEST ONLY: how long one "day" of rotation periods and deletion windows lasts. Never
    /// set this in production: it shortens the waiting period before key material is
    /// destroyed.
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    unsafe_day_length: SignedDuration,
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
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Audit(AuditCommand::Verify { file, root_key_file }) => {
            let root = root_key_file.as_deref().map(RootKey::load).transpose()?;
            let verified = kubekms::audit::verify_file(&file, root.as_ref())
                .with_context(|| format!("{} is not intact", file.display()))?;
            let how = if verified.macs_checked {
                "chain and MACs"
            } else {
                "chain only; give --root-key-file to check MACs"
            };
            println!("{}: {} lines intact ({how})", file.display(), verified.lines);
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
        Command::RootKey(RootKeyCommand::Fingerprint { root_key_file }) => {
            println!("{}", RootKey::load(&root_key_file)?.fingerprint());
        }
        Command::Controller(args) => run_controller(args).await?,
        Command::Plugin(args) => run_plugin(args).await?,
        Command::Bench(BenchCommand::Plugin { socket, calls, concurrency, json }) => {
            anyhow::ensure!(
                calls > 0 && concurrency.iter().all(|&c| c > 0),
                "--calls and --concurrency must be positive"
            );
            let rows = kubekms::bench::run_plugin_bench(socket.as_deref(), &concurrency, calls).await?;
            print!("{}", kubekms::bench::table(&rows));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)
                    .with_context(|| format!("failed to write {}", path.display()))?;
            }
        }
        Command::Key(KeyCommand::Import { key, material, root_key_file, common }) => {
            import_key(key, material, root_key_file, common).await?
        }
    }
    Ok(())
}
