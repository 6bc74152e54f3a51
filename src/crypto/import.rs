//! Import without the root key: a wrapping key pair per import window, and the token that
//! binds a submission to its key, its wrapping key and the window's end.
//!
//! The controller generates an RSA-3072 key pair for a key that waits for its material,
//! publishes the public half and keeps the private half only sealed under a key derived
//! from the root key. The importer wraps the 256-bit material with RSAES-OAEP (SHA-256,
//! MGF1-SHA-256, no label) — `kubekms key import` or any standard tool — and submits it
//! with the token; the controller checks the token, unwraps and wraps the material under
//! the root key. RSA comes from AWS-LC (constant-time OAEP decryption); every failed
//! decryption is the one [`ImportCryptoError::Decryption`], so it reveals nothing about
//! why the padding did not check.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::canonical::CanonicalWriter;
use super::root::RootKey;
use super::seal::{SealError, open, seal};
use super::secret::{KEY_LEN, KeyMaterial};

/// The wrapping algorithm, in AWS KMS's name.
pub const WRAPPING_ALGORITHM: &str = "RSAES_OAEP_SHA_256";
/// The wrapping key's spec, in AWS KMS's name.
pub const WRAPPING_KEY_SPEC: &str = "RSA_3072";
/// The length of wrapped material: one RSA-3072 block.
pub const WRAPPED_LEN: usize = 384;
/// How long a wrapping key and its token are valid, as in AWS KMS.
pub const IMPORT_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// The purpose of the key derived from the root key that seals wrapping private keys.
const SEAL_PURPOSE: &[u8] = b"kubekms import wrapping key v1";
/// The purpose of the key derived from the root key that authenticates import tokens.
const TOKEN_PURPOSE: &[u8] = b"kubekms import token v1";
const SEAL_FORMAT: u8 = 1;
const TOKEN_FORMAT: u8 = 1;
const MAC_LEN: usize = 32;
/// A token's largest size: format, keyId length and keyId (≤ 64), wrapping key id, expiry, MAC.
const MAX_TOKEN_LEN: usize = 1 + 1 + 64 + 32 + 8 + MAC_LEN;

/// Why a wrapping-key or token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportCryptoError {
    #[error("failed to generate the RSA-3072 wrapping key")]
    Generate,
    #[error("failed to seal the wrapping private key")]
    Seal(#[source] SealError),
    #[error("the sealed wrapping private key does not open under this root key")]
    Open,
    #[error("the wrapping public key is not an RSA-3072 public key (DER SubjectPublicKeyInfo)")]
    PublicKey,
    #[error("failed to wrap the key material")]
    Wrap,
    #[error("the wrapped key material must be {WRAPPED_LEN} bytes (one RSA-3072 block); got {0} bytes")]
    WrappedLength(usize),
    #[error("the wrapped key material does not decrypt with the wrapping key (RSAES_OAEP_SHA_256)")]
    Decryption,
    #[error("the wrapped key material decrypts to {0} bytes; it must be exactly {KEY_LEN} bytes")]
    MaterialLength(usize),
}

/// The private half of a wrapping key (with its public half). Never stored as it is:
/// [`WrappingKey::seal`] encrypts it under a key derived from the root key.
pub struct WrappingKey {
    private: PrivateDecryptingKey,
    public_der: Vec<u8>,
}

impl std::fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappingKey").field("id", &super::hex(&self.id())).finish_non_exhaustive()
    }
}

impl WrappingKey {
    /// A fresh RSA-3072 key pair.
    pub fn generate() -> Result<WrappingKey, ImportCryptoError> {
        let private =
            PrivateDecryptingKey::generate(KeySize::Rsa3072).map_err(|_| ImportCryptoError::Generate)?;
        WrappingKey::from_private(private).ok_or(ImportCryptoError::Generate)
    }

    fn from_private(private: PrivateDecryptingKey) -> Option<WrappingKey> {
        let public_der = private.public_key().as_der().ok()?.as_ref().to_vec();
        Some(WrappingKey { private, public_der })
    }

    /// The public half, DER SubjectPublicKeyInfo (what AWS KMS's `PublicKey` holds).
    pub fn public_der(&self) -> &[u8] {
        &self.public_der
    }

    /// The wrapping key's identifier: SHA-256 of its public half.
    pub fn id(&self) -> [u8; 32] {
        public_key_id(&self.public_der)
    }

    /// The private half sealed for the key `key_id`, to store where only kubekms reads.
    pub fn seal(&self, root: &RootKey, key_id: &str) -> Result<Vec<u8>, ImportCryptoError> {
        let pkcs8 = self.private_pkcs8()?;
        let context = seal_context(key_id, &self.id());
        seal(&root.derive(SEAL_PURPOSE), SEAL_PURPOSE, &[SEAL_FORMAT], &context, &pkcs8)
            .map_err(ImportCryptoError::Seal)
    }

    fn private_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>, ImportCryptoError> {
        // AWS-LC's DER buffer is zeroized on drop; so is this copy.
        let der = self.private.as_der().map_err(|_| ImportCryptoError::Generate)?;
        Ok(Zeroizing::new(der.as_ref().to_vec()))
    }

    /// Opens what [`WrappingKey::seal`] produced for `key_id`, whose public half is
    /// `public_der`. Anything else — another key, another wrapping key, another root key,
    /// tampering — is [`ImportCryptoError::Open`].
    pub fn open(
        root: &RootKey,
        key_id: &str,
        public_der: &[u8],
        sealed: &[u8],
    ) -> Result<WrappingKey, ImportCryptoError> {
        let context = seal_context(key_id, &public_key_id(public_der));
        if sealed.first() != Some(&SEAL_FORMAT) {
            return Err(ImportCryptoError::Open);
        }
        // Sealed before a root-key rotation, it opens under the previous root key until the
        // window ends.
        let pkcs8 = root
            .derive_all(SEAL_PURPOSE)
            .iter()
            .find_map(|k| open(k, SEAL_PURPOSE, 1, &context, sealed).ok())
            .ok_or(ImportCryptoError::Open)?;
        let private =
            PrivateDecryptingKey::from_pkcs8(pkcs8.expose()).map_err(|_| ImportCryptoError::Open)?;
        let key = WrappingKey::from_private(private).ok_or(ImportCryptoError::Open)?;
        if key.public_der != public_der || key.private.key_size_bits() != 3072 {
            return Err(ImportCryptoError::Open);
        }
        Ok(key)
    }

    /// Unwraps submitted material: exactly one RSA-3072 block that decrypts, with
    /// RSAES-OAEP SHA-256, to exactly 32 bytes.
    pub fn unwrap_material(&self, wrapped: &[u8]) -> Result<KeyMaterial, ImportCryptoError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(ImportCryptoError::WrappedLength(wrapped.len()));
        }
        let private =
            OaepPrivateDecryptingKey::new(self.private.clone()).map_err(|_| ImportCryptoError::Decryption)?;
        let mut out = Zeroizing::new(vec![0u8; private.min_output_size()]);
        let plain = private
            .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut out, None)
            .map_err(|_| ImportCryptoError::Decryption)?;
        let len = plain.len();
        KeyMaterial::from_slice(plain).ok_or(ImportCryptoError::MaterialLength(len))
    }
}

/// Wraps `material` under the public wrapping key `public_der` (DER SubjectPublicKeyInfo,
/// RSA-3072) with RSAES-OAEP SHA-256, as the importer does.
pub fn wrap_material(public_der: &[u8], material: &KeyMaterial) -> Result<Vec<u8>, ImportCryptoError> {
    let public = PublicEncryptingKey::from_der(public_der).map_err(|_| ImportCryptoError::PublicKey)?;
    if public.key_size_bits() != 3072 {
        return Err(ImportCryptoError::PublicKey);
    }
    let public = OaepPublicEncryptingKey::new(public).map_err(|_| ImportCryptoError::PublicKey)?;
    let mut out = vec![0u8; public.ciphertext_size()];
    let len = public
        .encrypt(&OAEP_SHA256_MGF1SHA256, material.expose(), &mut out, None)
        .map_err(|_| ImportCryptoError::Wrap)?
        .len();
    out.truncate(len);
    Ok(out)
}

/// The identifier of a wrapping public key: SHA-256 of its DER.
pub fn public_key_id(public_der: &[u8]) -> [u8; 32] {
    Sha256::digest(public_der).into()
}

fn seal_context(key_id: &str, wrapping_key_id: &[u8; 32]) -> Vec<u8> {
    CanonicalWriter::new().str(key_id).bytes(wrapping_key_id).finish()
}

/// What an import token says: which key, which wrapping key, valid until when. Issued by
/// the controller with a MAC under a key derived from the root key; only the controller
/// can issue or check one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportToken {
    pub key_id: String,
    pub wrapping_key_id: [u8; 32],
    pub not_after: Timestamp,
}

/// Why a token was refused before anything about its key was compared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the import token is not one kubekms issued (malformed)")]
    Malformed,
    #[error("the import token was not issued by this kubekms (its MAC does not verify under this root key)")]
    Forged,
}

impl ImportToken {
    /// The token as published: base64 of format, keyId, wrapping key id, expiry and MAC.
    pub fn issue(&self, root: &RootKey) -> String {
        let body = self.body();
        let mut token = body.clone();
        token.extend_from_slice(&token_mac(root, &body));
        STANDARD.encode(token)
    }

    fn body(&self) -> Vec<u8> {
        let mut body = vec![TOKEN_FORMAT];
        let id = self.key_id.as_bytes();
        // keyIds are UUIDs (36 bytes); a longer one is cut to the schema's bound of 64.
        let id = &id[..id.len().min(64)];
        body.push(id.len() as u8);
        body.extend_from_slice(id);
        body.extend_from_slice(&self.wrapping_key_id);
        body.extend_from_slice(&self.not_after.as_second().to_be_bytes());
        body
    }

    /// Reads a token and checks that this root key issued it. Whether it names the right
    /// key and wrapping key and is still valid is the caller's comparison.
    pub fn verify(root: &RootKey, token: &str) -> Result<ImportToken, TokenError> {
        if token.len() > MAX_TOKEN_LEN * 2 {
            return Err(TokenError::Malformed);
        }
        let raw = STANDARD.decode(token.trim()).map_err(|_| TokenError::Malformed)?;
        if raw.len() < 2 + 32 + 8 + MAC_LEN || raw[0] != TOKEN_FORMAT {
            return Err(TokenError::Malformed);
        }
        let id_len = usize::from(raw[1]);
        if raw.len() != 2 + id_len + 32 + 8 + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, mac) = raw.split_at(raw.len() - MAC_LEN);
        // Issued before a root-key rotation, it verifies under the previous root key.
        let issued_here = root.derive_all(TOKEN_PURPOSE).iter().any(|k| {
            <Hmac<Sha256> as KeyInit>::new_from_slice(k.expose())
                .map(|mut check| {
                    check.update(body);
                    check.verify_slice(mac).is_ok()
                })
                .unwrap_or(false)
        });
        if !issued_here {
            return Err(TokenError::Forged);
        }
        let key_id = String::from_utf8(body[2..2 + id_len].to_vec()).map_err(|_| TokenError::Malformed)?;
        let rest = &body[2 + id_len..];
        let wrapping_key_id: [u8; 32] = rest[..32].try_into().map_err(|_| TokenError::Malformed)?;
        let seconds: [u8; 8] = rest[32..40].try_into().map_err(|_| TokenError::Malformed)?;
        let not_after =
            Timestamp::from_second(i64::from_be_bytes(seconds)).map_err(|_| TokenError::Malformed)?;
        Ok(ImportToken { key_id, wrapping_key_id, not_after })
    }
}

fn token_mac(root: &RootKey, body: &[u8]) -> [u8; MAC_LEN] {
    // An HMAC takes a key of any length, so this cannot fail; an empty MAC would never verify.
    match <Hmac<Sha256> as KeyInit>::new_from_slice(root.derive(TOKEN_PURPOSE).expose()) {
        Ok(mut mac) => {
            mac.update(body);
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0u8; MAC_LEN],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> RootKey {
        RootKey::from_material(KeyMaterial::generate().unwrap())
    }

    #[test]
    fn material_round_trips_through_a_sealed_wrapping_key() {
        let (root, key) = (root(), WrappingKey::generate().unwrap());
        let sealed = key.seal(&root, "key-1").unwrap();
        let reopened = WrappingKey::open(&root, "key-1", key.public_der(), &sealed).unwrap();
        let material = KeyMaterial::generate().unwrap();
        let wrapped = wrap_material(key.public_der(), &material).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert!(reopened.unwrap_material(&wrapped).unwrap().ct_eq(&material));
        // RSAES-OAEP is randomized: the same material never wraps the same way twice.
        assert_ne!(wrap_material(key.public_der(), &material).unwrap(), wrapped);
    }

    #[test]
    fn the_sealed_private_key_opens_only_for_its_key_wrapping_key_and_root() {
        let (root, key) = (root(), WrappingKey::generate().unwrap());
        let sealed = key.seal(&root, "key-1").unwrap();
        let other = WrappingKey::generate().unwrap();
        let refused = |r: &RootKey, id: &str, public: &[u8], sealed: &[u8]| {
            matches!(WrappingKey::open(r, id, public, sealed), Err(ImportCryptoError::Open))
        };
        assert!(refused(&root, "key-2", key.public_der(), &sealed), "another key");
        assert!(refused(&root, "key-1", other.public_der(), &sealed), "another public half");
        assert!(refused(&self::root(), "key-1", key.public_der(), &sealed), "another root key");
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(refused(&root, "key-1", key.public_der(), &tampered), "tampered");
        assert!(refused(&root, "key-1", key.public_der(), &sealed[..sealed.len() - 1]), "truncated");
        assert!(refused(&root, "key-1", key.public_der(), &[]), "empty");
        // The sealed form holds no plaintext PKCS#8 (whose RSA header starts 30 82).
        let pkcs8 = key.private_pkcs8().unwrap();
        assert!(!sealed.windows(16).any(|w| w == &pkcs8[..16]));
    }

    #[test]
    fn a_wrapping_key_and_token_made_before_a_root_key_rotation_still_serve_it() {
        let (old, key) = (root(), WrappingKey::generate().unwrap());
        let sealed = key.seal(&old, "key-1").unwrap();
        let token = ImportToken {
            key_id: "key-1".into(),
            wrapping_key_id: public_key_id(key.public_der()),
            not_after: Timestamp::from_second(2_000_000_000).unwrap(),
        };
        let issued = token.issue(&old);
        let new = root();
        assert!(WrappingKey::open(&new, "key-1", key.public_der(), &sealed).is_err());
        assert_eq!(ImportToken::verify(&new, &issued), Err(TokenError::Forged));
        let rotated = new.with_previous(old).unwrap();
        assert!(WrappingKey::open(&rotated, "key-1", key.public_der(), &sealed).is_ok());
        assert_eq!(ImportToken::verify(&rotated, &issued).unwrap(), token);
        // What the rotated root key makes, it makes under its primary.
        let fresh = token.issue(&rotated);
        assert_ne!(fresh, issued);
    }

    #[test]
    fn bad_submissions_are_refused_precisely() {
        let key = WrappingKey::generate().unwrap();
        let material = KeyMaterial::generate().unwrap();
        let mut wrapped = wrap_material(key.public_der(), &material).unwrap();
        assert!(matches!(key.unwrap_material(&wrapped[..383]), Err(ImportCryptoError::WrappedLength(383))));
        assert!(matches!(key.unwrap_material(&[]), Err(ImportCryptoError::WrappedLength(0))));
        wrapped[100] ^= 0x40;
        assert!(matches!(key.unwrap_material(&wrapped), Err(ImportCryptoError::Decryption)));
        // Wrapped under another wrapping key.
        let other = WrappingKey::generate().unwrap();
        let foreign = wrap_material(other.public_der(), &material).unwrap();
        assert!(matches!(key.unwrap_material(&foreign), Err(ImportCryptoError::Decryption)));
        // Material of the wrong size, wrapped correctly: the size is named.
        let public = PublicEncryptingKey::from_der(key.public_der()).unwrap();
        let public = OaepPublicEncryptingKey::new(public).unwrap();
        for size in [16usize, 31, 33, 64] {
            let mut out = vec![0u8; WRAPPED_LEN];
            let n = public.encrypt(&OAEP_SHA256_MGF1SHA256, &vec![7u8; size], &mut out, None).unwrap().len();
            assert!(
                matches!(key.unwrap_material(&out[..n]), Err(ImportCryptoError::MaterialLength(s)) if s == size)
            );
        }
        // Only an RSA-3072 public key wraps.
        assert!(matches!(wrap_material(b"not a key", &material), Err(ImportCryptoError::PublicKey)));
        let small = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let small = small.public_key().as_der().unwrap();
        assert!(matches!(wrap_material(small.as_ref(), &material), Err(ImportCryptoError::PublicKey)));
    }

    #[test]
    fn a_token_verifies_only_under_its_root_key_and_unchanged() {
        let root = root();
        let token = ImportToken {
            key_id: "0b2c6c3e-8d7e-4a2b-9a61-0f3c2d1e5a77".into(),
            wrapping_key_id: [9u8; 32],
            not_after: Timestamp::from_second(1_900_000_000).unwrap(),
        };
        let issued = token.issue(&root);
        assert_eq!(ImportToken::verify(&root, &issued), Ok(token.clone()));
        assert_eq!(token.issue(&root), issued, "the same window's token is the same (status does not churn)");
        assert_eq!(ImportToken::verify(&self::root(), &issued), Err(TokenError::Forged));
        let mut raw = STANDARD.decode(&issued).unwrap();
        raw[40] ^= 1;
        assert_eq!(ImportToken::verify(&root, &STANDARD.encode(&raw)), Err(TokenError::Forged));
        raw.pop();
        assert_eq!(ImportToken::verify(&root, &STANDARD.encode(&raw)), Err(TokenError::Malformed));
        assert_eq!(ImportToken::verify(&root, "not base64!"), Err(TokenError::Malformed));
        assert_eq!(ImportToken::verify(&root, ""), Err(TokenError::Malformed));
        assert_eq!(ImportToken::verify(&root, &"A".repeat(4096)), Err(TokenError::Malformed));
    }
}
