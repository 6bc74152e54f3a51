//! `kubekms manifests`: print the manifests that are not part of the Helm chart.

use anyhow::{Context, bail};
use clap::Subcommand;

use kubekms::domain::NamespacedName;
use kubekms::manifests::{NodePaths, NodePkcs11, NodeRootKey, StaticPod};

#[derive(Subcommand)]
pub enum Command {
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
        key: NamespacedName,
        /// The kubekms image.
        #[arg(long, default_value = concat!("ghcr.io/kubekms/kubekms:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Directory for the socket kube-apiserver connects to.
        #[arg(long, value_name = "DIR", default_value = "/var/run/kubekms")]
        socket_dir: String,
        /// Directory for the plugin's cache and audit log.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/kubekms")]
        state_dir: String,
        /// The root key file (unless the root key is in a PKCS#11 token).
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/etc/kubekms/root.key",
            conflicts_with = "pkcs11_module"
        )]
        root_key_file: String,
        /// The PKCS#11 module (shared library) of the token that holds the root key, instead
        /// of a file; mounted into the pod at the same path.
        #[arg(long, value_name = "FILE")]
        pkcs11_module: Option<String>,
        /// The label of the token that holds the root key.
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module", conflicts_with = "pkcs11_slot")]
        pkcs11_token_label: Option<String>,
        /// The slot of the token that holds the root key, instead of its label.
        #[arg(long, value_name = "ID", requires = "pkcs11_module")]
        pkcs11_slot: Option<u64>,
        /// The file (mode 0600, owned by --run-as-user) with the token's user PIN.
        #[arg(long, value_name = "FILE", requires = "pkcs11_module")]
        pkcs11_pin_file: Option<String>,
        /// The label (CKA_LABEL) of the root key object in the token.
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
        pkcs11_key_label: Option<String>,
        /// The directory a software token keeps its tokens in (SoftHSM's tokendir), mounted
        /// writable at the same path.
        #[arg(long, value_name = "DIR", requires = "pkcs11_module")]
        pkcs11_token_dir: Option<String>,
        /// The label of the previous root key object in the token, during a root-key
        /// rotation; remove it once `kubekms root-key status` says complete.
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
        pkcs11_previous_key_label: Option<String>,
        /// The previous root key file, during a root-key rotation (see
        /// `kubekms plugin --help`); remove it once `kubekms root-key status` says complete.
        #[arg(long, value_name = "FILE")]
        previous_root_key_file: Option<String>,
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

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::StaticPod {
                key,
                image,
                socket_dir,
                state_dir,
                root_key_file,
                pkcs11_module,
                pkcs11_token_label,
                pkcs11_slot,
                pkcs11_pin_file,
                pkcs11_key_label,
                pkcs11_token_dir,
                pkcs11_previous_key_label,
                previous_root_key_file,
                kubeconfig,
                run_as_user,
                metrics_port,
                only,
            } => {
                let root_key = match pkcs11_module {
                    None => NodeRootKey::File(root_key_file),
                    Some(module) => NodeRootKey::Pkcs11(NodePkcs11 {
                        module,
                        token: match (pkcs11_token_label, pkcs11_slot) {
                            (Some(label), _) => Ok(label),
                            (None, Some(slot)) => Err(slot),
                            (None, None) => {
                                bail!("--pkcs11-module needs --pkcs11-token-label or --pkcs11-slot")
                            }
                        },
                        pin_file: pkcs11_pin_file.context("--pkcs11-module needs --pkcs11-pin-file")?,
                        key_label: pkcs11_key_label.context("--pkcs11-module needs --pkcs11-key-label")?,
                        token_dir: pkcs11_token_dir,
                        previous_key_label: pkcs11_previous_key_label,
                    }),
                };
                let paths = NodePaths { socket_dir, state_dir, root_key, previous_root_key_file, kubeconfig };
                let pod = StaticPod::new(key, image, paths, run_as_user, metrics_port)?;
                print!("{}", pod.render(only)?);
            }
        }
        Ok(())
    }
}
