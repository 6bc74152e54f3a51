//! The STS side: `AssumeRoleWithWebIdentity` exchanges a ServiceAccount token for
//! temporary AWS credentials, and those credentials are checked again on every KMS call —
//! statelessly, so any replica verifies a session and nothing is stored per session.
//!
//! - The session token is an AEAD-sealed blob ([`crate::crypto::seal`], under a key derived
//!   from the root key with its own purpose label) carrying the access key id, the
//!   ServiceAccount's identity as TokenReview gave it, and the expiry.
//! - The access key id is random (`ASIA` + 16 base32 characters); the secret access key is
//!   HMAC-SHA256 of the access key id under another derived key, so only kubekms can
//!   compute it, from the access key id alone.
//!
//! This module is pure: the TokenReview happens in the HTTP layer; here are the request's
//! parameters, the role ARN rule, the sessions and the XML answers.

use std::collections::BTreeMap;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::{KeyMaterial, RootKey, SealError, open, seal};
use crate::domain::Identity;

const TOKEN_FORMAT_V1: u8 = 0x01;
const TOKEN_PURPOSE: &[u8] = b"kubekms/v1 aws session token";
const SECRET_PURPOSE: &[u8] = b"kubekms/v1 aws secret access key";
/// The longest session token accepted, before it is decoded.
pub const MAX_SESSION_TOKEN_LEN: usize = 8192;
/// AWS's bounds of `DurationSeconds`, and its default.
pub const MIN_DURATION_SECONDS: i64 = 900;
pub const MAX_DURATION_SECONDS: i64 = 43_200;
pub const DEFAULT_DURATION_SECONDS: i64 = 3600;
/// STS's XML namespace.
const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

/// The keys sessions are sealed and their secrets derived with: the primary root key's,
/// then each previous root key's, so that a session issued before a root-key rotation
/// stays valid (with its secret) until it expires. New sessions use the primary's.
pub struct SessionKeys {
    seal: KeyMaterial,
    secret: KeyMaterial,
    previous: Vec<(KeyMaterial, KeyMaterial)>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// What a session token says, once opened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Session {
    #[serde(rename = "k")]
    pub access_key_id: String,
    #[serde(rename = "u")]
    pub username: String,
    #[serde(rename = "i", default)]
    pub uid: String,
    #[serde(rename = "g", default)]
    pub groups: Vec<String>,
    #[serde(rename = "x", default)]
    pub extra: BTreeMap<String, Vec<String>>,
    /// Unix seconds.
    #[serde(rename = "e")]
    pub expires: i64,
}

impl Session {
    /// The identity calls under this session are authorized as.
    pub fn identity(&self) -> Identity {
        Identity {
            username: self.username.clone(),
            uid: self.uid.clone(),
            groups: self.groups.clone(),
            extra: self.extra.clone(),
        }
    }
}

/// Temporary credentials, as `AssumeRoleWithWebIdentity` returns them.
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: String,
    /// Unix seconds.
    pub expires: i64,
}

/// Why a session token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Not a token kubekms sealed, or not for this access key id
    /// (`UnrecognizedClientException`).
    #[error("The security token included in the request is invalid.")]
    Invalid,
    /// Sealed by kubekms, and expired (`ExpiredTokenException`).
    #[error("The security token included in the request is expired")]
    Expired,
}

impl SessionError {
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Invalid => "UnrecognizedClientException",
            SessionError::Expired => "ExpiredTokenException",
        }
    }
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

impl SessionKeys {
    /// Keys derived from the root key: every replica with the same root key derives the
    /// same ones.
    pub fn from_root(root: &RootKey) -> Self {
        let previous =
            root.derive_all(TOKEN_PURPOSE).into_iter().zip(root.derive_all(SECRET_PURPOSE)).skip(1).collect();
        let (seal, secret) = (root.derive(TOKEN_PURPOSE), root.derive(SECRET_PURPOSE));
        SessionKeys { seal, secret, previous }
    }

    /// The secret access key of `access_key_id`, for a session the primary root key sealed.
    pub fn secret(&self, access_key_id: &str) -> Zeroizing<String> {
        secret_under(&self.secret, access_key_id)
    }
}

/// The secret access key of `access_key_id` under the secret-derivation key `key`.
fn secret_under(key: &KeyMaterial, access_key_id: &str) -> Zeroizing<String> {
    let mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()) {
        Ok(mut mac) => {
            mac.update(access_key_id.as_bytes());
            Zeroizing::new(mac.finalize().into_bytes().to_vec())
        }
        // HMAC takes keys of any length; never taken.
        Err(_) => Zeroizing::new(Vec::new()),
    };
    Zeroizing::new(base64::engine::general_purpose::STANDARD_NO_PAD.encode(mac.as_slice()))
}

impl SessionKeys {
    /// New credentials for `identity`, valid until `expires` (Unix seconds).
    pub fn issue(&self, identity: &Identity, expires: i64) -> Result<Credentials, SealError> {
        let random: [u8; 10] = crate::crypto::random_bytes().map_err(SealError::Random)?;
        // 80 random bits, 5 bits per character.
        let mut bits: u128 = random.iter().fold(0, |acc, b| (acc << 8) | u128::from(*b));
        let mut id = String::with_capacity(20);
        id.push_str("ASIA");
        let mut chars = [0u8; 16];
        for c in chars.iter_mut().rev() {
            *c = BASE32[(bits & 31) as usize];
            bits >>= 5;
        }
        id.extend(chars.iter().map(|c| char::from(*c)));
        let session = Session {
            access_key_id: id.clone(),
            username: identity.username.clone(),
            uid: identity.uid.clone(),
            groups: identity.groups.clone(),
            extra: identity.extra.clone(),
            expires,
        };
        let plaintext = Zeroizing::new(serde_json::to_vec(&session).map_err(|_| SealError::Encrypt)?);
        let sealed = seal(&self.seal, TOKEN_PURPOSE, &[TOKEN_FORMAT_V1], id.as_bytes(), &plaintext)?;
        Ok(Credentials {
            secret_access_key: self.secret(&id),
            access_key_id: id,
            session_token: base64::engine::general_purpose::STANDARD.encode(sealed),
            expires,
        })
    }

    /// Opens the session token sent with a request signed by `access_key_id`, at `now`;
    /// with the secret access key the request must be signed with (that of the root key,
    /// primary or previous, that sealed the session).
    pub fn open(
        &self,
        token: &str,
        access_key_id: &str,
        now: i64,
    ) -> Result<(Session, Zeroizing<String>), SessionError> {
        if token.len() > MAX_SESSION_TOKEN_LEN {
            return Err(SessionError::Invalid);
        }
        let sealed =
            base64::engine::general_purpose::STANDARD.decode(token).map_err(|_| SessionError::Invalid)?;
        if sealed.first() != Some(&TOKEN_FORMAT_V1) {
            return Err(SessionError::Invalid);
        }
        // The access key id is bound as associated data: a token opens only with its own.
        let previous = self.previous.iter().map(|(seal, secret)| (seal, secret));
        let mut keys = std::iter::once((&self.seal, &self.secret)).chain(previous);
        let (plaintext, secret) = keys
            .find_map(|(seal, secret)| {
                let plaintext = open(seal, TOKEN_PURPOSE, 1, access_key_id.as_bytes(), &sealed).ok()?;
                Some((plaintext, secret))
            })
            .ok_or(SessionError::Invalid)?;
        let session: Session =
            serde_json::from_slice(plaintext.expose()).map_err(|_| SessionError::Invalid)?;
        if session.access_key_id != access_key_id {
            return Err(SessionError::Invalid);
        }
        if session.expires <= now {
            return Err(SessionError::Expired);
        }
        Ok((session, secret_under(secret, access_key_id)))
    }
}

/// An STS error, as STS's query protocol answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl StsError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        StsError { status, code, message: message.into() }
    }

    fn sender(code: &'static str, message: impl Into<String>) -> Self {
        StsError::new(400, code, message)
    }

    /// The `ErrorResponse` document.
    pub fn xml(&self, request_id: &str) -> String {
        let kind = if self.status >= 500 { "Receiver" } else { "Sender" };
        format!(
            "<ErrorResponse xmlns=\"{XMLNS}\"><Error><Type>{kind}</Type><Code>{}</Code><Message>{}</Message>\
             </Error><RequestId>{}</RequestId></ErrorResponse>",
            self.code,
            xml_escape(&self.message),
            xml_escape(request_id)
        )
    }
}

/// Escapes text for an XML element.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A parsed `AssumeRoleWithWebIdentity` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRequest {
    pub role: RoleArn,
    pub role_arn: String,
    pub token: String,
    pub session_name: String,
    pub duration_seconds: i64,
}

/// `arn:aws:iam::<namespace>:role/<serviceaccount>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArn {
    pub namespace: String,
    pub service_account: String,
}

impl RoleArn {
    pub fn parse(arn: &str) -> Option<RoleArn> {
        let rest = arn.strip_prefix("arn:aws:iam::")?;
        let (namespace, role) = rest.split_once(':')?;
        let service_account = role.strip_prefix("role/")?;
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        (dns_label(namespace) && dns_label(service_account))
            .then(|| RoleArn { namespace: namespace.to_owned(), service_account: service_account.to_owned() })
    }

    /// The role ARN of a ServiceAccount.
    pub fn of(namespace: &str, service_account: &str) -> String {
        format!("arn:aws:iam::{namespace}:role/{service_account}")
    }

    /// Whether `who` is this role's ServiceAccount.
    pub fn names(&self, who: &Identity) -> bool {
        who.username == crate::domain::service_account_username(&self.namespace, &self.service_account)
    }
}

/// The parameters of a query-protocol request (a form body or a query string), decoded.
pub fn parse_params(encoded: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(encoded).into_owned().collect()
}

/// Reads an `AssumeRoleWithWebIdentity` request from its parameters.
pub fn assume_request(params: &BTreeMap<String, String>) -> Result<AssumeRequest, StsError> {
    match params.get("Action").map(String::as_str) {
        Some("AssumeRoleWithWebIdentity") => {}
        Some(other) => {
            return Err(StsError::sender(
                "InvalidAction",
                format!(
                    "Could not find operation {other} for version 2011-06-15; kubekms's STS serves AssumeRoleWithWebIdentity only"
                ),
            ));
        }
        None => return Err(StsError::sender("MissingAction", "Missing Action")),
    }
    if let Some(v) = params.get("Version").filter(|v| *v != "2011-06-15") {
        return Err(StsError::sender("InvalidAction", format!("Could not find operation for version {v}")));
    }
    let required = |name: &str| {
        params.get(name).filter(|v| !v.is_empty()).cloned().ok_or_else(|| {
            StsError::sender("MissingParameter", format!("The request must contain the parameter {name}"))
        })
    };
    let role_arn = required("RoleArn")?;
    let token = required("WebIdentityToken")?;
    let session_name = required("RoleSessionName")?;
    if !(2..=64).contains(&session_name.len())
        || !session_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    {
        return Err(StsError::sender(
            "ValidationError",
            "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint: \
             Member must have length 2-64 and match [\\w+=,.@-]*",
        ));
    }
    if token.len() < 4 || token.len() > 20_000 {
        return Err(StsError::sender(
            "ValidationError",
            "1 validation error detected: Value at 'webIdentityToken' failed to satisfy constraint: \
             Member must have length 4-20000",
        ));
    }
    let role = RoleArn::parse(&role_arn).ok_or_else(|| {
        StsError::sender(
            "ValidationError",
            format!("RoleArn {role_arn:?} is not arn:aws:iam::<namespace>:role/<serviceaccount>"),
        )
    })?;
    let duration_seconds = match params.get("DurationSeconds") {
        None => DEFAULT_DURATION_SECONDS,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|d| (MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(d))
            .ok_or_else(|| {
                StsError::sender(
                    "ValidationError",
                    format!(
                        "1 validation error detected: Value '{v}' at 'durationSeconds' failed to satisfy \
                         constraint: Member must have value between {MIN_DURATION_SECONDS} and {MAX_DURATION_SECONDS}"
                    ),
                )
            })?,
    };
    Ok(AssumeRequest { role, role_arn, token, session_name, duration_seconds })
}

/// When a session for a request at `now` ends: after the requested duration, but never
/// after `max_seconds` from now nor after the web identity token's own expiry.
pub fn session_expiry(now: i64, requested: i64, max_seconds: i64, token_expiry: Option<i64>) -> i64 {
    let end = now.saturating_add(requested.min(max_seconds));
    token_expiry.map_or(end, |exp| end.min(exp))
}

/// The `AssumeRoleWithWebIdentityResponse` document.
pub fn assume_response(
    request: &AssumeRequest,
    credentials: &Credentials,
    subject: &str,
    audience: &str,
    request_id: &str,
) -> String {
    let expiration = jiff::Timestamp::from_second(credentials.expires)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    let role = &request.role;
    let session = xml_escape(&request.session_name);
    format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"{XMLNS}\"><AssumeRoleWithWebIdentityResult>\
         <SubjectFromWebIdentityToken>{}</SubjectFromWebIdentityToken><Audience>{}</Audience>\
         <AssumedRoleUser><Arn>arn:aws:sts::{}:assumed-role/{}/{session}</Arn>\
         <AssumedRoleId>{}:{session}</AssumedRoleId></AssumedRoleUser>\
         <Credentials><SessionToken>{}</SessionToken><SecretAccessKey>{}</SecretAccessKey>\
         <Expiration>{expiration}</Expiration><AccessKeyId>{}</AccessKeyId></Credentials>\
         <Provider>kubernetes.default.svc</Provider></AssumeRoleWithWebIdentityResult>\
         <ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>",
        xml_escape(subject),
        xml_escape(audience),
        role.namespace,
        role.service_account,
        xml_escape(&format!("{}:{}", role.namespace, role.service_account)),
        credentials.session_token,
        credentials.secret_access_key.as_str(),
        credentials.access_key_id,
        xml_escape(request_id),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SessionKeys {
        SessionKeys::from_root(&RootKey::from_material(KeyMaterial::from_slice(&[7; 32]).unwrap()))
    }

    fn who() -> Identity {
        Identity {
            username: "system:serviceaccount:shop:web".into(),
            uid: "u-1".into(),
            groups: vec!["system:serviceaccounts".into(), "system:serviceaccounts:shop".into()],
            extra: BTreeMap::from([("authentication.kubernetes.io/pod-name".into(), vec!["web-0".into()])]),
        }
    }

    #[test]
    fn a_session_opens_on_any_replica_with_the_same_root_key() {
        let creds = keys().issue(&who(), 2_000).unwrap();
        assert!(creds.access_key_id.starts_with("ASIA") && creds.access_key_id.len() == 20);
        assert!(creds.access_key_id.bytes().all(|b| BASE32.contains(&b)));
        let replica = keys();
        let (session, secret) = replica.open(&creds.session_token, &creds.access_key_id, 1_000).unwrap();
        assert_eq!(*secret, *creds.secret_access_key);
        assert_eq!(session.identity(), who());
        assert_eq!(session.expires, 2_000);
        assert_eq!(*replica.secret(&creds.access_key_id), *creds.secret_access_key);
        let other = keys().issue(&who(), 2_000).unwrap();
        assert_ne!(other.access_key_id, creds.access_key_id);
        assert_ne!(*other.secret_access_key, *creds.secret_access_key);
    }

    #[test]
    fn a_session_sealed_before_a_root_key_rotation_opens_with_its_own_secret() {
        let key = |b: u8| RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap());
        let before = keys().issue(&who(), 2_000).unwrap();
        let rotated = SessionKeys::from_root(&key(9).with_previous(key(7)).unwrap());
        let (session, secret) = rotated.open(&before.session_token, &before.access_key_id, 1_000).unwrap();
        assert_eq!(session.identity(), who());
        assert_eq!(
            *secret, *before.secret_access_key,
            "signed with the secret issued under the old root key"
        );
        // New sessions are the new root key's: the old one alone does not open them.
        let after = rotated.issue(&who(), 2_000).unwrap();
        let (_, secret) = rotated.open(&after.session_token, &after.access_key_id, 1_000).unwrap();
        assert_eq!(*secret, *after.secret_access_key);
        assert_eq!(
            keys().open(&after.session_token, &after.access_key_id, 1_000),
            Err(SessionError::Invalid)
        );
        // Once the old root key is removed, its sessions no longer open.
        let only_new = SessionKeys::from_root(&key(9));
        assert_eq!(
            only_new.open(&before.session_token, &before.access_key_id, 1_000),
            Err(SessionError::Invalid)
        );
    }

    #[test]
    fn forged_moved_and_expired_sessions_are_refused() {
        let k = keys();
        let creds = k.issue(&who(), 2_000).unwrap();
        assert_eq!(k.open(&creds.session_token, &creds.access_key_id, 2_000), Err(SessionError::Expired));
        assert_eq!(SessionError::Expired.code(), "ExpiredTokenException");
        let other = k.issue(&who(), 2_000).unwrap();
        assert_eq!(k.open(&creds.session_token, &other.access_key_id, 1_000), Err(SessionError::Invalid));
        let foreign =
            SessionKeys::from_root(&RootKey::from_material(KeyMaterial::from_slice(&[8; 32]).unwrap()));
        assert_eq!(
            foreign.open(&creds.session_token, &creds.access_key_id, 1_000),
            Err(SessionError::Invalid)
        );
        let mut raw = base64::engine::general_purpose::STANDARD.decode(&creds.session_token).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert_eq!(k.open(&tampered, &creds.access_key_id, 1_000), Err(SessionError::Invalid));
        for junk in ["", "not base64!", "AAAA", &"A".repeat(MAX_SESSION_TOKEN_LEN + 4)] {
            assert_eq!(k.open(junk, &creds.access_key_id, 1_000), Err(SessionError::Invalid), "{junk:.10}");
        }
        assert_eq!(SessionError::Invalid.code(), "UnrecognizedClientException");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_session_tokens_never_open(token in "[A-Za-z0-9+/=]{0,400}", id in "[A-Z0-9]{0,24}") {
            proptest::prop_assert!(keys().open(&token, &id, 0).is_err());
        }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", "arn:aws:iam::shop:role/web"),
            ("WebIdentityToken", "eyJhbGciOi.x.y"),
            ("RoleSessionName", "botocore-session-1"),
        ]
    }

    #[test]
    fn requests_are_read_and_checked() {
        let req = assume_request(&params(&good())).unwrap();
        assert_eq!(req.role, RoleArn { namespace: "shop".into(), service_account: "web".into() });
        assert_eq!(req.duration_seconds, DEFAULT_DURATION_SECONDS);
        assert!(req.role.names(&who()));
        assert!(!RoleArn::parse("arn:aws:iam::shop:role/db").unwrap().names(&who()));
        let with = |k: &'static str, v: &'static str| {
            let mut p = good();
            p.retain(|(n, _)| *n != k);
            p.push((k, v));
            assume_request(&params(&p)).unwrap_err().code
        };
        assert_eq!(with("Action", "AssumeRole"), "InvalidAction");
        assert_eq!(with("RoleArn", "arn:aws:iam::123:user/x"), "ValidationError");
        assert_eq!(with("RoleArn", "arn:aws:iam::Shop:role/web"), "ValidationError");
        assert_eq!(with("RoleSessionName", "a"), "ValidationError");
        assert_eq!(with("RoleSessionName", "a b"), "ValidationError");
        assert_eq!(with("DurationSeconds", "899"), "ValidationError");
        assert_eq!(with("DurationSeconds", "x"), "ValidationError");
        assert_eq!(with("WebIdentityToken", ""), "MissingParameter");
        let mut p = good();
        p.retain(|(n, _)| *n != "Action");
        assert_eq!(assume_request(&params(&p)).unwrap_err().code, "MissingAction");
        assert_eq!(parse_params(b"A=b%2Fc&D=e+f")["A"], "b/c");
    }

    #[test]
    fn a_session_ends_at_the_earliest_bound() {
        assert_eq!(session_expiry(1_000, 3600, 3600, None), 4_600);
        assert_eq!(session_expiry(1_000, 43_200, 3600, None), 4_600, "the configured maximum");
        assert_eq!(session_expiry(1_000, 3600, 7200, Some(2_000)), 2_000, "the token's expiry");
        assert_eq!(session_expiry(1_000, 900, 7200, Some(9_000)), 1_900);
    }

    #[test]
    fn the_answers_are_sts_documents() {
        let req = assume_request(&params(&good())).unwrap();
        let creds = keys().issue(&who(), 1_764_633_600).unwrap();
        let xml = assume_response(&req, &creds, "system:serviceaccount:shop:web", "kubekms", "r-1");
        assert!(xml.contains("<Expiration>2025-12-02T00:00:00Z</Expiration>"), "{xml}");
        assert!(xml.contains("<Arn>arn:aws:sts::shop:assumed-role/web/botocore-session-1</Arn>"));
        assert!(xml.contains(&format!("<AccessKeyId>{}</AccessKeyId>", creds.access_key_id)));
        let err = StsError::new(403, "AccessDenied", "a <b> & c").xml("r-2");
        assert!(
            err.contains(
                "<Type>Sender</Type><Code>AccessDenied</Code><Message>a &lt;b&gt; &amp; c</Message>"
            )
        );
    }
}
