//! An existing audit log as the writer reads it when it opens (its last line, whatever
//! its length, to continue the chain, possibly cut short by a crash). Properties: opening
//! and appending never loses or changes a byte already there (a newline may end a cut
//! line); after one more line, a log that verified with the root key still verifies, one
//! line longer, and the new line is the last.
#![no_main]

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::OnceLock;

use kubekms::audit::{AuditEvent, AuditLog, verify};
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("kubekms-fuzz-audit-{}.log", std::process::id())))
}

fn event() -> AuditEvent {
    AuditEvent {
        component: "plugin",
        request_id: "fuzz-append".into(),
        principal: "kube-apiserver".into(),
        operation: "Encrypt",
        result: "OK",
        ..Default::default()
    }
}

/// A genuine log of two lines, made by the writer itself.
fn seeds() -> Vec<Vec<u8>> {
    let root = kubekms_fuzz::root();
    let _ = std::fs::remove_file(path());
    for _ in 0..2 {
        AuditLog::open(path(), &root).expect("open").record(&event()).expect("record");
    }
    let log = std::fs::read(path()).expect("read");
    let _ = std::fs::remove_file(path());
    vec![log.clone(), log[..log.len() - 20].to_vec(), b"{\"seq\":7}".to_vec()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let root = kubekms_fuzz::root();
    std::fs::write(path(), data).expect("write the log");
    let before = verify(data, Some(&root));
    let Ok(log) = AuditLog::open(path(), &root) else { return };
    let recorded = log.record(&event()).is_ok();
    drop(log);
    let after = std::fs::read(path()).expect("read the log");
    assert!(after.starts_with(data), "bytes already in the log were changed");
    assert!(recorded, "the line was not written");
    if let Ok(v) = before {
        let verified = verify(after.as_slice(), Some(&root)).expect("a valid log stays valid");
        assert_eq!(verified.lines, v.lines + 1);
        let last = after.lines().last().and_then(|l| l.ok()).unwrap_or_default();
        assert!(last.contains("\"requestId\":\"fuzz-append\""));
    }
});
