//! The usage records on the API server: this reporter's entry of a `KmsKeyUsage` (named by
//! the key's UID, cluster-scoped), read back with a get and written with server-side apply
//! under the reporter's own field manager, so that the apply owns that entry only.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::recorder::{Pending, Recorder};
use super::writer::{Pacing, Reporter, StoreError, UsageMetrics, UsageStore, Writer};
use crate::api::{self, KmsKeyUsage, UsageReporter};
use crate::domain::{self, ReporterKind, Usage};

/// How a plugin or key API server reports usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// Its entry's name (`plugin/<host>`, `server/<pod>`).
    pub reporter: String,
    /// The length of a period, in seconds.
    pub granularity: NonZeroU32,
}

/// Starts recording uses as `kind`: the recorder the call paths get, its metrics on
/// `registry`, and — with a client — the writer task, which stops (after a last flush) on
/// `shutdown`. Without a client uses are only kept in memory (bounded).
pub fn start(
    config: &UsageConfig,
    kind: ReporterKind,
    client: Option<Client>,
    registry: &mut Registry,
    shutdown: CancellationToken,
) -> (Arc<Recorder>, Option<JoinHandle<()>>) {
    let recorder = Arc::new(Recorder::new(config.granularity));
    let metrics = UsageMetrics::register(registry, &recorder);
    let reporter = Reporter::new(&config.reporter, kind, config.granularity);
    tracing::info!(reporter = %reporter.name, granularity_seconds = config.granularity.get(), "recording key usage");
    let task = client.map(|client| {
        let writer = Writer {
            recorder: recorder.clone(),
            store: KubeUsageStore(client),
            reporter,
            metrics,
            pacing: Pacing::default(),
        };
        tokio::spawn(writer.run(shutdown))
    });
    (recorder, task)
}

/// `KmsKeyUsage` objects through the API server.
#[derive(Clone)]
pub struct KubeUsageStore(pub Client);

impl KubeUsageStore {
    fn api(&self) -> Api<KmsKeyUsage> {
        Api::all(self.0.clone())
    }
}

fn failed(step: &'static str) -> impl FnOnce(kube::Error) -> StoreError {
    move |e| StoreError { step, source: Box::new(e) }
}

/// `reporter`'s entry holding `pending`'s versions.
pub fn entry(reporter: &Reporter, pending: &Pending) -> UsageReporter {
    UsageReporter {
        name: reporter.name.clone(),
        kind: match reporter.kind {
            ReporterKind::StoragePlugin => api::ReporterKind::StoragePlugin,
            ReporterKind::KeyApi => api::ReporterKind::KeyApi,
        },
        granularity_seconds: reporter.granularity.get(),
        versions: pending
            .versions
            .iter()
            .map(|(version, uses)| api::VersionUse {
                version: *version,
                last_encrypt: uses.last_encrypt.map(Time),
                last_decrypt: uses.last_decrypt.map(Time),
                last_refused: uses.last_refused.map(Time),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl UsageStore for KubeUsageStore {
    async fn read(
        &self,
        uid: &str,
        reporter: &Reporter,
    ) -> Result<BTreeMap<u32, domain::VersionUse>, StoreError> {
        let stored = self.api().get_opt(uid).await.map_err(failed("read"))?;
        Ok(stored
            .map(|u| Usage::from(&u))
            .and_then(|u| u.reporters.into_iter().find(|r| r.name == reporter.name))
            .map(|r| r.versions)
            .unwrap_or_default())
    }

    async fn apply(&self, reporter: &Reporter, pending: &Pending) -> Result<(), StoreError> {
        let owner = &pending.owner;
        let body = json!({
            "apiVersion": "kms.kubekms.io/v1alpha1",
            "kind": "KmsKeyUsage",
            "metadata": {"name": owner.uid},
            "spec": {
                "owner": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid},
                "reporters": [entry(reporter, pending)],
            },
        });
        let params = PatchParams::apply(&reporter.field_manager()).force();
        self.api().patch(&owner.uid, &params, &Patch::Apply(body)).await.map(|_| ()).map_err(failed("write"))
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use jiff::Timestamp;

    use super::*;
    use crate::usage::recorder::KeyOwner;

    #[test]
    fn the_entry_holds_every_version_the_reporter_knows() {
        let reporter = Reporter::new("server/pod-1", ReporterKind::KeyApi, NonZeroU32::new(3_600).unwrap());
        let t = Timestamp::from_second(7_200).unwrap();
        let pending = Pending {
            owner: KeyOwner { namespace: "ns".into(), name: "k".into(), uid: "u".into() },
            versions: BTreeMap::from([
                (1, domain::VersionUse { last_decrypt: Some(t), ..Default::default() }),
                (
                    2,
                    domain::VersionUse { last_encrypt: Some(t), last_refused: Some(t), ..Default::default() },
                ),
            ]),
            generation: 3,
            needs_load: false,
        };
        let e = entry(&reporter, &pending);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({
                "name": "server/pod-1", "kind": "KeyApi", "granularitySeconds": 3600,
                "versions": [
                    {"version": 1, "lastDecrypt": "1970-01-01T02:00:00Z"},
                    {"version": 2, "lastEncrypt": "1970-01-01T02:00:00Z", "lastRefused": "1970-01-01T02:00:00Z"},
                ],
            })
        );
    }

    #[test]
    fn the_recorder_holds_no_more_versions_than_the_record() {
        assert_eq!(crate::usage::recorder::MAX_VERSIONS, api::MAX_VERSIONS);
    }
}
