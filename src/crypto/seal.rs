//! The one AEAD construction of kubekms: AES-256-GCM under a one-time key derived with
//! HKDF-SHA256 from the long-lived key and a random 256-bit salt.
//!
//! Deriving a fresh key per message removes AES-GCM's nonce-reuse bound (about 2^32
//! random nonces per key): each derived key encrypts exactly one message, so the nonce
//! is fixed. The purpose label goes into HKDF's info, so keys derived for one format can
//! never open another. Layout: `header || salt (32) || ciphertext || tag (16)`; the
//! associated data is the length-prefixed header followed by the caller's context.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::secret::{KeyMaterial, SecretBytes, random_bytes};

const SALT_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Bytes `seal` adds to the plaintext besides the header.
pub const SEAL_OVERHEAD: usize = SALT_LEN + TAG_LEN;

/// Why sealing or opening failed. Opening has exactly one failure, whatever the cause
/// (tampering, truncation, wrong key, wrong context), so it is no oracle.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The operating system's random number generator failed.
    #[error("failed to read random bytes from the operating system")]
    Random(#[source] getrandom::Error),
    /// The AEAD refused the input (it is larger than AES-GCM allows).
    #[error("failed to encrypt")]
    Encrypt,
    /// Authentication failed.
    #[error("decryption failed")]
    Open,
}

fn cipher(key: &KeyMaterial, salt: &[u8], purpose: &[u8]) -> Result<Aes256Gcm, SealError> {
    let hk = Hkdf::<Sha256>::new(Some(salt), key.expose());
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's output limit, so this cannot fail.
    hk.expand(purpose, okm.as_mut()).map_err(|_| SealError::Encrypt)?;
    Aes256Gcm::new_from_slice(okm.as_ref()).map_err(|_| SealError::Encrypt)
}

fn associated_data(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(4 + header.len() + context.len());
    aad.extend_from_slice(&(header.len() as u32).to_be_bytes());
    aad.extend_from_slice(header);
    aad.extend_from_slice(context);
    aad
}

/// Encrypts `plaintext` under `key` for `purpose`, authenticating `header` (which leads
/// the output) and `context` (which the caller must present again to open).
pub fn seal(
    key: &KeyMaterial,
    purpose: &[u8],
    header: &[u8],
    context: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let salt: [u8; SALT_LEN] = random_bytes().map_err(SealError::Random)?;
    let aead = cipher(key, &salt, purpose)?;
    let aad = associated_data(header, context);
    let sealed = aead
        .encrypt(&Nonce::default(), Payload { msg: plaintext, aad: &aad })
        .map_err(|_| SealError::Encrypt)?;
    let mut out = Vec::with_capacity(header.len() + SALT_LEN + sealed.len());
    out.extend_from_slice(header);
    out.extend_from_slice(&salt);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens what [`seal`] produced. `header_len` is the length of the format's header, which
/// the caller has already parsed from the front of `blob`.
pub fn open(
    key: &KeyMaterial,
    purpose: &[u8],
    header_len: usize,
    context: &[u8],
    blob: &[u8],
) -> Result<SecretBytes, SealError> {
    if blob.len() < header_len + SEAL_OVERHEAD {
        return Err(SealError::Open);
    }
    let (header, rest) = blob.split_at(header_len);
    let (salt, sealed) = rest.split_at(SALT_LEN);
    let aead = cipher(key, salt, purpose)?;
    let aad = associated_data(header, context);
    let plaintext =
        aead.decrypt(&Nonce::default(), Payload { msg: sealed, aad: &aad }).map_err(|_| SealError::Open)?;
    Ok(SecretBytes::new(plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> KeyMaterial {
        KeyMaterial::from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn round_trip() {
        let blob = seal(&key(1), b"test", b"HDR", b"ctx", b"hello").unwrap();
        assert_eq!(&blob[..3], b"HDR");
        assert_eq!(blob.len(), 3 + SEAL_OVERHEAD + 5);
        let plain = open(&key(1), b"test", 3, b"ctx", &blob).unwrap();
        assert_eq!(plain.expose(), b"hello");
    }

    #[test]
    fn same_plaintext_seals_differently() {
        let a = seal(&key(1), b"test", b"", b"", b"x").unwrap();
        let b = seal(&key(1), b"test", b"", b"", b"x").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn every_mismatch_fails_the_same_way() {
        let blob = seal(&key(1), b"test", b"HDR", b"ctx", b"hello").unwrap();
        let fails = |r: Result<SecretBytes, SealError>| matches!(r, Err(SealError::Open));
        assert!(fails(open(&key(2), b"test", 3, b"ctx", &blob)), "wrong key");
        assert!(fails(open(&key(1), b"other", 3, b"ctx", &blob)), "wrong purpose");
        assert!(fails(open(&key(1), b"test", 3, b"ctx2", &blob)), "wrong context");
        assert!(fails(open(&key(1), b"test", 2, b"ctx", &blob)), "wrong header length");
        for i in 0..blob.len() {
            let mut t = blob.clone();
            t[i] ^= 0x01;
            assert!(fails(open(&key(1), b"test", 3, b"ctx", &t)), "bit flip at {i}");
        }
        for n in 0..blob.len() {
            assert!(fails(open(&key(1), b"test", 3, b"ctx", &blob[..n])), "truncated to {n}");
        }
    }

    #[test]
    fn header_and_context_are_not_interchangeable() {
        // Moving bytes between the header and the context must not verify.
        let blob = seal(&key(1), b"p", b"AB", b"C", b"m").unwrap();
        let mut moved = b"A".to_vec();
        moved.extend_from_slice(&blob[2..]);
        assert!(open(&key(1), b"p", 1, b"BC", &moved).is_err());
    }
}
