//! Keeps the plugin's key current: watches the KmsKey, reads its KmsKeyMaterial when it
//! changes, unwraps new versions, publishes a new snapshot within moments of a status change, and writes the
//! cache. Starts from the cache, so the plugin serves before the API server answers.

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cache::{self, CachedKey};
use crate::api::{KmsKey, KmsKeyMaterial};
use crate::crypto::{KeyMaterial, RootKey};
use crate::domain::{KeyInfo, KeyIntent, KeySnapshot, KeyState, VersionRefusal, WrappedMaterial};
use crate::keyring::snapshot;
use crate::kubeclient::WatchBackoff;

/// What the watch needs.
pub struct KeyWatch {
    pub client: Client,
    pub namespace: String,
    pub name: String,
    pub root: Arc<RootKey>,
    pub state_dir: PathBuf,
}

/// The snapshot the cache holds, if it is for this key and unwraps with this root key.
pub fn from_cache(
    root: &RootKey,
    state_dir: &std::path::Path,
    namespace: &str,
    name: &str,
) -> Option<Arc<KeySnapshot>> {
    let cached = match cache::read(state_dir, &cache::mac_keys(root)) {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %crate::telemetry::error_chain(&e), "ignoring the plugin cache");
            return None;
        }
    };
    if cached.namespace != namespace || cached.name != name {
        tracing::warn!(cached = %format!("{}/{}", cached.namespace, cached.name), "the cache is for another key; ignoring it");
        return None;
    }
    match snapshot(root, cached.info(), Some(&cached.material()), None) {
        Ok(snap) => {
            tracing::info!(
                key = %format!("{namespace}/{name}"),
                state = cached.state.as_str(),
                current_version = cached.current_version,
                versions = snap.versions.len(),
                "loaded the key from the cache"
            );
            Some(Arc::new(snap))
        }
        Err(e) => {
            tracing::warn!(error = %crate::telemetry::error_chain(&e), "the cache does not unwrap with this root key; ignoring it");
            None
        }
    }
}

impl KeyWatch {
    /// Watches until `shutdown`, publishing snapshots on `tx`.
    ///
    /// Only the KmsKey is watched. Its material is read by name (the key's UID) whenever the
    /// key changes: the controller writes a new version's material before the status that
    /// names it, and the plugin's RBAC allows reading that one object and no other.
    pub async fn run(self, tx: watch::Sender<Option<Arc<KeySnapshot>>>, shutdown: CancellationToken) {
        let keys: Api<KmsKey> = Api::namespaced(self.client.clone(), &self.namespace);
        let materials: Api<KmsKeyMaterial> = Api::all(self.client.clone());
        let key_config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let (key_store, key_writer) = reflector::store::<KmsKey>();
        // Every watch event counts, InitDone included: that is when the store becomes ready.
        let mut events = watcher(keys, key_config)
            .backoff(WatchBackoff::default())
            .modify(crate::kubeclient::drop_managed_fields)
            .reflect(key_writer)
            .map(|e| log_watch_error("KmsKey", e.err()))
            .boxed();
        let mac_key = cache::mac_key(&self.root);
        let mut synced = false;
        let mut state = RefreshState::default();
        // Set when the material could not be read or the cache written; retried on a timer.
        let mut retry = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = events.next() => if next.is_none() { return },
                () = tokio::time::sleep(std::time::Duration::from_secs(5)), if retry => {}
            }
            if !synced {
                // Publish nothing until the watch has listed once: an empty store must not
                // replace what the cache provided.
                if !key_store.wait_until_ready().now_or_never_ready() {
                    continue;
                }
                synced = true;
                tracing::info!(key = %format!("{}/{}", self.namespace, self.name), "watching the key");
            }
            retry = !self.refresh(&key_store, &materials, &tx, &mac_key, &mut state).await;
        }
    }

    /// Brings the snapshot and the cache up to date with the key; false when it must be
    /// tried again.
    async fn refresh(
        &self,
        key_store: &Store<KmsKey>,
        materials: &Api<KmsKeyMaterial>,
        tx: &watch::Sender<Option<Arc<KeySnapshot>>>,
        mac_key: &KeyMaterial,
        state: &mut RefreshState,
    ) -> bool {
        let Some(key) =
            key_store.state().into_iter().find(|k| k.metadata.name.as_deref() == Some(self.name.as_str()))
        else {
            tracing::warn!(key = %format!("{}/{}", self.namespace, self.name), "the KmsKey does not exist");
            tx.send_if_modified(|current| current.take().is_some());
            state.done = None;
            return true;
        };
        if state.done.is_some() && state.done == key.metadata.resource_version {
            return true;
        }
        let key_id = key.metadata.uid.clone().unwrap_or_default();
        let material = match materials.get_opt(&key_id).await {
            Ok(m) => m.filter(|m| m.spec.owner.uid == key_id).as_ref().map(WrappedMaterial::from),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot read the key's material; keeping the last good snapshot and trying again"
                );
                refuse_if_spec_refuses(&key, tx);
                return false;
            }
        };
        let info = key.info(material.as_ref());
        let previous = tx.borrow().clone();
        let snap = match snapshot(&self.root, info, material.as_ref(), previous.as_deref()) {
            Ok(s) => s,
            Err(e) if e.root_key_unavailable() => {
                tracing::error!(error = %crate::telemetry::error_chain(&e), "the root key cannot be reached; keeping the last good snapshot and trying again");
                refuse_if_spec_refuses(&key, tx);
                return false;
            }
            Err(e) => {
                tracing::error!(error = %crate::telemetry::error_chain(&e), "cannot use the key's material; keeping the last good snapshot");
                state.done = key.metadata.resource_version.clone();
                return true;
            }
        };
        // Status names a current version whose material is not there: read it again soon.
        if snap.info.state == KeyState::Enabled && snap.current().is_none() {
            tracing::debug!("waiting for the current version's material");
            return false;
        }
        // The cache first: a version kube-apiserver may encrypt under must be in the cache
        // before it is served, or a cold start during an API server outage could not
        // decrypt what was written under it. If the cache cannot be written, keep serving
        // the previous snapshot and try again (the caller retries on a timer).
        let entry = CachedKey::new(&snap.info, material.as_ref());
        if state.last_cached.as_ref() != Some(&entry) {
            match cache::write(&self.state_dir, &entry, mac_key) {
                Ok(()) => state.last_cached = Some(entry),
                Err(e) => {
                    tracing::error!(
                        error = %crate::telemetry::error_chain(&e),
                        "failed to write the cache; not serving the key's new state until it is written"
                    );
                    return false;
                }
            }
        }
        let changed = previous.as_ref().is_none_or(|p| !p.same_as(&snap));
        if changed {
            tracing::info!(
                key = %snap.display(),
                state = snap.info.state.as_str(),
                current_version = snap.info.current_version,
                versions = snap.versions.len(),
                "key updated"
            );
            tx.send_replace(Some(Arc::new(snap)));
        }
        state.done = key.metadata.resource_version.clone();
        true
    }
}

/// Fails closed without the material: when the key's spec disables it or asks for its
/// deletion, or disables a version, the snapshot served says so at once, even while its
/// material cannot be read.
fn refuse_if_spec_refuses(key: &KmsKey, tx: &watch::Sender<Option<Arc<KeySnapshot>>>) {
    let intent = key.intent();
    let refused = match intent {
        KeyIntent { deletion_scheduled: true, .. } | KeyIntent { deleting: true, .. } => {
            KeyState::PendingDeletion
        }
        KeyIntent { enabled: false, .. } => KeyState::Disabled,
        _ => return refuse_disabled_versions(&intent, tx),
    };
    tx.send_if_modified(|current| match current {
        Some(snap) if snap.info.state == KeyState::Enabled => {
            let info = KeyInfo { state: refused, ..snap.info.clone() };
            tracing::warn!(key = %snap.display(), state = refused.as_str(), "the key's spec refuses it; refusing it now");
            *current = Some(Arc::new(KeySnapshot { info, versions: snap.versions.clone() }));
            true
        }
        _ => false,
    });
}

/// The versions the spec disables (never the current one) refuse at once.
fn refuse_disabled_versions(intent: &KeyIntent, tx: &watch::Sender<Option<Arc<KeySnapshot>>>) {
    tx.send_if_modified(|current| {
        let Some(snap) = current else { return false };
        let mut info = snap.info.clone();
        for v in intent.disabled_versions.iter().filter(|v| Some(**v) != info.current_version) {
            info.refused_versions.entry(*v).or_insert(VersionRefusal::Disabled);
        }
        if info == snap.info {
            return false;
        }
        tracing::warn!(key = %snap.display(), "the key's spec disables versions; refusing them now");
        *current = Some(Arc::new(KeySnapshot { info, versions: snap.versions.clone() }));
        true
    });
}

/// What [`KeyWatch::refresh`] remembers between calls.
#[derive(Default)]
struct RefreshState {
    /// The entry last written to the cache.
    last_cached: Option<CachedKey>,
    /// The key's resourceVersion last brought up to date: later events of the same object
    /// (a relist, say) read nothing again.
    done: Option<String>,
}

fn log_watch_error(what: &str, error: Option<watcher::Error>) {
    if let Some(e) = error {
        tracing::warn!(error = %e, "watching the {what} failed; retrying");
    }
}

trait ReadyNow {
    fn now_or_never_ready(self) -> bool;
}

impl<F: std::future::Future> ReadyNow for F {
    /// Whether the future is already complete (without waiting).
    fn now_or_never_ready(self) -> bool {
        futures::FutureExt::now_or_never(self).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyMaterial;

    fn served(state: KeyState) -> Option<Arc<KeySnapshot>> {
        let info = KeyInfo {
            namespace: "kube-system".into(),
            name: "cluster".into(),
            key_id: "uid-1".into(),
            uid: "uid-1".into(),
            state,
            current_version: Some(1),
            refused_versions: Default::default(),
            valid_to: None,
        };
        Some(Arc::new(KeySnapshot {
            info,
            versions: [(1, Arc::new(KeyMaterial::generate().unwrap()))].into(),
        }))
    }

    fn key(spec: serde_json::Value) -> KmsKey {
        KmsKey::new("cluster", serde_json::from_value(spec).unwrap())
    }

    fn state(tx: &watch::Sender<Option<Arc<KeySnapshot>>>) -> Option<KeyState> {
        tx.borrow().as_ref().map(|s| s.info.state)
    }

    #[test]
    fn a_key_its_spec_refuses_is_refused_without_its_material() {
        for (spec, refused) in [
            (serde_json::json!({"enabled": false}), KeyState::Disabled),
            (serde_json::json!({"deletion": {"scheduled": true}}), KeyState::PendingDeletion),
        ] {
            let (tx, _rx) = watch::channel(served(KeyState::Enabled));
            refuse_if_spec_refuses(&key(spec), &tx);
            assert_eq!(state(&tx), Some(refused));
        }
        // A spec that still allows the key leaves the last good snapshot alone.
        let (tx, _rx) = watch::channel(served(KeyState::Enabled));
        refuse_if_spec_refuses(&key(serde_json::json!({})), &tx);
        assert_eq!(state(&tx), Some(KeyState::Enabled));
        // A version the spec disables is refused at once, never the current one.
        let (tx, _rx) = watch::channel(served(KeyState::Enabled));
        refuse_if_spec_refuses(
            &key(serde_json::json!({"versions": [{"version": 1, "enabled": false}]})),
            &tx,
        );
        assert!(tx.borrow().as_ref().unwrap().info.refused_versions.is_empty(), "version 1 is current");
        let mut two = (*served(KeyState::Enabled).unwrap()).clone();
        two.info.current_version = Some(2);
        let (tx, _rx) = watch::channel(Some(Arc::new(two)));
        refuse_if_spec_refuses(
            &key(serde_json::json!({"versions": [{"version": 1, "enabled": false}]})),
            &tx,
        );
        assert_eq!(
            tx.borrow().as_ref().unwrap().info.refused_versions.get(&1),
            Some(&VersionRefusal::Disabled)
        );
        // And nothing is made up when nothing is served.
        let (tx, _rx) = watch::channel(None);
        refuse_if_spec_refuses(&key(serde_json::json!({"enabled": false})), &tx);
        assert_eq!(state(&tx), None);
    }
}
