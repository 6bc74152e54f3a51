//! The audit log as `kubekms audit verify` reads it: one JSON line per operation, chained
//! by hashes and MACed under a key derived from the root key. Properties: verification
//! never panics, and a log that verifies with the root key also verifies without it; any
//! edit of a genuine log (a changed byte, a cut, a removed, repeated, swapped or inserted
//! line) that verifies with the root key leaves a prefix of the genuine lines — only lines
//! cut from the end go unseen, which `--expect-seq` is for — and one that verifies
//! without it changed at most the last line (which only the MAC protects). Lines that look
//! cut short by a crash hold no record and are reported as cut, never passed over in
//! silence: what this says of "lines" it says of the records, the lines not reported cut.
//! A log split at a line's end into two files of a rotated series verifies as the whole.
#![no_main]

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, OnceLock};

use kubekms::audit::{AuditEvent, AuditLog, Chain, verify};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A genuine log of a few lines under the targets' root key.
fn genuine() -> &'static [u8] {
    static LOG: OnceLock<Vec<u8>> = OnceLock::new();
    LOG.get_or_init(|| {
        let sink = Sink::default();
        let log = AuditLog::to_writer(Box::new(sink.clone()), &kubekms_fuzz::root());
        for (i, operation) in ["Encrypt", "Decrypt", "GenerateDataKey", "Decrypt"].into_iter().enumerate() {
            let event = AuditEvent {
                component: "server",
                request_id: format!("req-{i}"),
                principal: "system:serviceaccount:apps:web".into(),
                operation,
                key: Some("apps/key".into()),
                key_version: Some(1),
                encryption_context_keys: vec!["tenant".into()],
                result: if i == 3 { "PermissionDenied" } else { "OK" },
                ..Default::default()
            };
            log.record(&event).expect("record");
        }
        drop(log);
        sink.0.lock().expect("sink").clone()
    })
}

fn lines(bytes: &[u8]) -> Vec<String> {
    bytes.lines().map(|l| l.unwrap_or_default()).collect()
}

/// The lines that verify read as records: all but those it reported cut (numbered from 1).
fn records(lines: &[String], cut: &[u64]) -> Vec<String> {
    (1u64..).zip(lines).filter(|(n, _)| !cut.contains(n)).map(|(_, l)| l.clone()).collect()
}

fn check(data: &[u8]) -> Result<()> {
    let root = kubekms_fuzz::root();
    let mut u = Unstructured::new(data);
    if u.arbitrary::<u8>()? % 2 == 0 {
        let raw = u.take_rest();
        if verify(raw, Some(&root)).is_ok() {
            assert!(verify(raw, None).is_ok(), "MACs checked imply the chain checked");
        }
        return Ok(());
    }
    let log = genuine();
    let original = lines(log);
    let mut bytes = log.to_vec();
    for _ in 0..u.int_in_range(1..=3)? {
        let at = u.arbitrary::<usize>()?;
        match u.int_in_range(0..=5)? {
            0 => bytes = kubekms_fuzz::flipped(&bytes, at, u.arbitrary()?),
            1 => bytes.truncate(at % (bytes.len() + 1)),
            2 => {
                let extra = kubekms_fuzz::bytes(&mut u, 16)?;
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, extra);
            }
            op => {
                let mut edited = lines(&bytes);
                if edited.is_empty() {
                    continue;
                }
                let (i, j) = (at % edited.len(), u.arbitrary::<usize>()? % edited.len());
                match op {
                    3 => drop(edited.remove(i)),
                    4 => edited.insert(i, edited[j].clone()),
                    _ => edited.swap(i, j),
                }
                bytes = edited.iter().flat_map(|l| [l.as_bytes(), b"\n"].concat()).collect();
            }
        }
    }
    let edited = lines(&bytes);
    // Split at a line's end into two files of a rotated series, it verifies as one file does.
    let ends: Vec<usize> =
        bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1).collect();
    if !ends.is_empty() {
        let at = ends[u.arbitrary::<usize>()? % ends.len()];
        let mut chain = Chain::new(Some(&root));
        let split = chain.read(&bytes[..at]).and_then(|_| chain.read(&bytes[at..]));
        assert_eq!(split.is_ok(), verify(bytes.as_slice(), Some(&root)).is_ok(), "split at byte {at}");
    }
    if let Ok(v) = verify(bytes.as_slice(), Some(&root)) {
        let kept = records(&edited, &v.cut);
        assert!(original.starts_with(&kept), "an edited log verified with the root key");
    }
    if let Ok(v) = verify(bytes.as_slice(), None) {
        let kept = records(&edited, &v.cut);
        if let Some((_, before)) = kept.split_last() {
            assert!(original.starts_with(before), "a record before the last was edited unseen");
        }
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    vec![kubekms_fuzz::seed(0, genuine()), vec![1; 40], (0..=255).collect()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
