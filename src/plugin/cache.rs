//! The plugin's local cache of the wrapped material it serves, so that it starts, reports
//! its last known key id and decrypts every cached version while the API server is down
//! (kube-apiserver needs the plugin to start, and the plugin would otherwise need
//! kube-apiserver: no cycle).
//!
//! The file holds only wrapped material — never plaintext — and is authenticated with an
//! HMAC under a key derived from the root key, so an edited cache (a changed state or
//! current version) is refused. It is replaced atomically: written to a temporary file,
//! synced, renamed over the old one, and the directory synced.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::api::KeyState;
use crate::api::MAX_VERSIONS;
use crate::crypto::{KeyMaterial, RootKey};
use crate::domain::{KeyInfo, VersionRefusal, WrappedMaterial};

const HEADER: &str = "kubekms-plugin-cache v1";
const MAC_PURPOSE: &[u8] = b"kubekms/v1 plugin-cache mac";
const FILE_NAME: &str = "key-cache-v1";
/// The largest cache file read (1000 versions of ~120 bytes each, with room to spare).
pub const MAX_CACHE_LEN: usize = 1024 * 1024;

/// What the cache remembers of the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CachedKey {
    pub namespace: String,
    pub name: String,
    pub key_id: String,
    /// The KmsKey's UID, when it differs from the keyId (a key restored from a backup);
    /// left out otherwise, so caches stay readable by plugins that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub state: KeyState,
    pub current_version: Option<u32>,
    /// Versions that refuse to decrypt, and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused_versions: BTreeMap<u32, VersionRefusal>,
    pub root_key_fingerprint: String,
    pub versions: Vec<CachedVersion>,
    /// When the key's imported material expires: the plugin refuses it from then on, also
    /// when it starts from the cache. Left out when it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<jiff::Timestamp>,
}

impl CachedKey {
    /// What the cache remembers of a key and its material (none when destroyed).
    pub fn new(info: &KeyInfo, material: Option<&WrappedMaterial>) -> Self {
        let (root_key_fingerprint, versions) = match material.filter(|m| !m.destroyed) {
            Some(m) => (
                m.root_key_fingerprint.clone(),
                m.versions
                    .iter()
                    .map(|(version, wrapped)| CachedVersion {
                        version: *version,
                        wrapped: wrapped.clone(),
                        root_key_fingerprint: m.version_roots.get(version).cloned(),
                    })
                    .collect(),
            ),
            None => (String::new(), Vec::new()),
        };
        CachedKey {
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            key_id: info.key_id.clone(),
            uid: (info.uid != info.key_id).then(|| info.uid.clone()),
            state: info.state,
            current_version: info.current_version,
            refused_versions: info.refused_versions.clone(),
            root_key_fingerprint,
            versions,
            valid_to: info.valid_to,
        }
    }

    /// The key as the cache remembers it.
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            key_id: self.key_id.clone(),
            uid: self.uid().to_owned(),
            state: self.state,
            current_version: self.current_version,
            refused_versions: self.refused_versions.clone(),
            valid_to: self.valid_to,
        }
    }

    /// The KmsKey's UID.
    fn uid(&self) -> &str {
        self.uid.as_deref().unwrap_or(&self.key_id)
    }

    /// The cached versions, as stored.
    pub fn material(&self) -> WrappedMaterial {
        WrappedMaterial {
            key_id: self.key_id.clone(),
            uid: self.uid().to_owned(),
            root_key_fingerprint: self.root_key_fingerprint.clone(),
            destroyed: false,
            deletion_time: None,
            versions: self.versions.iter().map(|v| (v.version, v.wrapped.clone())).collect(),
            version_roots: self
                .versions
                .iter()
                .filter_map(|v| Some((v.version, v.root_key_fingerprint.clone()?)))
                .collect(),
            ..Default::default()
        }
    }
}

/// One wrapped version (base64 of the root-key wrapping, as in KmsKeyMaterial).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CachedVersion {
    pub version: u32,
    pub wrapped: String,
    /// The root key that wraps it, when not the key's `rootKeyFingerprint`; left out
    /// otherwise, so caches stay readable by plugins that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key_fingerprint: Option<String>,
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("failed to read the cache {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("failed to write the cache {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("the cache file is larger than {MAX_CACHE_LEN} bytes")]
    TooLarge,
    #[error("the cache file is not a kubekms plugin cache")]
    Format,
    #[error("the cache file fails its MAC: it was altered, or written under another root key")]
    Mac,
    #[error("the cache file is inconsistent: {0}")]
    Invalid(&'static str),
    #[error("failed to encode the cache")]
    Encode(#[source] serde_json::Error),
}

fn mac(key: &KeyMaterial, body: &[u8]) -> Option<Hmac<Sha256>> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).ok()?;
    m.update(body);
    Some(m)
}

/// The cache's MAC key for a root key: the primary's, which writes the cache.
pub fn mac_key(root: &RootKey) -> KeyMaterial {
    root.derive(MAC_PURPOSE)
}

/// The cache's MAC keys for a root key: the primary's, then each
/// previous root key's, which still read a cache written before a root-key rotation.
pub fn mac_keys(root: &RootKey) -> Vec<KeyMaterial> {
    root.derive_all(MAC_PURPOSE)
}

/// Serializes and authenticates.
pub fn encode(cache: &CachedKey, key: &KeyMaterial) -> Result<Vec<u8>, CacheError> {
    let body = serde_json::to_string(cache).map_err(CacheError::Encode)?;
    let tag = mac(key, body.as_bytes()).ok_or(CacheError::Mac)?.finalize().into_bytes();
    Ok(format!("{HEADER}\n{body}\n{}\n", crate::crypto::hex(&tag)).into_bytes())
}

/// Authenticates and parses. Untrusted input: the MAC is checked before the JSON is
/// parsed, and every field is checked after.
pub fn decode(bytes: &[u8], key: &KeyMaterial) -> Result<CachedKey, CacheError> {
    if bytes.len() > MAX_CACHE_LEN {
        return Err(CacheError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| CacheError::Format)?;
    let mut lines = text.split('\n');
    let (Some(header), Some(body), Some(tag), Some(""), None) =
        (lines.next(), lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Err(CacheError::Format);
    };
    if header != HEADER {
        return Err(CacheError::Format);
    }
    let tag = crate::crypto::unhex(tag).ok_or(CacheError::Format)?;
    mac(key, body.as_bytes()).ok_or(CacheError::Mac)?.verify_slice(&tag).map_err(|_| CacheError::Mac)?;
    let cache: CachedKey = serde_json::from_str(body).map_err(|_| CacheError::Format)?;
    if cache.versions.len() > MAX_VERSIONS {
        return Err(CacheError::Invalid("too many versions"));
    }
    if !cache.versions.windows(2).all(|w| w[0].version < w[1].version) {
        return Err(CacheError::Invalid("versions are not in increasing order"));
    }
    if let Some(current) = cache.current_version
        && !cache.versions.iter().any(|v| v.version == current)
        && cache.state != KeyState::Destroyed
    {
        return Err(CacheError::Invalid("the current version is not cached"));
    }
    Ok(cache)
}

/// The cache file in a state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the cache, authenticated by any of `keys`; `None` when there is none yet.
pub fn read(state_dir: &Path, keys: &[KeyMaterial]) -> Result<Option<CachedKey>, CacheError> {
    let file = path(state_dir);
    match std::fs::read(&file) {
        Ok(bytes) => {
            let mut outcome = Err(CacheError::Mac);
            for key in keys {
                outcome = decode(&bytes, key);
                if !matches!(outcome, Err(CacheError::Mac)) {
                    break;
                }
            }
            outcome.map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CacheError::Read(file, e)),
    }
}

/// Replaces the cache atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write(state_dir: &Path, cache: &CachedKey, key: &KeyMaterial) -> Result<(), CacheError> {
    let file = path(state_dir);
    let err = |e| CacheError::Write(file.clone(), e);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(err)?;
    let bytes = encode(cache, key)?;
    let tmp = state_dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)?;
        std::fs::File::open(state_dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CachedKey {
        CachedKey {
            namespace: "kube-system".into(),
            name: "cluster".into(),
            key_id: "6ece15cd-0195-4985-aff9-395763ad0a3b".into(),
            uid: None,
            state: KeyState::Enabled,
            current_version: Some(2),
            refused_versions: Default::default(),
            root_key_fingerprint: "rk1-0011223344556677".into(),
            versions: vec![
                CachedVersion { version: 1, wrapped: "AQID".into(), root_key_fingerprint: None },
                CachedVersion { version: 2, wrapped: "BAUG".into(), root_key_fingerprint: None },
            ],
            valid_to: None,
        }
    }

    fn key() -> KeyMaterial {
        KeyMaterial::from_slice(&[5; 32]).unwrap()
    }

    #[test]
    fn a_restored_key_keeps_its_uid_and_other_caches_stay_as_they_were() {
        let mut info = sample().info();
        assert_eq!(info.uid, info.key_id);
        assert!(
            !serde_json::to_string(&CachedKey::new(&info, Some(&sample().material())))
                .unwrap()
                .contains("uid")
        );
        // Restored from a backup: the UID here differs from the keyId, and both come back.
        info.uid = "11111111-2222-3333-4444-555555555555".into();
        let cached = CachedKey::new(&info, Some(&sample().material()));
        assert_eq!(cached.uid.as_deref(), Some(info.uid.as_str()));
        assert_eq!(cached.info(), info);
        assert_eq!(
            (cached.material().uid, cached.material().key_id),
            (info.uid.clone(), info.key_id.clone())
        );
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert_eq!(read(&state, &[key()]).unwrap(), None);
        write(&state, &sample(), &key()).unwrap();
        assert_eq!(read(&state, &[key()]).unwrap(), Some(sample()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(path(&state)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        // Replacing leaves no temporary file behind.
        let mut next = sample();
        next.current_version = Some(1);
        write(&state, &next, &key()).unwrap();
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1);
        assert_eq!(read(&state, &[key()]).unwrap(), Some(next));
    }

    #[test]
    fn a_cache_written_before_a_root_key_rotation_is_read_with_the_previous_key() {
        let key = |b: u8| RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap());
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &sample(), &mac_key(&key(1))).unwrap();
        let ring = key(2).with_previous(key(1)).unwrap();
        assert_eq!(read(dir.path(), &mac_keys(&ring)).unwrap(), Some(sample()));
        assert!(matches!(read(dir.path(), &mac_keys(&key(2))), Err(CacheError::Mac)));
        // Written again, it is the primary's, and says which root key wraps a rewrapped version.
        let mut rewrapped = sample();
        rewrapped.versions[0].root_key_fingerprint = Some(ring.fingerprint().to_owned());
        write(dir.path(), &rewrapped, &mac_key(&ring)).unwrap();
        let read_back = read(dir.path(), &mac_keys(&key(2))).unwrap().unwrap();
        assert_eq!(read_back, rewrapped);
        let material = read_back.material();
        assert_eq!(
            material.version_roots.get(&read_back.versions[0].version).map(String::as_str),
            Some(ring.fingerprint())
        );
        // A cache with no rewrapped version is written as before (readable by older
        // plugins): the key's fingerprint only.
        let text = String::from_utf8(encode(&sample(), &mac_key(&ring)).unwrap()).unwrap();
        assert_eq!(text.matches("rootKeyFingerprint").count(), 1, "{text}");
    }

    #[test]
    fn altered_or_foreign_caches_are_refused() {
        let bytes = encode(&sample(), &key()).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let disabled = text.replace("\"Enabled\"", "\"Disabled\"");
        assert!(matches!(decode(disabled.as_bytes(), &key()), Err(CacheError::Mac)));
        let other = KeyMaterial::from_slice(&[6; 32]).unwrap();
        assert!(matches!(decode(&bytes, &other), Err(CacheError::Mac)));
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], &key()).is_err(), "truncated to {n}");
        }
        assert!(matches!(decode(&vec![b'a'; MAX_CACHE_LEN + 1], &key()), Err(CacheError::TooLarge)));
        assert!(matches!(decode(b"\xff\xfe", &key()), Err(CacheError::Format)));
    }

    #[test]
    fn inconsistent_content_is_refused_even_with_a_valid_mac() {
        let mut c = sample();
        c.versions.reverse();
        let bytes = encode(&c, &key()).unwrap();
        assert!(matches!(decode(&bytes, &key()), Err(CacheError::Invalid(_))));
        let mut c = sample();
        c.current_version = Some(9);
        let bytes = encode(&c, &key()).unwrap();
        assert!(matches!(decode(&bytes, &key()), Err(CacheError::Invalid(_))));
    }
}
