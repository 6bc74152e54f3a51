//! The root key: the key that wraps every key version. It lives in a file (mode 0600 or
//! stricter) on the hosts that run kubekms, never in etcd or an API object.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::canonical::CanonicalWriter;
use super::seal::{SealError, open, seal};
use super::secret::{KEY_LEN, KeyMaterial};

const WRAPPED_FORMAT_V1: u8 = 0x01;
const WRAP_PURPOSE: &[u8] = b"kubekms/v1 key-version-material";
const FINGERPRINT_INFO: &[u8] = b"kubekms/v1 root-key fingerprint";

/// Why a root key could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    #[error("root key file {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("failed to create root key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root key file {path} cannot be read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root key file {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("root key file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "root key file {path} holds {len} bytes; a root key is exactly 32 bytes (create one with `kubekms root-key create`)"
    )]
    Length { path: PathBuf, len: u64 },
    #[error("failed to generate a root key")]
    Random(#[source] getrandom::Error),
    #[error("failed to wrap key material")]
    Wrap(#[source] SealError),
    #[error("failed to unwrap key material: wrong root key or corrupted material")]
    Unwrap,
}

/// Names one key version for wrapping: the wrapped bytes are bound to it.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    /// The key's keyId.
    pub key_id: &'a str,
    /// The version number.
    pub version: u32,
}

impl WrapContext<'_> {
    fn encode(&self) -> Vec<u8> {
        CanonicalWriter::new().str(self.key_id).u32(self.version).finish()
    }
}

/// A loaded root key.
pub struct RootKey {
    key: KeyMaterial,
    fingerprint: String,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl RootKey {
    /// Writes a new random root key to `path` with mode 0600, refusing to overwrite.
    pub fn create(path: &Path) -> Result<RootKey, RootKeyError> {
        let key = KeyMaterial::generate().map_err(RootKeyError::Random)?;
        let mut file =
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|source| {
                match source.kind() {
                    std::io::ErrorKind::AlreadyExists => RootKeyError::Exists(path.to_owned()),
                    _ => RootKeyError::Create { path: path.to_owned(), source },
                }
            })?;
        let written = file.write_all(key.expose()).and_then(|()| file.sync_all());
        if let Err(source) = written {
            // Never leave a partial key behind.
            let _ = std::fs::remove_file(path);
            return Err(RootKeyError::Create { path: path.to_owned(), source });
        }
        Ok(RootKey::from_material(key))
    }

    /// Loads the root key from `path`, refusing a missing file, a file of the wrong
    /// length, or one that group or others can read.
    pub fn load(path: &Path) -> Result<RootKey, RootKeyError> {
        let read_err = |source| RootKeyError::Read { path: path.to_owned(), source };
        // Check the file that was opened, not the path (which could change in between).
        let file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(RootKeyError::NotAFile(path.to_owned()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(RootKeyError::Permissions { path: path.to_owned(), mode });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(RootKeyError::Length { path: path.to_owned(), len: meta.len() });
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
        file.take(KEY_LEN as u64 + 1).read_to_end(&mut buf).map_err(read_err)?;
        let key = KeyMaterial::from_slice(&buf)
            .ok_or_else(|| RootKeyError::Length { path: path.to_owned(), len: buf.len() as u64 })?;
        Ok(RootKey::from_material(key))
    }

    /// Copies the root key in `from` (any mode: for example a Secret volume that only the
    /// pod's group may read) to `to` with mode 0600, replacing `to` atomically. The copy is
    /// what components then load, with their usual checks.
    pub fn copy(from: &Path, to: &Path) -> Result<RootKey, RootKeyError> {
        let read_err = |source| RootKeyError::Read { path: from.to_owned(), source };
        let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
        std::fs::File::open(from)
            .and_then(|f| f.take(KEY_LEN as u64 + 1).read_to_end(&mut buf))
            .map_err(read_err)?;
        let key = KeyMaterial::from_slice(&buf)
            .ok_or_else(|| RootKeyError::Length { path: from.to_owned(), len: buf.len() as u64 })?;
        let tmp = to.with_file_name(format!(".root-key.{}.tmp", std::process::id()));
        let create_err = |source| RootKeyError::Create { path: to.to_owned(), source };
        let written = (|| {
            let _ = std::fs::remove_file(&tmp);
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(key.expose())?;
            f.sync_all()?;
            std::fs::rename(&tmp, to)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(create_err(e));
        }
        Ok(RootKey::from_material(key))
    }

    /// A root key from material already in memory (tests, benchmarks).
    pub fn from_material(key: KeyMaterial) -> RootKey {
        let mut fp = [0u8; 8];
        // Expanding 8 bytes cannot exceed HKDF's limit.
        let _ = Hkdf::<Sha256>::new(None, key.expose()).expand(FINGERPRINT_INFO, &mut fp);
        let fingerprint = format!("rk1-{}", hex(&fp));
        RootKey { key, fingerprint }
    }

    /// A one-way identifier of the root key, safe to log and to store.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Wraps one key version's material, bound to its key and version.
    pub fn wrap(&self, material: &KeyMaterial, ctx: WrapContext<'_>) -> Result<Vec<u8>, RootKeyError> {
        seal(&self.key, WRAP_PURPOSE, &[WRAPPED_FORMAT_V1], &ctx.encode(), material.expose())
            .map_err(RootKeyError::Wrap)
    }

    /// Unwraps what [`RootKey::wrap`] produced for the same key and version.
    pub fn unwrap(&self, wrapped: &[u8], ctx: WrapContext<'_>) -> Result<KeyMaterial, RootKeyError> {
        if wrapped.first() != Some(&WRAPPED_FORMAT_V1) {
            return Err(RootKeyError::Unwrap);
        }
        let plain =
            open(&self.key, WRAP_PURPOSE, 1, &ctx.encode(), wrapped).map_err(|_| RootKeyError::Unwrap)?;
        KeyMaterial::from_slice(plain.expose()).ok_or(RootKeyError::Unwrap)
    }

    /// A key derived from the root key for another purpose (for example the MAC of the
    /// plugin's cache file).
    pub fn derive(&self, purpose: &[u8]) -> KeyMaterial {
        let mut out = KeyMaterial::zeroed();
        // 32 bytes is far below HKDF-SHA256's output limit, so this cannot fail.
        let _ = Hkdf::<Sha256>::new(None, self.key.expose()).expand(purpose, out.expose_mut());
        out
    }
}

/// Lowercase hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(version: u32) -> WrapContext<'static> {
        WrapContext { key_id: "5b7c0c4e-0000-4000-8000-000000000001", version }
    }

    #[test]
    fn create_writes_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let created = RootKey::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 32);
        assert!(matches!(RootKey::create(&path), Err(RootKeyError::Exists(_))));
        let loaded = RootKey::load(&path).unwrap();
        assert_eq!(created.fingerprint(), loaded.fingerprint());
    }

    #[test]
    fn load_refuses_bad_files_with_clear_messages() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = RootKey::load(&missing).unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");

        let open = dir.path().join("open");
        std::fs::write(&open, [7u8; 32]).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RootKey::load(&open).unwrap_err();
        assert!(err.to_string().contains("readable by group or others (mode 0644)"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(RootKey::load(&open), Err(RootKeyError::Permissions { .. })));

        let short = dir.path().join("short");
        std::fs::write(&short, [7u8; 31]).unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = RootKey::load(&short).unwrap_err();
        assert!(err.to_string().contains("holds 31 bytes"), "{err}");

        let long = dir.path().join("long");
        std::fs::write(&long, [7u8; 33]).unwrap();
        std::fs::set_permissions(&long, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(matches!(RootKey::load(&long), Err(RootKeyError::Length { len: 33, .. })));

        assert!(matches!(RootKey::load(dir.path()), Err(RootKeyError::NotAFile(_))));
    }

    #[test]
    fn copy_makes_a_private_file_from_a_group_readable_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::write(&shared, [9u8; 32]).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert!(matches!(RootKey::load(&shared), Err(RootKeyError::Permissions { .. })));
        let private = dir.path().join("private");
        let copied = RootKey::copy(&shared, &private).unwrap();
        assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(RootKey::load(&private).unwrap().fingerprint(), copied.fingerprint());
        // Again (a restarted init container): replaced, not refused.
        RootKey::copy(&shared, &private).unwrap();
        std::fs::write(&shared, [9u8; 31]).unwrap();
        assert!(matches!(RootKey::copy(&shared, &private), Err(RootKeyError::Length { len: 31, .. })));
    }

    #[test]
    fn fingerprint_reveals_nothing_of_the_key() {
        let key = RootKey::from_material(KeyMaterial::from_slice(&[0x42; 32]).unwrap());
        assert!(key.fingerprint().starts_with("rk1-"));
        assert_eq!(key.fingerprint().len(), 4 + 16);
        assert!(!key.fingerprint().contains("4242"));
        assert!(!format!("{key:?}").contains("42, 42"));
    }

    #[test]
    fn wrap_binds_key_id_and_version() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let material = KeyMaterial::generate().unwrap();
        let wrapped = root.wrap(&material, ctx(1)).unwrap();
        assert_eq!(wrapped[0], WRAPPED_FORMAT_V1);
        assert!(root.unwrap(&wrapped, ctx(1)).unwrap().ct_eq(&material));
        assert!(root.unwrap(&wrapped, ctx(2)).is_err(), "another version");
        let other_key = WrapContext { key_id: "other", version: 1 };
        assert!(root.unwrap(&wrapped, other_key).is_err(), "another key");
        let other_root = RootKey::from_material(KeyMaterial::generate().unwrap());
        assert!(other_root.unwrap(&wrapped, ctx(1)).is_err(), "another root key");
        // The wrapped bytes never contain the material.
        assert!(!wrapped.windows(32).any(|w| w == material.expose()));
        let mut future = wrapped.clone();
        future[0] = 0x02;
        assert!(root.unwrap(&future, ctx(1)).is_err(), "unknown format version");
    }
}
