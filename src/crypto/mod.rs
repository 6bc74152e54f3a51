//! Cryptography: secret key types, the one AEAD construction every format uses, the root
//! key, and the canonical encodings bound as associated data.
//!
//! Every format carries a version byte first; every authentication failure maps to the
//! same error ([`SealError::Open`]) so callers cannot tell tampering from a wrong key.

mod canonical;
mod import;
mod pkcs11;
mod root;
mod seal;
mod secret;

pub use canonical::{CanonicalWriter, canonical_map};
pub use import::{
    IMPORT_WINDOW, ImportCryptoError, ImportToken, TokenError, WRAPPED_LEN, WRAPPING_ALGORITHM,
    WRAPPING_KEY_SPEC, WrappingKey, public_key_id, wrap_material,
};
pub use pkcs11::{Pkcs11Config, Pkcs11Error, TokenSelector, copy_pin};
pub use root::{RootKey, RootKeyConfig, RootKeyError, RootKeySource, WrapContext};
pub(crate) use root::{hex, unhex};
pub use seal::{SEAL_OVERHEAD, SealError, open, seal};
pub use secret::{KEY_LEN, KeyMaterial, SecretBytes, random_bytes};
