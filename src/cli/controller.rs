//! `kubekms controller`: its flags, and the controller's configuration built from them.

use std::net::SocketAddr;

use anyhow::Context;
use clap::ArgAction;
use jiff::SignedDuration;

use kubekms::controller::{self, leader::Timing, lifecycle::Calendar};
use kubekms::domain::NamespacedName;

use super::args::{KubeArgs, RootKeyArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    root_key: RootKeyArgs,
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
    plugin_key: Option<NamespacedName>,
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

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        self.kube.init_logging();
        let calendar = Calendar::new(self.unsafe_day_length).context("invalid --unsafe-day-length")?;
        if calendar.day != Calendar::default().day {
            tracing::warn!(day = %self.unsafe_day_length, "TEST ONLY: --unsafe-day-length shortens rotation periods and deletion windows");
        }
        let timing = Timing::new(self.lease_duration, self.renew_deadline, self.retry_period)
            .context("invalid leader election timing")?;
        let config = controller::Config {
            root_key_file: self.root_key.root_key_file,
            metrics_addr: self.metrics_addr,
            lease: self.leader_elect.then_some((self.leader_election_namespace, self.leader_election_name)),
            identity: controller::default_identity(),
            timing,
            calendar,
            selector: self.selector,
            plugin_access: match (self.plugin_key, self.plugin_material_role) {
                (Some(key), Some(cluster_role)) => {
                    let (key_namespace, key_name) = key.into_parts();
                    Some(controller::PluginAccess { key_namespace, key_name, cluster_role })
                }
                _ => None,
            },
        };
        let client = self.kube.client().await?;
        let shutdown = super::shutdown_on_signal();
        controller::run(config, client, shutdown).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::parse;

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
}
