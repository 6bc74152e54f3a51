//! The backup file of `kubekms keyring backup` and `restore`: every key's spec and its
//! versions as stored (wrapped by the root key — never plaintext), in one file that is
//! encrypted and authenticated as a whole, and the check that decides whether a backup
//! may be restored into a cluster. Pure: [`super::restore`] reads and writes the cluster.
//!
//! Layout: `magic (8) || format (1) || backup id (16) || fingerprint length (1) ||
//! root-key fingerprint || wrapped file key length (2, big-endian) || wrapped file key`,
//! then [`crate::crypto::seal`] of the JSON body under the file key with all of that as its
//! header. The file key is random and wrapped by the root key with the root key's own
//! wrap (bound to the backup id), so a backup opens only where that root key is, and any
//! change or truncation anywhere refuses the whole file.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::api::{KmsKeyMaterialSpec, KmsKeySpec};
use crate::crypto::{KeyMaterial, RootKey, WrapContext, open, seal};

const MAGIC: &[u8; 8] = b"KKMSBKUP";
const FORMAT_V1: u8 = 1;
const PURPOSE: &[u8] = b"kubekms/v1 keyring backup";
/// The largest backup file read: far more than 1000 keys of 1000 versions each.
pub const MAX_BACKUP_LEN: usize = 256 * 1024 * 1024;

/// Why a backup cannot be written, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("failed to generate the backup's file key")]
    Random(#[source] getrandom::Error),
    #[error("failed to encrypt the backup")]
    Seal,
    #[error("failed to encode the backup")]
    Encode(#[source] serde_json::Error),
    #[error("the file is not a kubekms keyring backup (or is truncated before its header ends)")]
    NotABackup,
    #[error("the backup has format {0}; this kubekms reads format {FORMAT_V1}")]
    Format(u8),
    #[error("the backup is larger than {MAX_BACKUP_LEN} bytes")]
    TooLarge,
    #[error("the backup was made under root key {found}, but this root key is {expected}")]
    RootKeyMismatch { found: String, expected: String },
    #[error("the backup is damaged (changed or truncated): it does not authenticate; nothing was restored")]
    Damaged,
    #[error("the backup authenticates but its content is malformed")]
    Malformed(#[source] serde_json::Error),
    #[error("the backup is inconsistent: {0}")]
    Inconsistent(String),
    #[error("key {key} version {version} in the backup does not unwrap under this root key")]
    Unwrap { key: String, version: u32 },
}

impl BackupError {
    /// A bounded label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            BackupError::Random(_) => "random",
            BackupError::Seal | BackupError::Encode(_) => "encode",
            BackupError::NotABackup | BackupError::Format(_) | BackupError::TooLarge => "format",
            BackupError::RootKeyMismatch { .. } => "root_key_mismatch",
            BackupError::Damaged => "damaged",
            BackupError::Malformed(_) | BackupError::Inconsistent(_) | BackupError::Unwrap { .. } => {
                "content"
            }
        }
    }
}

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backup {
    /// When it was made.
    pub created: Timestamp,
    /// The root key that wraps every version in it.
    pub root_key_fingerprint: String,
    pub keys: Vec<BackupKey>,
}

/// One key: its spec, its keyId and its material as stored, of the cluster it was made in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupKey {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub spec: KmsKeySpec,
    /// The key's material (absent for a key that had none yet, which gets a new keyId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub material: Option<KmsKeyMaterialSpec>,
}

impl BackupKey {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The keyId the key keeps, if it has material.
    pub fn key_id(&self) -> Option<&str> {
        self.material.as_ref().map(KmsKeyMaterialSpec::key_id)
    }
}

fn backup_context(id: &uuid::Uuid) -> String {
    // Not a UUID, so it never names a real key's wrapping.
    format!("kubekms-backup/{}", id.hyphenated())
}

fn header(id: &uuid::Uuid, fingerprint: &str, wrapped_key: &[u8]) -> Result<Vec<u8>, BackupError> {
    let fp_len = u8::try_from(fingerprint.len()).map_err(|_| BackupError::Seal)?;
    let key_len = u16::try_from(wrapped_key.len()).map_err(|_| BackupError::Seal)?;
    let mut h = Vec::with_capacity(MAGIC.len() + 20 + fingerprint.len() + wrapped_key.len());
    h.extend_from_slice(MAGIC);
    h.push(FORMAT_V1);
    h.extend_from_slice(id.as_bytes());
    h.push(fp_len);
    h.extend_from_slice(fingerprint.as_bytes());
    h.extend_from_slice(&key_len.to_be_bytes());
    h.extend_from_slice(wrapped_key);
    Ok(h)
}

/// The parts of a header, and its length.
struct Header<'a> {
    id: uuid::Uuid,
    fingerprint: &'a str,
    wrapped_key: &'a [u8],
    len: usize,
}

fn parse_header(file: &[u8]) -> Result<Header<'_>, BackupError> {
    let take = |at: usize, n: usize| file.get(at..at + n).ok_or(BackupError::NotABackup);
    if take(0, MAGIC.len())? != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let mut at = MAGIC.len();
    let format = take(at, 1)?[0];
    if format != FORMAT_V1 {
        return Err(BackupError::Format(format));
    }
    at += 1;
    let id = uuid::Uuid::from_slice(take(at, 16)?).map_err(|_| BackupError::NotABackup)?;
    at += 16;
    let fp_len = usize::from(take(at, 1)?[0]);
    at += 1;
    let fingerprint = std::str::from_utf8(take(at, fp_len)?).map_err(|_| BackupError::NotABackup)?;
    at += fp_len;
    let key_len = take(at, 2)?;
    let key_len = usize::from(u16::from_be_bytes([key_len[0], key_len[1]]));
    at += 2;
    let wrapped_key = take(at, key_len)?;
    Ok(Header { id, fingerprint, wrapped_key, len: at + key_len })
}

/// Encrypts and authenticates `backup` under a fresh file key wrapped by `root`, after
/// checking it as a restore will.
pub fn seal_backup(root: &RootKey, backup: &Backup) -> Result<Vec<u8>, BackupError> {
    check(root, backup)?;
    seal_unchecked(root, backup)
}

fn seal_unchecked(root: &RootKey, backup: &Backup) -> Result<Vec<u8>, BackupError> {
    let id = uuid::Uuid::new_v4();
    let file_key = KeyMaterial::generate().map_err(BackupError::Random)?;
    let wrapped_key = root
        .wrap(&file_key, WrapContext { key_id: &backup_context(&id), version: 1 })
        .map_err(|_| BackupError::Seal)?;
    let header = header(&id, root.fingerprint(), &wrapped_key)?;
    let body = zeroize::Zeroizing::new(serde_json::to_vec(backup).map_err(BackupError::Encode)?);
    seal(&file_key, PURPOSE, &header, &[], &body).map_err(|_| BackupError::Seal)
}

/// Opens a backup made under `root` and checks it whole: it authenticates, every key is
/// named once, every keyId is a UUID held by one key, and every version unwraps.
pub fn open_backup(root: &RootKey, file: &[u8]) -> Result<Backup, BackupError> {
    if file.len() > MAX_BACKUP_LEN {
        return Err(BackupError::TooLarge);
    }
    let h = parse_header(file)?;
    if h.fingerprint != root.fingerprint() {
        return Err(BackupError::RootKeyMismatch {
            found: h.fingerprint.to_owned(),
            expected: root.fingerprint().to_owned(),
        });
    }
    let file_key = root
        .unwrap(h.wrapped_key, WrapContext { key_id: &backup_context(&h.id), version: 1 })
        .map_err(|_| BackupError::Damaged)?;
    let body = open(&file_key, PURPOSE, h.len, &[], file).map_err(|_| BackupError::Damaged)?;
    let backup: Backup = serde_json::from_slice(body.expose()).map_err(BackupError::Malformed)?;
    check(root, &backup)?;
    Ok(backup)
}

fn check(root: &RootKey, backup: &Backup) -> Result<(), BackupError> {
    let inconsistent = |m: String| Err(BackupError::Inconsistent(m));
    if backup.root_key_fingerprint != root.fingerprint() {
        return inconsistent(format!("its keys are wrapped by root key {}", backup.root_key_fingerprint));
    }
    let (mut names, mut ids) = (BTreeSet::new(), BTreeSet::new());
    for key in &backup.keys {
        if !names.insert((key.namespace.as_str(), key.name.as_str())) {
            return inconsistent(format!("key {} appears twice", key.display()));
        }
        let Some(material) = &key.material else { continue };
        let key_id = material.key_id();
        if uuid::Uuid::parse_str(key_id).is_err() {
            return inconsistent(format!("key {} has keyId {key_id:?}, which is not a UUID", key.display()));
        }
        if !ids.insert(key_id) {
            return inconsistent(format!("keyId {key_id} appears twice"));
        }
        let other_root = material.versions.iter().any(|v| v.root_key_fingerprint.is_some());
        if material.root_key_fingerprint != root.fingerprint()
            || other_root
            || material.destroyed_at.is_some()
        {
            return inconsistent(format!(
                "key {} is destroyed or wrapped by another root key",
                key.display()
            ));
        }
        for v in &material.versions {
            let Some(wrapped) = &v.wrapped else { continue };
            let unwrapped = B64
                .decode(wrapped)
                .ok()
                .and_then(|bytes| root.unwrap(&bytes, WrapContext { key_id, version: v.version }).ok());
            if unwrapped.is_none() {
                return Err(BackupError::Unwrap { key: key.display(), version: v.version });
            }
        }
    }
    Ok(())
}

/// What a cluster already holds, as far as restoring into it is concerned.
#[derive(Debug, Default)]
pub struct Existing {
    /// Every KmsKey, by `(namespace, name)`, with the keyId of its material if it has any.
    pub keys: BTreeMap<(String, String), Option<String>>,
    /// Every keyId in use: each KmsKey's UID and each material's keyId.
    pub key_ids: BTreeSet<String>,
    /// KmsKeys that an interrupted restore created without their material, by
    /// `(namespace, name)`, with the keyId they await.
    pub awaiting: BTreeMap<(String, String), String>,
}

/// What a restore does with one key of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create the KmsKey and its material.
    Create,
    /// Write the material of the KmsKey an interrupted restore created.
    Resume,
    /// Nothing: the key is here already, with the same keyId (restored before).
    AlreadyHere,
}

/// What restoring `backup` into a cluster holding `existing` does with each of its keys, or
/// every reason it cannot: a KmsKey of the same namespace and name that is another key, or
/// a keyId in use by another key (a keyId is never reused).
pub fn plan_restore(backup: &Backup, existing: &Existing) -> Result<Vec<Step>, Vec<String>> {
    let (mut steps, mut conflicts) = (Vec::new(), Vec::new());
    for key in &backup.keys {
        let name = (key.namespace.clone(), key.name.clone());
        let key_id = key.key_id();
        let here = existing.keys.get(&name);
        let step = match (here, key_id) {
            (None, _) => Step::Create,
            (Some(Some(id)), Some(want)) if id == want => Step::AlreadyHere,
            (Some(None), Some(want)) if existing.awaiting.get(&name).is_some_and(|id| id == want) => {
                Step::Resume
            }
            _ => {
                conflicts.push(format!("KmsKey {} already exists", key.display()));
                Step::Create
            }
        };
        if let Some(id) = key_id.filter(|id| step == Step::Create && existing.key_ids.contains(*id)) {
            conflicts.push(format!("keyId {id} (of {}) is already in use in this cluster", key.display()));
        }
        steps.push(step);
    }
    if conflicts.is_empty() { Ok(steps) } else { Err(conflicts) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyOwner, MaterialVersion, VersionTrigger};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const KEY_ID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

    fn root() -> RootKey {
        RootKey::from_material(KeyMaterial::from_slice(&[9; 32]).unwrap())
    }

    fn backup(root: &RootKey) -> Backup {
        let versions = (1..=2)
            .map(|version| {
                let m = KeyMaterial::generate().unwrap();
                let wrapped = root.wrap(&m, WrapContext { key_id: KEY_ID, version }).unwrap();
                MaterialVersion {
                    version,
                    created: Time(Timestamp::UNIX_EPOCH),
                    trigger: if version == 1 { VersionTrigger::Created } else { VersionTrigger::OnDemand },
                    request: None,
                    wrapped: Some(B64.encode(wrapped)),
                    root_key_fingerprint: None,
                    deletion_time: None,
                    destroyed_at: None,
                    expired_at: None,
                }
            })
            .collect();
        let material = crate::testing::material_spec(
            KeyOwner { namespace: "apps".into(), name: "k".into(), uid: KEY_ID.into() },
            root.fingerprint(),
            versions,
        );
        Backup {
            created: Timestamp::UNIX_EPOCH,
            root_key_fingerprint: root.fingerprint().into(),
            keys: vec![
                BackupKey {
                    namespace: "apps".into(),
                    name: "k".into(),
                    labels: BTreeMap::new(),
                    spec: serde_json::from_value(serde_json::json!({})).unwrap(),
                    material: Some(material),
                },
                BackupKey {
                    namespace: "apps".into(),
                    name: "pending".into(),
                    labels: BTreeMap::new(),
                    spec: serde_json::from_value(serde_json::json!({"origin": "EXTERNAL"})).unwrap(),
                    material: None,
                },
            ],
        }
    }

    #[test]
    fn a_backup_round_trips_and_holds_no_plaintext() {
        let root = root();
        let b = backup(&root);
        let file = seal_backup(&root, &b).unwrap();
        let opened = open_backup(&root, &file).unwrap();
        assert_eq!(serde_json::to_value(&opened).unwrap(), serde_json::to_value(&b).unwrap());
        // Encrypted as a whole: not even the key names or wrapped bytes show.
        let text = String::from_utf8_lossy(&file);
        assert!(!text.contains("pending") && !text.contains(KEY_ID));
        let wrapped = b.keys[0].material.as_ref().unwrap().versions[0].wrapped.clone().unwrap();
        assert!(!text.contains(&wrapped));
        // Two backups of the same keys differ (fresh file key and salt).
        assert_ne!(seal_backup(&root, &b).unwrap(), file);
    }

    #[test]
    fn any_change_or_truncation_refuses_the_whole_file() {
        let root = root();
        let file = seal_backup(&root, &backup(&root)).unwrap();
        for at in 0..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            assert!(open_backup(&root, &bad).is_err(), "a flipped bit at {at} was accepted");
        }
        for len in 0..file.len() {
            assert!(open_backup(&root, &file[..len]).is_err(), "truncated to {len} was accepted");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(open_backup(&root, &longer), Err(BackupError::Damaged)));
        assert!(matches!(open_backup(&root, &file[..40]), Err(BackupError::NotABackup)));
        assert!(matches!(open_backup(&root, b"{\"keys\": []}"), Err(BackupError::NotABackup)));
        let mut future = file.clone();
        future[MAGIC.len()] = 2;
        assert!(matches!(open_backup(&root, &future), Err(BackupError::Format(2))));
    }

    #[test]
    fn another_root_key_cannot_open_it() {
        let root = root();
        let file = seal_backup(&root, &backup(&root)).unwrap();
        let other = RootKey::from_material(KeyMaterial::generate().unwrap());
        let err = open_backup(&other, &file).unwrap_err();
        assert!(matches!(err, BackupError::RootKeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains(root.fingerprint()), "{err}");
    }

    #[test]
    fn a_backup_whose_content_cannot_be_restored_is_refused() {
        let root = root();
        // Refused when the backup is made, and when a file holding it is opened.
        let refused = |b: &Backup| {
            let at_backup = seal_backup(&root, b).unwrap_err().to_string();
            let at_restore = open_backup(&root, &seal_unchecked(&root, b).unwrap()).unwrap_err().to_string();
            assert_eq!(at_backup, at_restore);
            at_restore
        };
        let mut twice = backup(&root);
        twice.keys[1].name = "k".into();
        assert!(refused(&twice).contains("key apps/k appears twice"));
        let mut same_id = backup(&root);
        let mut copy = same_id.keys[0].clone();
        copy.name = "copy".into();
        same_id.keys.push(copy);
        assert!(refused(&same_id).contains(&format!("keyId {KEY_ID} appears twice")));
        let mut not_uuid = backup(&root);
        not_uuid.keys[0].material.as_mut().unwrap().key_id = Some("uid-1".into());
        assert!(refused(&not_uuid).contains("not a UUID"));
        // Wrapped bytes bound to another keyId or version do not unwrap.
        let mut moved = backup(&root);
        moved.keys[0].material.as_mut().unwrap().key_id = Some(uuid::Uuid::new_v4().to_string());
        assert!(refused(&moved).contains("version 1 in the backup does not unwrap"));
        let mut renumbered = backup(&root);
        renumbered.keys[0].material.as_mut().unwrap().versions[1].version = 3;
        assert!(refused(&renumbered).contains("version 3 in the backup does not unwrap"));
    }

    #[test]
    fn a_restore_refuses_another_key_of_the_same_name_or_key_id_and_skips_what_is_here() {
        let root = root();
        let b = backup(&root);
        let name = |n: &str| ("apps".to_owned(), n.to_owned());
        assert_eq!(plan_restore(&b, &Existing::default()), Ok(vec![Step::Create, Step::Create]));
        // The keyId is another key's here; a key of the same name is another key.
        let mut existing = Existing {
            keys: [(name("pending"), Some(uuid::Uuid::new_v4().to_string()))].into(),
            key_ids: [KEY_ID.to_owned()].into(),
            awaiting: BTreeMap::new(),
        };
        assert_eq!(
            plan_restore(&b, &existing),
            Err(vec![
                format!("keyId {KEY_ID} (of apps/k) is already in use in this cluster"),
                "KmsKey apps/pending already exists".to_owned(),
            ])
        );
        // The same key, restored before (same name, same keyId): nothing to do for it.
        existing.keys = [(name("k"), Some(KEY_ID.to_owned()))].into();
        assert_eq!(plan_restore(&b, &existing), Ok(vec![Step::AlreadyHere, Step::Create]));
        // A key of that name with another keyId, or without material, is another key.
        existing.keys = [(name("k"), Some(uuid::Uuid::new_v4().to_string()))].into();
        let refused = plan_restore(&b, &existing).unwrap_err();
        assert_eq!(refused[0], "KmsKey apps/k already exists");
        assert!(refused[1].contains("is already in use"), "{refused:?}");
        existing.keys = [(name("k"), None)].into();
        assert!(plan_restore(&b, &existing).is_err());
        // ... unless an interrupted restore left it awaiting this very keyId: resumed.
        existing.awaiting = [(name("k"), KEY_ID.to_owned())].into();
        existing.key_ids.clear();
        assert_eq!(plan_restore(&b, &existing), Ok(vec![Step::Resume, Step::Create]));
        existing.awaiting = [(name("k"), uuid::Uuid::new_v4().to_string())].into();
        assert!(plan_restore(&b, &existing).is_err());
        // A key without material in the backup never matches one here.
        existing.keys = [(name("pending"), None)].into();
        existing.awaiting.clear();
        assert_eq!(
            plan_restore(&b, &existing).unwrap_err(),
            ["KmsKey apps/pending already exists".to_owned()]
        );
    }
}
