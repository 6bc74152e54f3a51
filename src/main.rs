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
    /// Create or inspect the root key that wraps every key version.
    #[command(subcommand)]
    RootKey(RootKeyCommand),
    /// Operate on KmsKeys directly (for what kubectl cannot do).
    #[command(subcommand)]
    Key(KeyCommand),
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
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
        Command::Key(KeyCommand::Import { key, material, root_key_file, common }) => {
            import_key(key, material, root_key_file, common).await?
        }
    }
    Ok(())
}
