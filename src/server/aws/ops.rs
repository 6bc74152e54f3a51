//! The KMS operations over AWS JSON 1.1: each reads AWS's request shape, turns it into the
//! key API's request and calls the same service the gRPC API serves — so authorization,
//! the key's state, the cryptography, the audit line and the metrics are the gRPC API's —
//! then answers in AWS's shape. Ciphertexts are the key API's blobs, so a ciphertext from
//! either API decrypts through the other. Operations the key API has no call for
//! (ListKeys) go through the same call pipeline here.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use super::AwsApi;
use super::protocol::{AwsFault, Caller, KeyName, b64, key_arn};
use crate::audit::AuditEvent;
use crate::domain::{Identity, KeyState, VersionCause, VersionMade};
use crate::proto::keyapi::key_service_server::KeyService;
use crate::proto::keyapi::{self as pb, KeyVersionRef};
use crate::server::auth::TokenReviewer;
use crate::server::authz::RbacChecker;
use crate::server::directory::KeyDirectory;
use crate::server::service::GrantWriter;

/// The only encryption algorithm of a symmetric key.
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
/// The operations served, by their AWS names (every other name is unknown).
pub const OPERATIONS: &[&str] = &[
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateRandom",
    "DescribeKey",
    "ListKeys",
    "GetKeyRotationStatus",
    "ListKeyRotations",
    "CreateGrant",
    "RetireGrant",
];

/// Fields common to the cryptographic requests, checked the same way everywhere.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Common {
    #[serde(default)]
    dry_run: Option<bool>,
    #[serde(default)]
    recipient: Option<Value>,
}

impl Common {
    fn check(&self) -> Result<(), AwsFault> {
        if self.dry_run == Some(true) {
            return Err(AwsFault::client("UnsupportedOperationException", "kubekms does not serve DryRun"));
        }
        if self.recipient.is_some() {
            return Err(AwsFault::client(
                "UnsupportedOperationException",
                "kubekms does not serve Recipient (Nitro Enclaves attestation)",
            ));
        }
        Ok(())
    }
}

fn algorithm(field: &str, value: Option<&str>) -> Result<(), AwsFault> {
    match value {
        None | Some(SYMMETRIC_DEFAULT) => Ok(()),
        Some(other) => Err(AwsFault::client(
            "InvalidKeyUsageException",
            format!("{field} {other} is not supported; kubekms keys are SYMMETRIC_DEFAULT"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EncryptIn {
    key_id: Option<String>,
    #[serde(with = "b64")]
    plaintext: Vec<u8>,
    #[serde(default)]
    encryption_context: HashMap<String, String>,
    encryption_algorithm: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DecryptIn {
    #[serde(with = "b64")]
    ciphertext_blob: Vec<u8>,
    #[serde(default)]
    encryption_context: HashMap<String, String>,
    key_id: Option<String>,
    encryption_algorithm: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReEncryptIn {
    #[serde(with = "b64")]
    ciphertext_blob: Vec<u8>,
    #[serde(default)]
    source_encryption_context: HashMap<String, String>,
    source_key_id: Option<String>,
    destination_key_id: Option<String>,
    #[serde(default)]
    destination_encryption_context: HashMap<String, String>,
    source_encryption_algorithm: Option<String>,
    destination_encryption_algorithm: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DataKeyIn {
    key_id: Option<String>,
    #[serde(default)]
    encryption_context: HashMap<String, String>,
    number_of_bytes: Option<i64>,
    key_spec: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RandomIn {
    number_of_bytes: Option<i64>,
    custom_key_store_id: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyIdIn {
    key_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListKeyRotationsIn {
    key_id: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListKeysIn {
    limit: Option<i64>,
    marker: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ConstraintsIn {
    #[serde(default)]
    encryption_context_subset: HashMap<String, String>,
    #[serde(default)]
    encryption_context_equals: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateGrantIn {
    key_id: Option<String>,
    grantee_principal: Option<String>,
    retiring_principal: Option<String>,
    #[serde(default)]
    operations: Vec<String>,
    constraints: Option<ConstraintsIn>,
    name: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RetireGrantIn {
    grant_token: Option<String>,
    key_id: Option<String>,
    grant_id: Option<String>,
    #[serde(flatten)]
    common: Common,
}

pub(super) fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, AwsFault> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    // The message names where, never what: a value could be secret.
    serde_json::from_slice(body).map_err(|e| {
        AwsFault::client(
            "SerializationException",
            format!(
                "failed to read the request body ({:?} at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })
}

/// `AES_256`, `AES_128` or `NumberOfBytes` (1–1024): exactly one.
/// Decodes the JSON body of the KMS operation `op` (one of [`OPERATIONS`]) into its
/// request, and checks the fields every request shares, as [`AwsApi::operation`] does
/// before it looks at any key. The entry point of the AWS request decoder's fuzz target.
pub fn decode_request(op: &str, body: &[u8]) -> Result<(), AwsFault> {
    match op {
        "Encrypt" => parse::<EncryptIn>(body)?.common.check(),
        "Decrypt" => parse::<DecryptIn>(body)?.common.check(),
        "ReEncrypt" => parse::<ReEncryptIn>(body)?.common.check(),
        "GenerateDataKey" | "GenerateDataKeyWithoutPlaintext" => parse::<DataKeyIn>(body)?.common.check(),
        "GenerateRandom" => parse::<RandomIn>(body)?.common.check(),
        "DescribeKey" | "GetKeyRotationStatus" => parse::<KeyIdIn>(body).map(drop),
        "ListKeyRotations" => parse::<ListKeyRotationsIn>(body).map(drop),
        "ListKeys" => parse::<ListKeysIn>(body).map(drop),
        "CreateGrant" => parse::<CreateGrantIn>(body)?.common.check(),
        "RetireGrant" => parse::<RetireGrantIn>(body)?.common.check(),
        other => Err(unknown_operation(other)),
    }
}

fn unknown_operation(op: &str) -> AwsFault {
    AwsFault::client("UnknownOperationException", format!("kubekms does not serve the KMS operation {op:?}"))
}

fn data_key_bytes(spec: Option<&str>, number: Option<i64>) -> Result<u32, AwsFault> {
    match (spec, number) {
        (Some("AES_256"), None) => Ok(32),
        (Some("AES_128"), None) => Ok(16),
        (Some(other), None) => Err(AwsFault::validation(format!(
            "1 validation error detected: Value '{other}' at 'keySpec' failed to satisfy constraint: \
             Member must satisfy enum value set: [AES_256, AES_128]"
        ))),
        (None, Some(n)) => random_bytes(Some(n)),
        _ => Err(AwsFault::validation("Please specify either number of bytes or key spec.")),
    }
}

fn random_bytes(number: Option<i64>) -> Result<u32, AwsFault> {
    match number {
        Some(n @ 1..=1024) => Ok(n as u32),
        Some(n) => Err(AwsFault::validation(format!(
            "1 validation error detected: Value '{n}' at 'numberOfBytes' failed to satisfy constraint: \
             Member must have value between 1 and 1024"
        ))),
        None => Err(AwsFault::validation(
            "1 validation error detected: Value null at 'numberOfBytes' failed to satisfy constraint: \
             Member must not be null",
        )),
    }
}

/// AWS's name for a key state (a destroyed key, which AWS would not find, is Unavailable).
fn aws_state(state: &str) -> &'static str {
    match state {
        "Creating" => "Creating",
        "Enabled" => "Enabled",
        "Disabled" => "Disabled",
        "PendingDeletion" => "PendingDeletion",
        "PendingImport" => "PendingImport",
        _ => "Unavailable",
    }
}

fn epoch(rfc3339: &str) -> Option<i64> {
    rfc3339.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The caller's namespace (its AWS account), if it is a ServiceAccount.
pub fn account(who: &Identity) -> Option<&str> {
    let rest = who.username.strip_prefix("system:serviceaccount:")?;
    rest.split_once(':').map(|(ns, _)| ns)
}

/// AWS principals a grant may name: a role ARN (`arn:aws:iam::<ns>:role/<sa>`), an
/// assumed-role ARN of one, or kubekms's `system:serviceaccount:<ns>:<sa>`; anything else
/// is a Kubernetes user name.
pub(super) fn principal(value: &str) -> pb::Principal {
    let sa = |ns: &str, name: &str| pb::Principal {
        kind: "ServiceAccount".into(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    };
    if let Some(role) = super::sts::RoleArn::parse(value) {
        return sa(&role.namespace, &role.service_account);
    }
    if let Some((ns, rest)) = value.strip_prefix("arn:aws:sts::").and_then(|r| r.split_once(":assumed-role/"))
        && let Some((name, _session)) = rest.split_once('/')
    {
        return sa(ns, name);
    }
    if let Some((ns, name)) = value.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) {
        return sa(ns, name);
    }
    pb::Principal { kind: "User".into(), name: value.to_owned(), namespace: String::new() }
}

impl<T, R, D, G> AwsApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory + Clone,
    G: GrantWriter,
{
    /// The key API's name for a key an AWS request names. A key ARN must name the key's
    /// own account; otherwise the ARN itself is passed on, which names no key, so that the
    /// key API refuses it as it refuses every key the caller may not use.
    pub(super) fn key_name(&self, who: &Identity, value: Option<&str>) -> Result<String, AwsFault> {
        let Some(value) = value else { return Ok(String::new()) };
        match KeyName::parse(value, &self.settings.region)? {
            KeyName::Name(name) => Ok(name),
            // An alias is the caller's own (its account's) unless an ARN names another.
            KeyName::Alias { name, namespace } => {
                let ns = namespace.as_deref().or(account(who)).unwrap_or_default();
                Ok(format!("{ns}/{}{name}", crate::domain::ALIAS_PREFIX))
            }
            KeyName::Id { key_id, namespace: None } => Ok(key_id),
            KeyName::Id { key_id, namespace: Some(ns) } => {
                let matches = self.keys.resolve(&key_id).is_some_and(|k| k.info.namespace == ns);
                Ok(if matches { key_id } else { value.to_owned() })
            }
        }
    }

    pub(super) fn required_key(&self, who: &Identity, value: Option<&str>) -> Result<String, AwsFault> {
        match value {
            None => Err(AwsFault::validation(
                "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: Member must not be null",
            )),
            Some(v) => self.key_name(who, Some(v)),
        }
    }

    fn arn(&self, key: Option<&KeyVersionRef>) -> String {
        key.map(|k| {
            let ns = k.key.split_once('/').map_or("", |(ns, _)| ns);
            key_arn(&self.settings.region, ns, &k.key_id)
        })
        .unwrap_or_default()
    }

    /// Calls the key API as `who`, and answers with AWS's error for its error; `named` is
    /// the `KeyId` the request names the key it uses by (not one it only compares with a
    /// ciphertext's key).
    async fn grpc<Req, Resp>(
        &self,
        who: &Identity,
        request_id: &str,
        named: Option<&str>,
        req: Req,
        call: impl AsyncFnOnce(Request<Req>) -> Result<Response<Resp>, Status>,
    ) -> Result<Resp, AwsFault> {
        let caller = Caller::new(who.clone());
        let mut request = Request::new(req);
        request.extensions_mut().insert(caller.clone());
        if let Ok(id) = request_id.parse() {
            request.metadata_mut().insert("x-request-id", id);
        }
        match call(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(match caller.answer(&status) {
                (denied, Some(key)) => {
                    let found = key.exists.then(|| self.keys.resolve(&key.name)).flatten();
                    let named = match (key.from_ciphertext, named) {
                        (false, Some(value)) => Named::Request(value),
                        _ => Named::Ciphertext(&key.name),
                    };
                    self.refused(who, named, found.as_ref().map(|k| k.info.namespace.as_str()), denied)
                }
                (fault, None) => fault,
            }),
        }
    }

    /// The answer for a key refused to `who`, named so, that exists in namespace `found`
    /// (none: it does not exist). As AWS: a key of the caller's own account that does not
    /// exist is `NotFoundException`, a key it may not use `AccessDeniedException`. What a
    /// caller is told never depends on what another namespace holds: a key named in
    /// another namespace (by ARN, alias ARN or `namespace/name`) is `denied` whether it
    /// exists or not, and a bare keyId (or a ciphertext's) names the caller's own account,
    /// so a key of another namespace it may not use is as not found as a missing one.
    pub(super) fn refused(
        &self,
        who: &Identity,
        named: Named<'_>,
        found: Option<&str>,
        denied: AwsFault,
    ) -> AwsFault {
        let Some(own) = account(who) else { return denied };
        let (account, shown) = match named {
            Named::Request(value) => (self.named_account(value, own), value.to_owned()),
            Named::Ciphertext(key_id) => (None, key_arn(&self.settings.region, own, key_id)),
        };
        if not_found(own, account.as_deref(), found) {
            AwsFault::client("NotFoundException", format!("Key '{shown}' does not exist"))
        } else if denied.code == "AccessDeniedException" {
            // In the caller's words: the key API's would name the key it found, and so
            // tell an existing key (by keyId) from a missing one (by the ARN given).
            AwsFault::client(denied.code, format!("Key '{shown}' does not exist or you may not use it so"))
        } else {
            denied
        }
    }

    /// The account (namespace) a `KeyId` names, if it names one: an ARN's, an alias's
    /// (the caller's own, unless an ARN), `namespace/name`'s; none for a bare keyId.
    fn named_account(&self, value: &str, own: &str) -> Option<String> {
        match KeyName::parse(value, &self.settings.region).ok()? {
            KeyName::Id { namespace, .. } => namespace,
            KeyName::Alias { namespace, .. } => Some(namespace.unwrap_or_else(|| own.to_owned())),
            KeyName::Name(name) => name.split_once('/').map(|(ns, _)| ns.to_owned()),
        }
    }

    /// Runs the KMS operation `op` for `who`.
    pub(super) async fn operation(
        &self,
        op: &str,
        who: &Identity,
        request_id: &str,
        body: &[u8],
    ) -> Result<Value, AwsFault> {
        let api = &*self.api;
        match op {
            "Encrypt" => {
                let r: EncryptIn = parse(body)?;
                r.common.check()?;
                let named = r.key_id.as_deref();
                algorithm("EncryptionAlgorithm", r.encryption_algorithm.as_deref())?;
                let req = pb::EncryptRequest {
                    key: self.required_key(who, r.key_id.as_deref())?,
                    plaintext: r.plaintext,
                    encryption_context: r.encryption_context,
                };
                let out = self.grpc(who, request_id, named, req, async |q| api.encrypt(q).await).await?;
                Ok(json!({
                    "CiphertextBlob": b64_string(&out.ciphertext_blob),
                    "KeyId": self.arn(out.key.as_ref()),
                    "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
                }))
            }
            "Decrypt" => {
                let r: DecryptIn = parse(body)?;
                r.common.check()?;
                algorithm("EncryptionAlgorithm", r.encryption_algorithm.as_deref())?;
                let req = pb::DecryptRequest {
                    ciphertext_blob: r.ciphertext_blob,
                    encryption_context: r.encryption_context,
                    key: self.key_name(who, r.key_id.as_deref())?,
                };
                let out = self.grpc(who, request_id, None, req, async |q| api.decrypt(q).await).await?;
                Ok(json!({
                    "Plaintext": b64_string(&out.plaintext),
                    "KeyId": self.arn(out.key.as_ref()),
                    "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
                }))
            }
            "ReEncrypt" => {
                let r: ReEncryptIn = parse(body)?;
                r.common.check()?;
                let named = r.destination_key_id.as_deref();
                algorithm("SourceEncryptionAlgorithm", r.source_encryption_algorithm.as_deref())?;
                algorithm("DestinationEncryptionAlgorithm", r.destination_encryption_algorithm.as_deref())?;
                let req = pb::ReEncryptRequest {
                    ciphertext_blob: r.ciphertext_blob,
                    source_encryption_context: r.source_encryption_context,
                    source_key: self.key_name(who, r.source_key_id.as_deref())?,
                    destination_key: self.required_key(who, r.destination_key_id.as_deref())?,
                    destination_encryption_context: r.destination_encryption_context,
                };
                let out = self.grpc(who, request_id, named, req, async |q| api.re_encrypt(q).await).await?;
                Ok(json!({
                    "CiphertextBlob": b64_string(&out.ciphertext_blob),
                    "SourceKeyId": self.arn(out.source_key.as_ref()),
                    "KeyId": self.arn(out.key.as_ref()),
                    "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
                    "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT,
                }))
            }
            "GenerateDataKey" => {
                let r: DataKeyIn = parse(body)?;
                r.common.check()?;
                let named = r.key_id.as_deref();
                let req = pb::GenerateDataKeyRequest {
                    key: self.required_key(who, r.key_id.as_deref())?,
                    encryption_context: r.encryption_context,
                    number_of_bytes: data_key_bytes(r.key_spec.as_deref(), r.number_of_bytes)?,
                };
                let out =
                    self.grpc(who, request_id, named, req, async |q| api.generate_data_key(q).await).await?;
                Ok(json!({
                    "CiphertextBlob": b64_string(&out.ciphertext_blob),
                    "Plaintext": b64_string(&out.plaintext),
                    "KeyId": self.arn(out.key.as_ref()),
                }))
            }
            "GenerateDataKeyWithoutPlaintext" => {
                let r: DataKeyIn = parse(body)?;
                r.common.check()?;
                let named = r.key_id.as_deref();
                let req = pb::GenerateDataKeyWithoutPlaintextRequest {
                    key: self.required_key(who, r.key_id.as_deref())?,
                    encryption_context: r.encryption_context,
                    number_of_bytes: data_key_bytes(r.key_spec.as_deref(), r.number_of_bytes)?,
                };
                let out = self
                    .grpc(who, request_id, named, req, async |q| {
                        api.generate_data_key_without_plaintext(q).await
                    })
                    .await?;
                Ok(json!({
                    "CiphertextBlob": b64_string(&out.ciphertext_blob),
                    "KeyId": self.arn(out.key.as_ref()),
                }))
            }
            "GenerateRandom" => {
                let r: RandomIn = parse(body)?;
                r.common.check()?;
                if r.custom_key_store_id.is_some() {
                    return Err(AwsFault::client(
                        "CustomKeyStoreNotFoundException",
                        "kubekms has no custom key stores",
                    ));
                }
                let req = pb::GenerateRandomRequest { number_of_bytes: random_bytes(r.number_of_bytes)? };
                let out =
                    self.grpc(who, request_id, None, req, async |q| api.generate_random(q).await).await?;
                Ok(json!({ "Plaintext": b64_string(&out.plaintext) }))
            }
            "DescribeKey" => {
                let r: KeyIdIn = parse(body)?;
                let metadata = self.describe(who, request_id, r.key_id.as_deref()).await?;
                Ok(json!({ "KeyMetadata": self.key_metadata(&metadata) }))
            }
            "GetKeyRotationStatus" => {
                let r: KeyIdIn = parse(body)?;
                let m = self.describe(who, request_id, r.key_id.as_deref()).await?;
                let mut out = json!({
                    "KeyId": key_arn(&self.settings.region, namespace_of(&m.key), &m.key_id),
                    "KeyRotationEnabled": m.automatic_rotation,
                });
                if m.automatic_rotation {
                    out["RotationPeriodInDays"] = json!(m.rotation_period_days);
                    if let Some(next) = epoch(&m.next_rotation_time) {
                        out["NextRotationDate"] = json!(next);
                    }
                }
                Ok(out)
            }
            "ListKeyRotations" => {
                let r: ListKeyRotationsIn = parse(body)?;
                let limit = super::protocol::limit(r.limit, 100, 1000)?;
                let m = self.describe(who, request_id, r.key_id.as_deref()).await?;
                let history = self.keys.resolve(&m.key).map(|k| k.history.clone()).unwrap_or_default();
                let arn = key_arn(&self.settings.region, namespace_of(&m.key), &m.key_id);
                Ok(rotations_page(&history, &arn, r.marker.as_deref(), limit))
            }
            "CreateGrant" => {
                let r: CreateGrantIn = parse(body)?;
                r.common.check()?;
                let named = r.key_id.as_deref();
                let grantee = r.grantee_principal.as_deref().ok_or_else(|| {
                    AwsFault::validation(
                        "1 validation error detected: Value null at 'granteePrincipal' failed to satisfy constraint: Member must not be null",
                    )
                })?;
                let constraints = r.constraints.unwrap_or_default();
                let req = pb::CreateGrantRequest {
                    key: self.required_key(who, r.key_id.as_deref())?,
                    name: r.name.unwrap_or_default(),
                    grantee: Some(principal(grantee)),
                    operations: r.operations,
                    encryption_context_equals: constraints.encryption_context_equals,
                    encryption_context_subset: constraints.encryption_context_subset,
                    expires_at: String::new(),
                    retiring_principal: r.retiring_principal.as_deref().map(principal),
                };
                let out = self.grpc(who, request_id, named, req, async |q| api.create_grant(q).await).await?;
                // Grants take effect as soon as the key API sees them: the grant id serves
                // as the grant token, which is accepted and not needed.
                Ok(json!({ "GrantId": out.grant_id, "GrantToken": out.grant_id }))
            }
            "RetireGrant" => {
                let r: RetireGrantIn = parse(body)?;
                r.common.check()?;
                let grant = match (r.grant_token, r.grant_id) {
                    (Some(token), _) => token,
                    (None, Some(id)) => {
                        if r.key_id.is_none() {
                            return Err(AwsFault::validation("KeyId is required with GrantId"));
                        }
                        id
                    }
                    (None, None) => {
                        return Err(AwsFault::validation(
                            "Either GrantToken or KeyId and GrantId are required",
                        ));
                    }
                };
                let req = pb::RetireGrantRequest { grant };
                self.grpc(who, request_id, None, req, async |q| api.retire_grant(q).await).await?;
                Ok(json!({}))
            }
            "ListKeys" => {
                let r: ListKeysIn = parse(body)?;
                self.list_keys(who, request_id, r).await
            }
            other => match super::admin::OPERATIONS.iter().find(|o| **o == other) {
                Some(op) => self.admin(op, who, request_id, body).await,
                None => Err(unknown_operation(other)),
            },
        }
    }

    async fn describe(
        &self,
        who: &Identity,
        request_id: &str,
        key: Option<&str>,
    ) -> Result<pb::KeyMetadata, AwsFault> {
        let req = pb::DescribeKeyRequest { key: self.required_key(who, key)? };
        let api = &*self.api;
        let out = self.grpc(who, request_id, key, req, async |q| api.describe_key(q).await).await?;
        out.metadata.ok_or_else(|| AwsFault::internal("the key API described no key"))
    }

    /// AWS's `KeyMetadata` of a key the key API described.
    pub(super) fn key_metadata(&self, m: &pb::KeyMetadata) -> Value {
        let ns = namespace_of(&m.key);
        let mut out = json!({
            "AWSAccountId": ns,
            "KeyId": m.key_id,
            "Arn": key_arn(&self.settings.region, ns, &m.key_id),
            "Description": m.description,
            "Enabled": m.state == "Enabled",
            "KeyState": aws_state(&m.state),
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": SYMMETRIC_DEFAULT,
            "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
            "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
            "KeyManager": "CUSTOMER",
            "Origin": if m.origin == "EXTERNAL" { "EXTERNAL" } else { "AWS_KMS" },
            "MultiRegion": false,
        });
        if let Some(created) = epoch(&m.creation_time) {
            out["CreationDate"] = json!(created);
        }
        if let Some(deletion) = epoch(&m.deletion_time) {
            out["DeletionDate"] = json!(deletion);
        }
        if m.origin == "EXTERNAL" {
            match epoch(&m.valid_to) {
                Some(valid_to) => {
                    out["ExpirationModel"] = json!("KEY_MATERIAL_EXPIRES");
                    out["ValidTo"] = json!(valid_to);
                }
                None => out["ExpirationModel"] = json!("KEY_MATERIAL_DOES_NOT_EXPIRE"),
            }
        }
        out
    }

    /// ListKeys: the keys of the caller's namespace, for a caller that may list kmskeys
    /// there (RBAC, as `kubectl get kmskeys` needs), sorted by keyId, in pages.
    async fn list_keys(&self, who: &Identity, request_id: &str, r: ListKeysIn) -> Result<Value, AwsFault> {
        let started = Instant::now();
        let outcome = self.list_keys_page(who, r).await;
        let event = AuditEvent {
            request_id: request_id.to_owned(),
            principal: who.username.clone(),
            operation: "ListKeys",
            ..Default::default()
        };
        self.finish(started, event, outcome).await
    }

    async fn list_keys_page(&self, who: &Identity, r: ListKeysIn) -> Result<Value, AwsFault> {
        let limit = super::protocol::limit(r.limit, 100, 1000)?;
        let ns = account(who).ok_or_else(|| {
            AwsFault::client("AccessDeniedException", "only ServiceAccounts have an account to list keys of")
        })?;
        let allowed = self.rbac.allowed(who, "list", ns, "").await.map_err(|_| {
            AwsFault::new(503, "DependencyTimeoutException", "cannot check Kubernetes RBAC right now")
        })?;
        if !allowed {
            return Err(AwsFault::client(
                "AccessDeniedException",
                format!("{} may not list kmskeys in namespace {ns}", who.username),
            ));
        }
        let mut keys: Vec<String> = self
            .keys
            .keys_in(ns)
            .iter()
            .filter(|k| k.info.state != KeyState::Destroyed)
            .map(|k| k.info.key_id.clone())
            .collect();
        keys.sort();
        let region = &self.settings.region;
        let out = super::protocol::page(
            "Keys",
            &keys,
            r.marker.as_deref(),
            limit,
            String::as_str,
            |id| json!({ "KeyId": id, "KeyArn": key_arn(region, ns, id) }),
        );
        Ok(out)
    }
}

/// One page of ListKeyRotations: every version made after the first, oldest first, by a
/// scheduled rotation (`AUTOMATIC`) or on demand (`ON_DEMAND`; new imported material too).
/// A marker is the last version shown, zero-padded so that markers sort as versions do.
fn rotations_page(history: &[VersionMade], arn: &str, marker: Option<&str>, limit: usize) -> Value {
    let mut rotations: Vec<(String, &VersionMade)> = history
        .iter()
        .filter(|v| v.version > 1 && v.cause != VersionCause::Created)
        .map(|v| (format!("{:010}", v.version), v))
        .collect();
    rotations.sort_by(|a, b| a.0.cmp(&b.0));
    super::protocol::page(
        "Rotations",
        &rotations,
        marker,
        limit,
        |(marker, _)| marker,
        |(_, v)| {
            json!({
                "KeyId": arn,
                "RotationDate": v.created.as_second(),
                "RotationType": if v.cause == VersionCause::Scheduled { "AUTOMATIC" } else { "ON_DEMAND" },
            })
        },
    )
}

/// Whether a key refused to a caller of account `own` is answered `NotFoundException`: the
/// request named it in `named` (none: by a bare keyId, which means the caller's own
/// account), and it exists in namespace `found` (none: nowhere).
fn not_found(own: &str, named: Option<&str>, found: Option<&str>) -> bool {
    match named {
        Some(ns) => ns == own && found.is_none(),
        None => found != Some(own),
    }
}

/// How the refused key was named.
#[derive(Debug, Clone, Copy)]
pub(super) enum Named<'a> {
    /// By the request's `KeyId` (or `DestinationKeyId`, `TargetKeyId`).
    Request(&'a str),
    /// By a ciphertext's header: a keyId.
    Ciphertext(&'a str),
}

fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

fn b64_string(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotations_are_listed_in_pages_with_their_kind() {
        let made = |version, seconds, cause| VersionMade {
            version,
            created: jiff::Timestamp::from_second(seconds).unwrap(),
            cause,
        };
        let mut history = vec![made(1, 100, VersionCause::Created)];
        for v in 2..=11 {
            let cause = if v % 2 == 0 { VersionCause::Scheduled } else { VersionCause::OnDemand };
            history.push(made(v, 100 * i64::from(v), cause));
        }
        let first = rotations_page(&history, "arn", None, 9);
        let rotations = first["Rotations"].as_array().unwrap();
        assert_eq!(rotations.len(), 9);
        assert_eq!(rotations[0], json!({"KeyId": "arn", "RotationDate": 200, "RotationType": "AUTOMATIC"}));
        assert_eq!(rotations[1]["RotationType"], "ON_DEMAND");
        assert_eq!(first["Truncated"], true);
        let next = first["NextMarker"].as_str().unwrap();
        // Version 11 follows version 10, and 10 follows 9, although "10" < "9" as text.
        let second = rotations_page(&history, "arn", Some(next), 9);
        let dates: Vec<i64> = second["Rotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["RotationDate"].as_i64().unwrap())
            .collect();
        assert_eq!(dates, [1100]);
        assert_eq!(rotations[8]["RotationDate"], 1000);
        assert_eq!(second["Truncated"], false);
        assert!(second.get("NextMarker").is_none());
        // A key never rotated, and one whose first version was imported.
        let imported = [made(1, 100, VersionCause::Imported), made(2, 200, VersionCause::Imported)];
        assert_eq!(rotations_page(&history[..1], "arn", None, 100)["Rotations"], json!([]));
        assert_eq!(rotations_page(&imported, "arn", None, 100)["Rotations"][0]["RotationType"], "ON_DEMAND");
        assert_eq!(rotations_page(&imported, "arn", None, 100)["Rotations"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn only_a_key_missing_from_the_callers_own_account_is_not_found() {
        // Named in the caller's own account: missing is NotFound, refused is AccessDenied.
        assert!(not_found("a", Some("a"), None));
        assert!(!not_found("a", Some("a"), Some("a")));
        assert!(!not_found("a", None, Some("a")));
        assert!(not_found("a", None, None));
        // The attacker's view: whatever another namespace holds, the answer is the same,
        // for every way of naming a key there and for a bare keyId.
        for named in [Some("b"), None] {
            let answers: Vec<bool> =
                [None, Some("b"), Some("c")].iter().map(|found| not_found("a", named, *found)).collect();
            assert!(answers.windows(2).all(|w| w[0] == w[1]), "{named:?}: {answers:?}");
        }
        assert!(!not_found("a", Some("b"), None));
    }

    #[test]
    fn data_key_sizes_follow_aws() {
        assert_eq!(data_key_bytes(Some("AES_256"), None), Ok(32));
        assert_eq!(data_key_bytes(Some("AES_128"), None), Ok(16));
        assert_eq!(data_key_bytes(None, Some(64)), Ok(64));
        for (spec, n) in [
            (Some("AES_512"), None),
            (None, Some(0)),
            (None, Some(1025)),
            (Some("AES_256"), Some(32)),
            (None, None),
        ] {
            assert_eq!(data_key_bytes(spec, n).unwrap_err().code, "ValidationException", "{spec:?} {n:?}");
        }
        assert_eq!(random_bytes(None).unwrap_err().code, "ValidationException");
    }

    #[test]
    fn principals_and_accounts_are_read() {
        let sa = principal("arn:aws:iam::batch:role/nightly");
        assert_eq!(
            (sa.kind.as_str(), sa.namespace.as_str(), sa.name.as_str()),
            ("ServiceAccount", "batch", "nightly")
        );
        let assumed = principal("arn:aws:sts::batch:assumed-role/nightly/session-1");
        assert_eq!((assumed.namespace.as_str(), assumed.name.as_str()), ("batch", "nightly"));
        let native = principal("system:serviceaccount:batch:nightly");
        assert_eq!(native.kind, "ServiceAccount");
        assert_eq!(principal("alice").kind, "User");
        let who = Identity { username: "system:serviceaccount:shop:web".into(), ..Default::default() };
        assert_eq!(account(&who), Some("shop"));
        assert_eq!(account(&Identity { username: "alice".into(), ..Default::default() }), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_are_refused_without_panicking(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse::<EncryptIn>(&body);
            let _ = parse::<CreateGrantIn>(&body);
            let _ = parse::<ListKeysIn>(&body);
        }
    }

    #[test]
    fn bad_bodies_are_serialization_errors_that_echo_nothing() {
        let err = parse::<EncryptIn>(br#"{"KeyId":"a/b","Plaintext":"secret!!"}"#).err().unwrap();
        assert_eq!(err.code, "SerializationException");
        assert!(!err.message.contains("secret"), "{}", err.message);
        assert_eq!(parse::<EncryptIn>(b"{").err().unwrap().code, "SerializationException");
        let ok: EncryptIn = parse(br#"{"KeyId":"a/b","Plaintext":"aGk=","Unknown":1}"#).unwrap();
        assert_eq!(ok.plaintext, b"hi");
        assert_eq!(aws_state("Destroyed"), "Unavailable");
    }
}
