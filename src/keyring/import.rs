//! Importing your own key material into a KmsKey with origin EXTERNAL.
//!
//! The importer never holds the root key: the controller publishes a wrapping key and an
//! import token for the key (see `KmsKeyImport`), the importer wraps the material under it
//! (RSAES-OAEP SHA-256) and submits it, and the controller decides here whether the
//! submission is good, unwraps it, and stores it wrapped by the root key as version 1.

use std::io::Read;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use zeroize::Zeroizing;

use super::material::Owner;
use crate::api::{ImportWrapping, KeyState, KmsKey, KmsKeyImportSpec, KmsKeyMaterial, Origin};
use crate::crypto::{
    IMPORT_WINDOW, ImportCryptoError, ImportToken, KEY_LEN, KeyMaterial, RootKey, TokenError, WrappingKey,
    public_key_id,
};
use crate::domain::WrappedMaterial;

/// Why an import was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("KmsKey {0} has origin KUBEKMS; only keys with origin EXTERNAL take imported material")]
    NotExternal(String),
    #[error("KmsKey {0} is {1}, not PendingImport; import material into a new EXTERNAL key instead")]
    NotPendingImport(String, &'static str),
    #[error("failed to read the key material")]
    Read(#[source] std::io::Error),
    #[error("the key material must be exactly {KEY_LEN} bytes of raw binary; got {0} bytes")]
    Length(usize),
}

/// Reads exactly 32 bytes of material from `input`, refusing anything else.
pub fn read_material(mut input: impl Read) -> Result<KeyMaterial, ImportError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
    input.by_ref().take(KEY_LEN as u64 + 1).read_to_end(&mut buf).map_err(ImportError::Read)?;
    KeyMaterial::from_slice(&buf).ok_or(ImportError::Length(buf.len()))
}

/// The owner of the material to import into `key`, if `key` may take imported material:
/// EXTERNAL and PendingImport as its spec and its material object (`existing`, if any)
/// decide — no version yet, not destroyed, no deletion requested or promised.
pub fn check_importable(key: &KmsKey, existing: Option<&KmsKeyMaterial>) -> Result<Owner, ImportError> {
    let (namespace, name) = (key.namespace().unwrap_or_default(), key.name_any());
    let display = format!("{namespace}/{name}");
    if key.spec.origin != Origin::External {
        return Err(ImportError::NotExternal(display));
    }
    let (state, _) = key.intent().state(existing.map(WrappedMaterial::from).as_ref());
    if state != KeyState::PendingImport {
        return Err(ImportError::NotPendingImport(display, state.as_str()));
    }
    Ok(Owner { namespace, name, uid: key.uid().unwrap_or_default() })
}

/// How many submissions that do not decrypt a wrapping key takes before it is replaced
/// (with a new token): failed decryptions are then no usable oracle on it.
pub const MAX_FAILED_DECRYPTIONS: u32 = 3;

/// Why a submission was refused: each is the reason of the Imported condition.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    InvalidImportToken(TokenError),
    #[error(
        "the import token expired at {0}; take the new token and wrapping key from status and wrap the material again"
    )]
    ExpiredImportToken(Timestamp),
    #[error("the import token is for another key (keyId {0})")]
    WrongKey(String),
    #[error(
        "the import token is for a wrapping key that has been replaced; take the new token and wrapping key from status and wrap the material again"
    )]
    WrongWrappingKey,
    #[error("encryptedKeyMaterial is not base64")]
    InvalidCiphertext,
    #[error("{0}")]
    Unwrap(ImportCryptoError),
    #[error("the key is {0}, not PendingImport")]
    NotPendingImport(&'static str),
}

impl Refusal {
    /// The reason of the Imported condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unwrap(ImportCryptoError::WrappedLength(_)) => "InvalidCiphertext",
            Refusal::Unwrap(ImportCryptoError::MaterialLength(_)) => "InvalidMaterialLength",
            Refusal::Unwrap(_) => "DecryptionFailed",
            Refusal::InvalidImportToken(_) => "InvalidImportToken",
            Refusal::ExpiredImportToken(_) => "ExpiredImportToken",
            Refusal::WrongKey(_) => "WrongKey",
            Refusal::WrongWrappingKey => "WrongWrappingKey",
            Refusal::InvalidCiphertext => "InvalidCiphertext",
            Refusal::NotPendingImport(_) => "NotPendingImport",
        }
    }

    /// Whether the wrapping key was tried and failed (what counts towards its replacement).
    pub fn failed_decryption(&self) -> bool {
        matches!(self, Refusal::Unwrap(ImportCryptoError::Decryption))
    }
}

/// Whether `wrapping` can no longer be offered at `now`: absent, expired, or tried too often.
pub fn wrapping_spent(wrapping: Option<&ImportWrapping>, now: Timestamp) -> bool {
    wrapping.is_none_or(|w| w.valid_to.0 <= now || w.failed_decryptions >= MAX_FAILED_DECRYPTIONS)
}

/// A new wrapping key for the key `key_id`, valid for [`IMPORT_WINDOW`] from `now`.
pub fn new_wrapping(
    root: &RootKey,
    key_id: &str,
    now: Timestamp,
) -> Result<ImportWrapping, ImportCryptoError> {
    let key = WrappingKey::generate()?;
    Ok(ImportWrapping {
        public_key: B64.encode(key.public_der()),
        sealed_private_key: B64.encode(key.seal(root, key_id)?),
        valid_to: Time(now + IMPORT_WINDOW),
        failed_decryptions: 0,
    })
}

/// The token published with `wrapping` for the key `key_id`.
pub fn token_for(
    root: &RootKey,
    key_id: &str,
    wrapping: &ImportWrapping,
) -> Result<String, ImportCryptoError> {
    let public = B64.decode(&wrapping.public_key).map_err(|_| ImportCryptoError::PublicKey)?;
    let token = ImportToken {
        key_id: key_id.to_owned(),
        wrapping_key_id: public_key_id(&public),
        not_after: wrapping.valid_to.0,
    };
    Ok(token.issue(root))
}

/// The material a submission carries, if the token is this key's, for `wrapping`, still
/// valid at `now`, and the ciphertext unwraps to exactly 32 bytes.
pub fn unwrap_submission(
    root: &RootKey,
    key_id: &str,
    wrapping: &ImportWrapping,
    submission: &KmsKeyImportSpec,
    now: Timestamp,
) -> Result<KeyMaterial, Refusal> {
    let token = ImportToken::verify(root, &submission.import_token).map_err(Refusal::InvalidImportToken)?;
    if token.key_id != key_id {
        return Err(Refusal::WrongKey(token.key_id));
    }
    if token.not_after <= now {
        return Err(Refusal::ExpiredImportToken(token.not_after));
    }
    let public = B64.decode(&wrapping.public_key).map_err(|_| Refusal::Unwrap(ImportCryptoError::Open))?;
    if token.wrapping_key_id != public_key_id(&public) {
        return Err(Refusal::WrongWrappingKey);
    }
    let ciphertext =
        B64.decode(submission.encrypted_key_material.trim()).map_err(|_| Refusal::InvalidCiphertext)?;
    let sealed =
        B64.decode(&wrapping.sealed_private_key).map_err(|_| Refusal::Unwrap(ImportCryptoError::Open))?;
    let key = WrappingKey::open(root, key_id, &public, &sealed).map_err(Refusal::Unwrap)?;
    key.unwrap_material(&ciphertext).map_err(Refusal::Unwrap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VersionTrigger;
    use crate::crypto::wrap_material;
    use crate::keyring::new_material;

    fn submission(
        root: &RootKey,
        key_id: &str,
        wrapping: &ImportWrapping,
        material: &KeyMaterial,
    ) -> KmsKeyImportSpec {
        let public = B64.decode(&wrapping.public_key).unwrap();
        KmsKeyImportSpec {
            import_token: token_for(root, key_id, wrapping).unwrap(),
            encrypted_key_material: B64.encode(wrap_material(&public, material).unwrap()),
        }
    }

    #[test]
    fn a_submission_unwraps_only_with_its_token_its_key_and_in_time() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let wrapping = new_wrapping(&root, "key-a", t0).unwrap();
        assert_eq!(wrapping.valid_to.0, t0 + IMPORT_WINDOW);
        let material = KeyMaterial::generate().unwrap();
        let good = submission(&root, "key-a", &wrapping, &material);
        let now = t0 + jiff::SignedDuration::from_hours(1);
        assert!(unwrap_submission(&root, "key-a", &wrapping, &good, now).unwrap().ct_eq(&material));

        let reason = |r: Result<KeyMaterial, Refusal>| r.err().map(|e| e.reason()).unwrap_or("accepted");
        // Expired: at the window's end and after, whatever else is right.
        let end = wrapping.valid_to.0;
        assert_eq!(reason(unwrap_submission(&root, "key-a", &wrapping, &good, end)), "ExpiredImportToken");
        // Another key's token (the same wrapping key bytes cannot help: the token names its key).
        let foreign =
            KmsKeyImportSpec { import_token: token_for(&root, "key-b", &wrapping).unwrap(), ..good.clone() };
        assert_eq!(reason(unwrap_submission(&root, "key-a", &wrapping, &foreign, now)), "WrongKey");
        // A token of this kubekms for a wrapping key since replaced.
        let replaced = new_wrapping(&root, "key-a", t0).unwrap();
        assert_eq!(reason(unwrap_submission(&root, "key-a", &replaced, &good, now)), "WrongWrappingKey");
        // A token made under another root key, or garbage.
        let other_root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let forged = KmsKeyImportSpec {
            import_token: token_for(&other_root, "key-a", &wrapping).unwrap(),
            ..good.clone()
        };
        assert_eq!(reason(unwrap_submission(&root, "key-a", &wrapping, &forged, now)), "InvalidImportToken");
        let garbage = KmsKeyImportSpec { import_token: "x".into(), ..good.clone() };
        assert_eq!(reason(unwrap_submission(&root, "key-a", &wrapping, &garbage, now)), "InvalidImportToken");
        // Ciphertext that is not base64, the wrong size, tampered, or of the wrong length inside.
        let text = KmsKeyImportSpec { encrypted_key_material: "%%".into(), ..good.clone() };
        assert_eq!(reason(unwrap_submission(&root, "key-a", &wrapping, &text, now)), "InvalidCiphertext");
        let short = KmsKeyImportSpec { encrypted_key_material: B64.encode([1u8; 383]), ..good.clone() };
        assert_eq!(reason(unwrap_submission(&root, "key-a", &wrapping, &short, now)), "InvalidCiphertext");
        let mut bytes = B64.decode(&good.encrypted_key_material).unwrap();
        bytes[0] ^= 0x80;
        let tampered = KmsKeyImportSpec { encrypted_key_material: B64.encode(&bytes), ..good.clone() };
        let refusal = unwrap_submission(&root, "key-a", &wrapping, &tampered, now).err().unwrap();
        assert_eq!(refusal.reason(), "DecryptionFailed");
        assert!(refusal.failed_decryption());
        // The private half is sealed for its key: a copy into another key's record fails.
        assert!(
            unwrap_submission(
                &root,
                "key-b",
                &wrapping,
                &KmsKeyImportSpec {
                    import_token: token_for(&root, "key-b", &wrapping).unwrap(),
                    ..good.clone()
                },
                now
            )
            .is_err()
        );
    }

    #[test]
    fn a_wrapping_key_is_spent_when_expired_or_tried_too_often() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let mut wrapping = new_wrapping(&root, "k", t0).unwrap();
        assert!(wrapping_spent(None, t0));
        assert!(!wrapping_spent(Some(&wrapping), t0));
        assert!(wrapping_spent(Some(&wrapping), wrapping.valid_to.0));
        wrapping.failed_decryptions = MAX_FAILED_DECRYPTIONS - 1;
        assert!(!wrapping_spent(Some(&wrapping), t0));
        wrapping.failed_decryptions = MAX_FAILED_DECRYPTIONS;
        assert!(wrapping_spent(Some(&wrapping), t0));
    }

    #[test]
    fn material_must_be_exactly_32_bytes() {
        assert!(read_material(&[7u8; 32][..]).is_ok());
        assert!(matches!(read_material(&[7u8; 31][..]), Err(ImportError::Length(31))));
        assert!(matches!(read_material(&[7u8; 33][..]), Err(ImportError::Length(33))));
        assert!(matches!(read_material(&b""[..]), Err(ImportError::Length(0))));
        // A hex or base64 text file is refused, not silently truncated.
        assert!(read_material(&[b'a'; 64][..]).is_err());
    }

    fn key(origin: Origin, scheduled: bool) -> KmsKey {
        let mut key = KmsKey::new("byok", serde_json::from_value(serde_json::json!({})).unwrap());
        key.spec.origin = origin;
        key.spec.deletion.scheduled = scheduled;
        key.metadata.namespace = Some("apps".into());
        key.metadata.uid = Some("uid-1".into());
        key
    }

    #[test]
    fn only_a_pending_external_key_takes_an_import() {
        let pending = key(Origin::External, false);
        let owner = check_importable(&pending, None).unwrap();
        assert_eq!(
            (owner.namespace.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("apps", "byok", "uid-1")
        );
        let refused = |k: &KmsKey, existing: Option<&KmsKeyMaterial>| {
            check_importable(k, existing).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(refused(&key(Origin::Kubekms, false), None).contains("origin KUBEKMS"));
        assert!(
            refused(&key(Origin::External, true), None).contains("is PendingDeletion, not PendingImport")
        );
        // Whatever its status says: the material object decides.
        let mut forged = pending.clone();
        forged.status =
            Some(crate::api::KmsKeyStatus { state: Some(KeyState::PendingImport), ..Default::default() });
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let imported = new_material(
            &owner,
            Origin::External,
            &root,
            Some((&KeyMaterial::generate().unwrap(), VersionTrigger::Imported, None)),
            None,
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert!(refused(&forged, Some(&imported)).contains("is Enabled, not PendingImport"));
        let destroyed = new_material(
            &owner,
            Origin::External,
            &root,
            None,
            Some(Timestamp::UNIX_EPOCH),
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert!(refused(&pending, Some(&destroyed)).contains("is Destroyed, not PendingImport"));
        // An object without versions or promise (a cancelled deletion) still takes one.
        let empty = new_material(&owner, Origin::External, &root, None, None, Timestamp::UNIX_EPOCH).unwrap();
        assert!(check_importable(&pending, Some(&empty)).is_ok());
        let promised = crate::keyring::with_deletion_time(&empty, Some(Timestamp::UNIX_EPOCH));
        assert!(refused(&pending, Some(&promised)).contains("is PendingDeletion"));
    }
}
