//! AWS JSON 1.1 as KMS speaks it: `POST /` with `X-Amz-Target: TrentService.<Operation>`,
//! JSON bodies whose binary fields are base64, and errors as `{"__type", "message"}` with
//! HTTP 400 (the caller's fault) or 5xx (kubekms's). Here too: the one mapping of the key
//! API's errors to AWS's error codes, key ids and ARNs, and the [`Caller`] the AWS front
//! end hands the key API with each call.

use std::sync::{Arc, Mutex};

use tonic::{Code, Status};

use crate::call::CallError;
use crate::domain::Identity;
use crate::domain::KeyOperation;
use crate::server::auth::AuthError;
use crate::server::blob::BlobError;
use crate::server::service::{ApiError, Refusal};

/// The content type of requests and answers.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// The `X-Amz-Target` prefix of KMS operations.
pub const TARGET_PREFIX: &str = "TrentService.";

/// An AWS error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AwsFault {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl AwsFault {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        AwsFault { status, code, message: message.into() }
    }

    /// The caller's fault: HTTP 400.
    pub fn client(code: &'static str, message: impl Into<String>) -> Self {
        AwsFault::new(400, code, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        AwsFault::client("ValidationException", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        AwsFault::new(500, "KMSInternalException", message)
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({ "__type": self.code, "message": self.message }).to_string().into_bytes()
    }
}

/// AWS errors go through the call pipeline like the key API's: the gRPC code names the
/// result in the audit line and the metrics, so that both APIs count alike.
impl CallError for AwsFault {
    fn status(&self) -> Status {
        let code = match self.code {
            "MissingAuthenticationTokenException"
            | "IncompleteSignatureException"
            | "InvalidSignatureException"
            | "UnrecognizedClientException"
            | "ExpiredTokenException" => Code::Unauthenticated,
            "AccessDeniedException" => Code::PermissionDenied,
            "NotFoundException" => Code::NotFound,
            "DisabledException" | "KMSInvalidStateException" => Code::FailedPrecondition,
            "AlreadyExistsException" => Code::AlreadyExists,
            "LimitExceededException" | "ThrottlingException" => Code::ResourceExhausted,
            "UnsupportedOperationException" | "UnknownOperationException" => Code::Unimplemented,
            _ if self.status >= 500 => Code::Unavailable,
            _ => Code::InvalidArgument,
        };
        Status::new(code, self.message.clone())
    }

    fn is_internal(&self) -> bool {
        self.status >= 500
    }
}

/// The AWS error for a key API error: the same decision, AWS's words. A key the caller
/// may not use and a key that does not exist get the same `AccessDeniedException` here, as
/// the key API gives both the same answer; the front end then answers `NotFoundException`
/// where that tells nothing across namespaces (`ops::refused`), from the [`RefusedKey`]
/// the [`Caller`] keeps.
pub fn fault(e: &ApiError) -> AwsFault {
    let message = e.to_string();
    match e {
        ApiError::Auth(AuthError::Throttled(_)) => AwsFault::client("ThrottlingException", message),
        ApiError::Auth(AuthError::Backend(_)) => AwsFault::new(503, "DependencyTimeoutException", message),
        ApiError::Auth(_) => AwsFault::client("UnrecognizedClientException", message),
        ApiError::KeyRequired
        | ApiError::KeyNameTooLong
        | ApiError::EmptyPlaintext
        | ApiError::PlaintextTooLarge { .. }
        | ApiError::DataKeyTooLarge { .. }
        | ApiError::RandomBytesOutOfRange { .. }
        | ApiError::GrantRequired
        | ApiError::GrantRequest(_)
        | ApiError::GrantRejected(_)
        | ApiError::Blob(BlobError::ContextPairs(_) | BlobError::ContextBytes(_)) => {
            AwsFault::validation(message)
        }
        ApiError::Blob(_) | ApiError::DecryptionFailed | ApiError::VersionNotHeld { .. } => {
            AwsFault::client("InvalidCiphertextException", message)
        }
        ApiError::WrongKey { .. } => AwsFault::client("IncorrectKeyException", message),
        ApiError::KeyRefused { .. } | ApiError::GrantRefused { .. } => {
            AwsFault::client("AccessDeniedException", message)
        }
        ApiError::KeyNotEnabled { state: "Disabled", .. } => AwsFault::client("DisabledException", message),
        ApiError::KeyNotEnabled { .. }
        | ApiError::VersionNotEnabled { .. }
        | ApiError::NoCurrentVersion(_) => AwsFault::client("KMSInvalidStateException", message),
        ApiError::GrantExists(_) => AwsFault::client("AlreadyExistsException", message),
        ApiError::TooManyGrants { .. } => AwsFault::client("LimitExceededException", message),
        ApiError::Rbac(_) | ApiError::GrantWrite(_) | ApiError::GrantCreate(_) => {
            AwsFault::new(503, "DependencyTimeoutException", message)
        }
        ApiError::InvalidKeyId(_) | ApiError::Material(_) | ApiError::Seal(_) | ApiError::Random => {
            AwsFault::internal(message)
        }
    }
}

/// The caller of a key API call that came over the AWS API, already authenticated by its
/// SigV4 signature and session; the key API records its typed error here, for the AWS
/// front end to answer with AWS's code. Only the front end creates one (tonic never puts
/// request extensions on the wire).
#[derive(Clone)]
pub struct Caller {
    pub identity: Identity,
    fault: Arc<Mutex<Option<Recorded>>>,
}

/// The error a call ended with, as the key API recorded it.
struct Recorded {
    code: Code,
    fault: AwsFault,
    refused: Option<RefusedKey>,
}

/// A key the key API refused: the name it was given, and whether a key of that name exists
/// (which the key API keeps from the caller; the front end decides what it may tell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedKey {
    pub name: String,
    pub exists: bool,
    /// The key came from a ciphertext's header (Decrypt, ReEncrypt's source), by keyId.
    pub from_ciphertext: bool,
}

impl RefusedKey {
    fn of(e: &ApiError) -> Option<RefusedKey> {
        match e {
            ApiError::KeyRefused { name, op, cause } => Some(RefusedKey {
                name: name.clone(),
                exists: !matches!(cause, Refusal::NotFound),
                from_ciphertext: matches!(op, KeyOperation::Decrypt | KeyOperation::ReEncryptFrom),
            }),
            _ => None,
        }
    }
}

impl Caller {
    pub fn new(identity: Identity) -> Self {
        Caller { identity, fault: Arc::default() }
    }

    /// Records the AWS answer for the call's error.
    pub fn record(&self, e: &ApiError) {
        if let Ok(mut slot) = self.fault.lock() {
            *slot = Some(Recorded { code: e.status().code(), fault: fault(e), refused: RefusedKey::of(e) });
        }
    }

    /// The AWS answer for the status the call ended with: the recorded one (and the key it
    /// refused, if it did) when the call ended with its own error, otherwise (the call
    /// pipeline failed it, for instance because its audit line could not be written) one
    /// from the status.
    pub fn answer(&self, status: &Status) -> (AwsFault, Option<RefusedKey>) {
        let recorded = self.fault.lock().ok().and_then(|mut s| s.take());
        match recorded {
            Some(r) if r.code == status.code() => (r.fault, r.refused),
            _ => match status.code() {
                Code::Unavailable => {
                    (AwsFault::new(503, "DependencyTimeoutException", status.message()), None)
                }
                _ => (AwsFault::internal(status.message()), None),
            },
        }
    }
}

/// The ARN of an alias.
pub fn alias_arn(region: &str, namespace: &str, name: &str) -> String {
    format!("arn:aws:kms:{region}:{namespace}:alias/{name}")
}

/// The ARN of a key.
pub fn key_arn(region: &str, namespace: &str, key_id: &str) -> String {
    format!("arn:aws:kms:{region}:{namespace}:key/{key_id}")
}

/// How a request names a key, as AWS allows it (and kubekms's `namespace/name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyName {
    /// A keyId (UUID), from a bare id or a key ARN; with the ARN's account (namespace).
    Id { key_id: String, namespace: Option<String> },
    /// `namespace/name`, kubekms's own form.
    Name(String),
    /// `alias/<name>`, or an alias ARN with its account (namespace).
    Alias { name: String, namespace: Option<String> },
}

/// Whether `name` can be a KmsAlias's name (what its CRD admits).
fn alias_name(name: &str) -> bool {
    (1..=250).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The AWS name of an alias: `alias/<name>`, when `value` is one kubekms can hold.
pub fn parse_alias_name(value: &str) -> Option<&str> {
    value.strip_prefix(crate::domain::ALIAS_PREFIX).filter(|n| alias_name(n))
}

impl KeyName {
    /// Reads a `KeyId` field.
    pub fn parse(value: &str, region: &str) -> Result<KeyName, AwsFault> {
        let not_found = || AwsFault::client("NotFoundException", format!("Invalid keyId '{value}'"));
        if value.is_empty() {
            return Err(AwsFault::validation(
                "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: Member must not be null",
            ));
        }
        if value.len() > 2048 {
            return Err(AwsFault::validation(
                "1 validation error detected: Value at 'keyId' failed to satisfy constraint: Member must have length less than or equal to 2048",
            ));
        }
        let alias_not_found = || AwsFault::client("NotFoundException", format!("Alias {value} is not found"));
        if value.starts_with("alias/") {
            let name = parse_alias_name(value).ok_or_else(alias_not_found)?;
            return Ok(KeyName::Alias { name: name.to_owned(), namespace: None });
        }
        if let Some(rest) = value.strip_prefix("arn:aws:kms:") {
            let mut parts = rest.splitn(3, ':');
            let (Some(arn_region), Some(account), Some(resource)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(not_found());
            };
            if resource.starts_with("alias/") {
                let name = parse_alias_name(resource).filter(|_| arn_region == region && !account.is_empty());
                let name = name.ok_or_else(alias_not_found)?;
                return Ok(KeyName::Alias { name: name.to_owned(), namespace: Some(account.to_owned()) });
            }
            let key_id = resource.strip_prefix("key/").ok_or_else(not_found)?;
            // No key of this kubekms lives in another region.
            if arn_region != region || uuid::Uuid::parse_str(key_id).is_err() || account.is_empty() {
                return Err(not_found());
            }
            return Ok(KeyName::Id {
                key_id: key_id.to_ascii_lowercase(),
                namespace: Some(account.to_owned()),
            });
        }
        if uuid::Uuid::parse_str(value).is_ok() && !value.contains('/') {
            return Ok(KeyName::Id { key_id: value.to_ascii_lowercase(), namespace: None });
        }
        match value.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(KeyName::Name(value.to_owned()))
            }
            _ => Err(not_found()),
        }
    }
}

/// A list operation's `Limit`: 1 to `max`, `default` when absent.
pub fn limit(value: Option<i64>, default: usize, max: usize) -> Result<usize, AwsFault> {
    match value {
        None => Ok(default),
        Some(n) if n >= 1 && usize::try_from(n).is_ok_and(|n| n <= max) => Ok(n as usize),
        Some(n) => Err(AwsFault::validation(format!(
            "1 validation error detected: Value '{n}' at 'limit' failed to satisfy constraint: \
             Member must have value between 1 and {max}"
        ))),
    }
}

/// One page of a list operation's answer: the items after `marker` (items are sorted by
/// `id`, which is also what a marker holds), at most `limit`, each written by `write`,
/// under `field`, with `Truncated` and, when more follow, `NextMarker`.
pub fn page<T>(
    field: &str,
    items: &[T],
    marker: Option<&str>,
    limit: usize,
    id: impl Fn(&T) -> &str,
    write: impl Fn(&T) -> serde_json::Value,
) -> serde_json::Value {
    let start = marker.map_or(0, |m| items.partition_point(|item| id(item) <= m));
    let shown = &items[start..items.len().min(start.saturating_add(limit))];
    let mut out = serde_json::json!({
        field: shown.iter().map(&write).collect::<Vec<_>>(),
        "Truncated": start + shown.len() < items.len(),
    });
    if start + shown.len() < items.len()
        && let Some(last) = shown.last()
    {
        out["NextMarker"] = serde_json::json!(id(last));
    }
    out
}

/// Base64 fields (`CiphertextBlob`, `Plaintext`).
pub mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|_| serde::de::Error::custom("a blob field is not valid base64"))
    }
}

/// The operation an `X-Amz-Target` names.
pub fn operation(target: Option<&str>) -> Result<&str, AwsFault> {
    target.and_then(|t| t.strip_prefix(TARGET_PREFIX)).filter(|op| !op.is_empty()).ok_or_else(|| {
        AwsFault::client("UnknownOperationException", "the X-Amz-Target header names no KMS operation")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: &str = "kubekms-local";
    const ID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

    #[test]
    fn key_ids_arns_and_names_are_read() {
        assert_eq!(KeyName::parse(ID, REGION), Ok(KeyName::Id { key_id: ID.into(), namespace: None }));
        let upper = ID.to_ascii_uppercase();
        assert_eq!(KeyName::parse(&upper, REGION), Ok(KeyName::Id { key_id: ID.into(), namespace: None }));
        let arn = key_arn(REGION, "shop", ID);
        assert_eq!(arn, format!("arn:aws:kms:kubekms-local:shop:key/{ID}"));
        assert_eq!(
            KeyName::parse(&arn, REGION),
            Ok(KeyName::Id { key_id: ID.into(), namespace: Some("shop".into()) })
        );
        assert_eq!(KeyName::parse("shop/app-data", REGION), Ok(KeyName::Name("shop/app-data".into())));
        let code = |v: &str| KeyName::parse(v, REGION).unwrap_err().code;
        assert_eq!(code(&key_arn("us-east-1", "shop", ID)), "NotFoundException", "another region");
        assert_eq!(code("arn:aws:kms:kubekms-local:shop:key/nope"), "NotFoundException");
        assert_eq!(
            KeyName::parse("arn:aws:kms:kubekms-local:shop:alias/x", REGION),
            Ok(KeyName::Alias { name: "x".into(), namespace: Some("shop".into()) })
        );
        assert_eq!(
            KeyName::parse("alias/app-data", REGION),
            Ok(KeyName::Alias { name: "app-data".into(), namespace: None })
        );
        assert_eq!(code("alias/aws/ebs"), "NotFoundException", "no alias of kubekms has a '/'");
        assert_eq!(code("alias/Upper"), "NotFoundException");
        assert_eq!(code("arn:aws:kms:us-east-1:shop:alias/x"), "NotFoundException");
        assert_eq!(code("no-such-form"), "NotFoundException");
        assert_eq!(code("a/b/c"), "NotFoundException");
        assert_eq!(code(""), "ValidationException");
        assert_eq!(code(&"x".repeat(2049)), "ValidationException");
    }

    #[test]
    fn lists_come_in_pages() {
        let items = ["a", "b", "c"];
        let first = page("Xs", &items, None, 2, |s| s, |s| serde_json::json!(s));
        assert_eq!(first, serde_json::json!({"Xs": ["a", "b"], "Truncated": true, "NextMarker": "b"}));
        let rest = page("Xs", &items, Some("b"), 2, |s| s, |s| serde_json::json!(s));
        assert_eq!(rest, serde_json::json!({"Xs": ["c"], "Truncated": false}));
        let none = page("Xs", &items, Some("z"), 2, |s| s, |s| serde_json::json!(s));
        assert_eq!(none, serde_json::json!({"Xs": [], "Truncated": false}));
        assert_eq!(limit(None, 50, 100), Ok(50));
        assert_eq!(limit(Some(100), 50, 100), Ok(100));
        for bad in [0, -1, 101] {
            assert_eq!(limit(Some(bad), 50, 100).unwrap_err().code, "ValidationException");
        }
    }

    #[test]
    fn targets_name_operations() {
        assert_eq!(operation(Some("TrentService.Encrypt")), Ok("Encrypt"));
        for bad in [None, Some("TrentService."), Some("Other.Encrypt")] {
            assert_eq!(operation(bad).unwrap_err().code, "UnknownOperationException");
        }
    }

    #[test]
    fn errors_map_to_aws_codes() {
        let code = |e: ApiError| fault(&e).code;
        assert_eq!(
            code(ApiError::KeyNotEnabled { key: "a/b".into(), state: "Disabled" }),
            "DisabledException"
        );
        assert_eq!(
            code(ApiError::KeyNotEnabled { key: "a/b".into(), state: "PendingDeletion" }),
            "KMSInvalidStateException"
        );
        assert_eq!(code(ApiError::PlaintextTooLarge { len: 4097, max: 4096 }), "ValidationException");
        assert_eq!(code(ApiError::DecryptionFailed), "InvalidCiphertextException");
        assert_eq!(code(ApiError::Blob(BlobError::TooShort(3))), "InvalidCiphertextException");
        assert_eq!(code(ApiError::Blob(BlobError::ContextPairs(65))), "ValidationException");
        assert_eq!(
            code(ApiError::WrongKey { actual: "a/b".into(), expected: "a/c".into() }),
            "IncorrectKeyException"
        );
        let absent = ApiError::KeyRefused {
            name: "a/b".into(),
            op: crate::domain::KeyOperation::Encrypt,
            cause: crate::server::service::Refusal::NotFound,
        };
        assert_eq!(fault(&absent).code, "AccessDeniedException");
        let full = fault(&ApiError::TooManyGrants { key: "a/b".into(), held: 3, max: 3 });
        assert_eq!((full.status, full.code), (400, "LimitExceededException"));
        assert_eq!(full.status().code(), tonic::Code::ResourceExhausted, "as the gRPC API answers");
        assert_eq!(fault(&ApiError::Random).status, 500);
        let body: serde_json::Value =
            serde_json::from_slice(&fault(&ApiError::DecryptionFailed).body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"__type": "InvalidCiphertextException", "message": "decryption failed"})
        );
    }

    #[test]
    fn a_caller_answers_with_its_recorded_error_only_for_its_own_status() {
        let caller = Caller::new(Identity::default());
        let e = ApiError::KeyNotEnabled { key: "a/b".into(), state: "Disabled" };
        caller.record(&e);
        assert_eq!(caller.answer(&e.status()).0.code, "DisabledException");
        caller.record(&e);
        let audit_down = Status::unavailable("the audit log cannot be written");
        assert_eq!(caller.answer(&audit_down).0.code, "DependencyTimeoutException");
        let refused = ApiError::KeyRefused {
            name: "a/b".into(),
            op: KeyOperation::ReEncryptFrom,
            cause: crate::server::service::Refusal::NotFound,
        };
        caller.record(&refused);
        let (fault, key) = caller.answer(&refused.status());
        assert_eq!(fault.code, "AccessDeniedException");
        assert_eq!(key, Some(RefusedKey { name: "a/b".into(), exists: false, from_ciphertext: true }));
    }
}
