//! Single versions and deletion that knows what still needs a key, on the real control
//! plane: a version disabled and enabled again, destroyed after its window (and never
//! numbered again), a deletion refused while the key was used within its window unless
//! forced, and a use while pending deletion that postpones the destruction. A controller
//! of the test's own runs with one-second days, so a 7-day window lasts 7 seconds; the key
//! API records use at one-second granularity in `make up`.

use std::time::Duration;

use kube::Api;
use kubekms::api::{KeyState, KeyVersionState, KmsKey, KmsKeyMaterial, KmsKeyUsage};
use tonic::Code;

use crate::keyapi::{as_sa, bind_key_user, decrypt, encrypt};
use crate::lifecycle::{condition, wait_key_for};
use crate::support::{
    TEST_CONTROLLER_LABEL, TestController, TestNamespace, client, eventually, kubectl_ok, patch_key,
};

const WAIT: Duration = Duration::from_secs(60);

async fn key_where(ns: &str, name: &str, what: &str, cond: impl Fn(&KmsKey) -> bool) -> KmsKey {
    wait_key_for(WAIT, ns, name, what, cond).await
}

fn version_state(k: &KmsKey, version: u32) -> Option<KeyVersionState> {
    k.status.as_ref()?.versions.iter().find(|v| v.version == version).map(|v| v.state)
}

/// The TransitionRefused condition's reason and message.
pub(crate) fn refusal(k: &KmsKey) -> Option<(String, String)> {
    condition(k, "TransitionRefused").map(|c| (c.reason.clone(), c.message.clone()))
}

/// A key of `label`'s test controller in `ns`, Enabled, and a ServiceAccount `app` that
/// may use it.
async fn key_for(ns: &str, label: &str, name: &str, spec: &str) -> kubekms::client::Client {
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&format!(
            "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: {name}\n  labels:\n    {TEST_CONTROLLER_LABEL}: {label}\nspec:\n{spec}"
        )),
    );
    key_where(ns, name, "the key to be Enabled", |k| {
        k.status.as_ref().and_then(|s| s.state) == Some(KeyState::Enabled)
    })
    .await;
    let app = as_sa(ns, "app").await;
    bind_key_user(ns, ns, "app");
    app
}

/// Waits until a reporter has recorded a decryption under `version` of the key `uid`.
async fn decryption_recorded(uid: &str, version: u32) {
    let usages: Api<KmsKeyUsage> = Api::all(client().await);
    eventually(WAIT, "the decryption to be recorded", || async {
        let usage = usages.get_opt(uid).await.ok()??;
        usage
            .spec
            .reporters
            .iter()
            .any(|r| r.versions.iter().any(|v| v.version == version && v.last_decrypt.is_some()))
            .then_some(())
    })
    .await;
}

fn label(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

#[tokio::test]
async fn a_version_is_disabled_enabled_and_destroyed_alone() {
    let label = label("versions");
    let controller = TestController::start(&label, "a", &["--unsafe-day-length", "1s"]);
    let ns = TestNamespace::new("versions");
    let ns = ns.name.as_str();
    let mut app = key_for(ns, &label, "k", "  description: e2e\n").await;
    let key = format!("{ns}/k");
    let one = encrypt(&mut app, &key, b"under version 1", &[]).await.unwrap().ciphertext_blob;
    patch_key(ns, "k", r#"{"spec":{"rotation":{"onDemandRequest":"r1"}}}"#);
    key_where(ns, "k", "version 2", |k| k.status.as_ref().and_then(|s| s.current_version) == Some(2)).await;
    let two = eventually(WAIT, "encryption under version 2", || async {
        let e = encrypt(&mut app.clone(), &key, b"under version 2", &[]).await.ok()?;
        (e.key.as_ref()?.version == 2).then_some(e.ciphertext_blob)
    })
    .await;

    // Disabled at once, from the spec: version 1 refuses, version 2 serves.
    patch_key(ns, "k", r#"{"spec":{"versions":[{"version":1,"enabled":false}]}}"#);
    let refused = eventually(WAIT, "version 1 to refuse", || async {
        decrypt(&mut app.clone(), &one, &[]).await.err().filter(|e| e.code() == Code::FailedPrecondition)
    })
    .await;
    assert!(
        refused.message().contains(&format!("version 1 of key {key} is Disabled")),
        "{}",
        refused.message()
    );
    assert_eq!(decrypt(&mut app, &two, &[]).await.unwrap().plaintext, b"under version 2");
    key_where(ns, "k", "status to show version 1 Disabled", |k| {
        version_state(k, 1) == Some(KeyVersionState::Disabled)
    })
    .await;

    // The current version is neither disabled nor destroyed: refused, and said why.
    patch_key(
        ns,
        "k",
        r#"{"spec":{"versions":[{"version":1,"enabled":false},{"version":2,"enabled":false}]}}"#,
    );
    let k =
        key_where(ns, "k", "the refusal", |k| refusal(k).is_some_and(|(r, _)| r == "VersionRequestRefused"))
            .await;
    assert!(refusal(&k).unwrap().1.contains("version 2 is the current version"), "{:?}", refusal(&k));
    assert_eq!(decrypt(&mut app, &two, &[]).await.unwrap().plaintext, b"under version 2");

    // Enabled again.
    patch_key(ns, "k", r#"{"spec":{"versions":[{"version":1,"enabled":true}]}}"#);
    eventually(WAIT, "version 1 to decrypt again", || async {
        decrypt(&mut app.clone(), &one, &[]).await.ok().filter(|r| r.plaintext == b"under version 1")
    })
    .await;
    let uid = key_where(ns, "k", "the key", |_| true).await.metadata.uid.unwrap();
    decryption_recorded(&uid, 1).await;

    // Its destruction, asked for right after a decryption: it waits until version 1 has
    // gone unused for its window, then is promised, refuses, and is destroyed.
    patch_key(
        ns,
        "k",
        r#"{"spec":{"versions":[{"version":1,"destruction":{"scheduled":true,"pendingWindowDays":7}}]}}"#,
    );
    let k = key_where(ns, "k", "the destruction to wait", |k| {
        refusal(k).is_some_and(|(r, _)| r == "VersionDestructionRefused")
    })
    .await;
    assert!(refusal(&k).unwrap().1.contains("decrypted data within its waiting period"), "{:?}", refusal(&k));
    assert_eq!(
        decrypt(&mut app, &one, &[]).await.unwrap().plaintext,
        b"under version 1",
        "still usable while it waits"
    );
    let k = key_where(ns, "k", "version 1 PendingDestruction", |k| {
        version_state(k, 1) == Some(KeyVersionState::PendingDestruction)
    })
    .await;
    let promised = k.status.unwrap().versions[0].deletion_time.clone().unwrap().0;
    let err = decrypt(&mut app, &one, &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("PendingDestruction"), "{}", err.message());
    let k = key_where(ns, "k", "version 1 Destroyed", |k| {
        version_state(k, 1) == Some(KeyVersionState::Destroyed)
    })
    .await;
    assert!(jiff::Timestamp::now() >= promised, "destroyed before its promised time");
    assert_eq!(k.status.as_ref().unwrap().state, Some(KeyState::Enabled));
    let err = decrypt(&mut app, &one, &[]).await.unwrap_err();
    assert!(err.message().contains("Destroyed"), "{}", err.message());
    assert_eq!(decrypt(&mut app, &two, &[]).await.unwrap().plaintext, b"under version 2");
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    let material = materials.get(k.metadata.uid.as_deref().unwrap()).await.unwrap();
    let v1 = &material.spec.versions[0];
    assert!(v1.wrapped.is_none() && v1.destroyed_at.is_some(), "version 1's wrapped material is gone");
    assert!(material.spec.versions[1].wrapped.is_some());

    // Its number is never used again.
    patch_key(ns, "k", r#"{"spec":{"rotation":{"onDemandRequest":"r2"}}}"#);
    key_where(ns, "k", "version 3", |k| k.status.as_ref().and_then(|s| s.current_version) == Some(3)).await;
    drop(controller);
}

#[tokio::test]
async fn deleting_a_key_in_use_takes_force_and_use_while_pending_postpones_destruction() {
    let label = label("force");
    let controller = TestController::start(&label, "a", &["--unsafe-day-length", "1s"]);
    let ns = TestNamespace::new("force");
    let ns = ns.name.as_str();
    let mut app = key_for(ns, &label, "k", "  deletion: {pendingWindowDays: 7}\n").await;
    let key = format!("{ns}/k");
    let blob = encrypt(&mut app, &key, b"still needed", &[]).await.unwrap().ciphertext_blob;
    decrypt(&mut app, &blob, &[]).await.unwrap();
    // The use must be on record before the request is made.
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    let uid = keys.get("k").await.unwrap().metadata.uid.unwrap();
    decryption_recorded(&uid, 1).await;

    patch_key(ns, "k", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    let k = key_where(ns, "k", "the deletion to be refused", |k| {
        refusal(k).is_some_and(|(r, _)| r == "DeletionRefused")
    })
    .await;
    let (_, message) = refusal(&k).unwrap();
    assert!(
        message.contains("decrypted data within the last 7 days") && message.contains("force: true"),
        "{message}"
    );
    assert_eq!(k.status.as_ref().unwrap().state, Some(KeyState::Enabled), "refused: the key stays usable");
    assert_eq!(decrypt(&mut app, &blob, &[]).await.unwrap().plaintext, b"still needed");

    // Forced: scheduled, and the override is in the controller's audit trail.
    patch_key(ns, "k", r#"{"spec":{"deletion":{"scheduled":true,"force":true}}}"#);
    let k = key_where(ns, "k", "PendingDeletion", |k| {
        k.status.as_ref().and_then(|s| s.state) == Some(KeyState::PendingDeletion)
    })
    .await;
    let first = k.status.unwrap().deletion_time.unwrap().0;
    let audit = std::fs::read_to_string(&controller.log).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("ScheduleDeletionForced") && l.contains("force: true overrode")),
        "the forced deletion is audited"
    );

    // Asked for while pending (a few "days" into the window): refused, recorded, and the
    // destruction moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = decrypt(&mut app, &blob, &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let k = key_where(ns, "k", "the destruction to be postponed", |k| {
        k.status.as_ref().and_then(|s| s.deletion_time.as_ref()).is_some_and(|t| t.0 > first)
    })
    .await;
    assert!(k.status.as_ref().unwrap().conditions.iter().any(|c| c.type_ == "UsedWhilePendingDeletion"));
    // The Event follows the status that reports the postponement.
    crate::lifecycle::wait_events(ns, "k", &["KeyUsedWhilePendingDeletion"]).await;
    // Past the first window it is still there...
    tokio::time::sleep(first.duration_since(jiff::Timestamp::now()).unsigned_abs() + Duration::from_secs(1))
        .await;
    let k = keys.get("k").await.unwrap();
    assert_eq!(
        k.status.as_ref().unwrap().state,
        Some(KeyState::PendingDeletion),
        "not destroyed at the end of the first window"
    );
    // ...and destroyed once the window has passed again with no use.
    key_where(ns, "k", "Destroyed", |k| k.status.as_ref().and_then(|s| s.state) == Some(KeyState::Destroyed))
        .await;
    drop(controller);
}
