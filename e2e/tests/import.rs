//! Import without the root key: the controller publishes an RSA-3072 wrapping key and an
//! import token in the KmsKeyImport of each EXTERNAL key; an identity with nothing but the
//! right to patch that one KmsKeyImport imports, with `kubekms key import` or with
//! material wrapped by openssl; bad submissions are refused with their reason; and the
//! attacker's view: without that right nothing can be submitted, the private half cannot be
//! read, and the published public key cannot be replaced.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kube::Api;
use kubekms::api::{KeyState, KmsKey, KmsKeyImport, KmsKeyMaterial, VersionTrigger};

use crate::redteam::wait_state;
use crate::support::{TestNamespace, can_i, client, eventually, kubectl, kubectl_ok, kubekms_bin, run_dir};

const WAIT: Duration = Duration::from_secs(30);

fn create_key(ns: &str, name: &str, origin: &str) {
    let manifest = format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: {name}\nspec:\n  description: e2e\n  origin: {origin}\n"
    );
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifest));
}

/// The KmsKeyImport of `name` once it publishes a wrapping key (other than `not`).
async fn published(ns: &str, name: &str, not: Option<&str>) -> KmsKeyImport {
    let api: Api<KmsKeyImport> = Api::namespaced(client().await, ns);
    eventually(WAIT, &format!("a wrapping key for {ns}/{name}"), || {
        let api = api.clone();
        async move {
            api.get_opt(name).await.ok().flatten().filter(|i| {
                let public = i.status.as_ref().and_then(|s| s.public_key.as_deref());
                public.is_some() && public != not
            })
        }
    })
    .await
}

/// A ServiceAccount `who` of `ns` with exactly get and patch on the KmsKeyImport `key`,
/// and a kubeconfig that authenticates as it (its token, the cluster's CA).
fn importer(ns: &str, who: &str, key: &str, dir: &Path) -> std::path::PathBuf {
    let manifest = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {who}, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {who}, namespace: {ns}}}\n\
         rules:\n- apiGroups: [kms.kubekms.io]\n  resources: [kmskeyimports]\n  resourceNames: [{key}]\n  verbs: [get, patch]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {who}, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {who}}}\n\
         subjects:\n- {{kind: ServiceAccount, name: {who}, namespace: {ns}}}\n"
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&manifest));
    let token = kubectl_ok(&["create", "token", who, "-n", ns, "--duration", "1h"], None);
    let path = dir.join(format!("{who}.kubeconfig"));
    let flat = kubectl_ok(&["config", "view", "--raw", "--minify", "--flatten"], None);
    std::fs::write(&path, flat).unwrap();
    let config = path.to_str().unwrap();
    let set = |args: &[&str]| {
        let out = Command::new("kubectl").arg("--kubeconfig").arg(config).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    set(&["config", "set-credentials", who, &format!("--token={}", token.trim())]);
    set(&["config", "set-context", "--current", &format!("--user={who}")]);
    path
}

/// `kubekms key import` with `kubeconfig` and nothing else: no root key.
fn import(kubeconfig: &Path, key: &str, material: &Path, timeout: &str) -> Output {
    import_with(kubeconfig, key, material, timeout, &[])
}

/// [`import`] with more arguments (`--valid-to`).
fn import_with(kubeconfig: &Path, key: &str, material: &Path, timeout: &str, more: &[&str]) -> Output {
    Command::new(kubekms_bin())
        .args(["key", "import", "--key", key, "--material", material.to_str().unwrap(), "--timeout", timeout])
        .args(more)
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

fn refused(out: Output, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
}

async fn stored(key: &KmsKey) -> KmsKeyMaterial {
    Api::<KmsKeyMaterial>::all(client().await).get(key.metadata.uid.as_deref().unwrap()).await.unwrap()
}

#[tokio::test]
async fn an_importer_with_only_the_import_right_imports_without_the_root_key() {
    let ns = TestNamespace::new("import");
    let ns = ns.name.as_str();
    create_key(ns, "byok", "EXTERNAL");
    create_key(ns, "other", "EXTERNAL");
    create_key(ns, "generated", "KUBEKMS");
    let published = published(ns, "byok", None).await;
    let status = published.status.clone().unwrap();
    assert_eq!(status.wrapping_algorithm.as_deref(), Some("RSAES_OAEP_SHA_256"));
    assert_eq!(status.wrapping_key_spec.as_deref(), Some("RSA_3072"));
    let valid_to = status.parameters_valid_to.unwrap().0;
    let window = valid_to.duration_since(jiff::Timestamp::now()).as_secs();
    assert!((23 * 3600..=24 * 3600).contains(&window), "the window is 24 h, not {window} s");

    let dir = tempfile::tempdir().unwrap();
    let config = importer(ns, "importer", "byok", dir.path());
    let who = format!("system:serviceaccount:{ns}:importer");
    // The attacker's view of the importer: it may patch that KmsKeyImport and nothing else.
    assert!(can_i(ns, &who, "patch", "kmskeyimports/byok"));
    assert!(!can_i(ns, &who, "patch", "kmskeyimports/other"));
    assert!(!can_i(ns, &who, "patch", "kmskeyimports/byok:status"));
    assert!(!can_i(ns, &who, "get", "kmskeys/byok"));
    assert!(!can_i(ns, &who, "patch", "kmskeys/byok"));
    assert!(!can_i("", &who, "get", "kmskeymaterials"));
    // A user allowed to write the KmsKeyImport's status cannot publish a public key of its
    // own (whose private half would read the material): only the controller writes status.
    let forger = format!("forger-{ns}");
    kubectl_ok(
        &[
            "create",
            "role",
            &forger,
            "-n",
            ns,
            "--verb=get,patch,update,create",
            "--resource=kmskeyimports.kms.kubekms.io,kmskeyimports.kms.kubekms.io/status",
        ],
        None,
    );
    kubectl_ok(&["create", "rolebinding", &forger, "-n", ns, "--role", &forger, "--user", &forger], None);
    let forged = kubectl(
        &[
            "patch",
            "kmskeyimport",
            "byok",
            "-n",
            ns,
            "--as",
            &forger,
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"publicKey":"Zm9yZ2Vk"}}"#,
        ],
        None,
    );
    assert!(
        !forged.ok
            && forged.stderr.contains("only the kubekms controller writes the status of a KmsKeyImport"),
        "{}",
        forged.stderr
    );
    // Nor make the KmsKeyImport of a key before the controller does (and so own the object
    // the controller would publish into): only the controller makes one.
    let preempted = kubectl(
        &["create", "-n", ns, "--as", &forger, "-f", "-"],
        Some(
            "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKeyImport\nmetadata: {name: not-yet}\nspec: {}\n",
        ),
    );
    assert!(
        !preempted.ok && preempted.stderr.contains("only the kubekms controller makes a KmsKeyImport"),
        "{}",
        preempted.stderr
    );

    let material = dir.path().join("material.bin");
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(29).wrapping_add(5));
    std::fs::write(&material, bytes).unwrap();
    let short = dir.path().join("short.bin");
    std::fs::write(&short, [1u8; 20]).unwrap();
    refused(
        import(&config, &format!("{ns}/byok"), &short, "5s"),
        "exactly 32 bytes of raw binary; got 20 bytes",
    );
    refused(import(&config, "no-slash", &material, "5s"), "is not NAMESPACE/NAME");
    // No right on the other key's KmsKeyImport: forbidden, nothing submitted.
    refused(import(&config, &format!("{ns}/other"), &material, "5s"), "failed to read KmsKeyImport");
    let admin = run_dir().join("kubeconfig");
    refused(import(&admin, &format!("{ns}/generated"), &material, "2s"), "no wrapping key is published");

    let out = import(&config, &format!("{ns}/byok"), &material, "60s");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = wait_state(ns, "byok", KeyState::Enabled).await;
    assert_eq!(key.status.as_ref().unwrap().current_version, Some(1));
    let material_object = stored(&key).await;
    let root = crate::support::root_key();
    let unwrapped =
        kubekms::keyring::unwrap_version(&root, &material_object, &material_object.spec.versions[0]).unwrap();
    assert_eq!(unwrapped.expose(), &bytes, "the stored version is the imported material");
    assert_eq!(material_object.spec.versions[0].trigger, VersionTrigger::Imported);
    assert!(material_object.spec.import_wrapping.is_none(), "the wrapping key is discarded once used");
    let api: Api<KmsKeyImport> = Api::namespaced(client().await, ns);
    let done = eventually(WAIT, "the wrapping key withdrawn", || {
        let api = api.clone();
        async move {
            api.get("byok").await.ok().filter(|i| i.status.as_ref().is_some_and(|s| s.public_key.is_none()))
        }
    })
    .await;
    let imported = done.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Imported").unwrap();
    assert_eq!((imported.status.as_str(), imported.reason.as_str()), ("True", "Imported"));
    refused(import(&config, &format!("{ns}/byok"), &material, "2s"), "no wrapping key is published");
}

/// Submits `token` and `ciphertext` to the KmsKeyImport `name` as `as_user` and returns the
/// reason of the Imported condition the controller answers with.
async fn submit(ns: &str, name: &str, token: &str, ciphertext: &str) -> (String, String) {
    submit_spec(ns, name, serde_json::json!({"importToken": token, "encryptedKeyMaterial": ciphertext})).await
}

/// Submits `spec` to the KmsKeyImport `name`; returns the Imported condition's reason and
/// message for that generation.
async fn submit_spec(ns: &str, name: &str, spec: serde_json::Value) -> (String, String) {
    let body = serde_json::json!({ "spec": spec }).to_string();
    let out = kubectl_ok(
        &[
            "patch",
            "kmskeyimport",
            name,
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            &body,
            "-o",
            "jsonpath={.metadata.generation}",
        ],
        None,
    );
    let generation: i64 = out.trim().parse().unwrap();
    let api: Api<KmsKeyImport> = Api::namespaced(client().await, ns);
    let answer = eventually(WAIT, &format!("the answer to generation {generation}"), || {
        let api = api.clone();
        async move {
            let status = api.get(name).await.ok()?.status?;
            (status.observed_generation >= Some(generation)).then_some(())?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Imported" && c.observed_generation == Some(generation))
        }
    })
    .await;
    (answer.reason, answer.message)
}

/// Wraps `plain` under the DER public key with openssl, as an HSM or another KMS's export
/// would: RSAES-OAEP with SHA-256 and MGF1-SHA-256.
fn openssl_wrap(dir: &Path, public_b64: &str, plain: &[u8]) -> String {
    std::fs::write(dir.join("pub.der"), B64.decode(public_b64).unwrap()).unwrap();
    std::fs::write(dir.join("plain.bin"), plain).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out", "pub.pem"]);
    run(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-in",
        "plain.bin",
        "-out",
        "wrapped.bin",
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
    ]);
    B64.encode(std::fs::read(dir.join("wrapped.bin")).unwrap())
}

#[tokio::test]
async fn material_wrapped_by_openssl_imports_and_bad_submissions_are_refused() {
    let ns = TestNamespace::new("import-openssl");
    let ns = ns.name.as_str();
    create_key(ns, "hsm", "EXTERNAL");
    create_key(ns, "neighbour", "EXTERNAL");
    let first = published(ns, "hsm", None).await.status.unwrap();
    let (public, token) = (first.public_key.clone().unwrap(), first.import_token.clone().unwrap());
    let neighbour = published(ns, "neighbour", None).await.status.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(53).wrapping_add(3));
    let good = openssl_wrap(dir.path(), &public, &bytes);

    let reason = |r: (String, String)| r.0;
    assert_eq!(reason(submit(ns, "hsm", "bm90IGEgdG9rZW4=", &good).await), "InvalidImportToken");
    let foreign = submit(ns, "hsm", neighbour.import_token.as_deref().unwrap(), &good).await;
    assert_eq!(foreign.0, "WrongKey", "{}", foreign.1);
    assert_eq!(reason(submit(ns, "hsm", &token, "not base64!").await), "InvalidCiphertext");
    let short = submit(ns, "hsm", &token, &B64.encode([7u8; 100])).await;
    assert_eq!(short.0, "InvalidCiphertext");
    assert!(short.1.contains("must be 384 bytes (one RSA-3072 block); got 100 bytes"), "{}", short.1);
    let wrong_size = submit(ns, "hsm", &token, &openssl_wrap(dir.path(), &public, &[9u8; 31])).await;
    assert_eq!(wrong_size.0, "InvalidMaterialLength");
    assert!(wrong_size.1.contains("decrypts to 31 bytes; it must be exactly 32 bytes"), "{}", wrong_size.1);

    // Tampered ciphertexts do not decrypt; at the third the wrapping key is replaced, so
    // failed decryptions are no oracle on it, and its token is then refused.
    let mut tampered = B64.decode(&good).unwrap();
    for round in 0..3 {
        tampered[17 + round] ^= 0x01;
        let (why, message) = submit(ns, "hsm", &token, &B64.encode(&tampered)).await;
        assert_eq!(why, "DecryptionFailed", "{message}");
    }
    let second = published(ns, "hsm", Some(&public)).await.status.unwrap();
    let (public2, token2) = (second.public_key.unwrap(), second.import_token.unwrap());
    assert_ne!(token2, token);
    assert_eq!(reason(submit(ns, "hsm", &token, &good).await), "WrongWrappingKey");
    assert_eq!(
        reason(submit(ns, "hsm", &token2, &good).await),
        "DecryptionFailed",
        "wrapped under the replaced key"
    );
    let key: Api<KmsKey> = Api::namespaced(client().await, ns);
    assert_eq!(key.get("hsm").await.unwrap().status.unwrap().state, Some(KeyState::PendingImport));

    let (why, message) = submit(ns, "hsm", &token2, &openssl_wrap(dir.path(), &public2, &bytes)).await;
    assert_eq!(why, "Imported", "{message}");
    let key = wait_state(ns, "hsm", KeyState::Enabled).await;
    let object = stored(&key).await;
    let root = crate::support::root_key();
    let unwrapped = kubekms::keyring::unwrap_version(&root, &object, &object.spec.versions[0]).unwrap();
    assert_eq!(unwrapped.expose(), &bytes);
    // The imported key encrypts and decrypts through the key API.
    crate::keyapi::bind_key_user(ns, ns, "app");
    let mut app = crate::keyapi::as_sa(ns, "app").await;
    let sealed = eventually(WAIT, "an Encrypt under the imported key", || {
        let mut app = app.clone();
        let key = format!("{ns}/hsm");
        async move { crate::keyapi::encrypt(&mut app, &key, b"imported", &[]).await.ok() }
    })
    .await;
    let opened = crate::keyapi::decrypt(&mut app, &sealed.ciphertext_blob, &[]).await.unwrap();
    assert_eq!(opened.plaintext, b"imported");
    // A submission after the import is refused, and changes nothing.
    assert_eq!(reason(submit(ns, "hsm", &token2, &good).await), "NotPendingImport");
    assert_eq!(stored(&key).await.spec.versions.len(), 1);
}

#[tokio::test]
async fn imported_material_expires_at_its_validto_and_only_the_same_material_comes_back() {
    let ns = TestNamespace::new("import-expiry");
    let ns = ns.name.as_str();
    create_key(ns, "expiring", "EXTERNAL");
    let first = published(ns, "expiring", None).await.status.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(71).wrapping_add(11));
    let material = dir.path().join("material.bin");
    std::fs::write(&material, bytes).unwrap();
    let other = dir.path().join("other.bin");
    std::fs::write(&other, [0x5au8; 32]).unwrap();
    let admin = run_dir().join("kubeconfig");
    let key = format!("{ns}/expiring");

    // Bad input: a validTo not in the future, from the CLI (nothing submitted) and written
    // into the spec directly (refused by the controller before it tries the wrapping key).
    let past = import_with(&admin, &key, &material, "5s", &["--valid-to", "2020-01-01T00:00:00Z"]);
    refused(past, "--valid-to 2020-01-01T00:00:00Z is not in the future");
    let garbled = import_with(&admin, &key, &material, "5s", &["--valid-to", "tomorrow"]);
    let stderr = String::from_utf8_lossy(&garbled.stderr);
    assert_eq!(garbled.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("invalid value 'tomorrow' for '--valid-to <TIME>'"), "{stderr}");
    let wrapped = openssl_wrap(dir.path(), first.public_key.as_deref().unwrap(), &bytes);
    let spec = serde_json::json!({
        "importToken": first.import_token.as_deref().unwrap(),
        "encryptedKeyMaterial": wrapped,
        "validTo": "2001-01-01T00:00:00Z",
    });
    let (why, message) = submit_spec(ns, "expiring", spec).await;
    assert_eq!(why, "InvalidValidTo", "{message}");

    // Imported with a validTo 20 s ahead: Enabled until then, and reported.
    let valid_to = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 20).unwrap();
    let out = import_with(&admin, &key, &material, "60s", &["--valid-to", &valid_to.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("expires at {valid_to}")), "{stdout}");
    let enabled = wait_state(ns, "expiring", KeyState::Enabled).await;
    assert_eq!(enabled.status.as_ref().unwrap().valid_to.as_ref().map(|t| t.0), Some(valid_to));
    crate::keyapi::bind_key_user(ns, ns, "app");
    let mut app = crate::keyapi::as_sa(ns, "app").await;
    let sealed = eventually(WAIT, "an Encrypt under the imported key", || {
        let mut app = app.clone();
        let key = key.clone();
        async move { crate::keyapi::encrypt(&mut app, &key, b"until validTo", &[]).await.ok() }
    })
    .await;
    let described =
        app.describe_key(kubekms::proto::keyapi::DescribeKeyRequest { key: key.clone() }).await.unwrap();
    assert_eq!(described.into_inner().metadata.unwrap().valid_to, valid_to.to_string());

    // At validTo: the key API refuses at once by its own clock; the controller deletes the
    // material and the key is PendingImport, its version Expired.
    let wait = valid_to.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait + 0.5)).await;
    let late = crate::keyapi::decrypt(&mut app, &sealed.ciphertext_blob, &[]).await;
    assert_eq!(crate::keyapi::code(late), tonic::Code::FailedPrecondition);
    let pending = wait_state(ns, "expiring", KeyState::PendingImport).await;
    let status = pending.status.clone().unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains(&format!("expired at {valid_to}")), "{}", ready.message);
    assert_eq!(status.current_version, None);
    assert_eq!(status.versions[0].state, kubekms::api::KeyVersionState::Expired);
    let object = eventually(WAIT, "the expired material deleted", || {
        let pending = pending.clone();
        async move { Some(stored(&pending).await).filter(|m| m.spec.versions[0].wrapped.is_none()) }
    })
    .await;
    assert_eq!(object.spec.versions.len(), 1);
    assert_eq!(object.spec.versions[0].expired_at.as_ref().map(|t| t.0), Some(valid_to));
    let refused_again = crate::keyapi::decrypt(&mut app, &sealed.ciphertext_blob, &[]).await;
    assert_eq!(crate::keyapi::code(refused_again), tonic::Code::FailedPrecondition);

    // Other material is refused; the same material comes back, as version 1, without expiry.
    refused(import(&admin, &key, &other, "60s"), "(IncorrectKeyMaterial)");
    let out = import(&admin, &key, &material, "60s");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported again"));
    let back = wait_state(ns, "expiring", KeyState::Enabled).await;
    assert_eq!(back.status.as_ref().unwrap().current_version, Some(1));
    assert_eq!(back.status.as_ref().unwrap().valid_to, None);
    let opened = eventually(WAIT, "the old ciphertext to decrypt again", || {
        let mut app = app.clone();
        let blob = sealed.ciphertext_blob.clone();
        async move { crate::keyapi::decrypt(&mut app, &blob, &[]).await.ok() }
    })
    .await;
    assert_eq!(opened.plaintext, b"until validTo");
    let object = stored(&back).await;
    assert_eq!(object.spec.versions.len(), 1, "no new version");
    let root = crate::support::root_key();
    let unwrapped = kubekms::keyring::unwrap_version(&root, &object, &object.spec.versions[0]).unwrap();
    assert_eq!(unwrapped.expose(), &bytes);
}
