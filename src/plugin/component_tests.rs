//! The plugin over a real unix socket with a real gRPC client, as kube-apiserver uses it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use super::format::{KEY_ANNOTATION, MAX_CIPHERTEXT_LEN, MAX_KEY_ID_LEN, is_fqdn};
use super::service::KmsPlugin;
use super::socket::PluginSocket;
use crate::crypto::{KeyMaterial, RootKey};
use crate::domain::{KeyInfo, KeySnapshot, KeyState};
use crate::keyring::WatchKeyring;
use crate::metering::OperationMetrics;
use crate::proto::kmsv2::key_management_service_client::KeyManagementServiceClient;
use crate::proto::kmsv2::key_management_service_server::KeyManagementServiceServer;
use crate::proto::kmsv2::{DecryptRequest, EncryptRequest, StatusRequest};
use crate::testing::{AuditSink, CapturedUses};

const KEY_ID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

fn snapshot(state: KeyState, versions: u32) -> Arc<KeySnapshot> {
    Arc::new(KeySnapshot {
        info: KeyInfo {
            namespace: "kube-system".into(),
            name: "cluster".into(),
            key_id: KEY_ID.into(),
            uid: KEY_ID.into(),
            state,
            current_version: Some(versions),
            refused_versions: Default::default(),
            valid_to: None,
        },
        versions: (1..=versions).map(|v| (v, Arc::new(KeyMaterial::generate().unwrap()))).collect(),
    })
}

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    keys: watch::Sender<Option<Arc<KeySnapshot>>>,
    audit: AuditSink,
    uses: CapturedUses,
    root: RootKey,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(initial: Option<Arc<KeySnapshot>>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let (tx, rx) = watch::channel(initial);
        let audit = AuditSink::default();
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let log = audit.log(&root);
        let mut registry = prometheus_client::registry::Registry::default();
        let uses = CapturedUses::default();
        let plugin = KmsPlugin::new(
            WatchKeyring(rx),
            log,
            OperationMetrics::register(&mut registry),
            Arc::new(uses.clone()),
        );
        let (listener, guard) = PluginSocket::bind(&socket).await.unwrap().into_parts();
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(KeyManagementServiceServer::new(plugin))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown,
                )
                .await
                .unwrap();
            drop(guard);
        });
        Harness { _dir: dir, socket, keys: tx, audit, uses, root, stop, server }
    }

    async fn client(&self) -> KeyManagementServiceClient<Channel> {
        super::client::connect(&self.socket).await.unwrap()
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.audit.lines()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap();
        assert!(!self.socket.exists(), "graceful shutdown removes the socket");
    }
}

fn enc(plaintext: &[u8], uid: &str) -> EncryptRequest {
    EncryptRequest { plaintext: plaintext.to_vec(), uid: uid.into() }
}

fn dec(ciphertext: Vec<u8>, key_id: String, annotations: HashMap<String, Vec<u8>>) -> DecryptRequest {
    DecryptRequest { ciphertext, uid: "req".into(), key_id, annotations }
}

#[tokio::test]
async fn status_encrypt_decrypt_as_kube_apiserver_uses_them() {
    let h = Harness::start(Some(snapshot(KeyState::Enabled, 1))).await;
    let mut c = h.client().await;
    let status = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.version.as_str(), status.healthz.as_str()), ("v2", "ok"));
    assert_eq!(status.key_id, format!("kubekms:{KEY_ID}:1"));
    assert!(status.key_id.len() <= MAX_KEY_ID_LEN);
    assert_eq!(c.status(StatusRequest {}).await.unwrap().into_inner(), status, "stable between polls");

    let seed = [42u8; 32];
    let e = c.encrypt(enc(&seed, "uid-1")).await.unwrap().into_inner();
    assert_eq!(e.key_id, status.key_id, "Encrypt's key_id equals Status's");
    assert!(e.ciphertext.len() <= MAX_CIPHERTEXT_LEN);
    assert!(!e.ciphertext.windows(32).any(|w| w == seed));
    assert!(e.annotations.keys().all(|k| is_fqdn(k)));
    assert_eq!(e.annotations.get(KEY_ANNOTATION).map(Vec::as_slice), Some(&b"kube-system/cluster"[..]));
    let d = c.decrypt(dec(e.ciphertext, e.key_id, e.annotations)).await.unwrap().into_inner();
    assert_eq!(d.plaintext, seed);

    // Every operation is audited, without the plaintext.
    let lines = h.audit_lines();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["operation"], "Encrypt");
    assert_eq!(lines[0]["requestId"], "uid-1");
    assert_eq!(lines[1]["operation"], "Decrypt");
    assert_eq!(lines[1]["keyVersion"], 1);
    assert!(lines[1]["principal"].as_str().unwrap().starts_with("unix:uid="));
    let raw = h.audit.text();
    assert!(crate::audit::verify(raw.as_bytes(), Some(&h.root)).is_ok());
    h.stop().await;
}

#[tokio::test]
async fn rotation_changes_the_key_id_and_old_versions_still_decrypt() {
    let h = Harness::start(Some(snapshot(KeyState::Enabled, 1))).await;
    let mut c = h.client().await;
    let old = c.encrypt(enc(b"old seed", "a")).await.unwrap().into_inner();

    // The controller rotates: version 2 is current, version 1 kept (same material).
    let mut next = (*h.keys.borrow().clone().unwrap()).clone();
    next.versions.insert(2, Arc::new(KeyMaterial::generate().unwrap()));
    next.info.current_version = Some(2);
    h.keys.send_replace(Some(Arc::new(next)));

    let status = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.key_id, format!("kubekms:{KEY_ID}:2"));
    assert_eq!(status.healthz, "ok");
    let new = c.encrypt(enc(b"new seed", "b")).await.unwrap().into_inner();
    assert_eq!(new.key_id, status.key_id);
    let d =
        c.decrypt(dec(old.ciphertext.clone(), old.key_id.clone(), old.annotations.clone())).await.unwrap();
    assert_eq!(d.into_inner().plaintext, b"old seed");
    // The old ciphertext does not open under the new key id.
    let err = c.decrypt(dec(old.ciphertext, new.key_id, old.annotations)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_precise_status_and_no_crash() {
    let h = Harness::start(Some(snapshot(KeyState::Enabled, 1))).await;
    let mut c = h.client().await;
    let good = c.encrypt(enc(&[7; 32], "x")).await.unwrap().into_inner();
    let id = good.key_id.clone();
    let ann = good.annotations.clone();

    let expect = async |what: &str, code: Code, message: &str, result: Result<(), tonic::Status>| {
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(message), "{what}: {:?} lacks {message:?}", err.message());
    };
    let e = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<crate::proto::kmsv2::EncryptResponse>| ())
    };
    let d = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<crate::proto::kmsv2::DecryptResponse>| ())
    };

    expect("empty plaintext", Code::InvalidArgument, "plaintext is empty", e(c.encrypt(enc(b"", "u")).await))
        .await;
    expect(
        "oversized plaintext",
        Code::InvalidArgument,
        "the most is 512",
        e(c.encrypt(enc(&[1; 513], "u")).await),
    )
    .await;
    expect("missing uid", Code::InvalidArgument, "uid is required", e(c.encrypt(enc(b"k", "")).await)).await;
    let missing_uid =
        DecryptRequest { uid: String::new(), ..dec(good.ciphertext.clone(), id.clone(), ann.clone()) };
    expect(
        "missing uid (decrypt)",
        Code::InvalidArgument,
        "uid is required",
        d(c.decrypt(missing_uid).await),
    )
    .await;

    expect(
        "empty ciphertext",
        Code::InvalidArgument,
        "ciphertext is empty",
        d(c.decrypt(dec(vec![], id.clone(), ann.clone())).await),
    )
    .await;
    expect(
        "oversized ciphertext",
        Code::InvalidArgument,
        "the most is 1024",
        d(c.decrypt(dec(vec![1; 2048], id.clone(), ann.clone())).await),
    )
    .await;
    let random: Vec<u8> = (0..good.ciphertext.len()).map(|i| (i * 31 % 251) as u8).collect();
    expect(
        "random ciphertext",
        Code::InvalidArgument,
        "",
        d(c.decrypt(dec(random, id.clone(), ann.clone())).await),
    )
    .await;
    let mut random_v1 = crate::crypto::random_bytes::<85>().unwrap().to_vec();
    random_v1[..5].copy_from_slice(&good.ciphertext[..5]);
    expect(
        "random ciphertext (right header)",
        Code::InvalidArgument,
        "decryption failed",
        d(c.decrypt(dec(random_v1, id.clone(), ann.clone())).await),
    )
    .await;
    let truncated = good.ciphertext[..good.ciphertext.len() - 1].to_vec();
    expect(
        "truncated",
        Code::InvalidArgument,
        "decryption failed",
        d(c.decrypt(dec(truncated, id.clone(), ann.clone())).await),
    )
    .await;
    let short = good.ciphertext[..20].to_vec();
    expect(
        "truncated to a stub",
        Code::InvalidArgument,
        "too short",
        d(c.decrypt(dec(short, id.clone(), ann.clone())).await),
    )
    .await;
    let mut tampered = good.ciphertext.clone();
    *tampered.last_mut().unwrap() ^= 1;
    expect(
        "tampered",
        Code::InvalidArgument,
        "decryption failed",
        d(c.decrypt(dec(tampered, id.clone(), ann.clone())).await),
    )
    .await;

    let mut altered = ann.clone();
    altered.insert(KEY_ANNOTATION.into(), b"kube-system/other".to_vec());
    expect(
        "altered annotation",
        Code::InvalidArgument,
        "decryption failed",
        d(c.decrypt(dec(good.ciphertext.clone(), id.clone(), altered)).await),
    )
    .await;
    expect(
        "dropped annotations",
        Code::InvalidArgument,
        "decryption failed",
        d(c.decrypt(dec(good.ciphertext.clone(), id.clone(), HashMap::new())).await),
    )
    .await;
    let mut not_fqdn = ann.clone();
    not_fqdn.insert("Not A Domain".into(), b"x".to_vec());
    expect(
        "non-FQDN annotation key",
        Code::InvalidArgument,
        "not a fully qualified domain name",
        d(c.decrypt(dec(good.ciphertext.clone(), id.clone(), not_fqdn)).await),
    )
    .await;

    expect(
        "empty key_id",
        Code::InvalidArgument,
        "key_id is required",
        d(c.decrypt(dec(good.ciphertext.clone(), String::new(), ann.clone())).await),
    )
    .await;
    expect(
        "oversized key_id",
        Code::InvalidArgument,
        "the most is 1024",
        d(c.decrypt(dec(good.ciphertext.clone(), "k".repeat(1025), ann.clone())).await),
    )
    .await;
    expect(
        "malformed key_id",
        Code::InvalidArgument,
        "not a kubekms key id",
        d(c.decrypt(dec(good.ciphertext.clone(), "aws:kms:1".into(), ann.clone())).await),
    )
    .await;
    let other_key = "kubekms:7ece15cd-0195-4985-aff9-395763ad0a3b:1".to_owned();
    expect(
        "unknown key",
        Code::NotFound,
        "does not hold",
        d(c.decrypt(dec(good.ciphertext.clone(), other_key, ann.clone())).await),
    )
    .await;
    let mut v9 = good.ciphertext.clone();
    v9[1..5].copy_from_slice(&9u32.to_be_bytes());
    expect(
        "unknown version",
        Code::NotFound,
        "does not hold",
        d(c.decrypt(dec(v9, format!("kubekms:{KEY_ID}:9"), ann.clone())).await),
    )
    .await;
    expect(
        "version mismatch",
        Code::InvalidArgument,
        "names version 2",
        d(c.decrypt(dec(good.ciphertext.clone(), format!("kubekms:{KEY_ID}:2"), ann.clone())).await),
    )
    .await;

    // Still serving, and every refusal was audited.
    assert_eq!(c.status(StatusRequest {}).await.unwrap().into_inner().healthz, "ok");
    let lines = h.audit_lines();
    assert!(lines.iter().filter(|l| l["result"] == "InvalidArgument").count() >= 15);
    h.stop().await;
}

#[tokio::test]
async fn a_disabled_or_pending_deletion_key_refuses_everything() {
    for state in [KeyState::Disabled, KeyState::PendingDeletion, KeyState::Destroyed] {
        let enabled = snapshot(KeyState::Enabled, 1);
        let h = Harness::start(Some(enabled.clone())).await;
        let mut c = h.client().await;
        let good = c.encrypt(enc(b"seed", "x")).await.unwrap().into_inner();
        let disabled = KeySnapshot { info: KeyInfo { state, ..enabled.info.clone() }, ..(*enabled).clone() };
        h.keys.send_replace(Some(Arc::new(disabled)));

        let status = c.status(StatusRequest {}).await.unwrap().into_inner();
        assert_ne!(status.healthz, "ok");
        assert!(status.healthz.contains(state.as_str()), "{}", status.healthz);
        assert_eq!(status.key_id, "", "no key id, so kube-apiserver stops writing with its DEK seed");
        let err = c.encrypt(enc(b"seed", "x")).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains(state.as_str()));
        let err = c.decrypt(dec(good.ciphertext, good.key_id, good.annotations)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        h.stop().await;
    }
}

#[tokio::test]
async fn without_a_key_the_plugin_answers_unavailable() {
    let h = Harness::start(None).await;
    let mut c = h.client().await;
    let status = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.version, "v2");
    assert_ne!(status.healthz, "ok");
    assert_eq!(status.key_id, "");
    let err = c.encrypt(enc(b"seed", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    h.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_calls() {
    let h = Harness::start(Some(snapshot(KeyState::Enabled, 3))).await;
    let clients: Vec<_> = futures::future::join_all((0..8).map(|_| h.client())).await;
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                let seed = (i as u32).to_be_bytes().repeat(8);
                let e = c.encrypt(enc(&seed, &format!("u{i}"))).await?.into_inner();
                let d = c.decrypt(dec(e.ciphertext, e.key_id, e.annotations)).await?.into_inner();
                assert_eq!(d.plaintext, seed);
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    for t in futures::future::join_all(tasks).await {
        t.unwrap().unwrap();
    }
    let lines = h.audit_lines();
    assert_eq!(lines.len(), 2000);
    // The chain holds under concurrency.
    let raw = h.audit.text();
    assert_eq!(crate::audit::verify(raw.as_bytes(), Some(&h.root)).unwrap().lines, 2000);
    h.stop().await;
}

#[tokio::test]
async fn a_refused_version_refuses_to_decrypt_while_the_others_serve() {
    use crate::domain::VersionRefusal;
    for refusal in [VersionRefusal::Disabled, VersionRefusal::PendingDestruction, VersionRefusal::Destroyed] {
        let one = snapshot(KeyState::Enabled, 1);
        let h = Harness::start(Some(one.clone())).await;
        let mut c = h.client().await;
        let old = c.encrypt(enc(b"seed-1", "a")).await.unwrap().into_inner();
        // Version 2 becomes current, version 1 is refused.
        let mut two = (*snapshot(KeyState::Enabled, 2)).clone();
        two.versions.insert(1, one.versions[&1].clone());
        two.info.refused_versions.insert(1, refusal);
        h.keys.send_replace(Some(Arc::new(two)));
        let new = c.encrypt(enc(b"seed-2", "b")).await.unwrap().into_inner();
        assert_ne!(new.key_id, old.key_id);
        let back = c.decrypt(dec(new.ciphertext, new.key_id, new.annotations)).await.unwrap().into_inner();
        assert_eq!(back.plaintext, b"seed-2");
        let err = c.decrypt(dec(old.ciphertext, old.key_id, old.annotations)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains(&format!("version 1 of key kube-system/cluster is {}", refusal.as_str())),
            "{}",
            err.message()
        );
        h.stop().await;
    }
}

#[tokio::test]
async fn every_use_is_recorded_with_its_version_and_refusals_that_postpone_destruction_too() {
    use crate::domain::{UseKind, VersionRefusal};
    let one = snapshot(KeyState::Enabled, 1);
    let h = Harness::start(Some(one.clone())).await;
    let mut c = h.client().await;
    let v1 = c.encrypt(enc(b"seed-1", "a")).await.unwrap().into_inner();
    c.decrypt(dec(v1.ciphertext.clone(), v1.key_id.clone(), v1.annotations.clone())).await.unwrap();
    // Malformed input used nothing.
    c.decrypt(dec(b"junk".to_vec(), v1.key_id.clone(), v1.annotations.clone())).await.unwrap_err();
    assert_eq!(
        h.uses.uses(),
        [(KEY_ID.to_owned(), 1, UseKind::Encrypt), (KEY_ID.to_owned(), 1, UseKind::Decrypt)]
    );

    // Version 2 is current and version 1 pending destruction: decrypting under 1 is refused,
    // and recorded as a refused use of version 1.
    let mut two = (*snapshot(KeyState::Enabled, 2)).clone();
    two.versions.insert(1, one.versions[&1].clone());
    two.info.refused_versions.insert(1, VersionRefusal::PendingDestruction);
    h.keys.send_replace(Some(Arc::new(two.clone())));
    let v2 = c.encrypt(enc(b"seed-2", "b")).await.unwrap().into_inner();
    c.decrypt(dec(v1.ciphertext.clone(), v1.key_id.clone(), v1.annotations.clone())).await.unwrap_err();
    assert_eq!(
        h.uses.uses()[2..],
        [(KEY_ID.to_owned(), 2, UseKind::Encrypt), (KEY_ID.to_owned(), 1, UseKind::Refused)]
    );

    // Merely disabled, a version's refusal is no use that postpones anything.
    let mut disabled = two.clone();
    disabled.info.refused_versions.insert(1, VersionRefusal::Disabled);
    h.keys.send_replace(Some(Arc::new(disabled)));
    c.decrypt(dec(v1.ciphertext.clone(), v1.key_id.clone(), v1.annotations.clone())).await.unwrap_err();
    assert_eq!(h.uses.uses().len(), 4);

    // The key pending deletion: Encrypt is refused under the current version, Decrypt under
    // the ciphertext's; a ciphertext of another key names no version of this one.
    let mut pending = two.clone();
    pending.info.state = KeyState::PendingDeletion;
    h.keys.send_replace(Some(Arc::new(pending)));
    c.encrypt(enc(b"seed-3", "c")).await.unwrap_err();
    c.decrypt(dec(v2.ciphertext.clone(), v2.key_id.clone(), v2.annotations.clone())).await.unwrap_err();
    let other = v2.key_id.replace(KEY_ID, "0b0e2b4e-7d0f-4e45-a8de-3c8c1b6f1a7e");
    c.decrypt(dec(v2.ciphertext.clone(), other, v2.annotations.clone())).await.unwrap_err();
    assert_eq!(
        h.uses.uses()[4..],
        [(KEY_ID.to_owned(), 2, UseKind::Refused), (KEY_ID.to_owned(), 2, UseKind::Refused)]
    );

    // Imported material past its validTo: refused by the plugin's own clock, although the
    // snapshot (as from the cache, before the controller deleted it) still says Enabled.
    let mut expired = two.clone();
    expired.info.valid_to = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1));
    h.keys.send_replace(Some(Arc::new(expired.clone())));
    let refused = c.encrypt(enc(b"seed-x", "x")).await.unwrap_err();
    assert!(refused.message().contains("PendingImport"), "{refused:?}");
    let status = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.key_id, "", "no key id while it refuses to encrypt: {status:?}");
    assert!(status.healthz.contains("PendingImport"), "{status:?}");
    expired.info.valid_to = Some(jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1));
    h.keys.send_replace(Some(Arc::new(expired)));
    c.encrypt(enc(b"seed-y", "y")).await.unwrap();
    let uses_so_far = h.uses.uses().len();
    assert_eq!(uses_so_far, 7, "a refusal of a key pending import is no use: {:?}", h.uses.uses());

    // Disabled (not pending deletion): refusals are not recorded.
    let mut off = two;
    off.info.state = KeyState::Disabled;
    h.keys.send_replace(Some(Arc::new(off)));
    c.encrypt(enc(b"seed-4", "d")).await.unwrap_err();
    c.decrypt(dec(v2.ciphertext, v2.key_id, v2.annotations)).await.unwrap_err();
    assert_eq!(h.uses.uses().len(), uses_so_far);
    h.stop().await;
}
