//! The AWS KMS API with real AWS clients: boto3, the AWS CLI and the AWS Encryption SDK
//! (installed pinned by e2e/tools/python-clients.sh) and the AWS SDK for Go v2 (a small
//! client under e2e/awsclient/go, built by e2e/tools/go-client.sh), each configured only by the
//! environment a pod would have — a ServiceAccount token file, the role ARN, the STS and
//! KMS endpoints, the CA bundle and the region — so every call first goes through the STS
//! endpoint with that token. And the attacker's view: wrong secret, tampered body, stale
//! date, forged or expired session, a role ARN naming another ServiceAccount, a token for
//! another audience, a ServiceAccount without rights.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::Value;

use crate::keyapi::{as_sa, bind_key_user, decrypt, enabled_key, encrypt, token};
use crate::support::{TestNamespace, env_var, kubectl_ok, patch_key, run_dir};

/// The path `e2e/tools/<script>` prints once it has installed or built its client (or found
/// it in the cache), run once per test run for each `cell`.
fn tool(cell: &'static OnceLock<PathBuf>, script: &str) -> &'static Path {
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("e2e/tools").join(script))
            .arg(root.join("e2e/.bin"))
            .output()
            .unwrap_or_else(|e| panic!("run e2e/tools/{script}: {e}"));
        assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// The virtualenv's python, with boto3, the AWS CLI and the AWS Encryption SDK.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    tool(&PYTHON, "python-clients.sh")
}

/// The AWS SDK for Go v2 client.
fn go_client() -> &'static Path {
    static CLIENT: OnceLock<PathBuf> = OnceLock::new();
    tool(&CLIENT, "go-client.sh")
}

/// A pod's view: a ServiceAccount's projected token and the AWS variables.
struct Pod {
    ns: String,
    sa: String,
    token_file: PathBuf,
    role_arn: String,
}

impl Pod {
    /// ServiceAccount `sa` in `ns` (created) with a token for `audience`, assuming the
    /// role of `role_sa` (its own, unless a test says otherwise).
    fn new(ns: &str, sa: &str, audience: &str, role_sa: &str) -> Pod {
        let _ = crate::support::kubectl(&["create", "serviceaccount", sa, "-n", ns], None);
        let dir = run_dir().join("aws-tokens");
        std::fs::create_dir_all(&dir).unwrap();
        let audience_part: String =
            audience.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let token_file = dir.join(format!("{ns}-{sa}-{audience_part}-{role_sa}"));
        std::fs::write(&token_file, token(ns, sa, audience)).unwrap();
        Pod {
            ns: ns.to_owned(),
            sa: sa.to_owned(),
            token_file,
            role_arn: format!("arn:aws:iam::{ns}:role/{role_sa}"),
        }
    }

    fn own(ns: &str, sa: &str) -> Pod {
        Pod::new(ns, sa, "kubekms", sa)
    }

    /// A command with only the pod's AWS environment (nothing from this machine's).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("AWS_ROLE_ARN", &self.role_arn)
            .env("AWS_WEB_IDENTITY_TOKEN_FILE", &self.token_file)
            .env("AWS_ROLE_SESSION_NAME", format!("{}-{}", self.ns, self.sa))
            .env("AWS_ENDPOINT_URL_STS", env_var("KUBEKMS_STS_ENDPOINT"))
            .env("AWS_ENDPOINT_URL_KMS", env_var("KUBEKMS_AWS_ENDPOINT"))
            .env("AWS_CA_BUNDLE", env_var("KUBEKMS_CA"))
            .env("AWS_REGION", env_var("KUBEKMS_AWS_REGION"))
            // botocore reads the older name.
            .env("AWS_DEFAULT_REGION", env_var("KUBEKMS_AWS_REGION"))
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd
    }

    /// One case of e2e/awsclient/cases.py, as this pod.
    fn case(&self, args: &[&str]) -> Value {
        self.case_with(args, &[])
    }

    fn case_with(&self, args: &[&str], env: &[(&str, &str)]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/awsclient/cases.py");
        let mut cmd = self.command(python());
        cmd.arg(script).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run cases.py");
        assert!(
            out.status.success(),
            "cases.py {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("cases.py prints JSON")
    }

    /// The AWS CLI, as this pod: its standard output.
    fn aws(&self, args: &[&str]) -> String {
        let aws = python().with_file_name("aws");
        let out = self.command(&aws).args(args).output().expect("run aws");
        assert!(
            out.status.success(),
            "aws {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn key_arn(ns: &str, key_id: &str) -> String {
    format!("arn:aws:kms:{}:{ns}:key/{key_id}", env_var("KUBEKMS_AWS_REGION"))
}

/// An Enabled key `name` in `ns` that ServiceAccount `sa` may use (RBAC key user).
async fn usable_key(ns: &str, name: &str, sa: &str) -> String {
    let key = enabled_key(ns, name, "  description: used over the AWS API\n").await;
    let bound = crate::support::kubectl(&["get", "rolebinding", &format!("{ns}-{sa}-keys"), "-n", ns], None);
    if !bound.ok {
        bind_key_user(ns, ns, sa);
    }
    key_arn(ns, &key.status.unwrap().key_id.unwrap())
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

#[tokio::test]
async fn boto3_with_a_service_account_token_uses_keys_like_the_grpc_api() {
    let ns = TestNamespace::new("aws-boto3");
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "app", "web").await;
    let pod = Pod::own(ns, "web");
    // A ciphertext from the gRPC API decrypts over the AWS API, and the other way round.
    let mut grpc = as_sa(ns, "web").await;
    let from_grpc = encrypt(&mut grpc, &format!("{ns}/app"), b"hello from gRPC", &[]).await.unwrap();
    let out = pod.case(&["roundtrip", &arn, &format!("{ns}/app"), &b64().encode(&from_grpc.ciphertext_blob)]);

    assert_eq!(out["encrypt_key_id"], arn.as_str());
    assert_eq!(out["encryption_algorithm"], "SYMMETRIC_DEFAULT");
    assert_eq!(out["decrypt_plaintext"], "hello from boto3");
    assert_eq!(out["decrypt_key_id"], arn.as_str());
    assert_eq!(out["decrypt_with_key_id"], "hello from boto3");
    assert_eq!(out["encrypt_by_id"], arn.as_str());
    assert_eq!(out["encrypt_by_name"], arn.as_str());
    assert_eq!(out["data_key_len"], 32);
    assert_eq!(out["data_key_opens"], true);
    assert_eq!(out["data_key_128_len"], 16);
    assert_eq!(out["without_plaintext_len"], 16);
    assert_eq!(out["without_plaintext_has_plaintext"], false);
    assert_eq!(out["reencrypt_source_key_id"], arn.as_str());
    assert_eq!(out["reencrypted_plaintext"], "hello from boto3");
    assert_eq!(out["random_len"], 48);
    assert_eq!(out["grpc_plaintext"], "hello from gRPC");
    let meta = &out["metadata"];
    assert_eq!(meta["Arn"], arn.as_str());
    assert_eq!(meta["AWSAccountId"], ns);
    assert_eq!(meta["KeyState"], "Enabled");
    assert_eq!(meta["Enabled"], true);
    assert_eq!(meta["KeyManager"], "CUSTOMER");
    assert_eq!(meta["Origin"], "AWS_KMS");
    assert_eq!(meta["KeySpec"], "SYMMETRIC_DEFAULT");
    assert_eq!(meta["KeyUsage"], "ENCRYPT_DECRYPT");
    assert_eq!(meta["Description"], "used over the AWS API");
    assert_eq!(meta["EncryptionAlgorithms"], serde_json::json!(["SYMMETRIC_DEFAULT"]));
    assert!(meta["CreationDate"].as_str().is_some_and(|d| d.starts_with("20")), "{meta}");
    assert!(out["rotation"]["KeyRotationEnabled"].is_boolean(), "{out}");

    let blob = b64().decode(out["ciphertext"].as_str().unwrap()).unwrap();
    let opened = decrypt(&mut grpc, &blob, &[("app", "e2e")]).await.unwrap();
    assert_eq!(opened.plaintext, b"hello from boto3");
}

#[tokio::test]
async fn the_aws_sdk_for_go_v2_gets_credentials_from_sts_and_uses_a_key() {
    let ns = TestNamespace::new("aws-go");
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "go", "app").await;
    let out = Pod::own(ns, "app").command(go_client()).args(["roundtrip", &arn]).output().unwrap();
    assert!(out.status.success(), "the Go client failed: {}", String::from_utf8_lossy(&out.stderr));
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["encrypt_key_id"], arn.as_str(), "{out}");
    assert_eq!(out["decrypt_plaintext"], "hello from Go");
    assert_eq!(out["data_key_len"], 32);
    assert_eq!(out["key_state"], "Enabled");
    assert_eq!(out["creation_date_set"], true);
    assert_eq!(out["wrong_context"], "InvalidCiphertextException");
}

#[tokio::test]
async fn list_keys_pages_through_the_namespace_for_those_rbac_lets_list() {
    let ns = TestNamespace::new("aws-list");
    let ns = ns.name.as_str();
    let mut arns = [usable_key(ns, "k1", "lister").await, usable_key(ns, "k2", "lister").await];
    arns.sort();
    let pod = Pod::own(ns, "lister");
    let denied = pod.case(&["call", "list_keys", "{}"]);
    assert_eq!(denied["code"], "AccessDeniedException", "{denied}");
    kubectl_ok(
        &["create", "role", "list-keys", "-n", ns, "--verb=list", "--resource=kmskeys.kms.kubekms.io"],
        None,
    );
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "list-keys",
            "-n",
            ns,
            "--role=list-keys",
            &format!("--serviceaccount={ns}:lister"),
        ],
        None,
    );
    let page = crate::support::eventually(
        crate::keyapi::WAIT,
        "RBAC to let the ServiceAccount list keys",
        || async {
            let page = pod.case(&["call", "list_keys", r#"{"Limit": 1}"#]);
            (page["code"] == "OK").then_some(page)
        },
    )
    .await;
    let answer = &page["answer"];
    assert_eq!(answer["Truncated"], true, "{page}");
    assert_eq!(answer["Keys"][0]["KeyArn"], arns[0].as_str());
    let marker = answer["NextMarker"].as_str().unwrap();
    let next = pod.case(&["call", "list_keys", &format!(r#"{{"Limit": 1, "Marker": "{marker}"}}"#)]);
    assert_eq!(next["answer"]["Keys"][0]["KeyArn"], arns[1].as_str(), "{next}");
    assert_eq!(next["answer"]["Truncated"], false);
}

#[tokio::test]
async fn the_aws_cli_encrypts_decrypts_and_describes() {
    let ns = TestNamespace::new("aws-cli");
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "cli", "ops").await;
    let pod = Pod::own(ns, "ops");
    let dir = run_dir().join("aws-tokens");
    let plain = dir.join(format!("{ns}-plain"));
    std::fs::write(&plain, b"hello from the AWS CLI").unwrap();
    let ciphertext = pod.aws(&[
        "kms",
        "encrypt",
        "--key-id",
        &arn,
        "--plaintext",
        &format!("fileb://{}", plain.display()),
        "--encryption-context",
        "stage=e2e",
        "--output",
        "text",
        "--query",
        "CiphertextBlob",
    ]);
    let blob = dir.join(format!("{ns}-blob"));
    std::fs::write(&blob, b64().decode(ciphertext.trim()).unwrap()).unwrap();
    let plaintext = pod.aws(&[
        "kms",
        "decrypt",
        "--ciphertext-blob",
        &format!("fileb://{}", blob.display()),
        "--encryption-context",
        "stage=e2e",
        "--output",
        "text",
        "--query",
        "Plaintext",
    ]);
    assert_eq!(b64().decode(plaintext.trim()).unwrap(), b"hello from the AWS CLI");
    let state = pod.aws(&[
        "kms",
        "describe-key",
        "--key-id",
        &arn,
        "--output",
        "text",
        "--query",
        "KeyMetadata.KeyState",
    ]);
    assert_eq!(state.trim(), "Enabled");
    let random = pod.aws(&[
        "kms",
        "generate-random",
        "--number-of-bytes",
        "24",
        "--output",
        "text",
        "--query",
        "Plaintext",
    ]);
    assert_eq!(b64().decode(random.trim()).unwrap().len(), 24);
}

#[tokio::test]
async fn the_aws_encryption_sdk_encrypts_under_a_kubekms_key_arn() {
    let ns = TestNamespace::new("aws-esdk");
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "envelope", "app").await;
    let out = Pod::own(ns, "app").case(&["esdk", &arn]);
    assert_eq!(out["plaintext"], "hello from the AWS Encryption SDK", "{out}");
    assert_eq!(out["context"], "e2e");
    assert_eq!(out["master_keys"], serde_json::json!([arn]));
}

#[tokio::test]
async fn bad_input_gets_aws_error_codes() {
    let ns = TestNamespace::new("aws-errors");
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "good", "web").await;
    let disabled = usable_key(ns, "disabled-key", "web").await;
    patch_key(ns, "disabled-key", r#"{"spec":{"enabled":false}}"#);
    let out = Pod::own(ns, "web").case(&["errors", &arn, &disabled]);
    let code = |field: &str| out[field].clone();
    assert_eq!(code("junk_ciphertext"), "InvalidCiphertextException", "{out}");
    assert_eq!(code("unknown_key_ciphertext"), "NotFoundException");
    assert_eq!(code("wrong_context"), "InvalidCiphertextException");
    assert_eq!(code("tampered_ciphertext"), "InvalidCiphertextException");
    assert_eq!(code("wrong_key"), "IncorrectKeyException");
    assert_eq!(code("too_large"), "ValidationException");
    assert_eq!(code("disabled"), "DisabledException");
    assert_eq!(code("alias"), "NotFoundException");
    assert_eq!(code("malformed_alias"), "NotFoundException");
    assert_eq!(code("other_region"), "NotFoundException");
    assert_eq!(code("bad_key_spec"), "ValidationException");
    // Raw requests signed by botocore's own signer.
    assert_eq!(out["genuine"], serde_json::json!([200, "OK"]), "{out}");
    let refused = |field: &str, status: u64, code: &str| {
        assert_eq!(out[field][0], status, "{field}: {}", out[field]);
        assert_eq!(out[field][1], code, "{field}: {}", out[field]);
    };
    refused("unknown_operation", 400, "UnknownOperationException");
    refused("wrong_secret", 400, "InvalidSignatureException");
    refused("tampered_body", 400, "InvalidSignatureException");
    refused("stale_date", 400, "InvalidSignatureException");
    assert!(out["stale_date"][2].as_str().unwrap().starts_with("Signature expired"), "{out}");
    refused("no_session_token", 400, "UnrecognizedClientException");
    refused("forged_session_token", 400, "UnrecognizedClientException");
    refused("unsigned", 400, "MissingAuthenticationTokenException");
    refused("malformed_authorization", 400, "IncompleteSignatureException");
}

#[tokio::test]
async fn sts_gives_a_service_account_its_own_role_only() {
    let ns = TestNamespace::new("aws-sts");
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "guarded", "owner").await;
    let owner = Pod::own(ns, "owner");
    let assumed = owner.case(&["assume", &owner.role_arn, owner.token_file.to_str().unwrap()]);
    assert_eq!(assumed["code"], "OK", "{assumed}");
    assert_eq!(assumed["subject"], format!("system:serviceaccount:{ns}:owner"));
    assert_eq!(assumed["assumed_role_arn"], format!("arn:aws:sts::{ns}:assumed-role/owner/e2e"));
    // The session ends no later than the token (kubectl create token --duration 10m).
    let expiry: jiff::Timestamp = assumed["expiration"].as_str().unwrap().parse().unwrap();
    assert!(expiry <= jiff::Timestamp::now() + jiff::SignedDuration::from_mins(10), "{assumed}");

    // A role ARN naming another ServiceAccount: refused.
    let thief = Pod::new(ns, "thief", "kubekms", "owner");
    let stolen = thief.case(&["assume", &thief.role_arn, thief.token_file.to_str().unwrap()]);
    assert_eq!(
        (stolen["code"].as_str(), stolen["status"].as_u64()),
        (Some("AccessDenied"), Some(403)),
        "{stolen}"
    );
    // A token for another audience: not a web identity for kubekms.
    let other = Pod::new(ns, "owner", "https://kubernetes.default.svc", "owner");
    let wrong = other.case(&["assume", &other.role_arn, other.token_file.to_str().unwrap()]);
    assert_eq!(wrong["code"], "InvalidIdentityToken", "{wrong}");
    // A ServiceAccount without rights on the key: its own credentials, AccessDenied.
    let stranger = Pod::own(ns, "stranger");
    let denied =
        stranger.case(&["call", "encrypt", &format!(r#"{{"KeyId": "{arn}", "Plaintext": "aGk="}}"#)]);
    assert_eq!(denied["code"], "AccessDeniedException", "{denied}");

    // An expired session, sealed as kubekms seals them (the test holds the root key).
    let root = kubekms::crypto::RootKey::load(Path::new(&env_var("KUBEKMS_ROOT_KEY_FILE"))).unwrap();
    let identity = kubekms::domain::Identity {
        username: format!("system:serviceaccount:{ns}:owner"),
        ..Default::default()
    };
    let past = jiff::Timestamp::now().as_second() - 60;
    let expired = kubekms::server::aws::sts::SessionKeys::from_root(&root).issue(&identity, past).unwrap();
    let out = owner.case_with(
        &["call", "describe_key", &format!(r#"{{"KeyId": "{arn}"}}"#)],
        &[
            ("AWS_ACCESS_KEY_ID", &expired.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", expired.secret_access_key.as_str()),
            ("AWS_SESSION_TOKEN", &expired.session_token),
            ("AWS_ROLE_ARN", ""),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", ""),
        ],
    );
    assert_eq!(out["code"], "ExpiredTokenException", "{out}");

    // Every call is in the key API's audit log, as the ServiceAccount.
    let audit = std::fs::read_to_string(run_dir().join("server/audit.log")).unwrap();
    let principal = format!("\"principal\":\"system:serviceaccount:{ns}:stranger\"");
    assert!(
        audit.lines().any(|l| l.contains(&principal) && l.contains("\"operation\":\"Encrypt\"")),
        "no audit line for the refused Encrypt"
    );
    assert!(audit.lines().any(|l| l.contains(&principal) && l.contains("AssumeRoleWithWebIdentity")));
}

/// One KMS call through boto3 as `pod`: the answer, or the error code.
fn call(pod: &Pod, operation: &str, params: Value) -> Value {
    pod.case(&["call", operation, &params.to_string()])
}

fn ok(answer: Value) -> Value {
    assert_eq!(answer["code"], "OK", "{answer}");
    answer["answer"].clone()
}

/// Waits (as long as the key API tests do) until `operation` with `params` as `pod` answers
/// `code`: "OK", or an error code.
async fn answers(pod: &Pod, operation: &str, params: &Value, code: &str, what: &str) {
    crate::support::eventually(crate::keyapi::WAIT, what, || async {
        (call(pod, operation, params.clone())["code"] == code).then_some(())
    })
    .await
}

#[tokio::test]
async fn management_operations_change_objects_as_the_callers_rbac_allows() {
    let ns = TestNamespace::new("aws-admin");
    let ns = ns.name.as_str();
    let admin = Pod::own(ns, "admin");
    let user = Pod::own(ns, "user");
    let wait = crate::keyapi::WAIT;
    // Without rights to create or patch keys: refused.
    assert_eq!(call(&admin, "create_key", serde_json::json!({}))["code"], "AccessDeniedException");
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "admins",
            "-n",
            ns,
            "--clusterrole=kubekms-key-admin",
            &format!("--serviceaccount={ns}:admin"),
        ],
        None,
    );
    bind_key_user(ns, ns, "user");

    // CreateKey makes a KmsKey; the controller makes it Enabled.
    let created = crate::support::eventually(wait, "RBAC to let the admin create keys", || async {
        let r = call(&admin, "create_key", serde_json::json!({"Description": "made over AWS", "Tags": [{"TagKey": "team", "TagValue": "shop"}]}));
        (r["code"] == "OK").then_some(r)
    })
    .await;
    let meta = &created["answer"]["KeyMetadata"];
    let arn = meta["Arn"].as_str().unwrap().to_owned();
    assert_eq!(meta["AWSAccountId"], ns, "{created}");
    assert_eq!(meta["Description"], "made over AWS");
    let key_id = meta["KeyId"].as_str().unwrap().to_owned();
    let name = kubectl_ok(
        &[
            "get",
            "kmskeys",
            "-n",
            ns,
            "-o",
            &format!("jsonpath={{.items[?(@.metadata.uid==\"{key_id}\")].metadata.name}}"),
        ],
        None,
    );
    assert!(name.starts_with("key-"), "{name}");
    let encrypt = serde_json::json!({"KeyId": arn, "Plaintext": "aGk="});
    answers(&user, "encrypt", &encrypt, "OK", "the new key to encrypt").await;

    // The user may use the key, not change it.
    assert_eq!(
        call(&user, "disable_key", serde_json::json!({"KeyId": arn}))["code"],
        "AccessDeniedException"
    );

    // Disable and enable: spec.enabled, as the key API then refuses and serves again.
    ok(call(&admin, "disable_key", serde_json::json!({"KeyId": arn})));
    answers(&user, "encrypt", &encrypt, "DisabledException", "Encrypt to be refused as Disabled").await;
    ok(call(&admin, "enable_key", serde_json::json!({"KeyId": arn})));
    answers(&user, "encrypt", &encrypt, "OK", "Encrypt to work again").await;

    // Rotation: the period, and a rotation now.
    ok(call(&admin, "enable_key_rotation", serde_json::json!({"KeyId": arn, "RotationPeriodInDays": 180})));
    let period = kubectl_ok(
        &["get", "kmskey", name.trim(), "-n", ns, "-o", "jsonpath={.spec.rotation.periodDays}"],
        None,
    );
    assert_eq!(period.trim(), "180");
    ok(call(&admin, "rotate_key_on_demand", serde_json::json!({"KeyId": arn})));
    crate::support::eventually(wait, "version 2", || async {
        let v = kubectl_ok(
            &["get", "kmskey", name.trim(), "-n", ns, "-o", "jsonpath={.status.currentVersion}"],
            None,
        );
        (v.trim() == "2").then_some(())
    })
    .await;
    // ListKeyRotations: each rotation and its kind, in pages (the CLI follows the markers).
    ok(call(&admin, "rotate_key_on_demand", serde_json::json!({"KeyId": arn})));
    crate::support::eventually(wait, "version 3", || async {
        let v = kubectl_ok(
            &["get", "kmskey", name.trim(), "-n", ns, "-o", "jsonpath={.status.currentVersion}"],
            None,
        );
        (v.trim() == "3").then_some(())
    })
    .await;
    let first = ok(call(&admin, "list_key_rotations", serde_json::json!({"KeyId": arn, "Limit": 1})));
    assert_eq!(first["Rotations"][0]["KeyId"], arn.as_str(), "{first}");
    assert_eq!(first["Rotations"][0]["RotationType"], "ON_DEMAND");
    assert!(first["Rotations"][0]["RotationDate"].as_str().is_some_and(|d| d.starts_with("20")), "{first}");
    assert_eq!(first["Truncated"], true);
    let marker = first["NextMarker"].as_str().unwrap();
    let rest = ok(call(&admin, "list_key_rotations", serde_json::json!({"KeyId": arn, "Marker": marker})));
    assert_eq!(rest["Rotations"].as_array().unwrap().len(), 1, "{rest}");
    assert_eq!(rest["Truncated"], false);
    let kinds = admin.aws(&[
        "kms",
        "list-key-rotations",
        "--key-id",
        &arn,
        "--page-size",
        "1",
        "--output",
        "text",
        "--query",
        "Rotations[].RotationType",
    ]);
    assert_eq!(kinds.split_whitespace().collect::<Vec<_>>(), ["ON_DEMAND", "ON_DEMAND"], "{kinds}");
    assert_eq!(
        call(&user, "list_key_rotations", serde_json::json!({"KeyId": arn, "Limit": 1001}))["code"],
        "ValidationException"
    );
    ok(call(&admin, "disable_key_rotation", serde_json::json!({"KeyId": arn})));
    let status = ok(call(&admin, "get_key_rotation_status", serde_json::json!({"KeyId": arn})));
    assert_eq!(status["KeyRotationEnabled"], false, "{status}");

    // Tags are labels.
    ok(call(
        &admin,
        "tag_resource",
        serde_json::json!({"KeyId": arn, "Tags": [{"TagKey": "env", "TagValue": "e2e"}]}),
    ));
    ok(call(&admin, "untag_resource", serde_json::json!({"KeyId": arn, "TagKeys": ["team"]})));
    let tags = ok(call(&admin, "list_resource_tags", serde_json::json!({"KeyId": arn})));
    assert_eq!(tags["Tags"], serde_json::json!([{"TagKey": "env", "TagValue": "e2e"}]), "{tags}");
    let bad = call(
        &admin,
        "tag_resource",
        serde_json::json!({"KeyId": arn, "Tags": [{"TagKey": "not a label", "TagValue": "x"}]}),
    );
    assert_eq!(bad["code"], "TagException", "{bad}");
    let policy =
        ok(call(&admin, "get_key_policy", serde_json::json!({"KeyId": arn, "PolicyName": "default"})));
    let policy: Value = serde_json::from_str(policy["Policy"].as_str().unwrap()).unwrap();
    assert_eq!(policy["delegateToRBAC"], true, "{policy}");
    let names = ok(call(&admin, "list_key_policies", serde_json::json!({"KeyId": arn})));
    assert_eq!(names["PolicyNames"], serde_json::json!(["default"]));
    ok(call(
        &admin,
        "update_key_description",
        serde_json::json!({"KeyId": arn, "Description": "renamed over AWS"}),
    ));
    let description =
        kubectl_ok(&["get", "kmskey", name.trim(), "-n", ns, "-o", "jsonpath={.spec.description}"], None);
    assert_eq!(description.trim(), "renamed over AWS");

    // Grants: created, listed, revoked.
    let grant = ok(call(
        &admin,
        "create_grant",
        serde_json::json!({
            "KeyId": arn, "GranteePrincipal": format!("arn:aws:iam::{ns}:role/batch"), "Operations": ["Decrypt"],
        "RetiringPrincipal": format!("arn:aws:iam::{ns}:role/user"),
        }),
    ));
    let grant_id = grant["GrantId"].as_str().unwrap().to_owned();
    let listed = crate::support::eventually(wait, "the grant to be listed", || async {
        let l = ok(call(&admin, "list_grants", serde_json::json!({"KeyId": arn})));
        (l["Grants"].as_array().is_some_and(|g| !g.is_empty())).then_some(l)
    })
    .await;
    assert_eq!(listed["Grants"][0]["GrantId"], grant_id.as_str(), "{listed}");
    assert_eq!(listed["Grants"][0]["GranteePrincipal"], format!("arn:aws:iam::{ns}:role/batch"));
    assert_eq!(listed["Grants"][0]["Operations"], serde_json::json!(["Decrypt"]));
    // Its retiring principal finds it among the grants it may retire; nobody else may ask.
    let retirable = ok(call(
        &user,
        "list_retirable_grants",
        serde_json::json!({"RetiringPrincipal": format!("arn:aws:iam::{ns}:role/user")}),
    ));
    assert_eq!(retirable["Grants"][0]["GrantId"], grant_id.as_str(), "{retirable}");
    assert_eq!(retirable["Grants"][0]["RetiringPrincipal"], format!("arn:aws:iam::{ns}:role/user"));
    let nosy = call(
        &admin,
        "list_retirable_grants",
        serde_json::json!({"RetiringPrincipal": format!("arn:aws:iam::{ns}:role/user")}),
    );
    assert_eq!(nosy["code"], "AccessDeniedException", "{nosy}");
    ok(call(&admin, "revoke_grant", serde_json::json!({"KeyId": arn, "GrantId": grant_id})));
    crate::support::eventually(wait, "the grant to be gone", || async {
        let l = ok(call(&admin, "list_grants", serde_json::json!({"KeyId": arn})));
        (l["Grants"].as_array().is_some_and(Vec::is_empty)).then_some(())
    })
    .await;

    // Deletion: scheduled (refused at once), cancelled (the key stays disabled).
    let scheduled = ok(call(
        &admin,
        "schedule_key_deletion",
        serde_json::json!({"KeyId": arn, "PendingWindowInDays": 7}),
    ));
    assert_eq!(scheduled["KeyState"], "PendingDeletion", "{scheduled}");
    assert_eq!(scheduled["PendingWindowInDays"], 7);
    answers(
        &user,
        "encrypt",
        &encrypt,
        "KMSInvalidStateException",
        "Encrypt to be refused as pending deletion",
    )
    .await;
    assert_eq!(
        call(&admin, "enable_key", serde_json::json!({"KeyId": arn}))["code"],
        "KMSInvalidStateException"
    );
    ok(call(&admin, "cancel_key_deletion", serde_json::json!({"KeyId": arn})));
    crate::support::eventually(wait, "the key to be Disabled", || async {
        let m = ok(call(&admin, "describe_key", serde_json::json!({"KeyId": arn})));
        (m["KeyMetadata"]["KeyState"] == "Disabled").then_some(())
    })
    .await;
    let aliases = ok(call(&admin, "list_aliases", serde_json::json!({})));
    assert_eq!(aliases["Aliases"], serde_json::json!([]));
}

#[tokio::test]
async fn aliases_name_keys_in_both_apis_and_move() {
    let ns = TestNamespace::new("aws-alias");
    let ns = ns.name.as_str();
    let first = usable_key(ns, "first", "app").await;
    let second = usable_key(ns, "second", "app").await;
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "admins",
            "-n",
            ns,
            "--clusterrole=kubekms-key-admin",
            &format!("--serviceaccount={ns}:admin"),
        ],
        None,
    );
    let admin = Pod::own(ns, "admin");
    let app = Pod::own(ns, "app");
    let wait = crate::keyapi::WAIT;

    // kubectl makes one; `kubectl get kmsaliases` shows its target.
    crate::keyapi::apply(
        ns,
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsAlias\nmetadata:\n  name: by-kubectl\nspec:\n  targetKeyRef: {name: first}\n",
    );
    let listed = kubectl_ok(&["get", "kmsaliases", "-n", ns], None);
    assert!(listed.lines().any(|l| l.starts_with("by-kubectl") && l.contains("first")), "{listed}");
    // The schema refuses names AWS would not take and the reserved ones.
    for bad in ["aws", "has.dot"] {
        let manifest = format!(
            "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsAlias\nmetadata:\n  name: {bad}\nspec:\n  targetKeyRef: {{name: first}}\n"
        );
        let run = crate::support::kubectl(&["apply", "-n", ns, "-f", "-"], Some(&manifest));
        assert!(!run.ok, "{bad} was admitted");
    }

    // Usable wherever a key is named: alias/NAME, an alias ARN, and namespace/alias/NAME
    // in the gRPC API.
    let by_alias = serde_json::json!({"KeyId": "alias/by-kubectl", "Plaintext": "aGk="});
    let out = crate::support::eventually(wait, "the alias to be known", || async {
        let r = call(&app, "encrypt", by_alias.clone());
        (r["code"] == "OK").then_some(r)
    })
    .await;
    assert_eq!(out["answer"]["KeyId"], first.as_str(), "{out}");
    let alias_arn = format!("arn:aws:kms:{}:{ns}:alias/by-kubectl", env_var("KUBEKMS_AWS_REGION"));
    let described = ok(call(&app, "describe_key", serde_json::json!({"KeyId": alias_arn})));
    assert_eq!(described["KeyMetadata"]["Arn"], first.as_str());
    let mut grpc = as_sa(ns, "app").await;
    let sealed = encrypt(&mut grpc, &format!("{ns}/alias/by-kubectl"), b"via alias", &[]).await.unwrap();
    assert_eq!(sealed.key.unwrap().key, format!("{ns}/first"));

    // CreateAlias, UpdateAlias (move), ListAliases, DeleteAlias over the AWS API; a key
    // user may not.
    assert_eq!(
        call(&app, "create_alias", serde_json::json!({"AliasName": "alias/made", "TargetKeyId": first}))["code"],
        "AccessDeniedException"
    );
    crate::support::eventually(wait, "RBAC to let the admin create aliases", || async {
        let r = call(
            &admin,
            "create_alias",
            serde_json::json!({"AliasName": "alias/made", "TargetKeyId": first}),
        );
        (r["code"] == "OK").then_some(())
    })
    .await;
    let again =
        call(&admin, "create_alias", serde_json::json!({"AliasName": "alias/made", "TargetKeyId": first}));
    assert_eq!(again["code"], "AlreadyExistsException", "{again}");
    ok(call(&admin, "update_alias", serde_json::json!({"AliasName": "alias/made", "TargetKeyId": second})));
    let moved = crate::support::eventually(wait, "the alias to move", || async {
        let r = call(&app, "encrypt", serde_json::json!({"KeyId": "alias/made", "Plaintext": "aGk="}));
        (r["answer"]["KeyId"] == second.as_str()).then_some(r)
    })
    .await;
    assert_eq!(moved["code"], "OK");
    let aliases = ok(call(&admin, "list_aliases", serde_json::json!({})));
    let names: Vec<&str> =
        aliases["Aliases"].as_array().unwrap().iter().map(|a| a["AliasName"].as_str().unwrap()).collect();
    assert_eq!(names, ["alias/by-kubectl", "alias/made"], "{aliases}");
    let second_id = second.rsplit('/').next().unwrap();
    assert_eq!(aliases["Aliases"][1]["TargetKeyId"], second_id);
    let of_first = ok(call(&admin, "list_aliases", serde_json::json!({"KeyId": first})));
    assert_eq!(of_first["Aliases"].as_array().unwrap().len(), 1, "{of_first}");
    ok(call(&admin, "delete_alias", serde_json::json!({"AliasName": "alias/made"})));
    crate::support::eventually(wait, "the alias to be gone", || async {
        let r = call(&app, "encrypt", serde_json::json!({"KeyId": "alias/made", "Plaintext": "aGk="}));
        (r["code"] == "NotFoundException").then_some(())
    })
    .await;
    assert_eq!(
        call(&admin, "delete_alias", serde_json::json!({"AliasName": "alias/made"}))["code"],
        "NotFoundException"
    );
}

/// The answers to a batch of calls as `pod`, in one process: (code, message) each.
fn calls(pod: &Pod, batch: &[(&str, Value)]) -> Vec<(String, String)> {
    let batch: Vec<Value> = batch.iter().map(|(op, params)| serde_json::json!([op, params])).collect();
    let out = pod.case(&["calls", &Value::Array(batch).to_string()]);
    out.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["code"].as_str().unwrap().to_owned(), r["message"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn an_unknown_key_is_not_found_only_in_the_callers_own_account() {
    let home = TestNamespace::new("aws-nf-home");
    let other = TestNamespace::new("aws-nf-other");
    let (home, other) = (home.name.as_str(), other.name.as_str());
    let wait = crate::keyapi::WAIT;
    // In the other namespace: a key, an alias of it and a ciphertext under it, none of
    // which the prober (no rights anywhere) may use.
    let arn = usable_key(other, "secret", "owner").await;
    let key_id = arn.rsplit('/').next().unwrap().to_owned();
    crate::keyapi::apply(
        other,
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsAlias\nmetadata:\n  name: known\nspec:\n  targetKeyRef: {name: secret}\n",
    );
    let region = env_var("KUBEKMS_AWS_REGION");
    let alias_arn = |name: &str| format!("arn:aws:kms:{region}:{other}:alias/{name}");
    let owner = Pod::own(other, "owner");
    crate::support::eventually(wait, "the alias to be known", || async {
        let r = call(&owner, "describe_key", serde_json::json!({"KeyId": alias_arn("known")}));
        (r["code"] == "OK").then_some(())
    })
    .await;
    let mut grpc = as_sa(other, "owner").await;
    let blob =
        encrypt(&mut grpc, &format!("{other}/secret"), b"not yours", &[]).await.unwrap().ciphertext_blob;
    let missing_id = "0badc0de-0000-4000-8000-000000000000";
    let mut forged = blob.clone();
    forged[1..17].copy_from_slice(uuid::Uuid::parse_str(missing_id).unwrap().as_bytes());
    let mine = usable_key(home, "mine", "owner").await;
    let mine_id = mine.rsplit('/').next().unwrap().to_owned();

    let prober = Pod::own(home, "prober");
    let plain = |key: &str| serde_json::json!({"KeyId": key, "Plaintext": "aGk="});
    let key = |key: &str| serde_json::json!({"KeyId": key});
    // Pairs naming an existing key of the other namespace and a missing one, the same way.
    let pairs: Vec<(&str, Value, Value, String, String)> = vec![
        ("encrypt", plain(&arn), plain(&key_arn(other, missing_id)), arn.clone(), key_arn(other, missing_id)),
        (
            "encrypt",
            plain(&format!("{other}/secret")),
            plain(&format!("{other}/nope")),
            format!("{other}/secret"),
            format!("{other}/nope"),
        ),
        (
            "encrypt",
            plain(&alias_arn("known")),
            plain(&alias_arn("nope")),
            alias_arn("known"),
            alias_arn("nope"),
        ),
        ("encrypt", plain(&key_id), plain(missing_id), key_id.clone(), missing_id.to_owned()),
        (
            "describe_key",
            key(&arn),
            key(&key_arn(other, missing_id)),
            arn.clone(),
            key_arn(other, missing_id),
        ),
        ("enable_key", key(&arn), key(&key_arn(other, missing_id)), arn.clone(), key_arn(other, missing_id)),
        ("enable_key", key(&key_id), key(missing_id), key_id.clone(), missing_id.to_owned()),
        (
            "decrypt",
            serde_json::json!({"CiphertextBlob": b64().encode(&blob)}),
            serde_json::json!({"CiphertextBlob": b64().encode(&forged)}),
            key_id.clone(),
            missing_id.to_owned(),
        ),
    ];
    let mut batch = Vec::new();
    for (op, existing, missing, _, _) in &pairs {
        batch.push((*op, existing.clone()));
        batch.push((*op, missing.clone()));
    }
    // And in its own account: a missing key, by every name, and a key it may not use.
    let own: Vec<(&str, Value, &str)> = vec![
        ("describe_key", key(&key_arn(home, missing_id)), "NotFoundException"),
        ("describe_key", key(&format!("{home}/nope")), "NotFoundException"),
        ("describe_key", key("alias/nope"), "NotFoundException"),
        ("disable_key", key(&format!("{home}/nope")), "NotFoundException"),
        ("encrypt", plain(&mine), "AccessDeniedException"),
        ("encrypt", plain(&mine_id), "AccessDeniedException"),
        ("disable_key", key(&mine), "AccessDeniedException"),
    ];
    batch.extend(own.iter().map(|(op, params, _)| (*op, params.clone())));
    let answers = calls(&prober, &batch);

    for (i, (op, _, _, existing, missing)) in pairs.iter().enumerate() {
        let (a, b) = (&answers[2 * i], &answers[2 * i + 1]);
        let expected = if existing.contains(':') || existing.contains('/') {
            "AccessDeniedException"
        } else {
            "NotFoundException"
        };
        assert_eq!(a.0, expected, "{op} {existing}: {a:?}");
        assert_eq!(a.0, b.0, "{op}: an existing key and a missing one answer alike: {a:?} {b:?}");
        assert_eq!(
            a.1.replace(existing.as_str(), "KEY"),
            b.1.replace(missing.as_str(), "KEY"),
            "{op}: the messages differ only by the name given"
        );
        assert!(!a.1.contains("secret") || existing.contains("secret"), "{op}: {a:?} names the key");
    }
    for (i, (op, params, code)) in own.iter().enumerate() {
        let answer = &answers[2 * pairs.len() + i];
        assert_eq!(answer.0, *code, "{op} {params}: {answer:?}");
    }
}

/// SOPS.
fn sops() -> &'static Path {
    static SOPS: OnceLock<PathBuf> = OnceLock::new();
    tool(&SOPS, "sops.sh")
}

#[tokio::test]
async fn sops_encrypts_and_decrypts_a_file_under_a_kubekms_key() {
    // SOPS takes only ARNs whose account is digits: a namespace named so.
    let digits = uuid::Uuid::new_v4().as_u128() % 1_000_000_000_000;
    let ns = crate::support::TestNamespace::named(&format!("{digits:012}"));
    let ns = ns.name.as_str();
    let arn = usable_key(ns, "sops", "deployer").await;
    let pod = Pod::own(ns, "deployer");
    let dir = run_dir().join("aws-tokens");
    let plain = dir.join(format!("{ns}-secrets.yaml"));
    std::fs::write(&plain, "database:\n  password: hunter2\n").unwrap();
    let run = |args: &[&str]| {
        let out = pod.command(sops()).args(args).output().expect("run sops");
        assert!(out.status.success(), "sops {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let encrypted = run(&["--encrypt", "--kms", &arn, plain.to_str().unwrap()]);
    assert!(!encrypted.contains("hunter2"), "{encrypted}");
    assert!(encrypted.contains(&arn), "SOPS records the key's ARN: {encrypted}");
    let sealed = dir.join(format!("{ns}-secrets.enc.yaml"));
    std::fs::write(&sealed, &encrypted).unwrap();
    let decrypted = run(&["--decrypt", sealed.to_str().unwrap()]);
    let lines: Vec<&str> = decrypted.lines().map(str::trim).collect();
    assert_eq!(lines, ["database:", "password: hunter2"], "{decrypted}");
    // Another ServiceAccount of the namespace, without rights on the key, cannot.
    let stranger = Pod::own(ns, "stranger");
    let out = stranger.command(sops()).args(["--decrypt", sealed.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success(), "a stranger decrypted the file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("AccessDeniedException"), "{out:?}");
}

/// The most grants a key may have on the key API of `make up` (`SERVER_MAX_GRANTS_PER_KEY`
/// in e2e/controlplane/cluster.py).
const MAX_GRANTS_PER_KEY: usize = 100;

/// The bound on a key's grants as boto3 meets it: once the key holds its most grants, a
/// caller with the right to grant gets `LimitExceededException`, one without it the usual
/// `AccessDeniedException` (it learns nothing of the key's grants), and revoking a grant
/// makes room again.
#[tokio::test]
async fn create_grant_past_the_most_grants_a_key_may_have_is_limit_exceeded() {
    let ns = TestNamespace::new("aws-grants");
    let ns = ns.name.as_str();
    let key = enabled_key(ns, "k", "  description: grants bound\n").await;
    let arn = key_arn(ns, key.status.as_ref().unwrap().key_id.as_ref().unwrap());
    let (admin, user) = (Pod::own(ns, "admin"), Pod::own(ns, "user"));
    let admins = format!("--serviceaccount={ns}:admin");
    kubectl_ok(
        &["create", "rolebinding", "admins", "-n", ns, "--clusterrole=kubekms-key-admin", &admins],
        None,
    );
    bind_key_user(ns, ns, "user");
    let grant = serde_json::json!({
        "KeyId": arn, "GranteePrincipal": format!("arn:aws:iam::{ns}:role/batch"), "Operations": ["Decrypt"],
    });
    answers(&admin, "create_grant", &grant, "OK", "RBAC to let the admin grant").await;
    let made = calls(&admin, &vec![("create_grant", grant.clone()); MAX_GRANTS_PER_KEY - 1]);
    assert!(made.iter().all(|(code, _)| code == "OK"), "{made:?}");

    // The key API counts the grants it has seen; it sees the last ones within moments.
    let refused = crate::support::eventually(crate::keyapi::WAIT, "CreateGrant to be refused", || async {
        let answer = call(&admin, "create_grant", grant.clone());
        (answer["code"] != "OK").then_some(answer)
    })
    .await;
    assert_eq!(refused["code"], "LimitExceededException", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains(&format!("a key may have at most {MAX_GRANTS_PER_KEY}")), "{message}");
    let held = kubectl_ok(&["get", "kmsgrants", "-n", ns, "-o", "name"], None).lines().count();
    // Calls in flight together may pass the check together; these came one at a time.
    assert!((MAX_GRANTS_PER_KEY..=MAX_GRANTS_PER_KEY + 1).contains(&held), "{held} grants");
    // Without the right to grant: refused as ever, not told about the bound.
    let intruder = call(&user, "create_grant", grant.clone());
    assert_eq!(intruder["code"], "AccessDeniedException", "{intruder}");
    assert!(!intruder["message"].as_str().unwrap().contains("at most"), "{intruder}");

    // Revoking makes room (once the key API has seen the grants go).
    let listed = ok(call(&admin, "list_grants", serde_json::json!({"KeyId": arn, "Limit": 100})));
    for g in listed["Grants"].as_array().unwrap().iter().take(held + 1 - MAX_GRANTS_PER_KEY) {
        ok(call(&admin, "revoke_grant", serde_json::json!({"KeyId": arn, "GrantId": g["GrantId"]})));
    }
    answers(&admin, "create_grant", &grant, "OK", "room for a grant after a revocation").await;
}
