//! The root key in a PKCS#11 token (an HSM, or SoftHSM2 in the tests): a non-extractable
//! AES-256 secret key object that never leaves the token. Key-version material is wrapped
//! and unwrapped by AES-GCM inside the token; the one derivation kubekms needs of the root
//! key (the base of the audit, cache and STS keys, see [`super::RootKey::derive`]) is an
//! AES-CMAC counter-mode KDF (NIST SP 800-108) computed inside the token once, at load.
//!
//! Each operation is one round trip to the token; kubekms makes one per key version it
//! unwraps or wraps, never one per Encrypt (versions stay unwrapped in memory).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use zeroize::Zeroizing;

use super::secret::{KEY_LEN, KeyMaterial, random_bytes};

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
/// The longest PIN file read (PKCS#11 PINs are short; this only bounds the read).
const MAX_PIN_LEN: u64 = 256;

/// Which token, and which key in it: the same for every kubekms component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The token, by label or by slot id.
    pub token: TokenSelector,
    /// A file (mode 0600 or stricter) holding the user PIN.
    pub pin_file: PathBuf,
    /// The CKA_LABEL of the root key object.
    pub key_label: String,
}

/// How the token is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Slot(u64),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token labelled {l:?}"),
            TokenSelector::Slot(s) => write!(f, "token in slot {s}"),
        }
    }
}

/// Why the token or its key could not be used. Messages name the module, token or key,
/// never the PIN.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("PIN file {path} cannot be read")]
    PinRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PIN file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    PinPermissions { path: PathBuf, mode: u32 },
    #[error("PIN file {0} is empty or not one line of UTF-8")]
    PinFormat(PathBuf),
    #[error("failed to write the private copy of the PIN to {path}")]
    PinWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load the PKCS#11 module {module}")]
    Module {
        module: PathBuf,
        #[source]
        source: CkError,
    },
    #[error("no {token} in PKCS#11 module {module}")]
    NoToken { module: PathBuf, token: TokenSelector },
    #[error("the {token} rejected the PIN in {pin_file}")]
    PinIncorrect { token: TokenSelector, pin_file: PathBuf },
    #[error("no AES secret key labelled {label:?} in the {token}")]
    NoKey { token: TokenSelector, label: String },
    #[error("{count} secret keys are labelled {label:?} in the {token}; the root key's label must be unique")]
    AmbiguousKey { token: TokenSelector, label: String, count: usize },
    #[error("a key labelled {label:?} already exists in the {token}; refusing to create another")]
    KeyExists { token: TokenSelector, label: String },
    #[error(
        "the key labelled {label:?} in the {token} is not usable as a root key: {reason} (create one with `kubekms root-key create --pkcs11-…`)"
    )]
    Unsuitable { token: TokenSelector, label: String, reason: &'static str },
    #[error("the {token} failed to {step}")]
    Token {
        token: TokenSelector,
        step: &'static str,
        #[source]
        source: CkError,
    },
    #[error("failed to generate a nonce")]
    Random(#[source] getrandom::Error),
}

/// A root key object in a token, with an open, logged-in session (reopened, and the
/// module loaded anew, when the token comes back after a failure).
pub struct Pkcs11Root {
    config: Pkcs11Config,
    pin: AuthPin,
    connection: Mutex<Connection>,
}

/// The module, the token's slot, and the session with the key's handle once opened.
struct Connection {
    context: Pkcs11,
    generation: u64,
    slot: Slot,
    session: Option<(Session, ObjectHandle)>,
}

impl std::fmt::Debug for Pkcs11Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Root")
            .field("module", &self.config.module)
            .field("token", &self.config.token)
            .field("key_label", &self.config.key_label)
            .finish_non_exhaustive()
    }
}

/// The module `path`, loaded and initialised once per process (a second `C_Initialize` of
/// the same module fails, and every root key of one module shares it), with a generation
/// that counts its reloads. With `stale`, the module of that generation is finalised and
/// loaded anew first, so that a token that went away and came back is seen again; a root
/// key of an older generation just takes the current one.
fn module(path: &Path, stale: Option<u64>) -> Result<(Pkcs11, u64), CkError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, (Pkcs11, u64)>>> = OnceLock::new();
    let mut modules =
        MODULES.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut generation = 0;
    if let Some((context, current)) = modules.get(path) {
        if stale != Some(*current) {
            return Ok((context.clone(), *current));
        }
        generation = current + 1;
        if let Some((context, _)) = modules.remove(path) {
            // The sessions of the old generation are gone either way.
            let _ = context.finalize();
        }
    }
    let context = Pkcs11::new(path)?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e),
    }
    modules.insert(path.to_owned(), (context.clone(), generation));
    Ok((context, generation))
}

/// Reads the PIN: one line, from a file only its owner may read.
fn read_pin(path: &Path) -> Result<AuthPin, Pkcs11Error> {
    let read_err = |source| Pkcs11Error::PinRead { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Pkcs11Error::PinPermissions { path: path.to_owned(), mode });
    }
    let pin = pin_line(path, file)?;
    Ok(AuthPin::from(pin.as_str()))
}

/// The one line of a PIN file, without its newline.
fn pin_line(path: &Path, file: std::fs::File) -> Result<Zeroizing<String>, Pkcs11Error> {
    let mut buf = Zeroizing::new(Vec::new());
    file.take(MAX_PIN_LEN)
        .read_to_end(&mut buf)
        .map_err(|source| Pkcs11Error::PinRead { path: path.to_owned(), source })?;
    let text = std::str::from_utf8(&buf).map_err(|_| Pkcs11Error::PinFormat(path.to_owned()))?;
    let pin = text.strip_suffix('\n').unwrap_or(text);
    if pin.is_empty() || pin.contains('\n') {
        return Err(Pkcs11Error::PinFormat(path.to_owned()));
    }
    Ok(Zeroizing::new(pin.to_owned()))
}

/// Copies a PIN file into a file only its owner may read (mode 0400), replacing it
/// atomically: a Secret volume is readable by a non-root user only through a group, which
/// [`read_pin`] refuses, so the Helm chart's init container makes this private copy.
pub fn copy_pin(from: &Path, to: &Path) -> Result<(), Pkcs11Error> {
    let file =
        std::fs::File::open(from).map_err(|source| Pkcs11Error::PinRead { path: from.to_owned(), source })?;
    let pin = pin_line(from, file)?;
    super::root::replace_private_file(to, "pin", 0o400, pin.as_bytes())
        .map_err(|source| Pkcs11Error::PinWrite { path: to.to_owned(), source })
}

impl Pkcs11Root {
    fn token_err(&self, step: &'static str) -> impl Fn(CkError) -> Pkcs11Error + '_ {
        move |source| Pkcs11Error::Token { token: self.config.token.clone(), step, source }
    }

    /// The module (loaded anew when `stale` names the generation in use) and the token's slot.
    fn attach(config: &Pkcs11Config, stale: Option<u64>) -> Result<Connection, Pkcs11Error> {
        let module_err = |source| Pkcs11Error::Module { module: config.module.clone(), source };
        let (context, generation) = module(&config.module, stale).map_err(module_err)?;
        let slots = context.get_slots_with_token().map_err(module_err)?;
        let slot = slots
            .into_iter()
            .find(|slot| match &config.token {
                TokenSelector::Slot(id) => slot.id() == *id,
                TokenSelector::Label(label) => {
                    context.get_token_info(*slot).is_ok_and(|info| info.label().trim_end() == label)
                }
            })
            .ok_or_else(|| Pkcs11Error::NoToken {
                module: config.module.clone(),
                token: config.token.clone(),
            })?;
        Ok(Connection { context, generation, slot, session: None })
    }

    /// Loads the module, finds the token and logs in; does not look for the key yet.
    fn connect(config: &Pkcs11Config) -> Result<Pkcs11Root, Pkcs11Error> {
        let pin = read_pin(&config.pin_file)?;
        let connection = Pkcs11Root::attach(config, None)?;
        let root = Pkcs11Root { config: config.clone(), pin, connection: Mutex::new(connection) };
        // Log in now, so that a wrong PIN is reported at start, not at first use.
        drop(root.login(&root.lock())?);
        Ok(root)
    }

    fn login(&self, connection: &Connection) -> Result<Session, Pkcs11Error> {
        let session =
            connection.context.open_rw_session(connection.slot).map_err(self.token_err("open a session"))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                Err(Pkcs11Error::PinIncorrect {
                    token: self.config.token.clone(),
                    pin_file: self.config.pin_file.clone(),
                })
            }
            Err(e) => Err(self.token_err("log in")(e)),
        }
    }

    fn find_key(&self, session: &Session) -> Result<Option<ObjectHandle>, Pkcs11Error> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(self.config.key_label.as_bytes().to_vec()),
        ];
        let found = session.find_objects(&template).map_err(self.token_err("search for the root key"))?;
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => Err(Pkcs11Error::AmbiguousKey {
                token: self.config.token.clone(),
                label: self.config.key_label.clone(),
                count: many.len(),
            }),
        }
    }

    /// Refuses a key that is not AES-256, is extractable or not sensitive, or may not
    /// encrypt, decrypt and sign.
    fn check_key(&self, session: &Session, key: ObjectHandle) -> Result<(), Pkcs11Error> {
        let wanted = [
            AttributeType::KeyType,
            AttributeType::ValueLen,
            AttributeType::Extractable,
            AttributeType::Sensitive,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::Sign,
        ];
        let attrs =
            session.get_attributes(key, &wanted).map_err(self.token_err("read the root key's attributes"))?;
        let unsuitable = |reason| Pkcs11Error::Unsuitable {
            token: self.config.token.clone(),
            label: self.config.key_label.clone(),
            reason,
        };
        let (mut aes, mut len, mut extractable, mut sensitive, mut ops) = (false, 0u64, true, false, 0);
        for attr in attrs {
            match attr {
                Attribute::KeyType(t) => aes = t == KeyType::AES,
                Attribute::ValueLen(l) => len = l.into(),
                Attribute::Extractable(e) => extractable = e,
                Attribute::Sensitive(s) => sensitive = s,
                Attribute::Encrypt(true) | Attribute::Decrypt(true) | Attribute::Sign(true) => ops += 1,
                _ => {}
            }
        }
        if !aes || len != KEY_LEN as u64 {
            return Err(unsuitable("it is not an AES-256 key"));
        }
        if extractable {
            return Err(unsuitable("it is extractable (CKA_EXTRACTABLE is true)"));
        }
        if !sensitive {
            return Err(unsuitable("it is not sensitive (CKA_SENSITIVE is false)"));
        }
        if ops != 3 {
            return Err(unsuitable(
                "it may not encrypt, decrypt and sign (CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN)",
            ));
        }
        Ok(())
    }

    /// Opens the token and finds the root key, refusing an unsuitable one.
    pub fn open(config: &Pkcs11Config) -> Result<Pkcs11Root, Pkcs11Error> {
        let root = Pkcs11Root::connect(config)?;
        root.with_session(|_, _| Ok(()))?;
        Ok(root)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Generates a new root key inside the token: AES-256, sensitive, never extractable.
    pub fn create(config: &Pkcs11Config) -> Result<Pkcs11Root, Pkcs11Error> {
        let root = Pkcs11Root::connect(config)?;
        let session = root.login(&root.lock())?;
        if root.find_key(&session)?.is_some() {
            return Err(Pkcs11Error::KeyExists {
                token: config.token.clone(),
                label: config.key_label.clone(),
            });
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(Ulong::from(KEY_LEN as u64)),
            Attribute::Label(config.key_label.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(true),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ];
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(root.token_err("generate the root key"))?;
        drop(session);
        root.with_session(|_, _| Ok(()))?;
        Ok(root)
    }

    /// A logged-in session with the root key's handle, the key checked.
    fn start(&self, connection: &Connection) -> Result<(Session, ObjectHandle), Pkcs11Error> {
        let session = self.login(connection)?;
        let handle = self.find_key(&session)?.ok_or_else(|| Pkcs11Error::NoKey {
            token: self.config.token.clone(),
            label: self.config.key_label.clone(),
        })?;
        self.check_key(&session, handle)?;
        Ok((session, handle))
    }

    /// Runs `f` with a logged-in session and the root key's handle.
    /// A failure drops the session, so that the next call logs in again; when the token
    /// itself fails then, the module is loaded anew once (a token that came back works
    /// again without a restart).
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session, ObjectHandle) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        let mut connection = self.lock();
        let (session, handle) = match connection.session.take() {
            Some(open) => open,
            None => match self.start(&connection) {
                Ok(open) => open,
                Err(Pkcs11Error::Token { .. }) => {
                    *connection = Pkcs11Root::attach(&self.config, Some(connection.generation))?;
                    self.start(&connection)?
                }
                Err(e) => return Err(e),
            },
        };
        let result = f(&session, handle);
        if result.is_ok() {
            connection.session = Some((session, handle));
        }
        result
    }

    /// AES-GCM inside the token: `iv ‖ ciphertext ‖ tag`.
    pub fn encrypt(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let iv: [u8; IV_LEN] = random_bytes().map_err(Pkcs11Error::Random)?;
        let sealed = self.with_session(|session, key| {
            let mut iv = iv;
            let params =
                GcmParams::new(&mut iv, aad, Ulong::from(TAG_BITS)).map_err(self.token_err("encrypt"))?;
            session.encrypt(&Mechanism::AesGcm(params), key, plaintext).map_err(self.token_err("encrypt"))
        })?;
        let mut out = Vec::with_capacity(IV_LEN + sealed.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`Pkcs11Root::encrypt`] produced. `Ok(None)` when it does not
    /// authenticate (wrong key, tampered, or another `aad`); `Err` when the token failed.
    pub fn decrypt(&self, aad: &[u8], sealed: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, Pkcs11Error> {
        let Some((iv, body)) = sealed.split_first_chunk::<IV_LEN>() else {
            return Ok(None);
        };
        self.with_session(|session, key| {
            let mut iv = *iv;
            let params =
                GcmParams::new(&mut iv, aad, Ulong::from(TAG_BITS)).map_err(self.token_err("decrypt"))?;
            match session.decrypt(&Mechanism::AesGcm(params), key, body) {
                Ok(plain) => Ok(Some(Zeroizing::new(plain))),
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::DataLenRange,
                    _,
                )) => Ok(None),
                // Tokens differ in what a failed tag returns (SoftHSM2: CKR_GENERAL_ERROR):
                // when the token still answers for the key, the material did not authenticate.
                Err(e) => match session.get_attributes(key, &[AttributeType::KeyType]) {
                    Ok(_) => Ok(None),
                    Err(_) => Err(self.token_err("decrypt")(e)),
                },
            }
        })
    }

    /// 32 bytes derived from the root key by AES-CMAC in counter mode (SP 800-108), for
    /// `label`: two CMAC calls inside the token.
    pub fn derive(&self, label: &[u8]) -> Result<KeyMaterial, Pkcs11Error> {
        let mut out = KeyMaterial::zeroed();
        self.with_session(|session, key| {
            for (i, chunk) in out.expose_mut().chunks_mut(16).enumerate() {
                let mut input = Vec::with_capacity(label.len() + 6);
                input.push(i as u8 + 1);
                input.extend_from_slice(label);
                input.push(0);
                input.extend_from_slice(&((KEY_LEN * 8) as u32).to_be_bytes());
                let mac =
                    session.sign(&Mechanism::AesCMac, key, &input).map_err(self.token_err("derive a key"))?;
                let mac = Zeroizing::new(mac);
                if mac.len() < chunk.len() {
                    return Err(Pkcs11Error::Unsuitable {
                        token: self.config.token.clone(),
                        label: self.config.key_label.clone(),
                        reason: "its AES-CMAC returned a short MAC",
                    });
                }
                chunk.copy_from_slice(&mac[..chunk.len()]);
            }
            Ok(())
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_pin_makes_a_private_file_from_a_group_readable_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::write(&shared, "1234\n").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert!(matches!(read_pin(&shared), Err(Pkcs11Error::PinPermissions { mode: 0o440, .. })));
        let private = dir.path().join("pin");
        copy_pin(&shared, &private).unwrap();
        assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(std::fs::read_to_string(&private).unwrap(), "1234");
        read_pin(&private).unwrap();
        // Again (a restarted init container): replaced, not refused.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(&shared, "5678").unwrap();
        copy_pin(&shared, &private).unwrap();
        assert_eq!(std::fs::read_to_string(&private).unwrap(), "5678");
        std::fs::write(&shared, "").unwrap();
        assert!(matches!(copy_pin(&shared, &private), Err(Pkcs11Error::PinFormat(_))));
        assert_eq!(std::fs::read_to_string(&private).unwrap(), "5678", "a bad PIN leaves the copy alone");
    }
}
