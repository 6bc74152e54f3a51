//! An audit log file that rotates: past [`Rotation::max_size`] bytes the current file is
//! renamed `<file>.<N>`, N the sequence number of its first record, and a new current file
//! begins; the oldest rotated files beyond [`Rotation::max_files`] are removed. The chain
//! goes on across the files — the first line of a new file chains to the last of the one
//! before — so [`verify_series`] checks the series as one log and names the records that a
//! removed file held.
//!
//! A rotation is one rename, so a crash leaves the series whole at any moment: before the
//! rename the current file holds everything; after it the current file is missing or empty
//! and the process that reopens the log continues the chain from the newest rotated file.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{Chain, MAX_LINE, Part, VerifyError, is_cut, tail};
use crate::crypto::RootKey;

/// When the audit log file rotates, and how many rotated files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The most bytes the current file grows to before the line that would pass it goes to
    /// a new file (a file always takes at least one record). 0: never rotate.
    pub max_size: u64,
    /// How many rotated files are kept; the oldest beyond it are removed. 0: keep them all.
    pub max_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation { max_size: 100 << 20, max_files: 10 }
    }
}

/// The file a rotated file of the series at `path` is named, `first` the sequence number
/// of its first record.
fn rotated_name(path: &Path, first: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{first}"));
    PathBuf::from(name)
}

/// The rotated files of the series whose current file is `path`, oldest first, each with
/// the sequence number its name gives: the files named `<file>.<digits>` beside it.
pub fn rotated(path: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!("{name}.");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(digits) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(first) = digits.parse::<u64>() {
            files.push((first, path.with_file_name(&file_name)));
        }
    }
    files.sort();
    Ok(files)
}

/// The sequence number of the first record in the file at `path`, if it holds one (lines
/// cut short by a crash hold none).
fn first_record(path: &Path) -> std::io::Result<Option<u64>> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut line = Vec::new();
    loop {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        if text.is_empty() || is_cut(text) {
            continue;
        }
        let value = serde_json::from_str::<serde_json::Value>(text).ok();
        return Ok(value.and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64)));
    }
}

/// The size of the current file and its rotations, for `/metrics`.
#[derive(Clone, Default)]
pub(super) struct FileMetrics {
    bytes: Gauge,
    rotations: Family<RotationLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    /// `ok` or `failed`.
    result: &'static str,
}

impl FileMetrics {
    pub(super) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "kubekms_audit_file_bytes",
            "Bytes in the current audit log file (it rotates past --audit-log-max-size; 0 for standard output)",
            self.bytes.clone(),
        );
        registry.register(
            "kubekms_audit_rotations",
            "Rotations of the audit log file, by result (a failed one leaves the lines in the current file)",
            self.rotations.clone(),
        );
    }

    fn rotated(&self, result: &'static str) {
        self.rotations.get_or_create(&RotationLabels { result }).inc();
    }
}

/// Opens `path` for appending, creating it with mode 0600.
fn append_to(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// The current file of a series, written by the audit writer alone.
pub(super) struct FileSink {
    path: PathBuf,
    file: File,
    rotation: Rotation,
    /// Bytes in the file `file` writes to.
    size: u64,
    /// The sequence number of the first record in that file, once it holds one.
    first: Option<u64>,
    /// Whether `file` was renamed away and a new current file could not be created yet:
    /// lines go on into the renamed file until one can.
    detached: bool,
    /// Whether the last rotation failed (logged once until one succeeds).
    failing: bool,
    metrics: FileMetrics,
}

impl FileSink {
    /// Opens the series' current file at `path` for appending, and finds where the chain
    /// stands: the last record of the current file or, when it holds none, of the newest
    /// rotated file that does.
    pub(super) fn open(
        path: &Path,
        rotation: Rotation,
        metrics: FileMetrics,
    ) -> std::io::Result<(FileSink, Option<(String, u64)>)> {
        let current = tail(path)?;
        let mut last = current.last.clone();
        if last.is_none() {
            for (_, older) in rotated(path)?.iter().rev() {
                last = tail(older)?.last;
                if last.is_some() {
                    break;
                }
            }
        }
        let mut file = append_to(path)?;
        if !current.ends_with_newline {
            // A crash cut the last line short: end it, so the next line starts on its own.
            // The chain goes on from the record before it; the cut line stays visible to
            // `kubekms audit verify`, which reports it.
            file.write_all(b"\n")?;
        }
        let size = file.metadata()?.len();
        // A first line that is no record (a corrupt file) leaves the file named by its
        // last record, which still sorts it before every later one.
        let first = first_record(path)?.or(current.last.as_ref().map(|(_, seq)| *seq));
        metrics.bytes.set(i64::try_from(size).unwrap_or(i64::MAX));
        let sink = FileSink {
            path: path.to_owned(),
            file,
            rotation,
            size,
            first,
            detached: false,
            failing: false,
            metrics,
        };
        Ok((sink, last))
    }

    /// Writes the bytes of record `seq`, first rotating the file if they would take it past
    /// its bound. A rotation that fails is logged and counted, and the line goes into the
    /// current file all the same: the audit trail is never refused for its size. On
    /// failure, also says how many of the bytes landed.
    pub(super) fn write_line(&mut self, seq: u64, line: &[u8]) -> Result<(), (std::io::Error, usize)> {
        let len = line.len() as u64;
        let max = self.rotation.max_size;
        if max > 0 && (self.detached || (self.first.is_some() && self.size + len > max)) {
            match self.rotate() {
                Ok(()) => {
                    self.metrics.rotated("ok");
                    self.failing = false;
                }
                Err(e) => {
                    self.metrics.rotated("failed");
                    if !self.failing {
                        tracing::error!(file = %self.path.display(), error = %e, "failed to rotate the audit log; it grows past --audit-log-max-size until a rotation succeeds");
                    }
                    self.failing = true;
                }
            }
        }
        // A newline that would end a line cut by a failed write is not wanted at the start
        // of a file (the cut line stays, unended, at the end of the file rotated away): it
        // would make an empty line. It counts as landed.
        let (line, skipped) = match line.split_first() {
            Some((b'\n', rest)) if self.size == 0 => (rest, 1),
            _ => (line, 0),
        };
        let written = super::write_whole(&mut self.file, line);
        self.size = match &written {
            Ok(()) => self.size + line.len() as u64,
            Err((_, landed)) => self.size + *landed as u64,
        };
        if written.is_ok() {
            self.first.get_or_insert(seq);
        }
        self.metrics.bytes.set(i64::try_from(self.size).unwrap_or(i64::MAX));
        written.map_err(|(e, landed)| (e, landed + skipped))
    }

    /// Renames the current file after its first record and begins a new one, then removes
    /// the oldest rotated files beyond the bound.
    fn rotate(&mut self) -> std::io::Result<()> {
        if !self.detached {
            let Some(first) = self.first else { return Ok(()) };
            let target = rotated_name(&self.path, first);
            if target.symlink_metadata().is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} already exists", target.display()),
                ));
            }
            self.file.sync_all()?;
            std::fs::rename(&self.path, &target)?;
            self.detached = true;
        }
        self.file = append_to(&self.path)?;
        self.detached = false;
        self.size = 0;
        self.first = None;
        if self.rotation.max_files > 0 {
            let files = rotated(&self.path)?;
            let excess = files.len().saturating_sub(self.rotation.max_files);
            for (_, old) in &files[..excess] {
                if let Err(e) = std::fs::remove_file(old) {
                    tracing::warn!(file = %old.display(), error = %e, "failed to remove a rotated audit log file");
                }
            }
        }
        Ok(())
    }
}

/// What [`verify_series`] found: each file with what it held, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesVerified {
    pub files: Vec<(PathBuf, Part)>,
    pub macs_checked: bool,
}

impl SeriesVerified {
    /// The first and last records' sequence numbers, if any file held one.
    pub fn range(&self) -> Option<(u64, u64)> {
        let first = self.files.iter().find_map(|(_, p)| p.first)?;
        let last = self.files.iter().rev().find_map(|(_, p)| p.last)?;
        Some((first, last))
    }
}

/// A break in a series, in the file named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {error}", path.display())]
pub struct SeriesError {
    pub path: PathBuf,
    pub error: VerifyError,
}

/// Verifies the series whose current file is `path` as one chain: its rotated files
/// (`<file>.<N>`, [`rotated`]) oldest first, then `path` itself — which may be missing
/// while rotated files exist (a crash between a rotation and the next line). With
/// `from_seq`, the series may begin at any sequence number up to it (the files before were
/// removed by `--audit-log-max-files`); without it, it must begin at 1.
pub fn verify_series(
    path: &Path,
    root: Option<&RootKey>,
    from_seq: Option<u64>,
) -> Result<SeriesVerified, SeriesError> {
    let failed = |p: &Path, e: std::io::Error| SeriesError {
        path: p.to_owned(),
        error: VerifyError::Read(format!("{}: {e}", p.display())),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> =
        rotated(path).map_err(|e| failed(dir, e))?.into_iter().map(|(_, p)| p).collect();
    if files.is_empty() || path.symlink_metadata().is_ok() {
        files.push(path.to_owned());
    }
    let mut chain = Chain::new(root);
    if let Some(seq) = from_seq {
        chain = chain.from_seq(seq);
    }
    let mut parts = Vec::with_capacity(files.len());
    for file in files {
        let input = File::open(&file).map_err(|e| failed(&file, e))?;
        let part = chain.read(input).map_err(|error| SeriesError { path: file.clone(), error })?;
        parts.push((file, part));
    }
    Ok(SeriesVerified { files: parts, macs_checked: chain.macs_checked() })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{event, root};
    use super::super::{AuditLimits, AuditLog, verify_file};
    use super::*;

    fn rotating(path: &Path, max_size: u64, max_files: usize) -> AuditLog {
        AuditLog::open_with(path, &root(), AuditLimits::default(), Rotation { max_size, max_files }).unwrap()
    }

    /// The records of [`event`] 1 to `n` in `audit.log` of a new directory, `per_file` to a
    /// file, `max_files` rotated files kept; and the log, to go on.
    fn series_of(n: u32, per_file: u64, max_files: usize) -> (tempfile::TempDir, PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = rotating(&path, fits(per_file), max_files);
        for i in 1..=n {
            log.record(&event(i)).unwrap();
        }
        (dir, path, log)
    }

    /// The names of the files in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    /// A bound that `n` lines of [`event`] hold and `n + 1` pass: lines differ by a few
    /// bytes (the time's digits, the event's number), far less than half a line.
    fn fits(n: u64) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.log");
        AuditLog::open(&path, &root()).unwrap().record(&event(1)).unwrap();
        let line = std::fs::metadata(&path).unwrap().len();
        n * line + line / 2
    }

    #[test]
    fn a_file_rotates_before_the_line_that_would_pass_its_bound_and_the_chain_goes_on() {
        let (dir, path, log) = series_of(10, 3, 0);
        assert_eq!(names(dir.path()), ["audit.log", "audit.log.1", "audit.log.4", "audit.log.7"]);
        for name in ["audit.log.1", "audit.log.4", "audit.log.7"] {
            let size = std::fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(size <= fits(3), "{name}: {size} bytes");
        }
        let series = verify_series(&path, Some(&root()), None).unwrap();
        let ranges: Vec<_> = series.files.iter().map(|(_, p)| (p.first, p.last)).collect();
        let expected = [(1, 3), (4, 6), (7, 9), (10, 10)].map(|(a, b)| (Some(a), Some(b)));
        assert_eq!(ranges, expected);
        assert_eq!(series.range(), Some((1, 10)));
        // Alone, the current file does not start the chain.
        assert_eq!(verify_file(&path, Some(&root())), Err(VerifyError::Start(1, 10)));
        let mut registry = prometheus_client::registry::Registry::default();
        log.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let bytes = std::fs::metadata(&path).unwrap().len();
        for line in [
            format!("kubekms_audit_file_bytes {bytes}"),
            r#"kubekms_audit_rotations_total{result="ok"} 3"#.into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn the_oldest_files_beyond_the_bound_are_removed_and_the_rest_verifies_from_where_it_starts() {
        let (dir, path, _log) = series_of(9, 2, 2);
        assert_eq!(names(dir.path()), ["audit.log", "audit.log.5", "audit.log.7"]);
        let err = verify_series(&path, Some(&root()), None).unwrap_err();
        assert_eq!(
            err,
            SeriesError { path: dir.path().join("audit.log.5"), error: VerifyError::Start(1, 5) }
        );
        for from in [5, 6, 100] {
            let series = verify_series(&path, Some(&root()), Some(from)).unwrap();
            assert_eq!(series.range(), Some((5, 9)), "--from-seq {from}");
        }
        // Not before what the operator says is kept.
        let err = verify_series(&path, Some(&root()), Some(4)).unwrap_err();
        assert_eq!(err.error, VerifyError::Start(1, 5));
    }

    #[test]
    fn a_removed_middle_file_is_named_by_the_records_it_held() {
        let (dir, path, log) = series_of(7, 2, 0);
        drop(log);
        std::fs::remove_file(dir.path().join("audit.log.3")).unwrap();
        let err = verify_series(&path, None, None).unwrap_err();
        assert_eq!(err.path, dir.path().join("audit.log.5"));
        assert_eq!(err.error, VerifyError::Missing { line: 1, seq: 5, from: 3 });
        assert!(err.to_string().ends_with("line 1 has sequence number 5: the records 3 to 4 are missing: lines or files of the series were removed"), "{err}");
        // The newest rotated file removed: the current file shows it.
        let (dir, path, _log) = series_of(5, 2, 0);
        std::fs::remove_file(dir.path().join("audit.log.3")).unwrap();
        let err = verify_series(&path, None, None).unwrap_err();
        assert_eq!((err.path, err.error), (path, VerifyError::Missing { line: 1, seq: 5, from: 3 }));
    }

    #[test]
    fn an_edited_rotated_file_breaks_the_chain_at_the_next_file() {
        let (dir, path, _log) = series_of(6, 2, 0);
        let middle = dir.path().join("audit.log.3");
        let text = std::fs::read_to_string(&middle).unwrap();
        std::fs::write(&middle, text.replace("req-4", "req-X")).unwrap();
        let err = verify_series(&path, None, None).unwrap_err();
        assert_eq!((err.path, err.error), (path.clone(), VerifyError::Chain(1)));
        assert_eq!(verify_series(&path, Some(&root()), None).unwrap_err().error, VerifyError::Mac(2));
    }

    #[test]
    fn a_crash_after_the_rename_continues_the_chain_from_the_rotated_file() {
        let (dir, path, log) = series_of(4, 2, 0);
        drop(log);
        // As if killed between the rename and the next line: no current file.
        std::fs::rename(&path, dir.path().join("audit.log.3")).unwrap();
        let series = verify_series(&path, Some(&root()), None).unwrap();
        assert_eq!(series.range(), Some((1, 4)), "a missing current file is no break");
        let log = rotating(&path, fits(2), 0);
        assert_eq!(log.sequence.get(), 4, "continued from audit.log.3");
        log.record(&event(5)).unwrap();
        drop(log);
        // And an empty current file, as a crash right after creating it leaves.
        std::fs::rename(&path, dir.path().join("audit.log.5")).unwrap();
        std::fs::write(&path, "").unwrap();
        let log = rotating(&path, fits(2), 0);
        log.record(&event(6)).unwrap();
        drop(log);
        assert_eq!(names(dir.path()), ["audit.log", "audit.log.1", "audit.log.3", "audit.log.5"]);
        assert_eq!(verify_series(&path, Some(&root()), None).unwrap().range(), Some((1, 6)));
    }

    #[test]
    fn a_line_cut_at_the_end_of_a_file_is_reported_in_that_file_and_rotation_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = rotating(&path, fits(3), 0);
        log.record(&event(1)).unwrap();
        log.record(&event(2)).unwrap();
        drop(log);
        let mut text = std::fs::read(&path).unwrap();
        text.truncate(text.len() - 20);
        std::fs::write(&path, &text).unwrap();
        let log = rotating(&path, fits(3), 0);
        for i in 3..=6 {
            log.record(&event(i)).unwrap();
        }
        let series = verify_series(&path, Some(&root()), None).unwrap();
        let parts: Vec<_> =
            series.files.iter().map(|(p, part)| (p.file_name().unwrap().to_owned(), part.clone())).collect();
        assert_eq!(parts[0].0, "audit.log.1");
        assert_eq!(parts[0].1, Part { first: Some(1), last: Some(2), cut: vec![2] });
        assert_eq!(series.range(), Some((1, 5)));
    }

    #[test]
    fn rotation_under_concurrent_callers_loses_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = rotating(&path, 4096, 0);
        std::thread::scope(|scope| {
            for t in 0..8u32 {
                let log = &log;
                scope.spawn(move || {
                    for i in 0..250 {
                        log.record(&event(t * 1000 + i)).unwrap();
                    }
                });
            }
        });
        let series = verify_series(&path, Some(&root()), None).unwrap();
        assert_eq!(series.range(), Some((1, 2000)));
        assert!(series.files.len() > 50, "{} files", series.files.len());
        let mut ids = std::collections::BTreeSet::new();
        for (file, _) in &series.files {
            assert!(std::fs::metadata(file).unwrap().len() <= 4096, "{}", file.display());
            for line in std::fs::read_to_string(file).unwrap().lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                assert!(ids.insert(value["requestId"].as_str().unwrap().to_owned()), "a line twice");
            }
        }
        assert_eq!(ids.len(), 2000, "every caller's line, once");
    }

    #[test]
    fn a_rotation_that_fails_leaves_the_lines_in_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = rotating(&path, fits(2), 0);
        log.record(&event(1)).unwrap();
        log.record(&event(2)).unwrap();
        // The name the rotation would take is held by something else.
        std::fs::create_dir(dir.path().join("audit.log.1")).unwrap();
        log.record(&event(3)).unwrap();
        log.record(&event(4)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4);
        let mut registry = prometheus_client::registry::Registry::default();
        log.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"kubekms_audit_rotations_total{result="failed"} 2"#), "{text}");
        // Once the name is free, the next line rotates.
        std::fs::remove_dir(dir.path().join("audit.log.1")).unwrap();
        log.record(&event(5)).unwrap();
        assert_eq!(names(dir.path()), ["audit.log", "audit.log.1"]);
        assert_eq!(verify_series(&path, Some(&root()), None).unwrap().range(), Some((1, 5)));
    }

    #[test]
    fn a_new_file_does_not_begin_with_the_newline_that_ends_a_cut_line() {
        // The writer ends a line that a failed write cut short with a newline before its
        // next line; when that line goes to a new file, the cut line is at the end of the
        // file rotated away, and the new file starts with the line itself.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (mut sink, _) = FileSink::open(&path, Rotation::default(), FileMetrics::default()).unwrap();
        sink.write_line(1, b"\n{\"seq\":1}\n").unwrap();
        sink.write_line(2, b"\n{\"seq\":2}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"seq\":1}\n\n{\"seq\":2}\n");
        assert_eq!(sink.size, std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn only_names_of_the_series_count_as_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "audit.log",
            "audit.log.12",
            "audit.log.3",
            "audit.log.x",
            "audit.log.",
            "audit.log.1.gz",
            "other.log.4",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let found: Vec<u64> =
            rotated(&dir.path().join("audit.log")).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(found, [3, 12], "ordered by number, not by name");
    }
}
