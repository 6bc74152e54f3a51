//! The root key: the key that wraps every key version. It lives in a file (mode 0600 or
//! stricter) on the hosts that run kubekms, or in a PKCS#11 token it never leaves; never in
//! etcd or an API object. [`RootKey`] is the one type the rest of kubekms sees; where the key
//! lives is a [`RootKeyProvider`], chosen by a [`RootKeySource`].

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::canonical::CanonicalWriter;
use super::pkcs11::{Pkcs11Config, Pkcs11Error, Pkcs11Root};
use super::seal::{SealError, open, seal};
use super::secret::{KEY_LEN, KeyMaterial};

/// Wrapped by a root key in a file: [`seal`] with the root key.
const WRAPPED_FORMAT_V1: u8 = 0x01;
/// Wrapped inside a PKCS#11 token: `0x02 ‖ iv ‖ AES-GCM(root, material)`.
const WRAPPED_FORMAT_PKCS11: u8 = 0x02;
const WRAP_PURPOSE: &[u8] = b"kubekms/v1 key-version-material";
const FINGERPRINT_INFO: &[u8] = b"kubekms/v1 root-key fingerprint";
/// The label of the one derivation a token makes of its root key (see [`RootKey::derive`]).
const DERIVATION_BASE_LABEL: &[u8] = b"kubekms/v1 root-key derivation base";

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
    #[error(transparent)]
    Pkcs11(#[from] Pkcs11Error),
    #[error(
        "the previous root key {fingerprint} is the primary root key; a previous root key is one that the primary replaces"
    )]
    PreviousIsPrimary { fingerprint: String },
    #[error("the previous root key {fingerprint} is given twice")]
    PreviousTwice { fingerprint: String },
    #[error(
        "no root key with fingerprint {fingerprint} is configured (configured: {configured}); give it with --previous-root-key-file or --pkcs11-previous-key-label"
    )]
    NotConfigured { fingerprint: String, configured: String },
}

/// Where the root key is: the configuration every component shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKeySource {
    /// A 32-byte file, mode 0600 or stricter.
    File(PathBuf),
    /// A non-extractable AES-256 key object in a PKCS#11 token.
    Pkcs11(Pkcs11Config),
}

/// The root keys a component holds: the primary, which wraps and derives everything new,
/// and previous ones (a root key being replaced), which only unwrap and verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootKeyConfig {
    pub primary: RootKeySource,
    pub previous: Vec<RootKeySource>,
}

impl From<RootKeySource> for RootKeyConfig {
    fn from(primary: RootKeySource) -> Self {
        RootKeyConfig { primary, previous: Vec::new() }
    }
}

/// Where a root key lives and what it does there. Each provider wraps with its own format
/// (the first byte), so a wrapped version names the kind of root key it needs.
trait RootKeyProvider: Send + Sync {
    /// Wraps `material` (already bound to `aad`).
    fn wrap(&self, aad: &[u8], material: &KeyMaterial) -> Result<Vec<u8>, RootKeyError>;
    /// Unwraps what `wrap` produced with the same `aad`.
    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, RootKeyError>;
}

/// A root key held in process memory, loaded from a file.
struct FileProvider {
    key: KeyMaterial,
}

impl RootKeyProvider for FileProvider {
    fn wrap(&self, aad: &[u8], material: &KeyMaterial) -> Result<Vec<u8>, RootKeyError> {
        seal(&self.key, WRAP_PURPOSE, &[WRAPPED_FORMAT_V1], aad, material.expose())
            .map_err(RootKeyError::Wrap)
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, RootKeyError> {
        if wrapped.first() != Some(&WRAPPED_FORMAT_V1) {
            return Err(RootKeyError::Unwrap);
        }
        let plain = open(&self.key, WRAP_PURPOSE, 1, aad, wrapped).map_err(|_| RootKeyError::Unwrap)?;
        KeyMaterial::from_slice(plain.expose()).ok_or(RootKeyError::Unwrap)
    }
}

/// The associated data of a PKCS#11 wrap: format, purpose, key and version.
fn pkcs11_aad(aad: &[u8]) -> Vec<u8> {
    CanonicalWriter::new().bytes(&[WRAPPED_FORMAT_PKCS11]).bytes(WRAP_PURPOSE).bytes(aad).finish()
}

impl RootKeyProvider for Pkcs11Root {
    fn wrap(&self, aad: &[u8], material: &KeyMaterial) -> Result<Vec<u8>, RootKeyError> {
        let sealed = self.encrypt(&pkcs11_aad(aad), material.expose())?;
        let mut out = Vec::with_capacity(1 + sealed.len());
        out.push(WRAPPED_FORMAT_PKCS11);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<KeyMaterial, RootKeyError> {
        let Some((&WRAPPED_FORMAT_PKCS11, sealed)) = wrapped.split_first() else {
            return Err(RootKeyError::Unwrap);
        };
        let plain = self.decrypt(&pkcs11_aad(aad), sealed)?.ok_or(RootKeyError::Unwrap)?;
        KeyMaterial::from_slice(&plain).ok_or(RootKeyError::Unwrap)
    }
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

/// A loaded root key: its provider, and the base of every key derived from it; with the
/// previous root keys it replaces, if any (see [`RootKey::open_config`]).
pub struct RootKey {
    provider: Box<dyn RootKeyProvider>,
    /// What [`RootKey::derive`] and the fingerprint expand: the root key itself for a file
    /// (so both are what they always were), one derivation made inside the token for PKCS#11.
    derivation_base: KeyMaterial,
    fingerprint: String,
    /// Root keys this one replaces: they unwrap what they wrapped and verify what was
    /// derived from them, and make nothing new. Each has none of its own.
    previous: Vec<RootKey>,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl RootKey {
    /// Opens the root key that `source` names.
    pub fn open(source: &RootKeySource) -> Result<RootKey, RootKeyError> {
        match source {
            RootKeySource::File(path) => RootKey::load(path),
            RootKeySource::Pkcs11(config) => RootKey::from_pkcs11(Pkcs11Root::open(config)?),
        }
    }

    /// Opens the primary root key and the previous ones `config` names, refusing a
    /// previous key that is the primary or is given twice.
    pub fn open_config(config: &RootKeyConfig) -> Result<RootKey, RootKeyError> {
        let mut root = RootKey::open(&config.primary)?;
        for source in &config.previous {
            root = root.with_previous(RootKey::open(source)?)?;
        }
        Ok(root)
    }

    /// This root key, accepting what `previous` wrapped or derived as well.
    pub fn with_previous(mut self, previous: RootKey) -> Result<RootKey, RootKeyError> {
        let fingerprint = previous.fingerprint.clone();
        if fingerprint == self.fingerprint {
            return Err(RootKeyError::PreviousIsPrimary { fingerprint });
        }
        if self.previous.iter().any(|p| p.fingerprint == fingerprint) {
            return Err(RootKeyError::PreviousTwice { fingerprint });
        }
        // A previous key's own previous keys (none when opened from a configuration) are
        // previous keys of this one.
        let RootKey { provider, derivation_base, fingerprint, previous: theirs } = previous;
        self.previous.push(RootKey { provider, derivation_base, fingerprint, previous: Vec::new() });
        for p in theirs {
            self = self.with_previous(p)?;
        }
        Ok(self)
    }

    /// The fingerprints of the previous root keys, in the order given.
    pub fn previous_fingerprints(&self) -> impl Iterator<Item = &str> {
        self.previous.iter().map(|p| p.fingerprint.as_str())
    }

    /// Whether a root key of this fingerprint (the primary or a previous one) is held.
    pub fn knows(&self, fingerprint: &str) -> bool {
        self.by_fingerprint(fingerprint).is_ok()
    }

    /// The held root key of this fingerprint: the primary or a previous one.
    fn by_fingerprint(&self, fingerprint: &str) -> Result<&RootKey, RootKeyError> {
        if fingerprint == self.fingerprint {
            return Ok(self);
        }
        self.previous.iter().find(|p| p.fingerprint == fingerprint).ok_or_else(|| {
            let configured: Vec<&str> =
                std::iter::once(self.fingerprint()).chain(self.previous_fingerprints()).collect();
            RootKeyError::NotConfigured {
                fingerprint: fingerprint.to_owned(),
                configured: configured.join(", "),
            }
        })
    }

    /// Generates a new root key inside the token `config` names (refusing when a key of
    /// that label exists).
    pub fn create_pkcs11(config: &Pkcs11Config) -> Result<RootKey, RootKeyError> {
        RootKey::from_pkcs11(Pkcs11Root::create(config)?)
    }

    fn from_pkcs11(root: Pkcs11Root) -> Result<RootKey, RootKeyError> {
        let base = root.derive(DERIVATION_BASE_LABEL)?;
        Ok(RootKey::with_provider(Box::new(root), base))
    }

    fn with_provider(provider: Box<dyn RootKeyProvider>, derivation_base: KeyMaterial) -> RootKey {
        let mut fp = [0u8; 8];
        // Expanding 8 bytes cannot exceed HKDF's limit.
        let _ = Hkdf::<Sha256>::new(None, derivation_base.expose()).expand(FINGERPRINT_INFO, &mut fp);
        let fingerprint = format!("rk1-{}", hex(&fp));
        RootKey { provider, derivation_base, fingerprint, previous: Vec::new() }
    }

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
        replace_private_file(to, "root-key", 0o600, key.expose())
            .map_err(|source| RootKeyError::Create { path: to.to_owned(), source })?;
        Ok(RootKey::from_material(key))
    }

    /// A root key from material already in memory (tests, benchmarks).
    pub fn from_material(key: KeyMaterial) -> RootKey {
        let base = key.clone();
        RootKey::with_provider(Box::new(FileProvider { key }), base)
    }

    /// A one-way identifier of the root key, safe to log and to store.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Wraps one key version's material, bound to its key and version.
    pub fn wrap(&self, material: &KeyMaterial, ctx: WrapContext<'_>) -> Result<Vec<u8>, RootKeyError> {
        self.provider.wrap(&ctx.encode(), material)
    }

    /// Unwraps what [`RootKey::wrap`] produced for the same key and version.
    /// A token that fails is an error of its own ([`RootKeyError::Pkcs11`]), not
    /// [`RootKeyError::Unwrap`]: material that does not authenticate is never confused with
    /// a token that is away.
    pub fn unwrap(&self, wrapped: &[u8], ctx: WrapContext<'_>) -> Result<KeyMaterial, RootKeyError> {
        self.provider.unwrap(&ctx.encode(), wrapped)
    }

    /// Unwraps what the root key of `fingerprint` (the primary or a previous one) wrapped;
    /// [`RootKeyError::NotConfigured`] names a fingerprint of a root key not held.
    pub fn unwrap_by(
        &self,
        fingerprint: &str,
        wrapped: &[u8],
        ctx: WrapContext<'_>,
    ) -> Result<KeyMaterial, RootKeyError> {
        self.by_fingerprint(fingerprint)?.unwrap(wrapped, ctx)
    }

    /// A key derived from the root key for another purpose (for example the MAC of the
    /// plugin's cache file): HKDF-SHA256 of the derivation base, which for a file is the
    /// root key itself and for a token an AES-CMAC KDF computed inside it at load. So a
    /// derivation costs no round trip to the token, and the root key never leaves it.
    pub fn derive(&self, purpose: &[u8]) -> KeyMaterial {
        let mut out = KeyMaterial::zeroed();
        // 32 bytes is far below HKDF-SHA256's output limit, so this cannot fail.
        let _ = Hkdf::<Sha256>::new(None, self.derivation_base.expose()).expand(purpose, out.expose_mut());
        out
    }

    /// What [`RootKey::derive`] gives for `purpose` under the primary, then under each
    /// previous root key: what a MAC or a sealed token made before a root-key rotation is
    /// checked against. Everything new is made with the first.
    pub fn derive_all(&self, purpose: &[u8]) -> Vec<KeyMaterial> {
        std::iter::once(self).chain(&self.previous).map(|r| r.derive(purpose)).collect()
    }
}

/// Replaces `to` with a new file of mode `mode` holding `bytes`, all at once: written to a
/// temporary file beside it (`.NAME.PID.tmp`, created with that mode, synced), then renamed
/// over it, so that a reader sees the old file or the new one and never a part; on failure
/// the temporary file is removed and `to` is as it was.
pub(crate) fn replace_private_file(to: &Path, name: &str, mode: u32, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = to.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, to)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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

/// Reads lowercase hexadecimal only (no uppercase digits, no signs), so that every value
/// has exactly one spelling.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
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
        future[0] = 0x03;
        assert!(root.unwrap(&future, ctx(1)).is_err(), "unknown format version");
        // A file's root key does not take what a token wrapped (format 0x02), and says so
        // as for any other material that does not authenticate.
        let mut from_token = wrapped.clone();
        from_token[0] = WRAPPED_FORMAT_PKCS11;
        assert!(matches!(root.unwrap(&from_token, ctx(1)), Err(RootKeyError::Unwrap)));
    }

    #[test]
    fn derivations_and_fingerprint_of_a_file_key_are_what_they_always_were() {
        // Audit logs, plugin caches and STS sessions made before providers existed must still
        // verify: derive and the fingerprint are HKDF-SHA256 of the key itself.
        let bytes = [0x42; 32];
        let key = RootKey::from_material(KeyMaterial::from_slice(&bytes).unwrap());
        let mut expected = [0u8; 32];
        Hkdf::<Sha256>::new(None, &bytes).expand(b"purpose", &mut expected).unwrap();
        assert_eq!(key.derive(b"purpose").expose(), &expected);
        let mut fp = [0u8; 8];
        Hkdf::<Sha256>::new(None, &bytes).expand(FINGERPRINT_INFO, &mut fp).unwrap();
        assert_eq!(key.fingerprint(), format!("rk1-{}", hex(&fp)));
    }

    #[test]
    fn previous_root_keys_unwrap_by_fingerprint_and_derive_after_the_primary() {
        let key = |b: u8| RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap());
        let (old, new) = (key(1), key(2));
        let material = KeyMaterial::generate().unwrap();
        let wrapped = old.wrap(&material, ctx(1)).unwrap();
        let ring = key(2).with_previous(key(1)).unwrap();
        assert_eq!(ring.fingerprint(), new.fingerprint());
        assert_eq!(ring.previous_fingerprints().collect::<Vec<_>>(), [old.fingerprint()]);
        assert!(ring.knows(old.fingerprint()) && ring.knows(new.fingerprint()));
        assert!(ring.unwrap_by(old.fingerprint(), &wrapped, ctx(1)).unwrap().ct_eq(&material));
        // The primary does not take the old key's bytes, nor a fingerprint name the wrong key.
        assert!(matches!(ring.unwrap(&wrapped, ctx(1)), Err(RootKeyError::Unwrap)));
        assert!(matches!(ring.unwrap_by(new.fingerprint(), &wrapped, ctx(1)), Err(RootKeyError::Unwrap)));
        // What it wraps is the primary's.
        let rewrapped = ring.wrap(&material, ctx(1)).unwrap();
        assert!(new.unwrap(&rewrapped, ctx(1)).unwrap().ct_eq(&material));
        // An unknown fingerprint is named, with the configured ones.
        let err = new.unwrap_by(old.fingerprint(), &wrapped, ctx(1)).unwrap_err();
        assert!(
            matches!(&err, RootKeyError::NotConfigured { fingerprint, .. } if fingerprint == old.fingerprint())
        );
        assert!(
            err.to_string().contains(old.fingerprint()) && err.to_string().contains(new.fingerprint()),
            "{err}"
        );

        // Derivations: the primary's first (it makes everything new), then the previous ones'.
        let all = ring.derive_all(b"purpose");
        assert_eq!(all.len(), 2);
        assert!(all[0].ct_eq(&new.derive(b"purpose")) && all[1].ct_eq(&old.derive(b"purpose")));
        assert!(ring.derive(b"purpose").ct_eq(&new.derive(b"purpose")));
        assert_eq!(key(3).derive_all(b"purpose").len(), 1, "no previous key: only the primary's");
    }

    #[test]
    fn a_previous_root_key_that_is_the_primary_or_given_twice_is_refused() {
        let key = |b: u8| RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap());
        let err = key(1).with_previous(key(1)).unwrap_err();
        assert!(
            matches!(&err, RootKeyError::PreviousIsPrimary { fingerprint } if fingerprint == key(1).fingerprint())
        );
        let err = key(1).with_previous(key(2)).unwrap().with_previous(key(2)).unwrap_err();
        assert!(matches!(err, RootKeyError::PreviousTwice { .. }), "{err}");

        // From files: the same file as primary and previous, and an unreadable previous one.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        RootKey::create(&a).unwrap();
        RootKey::create(&b).unwrap();
        let config = |previous: Vec<PathBuf>| RootKeyConfig {
            primary: RootKeySource::File(a.clone()),
            previous: previous.into_iter().map(RootKeySource::File).collect(),
        };
        let ring = RootKey::open_config(&config(vec![b.clone()])).unwrap();
        assert_eq!(ring.previous_fingerprints().count(), 1);
        let copy = dir.path().join("copy-of-a");
        RootKey::copy(&a, &copy).unwrap();
        assert!(matches!(
            RootKey::open_config(&config(vec![copy])),
            Err(RootKeyError::PreviousIsPrimary { .. })
        ));
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RootKey::open_config(&config(vec![b.clone()])).unwrap_err();
        assert!(err.to_string().contains("readable by group or others"), "{err}");
        let err = RootKey::open_config(&config(vec![dir.path().join("missing")])).unwrap_err();
        assert!(err.to_string().contains("missing") && err.to_string().contains("cannot be read"), "{err}");
    }
}
