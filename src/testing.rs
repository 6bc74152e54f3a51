//! What the component tests of the plugin and of the key API share: an audit log kept in
//! memory, which can be made to fail so that a test sees a call fail closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::audit::AuditLog;
use crate::crypto::RootKey;

/// Where an in-memory audit log writes; clones share the lines and the failure switch.
#[derive(Clone, Default)]
pub struct AuditSink {
    bytes: Arc<Mutex<Vec<u8>>>,
    failing: Arc<AtomicBool>,
}

impl AuditSink {
    /// An audit log, MACed under `root`, that writes here.
    pub fn log(&self, root: &RootKey) -> Arc<AuditLog> {
        Arc::new(AuditLog::to_writer(Box::new(self.clone()), root))
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
