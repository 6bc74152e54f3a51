//! The audit trail: one JSON line per cryptographic operation, chained so that an edited,
//! removed or reordered line is detected.
//!
//! Each line carries `prev`, the SHA-256 of the line before it, and `mac`, an HMAC-SHA256
//! of the line itself under a key derived from the root key. `kubekms audit verify FILE`
//! checks the chain; given the root key it also checks every MAC, which catches a rewrite
//! of the last line or of the whole file by someone who could recompute plain hashes.
//! A line never holds plaintext, key material, data keys or tokens: only names, ids,
//! encryption-context keys (not values) and results. A file rotates past a size, and the
//! chain goes on across the files ([`series`]), which `audit verify` checks as one.
//!
//! One thread writes the lines, fed by a bounded queue, so that a slow or stalled sink
//! never stalls the callers: a caller waits for its line at most [`AuditLimits::timeout`],
//! a caller finding the queue full does not wait at all, and either way the caller fails
//! closed. A line still waiting when its caller gave up is not written; one the sink was
//! already writing may land after its caller was told the log could not be written (the log
//! may then record a call whose caller got no answer — never the reverse).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crypto::{KeyMaterial, RootKey};

mod series;

pub use series::{Rotation, SeriesError, SeriesVerified, rotated, verify_series};

const MAC_PURPOSE: &[u8] = b"kubekms/v1 audit-log mac";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited operation.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Which component did it: `plugin` or `server`.
    pub component: &'static str,
    /// The caller's request id.
    pub request_id: String,
    /// Who asked (a Kubernetes user name, or the socket peer for the plugin).
    pub principal: String,
    /// The operation (Encrypt, Decrypt, GenerateDataKey, …).
    pub operation: &'static str,
    /// The key as namespace/name, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key's keyId, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The key version used, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// For ReEncrypt: the key the ciphertext came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_key_version: Option<u32>,
    /// For ReEncrypt: the keys of the source encryption context (never the values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_encryption_context_keys: Vec<String>,
    /// The grant that allowed the call, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// For CreateGrant: the grant the call created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_grant_id: Option<String>,
    /// The keys of the encryption context (never the values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub encryption_context_keys: Vec<String>,
    /// `OK`, or the gRPC status code of the failure.
    pub result: &'static str,
    /// Why it failed, in words that carry no secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The layout of a line before its MAC (written by hand in `record`, checked against this
/// in the tests).
#[cfg(test)]
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    time: String,
    seq: u64,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

/// Why the audit log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("failed to open audit log {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("failed to write the audit log")]
    Write(#[source] std::io::Error),
    #[error("failed to encode an audit line")]
    Encode(#[source] serde_json::Error),
    #[error("the audit queue is full: {0} lines wait to be written")]
    Busy(usize),
    #[error("the audit line was not written within {0:?}")]
    TimedOut(Duration),
    #[error("the audit writer has stopped")]
    Stopped,
}

/// How long callers wait for their audit lines, and how many lines may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditLimits {
    /// How long a caller waits for its line before it fails closed.
    pub timeout: Duration,
    /// How many lines may wait to be written; a caller finding them all taken fails closed
    /// at once (with 0, a line is taken only when the writer is idle).
    pub queue: usize,
}

impl Default for AuditLimits {
    fn default() -> Self {
        AuditLimits { timeout: Duration::from_secs(2), queue: 1024 }
    }
}

struct Writer {
    out: Sink,
    prev: String,
    seq: u64,
    /// The last write failed part-way: what landed is the beginning of a line, so the next
    /// line starts with a newline, and what landed stands alone as a cut line.
    cut: bool,
}

impl Writer {
    fn new(out: Sink, prev: String, seq: u64) -> Writer {
        Writer { out, prev, seq, cut: false }
    }
}

/// Writes all of `buf` and flushes; on failure, also says how many of its bytes landed.
fn write_whole(out: &mut dyn Write, buf: &[u8]) -> Result<(), (std::io::Error, usize)> {
    let mut done = 0;
    while done < buf.len() {
        match out.write(&buf[done..]) {
            Ok(0) => return Err((std::io::ErrorKind::WriteZero.into(), done)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, done)),
        }
    }
    // Written, as far as this process can tell: a flush that fails loses what a buffer
    // held, which is then no part of a line.
    out.flush().map_err(|e| (e, 0))
}

/// Where the lines go: a stream (standard output, a test's sink), or a file that rotates.
enum Sink {
    Stream(Box<dyn Write + Send>),
    File(series::FileSink),
}

impl Sink {
    /// Writes the bytes of the record `seq`: its line, perhaps after a newline that ends a
    /// line cut by a failed write. On failure, also says how many bytes landed.
    fn write_line(&mut self, seq: u64, bytes: &[u8]) -> Result<(), (std::io::Error, usize)> {
        match self {
            Sink::Stream(out) => write_whole(out.as_mut(), bytes),
            Sink::File(file) => file.write_line(seq, bytes),
        }
    }
}

/// One line to write: the event's fields (serialized by the caller), until when its caller
/// waits, and where the outcome goes.
struct Job {
    fields: String,
    deadline: Instant,
    reply: Reply,
}

enum Reply {
    Blocking(mpsc::SyncSender<Result<(), AuditError>>),
    Async(tokio::sync::oneshot::Sender<Result<(), AuditError>>),
}

impl Reply {
    /// Tells the caller, if it still waits.
    fn send(self, outcome: Result<(), AuditError>) {
        let _ = match self {
            Reply::Blocking(tx) => tx.try_send(outcome).map_err(drop),
            Reply::Async(tx) => tx.send(outcome).map_err(drop),
        };
    }
}

/// An append-only audit log.
pub struct AuditLog {
    /// To the writer thread, which ends when the log is dropped.
    jobs: mpsc::SyncSender<Job>,
    limits: AuditLimits,
    /// The sequence number of the last line written, for `/metrics`: a monitoring system that
    /// records it can later tell `audit verify --expect-seq` where the log must reach, which
    /// the chain alone cannot show for lines cut from the end.
    sequence: Gauge,
    /// Lines queued and not yet taken by the writer (at most `limits.queue`).
    waiting: Gauge,
    /// Calls whose line was not written, by why.
    failed: Family<FailureLabels, Counter>,
    /// The current file's size and its rotations (zero for a stream).
    file: series::FileMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    /// `queue_full`, `timed_out`, `write` or `stopped`.
    reason: &'static str,
}

impl AuditError {
    /// Its `reason` label in `kubekms_audit_failures_total`.
    fn reason(&self) -> &'static str {
        match self {
            AuditError::Busy(_) => "queue_full",
            AuditError::TimedOut(_) => "timed_out",
            AuditError::Stopped => "stopped",
            AuditError::Open(..) | AuditError::Write(_) | AuditError::Encode(_) => "write",
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    crate::crypto::hex(&Sha256::digest(bytes))
}

fn mac_hex(key: &KeyMaterial, bytes: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(bytes);
    crate::crypto::hex(&mac.finalize().into_bytes())
}

fn set_sequence(gauge: &Gauge, seq: u64) {
    gauge.set(i64::try_from(seq).unwrap_or(i64::MAX));
}

/// The longest line the writer continues a chain from; longer ones mean a corrupt file.
const MAX_LINE: u64 = 1024 * 1024;

/// How every line begins (`Writer::append`): a line that begins so (or is a beginning of
/// it) but is no JSON value is one a crash or a failed write cut short.
const LINE_START: &str = "{\"time\":\"";

/// Whether `line` is the beginning of a line that a crash or a failed write cut short: it
/// starts as every line does (or is a beginning of that start) and does not parse. Such a
/// line holds no record; the next one chains to the line before it.
fn is_cut(line: &str) -> bool {
    let begins = line.starts_with(LINE_START) || (!line.is_empty() && LINE_START.starts_with(line));
    begins && serde_json::from_str::<serde_json::Value>(line).is_err()
}

/// Where a file's chain stands: its last record (the line and its sequence number), and
/// whether the file ends in the middle of a line (it does after a crash during a write).
#[derive(Debug, PartialEq, Eq)]
struct Tail {
    last: Option<(String, u64)>,
    ends_with_newline: bool,
}

/// The end of the file at `path`, read backwards from the end: the last line, skipping lines
/// cut short by a crash ([`is_cut`]), which hold no record. Lines are at most [`MAX_LINE`]
/// long; a longer tail means a corrupt file.
fn tail(path: &Path) -> std::io::Result<Tail> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Tail { last: None, ends_with_newline: true });
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut pos = len;
    let mut buf: Vec<u8> = Vec::new();
    let mut ends_with_newline = true;
    let mut first = true;
    loop {
        // Read until `buf` holds a whole line after its first newline, or the file's start.
        while pos > 0 && buf.iter().filter(|b| **b == b'\n').count() < 2 {
            let start = pos.saturating_sub(8192);
            let mut chunk = vec![0u8; (pos - start) as usize];
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut chunk)?;
            chunk.extend_from_slice(&buf);
            buf = chunk;
            pos = start;
            if buf.len() as u64 > 2 * MAX_LINE {
                return Err(std::io::Error::other(
                    "the last line of the audit log is implausibly long; the file is corrupt",
                ));
            }
        }
        if first {
            ends_with_newline = buf.is_empty() || buf.last() == Some(&b'\n');
            first = false;
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if body.is_empty() && pos == 0 {
            return Ok(Tail { last: None, ends_with_newline });
        }
        let at = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let line = String::from_utf8_lossy(&body[at..]).into_owned();
        if !is_cut(&line) {
            let seq = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
                .unwrap_or(0);
            return Ok(Tail { last: Some((line, seq)), ends_with_newline });
        }
        if at == 0 && pos == 0 {
            return Ok(Tail { last: None, ends_with_newline });
        }
        // A cut line: the record before it is where the chain stands.
        buf.truncate(at);
    }
}

/// Bounds what one line may hold, whatever a caller sent.
fn bounded(event: &AuditEvent) -> AuditEvent {
    fn cut(s: &str, max: usize) -> String {
        if s.len() <= max {
            return s.to_owned();
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
    let mut e = event.clone();
    e.request_id = cut(&e.request_id, 128);
    e.principal = cut(&e.principal, 512);
    e.reason = e.reason.as_deref().map(|r| cut(r, 512));
    for keys in [&mut e.encryption_context_keys, &mut e.source_encryption_context_keys] {
        *keys = keys.iter().take(64).map(|k| cut(k, 128)).collect();
    }
    for field in [
        &mut e.key,
        &mut e.key_id,
        &mut e.source_key,
        &mut e.source_key_id,
        &mut e.grant_id,
        &mut e.created_grant_id,
    ] {
        *field = field.as_deref().map(|v| cut(v, 320));
    }
    e
}

impl AuditLog {
    /// Appends to `path` ("-" for standard output), continuing the chain of what the file
    /// already holds. The file is created with mode 0600 and rotates as [`Rotation`]'s
    /// default says.
    pub fn open(path: &Path, root: &RootKey) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(path, root, AuditLimits::default(), Rotation::default())
    }

    /// [`AuditLog::open`], with callers waiting within `limits`, the file rotating as
    /// `rotation` says. The chain goes on across rotated files: it continues from the last
    /// record of the current file or, when that holds none (a rotation just happened), of
    /// the newest rotated one.
    pub fn open_with(
        path: &Path,
        root: &RootKey,
        limits: AuditLimits,
        rotation: Rotation,
    ) -> Result<AuditLog, AuditError> {
        let mac_key = root.derive(MAC_PURPOSE);
        let metrics = series::FileMetrics::default();
        if path == Path::new("-") {
            let writer = Writer::new(Sink::Stream(Box::new(std::io::stdout())), GENESIS.into(), 0);
            return Ok(AuditLog::new(writer, mac_key, limits, metrics));
        }
        let (file, last) = series::FileSink::open(path, rotation, metrics.clone())
            .map_err(|e| AuditError::Open(path.to_owned(), e))?;
        let (prev, seq) = match &last {
            Some((line, seq)) => (sha256_hex(line.as_bytes()), *seq),
            None => (GENESIS.to_owned(), 0),
        };
        Ok(AuditLog::new(Writer::new(Sink::File(file), prev, seq), mac_key, limits, metrics))
    }

    /// The log around a writer, on a thread of its own, its gauge starting where the
    /// writer's chain stands. Should the thread fail to start, every line fails (closed).
    fn new(
        mut writer: Writer,
        mac_key: KeyMaterial,
        limits: AuditLimits,
        file: series::FileMetrics,
    ) -> AuditLog {
        let sequence = Gauge::default();
        set_sequence(&sequence, writer.seq);
        let (jobs, queue) = mpsc::sync_channel::<Job>(limits.queue);
        let (gauge, waiting) = (sequence.clone(), Gauge::default());
        let taken = waiting.clone();
        let started = std::thread::Builder::new().name("kubekms-audit".into()).spawn(move || {
            // Ends when the log, the only sender, is dropped.
            for job in queue {
                taken.dec();
                let outcome = if Instant::now() >= job.deadline {
                    Err(AuditError::TimedOut(limits.timeout))
                } else {
                    writer.append(&job.fields, &mac_key, &gauge)
                };
                job.reply.send(outcome);
            }
        });
        if let Err(e) = started {
            tracing::error!(error = %e, "failed to start the audit writer; every audited call will fail");
        }
        AuditLog { jobs, limits, sequence, waiting, failed: Family::default(), file }
    }

    /// `kubekms_audit_sequence` (the sequence number of the last line written),
    /// `kubekms_audit_queued`, `kubekms_audit_failures_total{reason}`, and for a file
    /// `kubekms_audit_file_bytes` and `kubekms_audit_rotations_total{result}`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "kubekms_audit_sequence",
            "Sequence number of the last audit line written (compare with `kubekms audit verify --expect-seq`)",
            self.sequence.clone(),
        );
        registry.register(
            "kubekms_audit_queued",
            "Audit lines waiting for the writer (the queue's bound is --audit-queue)",
            self.waiting.clone(),
        );
        registry.register(
            "kubekms_audit_failures",
            "Audited calls failed closed because their line was not written, by reason",
            self.failed.clone(),
        );
        self.file.register(registry);
    }

    /// Counts a failed line in `kubekms_audit_failures_total`.
    fn counted(&self, outcome: Result<(), AuditError>) -> Result<(), AuditError> {
        if let Err(e) = &outcome {
            self.failed.get_or_create(&FailureLabels { reason: e.reason() }).inc();
        }
        outcome
    }

    /// An audit log written to any sink (tests).
    pub fn to_writer(out: Box<dyn Write + Send>, root: &RootKey) -> AuditLog {
        AuditLog::to_writer_with(out, root, AuditLimits::default())
    }

    /// [`AuditLog::to_writer`], with callers waiting within `limits`.
    pub fn to_writer_with(out: Box<dyn Write + Send>, root: &RootKey, limits: AuditLimits) -> AuditLog {
        let writer = Writer::new(Sink::Stream(out), GENESIS.into(), 0);
        AuditLog::new(writer, root.derive(MAC_PURPOSE), limits, series::FileMetrics::default())
    }

    /// Writes one line, blocking the calling thread until it is written or the timeout
    /// passes. Callers fail the operation when this fails (fail closed). An async caller
    /// uses [`AuditLog::append`].
    pub fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.counted(self.submit(event, Reply::Blocking(tx)))?;
        self.counted(rx.recv_timeout(self.limits.timeout).unwrap_or_else(|e| match e {
            mpsc::RecvTimeoutError::Timeout => Err(AuditError::TimedOut(self.limits.timeout)),
            mpsc::RecvTimeoutError::Disconnected => Err(AuditError::Stopped),
        }))
    }

    /// Writes one line, waiting for it without holding a thread, at most the timeout.
    pub async fn append(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.counted(self.submit(event, Reply::Async(tx)))?;
        self.counted(match tokio::time::timeout(self.limits.timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::TimedOut(self.limits.timeout)),
        })
    }

    /// Queues a line for the writer, or fails at once when the queue is full.
    fn submit(&self, event: &AuditEvent, reply: Reply) -> Result<(), AuditError> {
        // Everything that does not depend on the chain is done by the caller, so that the
        // writer does only the sequence number, the MAC, the hash and the write.
        let event = serde_json::to_string(&bounded(event)).map_err(AuditError::Encode)?;
        let fields = event.strip_prefix('{').and_then(|e| e.strip_suffix('}')).unwrap_or_default().to_owned();
        let deadline = Instant::now() + self.limits.timeout;
        // Counted before it is sent, so that the writer's decrement never comes first.
        self.waiting.inc();
        self.jobs.try_send(Job { fields, deadline, reply }).map_err(|e| {
            self.waiting.dec();
            match e {
                mpsc::TrySendError::Full(_) => AuditError::Busy(self.limits.queue),
                mpsc::TrySendError::Disconnected(_) => AuditError::Stopped,
            }
        })
    }
}

impl Writer {
    /// Appends the line of an event's `fields`: what `Line` serializes to (time, seq, the
    /// fields, prev), then its MAC. On failure the chain stays where it was.
    fn append(&mut self, fields: &str, mac_key: &KeyMaterial, sequence: &Gauge) -> Result<(), AuditError> {
        let time = jiff::Timestamp::now().to_string();
        let seq = self.seq + 1;
        let mut line = String::with_capacity(fields.len() + 256);
        line.push_str("{\"time\":\"");
        line.push_str(&time);
        line.push_str("\",\"seq\":");
        line.push_str(&seq.to_string());
        line.push(',');
        line.push_str(fields);
        line.push_str(",\"prev\":\"");
        line.push_str(&self.prev);
        line.push_str("\"}");
        let mac = mac_hex(mac_key, line.as_bytes());
        line.pop(); // the closing brace
        line.push_str(",\"mac\":\"");
        line.push_str(&mac);
        line.push_str("\"}\n");
        // After a write that failed part-way, a newline first ends what it left.
        let prefix = usize::from(self.cut);
        let bytes: std::borrow::Cow<'_, [u8]> =
            if self.cut { [b"\n", line.as_bytes()].concat().into() } else { line.as_bytes().into() };
        if let Err((e, landed)) = self.out.write_line(seq, &bytes) {
            // Once the newline has landed, only bytes of this line can be left over.
            if landed >= prefix {
                self.cut = landed > prefix;
            }
            return Err(AuditError::Write(e));
        }
        self.cut = false;
        line.pop(); // the newline: the chain hashes the line itself
        self.prev = sha256_hex(line.as_bytes());
        self.seq = seq;
        set_sequence(sequence, seq);
        Ok(())
    }
}

/// What `kubekms audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The records: the last one's sequence number.
    pub lines: u64,
    pub macs_checked: bool,
    /// The lines (numbered from 1) that a crash cut short in the middle of their write:
    /// they hold no record, and the record after each chains to the one before it.
    pub cut: Vec<u64>,
}

/// A break in the chain, by line number (from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("failed to read the audit log: {0}")]
    Read(String),
    #[error("line {0} is not an audit record")]
    Malformed(u64),
    #[error("line {0} does not follow line {prev}: a line was edited, removed or reordered", prev = .0 - 1)]
    Chain(u64),
    #[error("line {0} (sequence {1}) does not start the chain: lines before it were removed")]
    Start(u64, u64),
    #[error("line {0} has sequence number {1}, expected {2}: lines were removed or reordered")]
    Sequence(u64, u64, u64),
    #[error("line {0} fails its MAC: it was edited or forged")]
    Mac(u64),
    #[error("line {line} has sequence number {seq}: the records {from} to {} are missing: lines or files of the series were removed", .seq - 1)]
    Missing { line: u64, seq: u64, from: u64 },
}

/// What one input of a [`Chain`] held: its first and last record's sequence numbers (none
/// when it held no record) and its lines cut short by a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Part {
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub cut: Vec<u64>,
}

/// The check of one chain, fed its inputs in order: one file, or the files of a rotated
/// series, each beginning where the one before ended.
pub struct Chain {
    /// With the root key: the MAC keys of the primary and every previous root key (a log
    /// written across a root-key rotation holds lines of both).
    mac_keys: Option<Vec<KeyMaterial>>,
    /// The latest sequence number the chain may start at, when its beginning was rotated
    /// away; otherwise it starts at 1, after the genesis hash.
    from_seq: Option<u64>,
    /// The last record so far: its hash and sequence number.
    last: Option<(String, u64)>,
}

impl Chain {
    /// A chain that starts at sequence 1, its MACs checked when `root` is given.
    pub fn new(root: Option<&RootKey>) -> Chain {
        Chain { mac_keys: root.map(|r| r.derive_all(MAC_PURPOSE)), from_seq: None, last: None }
    }

    /// Lets the chain start at any sequence number up to `seq`: the lines before it were
    /// rotated away. Where it starts, nothing shows what came before.
    pub fn from_seq(mut self, seq: u64) -> Chain {
        self.from_seq = Some(seq);
        self
    }

    pub fn macs_checked(&self) -> bool {
        self.mac_keys.is_some()
    }

    /// The last record's sequence number so far (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.last.as_ref().map_or(0, |(_, seq)| *seq)
    }

    /// Checks the lines of `input`, which continue the chain so far. A line cut short by a
    /// crash ([`is_cut`]) is no break when the chain goes on across it; it is reported in
    /// [`Part::cut`]. The first record of an input that does not take up where the one
    /// before ended, by sequence, is reported as the records missing between them.
    pub fn read(&mut self, input: impl Read) -> Result<Part, VerifyError> {
        let mut part = Part::default();
        let mut n = 0u64;
        for line in BufReader::new(input).lines() {
            let line = line.map_err(|e| VerifyError::Read(e.to_string()))?;
            n += 1;
            if is_cut(&line) {
                part.cut.push(n);
                continue;
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|_| VerifyError::Malformed(n))?;
            let field = |k: &str| value.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
            let (Some(prev), Some(mac)) = (field("prev"), field("mac")) else {
                return Err(VerifyError::Malformed(n));
            };
            let seq =
                value.get("seq").and_then(serde_json::Value::as_u64).ok_or(VerifyError::Malformed(n))?;
            match &self.last {
                None if prev == GENESIS && seq != 1 => return Err(VerifyError::Sequence(n, seq, 1)),
                None if prev != GENESIS && !self.from_seq.is_some_and(|from| (1..=from).contains(&seq)) => {
                    return Err(VerifyError::Start(n, seq));
                }
                Some((_, last)) if part.first.is_none() && seq > last + 1 => {
                    return Err(VerifyError::Missing { line: n, seq, from: last + 1 });
                }
                Some((hash, _)) if *hash != prev => return Err(VerifyError::Chain(n)),
                Some((_, last)) if seq != last + 1 => return Err(VerifyError::Sequence(n, seq, last + 1)),
                _ => {}
            }
            if let Some(keys) = &self.mac_keys {
                let suffix = format!(",\"mac\":\"{mac}\"}}");
                let body = line.strip_suffix(&suffix).map(|b| format!("{b}}}")).ok_or(VerifyError::Mac(n))?;
                let matches = |key| {
                    let expected = mac_hex(key, body.as_bytes());
                    bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), mac.as_bytes()))
                };
                if !keys.iter().any(matches) {
                    return Err(VerifyError::Mac(n));
                }
            }
            part.first.get_or_insert(seq);
            part.last = Some(seq);
            self.last = Some((sha256_hex(line.as_bytes()), seq));
        }
        Ok(part)
    }
}

/// Verifies an audit log read from `input`, which must start the chain. With `root`, also
/// checks every line's MAC. A line cut short by a crash ([`is_cut`]) is no break when the
/// chain goes on across it; it is reported in [`Verified::cut`].
pub fn verify(input: impl Read, root: Option<&RootKey>) -> Result<Verified, VerifyError> {
    let mut chain = Chain::new(root);
    let part = chain.read(input)?;
    Ok(Verified { lines: chain.last_seq(), macs_checked: chain.macs_checked(), cut: part.cut })
}

/// Verifies the audit log file at `path` alone (the tests'; `kubekms audit verify` reads
/// the whole series, [`verify_series`]).
#[cfg(test)]
fn verify_file(path: &Path, root: Option<&RootKey>) -> Result<Verified, VerifyError> {
    let file =
        std::fs::File::open(path).map_err(|e| VerifyError::Read(format!("{}: {e}", path.display())))?;
    verify(file, root)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    pub(super) fn root() -> RootKey {
        RootKey::from_material(KeyMaterial::from_slice(&[3; 32]).unwrap())
    }

    pub(super) fn event(i: u32) -> AuditEvent {
        AuditEvent {
            component: "server",
            request_id: format!("req-{i}"),
            principal: "system:serviceaccount:apps:web".into(),
            operation: "Encrypt",
            key: Some("apps/k".into()),
            key_id: Some("6ece15cd-0195-4985-aff9-395763ad0a3b".into()),
            key_version: Some(i),
            encryption_context_keys: vec!["tenant".into()],
            result: "OK",
            ..Default::default()
        }
    }

    fn log_of(n: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &root()).unwrap();
        for i in 1..=n {
            log.record(&event(i)).unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    fn check(lines: &[String], root: Option<&RootKey>) -> Result<Verified, VerifyError> {
        verify(lines.join("\n").as_bytes(), root)
    }

    #[test]
    fn concurrent_callers_make_one_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &root()).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u32 {
                let log = &log;
                scope.spawn(move || {
                    for i in 0..75 {
                        log.record(&event(t * 1000 + i)).unwrap();
                    }
                });
            }
        });
        assert_eq!(verify_file(&path, Some(&root())).unwrap().lines, 300);
        let mut ids: Vec<String> = lines(&path)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["requestId"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 300, "every caller's line, once");
    }

    /// A sink whose next write fails when asked to.
    struct Flaky {
        fail_next: std::sync::Arc<std::sync::atomic::AtomicBool>,
        out: std::sync::Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.fail_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("disk full"));
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_fails_its_caller_and_the_chain_goes_on() {
        let fail_next = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = Flaky { fail_next: fail_next.clone(), out: out.clone() };
        let log = AuditLog::to_writer(Box::new(sink), &root());
        log.record(&event(1)).unwrap();
        fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(log.record(&event(2)), Err(AuditError::Write(_))), "fail closed");
        log.record(&event(3)).unwrap();
        let text = out.lock().unwrap().clone();
        assert_eq!(
            verify(text.as_slice(), Some(&root())).unwrap().lines,
            2,
            "the unwritten line left no gap"
        );
        assert!(!String::from_utf8_lossy(&text).contains("req-2"));
    }

    /// A sink whose writes fail once `budget` bytes have landed, as a disk that fills does.
    struct Filling {
        budget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        out: std::sync::Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = buf.len().min(self.budget.load(SeqCst));
            if n == 0 {
                return Err(std::io::Error::other("no space left on device"));
            }
            self.budget.fetch_sub(n, SeqCst);
            self.out.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_that_fails_part_way_leaves_a_cut_line_and_the_chain_goes_on() {
        use std::sync::atomic::Ordering::SeqCst;
        let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log =
            AuditLog::to_writer(Box::new(Filling { budget: budget.clone(), out: out.clone() }), &root());
        let fails = |e: u32| matches!(log.record(&event(e)), Err(AuditError::Write(_)));
        log.record(&event(1)).unwrap();
        // The disk fills 5 bytes into line 2; then, once, right after the newline that ends
        // it; then there is room again, until it fills 30 bytes into line 4.
        budget.store(5, SeqCst);
        assert!(fails(2), "fail closed");
        budget.store(1, SeqCst);
        assert!(fails(3));
        budget.store(usize::MAX, SeqCst);
        log.record(&event(4)).unwrap();
        budget.store(30, SeqCst);
        assert!(fails(5));
        budget.store(usize::MAX, SeqCst);
        log.record(&event(6)).unwrap();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let v = verify(text.as_bytes(), Some(&root())).unwrap();
        assert_eq!(v, Verified { lines: 3, macs_checked: true, cut: vec![2, 4] }, "{text}");
        assert_eq!(text.lines().count(), 5, "no empty line: {text}");
        assert!(!text.contains("req-3") && !text.contains("req-5") && text.contains("req-6"), "{text}");
    }

    #[tokio::test]
    async fn a_stalled_sink_fails_its_callers_within_the_timeout_and_the_chain_goes_on() {
        let sink = crate::testing::AuditSink::default();
        let limits = AuditLimits { timeout: Duration::from_millis(100), queue: 8 };
        let log = sink.log_with(&root(), limits);
        log.append(&event(1)).await.unwrap();
        sink.stall(true);
        let bound = Duration::from_secs(30);
        let stalled =
            tokio::time::timeout(bound, log.append(&event(2))).await.expect("returned before the bound");
        assert!(matches!(stalled, Err(AuditError::TimedOut(t)) if t == limits.timeout), "{stalled:?}");
        // The blocking form, for callers outside a request, gives up the same way.
        let blocking = {
            let log = log.clone();
            tokio::task::spawn_blocking(move || log.record(&event(3)))
        };
        let blocking =
            tokio::time::timeout(bound, blocking).await.expect("returned before the bound").unwrap();
        assert!(matches!(blocking, Err(AuditError::TimedOut(_))), "{blocking:?}");
        let timed_out = log.failed.get_or_create(&FailureLabels { reason: "timed_out" }).get();
        assert_eq!(timed_out, 2, "both callers counted");
        sink.stall(false);
        log.append(&event(4)).await.unwrap();
        // The chain goes on. Of the lines whose callers gave up, at most the one being
        // written when the sink stalled landed; one still waiting past its deadline is not
        // written.
        let text = sink.text();
        let lines = verify(text.as_bytes(), Some(&root())).unwrap().lines;
        assert!((2..=3).contains(&lines) && text.contains("req-1") && text.contains("req-4"), "{text}");
        assert!(!(text.contains("req-2") && text.contains("req-3")), "{text}");
    }

    #[tokio::test]
    async fn callers_past_the_queue_fail_at_once() {
        let sink = crate::testing::AuditSink::default();
        let log = sink.log_with(&root(), AuditLimits { timeout: Duration::from_secs(3600), queue: 2 });
        sink.stall(true);
        let held = tokio::spawn({
            let log = log.clone();
            async move { log.append(&event(1)).await }
        });
        sink.wait_until_held().await;
        // The writer is held in line 1: two lines may wait, the rest are refused at once.
        let events: Vec<AuditEvent> = (2..12).map(event).collect();
        let mut calls: Vec<_> = events.iter().map(|e| Box::pin(log.append(e))).collect();
        let first_polls: Vec<_> = calls.iter_mut().map(futures::FutureExt::now_or_never).collect();
        let refused = first_polls.iter().filter(|p| matches!(p, Some(Err(AuditError::Busy(2))))).count();
        let waiting = first_polls.iter().filter(|p| p.is_none()).count();
        assert_eq!((refused, waiting), (8, 2));
        let mut registry = prometheus_client::registry::Registry::default();
        log.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in ["kubekms_audit_queued 2", r#"kubekms_audit_failures_total{reason="queue_full"} 8"#] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        sink.stall(false);
        held.await.unwrap().unwrap();
        for (call, first) in calls.iter_mut().zip(first_polls) {
            if first.is_none() {
                call.await.unwrap();
            }
        }
        assert_eq!(verify(sink.text().as_bytes(), Some(&root())).unwrap().lines, 3);
        assert_eq!(log.waiting.get(), 0, "every queued line was taken");
    }

    #[test]
    fn the_sequence_gauge_follows_the_log_across_reopen() {
        let (_dir, path) = log_of(3);
        let log = AuditLog::open(&path, &root()).unwrap();
        assert_eq!(log.sequence.get(), 3, "continued from the file");
        log.record(&event(4)).unwrap();
        assert_eq!(log.sequence.get(), 4);
        let mut registry = prometheus_client::registry::Registry::default();
        log.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("kubekms_audit_sequence 4"), "{text}");
    }

    #[test]
    fn a_written_log_verifies_and_continues_across_reopen() {
        let (_dir, path) = log_of(3);
        let log = AuditLog::open(&path, &root()).unwrap();
        log.record(&event(4)).unwrap();
        let v = verify_file(&path, Some(&root())).unwrap();
        assert_eq!(v, Verified { lines: 4, macs_checked: true, cut: vec![] });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#""operation":"Encrypt""#) && text.contains(r#""seq":4"#));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_log_continued_across_a_root_key_rotation_verifies_with_the_previous_key_configured() {
        let (_dir, path) = log_of(3);
        let new = || RootKey::from_material(KeyMaterial::from_slice(&[4; 32]).unwrap());
        let ring = new().with_previous(root()).unwrap();
        let log = AuditLog::open(&path, &ring).unwrap();
        for i in 4..=6 {
            log.record(&event(i)).unwrap();
        }
        drop(log);
        let all = lines(&path);
        assert_eq!(check(&all, Some(&ring)).unwrap(), Verified { lines: 6, macs_checked: true, cut: vec![] });
        // Lines 4 to 6 are the new key's: the old key alone fails at line 4, the new key
        // alone at line 1; a forged line fails with both.
        assert_eq!(check(&all, Some(&root())), Err(VerifyError::Mac(4)));
        assert_eq!(check(&all, Some(&new())), Err(VerifyError::Mac(1)));
        let mut forged = all.clone();
        forged[4] = forged[4].replace("req-5", "req-X");
        assert!(check(&forged, Some(&ring)).is_err());
        // After removing the old key, only what the new one wrote verifies (from line 4).
        assert_eq!(check(&all[3..], Some(&new())), Err(VerifyError::Start(1, 4)));
    }

    #[test]
    fn edits_removals_and_reordering_are_detected() {
        let (_dir, path) = log_of(5);
        let good = lines(&path);
        let edited: Vec<String> = good
            .iter()
            .enumerate()
            .map(|(i, l)| if i == 1 { l.replace("req-2", "req-X") } else { l.clone() })
            .collect();
        assert_eq!(check(&edited, None), Err(VerifyError::Chain(3)));
        assert_eq!(check(&edited, Some(&root())), Err(VerifyError::Mac(2)));

        let mut removed = good.clone();
        removed.remove(2);
        assert_eq!(check(&removed, None), Err(VerifyError::Chain(3)));

        let mut reordered = good.clone();
        reordered.swap(1, 2);
        assert_eq!(check(&reordered, None), Err(VerifyError::Chain(2)));

        let head_removed = good[1..].to_vec();
        assert_eq!(check(&head_removed, None), Err(VerifyError::Start(1, 2)));

        // The last line has no successor: only its MAC gives it away.
        let mut last_edited = good.clone();
        last_edited[4] = last_edited[4].replace(r#""result":"OK""#, r#""result":"PermissionDenied""#);
        assert!(check(&last_edited, None).is_ok());
        assert_eq!(check(&last_edited, Some(&root())), Err(VerifyError::Mac(5)));

        let other = RootKey::from_material(KeyMaterial::from_slice(&[4; 32]).unwrap());
        assert_eq!(check(&good, Some(&other)), Err(VerifyError::Mac(1)));
        assert_eq!(check(&["not json".to_owned()], None), Err(VerifyError::Malformed(1)));
    }

    #[test]
    fn lines_are_laid_out_as_the_line_type_serializes() {
        let (_dir, path) = log_of(2);
        let second = lines(&path)[1].clone();
        let value: serde_json::Value = serde_json::from_str(&second).unwrap();
        let mac = value["mac"].as_str().unwrap();
        let body = second.strip_suffix(&format!(",\"mac\":\"{mac}\"}}")).unwrap().to_owned() + "}";
        let expected = serde_json::to_string(&Line {
            time: value["time"].as_str().unwrap().to_owned(),
            seq: 2,
            event: &bounded(&event(2)),
            prev: value["prev"].as_str().unwrap(),
        })
        .unwrap();
        assert_eq!(body, expected);
    }

    #[test]
    fn huge_requests_cannot_break_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &root()).unwrap();
        log.record(&event(1)).unwrap();
        let mut huge = event(2);
        huge.reason = Some("x".repeat(4 << 20));
        huge.encryption_context_keys = (0..10_000).map(|i| format!("{i}{}", "k".repeat(500))).collect();
        log.record(&huge).unwrap();
        drop(log);
        let longest = std::fs::read_to_string(&path).unwrap().lines().map(str::len).max().unwrap();
        assert!(longest < 16 * 1024, "a line of {longest} bytes");
        // Reopened (a restart), the chain continues.
        AuditLog::open(&path, &root()).unwrap().record(&event(3)).unwrap();
        assert_eq!(verify_file(&path, Some(&root())).unwrap().lines, 3);
    }

    /// Cuts the file's last line short, as a crash in the middle of its write would.
    fn cut_last_line(path: &Path) {
        let mut text = std::fs::read(path).unwrap();
        text.truncate(text.len() - 20);
        std::fs::write(path, &text).unwrap();
    }

    #[test]
    fn a_cut_last_line_is_reported_not_a_break() {
        let (_dir, path) = log_of(3);
        cut_last_line(&path);
        let v = verify_file(&path, Some(&root())).unwrap();
        assert_eq!(v, Verified { lines: 2, macs_checked: true, cut: vec![3] });
    }

    #[test]
    fn a_line_cut_by_a_crash_is_visible_and_the_log_goes_on() {
        let (_dir, path) = log_of(2);
        cut_last_line(&path);
        AuditLog::open(&path, &root()).unwrap().record(&event(3)).unwrap();
        let lines = lines(&path);
        assert_eq!(lines.len(), 3, "the cut line, then a new one");
        // The new record takes the cut one's place in the chain: sequence 2, after line 1.
        let v = verify_file(&path, Some(&root())).unwrap();
        assert_eq!(v, Verified { lines: 2, macs_checked: true, cut: vec![2] });
        let third: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!((third["seq"].as_u64(), third["requestId"].as_str()), (Some(2), Some("req-3")));
    }

    #[test]
    fn a_crash_right_after_a_restart_that_ended_a_cut_line_keeps_the_chain() {
        let (_dir, path) = log_of(2);
        cut_last_line(&path);
        // Opened (the cut line is ended with a newline), then killed before any record.
        drop(AuditLog::open(&path, &root()).unwrap());
        assert!(std::fs::read_to_string(&path).unwrap().ends_with('\n'));
        let log = AuditLog::open(&path, &root()).unwrap();
        log.record(&event(3)).unwrap();
        log.record(&event(4)).unwrap();
        let v = verify_file(&path, Some(&root())).unwrap();
        assert_eq!(v, Verified { lines: 3, macs_checked: true, cut: vec![2] });
    }

    #[test]
    fn a_cut_line_hides_no_record() {
        let (_dir, path) = log_of(4);
        let good = lines(&path);
        // A whole record shortened to look cut: the next line names the removed record.
        let mut shortened = good.clone();
        shortened[1].truncate(40);
        assert_eq!(check(&shortened, None), Err(VerifyError::Chain(3)));
        // A line that is no beginning of a record is no cut line.
        let mut garbage = good.clone();
        garbage.insert(2, "garbage".into());
        assert_eq!(check(&garbage, None), Err(VerifyError::Malformed(3)));
        // A cut line inserted between two records changes nothing else: reported.
        let mut inserted = good.clone();
        inserted.insert(2, good[2][..30].to_owned());
        assert_eq!(check(&inserted, Some(&root())).map(|v| v.cut), Ok(vec![3]));
        // A whole record moved after the cut line is still a reordering.
        let mut moved = good;
        let line = moved.remove(1);
        moved.insert(2, line);
        assert_eq!(check(&moved, None), Err(VerifyError::Chain(2)));
    }

    #[test]
    fn lines_hold_no_secrets_by_construction() {
        // The record type has no field for plaintext, keys or tokens; context values are
        // not recorded, only keys.
        let (_dir, path) = log_of(1);
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(r#""encryptionContextKeys":["tenant"]"#));
    }
}
