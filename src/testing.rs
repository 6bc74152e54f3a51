//! What the tests of the plugin, the key API and the controller share: an audit log kept
//! in memory, which can be made to fail, or to stall, so that a test sees a call fail
//! closed, and an Enabled key as the key API's directory holds it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::api::{KeyOwner, KmsKeyMaterialSpec, MaterialVersion};
use crate::audit::{AuditLimits, AuditLog};
use crate::crypto::RootKey;
use crate::domain::{Key, KeyInfo, KeyIntent, KeyState, Origin, Policy};

/// The material of a key kubekms created, owned by `owner`, its versions wrapped under the
/// root key `root_fingerprint`, and nothing else recorded (no keyId, deletion, storage, import).
pub fn material_spec(
    owner: KeyOwner,
    root_fingerprint: &str,
    versions: Vec<MaterialVersion>,
) -> KmsKeyMaterialSpec {
    KmsKeyMaterialSpec {
        owner,
        origin: Origin::Kubekms,
        key_id: None,
        root_key_fingerprint: root_fingerprint.into(),
        versions,
        deletion_time: None,
        destroyed_at: None,
        storage: None,
        deletion_refused: None,
        import_wrapping: None,
        imported: None,
    }
}

/// An Enabled key at version 1, created by kubekms, with `policy`.
pub fn enabled_key(namespace: &str, name: &str, key_id: &str, policy: Policy) -> Key {
    Key {
        info: KeyInfo {
            namespace: namespace.into(),
            name: name.into(),
            key_id: key_id.into(),
            uid: key_id.into(),
            state: KeyState::Enabled,
            current_version: Some(1),
            refused_versions: Default::default(),
            valid_to: None,
        },
        intent: KeyIntent { origin: Origin::Kubekms, enabled: true, ..Default::default() },
        description: String::new(),
        origin: Origin::Kubekms,
        versions: vec![1],
        history: Vec::new(),
        created: None,
        next_rotation: None,
        deletion: None,
        automatic_rotation: true,
        rotation_period_days: 365,
        policy,
    }
}

/// Where an in-memory audit log writes; clones share the lines and the switches.
#[derive(Clone, Default)]
pub struct AuditSink {
    bytes: Arc<Mutex<Vec<u8>>>,
    failing: Arc<AtomicBool>,
    stall: Arc<Stall>,
}

/// Holds writes while `stalled`, as a hung disk or a full pipe does.
#[derive(Default)]
struct Stall {
    stalled: Mutex<bool>,
    released: Condvar,
    /// How many writes are held now.
    held: AtomicUsize,
}

impl AuditSink {
    /// An audit log, MACed under `root`, that writes here.
    pub fn log(&self, root: &RootKey) -> Arc<AuditLog> {
        self.log_with(root, AuditLimits::default())
    }

    /// The same, its callers waiting within `limits`.
    pub fn log_with(&self, root: &RootKey, limits: AuditLimits) -> Arc<AuditLog> {
        Arc::new(AuditLog::to_writer_with(Box::new(self.clone()), root, limits))
    }

    /// Makes every write block until called with `false`.
    pub fn stall(&self, stalled: bool) {
        *self.stall.stalled.lock().unwrap() = stalled;
        self.stall.released.notify_all();
    }

    /// How many writes are blocked in [`AuditSink::stall`] now.
    pub fn held(&self) -> usize {
        self.stall.held.load(Ordering::SeqCst)
    }

    /// Waits (within a generous bound) until a write is blocked in [`AuditSink::stall`].
    pub async fn wait_until_held(&self) {
        let held = async {
            while self.held() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), held).await.expect("a write to be held");
    }

    /// Makes every write fail (as a full disk does) until called with `false`.
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
    }

    /// Every line written so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl std::io::Write for AuditSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stalled = self.stall.stalled.lock().unwrap();
        while *stalled {
            self.stall.held.fetch_add(1, Ordering::SeqCst);
            stalled = self.stall.released.wait(stalled).unwrap();
            self.stall.held.fetch_sub(1, Ordering::SeqCst);
        }
        drop(stalled);
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("disk full"));
        }
        self.bytes.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A usage recorder that keeps every use it is told of: `(key_id, version, kind)`.
#[derive(Debug, Default, Clone)]
pub struct CapturedUses(Arc<Mutex<Vec<(String, u32, crate::domain::UseKind)>>>);

impl CapturedUses {
    /// The uses recorded so far, in order.
    pub fn uses(&self) -> Vec<(String, u32, crate::domain::UseKind)> {
        self.0.lock().unwrap().clone()
    }
}

impl crate::usage::UseRecorder for CapturedUses {
    fn record(&self, key: &KeyInfo, version: u32, kind: crate::domain::UseKind) {
        self.0.lock().unwrap().push((key.key_id.clone(), version, kind));
    }
}
