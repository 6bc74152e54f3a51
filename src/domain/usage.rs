//! When a key's versions were last used, as its reporters (KMS plugins, key API servers)
//! recorded it: what the controller reads to decide whether a deletion needs `force`,
//! whether to postpone a destruction, and when kube-apiserver writes under a new version.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

/// What kind of reporter an entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReporterKind {
    /// A KMS v2 plugin serving kube-apiserver.
    StoragePlugin,
    /// A key API server.
    KeyApi,
}

/// One kind of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UseKind {
    Encrypt,
    Decrypt,
    /// A use refused because the key was pending deletion or the version pending
    /// destruction.
    Refused,
}

/// The periods in which one version was last used, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionUse {
    /// Start of the period of the last encryption.
    pub last_encrypt: Option<Timestamp>,
    pub last_decrypt: Option<Timestamp>,
    pub last_refused: Option<Timestamp>,
}

impl VersionUse {
    pub fn last(&self, kind: UseKind) -> Option<Timestamp> {
        match kind {
            UseKind::Encrypt => self.last_encrypt,
            UseKind::Decrypt => self.last_decrypt,
            UseKind::Refused => self.last_refused,
        }
    }
}

/// What one reporter recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReporterUse {
    pub name: String,
    pub kind: ReporterKind,
    /// The length of its periods: a use recorded at `t` happened in `[t, t + granularity)`.
    pub granularity: SignedDuration,
    pub versions: BTreeMap<u32, VersionUse>,
}

/// Every reporter's record of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub reporters: Vec<ReporterUse>,
}

impl Usage {
    /// The latest moment a use of `kind` of `version` may have happened, over the reporters
    /// of the kinds `from` (the end of the last recorded period).
    pub fn last_use(&self, version: u32, kind: UseKind, from: &[ReporterKind]) -> Option<Timestamp> {
        self.reporters
            .iter()
            .filter(|r| from.contains(&r.kind))
            .filter_map(|r| {
                let start = r.versions.get(&version)?.last(kind)?;
                Some(start.saturating_add(r.granularity).unwrap_or(Timestamp::MAX))
            })
            .max()
    }

    /// The latest moment any version may have been used as `kind`, by any reporter.
    pub fn last_use_of_any(&self, kind: UseKind) -> Option<Timestamp> {
        let versions: std::collections::BTreeSet<u32> =
            self.reporters.iter().flat_map(|r| r.versions.keys().copied()).collect();
        let all = [ReporterKind::StoragePlugin, ReporterKind::KeyApi];
        versions.into_iter().filter_map(|v| self.last_use(v, kind, &all)).max()
    }

    /// Whether a KMS plugin serves this key to kube-apiserver (its data is stored under it).
    pub fn is_storage_key(&self) -> bool {
        self.reporters.iter().any(|r| r.kind == ReporterKind::StoragePlugin)
    }

    /// Whether every KMS plugin that reported has encrypted a DEK seed under `version`:
    /// kube-apiserver writes under it (it re-seeds when Status shows a new key id).
    pub fn storage_encrypts_under(&self, version: u32) -> bool {
        let mut plugins = self.reporters.iter().filter(|r| r.kind == ReporterKind::StoragePlugin).peekable();
        plugins.peek().is_some()
            && plugins.all(|r| r.versions.get(&version).is_some_and(|u| u.last_encrypt.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn reporter(name: &str, kind: ReporterKind, uses: &[(u32, VersionUse)]) -> ReporterUse {
        ReporterUse {
            name: name.into(),
            kind,
            granularity: SignedDuration::from_secs(100),
            versions: uses.iter().cloned().collect(),
        }
    }

    #[test]
    fn the_last_use_is_the_end_of_the_latest_period_of_the_reporters_asked() {
        let usage = Usage {
            reporters: vec![
                reporter(
                    "plugin/a",
                    ReporterKind::StoragePlugin,
                    &[(1, VersionUse { last_decrypt: Some(at(1000)), ..Default::default() })],
                ),
                reporter(
                    "server/b",
                    ReporterKind::KeyApi,
                    &[(1, VersionUse { last_decrypt: Some(at(500)), ..Default::default() })],
                ),
            ],
        };
        assert_eq!(usage.last_use(1, UseKind::Decrypt, &[ReporterKind::KeyApi]), Some(at(600)));
        assert_eq!(
            usage.last_use(1, UseKind::Decrypt, &[ReporterKind::KeyApi, ReporterKind::StoragePlugin]),
            Some(at(1100))
        );
        assert_eq!(usage.last_use(2, UseKind::Decrypt, &[ReporterKind::KeyApi]), None);
        assert_eq!(usage.last_use(1, UseKind::Refused, &[ReporterKind::KeyApi]), None);
        assert_eq!(usage.last_use_of_any(UseKind::Decrypt), Some(at(1100)));
    }

    #[test]
    fn storage_writes_under_a_version_once_every_plugin_encrypted_under_it() {
        let enc = |v| (v, VersionUse { last_encrypt: Some(at(0)), ..Default::default() });
        let mut usage =
            Usage { reporters: vec![reporter("plugin/a", ReporterKind::StoragePlugin, &[enc(1), enc(2)])] };
        assert!(usage.is_storage_key());
        assert!(usage.storage_encrypts_under(2));
        usage.reporters.push(reporter("plugin/b", ReporterKind::StoragePlugin, &[enc(1)]));
        assert!(!usage.storage_encrypts_under(2), "the second kube-apiserver still writes under 1");
        let api_only = Usage { reporters: vec![reporter("server/x", ReporterKind::KeyApi, &[enc(2)])] };
        assert!(!api_only.is_storage_key());
        assert!(!api_only.storage_encrypts_under(2));
    }
}
