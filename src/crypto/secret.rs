//! Secret bytes: zeroized on drop, redacted in `Debug`, never compared with `==`.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of every symmetric key kubekms handles: 256 bits.
pub const KEY_LEN: usize = 32;

/// 256-bit key material (a root key, a key version, a data key). Lives only in memory,
/// is wiped when dropped, prints as `KeyMaterial(<redacted>)`, and has no `PartialEq`:
/// compare with [`KeyMaterial::ct_eq`].
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial([u8; KEY_LEN]);

impl KeyMaterial {
    /// New material from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = KeyMaterial::zeroed();
        getrandom::fill(&mut key.0)?;
        Ok(key)
    }

    /// All-zero material, to be filled in place (so no copy of the bytes escapes).
    pub(crate) fn zeroed() -> Self {
        KeyMaterial([0u8; KEY_LEN])
    }

    /// The raw bytes, to fill in place.
    pub(crate) fn expose_mut(&mut self) -> &mut [u8; KEY_LEN] {
        &mut self.0
    }

    /// Takes ownership of exactly 32 bytes; the caller's copy should be zeroizing too.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(KeyMaterial(array))
    }

    /// The raw bytes, for the cipher that uses them.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &KeyMaterial) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(<redacted>)")
    }
}

/// Plaintext of any length that must not outlive its use (a decrypted payload, a data
/// key on its way to the caller): zeroized on drop, redacted in `Debug`.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps bytes that are already secret.
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        SecretBytes::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// `N` random bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let key = KeyMaterial::from_slice(&[0xAB; 32]).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "KeyMaterial(<redacted>)");
        assert!(!shown.contains("ab") && !shown.contains("171"));
        let secret = SecretBytes::new(b"hunter2".to_vec());
        assert_eq!(format!("{secret:?}"), "SecretBytes(<7 bytes redacted>)");
    }

    #[test]
    fn generated_keys_differ_and_compare_in_constant_time() {
        let a = KeyMaterial::generate().unwrap();
        let b = KeyMaterial::generate().unwrap();
        assert!(!a.ct_eq(&b));
        assert!(a.ct_eq(&a.clone()));
    }

    #[test]
    fn wrong_length_is_refused() {
        assert!(KeyMaterial::from_slice(&[0; 31]).is_none());
        assert!(KeyMaterial::from_slice(&[0; 33]).is_none());
    }
}
