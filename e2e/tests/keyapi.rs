//! The key API with real ServiceAccount tokens on the real control plane: the wiring that
//! only a cluster shows — TokenReview, SubjectAccessReview, policies and grants as the
//! watches convert them, the controller's key and grant transitions, TLS, the CLI, and the
//! audit file and metrics. The decisions themselves (the allow/deny matrix, grant
//! constraints and states, bad input, every error's code and message) are the component
//! tests' (`src/server/component_tests.rs`); each keeps one representative here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::Api;
use kubekms::api::{GrantState, KeyState, KmsGrant, KmsKey};
use kubekms::client::{Client, TokenSource};
use kubekms::proto::keyapi::*;
use tonic::Code;

use crate::support::{
    TestNamespace, can_i, client, env_var, eventually, kubectl, kubectl_ok, kubekms_bin, patch_key, run_dir,
};

pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn token(ns: &str, sa: &str, audience: &str) -> String {
    kubectl_ok(&["create", "token", sa, "-n", ns, "--audience", audience, "--duration", "10m"], None)
        .trim()
        .to_owned()
}

pub(crate) async fn connect_with(token: &str) -> Client {
    let ca = PathBuf::from(env_var("KUBEKMS_CA"));
    let source = TokenSource::Literal(zeroize::Zeroizing::new(token.to_owned()));
    kubekms::client::connect(&env_var("KUBEKMS_ADDR"), Some(&ca), &source)
        .await
        .expect("connect to the key API")
}

/// A client authenticated as ServiceAccount `ns/sa` (created if needed).
pub(crate) async fn as_sa(ns: &str, sa: &str) -> Client {
    let _ = kubectl(&["create", "serviceaccount", sa, "-n", ns], None);
    connect_with(&token(ns, sa, "kubekms")).await
}

pub(crate) fn apply(ns: &str, manifest: &str) {
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(manifest));
}

pub(crate) async fn enabled_key(ns: &str, name: &str, spec: &str) -> KmsKey {
    apply(
        ns,
        &format!(
            "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: {name}\nspec:\n{spec}"
        ),
    );
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    eventually(WAIT, "the key to be Enabled", || async {
        keys.get(name)
            .await
            .ok()
            .filter(|k| k.status.as_ref().and_then(|s| s.state) == Some(KeyState::Enabled))
    })
    .await
}

/// Binds `sa_ns/sa` to `kubekms-key-user` in `ns` and returns once RBAC honours the binding:
/// the API server's authorizer learns of a new RoleBinding through its own watch, and a call
/// made before that is refused (and the refusal cached by the key API for its TTL).
pub(crate) fn bind_key_user(ns: &str, sa_ns: &str, sa: &str) {
    let args = key_user_binding(ns, sa_ns, sa);
    kubectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    let who = format!("system:serviceaccount:{sa_ns}:{sa}");
    let until = Instant::now() + WAIT;
    while !can_i(ns, &who, "encrypt", "kmskeys.kms.kubekms.io") {
        assert!(Instant::now() < until, "RBAC never honoured the binding of {who} in {ns}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kubectl arguments that bind ServiceAccount `sa_ns/sa` to `kubekms-key-user` in `ns`.
pub(crate) fn key_user_binding(ns: &str, sa_ns: &str, sa: &str) -> Vec<String> {
    let args =
        ["create", "rolebinding", &format!("{sa_ns}-{sa}-keys"), "-n", ns, "--clusterrole=kubekms-key-user"];
    let mut args: Vec<String> = args.into_iter().map(str::to_owned).collect();
    args.push(format!("--serviceaccount={sa_ns}:{sa}"));
    args
}

pub(crate) fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

pub(crate) async fn encrypt(
    c: &mut Client,
    key: &str,
    plaintext: &[u8],
    context: &[(&str, &str)],
) -> Result<EncryptResponse, tonic::Status> {
    c.encrypt(EncryptRequest {
        key: key.into(),
        plaintext: plaintext.to_vec(),
        encryption_context: ctx(context),
    })
    .await
    .map(tonic::Response::into_inner)
}

pub(crate) async fn decrypt(
    c: &mut Client,
    blob: &[u8],
    context: &[(&str, &str)],
) -> Result<DecryptResponse, tonic::Status> {
    c.decrypt(DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(context),
        key: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

pub(crate) fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn key_policy_allow_and_explicit_deny() {
    let ns = TestNamespace::new("policy");
    let ns = ns.name.as_str();
    // Key A: the policy alone decides (no RBAC delegation).
    let policy_only = format!(
        "  policy:\n    delegateToRBAC: false\n    statements:\n    - sid: web\n      effect: Allow\n      principals: [{{kind: ServiceAccount, namespace: {ns}, name: web}}]\n      operations: [Encrypt, Decrypt, DescribeKey]\n"
    );
    enabled_key(ns, "a", &policy_only).await;
    // Key B: RBAC lets "intruder" use it, but a Deny statement refuses it Decrypt.
    let deny = format!(
        "  policy:\n    statements:\n    - sid: no-intruder\n      effect: Deny\n      principals: [{{kind: ServiceAccount, namespace: {ns}, name: intruder}}]\n      operations: [Decrypt]\n"
    );
    enabled_key(ns, "b", &deny).await;
    let mut web = as_sa(ns, "web").await;
    let mut other = as_sa(ns, "other").await;
    let mut intruder = as_sa(ns, "intruder").await;
    bind_key_user(ns, ns, "other");
    bind_key_user(ns, ns, "intruder");

    let a = format!("{ns}/a");
    let e = encrypt(&mut web, &a, b"for web", &[]).await.unwrap();
    assert_eq!(e.key.as_ref().unwrap().version, 1);
    assert_eq!(decrypt(&mut web, &e.ciphertext_blob, &[]).await.unwrap().plaintext, b"for web");
    // RBAC would allow "other", but key A does not delegate to RBAC.
    assert_eq!(code(encrypt(&mut other, &a, b"x", &[]).await), Code::PermissionDenied);

    let b = format!("{ns}/b");
    let e = encrypt(&mut intruder, &b, b"secret", &[]).await.expect("RBAC allows Encrypt");
    let denied = decrypt(&mut intruder, &e.ciphertext_blob, &[]).await.unwrap_err();
    // The caller is told what a caller of a key that does not exist is told; the audit line
    // names the statement.
    let key_id = e.key.as_ref().unwrap().key_id.clone();
    assert_eq!(
        (denied.code(), denied.message()),
        (
            Code::PermissionDenied,
            format!("key {key_id:?} does not exist or you may not use it for Decrypt").as_str()
        )
    );
    let audit = std::fs::read_to_string(run_dir().join("server/audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains(r#""result":"PermissionDenied""#) && l.contains("no-intruder")),
        "no audit line names the statement"
    );
    assert_eq!(decrypt(&mut other, &e.ciphertext_blob, &[]).await.unwrap().plaintext, b"secret");

    // DescribeKey shows metadata, never material.
    let d =
        web.describe_key(DescribeKeyRequest { key: a.clone() }).await.unwrap().into_inner().metadata.unwrap();
    assert_eq!((d.state.as_str(), d.current_version, d.key.as_str()), ("Enabled", 1, a.as_str()));
}

#[tokio::test]
async fn rbac_delegation_by_verb() {
    let ns = TestNamespace::new("rbac-verbs");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: default policy delegates to RBAC\n").await;
    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: encrypt-only}\nrules:\n- apiGroups: [kms.kubekms.io]\n  resources: [kmskeys]\n  resourceNames: [k]\n  verbs: [encrypt]\n".to_string();
    apply(ns, &role);
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "writer",
            "-n",
            ns,
            "--role=encrypt-only",
            &format!("--serviceaccount={ns}:writer"),
        ],
        None,
    );
    let mut writer = as_sa(ns, "writer").await;
    let key = format!("{ns}/k");
    let e = encrypt(&mut writer, &key, b"data", &[]).await.unwrap();
    assert_eq!(
        code(decrypt(&mut writer, &e.ciphertext_blob, &[]).await),
        Code::PermissionDenied,
        "decrypt not granted"
    );
    // Keys can be named by keyId too.
    let key_id = e.key.unwrap().key_id;
    encrypt(&mut writer, &key_id, b"by id", &[]).await.unwrap();
}

pub(crate) async fn grant_state(ns: &str, name: &str, want: GrantState) -> KmsGrant {
    let grants: Api<KmsGrant> = Api::namespaced(client().await, ns);
    eventually(WAIT, &format!("grant {name} to be {want:?}"), || async {
        grants.get(name).await.ok().filter(|g| g.status.as_ref().and_then(|s| s.state) == Some(want))
    })
    .await
}

fn grant_manifest(name: &str, grantee_ns: &str, grantee: &str, ops: &str, extra: &str) -> String {
    format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: {name}\nspec:\n  keyRef: {{name: k}}\n  grantee: {{kind: ServiceAccount, namespace: {grantee_ns}, name: {grantee}}}\n  operations: [{ops}]\n{extra}"
    )
}

#[tokio::test]
async fn grants_to_another_namespace_with_constraints_expiry_retire_and_revoke() {
    let owner_ns = TestNamespace::new("grant-owner");
    let other_ns = TestNamespace::new("grant-other");
    let (ns, other) = (owner_ns.name.as_str(), other_ns.name.as_str());
    enabled_key(ns, "k", "  description: shared by grants\n").await;
    bind_key_user(ns, ns, "owner");
    let mut owner = as_sa(ns, "owner").await;
    let key = format!("{ns}/k");
    let acme = encrypt(&mut owner, &key, b"acme data", &[("tenant", "acme"), ("doc", "1")])
        .await
        .unwrap()
        .ciphertext_blob;
    let evil = encrypt(&mut owner, &key, b"evil data", &[("tenant", "evil")]).await.unwrap().ciphertext_blob;

    // A ServiceAccount of another namespace, without RBAC, through a grant with an
    // encryptionContextSubset constraint.
    let mut reader = as_sa(other, "reader").await;
    apply(ns, &grant_manifest(
        "subset", other, "reader", "Decrypt",
        "  constraints:\n    encryptionContextSubset: {tenant: acme}\n  retiringPrincipal: {kind: ServiceAccount, namespace: NS, name: owner}\n".replace("NS", ns).as_str(),
    ));
    let g = grant_state(ns, "subset", GrantState::Active).await;
    let grant_id = g.status.unwrap().grant_id.unwrap();
    let table = kubectl_ok(&["get", "kmsgrants", "-n", ns], None);
    assert!(table.contains("Active") && table.contains(&format!("ServiceAccount:{other}/reader")), "{table}");
    let ok = eventually(WAIT, "the grant to take effect", || async {
        decrypt(&mut reader.clone(), &acme, &[("tenant", "acme"), ("doc", "1")]).await.ok()
    })
    .await;
    assert_eq!(ok.plaintext, b"acme data");
    assert_eq!(
        code(decrypt(&mut reader, &evil, &[("tenant", "evil")]).await),
        Code::PermissionDenied,
        "constraint violated"
    );
    // The audit line names the grant.
    let audit = std::fs::read_to_string(run_dir().join("server/audit.log")).unwrap();
    assert!(audit.lines().any(|l| l.contains(&grant_id) && l.contains(r#""result":"OK""#)));

    // Retire: the retiring principal may; then the grant is dead.
    owner
        .retire_grant(RetireGrantRequest { grant: grant_id.clone() })
        .await
        .expect("retire by the retiring principal");
    let g = grant_state(ns, "subset", GrantState::Retired).await;
    assert_eq!(
        g.status.unwrap().retired_by.as_deref(),
        Some(format!("system:serviceaccount:{ns}:owner").as_str())
    );
    assert_eq!(
        code(decrypt(&mut reader, &acme, &[("tenant", "acme"), ("doc", "1")]).await),
        Code::PermissionDenied
    );

    // Revoke: deleting the grant stops it within moments.
    let revoked = as_sa(other, "revoked").await;
    apply(ns, &grant_manifest("revoke-me", other, "revoked", "Decrypt", ""));
    grant_state(ns, "revoke-me", GrantState::Active).await;
    eventually(WAIT, "the grant to work", || async {
        decrypt(&mut revoked.clone(), &evil, &[("tenant", "evil")]).await.ok()
    })
    .await;
    kubectl_ok(&["delete", "kmsgrant", "revoke-me", "-n", ns], None);
    eventually(Duration::from_secs(10), "the revoked grant to stop working", || async {
        (decrypt(&mut revoked.clone(), &evil, &[("tenant", "evil")]).await.err()?.code()
            == Code::PermissionDenied)
            .then_some(())
    })
    .await;

    // Expiry: Active until expiresAt, then Expired and refused.
    let mut brief = as_sa(other, "brief").await;
    let expires =
        (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(8)).round(jiff::Unit::Second).unwrap();
    apply(ns, &grant_manifest("brief", other, "brief", "Decrypt", &format!("  expiresAt: \"{expires}\"\n")));
    grant_state(ns, "brief", GrantState::Active).await;
    eventually(WAIT, "the brief grant to work", || async {
        decrypt(&mut brief.clone(), &evil, &[("tenant", "evil")]).await.ok()
    })
    .await;
    grant_state(ns, "brief", GrantState::Expired).await;
    assert!(jiff::Timestamp::now() >= expires);
    assert_eq!(code(decrypt(&mut brief, &evil, &[("tenant", "evil")]).await), Code::PermissionDenied);

    // A grant for a key that does not exist is Invalid, and says why.
    apply(
        ns,
        grant_manifest("dangling", other, "reader", "Decrypt", "")
            .replace("name: k}", "name: nope}")
            .as_str(),
    );
    let g = grant_state(ns, "dangling", GrantState::Invalid).await;
    assert_eq!(g.status.unwrap().conditions[0].reason, "KeyNotFound");
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let ns = TestNamespace::new("keyapi-bad");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: bad input\n").await;
    enabled_key(ns, "switch", "  description: to be disabled\n").await;
    bind_key_user(ns, ns, "app");
    let mut app = as_sa(ns, "app").await;
    let key = format!("{ns}/k");
    let e = encrypt(&mut app, &key, b"payload", &[("purpose", "test")]).await.unwrap();

    // A wrong encryption context: decryption failed.
    let context = [("purpose", "other")];
    let err = decrypt(&mut app, &e.ciphertext_blob, &context).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "decryption failed"), "{context:?}");

    // Sizes: the service, not the transport's message limit, refuses 4097 bytes of plaintext.
    let big = encrypt(&mut app, &key, &[0u8; 4097], &[]).await.unwrap_err();
    assert_eq!(big.code(), Code::InvalidArgument);
    assert!(big.message().contains("at most 4096"), "{}", big.message());
    encrypt(&mut app, &key, &[0u8; 4096], &[]).await.expect("4 KiB is allowed");
    assert_eq!(
        app.generate_random(GenerateRandomRequest { number_of_bytes: 64 })
            .await
            .unwrap()
            .into_inner()
            .plaintext
            .len(),
        64
    );

    // A disabled key refuses with FAILED_PRECONDITION.
    let off = format!("{ns}/switch");
    let before = encrypt(&mut app, &off, b"while enabled", &[]).await.unwrap();
    patch_key(ns, "switch", r#"{"spec":{"enabled":false}}"#);
    eventually(WAIT, "the key to be refused", || async {
        (encrypt(&mut app.clone(), &off, b"x", &[]).await.err()?.code() == Code::FailedPrecondition)
            .then_some(())
    })
    .await;
    assert_eq!(code(decrypt(&mut app, &before.ciphertext_blob, &[]).await), Code::FailedPrecondition);
    // A grant for a key that is not usable is Invalid, and says why.
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&grant_manifest("on-disabled", ns, "app", "Encrypt", "").replace("name: k}", "name: switch}")),
    );
    let g = grant_state(ns, "on-disabled", GrantState::Invalid).await;
    assert_eq!(g.status.unwrap().conditions[0].reason, "KeyNotEnabled");
    // A key pending deletion refuses the same way.
    patch_key(ns, "switch", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    eventually(WAIT, "the key to be PendingDeletion", || async {
        let k = keys.get("switch").await.ok()?;
        (k.status?.state == Some(KeyState::PendingDeletion)).then_some(())
    })
    .await;
    eventually(WAIT, "the server to see PendingDeletion", || async {
        let err = encrypt(&mut app.clone(), &off, b"x", &[]).await.err()?;
        (err.code() == Code::FailedPrecondition && err.message().contains("PendingDeletion")).then_some(())
    })
    .await;
    assert_eq!(code(decrypt(&mut app, &before.ciphertext_blob, &[]).await), Code::FailedPrecondition);

    // Authentication: no token, a garbage token, a token for another audience.
    let ca = PathBuf::from(env_var("KUBEKMS_CA"));
    let channel = tonic::transport::Channel::builder(env_var("KUBEKMS_ADDR").parse().unwrap())
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name("127.0.0.1")
                .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca).unwrap())),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = key_service_client::KeyServiceClient::new(channel);
    let err = anonymous.generate_random(GenerateRandomRequest { number_of_bytes: 8 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("missing bearer token"), "{}", err.message());
    let mut garbage = connect_with("not-a-token").await;
    assert_eq!(
        code(garbage.generate_random(GenerateRandomRequest { number_of_bytes: 8 }).await),
        Code::Unauthenticated
    );
    let mut wrong_audience =
        connect_with(&token(ns, "app", "https://kubernetes.default.svc.cluster.local")).await;
    let err = wrong_audience.generate_random(GenerateRandomRequest { number_of_bytes: 8 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn re_encrypt_and_data_keys() {
    let ns = TestNamespace::new("reencrypt");
    let ns = ns.name.as_str();
    enabled_key(ns, "old", "  description: source\n").await;
    enabled_key(ns, "new", "  description: destination\n").await;
    bind_key_user(ns, ns, "app");
    let mut app = as_sa(ns, "app").await;
    let e = encrypt(&mut app, &format!("{ns}/old"), b"move me", &[("a", "1")]).await.unwrap();
    let r = app
        .re_encrypt(ReEncryptRequest {
            ciphertext_blob: e.ciphertext_blob,
            source_encryption_context: ctx(&[("a", "1")]),
            source_key: String::new(),
            destination_key: format!("{ns}/new"),
            destination_encryption_context: ctx(&[("b", "2")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.source_key.unwrap().key, format!("{ns}/old"));
    assert_eq!(r.key.unwrap().key, format!("{ns}/new"));
    assert_eq!(decrypt(&mut app, &r.ciphertext_blob, &[("b", "2")]).await.unwrap().plaintext, b"move me");

    // A data key decrypts back to itself; without plaintext only the blob comes back.
    let dk = app
        .generate_data_key(GenerateDataKeyRequest {
            key: format!("{ns}/new"),
            encryption_context: HashMap::new(),
            number_of_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk.plaintext.len(), 32);
    assert_eq!(decrypt(&mut app, &dk.ciphertext_blob, &[]).await.unwrap().plaintext, dk.plaintext);
    let wp = app
        .generate_data_key_without_plaintext(GenerateDataKeyWithoutPlaintextRequest {
            key: format!("{ns}/new"),
            encryption_context: HashMap::new(),
            number_of_bytes: 16,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decrypt(&mut app, &wp.ciphertext_blob, &[]).await.unwrap().plaintext.len(), 16);

    // Old versions still decrypt after a rotation.
    kubectl_ok(
        &[
            "patch",
            "kmskey",
            "new",
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"rotation":{"onDemandRequest":"r1"}}}"#,
        ],
        None,
    );
    let v2 = eventually(WAIT, "version 2 in use", || async {
        let e = encrypt(&mut app.clone(), &format!("{ns}/new"), b"v2", &[]).await.ok()?;
        (e.key.as_ref()?.version == 2).then_some(e)
    })
    .await;
    assert_eq!(decrypt(&mut app, &v2.ciphertext_blob, &[]).await.unwrap().plaintext, b"v2");
    assert_eq!(
        decrypt(&mut app, &dk.ciphertext_blob, &[]).await.unwrap().plaintext,
        dk.plaintext,
        "version 1 still decrypts"
    );
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(kubekms_bin())
        .args(args)
        .env("KUBECONFIG", run_dir().join("kubeconfig"))
        .env("KUBEKMS_ADDR", env_var("KUBEKMS_ADDR"))
        .env("KUBEKMS_CA", env_var("KUBEKMS_CA"))
        .output()
        .unwrap()
}

#[tokio::test]
async fn cli_round_trip_of_100_mib_in_bounded_memory() {
    let ns = TestNamespace::new("cli");
    let ns = ns.name.as_str();
    enabled_key(ns, "files", "  description: file encryption\n").await;
    bind_key_user(ns, ns, "backup");
    let _ = kubectl(&["create", "serviceaccount", "backup", "-n", ns], None);
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&plain).unwrap());
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..100 {
            for b in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
            }
            f.write_all(&block).unwrap();
        }
    }
    let sa = format!("{ns}/backup");
    let (enc, dec) = (dir.path().join("enc.kkms"), dir.path().join("dec.bin"));
    let p = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let out = cli(&[
        "encrypt",
        "--service-account",
        &sa,
        "--key",
        &format!("{ns}/files"),
        "--context",
        "backup=nightly",
        "--in",
        &p(&plain),
        "--out",
        &p(&enc),
        "--verbose",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let peak = |out: &std::process::Output| -> u64 {
        let text = String::from_utf8_lossy(&out.stderr);
        text.split("peak memory ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    assert!(peak(&out) < 64 * 1024, "encrypt used {} KiB for 100 MiB", peak(&out));
    let out = cli(&[
        "decrypt",
        "--service-account",
        &sa,
        "--context",
        "backup=nightly",
        "--in",
        &p(&enc),
        "--out",
        &p(&dec),
        "--verbose",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(peak(&out) < 64 * 1024, "decrypt used {} KiB for 100 MiB", peak(&out));
    assert!(std::fs::read(&plain).unwrap() == std::fs::read(&dec).unwrap(), "round trip differs");

    // Truncated or reordered files fail with exit code 7 and leave no output file.
    let bytes = std::fs::read(&enc).unwrap();
    let cut = dir.path().join("cut.kkms");
    std::fs::write(&cut, &bytes[..bytes.len() - 65_552]).unwrap();
    let bad_out = dir.path().join("bad.bin");
    let out = cli(&["decrypt", "--service-account", &sa, "--in", &p(&cut), "--out", &p(&bad_out)]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    assert!(!bad_out.exists(), "no partial output");
    let mut swapped = bytes.clone();
    let chunk = 65_536 + 16;
    let start = bytes.len() - 10 * chunk;
    let (a, b) = (start, start + chunk);
    let first = swapped[a..a + chunk].to_vec();
    swapped.copy_within(b..b + chunk, a);
    swapped[b..b + chunk].copy_from_slice(&first);
    let reordered = dir.path().join("swapped.kkms");
    std::fs::write(&reordered, &swapped).unwrap();
    let out = cli(&["decrypt", "--service-account", &sa, "--in", &p(&reordered), "--out", &p(&bad_out)]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    // A context the file does not carry is refused before anything is decrypted.
    let out = cli(&[
        "decrypt",
        "--service-account",
        &sa,
        "--context",
        "backup=weekly",
        "--in",
        &p(&enc),
        "--out",
        &p(&bad_out),
    ]);
    assert_eq!(out.status.code(), Some(7));
    // Exit codes name the refusal: no permission is 4.
    let _ = kubectl(&["create", "serviceaccount", "nobody", "-n", ns], None);
    let out = cli(&[
        "encrypt",
        "--service-account",
        &format!("{ns}/nobody"),
        "--key",
        &format!("{ns}/files"),
        "--in",
        &p(&cut),
        "--out",
        &p(&bad_out),
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `kubekms encrypt`/`decrypt` through pipes, with the token in the environment or a file.
fn cli_piped(args: &[&str], token_env: Option<&str>, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut cmd = std::process::Command::new(kubekms_bin());
    cmd.args(args)
        .env("KUBEKMS_ADDR", env_var("KUBEKMS_ADDR"))
        .env("KUBEKMS_CA", env_var("KUBEKMS_CA"))
        .env_remove("KUBEKMS_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(t) = token_env {
        cmd.env("KUBEKMS_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[tokio::test]
async fn cli_streams_with_a_token_from_a_file_or_the_environment() {
    let ns = TestNamespace::new("cli-stream");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: streamed\n").await;
    bind_key_user(ns, ns, "app");
    let _ = kubectl(&["create", "serviceaccount", "app", "-n", ns], None);
    let good = token(ns, "app", "kubekms");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{good}\n")).unwrap();
    let key = format!("{ns}/k");
    // More than one chunk, from standard input to standard output.
    let plain: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();

    let enc = cli_piped(
        &["encrypt", "--token-file", token_file.to_str().unwrap(), "--key", &key, "--in", "-", "--out", "-"],
        None,
        &plain,
    );
    assert!(enc.status.success(), "{}", String::from_utf8_lossy(&enc.stderr));
    assert!(enc.stdout.len() > plain.len(), "the envelope holds the whole input");
    assert!(!enc.stdout.windows(64).any(|w| w == &plain[..64]), "no plaintext in the envelope");

    let dec = cli_piped(&["decrypt", "--in", "-", "--out", "-"], Some(&good), &enc.stdout);
    assert!(dec.status.success(), "{}", String::from_utf8_lossy(&dec.stderr));
    assert!(dec.stdout == plain, "the streamed round trip differs");

    // No token anywhere: a usage error that says where a token comes from.
    let none = cli_piped(&["decrypt", "--in", "-", "--out", "-"], None, &enc.stdout);
    assert_eq!(none.status.code(), Some(1), "{}", String::from_utf8_lossy(&none.stderr));
    assert!(String::from_utf8_lossy(&none.stderr).contains("KUBEKMS_TOKEN"));
    assert!(none.stdout.is_empty());
    // A token for another audience, from the environment: unauthenticated (3).
    let wrong = token(ns, "app", "not-kubekms");
    let out = cli_piped(&["decrypt", "--in", "-", "--out", "-"], Some(&wrong), &enc.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "nothing is written before the data key is unwrapped");
}

#[tokio::test]
async fn the_audit_trail_verifies_and_holds_no_secrets() {
    let ns = TestNamespace::new("audit");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: audited\n").await;
    bind_key_user(ns, ns, "app");
    let token = {
        let _ = kubectl(&["create", "serviceaccount", "app", "-n", ns], None);
        token(ns, "app", "kubekms")
    };
    let mut app = connect_with(&token).await;
    let secret = format!("audit-plaintext-{}", uuid::Uuid::new_v4());
    let e = encrypt(&mut app, &format!("{ns}/k"), secret.as_bytes(), &[("tenant", "secret-tenant-value")])
        .await
        .unwrap();
    decrypt(&mut app, &e.ciphertext_blob, &[("tenant", "secret-tenant-value")]).await.unwrap();
    let dk = app
        .generate_data_key(GenerateDataKeyRequest {
            key: format!("{ns}/k"),
            encryption_context: HashMap::new(),
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();
    let log = run_dir().join("server/audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!(r#""principal":"system:serviceaccount:{ns}:app""#)));
    assert!(text.contains(r#""encryptionContextKeys":["tenant"]"#));
    for forbidden in [secret.as_str(), "secret-tenant-value", token.as_str()] {
        assert!(!text.contains(forbidden), "the audit log holds {forbidden:?}");
    }
    use base64::Engine;
    assert!(!text.contains(&base64::engine::general_purpose::STANDARD.encode(&dk.plaintext)));
    let root_key = crate::support::root_key_args();
    let with_root = |args: &[&str]| {
        cli(&args.iter().copied().chain(root_key.iter().map(String::as_str)).collect::<Vec<_>>())
    };
    let out = with_root(&["audit", "verify", log.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // An edited copy does not verify.
    let copy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(copy.path(), text.replacen(r#""result":"OK""#, r#""result":"PermissionDenied""#, 1))
        .unwrap();
    let out = with_root(&["audit", "verify", copy.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    // Metering: counters per key, operation and result, and a latency histogram.
    let port: u16 = env_var("KUBEKMS_SERVER_METRICS").rsplit(':').next().unwrap().parse().unwrap();
    let (_, metrics) = crate::support::http_get(port, "/metrics").await.expect("server metrics");
    let counter = format!(
        r#"kubekms_operations_total{{component="server",key="{ns}/k",operation="Encrypt",result="OK"}} 1"#
    );
    assert!(metrics.contains(&counter), "missing {counter}");
    assert!(metrics.contains(r#"kubekms_operation_duration_seconds_bucket{le="#));

    // Lines cut from the end leave a valid chain; the sequence number that monitoring
    // recorded from /metrics shows them.
    let seq: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubekms_audit_sequence "))
        .and_then(|v| v.trim().parse().ok())
        .expect("kubekms_audit_sequence in the server's metrics");
    let now = std::fs::read_to_string(&log).unwrap();
    let written: Vec<&str> = now.lines().collect();
    assert!(written.len() >= seq, "the log holds every line the metric counts");
    let cut = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cut.path(), written[..seq - 1].join("\n") + "\n").unwrap();
    let verify = |path: &std::path::Path, expect: Option<usize>| {
        let mut args = vec!["audit".to_owned(), "verify".to_owned(), path.to_str().unwrap().to_owned()];
        args.extend(root_key.iter().cloned());
        if let Some(n) = expect {
            args.extend(["--expect-seq".to_owned(), n.to_string()]);
        }
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(verify(&log, Some(seq)).status.success());
    assert!(verify(cut.path(), None).status.success(), "the chain alone cannot tell");
    let out = verify(cut.path(), Some(seq));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cut from the end"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn benchmark_smoke_run() {
    // A tiny run of `kubekms bench keyapi`, so the benchmark cannot rot; it checks the rows,
    // not the speed.
    let ns = TestNamespace::new("bench");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: bench\n").await;
    bind_key_user(ns, ns, "bench");
    let _ = kubectl(&["create", "serviceaccount", "bench", "-n", ns], None);
    let out = cli(&[
        "bench",
        "keyapi",
        "--service-account",
        &format!("{ns}/bench"),
        "--key",
        &format!("{ns}/k"),
        "--calls",
        "20",
        "--concurrency",
        "1,2",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for row in
        ["| floor | GenerateRandom | 1 |", "| kubekms | Encrypt | 2 |", "| kubekms | GenerateDataKey | 1 |"]
    {
        assert!(table.contains(row), "missing {row} in\n{table}");
    }
}
