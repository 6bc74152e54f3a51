//! The `kubekms` binary: wires the subcommands to the library.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Print the CustomResourceDefinitions as YAML (the content of crds/).
    ///
    /// Apply them with `kubekms crds | kubectl apply --server-side -f -`.
    Crds,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            let yaml = kubekms::api::crds_yaml().context("failed to render the CRDs")?;
            std::io::stdout().write_all(yaml.as_bytes()).context("failed to write the CRDs")?;
        }
    }
    Ok(())
}
