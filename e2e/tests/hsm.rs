//! The root key in a PKCS#11 token (SoftHSM2): what a misconfigured or unsuitable token
//! gets, and how the components ride out a token that goes away. These tests need the
//! control plane of `KUBEKMS_ROOT_KEY=pkcs11 make up` (e2e/test.sh runs them in its
//! PKCS#11 pass) and fail at once, saying so, against a root key in a file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};

use crate::support::{kubekms_bin, root_key, root_key_args, root_key_in_hsm, run_dir};

/// The flags of `make up`'s token with `flag` set to `value`.
/// The tests that open the token in new processes or write objects into it take turns:
/// SoftHSM2 keeps a token in files, and a process that starts while another writes an object
/// may find no token at all ("no token labelled …").
static TOKEN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn args_with(flag: &str, value: &str) -> Vec<String> {
    let mut args = hsm_args();
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
    args[i + 1] = value.to_owned();
    args
}

fn hsm_args() -> Vec<String> {
    assert!(root_key_in_hsm(), "these tests need the root key in SoftHSM2: KUBEKMS_ROOT_KEY=pkcs11 make up");
    root_key_args()
}

fn flag(args: &[String], name: &str) -> String {
    args[args.iter().position(|a| a == name).unwrap() + 1].clone()
}

fn kubekms(args: &[&str], extra: &[String]) -> Output {
    Command::new(kubekms_bin()).args(args).args(extra).output().unwrap()
}

fn refused(out: &Output, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
    let pin = std::fs::read_to_string(flag(&hsm_args(), "--pkcs11-pin-file")).unwrap();
    assert!(!stderr.contains(pin.trim_end()), "the PIN in an error");
}

/// A logged-in session on `make up`'s token, in this process (SOFTHSM2_CONF names it).
fn token_session() -> Session {
    let args = hsm_args();
    let context = Pkcs11::new(flag(&args, "--pkcs11-module")).unwrap();
    // root_key() in this process may have initialised the module already.
    let _ = context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let label = flag(&args, "--pkcs11-token-label");
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| context.get_token_info(*s).unwrap().label().trim_end() == label)
        .unwrap();
    let session = context.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(flag(&args, "--pkcs11-pin-file")).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(pin.trim_end()))) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("log in: {e}"),
    }
    session
}

fn private_file(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[tokio::test]
async fn hsm_misconfiguration_and_unsuitable_keys_get_precise_errors() {
    let _token = TOKEN.lock().await;
    let args = hsm_args();
    // The fingerprint is the one the components report, computed the same way.
    let out = kubekms(&["root-key", "fingerprint"], &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fingerprint = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(fingerprint, root_key().fingerprint());
    assert!(fingerprint.starts_with("rk1-") && fingerprint.len() == 20, "{fingerprint}");
    let log = std::fs::read_to_string(run_dir().join("logs/plugin.log")).unwrap();
    assert!(log.contains(&fingerprint), "the plugin reports the same fingerprint");

    let dir = tempfile::tempdir().unwrap();
    let pin = std::fs::read_to_string(flag(&args, "--pkcs11-pin-file")).unwrap();
    let wrong = private_file(dir.path(), "wrong", "not-the-pin\n", 0o600);
    let open = private_file(dir.path(), "open", &pin, 0o640);
    let missing = dir.path().join("missing");
    let p = |f: &Path| f.to_str().unwrap().to_owned();
    for (flag_name, value, message) in [
        ("--pkcs11-pin-file", p(&wrong), format!("rejected the PIN in {}", wrong.display())),
        ("--pkcs11-pin-file", p(&missing), format!("PIN file {} cannot be read", missing.display())),
        (
            "--pkcs11-pin-file",
            p(&open),
            format!("PIN file {} is readable by group or others (mode 0640)", open.display()),
        ),
        ("--pkcs11-key-label", "no-such-key".into(), "no AES secret key labelled \"no-such-key\"".into()),
        ("--pkcs11-token-label", "no-such-token".into(), "no token labelled \"no-such-token\"".into()),
    ] {
        refused(&kubekms(&["root-key", "fingerprint"], &args_with(flag_name, &value)), &message);
    }
    // A component refuses to start the same way, with exit code 1.
    let controller = kubekms(
        &[
            "controller",
            "--kubeconfig",
            run_dir().join("kubekms-controller.kubeconfig").to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--leader-elect=false",
        ],
        &args_with("--pkcs11-pin-file", &p(&wrong)),
    );
    refused(&controller, "rejected the PIN");
    // Half a configuration is refused before the token is touched.
    let mut half = args.clone();
    half.truncate(half.len() - 2);
    refused(&kubekms(&["root-key", "fingerprint"], &half), "--pkcs11-module needs --pkcs11-key-label");
    let both = [args.clone(), vec!["--root-key-file".into(), "/dev/null".into()]].concat();
    refused(&kubekms(&["root-key", "fingerprint"], &both), "give either --root-key-file or --pkcs11-module");
    // The root key's label is taken: no second key is made beside it.
    let taken = format!(
        "a key labelled {:?} already exists in the token labelled {:?}; refusing to create another",
        flag(&args, "--pkcs11-key-label"),
        flag(&args, "--pkcs11-token-label")
    );
    refused(&kubekms(&["root-key", "create"], &args), &taken);

    // A key that could leave the token is no root key.
    let session = token_session();
    let extractable = format!("extractable-{}", uuid::Uuid::new_v4().simple());
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::from(32u64)),
        Attribute::Label(extractable.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(true),
    ];
    let handle = session.generate_key(&Mechanism::AesKeyGen, &template).unwrap();
    let out = kubekms(&["root-key", "fingerprint"], &args_with("--pkcs11-key-label", &extractable));
    session.destroy_object(handle).unwrap();
    refused(&out, "is not usable as a root key: it is extractable (CKA_EXTRACTABLE is true)");

    // `root-key create` makes a key that never leaves the token.
    let created = format!("created-{}", uuid::Uuid::new_v4().simple());
    let out = kubekms(&["root-key", "create"], &args_with("--pkcs11-key-label", &created));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("labelled {created:?}")));
    let found = session.find_objects(&[Attribute::Label(created.as_bytes().to_vec())]).unwrap();
    assert_eq!(found.len(), 1);
    let attrs = session
        .get_attributes(
            found[0],
            &[AttributeType::Extractable, AttributeType::NeverExtractable, AttributeType::Sensitive],
        )
        .unwrap();
    session.destroy_object(found[0]).unwrap();
    for attr in attrs {
        match attr {
            Attribute::Extractable(e) => assert!(!e, "extractable"),
            Attribute::NeverExtractable(n) => assert!(n, "was extractable once"),
            Attribute::Sensitive(s) => assert!(s, "not sensitive"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The fingerprint of another key differs: it names the key, one-way.
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&fingerprint));
}

/// The token's directory (SoftHSM2 keeps each token in one).
fn token_dir() -> PathBuf {
    let tokens = run_dir().join("softhsm/tokens");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&tokens).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "one token in {}", tokens.display());
    dirs.remove(0)
}

#[tokio::test]
async fn disruptive_hsm_a_token_that_goes_away_loses_nothing() {
    use crate::plugin::{create_secret, plugin_key_id, read_secret};
    use crate::support::{TestNamespace, control_plane, eventually, kubectl, kubectl_ok};
    let _ = hsm_args();
    let ns = TestNamespace::new("hsm-away");
    let ns = ns.name.as_str();
    let key = |name: &str| {
        format!("apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: {name}\nspec: {{}}\n")
    };
    let state =
        |name: &str| kubectl_ok(&["get", "kmskey", name, "-n", ns, "-o", "jsonpath={.status.state}"], None);
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key("before")));
    eventually(Duration::from_secs(60), "the key made with the token to be Enabled", || async {
        (state("before") == "Enabled").then_some(())
    })
    .await;
    assert!(create_secret(ns, "s1", "v1").ok);
    let served = plugin_key_id().await.expect("the plugin serves");

    // The token goes away (its directory moved off, as when an HSM is unplugged).
    let dir = token_dir();
    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).unwrap();
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key("during")));
    let message = eventually(Duration::from_secs(60), "the controller to say why it cannot wrap", || async {
        let m = kubectl(
            &[
                "get",
                "kmskey",
                "during",
                "-n",
                ns,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
            ],
            None,
        )
        .stdout;
        m.contains("failed to wrap key material: the token labelled").then_some(m)
    })
    .await;
    assert_eq!(state("during"), "Creating", "{message}");
    let uid = kubectl_ok(&["get", "kmskey", "during", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    assert!(!kubectl(&["get", "kmskeymaterial", &uid], None).ok, "no material written without the token");
    // The plugin keeps serving the version it unwrapped: Status, reads and new writes.
    assert_eq!(plugin_key_id().await.as_deref(), Some(served.as_str()));
    assert_eq!(read_secret(ns, "s1"), "v1");
    assert!(create_secret(ns, "s2", "v2").ok);
    assert_eq!(state("before"), "Enabled");

    // The token comes back: the next try loads the module anew and logs in again, with
    // no restart, and the key that waited is created.
    std::fs::rename(&away, &dir).unwrap();
    eventually(Duration::from_secs(120), "the key that waited to be Enabled", || async {
        (state("during") == "Enabled").then_some(())
    })
    .await;
    assert_eq!(plugin_key_id().await.as_deref(), Some(served.as_str()));
    assert_eq!(read_secret(ns, "s1"), "v1");
    assert_eq!(read_secret(ns, "s2"), "v2");
    // And the plugin, restarted, loads everything through the token again.
    control_plane("down.sh", &["plugin"]);
    control_plane("up.sh", &["plugin"]);
    eventually(Duration::from_secs(30), "the plugin to serve again", || async { plugin_key_id().await })
        .await;
    assert!(create_secret(ns, "s3", "v3").ok);
    assert_eq!(read_secret(ns, "s3"), "v3");
}

#[tokio::test]
async fn hsm_material_wrapped_in_the_token_is_bound_and_authenticated() {
    let _token = TOKEN.lock().await;
    use kubekms::crypto::{KeyMaterial, RootKey, RootKeyError, WrapContext};
    let _ = hsm_args();
    let root = root_key();
    let material = KeyMaterial::generate().unwrap();
    let ctx = WrapContext { key_id: "5b7c0c4e-0000-4000-8000-000000000001", version: 1 };
    let wrapped = root.wrap(&material, ctx).unwrap();
    assert_eq!(wrapped[0], 0x02, "the token's format");
    assert_eq!(wrapped.len(), 1 + 12 + 32 + 16, "format, IV, material, tag");
    assert!(!wrapped.windows(32).any(|w| w == material.expose()));
    assert!(root.unwrap(&wrapped, ctx).unwrap().ct_eq(&material));
    assert_ne!(root.wrap(&material, ctx).unwrap(), wrapped, "a fresh IV each time");

    // Whatever does not authenticate is the one Unwrap error, never a token failure.
    let mut tag = wrapped.clone();
    *tag.last_mut().unwrap() ^= 1;
    let mut iv = wrapped.clone();
    iv[1] ^= 1;
    let other_version = WrapContext { version: 2, ..ctx };
    let other_key = WrapContext { key_id: "another", ..ctx };
    for (what, bytes, ctx) in [
        ("a flipped tag bit", tag, ctx),
        ("a flipped IV bit", iv, ctx),
        ("a truncated blob", wrapped[..20].to_vec(), ctx),
        ("the format byte alone", wrapped[..1].to_vec(), ctx),
        ("another version", wrapped.clone(), other_version),
        ("another key", wrapped.clone(), other_key),
    ] {
        assert!(matches!(root.unwrap(&bytes, ctx), Err(RootKeyError::Unwrap)), "{what}");
    }
    // A file's root key and the token's do not open each other's material.
    let file_root = RootKey::from_material(KeyMaterial::generate().unwrap());
    assert!(matches!(file_root.unwrap(&wrapped, ctx), Err(RootKeyError::Unwrap)));
    let from_file = file_root.wrap(&material, ctx).unwrap();
    assert!(matches!(root.unwrap(&from_file, ctx), Err(RootKeyError::Unwrap)));
    // Derived keys are the same in every process that opens the token, one per purpose.
    assert!(root.derive(b"purpose").ct_eq(&root_key().derive(b"purpose")));
    assert!(!root.derive(b"purpose").ct_eq(&root.derive(b"another purpose")));
}

#[tokio::test]
async fn disruptive_hsm_plugin_cold_start_from_its_cache_with_the_api_server_down() {
    use crate::plugin::{create_secret, decrypt_request, plugin_key_id, read_secret, socket, stored};
    use crate::support::{TestNamespace, control_plane, eventually};
    let _ = hsm_args();
    let ns = TestNamespace::new("hsm-cold");
    let ns = ns.name.as_str();
    let served =
        eventually(Duration::from_secs(30), "the plugin to serve", || async { plugin_key_id().await }).await;
    assert!(create_secret(ns, "s", "cold").ok);
    let object = stored(ns, "s");
    assert_eq!(object.key_id, served);

    // With the API server down, the plugin starts from its cache: its key's versions
    // unwrap through the token, and the cache's MAC key is derived in it.
    control_plane("down.sh", &["kube-apiserver", "plugin"]);
    control_plane("up.sh", &["plugin"]);
    let id = eventually(Duration::from_secs(30), "the plugin to serve from its cache", || async {
        plugin_key_id().await
    })
    .await;
    assert_eq!(id, served);
    let mut c = kubekms::plugin::client::connect(&socket()).await.unwrap();
    let seed =
        c.decrypt(decrypt_request(&object)).await.expect("decrypt from the cache, the API server down");
    assert_eq!(seed.into_inner().plaintext.len(), 32);
    let log = std::fs::read_to_string(run_dir().join("logs/plugin.log")).unwrap();
    assert!(log.contains("loaded the key from the cache"), "the plugin started from its cache");
    control_plane("up.sh", &["kube-apiserver"]);
    assert_eq!(read_secret(ns, "s"), "cold");
}

#[tokio::test]
async fn hsm_a_second_key_label_rotates_the_root_key_in_the_token() {
    let _token = TOKEN.lock().await;
    use kubekms::crypto::{KeyMaterial, RootKey, RootKeyConfig, RootKeySource, WrapContext};
    let old_args = hsm_args();
    let old_label = flag(&old_args, "--pkcs11-key-label");
    let new_label = format!("kubekms-rotated-{}", std::process::id());
    let new_args = args_with("--pkcs11-key-label", &new_label);
    let out = kubekms(&["root-key", "create"], &new_args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The CLI: the new label primary, the old one previous; refused as its own previous,
    // and an unknown previous label is named.
    let fingerprint = |extra: &[&str]| {
        let mut args = new_args.clone();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        kubekms(&["root-key", "fingerprint"], &args)
    };
    let out = fingerprint(&["--pkcs11-previous-key-label", &old_label]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let old = root_key();
    let new_fp = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_ne!(new_fp, old.fingerprint());
    refused(&fingerprint(&["--pkcs11-previous-key-label", &new_label]), "is the primary root key");
    refused(
        &fingerprint(&["--pkcs11-previous-key-label", "no-such-label"]),
        "no AES secret key labelled \"no-such-label\"",
    );

    // In process: what the old label wrapped unwraps by its fingerprint; what the ring
    // wraps is the new label's; derivations of the old label come second.
    let source = |label: &str| {
        RootKeySource::Pkcs11(kubekms::crypto::Pkcs11Config {
            module: flag(&old_args, "--pkcs11-module").into(),
            token: kubekms::crypto::TokenSelector::Label(flag(&old_args, "--pkcs11-token-label")),
            pin_file: flag(&old_args, "--pkcs11-pin-file").into(),
            key_label: label.to_owned(),
        })
    };
    let ring = RootKey::open_config(&RootKeyConfig {
        primary: source(&new_label),
        previous: vec![source(&old_label)],
    })
    .unwrap();
    assert_eq!(ring.fingerprint(), new_fp);
    let material = KeyMaterial::generate().unwrap();
    let ctx = WrapContext { key_id: "5b7c0c4e-0000-4000-8000-000000000001", version: 1 };
    let under_old = old.wrap(&material, ctx).unwrap();
    assert!(ring.unwrap_by(old.fingerprint(), &under_old, ctx).unwrap().ct_eq(&material));
    let under_new = ring.wrap(&material, ctx).unwrap();
    let alone = RootKey::open(&source(&new_label)).unwrap();
    assert!(alone.unwrap(&under_new, ctx).unwrap().ct_eq(&material));
    assert!(old.unwrap(&under_new, ctx).is_err());
    let derived = ring.derive_all(b"purpose");
    assert!(derived[0].ct_eq(&alone.derive(b"purpose")) && derived[1].ct_eq(&old.derive(b"purpose")));
}
