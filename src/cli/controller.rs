//! `kubekms controller`: its flags, and the controller's configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::ArgAction;
use jiff::SignedDuration;

use kubekms::controller::{self, leader::Timing, lifecycle::Calendar, migration_plan::Resource};
use kubekms::domain::NamespacedName;

use super::args::{AuditRotationArgs, KubeArgs, RootKeyArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    root_key: RootKeyArgs,
    /// After a root-key rotation (a new --root-key-file or --pkcs11-key-label, the old one
    /// given as previous), the most versions of one key rewrapped under the new root key
    /// in one write of its KmsKeyMaterial. Each write is all or nothing, so a crash leaves
    /// every version under one root key or the other, and rewrapping resumes at restart.
    #[arg(long, value_name = "N", default_value = "50", env = "KUBEKMS_REWRAP_BATCH_SIZE")]
    rewrap_batch_size: std::num::NonZeroUsize,
    /// The least time between two rewrap batches of one key, to spare the API server (and
    /// an HSM) while a root-key rotation runs.
    #[arg(long, value_name = "DURATION", default_value = "0s", env = "KUBEKMS_REWRAP_PAUSE")]
    rewrap_pause: SignedDuration,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// The management audit trail: one chained JSON line per transition the controller
    /// carries out (created, rotated, disabled, deletion scheduled, destroyed, grant
    /// activated …), "-" for standard output. Check it with `kubekms audit verify`.
    #[arg(long, value_name = "FILE", default_value = "-")]
    audit_log: PathBuf,
    #[command(flatten)]
    audit_rotation: AuditRotationArgs,
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
    /// The resources kube-apiserver encrypts with a KMS plugin's key (its
    /// EncryptionConfiguration), as `resource` or `resource.group`, comma-separated. After a
    /// rotation of such a key, once kube-apiserver writes under the new version, the
    /// controller creates a StorageVersionMigration for each, so that every stored object
    /// moves to the new version. Empty turns this off.
    #[arg(long, value_name = "RESOURCES", value_delimiter = ',', default_value = "secrets")]
    storage_migration_resources: Vec<String>,
    /// TEST ONLY: how long one "day" of rotation periods and deletion windows lasts. Never
    /// set this in production: it shortens the waiting period before key material is
    /// destroyed. Refused unless the environment also says
    /// KUBEKMS_UNSAFE_TEST_CLOCK=shorten-waiting-periods.
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    unsafe_day_length: SignedDuration,
}

/// The environment variable that must accompany a shortened day, and its value.
const TEST_CLOCK_OPT_IN: &str = "KUBEKMS_UNSAFE_TEST_CLOCK";
const TEST_CLOCK_CONSENT: &str = "shorten-waiting-periods";

/// A day other than 24 hours shortens the waiting period before material is destroyed:
/// refused without an unmistakable opt-in in the environment, which no chart value sets.
fn check_test_clock(calendar: &Calendar, opt_in: Option<&str>) -> anyhow::Result<()> {
    if calendar.day == Calendar::default().day || opt_in == Some(TEST_CLOCK_CONSENT) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing --unsafe-day-length {:#}: it shortens the waiting period before key material is destroyed; \
         for a test, also set {TEST_CLOCK_OPT_IN}={TEST_CLOCK_CONSENT}",
        calendar.day
    )
}

/// The resources of --storage-migration-resources (an empty value, or none, turns the
/// migration off), each named once.
fn storage_migration_resources(names: &[String]) -> anyhow::Result<Vec<Resource>> {
    let mut resources: Vec<Resource> = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let resource: Resource = name.parse().context("invalid --storage-migration-resources")?;
        if !resources.contains(&resource) {
            resources.push(resource);
        }
    }
    Ok(resources)
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        self.kube.init_logging();
        let calendar = Calendar::new(self.unsafe_day_length).context("invalid --unsafe-day-length")?;
        check_test_clock(&calendar, std::env::var(TEST_CLOCK_OPT_IN).ok().as_deref())?;
        if calendar.day != Calendar::default().day {
            tracing::warn!(day = %self.unsafe_day_length, "TEST ONLY: --unsafe-day-length shortens rotation periods and deletion windows");
        }
        let timing = Timing::new(self.lease_duration, self.renew_deadline, self.retry_period)
            .context("invalid leader election timing")?;
        let storage_migration_resources = storage_migration_resources(&self.storage_migration_resources)?;
        let config = controller::Config {
            root_key: self.root_key.source()?,
            rewrap: controller::Rewrap {
                batch: self.rewrap_batch_size,
                pause: std::time::Duration::try_from(self.rewrap_pause)
                    .map_err(|_| anyhow::anyhow!("--rewrap-pause {} is negative", self.rewrap_pause))?,
            },
            audit_log: self.audit_log,
            audit_rotation: self.audit_rotation.rotation(),
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
            storage_migration_resources,
        };
        let client = self.kube.client().await?;
        let shutdown = super::shutdown_on_signal();
        controller::run(config, client, shutdown).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse;

    #[test]
    fn a_short_day_needs_the_opt_in() {
        let day = Calendar::default();
        assert!(check_test_clock(&day, None).is_ok());
        let short = Calendar::new(SignedDuration::from_secs(1)).unwrap();
        let err = check_test_clock(&short, None).unwrap_err().to_string();
        assert!(err.contains("KUBEKMS_UNSAFE_TEST_CLOCK=shorten-waiting-periods"), "{err}");
        assert!(check_test_clock(&short, Some("1")).is_err());
        assert!(check_test_clock(&short, Some(TEST_CLOCK_CONSENT)).is_ok());
    }

    #[test]
    fn storage_migration_resources_are_parsed_and_deduplicated() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let parsed =
            storage_migration_resources(&names(&["secrets", "widgets.example.com", "secrets", ""])).unwrap();
        let shown: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["secrets", "widgets.example.com"]);
        assert_eq!(parsed[1].group, "example.com");
        assert!(storage_migration_resources(&names(&[""])).unwrap().is_empty(), "empty turns it off");
        let err = storage_migration_resources(&names(&["Secrets"])).unwrap_err();
        assert!(format!("{err:#}").contains("is not a resource name"), "{err:#}");
        let args =
            ["controller", "--root-key-file", "/k", "--storage-migration-resources", "secrets,configmaps"];
        assert!(parse(&args).is_ok());
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
}
