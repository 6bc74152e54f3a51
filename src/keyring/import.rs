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

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::material::{MaterialError, Owner, with_refilled, with_version};
use crate::api::{
    ImportWrapping, ImportedMaterial, KeyState, KmsKey, KmsKeyImportSpec, KmsKeyMaterial, Origin,
    VersionTrigger,
};
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
    #[error("validTo {0} is not in the future; give a later time, or none for material that never expires")]
    InvalidValidTo(Timestamp),
    #[error(
        "this is not the material that was imported into the key before; a key whose imported material expired takes only that same material again"
    )]
    IncorrectKeyMaterial,
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
            Refusal::InvalidValidTo(_) => "InvalidValidTo",
            Refusal::IncorrectKeyMaterial => "IncorrectKeyMaterial",
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
    if let Some(valid_to) = submission.valid_to.as_ref().filter(|t| t.0 <= now) {
        return Err(Refusal::InvalidValidTo(valid_to.0));
    }
    let ciphertext =
        B64.decode(submission.encrypted_key_material.trim()).map_err(|_| Refusal::InvalidCiphertext)?;
    let sealed =
        B64.decode(&wrapping.sealed_private_key).map_err(|_| Refusal::Unwrap(ImportCryptoError::Open))?;
    let key = WrappingKey::open(root, key_id, &public, &sealed).map_err(Refusal::Unwrap)?;
    key.unwrap_material(&ciphertext).map_err(Refusal::Unwrap)
}

const COMMITMENT_PURPOSE: &[u8] = b"kubekms/v1 imported-material commitment\0";

/// The commitment to `material` imported into the key `key_id`: HMAC-SHA256 keyed by the
/// material over the keyId. Only the same material reproduces it; it tells nothing of the
/// material, and needs no root key (it outlives a root-key rotation).
pub fn commitment(material: &KeyMaterial, key_id: &str) -> String {
    B64.encode(commitment_mac(material, key_id).finalize().into_bytes())
}

fn commitment_mac(material: &KeyMaterial, key_id: &str) -> Hmac<Sha256> {
    // HMAC pads a key shorter than SHA-256's 64-byte block with zeros: this is the HMAC
    // keyed by the 32 bytes of material, without a fallible constructor.
    let mut block = Zeroizing::new([0u8; 64]);
    block[..KEY_LEN].copy_from_slice(material.expose());
    let mut mac = <Hmac<Sha256> as KeyInit>::new((&*block).into());
    mac.update(COMMITMENT_PURPOSE);
    mac.update(key_id.as_bytes());
    mac
}

/// Whether `material` may be imported into `current`: always the first time; after that
/// (the material expired) only the material it committed to, compared in constant time.
pub fn check_reimport(current: &KmsKeyMaterial, material: &KeyMaterial) -> Result<(), Refusal> {
    let Some(imported) = &current.spec.imported else { return Ok(()) };
    let expected = B64.decode(&imported.commitment).map_err(|_| Refusal::IncorrectKeyMaterial)?;
    commitment_mac(material, current.spec.key_id())
        .verify_slice(&expected)
        .map_err(|_| Refusal::IncorrectKeyMaterial)
}

/// `current` with `material` imported (checked by [`check_reimport`]), valid until
/// `valid_to` if given: the first import adds it as version 1 and records the commitment;
/// a later one fills the expired versions again under their numbers, with the new
/// validTo. The wrapping key of the import is removed.
pub fn with_imported(
    current: &KmsKeyMaterial,
    root: &RootKey,
    material: &KeyMaterial,
    valid_to: Option<Timestamp>,
    now: Timestamp,
) -> Result<KmsKeyMaterial, MaterialError> {
    let mut next = match &current.spec.imported {
        Some(_) => with_refilled(current, root, material)?,
        None => {
            let mut next = with_version(current, root, material, VersionTrigger::Imported, None, now)?;
            next.spec.imported = Some(ImportedMaterial {
                commitment: commitment(material, current.spec.key_id()),
                valid_to: None,
            });
            next
        }
    };
    if let Some(imported) = next.spec.imported.as_mut() {
        imported.valid_to = valid_to.map(Time);
    }
    next.spec.import_wrapping = None;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
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
            valid_to: None,
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
    fn a_validto_in_the_past_is_refused_before_the_wrapping_key_is_tried() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let wrapping = new_wrapping(&root, "key-a", t0).unwrap();
        let material = KeyMaterial::generate().unwrap();
        let mut good = submission(&root, "key-a", &wrapping, &material);
        for past in [t0, t0 - jiff::SignedDuration::from_secs(1)] {
            good.valid_to = Some(Time(past));
            let refusal = unwrap_submission(&root, "key-a", &wrapping, &good, t0).err().unwrap();
            assert_eq!(refusal.reason(), "InvalidValidTo");
            assert!(!refusal.failed_decryption(), "no use of the wrapping key is counted");
        }
        good.valid_to = Some(Time(t0 + jiff::SignedDuration::from_secs(1)));
        assert!(unwrap_submission(&root, "key-a", &wrapping, &good, t0).unwrap().ct_eq(&material));
    }

    fn external(root: &RootKey) -> KmsKeyMaterial {
        let owner = Owner { namespace: "apps".into(), name: "byok".into(), uid: "uid-1".into() };
        new_material(&owner, Origin::External, root, None, None, Timestamp::UNIX_EPOCH).unwrap()
    }

    #[test]
    fn imported_material_expires_and_only_the_same_material_fills_it_again() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let valid_to = t0 + jiff::SignedDuration::from_hours(1);
        let material = KeyMaterial::generate().unwrap();
        let empty = external(&root);
        assert!(
            check_reimport(&empty, &KeyMaterial::generate().unwrap()).is_ok(),
            "the first import takes any"
        );
        let imported = with_imported(&empty, &root, &material, Some(valid_to), t0).unwrap();
        let v1 = &imported.spec.versions[0];
        assert_eq!((v1.version, v1.trigger), (1, VersionTrigger::Imported));
        let recorded = imported.spec.imported.clone().unwrap();
        assert_eq!(recorded.valid_to, Some(Time(valid_to)));
        assert_eq!(recorded.commitment.len(), 44);
        // The commitment is not the material, and differs per key.
        assert_ne!(B64.decode(&recorded.commitment).unwrap(), material.expose().to_vec());
        assert_ne!(commitment(&material, "uid-1"), commitment(&material, "uid-2"));
        assert_eq!(commitment(&material, "uid-1"), recorded.commitment);

        let expired = crate::keyring::with_expired(&imported, valid_to).unwrap();
        let v1 = &expired.spec.versions[0];
        assert_eq!((v1.wrapped.as_ref(), v1.expired_at.as_ref()), (None, Some(&Time(valid_to))));
        assert!(crate::keyring::with_expired(&expired, valid_to).is_none(), "nothing is left to expire");
        assert_eq!(WrappedMaterial::from(&expired).versions, vec![], "no version is usable");
        let (state, current) = crate::api::KmsKey::new(
            "byok",
            serde_json::from_value(serde_json::json!({"origin": "EXTERNAL"})).unwrap(),
        )
        .intent()
        .state(Some(&WrappedMaterial::from(&expired)));
        assert_eq!((state, current), (KeyState::PendingImport, None));

        // Other material is refused; the same fills version 1 again, with a new validTo.
        let other = KeyMaterial::generate().unwrap();
        assert_eq!(check_reimport(&expired, &other).err().map(|r| r.reason()), Some("IncorrectKeyMaterial"));
        check_reimport(&expired, &material).unwrap();
        let again = with_imported(&expired, &root, &material, None, t0).unwrap();
        assert_eq!(again.spec.versions.len(), 1);
        let v1 = &again.spec.versions[0];
        assert_eq!((v1.version, v1.expired_at.as_ref()), (1, None));
        assert_eq!(again.spec.imported.as_ref().unwrap().valid_to, None);
        assert_eq!(again.spec.imported.as_ref().unwrap().commitment, recorded.commitment);
        let unwrapped = crate::keyring::unwrap_version(&root, &again, v1).unwrap();
        assert!(unwrapped.ct_eq(&material), "version 1 holds the same material as before");
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
