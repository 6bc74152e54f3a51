//! What the plugin hands kube-apiserver: the key id that names one key version, the
//! wrapped DEK seed, and the annotations stored beside it. All of it comes back years later
//! in Decrypt, from etcd, so every parser here treats its input as hostile.

use std::collections::BTreeMap;

use crate::crypto::{CanonicalWriter, KeyMaterial, SEAL_OVERHEAD, SealError, SecretBytes, open, seal};

/// The largest key id kube-apiserver accepts.
pub const MAX_KEY_ID_LEN: usize = 1024;
/// The largest ciphertext kube-apiserver accepts.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
/// The largest plaintext the plugin wraps (kube-apiserver sends a 32-byte seed).
pub const MAX_PLAINTEXT_LEN: usize = 512;
/// The most annotation bytes (keys and values) kube-apiserver accepts.
pub const MAX_ANNOTATIONS_LEN: usize = 32 * 1024;
/// The annotation that names the KmsKey, so a reader of etcd can tell which key wrapped a
/// Secret's DEK seed. Bound into the ciphertext: altering it makes Decrypt fail.
pub const KEY_ANNOTATION: &str = "key.kms.kubekms.io";

const KEY_ID_PREFIX: &str = "kubekms";
const CIPHERTEXT_FORMAT_V1: u8 = 0x01;
const HEADER_LEN: usize = 1 + 4;
const PURPOSE: &[u8] = b"kubekms/v1 kms-v2 dek-seed";

/// A key id: one version of one KmsKey, `kubekms:<keyId>:<version>`. Never reused, since a
/// keyId is a KmsKey's UID and versions only grow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyVersionId {
    pub key_id: String,
    pub version: u32,
}

impl KeyVersionId {
    pub fn new(key_id: &str, version: u32) -> Self {
        KeyVersionId { key_id: key_id.to_owned(), version }
    }

    /// The KMS v2 key id string.
    pub fn to_kms(&self) -> String {
        format!("{KEY_ID_PREFIX}:{}:{}", self.key_id, self.version)
    }

    /// Parses a KMS v2 key id; `None` for anything that is not exactly one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_KEY_ID_LEN {
            return None;
        }
        let mut parts = s.split(':');
        let (prefix, key_id, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || prefix != KEY_ID_PREFIX {
            return None;
        }
        let uuid = uuid::Uuid::try_parse(key_id).ok()?;
        // Only the canonical hyphenated lowercase form, so one version has one key id.
        if uuid.hyphenated().to_string() != key_id {
            return None;
        }
        if version.is_empty() || version.starts_with('0') || !version.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let version: u32 = version.parse().ok()?;
        Some(KeyVersionId { key_id: key_id.to_owned(), version })
    }
}

/// Why a Decrypt input is refused before any key is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("ciphertext is empty")]
    Empty,
    #[error("ciphertext is {0} bytes; the most is {MAX_CIPHERTEXT_LEN}")]
    TooLong(usize),
    #[error("ciphertext is {0} bytes, too short to be a kubekms ciphertext")]
    TooShort(usize),
    #[error("ciphertext has unknown format version {0}")]
    UnknownFormat(u8),
    #[error("ciphertext is for key version {found}, but key_id names version {expected}")]
    VersionMismatch { found: u32, expected: u32 },
    #[error("annotation key {0:?} is not a fully qualified domain name")]
    AnnotationKey(String),
    #[error("annotations are {0} bytes; the most is {MAX_ANNOTATIONS_LEN}")]
    AnnotationsTooLarge(usize),
}

/// The associated data: the key id and the annotations, canonically encoded.
fn context(id: &KeyVersionId, annotations: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    CanonicalWriter::new().str(&id.to_kms()).bytes_map(annotations).finish()
}

/// The annotations Encrypt returns for a key.
pub fn annotations_for(key_display: &str) -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([(KEY_ANNOTATION.to_owned(), key_display.as_bytes().to_vec())])
}

/// Wraps `plaintext` under one key version.
pub fn wrap(
    material: &KeyMaterial,
    id: &KeyVersionId,
    annotations: &BTreeMap<String, Vec<u8>>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = CIPHERTEXT_FORMAT_V1;
    header[1..].copy_from_slice(&id.version.to_be_bytes());
    seal(material, PURPOSE, &header, &context(id, annotations), plaintext)
}

/// Checks a ciphertext's structure against the key id it came with.
pub fn check_ciphertext(ciphertext: &[u8], id: &KeyVersionId) -> Result<(), FormatError> {
    match ciphertext.len() {
        0 => return Err(FormatError::Empty),
        n if n > MAX_CIPHERTEXT_LEN => return Err(FormatError::TooLong(n)),
        n if n < HEADER_LEN + SEAL_OVERHEAD + 1 => return Err(FormatError::TooShort(n)),
        _ => {}
    }
    if ciphertext[0] != CIPHERTEXT_FORMAT_V1 {
        return Err(FormatError::UnknownFormat(ciphertext[0]));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&ciphertext[1..HEADER_LEN]);
    let found = u32::from_be_bytes(version);
    if found != id.version {
        return Err(FormatError::VersionMismatch { found, expected: id.version });
    }
    Ok(())
}

/// Unwraps a ciphertext whose structure [`check_ciphertext`] accepted. Any authentication
/// failure (tampering, wrong key, altered annotations) is the same [`SealError::Open`].
pub fn unwrap(
    material: &KeyMaterial,
    id: &KeyVersionId,
    annotations: &BTreeMap<String, Vec<u8>>,
    ciphertext: &[u8],
) -> Result<SecretBytes, SealError> {
    open(material, PURPOSE, HEADER_LEN, &context(id, annotations), ciphertext)
}

/// Checks annotations as kube-apiserver does: keys are fully qualified domain names, and
/// keys and values total at most 32 KiB.
pub fn check_annotations(annotations: &BTreeMap<String, Vec<u8>>) -> Result<(), FormatError> {
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ANNOTATIONS_LEN {
        return Err(FormatError::AnnotationsTooLarge(total));
    }
    match annotations.keys().find(|k| !is_fqdn(k)) {
        Some(k) => Err(FormatError::AnnotationKey(k.clone())),
        None => Ok(()),
    }
}

/// A fully qualified domain name as Kubernetes validates it: at least two labels of
/// lowercase letters, digits and hyphens (not at either end), at most 253 characters.
pub fn is_fqdn(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

    fn key() -> KeyMaterial {
        KeyMaterial::from_slice(&[9; 32]).unwrap()
    }

    #[test]
    fn key_ids_round_trip_and_reject_lookalikes() {
        let id = KeyVersionId::new(UID, 3);
        assert_eq!(id.to_kms(), format!("kubekms:{UID}:3"));
        assert_eq!(KeyVersionId::parse(&id.to_kms()), Some(id));
        for bad in [
            "",
            "kubekms",
            &format!("kubekms:{UID}"),
            &format!("kubekms:{UID}:"),
            &format!("kubekms:{UID}:0"),
            &format!("kubekms:{UID}:03"),
            &format!("kubekms:{UID}:-1"),
            &format!("kubekms:{UID}:+1"),
            &format!("kubekms:{UID}:4294967296"),
            &format!("kubekms:{UID}:1:2"),
            &format!("other:{UID}:1"),
            &format!("kubekms:{}:1", UID.to_uppercase()),
            &format!("kubekms:{}:1", UID.replace('-', "")),
            "kubekms:not-a-uuid:1",
            &"k".repeat(2000),
        ] {
            assert_eq!(KeyVersionId::parse(bad), None, "{bad:?}");
        }
        assert!(id_len_fits());
    }

    fn id_len_fits() -> bool {
        KeyVersionId::new(UID, u32::MAX).to_kms().len() <= MAX_KEY_ID_LEN
    }

    #[test]
    fn wrap_fits_the_api_server_limit_and_round_trips() {
        let id = KeyVersionId::new(UID, 1);
        let ann = annotations_for("ns/k");
        let ct = wrap(&key(), &id, &ann, &[7; 32]).unwrap();
        assert!(ct.len() <= MAX_CIPHERTEXT_LEN);
        let ct_max = wrap(&key(), &id, &ann, &[7; MAX_PLAINTEXT_LEN]).unwrap();
        assert!(ct_max.len() <= MAX_CIPHERTEXT_LEN);
        check_ciphertext(&ct, &id).unwrap();
        assert_eq!(unwrap(&key(), &id, &ann, &ct).unwrap().expose(), &[7; 32]);
    }

    #[test]
    fn altered_annotations_key_id_or_bytes_fail() {
        let id = KeyVersionId::new(UID, 1);
        let ann = annotations_for("ns/k");
        let ct = wrap(&key(), &id, &ann, b"seed").unwrap();
        assert!(unwrap(&key(), &id, &annotations_for("ns/other"), &ct).is_err());
        assert!(unwrap(&key(), &id, &BTreeMap::new(), &ct).is_err());
        let mut more = ann.clone();
        more.insert("extra.example.com".into(), b"x".to_vec());
        assert!(unwrap(&key(), &id, &more, &ct).is_err());
        let other_key = KeyVersionId::new("7ece15cd-0195-4985-aff9-395763ad0a3b", 1);
        assert!(unwrap(&key(), &other_key, &ann, &ct).is_err());
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 0x80;
            let rejected = check_ciphertext(&t, &id).is_err() || unwrap(&key(), &id, &ann, &t).is_err();
            assert!(rejected, "flip at {i} accepted");
        }
    }

    #[test]
    fn structure_errors_are_precise() {
        let id = KeyVersionId::new(UID, 2);
        assert_eq!(check_ciphertext(&[], &id), Err(FormatError::Empty));
        assert_eq!(check_ciphertext(&[1; 2000], &id), Err(FormatError::TooLong(2000)));
        assert_eq!(check_ciphertext(&[1; 10], &id), Err(FormatError::TooShort(10)));
        let ct = wrap(&key(), &KeyVersionId::new(UID, 1), &BTreeMap::new(), b"x").unwrap();
        assert_eq!(check_ciphertext(&ct, &id), Err(FormatError::VersionMismatch { found: 1, expected: 2 }));
        let mut future = ct.clone();
        future[0] = 2;
        assert_eq!(check_ciphertext(&future, &id), Err(FormatError::UnknownFormat(2)));
    }

    #[test]
    fn annotation_keys_must_be_fqdns() {
        assert!(is_fqdn("key.kms.kubekms.io"));
        assert!(is_fqdn("a.b"));
        for bad in
            ["", "single", "UPPER.example.com", "-a.b", "a-.b", "a..b", "a_b.c", "a/b.c", &"a.".repeat(200)]
        {
            assert!(!is_fqdn(bad), "{bad:?}");
        }
        let big = BTreeMap::from([("a.b".to_owned(), vec![0; MAX_ANNOTATIONS_LEN])]);
        assert!(matches!(check_annotations(&big), Err(FormatError::AnnotationsTooLarge(_))));
        check_annotations(&annotations_for("ns/k")).unwrap();
    }
}
