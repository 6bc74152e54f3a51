//! The subcommands of the `kubekms` binary: the command tree, what each subcommand runs,
//! and the exit code of an error. Each subcommand's arguments live in a file of their own.

mod args;
mod audit;
mod bench;
mod controller;
mod crds;
mod encrypt;
mod envelope;
mod flood;
mod key;
mod keyring;
mod manifests;
mod plugin;
mod root_key;
mod server;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// kubekms — a key management service that lives inside Kubernetes.
///
/// Keys are Kubernetes objects (KmsKey, KmsGrant in kms.kubekms.io/v1alpha1). The
/// controller manages their versioned material, the plugin lets kube-apiserver encrypt
/// Secrets in etcd under a managed key (KMS v2), and the server offers a key API to
/// workloads.
#[derive(Parser)]
#[command(name = "kubekms", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: creates key versions, rotates, enables and disables keys,
    /// schedules and carries out deletion. Runs as a leader-elected Deployment.
    Controller(controller::Args),
    /// Run the KMS v2 plugin beside kube-apiserver: it wraps the apiserver's DEK seed under
    /// the current version of one KmsKey, so that Secrets are encrypted in etcd.
    Plugin(plugin::Args),
    /// Run the key API for workloads: gRPC over TLS, ServiceAccount tokens, key policies,
    /// RBAC and grants, every call audited.
    Server(server::Args),
    /// Envelope-encrypt a file or stream of any size through the key API.
    ///
    /// Gets a data key from GenerateDataKey and encrypts in 64 KiB chunks (constant memory;
    /// truncation and reordering are detected on decrypt). The output holds the wrapped data
    /// key and the encryption context, so `kubekms decrypt` needs no key name.
    ///
    /// Exit codes: 0 ok, 1 error, 2 usage, 3 unauthenticated, 4 permission denied, 5 not
    /// found, 6 key not usable (disabled, pending deletion), 7 invalid input or decryption
    /// failed, 8 server unavailable.
    Encrypt(encrypt::EncryptArgs),
    /// Decrypt what `kubekms encrypt` wrote (exit codes as for encrypt).
    ///
    /// Plaintext is written chunk by chunk, each only after it authenticated; to a file it is
    /// written to a temporary file renamed into place on success, so a failure never leaves a
    /// partial file.
    Decrypt(encrypt::DecryptArgs),
    /// Create or inspect the root key that wraps every key version.
    #[command(subcommand)]
    RootKey(root_key::Command),
    /// Operate on KmsKeys directly (for what kubectl cannot do).
    #[command(subcommand)]
    Key(key::Command),
    /// Back up every key's wrapped material, and restore it into another cluster.
    #[command(subcommand)]
    Keyring(keyring::Command),
    /// Check an audit log.
    #[command(subcommand)]
    Audit(audit::Command),
    /// Measure latency and throughput, printed as ratios to a floor measured in the same run.
    #[command(subcommand)]
    Bench(bench::Command),
    /// Show how a value read from etcd is encrypted: provider, key id, annotations (never the
    /// data). Reads the raw value on standard input, for example
    /// `etcdctl get /registry/secrets/NS/NAME --print-value-only | kubekms envelope`.
    Envelope,
    /// Print manifests that are not part of the Helm chart.
    #[command(subcommand)]
    Manifests(manifests::Command),
    /// Print the CustomResourceDefinitions as YAML (the content of crds/).
    ///
    /// Apply them with `kubekms crds | kubectl apply --server-side -f -`.
    Crds,
}

impl Cli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Controller(args) => args.run().await,
            Command::Plugin(args) => args.run().await,
            Command::Server(args) => args.run().await,
            Command::Encrypt(args) => args.run().await,
            Command::Decrypt(args) => args.run().await,
            Command::RootKey(command) => command.run().await,
            Command::Key(command) => command.run().await,
            Command::Keyring(command) => command.run().await,
            Command::Audit(command) => command.run(),
            Command::Bench(command) => command.run().await,
            Command::Envelope => envelope::run(),
            Command::Manifests(command) => command.run(),
            Command::Crds => crds::run(),
        }
    }
}

/// Prints a usage error (or the help or version asked for) and gives its exit code: clap's
/// own, 2 for a usage error, except 1 for a value that is not NAMESPACE/NAME, the code it
/// had when each subcommand checked its names itself.
pub fn usage(e: &clap::Error) -> u8 {
    let _ = e.print();
    let bad_name =
        std::error::Error::source(e).is_some_and(|s| s.is::<kubekms::domain::NamespacedNameError>());
    if bad_name { 1 } else { u8::try_from(e.exit_code()).unwrap_or(2) }
}

/// Exit codes of the client commands, by the gRPC status the key API returned.
pub fn exit_code(e: &anyhow::Error) -> u8 {
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

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
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

/// Parses a command line as the binary does (for tests).
#[cfg(test)]
pub fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("kubekms").chain(args.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn a_name_that_is_not_namespace_slash_name_exits_1() {
        for args in [
            &["plugin", "--key", "no-slash", "--root-key-file", "/k"][..],
            &["key", "import", "--key", "a/b/c", "--material", "-"],
            &["manifests", "static-pod", "--key", "/k"],
            &["encrypt", "--server", "https://x:1", "--key", "k", "--service-account", "ns/"],
        ] {
            let err = parse(args).err().expect("refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{args:?}");
            assert!(err.to_string().contains("is not NAMESPACE/NAME"), "{err}");
            assert_eq!(usage(&err), 1, "{args:?}");
        }
        let other = parse(&["audit", "verify", "f", "--expect-seq", "x"]).err().expect("refused");
        assert_eq!(usage(&other), 2);
    }

    #[test]
    fn client_errors_have_their_own_exit_codes() {
        use kubekms::client::ClientError;
        let code = |e: ClientError| exit_code(&anyhow::Error::new(e).context("while encrypting"));
        assert_eq!(code(ClientError::Call(tonic::Status::unauthenticated("x"))), 3);
        assert_eq!(code(ClientError::Call(tonic::Status::permission_denied("x"))), 4);
        assert_eq!(code(ClientError::Call(tonic::Status::not_found("x"))), 5);
        assert_eq!(code(ClientError::Call(tonic::Status::failed_precondition("x"))), 6);
        assert_eq!(code(ClientError::Call(tonic::Status::invalid_argument("x"))), 7);
        assert_eq!(code(ClientError::Context("x".into())), 7);
        assert_eq!(code(ClientError::Call(tonic::Status::unavailable("x"))), 8);
        assert_eq!(code(ClientError::Call(tonic::Status::internal("x"))), 1);
        assert_eq!(code(ClientError::EmptyToken), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }
}
