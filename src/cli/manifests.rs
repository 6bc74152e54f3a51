//! `kubekms manifests`: print the manifests that are not part of the Helm chart.

use clap::Subcommand;

use kubekms::domain::NamespacedName;
use kubekms::manifests::{NodePaths, StaticPod};

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
        /// The root key file.
        #[arg(long, value_name = "FILE", default_value = "/etc/kubekms/root.key")]
        root_key_file: String,
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
                previous_root_key_file,
                kubeconfig,
                run_as_user,
                metrics_port,
                only,
            } => {
                let paths =
                    NodePaths { socket_dir, state_dir, root_key_file, previous_root_key_file, kubeconfig };
                let pod = StaticPod::new(key, image, paths, run_as_user, metrics_port)?;
                print!("{}", pod.render(only)?);
            }
        }
        Ok(())
    }
}
