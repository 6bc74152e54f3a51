//! The key API's ciphertext blob: self-describing, so Decrypt needs no key name.
//!
//! `0x01 | keyId (16 bytes, the UUID) | version (u32, big endian) | salt | ciphertext | tag`.
//! The header is authenticated, and so is the encryption context (canonically encoded),
//! which the caller must present again to decrypt.

use std::collections::BTreeMap;

use crate::crypto::{KeyMaterial, SEAL_OVERHEAD, SealError, SecretBytes, canonical_map, open, seal};

const FORMAT_V1: u8 = 0x01;
const HEADER_LEN: usize = 1 + 16 + 4;
const PURPOSE: &[u8] = b"kubekms/v1 key-api ciphertext";
/// The most plaintext Encrypt takes (as AWS KMS).
pub const MAX_PLAINTEXT_LEN: usize = 4096;
/// The largest blob any operation produces (a data key of up to 1024 bytes, or 4 KiB of
/// plaintext, plus overhead).
pub const MAX_BLOB_LEN: usize = HEADER_LEN + SEAL_OVERHEAD + MAX_PLAINTEXT_LEN;
/// The most encryption-context pairs.
pub const MAX_CONTEXT_PAIRS: usize = 64;
/// The most bytes of encryption context (keys and values), as AWS KMS.
pub const MAX_CONTEXT_BYTES: usize = 8192;

/// Which key version a blob is under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobHeader {
    /// The keyId (hyphenated lowercase UUID).
    pub key_id: String,
    pub version: u32,
}

/// Why a blob or a context is refused before any key is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("ciphertext blob is empty")]
    Empty,
    #[error("ciphertext blob is {0} bytes; the most is {MAX_BLOB_LEN}")]
    TooLong(usize),
    #[error("ciphertext blob is {0} bytes, too short to be a kubekms ciphertext")]
    TooShort(usize),
    #[error("ciphertext blob has unknown format version {0}")]
    UnknownFormat(u8),
    #[error("ciphertext blob names key version 0, which never exists")]
    VersionZero,
    #[error("encryption context has {0} pairs; the most is {MAX_CONTEXT_PAIRS}")]
    ContextPairs(usize),
    #[error("encryption context is {0} bytes; the most is {MAX_CONTEXT_BYTES}")]
    ContextBytes(usize),
}

/// Checks an encryption context's size.
pub fn check_context(context: &BTreeMap<String, String>) -> Result<(), BlobError> {
    if context.len() > MAX_CONTEXT_PAIRS {
        return Err(BlobError::ContextPairs(context.len()));
    }
    let bytes: usize = context.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_CONTEXT_BYTES {
        return Err(BlobError::ContextBytes(bytes));
    }
    Ok(())
}

fn header(key_id: &uuid::Uuid, version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = FORMAT_V1;
    h[1..17].copy_from_slice(key_id.as_bytes());
    h[17..].copy_from_slice(&version.to_be_bytes());
    h
}

/// Encrypts `plaintext` under one key version, bound to `context`.
pub fn seal_blob(
    material: &KeyMaterial,
    key_id: &uuid::Uuid,
    version: u32,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal(material, PURPOSE, &header(key_id, version), &canonical_map(context), plaintext)
}

/// Reads the header of an untrusted blob.
pub fn parse_header(blob: &[u8]) -> Result<BlobHeader, BlobError> {
    match blob.len() {
        0 => return Err(BlobError::Empty),
        n if n > MAX_BLOB_LEN => return Err(BlobError::TooLong(n)),
        n if n < HEADER_LEN + SEAL_OVERHEAD => return Err(BlobError::TooShort(n)),
        _ => {}
    }
    if blob[0] != FORMAT_V1 {
        return Err(BlobError::UnknownFormat(blob[0]));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&blob[1..17]);
    let mut version = [0u8; 4];
    version.copy_from_slice(&blob[17..HEADER_LEN]);
    let version = u32::from_be_bytes(version);
    if version == 0 {
        return Err(BlobError::VersionZero);
    }
    Ok(BlobHeader { key_id: uuid::Uuid::from_bytes(uuid).hyphenated().to_string(), version })
}

/// Decrypts a blob whose header [`parse_header`] read, with the version's material.
pub fn open_blob(
    material: &KeyMaterial,
    context: &BTreeMap<String, String>,
    blob: &[u8],
) -> Result<SecretBytes, SealError> {
    open(material, PURPOSE, HEADER_LEN, &canonical_map(context), blob)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn uid() -> uuid::Uuid {
        uuid::Uuid::parse_str("6ece15cd-0195-4985-aff9-395763ad0a3b").unwrap()
    }

    #[test]
    fn round_trip_and_self_description() {
        let key = KeyMaterial::generate().unwrap();
        let blob = seal_blob(&key, &uid(), 7, &ctx(&[("tenant", "acme")]), b"secret").unwrap();
        assert_eq!(blob.len(), HEADER_LEN + SEAL_OVERHEAD + 6);
        let h = parse_header(&blob).unwrap();
        assert_eq!(h, BlobHeader { key_id: uid().to_string(), version: 7 });
        assert_eq!(open_blob(&key, &ctx(&[("tenant", "acme")]), &blob).unwrap().expose(), b"secret");
        assert!(open_blob(&key, &ctx(&[("tenant", "other")]), &blob).is_err(), "wrong context");
        assert!(open_blob(&key, &ctx(&[]), &blob).is_err(), "missing context");
        assert!(open_blob(&KeyMaterial::generate().unwrap(), &ctx(&[("tenant", "acme")]), &blob).is_err());
        // The header is authenticated: moving the blob to another version fails.
        let mut moved = blob.clone();
        moved[20] ^= 1;
        assert!(open_blob(&key, &ctx(&[("tenant", "acme")]), &moved).is_err());
    }

    #[test]
    fn structural_errors_are_precise() {
        assert_eq!(parse_header(&[]), Err(BlobError::Empty));
        assert_eq!(parse_header(&[1; 10]), Err(BlobError::TooShort(10)));
        assert_eq!(parse_header(&vec![1; MAX_BLOB_LEN + 1]), Err(BlobError::TooLong(MAX_BLOB_LEN + 1)));
        assert_eq!(parse_header(&[2; 80]), Err(BlobError::UnknownFormat(2)));
        let mut zero = vec![1u8; 80];
        zero[17..21].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(parse_header(&zero), Err(BlobError::VersionZero));
        let many: BTreeMap<String, String> = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(check_context(&many), Err(BlobError::ContextPairs(65)));
        assert_eq!(check_context(&ctx(&[("k", &"v".repeat(8192))])), Err(BlobError::ContextBytes(8193)));
    }

    proptest! {
        #[test]
        fn arbitrary_blobs_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let key = KeyMaterial::from_slice(&[1; 32]).unwrap();
            let accepted = parse_header(&bytes).is_ok() && open_blob(&key, &BTreeMap::new(), &bytes).is_ok();
            prop_assert!(!accepted);
        }

        #[test]
        fn any_change_to_a_genuine_blob_is_caught(
            plaintext in proptest::collection::vec(any::<u8>(), 0..200),
            index in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let key = KeyMaterial::from_slice(&[1; 32]).unwrap();
            let blob = seal_blob(&key, &uid(), 1, &BTreeMap::new(), &plaintext).unwrap();
            let mut changed = blob.clone();
            changed[index.index(blob.len())] ^= flip;
            let ok = parse_header(&changed).is_ok() && open_blob(&key, &BTreeMap::new(), &changed).is_ok();
            prop_assert!(!ok);
        }
    }
}
