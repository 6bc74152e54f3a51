//! The controller: reconciles KmsKey objects (key versions, rotation, enable/disable,
//! deletion), KmsGrants, and the storage migration after a rotation, while it holds the
//! leader Lease.

pub mod cluster;
pub mod grant;
pub mod import;
pub mod key;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod migration;
pub mod migration_plan;

#[cfg(test)]
mod migration_tests;
#[cfg(test)]
mod reconcile_tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::{KmsGrant, KmsKey, KmsKeyImport, KmsKeyMaterial, KmsKeyUsage};
use crate::audit::{AuditLimits, AuditLog, Rotation};
use crate::crypto::{RootKey, RootKeyConfig, RootKeyError};
use crate::keyring::MaterialError;
use crate::kubeclient::WatchBackoff;
use crate::telemetry::{self, Health};
use leader::{Attempt, LeaseLock, Timing};
use lifecycle::Calendar;
use metrics::ControllerMetrics;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the KmsKey has no {0}")]
    MissingField(&'static str),
    #[error(transparent)]
    Material(#[from] MaterialError),
    #[error("failed to generate key material")]
    Random(#[source] getrandom::Error),
    #[error("failed to patch the KmsKey status")]
    PatchStatus(#[source] kube::Error),
    #[error("failed to add the finalizer")]
    AddFinalizer(#[source] kube::Error),
    #[error("failed to remove the finalizer")]
    RemoveFinalizer(#[source] kube::Error),
    #[error("failed to read the API server's clock: {0}")]
    ApiServerClock(String),
    #[error("the key's lifecycle did not settle in one reconcile")]
    Unsettled,
    #[error("failed to let the KMS plugin read its key's material (ClusterRole {0})")]
    PluginAccess(String, #[source] kube::Error),
    #[error("failed to write the audit log")]
    Audit(#[source] crate::audit::AuditError),
    #[error("failed to ask RBAC whether a grant's creator may grant (SubjectAccessReview)")]
    AccessReview(#[source] kube::Error),
    #[error("failed to read the key's usage record (KmsKeyUsage)")]
    ReadUsage(#[source] kube::Error),
    #[error("failed to delete the destroyed key's usage record (KmsKeyUsage)")]
    DeleteUsage(#[source] kube::Error),
    #[error("failed to list the StorageVersionMigrations")]
    ListMigrations(#[source] kube::Error),
    #[error("failed to create a StorageVersionMigration")]
    CreateMigration(#[source] kube::Error),
    #[error("failed to delete a StorageVersionMigration")]
    DeleteMigration(#[source] kube::Error),
    #[error("failed to read the KmsKeyImport")]
    ReadImport(#[source] kube::Error),
    #[error("failed to write the KmsKeyImport")]
    WriteImport(#[source] kube::Error),
    #[error("failed to make the import wrapping key")]
    Wrapping(#[source] crate::crypto::ImportCryptoError),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingField(_) => "missing_field",
            Error::Material(e) => e.category(),
            Error::Random(_) => "random",
            Error::PatchStatus(_) => "patch_status",
            Error::AddFinalizer(_) | Error::RemoveFinalizer(_) => "finalizer",
            Error::ApiServerClock(_) => "api_server_clock",
            Error::Unsettled => "unsettled",
            Error::PluginAccess(..) => "plugin_access",
            Error::Audit(_) => "audit",
            Error::AccessReview(_) => "access_review",
            Error::ReadUsage(_) => "read_usage",
            Error::DeleteUsage(_) => "delete_usage",
            Error::ListMigrations(_) | Error::CreateMigration(_) | Error::DeleteMigration(_) => "migration",
            Error::ReadImport(_) | Error::WriteImport(_) => "import",
            Error::Wrapping(_) => "import_wrapping",
        }
    }

    /// A write lost a race with another writer; trying again soon is expected to work.
    pub fn is_conflict(&self) -> bool {
        let api_conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
        match self {
            Error::Material(e) => e.is_conflict(),
            Error::PatchStatus(e)
            | Error::AddFinalizer(e)
            | Error::RemoveFinalizer(e)
            | Error::WriteImport(e) => api_conflict(e),
            _ => false,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The management audit trail: one chained line per transition carried out.
    pub audit: Arc<AuditLog>,
    /// Every read and write of the API server.
    pub cluster: Arc<dyn cluster::Cluster>,
    pub root: Arc<RootKey>,
    pub material_cache: Store<KmsKeyMaterial>,
    pub calendar: Calendar,
    pub metrics: Arc<ControllerMetrics>,
    /// The status writes the watch cache may not show yet, so that a reconcile on a stale
    /// cache neither writes nor announces the same change twice.
    pub written: key::StatusMemory,
    pub plugin_access: Option<PluginAccess>,
    /// How versions are rewrapped after a root-key rotation.
    pub rewrap: Rewrap,
    /// When each key's last rewrap batch was written, by UID (see [`Rewrap::pause`]).
    pub rewrapped_at: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// How the controller rewraps versions under the primary root key after a root-key
/// rotation (see [`crate::keyring::with_rewrapped`]).
#[derive(Debug, Clone, Copy)]
pub struct Rewrap {
    /// The most versions of one key rewrapped in one write of its KmsKeyMaterial.
    pub batch: std::num::NonZeroUsize,
    /// The least time between two batches of one key.
    pub pause: std::time::Duration,
}

impl Default for Rewrap {
    fn default() -> Self {
        Rewrap {
            batch: std::num::NonZeroUsize::new(50).unwrap_or(std::num::NonZeroUsize::MIN),
            pause: Default::default(),
        }
    }
}

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the root key is (a file or a PKCS#11 token), and the previous ones whose
    /// versions the controller rewraps under it.
    pub root_key: RootKeyConfig,
    /// How versions are rewrapped under the primary root key.
    pub rewrap: Rewrap,
    /// Where the management audit trail goes ("-" for standard output).
    pub audit_log: PathBuf,
    /// How the audit log file rotates.
    pub audit_rotation: Rotation,
    pub metrics_addr: SocketAddr,
    /// The Lease to hold while active; `None` runs without leader election.
    pub lease: Option<(String, String)>,
    pub identity: String,
    pub timing: Timing,
    pub calendar: Calendar,
    /// Only KmsKeys matching this label selector (all when `None`).
    pub selector: Option<String>,
    /// The KMS plugin's key and the ClusterRole through which the plugin reads that key's
    /// material, and no other key's.
    pub plugin_access: Option<PluginAccess>,
    /// What kube-apiserver encrypts with a KMS plugin's key, rewritten after each rotation
    /// by StorageVersionMigrations; none turns the storage migration off.
    pub storage_migration_resources: Vec<migration_plan::Resource>,
}

/// The KMS plugin reads the material of one key, named by that key's UID, which is known
/// only once the key exists: the controller keeps a ClusterRole's rules naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginAccess {
    pub key_namespace: String,
    pub key_name: String,
    pub cluster_role: String,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to load the root key")]
    RootKey(#[source] RootKeyError),
    #[error("failed to open the audit log")]
    Audit(#[source] crate::audit::AuditError),
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What lives for the whole process, across leadership terms.
struct Shared {
    client: Client,
    root: Arc<RootKey>,
    audit: Arc<AuditLog>,
    recorder: Recorder,
    metrics: Arc<ControllerMetrics>,
    /// The current term's cache of KmsKeys, read by the keys-by-state metric.
    key_cache: Arc<std::sync::RwLock<Store<KmsKey>>>,
    /// The current term's cache of KmsKeyMaterials, read by the versions-by-root-key metric.
    material_cache: Arc<std::sync::RwLock<Store<KmsKeyMaterial>>>,
    health: Arc<Health>,
    config: Config,
}

/// Runs the controller until `shutdown` is cancelled (SIGTERM). With leader election it
/// works only while it holds the Lease; a replica that loses it (for example while the API
/// server is unreachable for longer than the renew deadline) stops working before anyone
/// else may take over, and goes back to waiting.
pub async fn run(config: Config, client: Client, shutdown: CancellationToken) -> Result<(), RunError> {
    let root = Arc::new(RootKey::open_config(&config.root_key).map_err(RunError::RootKey)?);
    let previous: Vec<&str> = root.previous_fingerprints().collect();
    tracing::info!(root_key = root.fingerprint(), previous_root_keys = ?previous, identity = %config.identity, "loaded the root key");

    let audit = Arc::new(
        AuditLog::open_with(&config.audit_log, &root, AuditLimits::default(), config.audit_rotation)
            .map_err(RunError::Audit)?,
    );
    let key_cache = Arc::new(std::sync::RwLock::new(reflector::store::<KmsKey>().0));
    let mut registry = Registry::default();
    audit.register(&mut registry);
    let metrics = Arc::new(ControllerMetrics::register(&mut registry, key_cache.clone()));
    let material_cache = Arc::new(std::sync::RwLock::new(reflector::store::<KmsKeyMaterial>().0));
    metrics::register_root_keys(&mut registry, material_cache.clone(), root.fingerprint());
    let health = Health::new(60);
    let listener = telemetry::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Listen { addr: config.metrics_addr, source })?;
    let server = tokio::spawn(telemetry::serve(
        listener,
        Arc::new(registry),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    ));
    let shared = Shared {
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "kubekms-controller".into(), instance: Some(config.identity.clone()) },
        ),
        client: client.clone(),
        root,
        audit,
        metrics,
        key_cache,
        material_cache,
        health,
        config: config.clone(),
    };

    match &config.lease {
        None => {
            shared.health.set_ready(true);
            shared.metrics.leader.set(1);
            run_term(&shared, shutdown.clone()).await;
        }
        Some((namespace, name)) => {
            let mut lock = LeaseLock::new(client, namespace, name, config.identity.clone(), config.timing);
            while !shutdown.is_cancelled() {
                lead(&mut lock, &shared, &shutdown).await;
            }
        }
    }
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}

/// One leadership term: waits for the Lease, runs the controllers while renewing it, and
/// returns when shutting down (after releasing the Lease) or when the Lease is lost.
async fn lead(lock: &mut LeaseLock, shared: &Shared, shutdown: &CancellationToken) {
    let timing = lock.timing();
    loop {
        shared.health.beat();
        match lock.try_acquire_or_renew().await {
            Ok(Attempt::Leading) => break,
            Ok(Attempt::Following { holder }) => {
                shared.health.set_ready(true);
                tracing::debug!(%holder, "waiting for the leader Lease");
            }
            Err(e) => tracing::warn!(error = %telemetry::error_chain(&e), "leader election attempt failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(timing.retry_period) => {}
        }
    }
    tracing::info!(identity = lock.identity(), "acquired the leader Lease; starting the controllers");
    shared.health.set_ready(true);
    shared.metrics.leader.set(1);

    let stop = CancellationToken::new();
    let term = run_term(shared, stop.clone());
    tokio::pin!(term);
    let mut last_renewal = tokio::time::Instant::now();
    let lost = loop {
        tokio::select! {
            () = shutdown.cancelled() => break false,
            () = &mut term => break true,
            () = tokio::time::sleep(timing.retry_period) => {}
        }
        shared.health.beat();
        match lock.try_acquire_or_renew().await {
            Ok(Attempt::Leading) => last_renewal = tokio::time::Instant::now(),
            Ok(Attempt::Following { holder }) => {
                tracing::error!(%holder, "another replica holds the leader Lease; stopping the controllers");
                break true;
            }
            Err(e) => tracing::warn!(error = %telemetry::error_chain(&e), "failed to renew the leader Lease"),
        }
        if last_renewal.elapsed() > timing.renew_deadline {
            tracing::error!(
                since = ?last_renewal.elapsed(),
                "could not renew the leader Lease within the renew deadline; stopping the controllers"
            );
            break true;
        }
    };
    stop.cancel();
    term.await;
    shared.metrics.leader.set(0);
    if lost {
        tracing::info!("waiting for the leader Lease again");
        return;
    }
    match lock.release().await {
        Ok(()) => tracing::info!("released the leader Lease"),
        Err(e) => tracing::warn!(error = %telemetry::error_chain(&e), "failed to release the leader Lease"),
    }
}

/// Runs the controllers with fresh caches until `stop`.
async fn run_term(shared: &Shared, stop: CancellationToken) {
    let (key_reader, key_writer) = reflector::store::<KmsKey>();
    let (material_reader, material_writer) = reflector::store::<KmsKeyMaterial>();
    if let Ok(mut cache) = shared.key_cache.write() {
        *cache = key_reader.clone();
    }
    if let Ok(mut cache) = shared.material_cache.write() {
        *cache = material_reader.clone();
    }
    let ctx = Arc::new(Context {
        cluster: Arc::new(cluster::KubeCluster::new(shared.client.clone(), shared.recorder.clone())),
        audit: shared.audit.clone(),
        root: shared.root.clone(),
        material_cache: material_reader,
        calendar: shared.config.calendar,
        metrics: shared.metrics.clone(),
        written: Default::default(),
        plugin_access: shared.config.plugin_access.clone(),
        rewrap: shared.config.rewrap,
        rewrapped_at: Default::default(),
    });
    let stores = Stores { keys: (key_reader, Some(key_writer)), materials: Some(material_writer) };
    let migration = (!shared.config.storage_migration_resources.is_empty()).then(|| {
        migration::MigrationContext::new(
            ctx.clone(),
            shared.config.storage_migration_resources.clone(),
            migration_plan::Backoff::default(),
        )
    });
    let controllers = run_controllers(
        shared.client.clone(),
        ctx,
        stores,
        shared.config.selector.clone(),
        shared.health.clone(),
        stop.clone(),
    );
    match migration {
        Some(migration) => {
            let migration =
                run_migration(shared.client.clone(), migration, shared.config.selector.clone(), stop);
            tokio::join!(controllers, migration);
        }
        None => controllers.await,
    }
}

struct Stores {
    keys: (Store<KmsKey>, Option<reflector::store::Writer<KmsKey>>),
    materials: Option<reflector::store::Writer<KmsKeyMaterial>>,
}

/// Hashes what should wake the controller for a KmsKey: spec changes (generation) and
/// deletion — not its own writes (status, the finalizer), which would only make it look
/// again at an object whose cached copy may not show them yet.
fn key_trigger(key: &KmsKey) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = key.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

async fn run_controllers(
    client: Client,
    ctx: Arc<Context>,
    mut stores: Stores,
    selector: Option<String>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let (Some(key_writer), Some(material_writer)) = (stores.keys.1.take(), stores.materials.take()) else {
        return;
    };
    let mut key_config = watcher::Config::default();
    if let Some(selector) = &selector {
        key_config = key_config.labels(selector);
    }
    let keys = watcher(Api::<KmsKey>::all(client.clone()), key_config.clone())
        .backoff(WatchBackoff::default())
        .modify(crate::kubeclient::slim_managed_fields)
        .reflect(key_writer)
        .applied_objects()
        .predicate_filter(key_trigger, Default::default());
    let materials = watcher(Api::<KmsKeyMaterial>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .modify(crate::kubeclient::drop_managed_fields)
        .reflect(material_writer)
        .touched_objects();
    // A use recorded (a refused one postpones a destruction at once, with its Event).
    let usages = watcher(Api::<KmsKeyUsage>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .touched_objects();
    let key_controller = Controller::for_stream(keys, stores.keys.0.clone())
        .trigger_backoff(WatchBackoff::default())
        .watches_stream(materials, |m: KmsKeyMaterial| {
            Some(ObjectRef::<KmsKey>::new(&m.spec.owner.name).within(&m.spec.owner.namespace))
        })
        .watches_stream(usages, |u: KmsKeyUsage| {
            Some(ObjectRef::<KmsKey>::new(&u.spec.owner.name).within(&u.spec.owner.namespace))
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(key::reconcile, key::error_policy, ctx.clone())
        .for_each(|result| {
            health.beat();
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
            futures::future::ready(())
        });

    // Grants: woken by their own changes (including the key API's retirement, and a status
    // the controller did not write, which it overwrites), by any change of the key they
    // name, and by any change of the grant they were created within (a grant is Active
    // only while that grant lets its creator grant).
    let (grant_reader, grant_writer) = reflector::store::<KmsGrant>();
    let (grant_keys_reader, grant_keys_writer) = reflector::store::<KmsKey>();
    let grants = watcher(Api::<KmsGrant>::all(client.clone()), key_config.clone())
        .backoff(WatchBackoff::default())
        .modify(crate::kubeclient::slim_managed_fields)
        .reflect(grant_writer)
        .applied_objects()
        .predicate_filter(grant_trigger, Default::default());
    let grant_keys = watcher(Api::<KmsKey>::all(client.clone()), key_config.clone())
        .backoff(WatchBackoff::default())
        .modify(crate::kubeclient::drop_managed_fields)
        .reflect(grant_keys_writer)
        .touched_objects();
    let parents = watcher(Api::<KmsGrant>::all(client.clone()), key_config.clone())
        .backoff(WatchBackoff::default())
        .touched_objects();
    let (by_key, by_parent) = (grant_reader.clone(), grant_reader.clone());
    let import_controller = run_imports(client.clone(), ctx.root.clone(), key_config.clone(), stop.clone());
    let grant_ctx =
        Arc::new(grant::GrantContext { inner: ctx, keys: grant_keys_reader, grants: grant_reader.clone() });
    let grant_controller = Controller::for_stream(grants, grant_reader)
        .trigger_backoff(WatchBackoff::default())
        .watches_stream(grant_keys, move |key: KmsKey| {
            let (ns, name) =
                (key.metadata.namespace.unwrap_or_default(), key.metadata.name.unwrap_or_default());
            grants_where(&by_key, |g| {
                g.metadata.namespace.as_deref() == Some(ns.as_str()) && g.spec.key_ref.name == name
            })
        })
        .watches_stream(parents, move |parent: KmsGrant| {
            let (ns, uid) = (parent.metadata.namespace, parent.metadata.uid);
            grants_where(&by_parent, |g| {
                g.metadata.namespace == ns
                    && uid.is_some()
                    && g.spec.creator.as_ref().and_then(|c| c.parent_grant.as_ref()) == uid.as_ref()
            })
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(grant::reconcile, grant::error_policy, grant_ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "grant controller event");
            }
            futures::future::ready(())
        });
    tokio::join!(key_controller, grant_controller, import_controller);
    tracing::info!("controllers stopped");
}

/// Import without the root key: woken by KmsKeys (only EXTERNAL ones do anything), by their
/// KmsKeyImport (a submission) and by their material (version 1, a wrapping key written).
async fn run_imports(client: Client, root: Arc<RootKey>, keys: watcher::Config, stop: CancellationToken) {
    let ctx = Arc::new(import::ImportContext {
        client: client.clone(),
        root,
        store: crate::keyring::MaterialStore::new(client.clone()),
    });
    Controller::new(Api::<KmsKey>::all(client.clone()), keys)
        .trigger_backoff(WatchBackoff::default())
        .watches(Api::<KmsKeyImport>::all(client.clone()), watcher::Config::default(), |i: KmsKeyImport| {
            Some(ObjectRef::<KmsKey>::new(&i.metadata.name?).within(&i.metadata.namespace?))
        })
        .watches(Api::<KmsKeyMaterial>::all(client), watcher::Config::default(), |m: KmsKeyMaterial| {
            Some(ObjectRef::<KmsKey>::new(&m.spec.owner.name).within(&m.spec.owner.namespace))
        })
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(import::reconcile, import::error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "import controller event");
            }
            futures::future::ready(())
        })
        .await
}

/// The storage migration reconciler, one key at a time: woken by a key's spec, its material
/// (a rotation, the storage record), its usage (kube-apiserver encrypting under a new
/// version) and its StorageVersionMigrations (their progress).
async fn run_migration(
    client: Client,
    ctx: migration::MigrationContext,
    selector: Option<String>,
    stop: CancellationToken,
) {
    use k8s_openapi::api::storagemigration::v1::StorageVersionMigration;
    let (reader, writer) = reflector::store::<KmsKey>();
    let mut key_config = watcher::Config::default();
    if let Some(selector) = &selector {
        key_config = key_config.labels(selector);
    }
    let keys = watcher(Api::<KmsKey>::all(client.clone()), key_config)
        .backoff(WatchBackoff::default())
        .modify(crate::kubeclient::slim_managed_fields)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(key_trigger, Default::default());
    let owner_of =
        |owner: &crate::api::KeyOwner| Some(ObjectRef::<KmsKey>::new(&owner.name).within(&owner.namespace));
    let materials = watcher(Api::<KmsKeyMaterial>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .touched_objects();
    let usages = watcher(Api::<KmsKeyUsage>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .touched_objects();
    let migrations = watcher(
        Api::<StorageVersionMigration>::all(client.clone()),
        watcher::Config::default().labels(cluster::MIGRATION_SELECTOR),
    )
    .backoff(WatchBackoff::default())
    .touched_objects();
    Controller::for_stream(keys, reader)
        .trigger_backoff(WatchBackoff::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(1))
        .watches_stream(materials, move |m: KmsKeyMaterial| owner_of(&m.spec.owner))
        .watches_stream(usages, move |u: KmsKeyUsage| owner_of(&u.spec.owner))
        .watches_stream(migrations, |m: StorageVersionMigration| migration::migration_key(&m))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(migration::reconcile, migration::error_policy, Arc::new(ctx))
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "storage migration controller event");
            }
            futures::future::ready(())
        })
        .await;
}

/// The grants in `store` that `keep` keeps, as references to reconcile.
fn grants_where(store: &Store<KmsGrant>, keep: impl Fn(&KmsGrant) -> bool) -> Vec<ObjectRef<KmsGrant>> {
    store.state().into_iter().filter(|g| keep(g)).map(|g| ObjectRef::from_obj(g.as_ref())).collect()
}

/// Hashes what should wake the controller for a KmsGrant: spec changes, the key API's
/// retirement, and the status fields the key API decides with — so that a status someone
/// else wrote is overwritten at once (the controller's own writes wake it once more, to no
/// effect) — but not the conditions' wording.
fn grant_trigger(grant: &KmsGrant) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    grant.meta().generation.hash(&mut h);
    if let Some(s) = grant.status.as_ref() {
        (&s.retired_by, &s.state, &s.key_id, &s.grant_id, &s.creator).hash(&mut h);
    }
    Some(h.finish())
}

/// A random identity for this replica: the pod name (or host name) and a random suffix.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "kubekms-controller".to_owned());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}
