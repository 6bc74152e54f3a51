//! Root-key rotation without downtime, on a control plane of the test's own: Secrets that
//! the plugin encrypted in etcd, key-API blobs and a `kubekms encrypt` file are made under
//! root key A; the components restart with a new primary B and A as previous; the
//! controller, rewrapping one version per batch, is killed (SIGKILL) mid-way and started
//! again; once `kubekms root-key status` says complete, A's file is removed and everything
//! restarts with B alone. Everything decrypts before, during and after. Bad root-key
//! configurations are refused with a message that names them.
//!
//! Named `disruptive_*`, so that the parallel pass of `make test` leaves it out: it starts a
//! second control plane, and `make test` runs it in the background, beside the tests that
//! disrupt the shared one.
//! Its ports start at `KUBEKMS_ROOTROTATE_PORT_BASE` (default 39520; nine consecutive
//! ports) and its state is in `KUBEKMS_ROOTROTATE_RUN_DIR` (default e2e/.run-rootrotate),
//! removed when the test passes.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kube::Api;
use kubekms::api::{KeyState, KmsKey, KmsKeyMaterial};

use crate::fresh::{Cluster, Fresh, run_dir_from, stderr};
use crate::keyapi::{decrypt, encrypt, key_user_binding};
use crate::support::{etcd_get_at, eventually};

const NS: &str = "rotate";
const VERSIONS: u32 = 6;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many versions of `material` each root key wraps, by fingerprint.
fn roots(material: &KmsKeyMaterial) -> Vec<(String, u32)> {
    kubekms::keyring::versions_by_root(&material.spec).into_iter().map(|(f, n)| (f.to_owned(), n)).collect()
}

/// What was made before the rotation, and checks that it all still decrypts.
struct Made {
    blobs: Vec<(u32, Vec<u8>)>,
    dir: tempfile::TempDir,
}

impl Made {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// Every blob, the file and the Secrets decrypt (`when` names the moment in failures).
    async fn check(&self, r: &Cluster, when: &str) {
        let mut api = r.key_api(NS, "app").await;
        for (version, blob) in &self.blobs {
            let out = decrypt(&mut api, blob, &[("tenant", "acme")]).await;
            let out = out.unwrap_or_else(|e| panic!("{when}: the blob of version {version}: {e}"));
            assert_eq!(out.plaintext, format!("under version {version}").into_bytes(), "{when}");
            assert_eq!(out.key.unwrap().version, *version, "{when}");
        }
        let _ = std::fs::remove_file(self.path("dec"));
        let sa = format!("{NS}/app");
        let out = r.kubekms(&[
            "decrypt",
            "--service-account",
            &sa,
            "--in",
            &self.path("enc"),
            "--out",
            &self.path("dec"),
        ]);
        assert!(out.status.success(), "{when}: kubekms decrypt: {}", stderr(&out));
        assert_eq!(
            std::fs::read(self.path("dec")).unwrap(),
            std::fs::read(self.path("plain")).unwrap(),
            "{when}"
        );
        for i in 0..3 {
            let value = r.kubectl(&["get", "secret", &format!("s{i}"), "-n", NS, "-o", "jsonpath={.data.v}"]);
            let expected =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("secret {i}"));
            assert_eq!(value, expected, "{when}: Secret s{i}");
        }
    }
}

#[tokio::test]
async fn disruptive_root_key_rotation_rewraps_everything_without_downtime() {
    let started = Instant::now();
    let cluster = Cluster {
        run_dir: run_dir_from("KUBEKMS_ROOTROTATE_RUN_DIR", ".run-rootrotate"),
        port_env: "KUBEKMS_ROOTROTATE_PORT_BASE",
        default_base: 39520,
    };
    let fresh = Fresh::start(cluster, None);
    let r = &fresh.0;
    let keys: Api<KmsKey> = Api::namespaced(r.client().await, NS);
    let materials: Api<KmsKeyMaterial> = Api::all(r.client().await);
    let (primary, old) = (r.run_dir.join("root.key"), r.run_dir.join("root-old.key"));
    let fingerprint = |path: &Path| {
        let out = r.kubekms(&["root-key", "fingerprint", "--root-key-file", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    let fp_a = fingerprint(&primary);

    // Under root key A: a key with VERSIONS versions and a blob under each, a file, Secrets.
    r.kubectl(&["create", "namespace", NS]);
    r.kubectl(&["create", "serviceaccount", "app", "-n", NS]);
    let binding = key_user_binding(NS, NS, "app");
    r.kubectl(&binding.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let key = "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata: {name: data}\nspec: {}\n";
    std::fs::write(dir.path().join("key.yaml"), key).unwrap();
    r.kubectl(&["apply", "-n", NS, "-f", dir.path().join("key.yaml").to_str().unwrap()]);
    let at_version = |v: u32| {
        move |k: &KmsKey| {
            let s = k.status.as_ref();
            s.and_then(|s| s.state) == Some(KeyState::Enabled) && s.and_then(|s| s.current_version) == Some(v)
        }
    };
    let wait_key = |what: String, cond: Box<dyn Fn(&KmsKey) -> bool>| {
        let keys = keys.clone();
        async move {
            eventually(Duration::from_secs(60), &what, || async {
                keys.get("data").await.ok().filter(|k| cond(k))
            })
            .await
        }
    };
    wait_key("version 1".into(), Box::new(at_version(1))).await;
    let mut api = r.key_api(NS, "app").await;
    let mut blobs = Vec::new();
    for v in 1..=VERSIONS {
        if v > 1 {
            let patch = format!(r#"{{"spec":{{"rotation":{{"onDemandRequest":"r{v}"}}}}}}"#);
            r.kubectl(&["patch", "kmskey", "data", "-n", NS, "--type", "merge", "-p", &patch]);
            wait_key(format!("version {v}"), Box::new(at_version(v))).await;
        }
        let plaintext = format!("under version {v}");
        let blob =
            encrypt(&mut api, &format!("{NS}/data"), plaintext.as_bytes(), &[("tenant", "acme")]).await;
        blobs.push((v, blob.unwrap().ciphertext_blob));
    }
    let made = Made { blobs, dir };
    std::fs::write(made.path("plain"), b"a file kubekms encrypt wrote\n".repeat(500)).unwrap();
    let sa = format!("{NS}/app");
    let enc = [
        "encrypt",
        "--service-account",
        &sa,
        "--key",
        "rotate/data",
        "--in",
        &made.path("plain"),
        "--out",
        &made.path("enc"),
    ];
    let out = r.kubekms(&enc);
    assert!(out.status.success(), "{}", stderr(&out));
    for i in 0..3 {
        r.kubectl(&[
            "create",
            "secret",
            "generic",
            &format!("s{i}"),
            "-n",
            NS,
            &format!("--from-literal=v=secret {i}"),
        ]);
    }
    let raw = etcd_get_at(&r.env("ETCDCTL_ENDPOINTS"), &format!("/registry/secrets/{NS}/s0"));
    assert!(raw.starts_with(b"k8s:enc:kms:v2:kubekms:"), "the plugin encrypted the Secret in etcd");
    made.check(r, "before the rotation").await;
    let status = r.kubekms(&["root-key", "status"]);
    assert!(
        stdout(&status).contains(&format!("primary root key {fp_a}")) && stdout(&status).contains("complete"),
        "{}",
        stdout(&status)
    );

    // Bad configurations, refused with the reason.
    let a = primary.to_str().unwrap();
    let out = r.kubekms(&["root-key", "fingerprint", "--root-key-file", a, "--previous-root-key-file", a]);
    assert!(!out.status.success() && stderr(&out).contains("is the primary root key"), "{}", stderr(&out));
    let open = r.run_dir.join("open.key");
    std::fs::copy(&primary, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out =
        r.kubekms_with(&["root-key", "fingerprint"], &[("KUBEKMS_PREVIOUS_ROOT_KEY_FILE", open.as_os_str())]);
    assert!(
        !out.status.success() && stderr(&out).contains("readable by group or others"),
        "{}",
        stderr(&out)
    );
    let missing = r.run_dir.join("missing.key");
    let out = r.kubekms_with(
        &["root-key", "fingerprint"],
        &[("KUBEKMS_PREVIOUS_ROOT_KEY_FILE", missing.as_os_str())],
    );
    assert!(!out.status.success() && stderr(&out).contains("missing.key"), "{}", stderr(&out));
    let out = r.kubekms(&["root-key", "status", "--primary", "rk1-nothex"]);
    assert!(
        !out.status.success() && stderr(&out).contains("is not a root key fingerprint"),
        "{}",
        stderr(&out)
    );

    // The rotation: A becomes the previous root key, B (new) the primary. The plugin and
    // the key API first, then the controller, which rewraps one version per second.
    std::fs::rename(&primary, &old).unwrap();
    let out = r.kubekms(&["root-key", "create", "--out", a]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fp_b = fingerprint(&primary);
    let with_a = [
        ("KUBEKMS_PREVIOUS_ROOT_KEY_FILE", old.as_os_str()),
        ("KUBEKMS_REWRAP_BATCH_SIZE", OsStr::new("1")),
        ("KUBEKMS_REWRAP_PAUSE", OsStr::new("1s")),
    ];
    let bin = crate::support::kubekms_bin();
    r.controlplane(&["down", "controller", "plugin", "server"]);
    r.controlplane_with(&["up", "--kubekms", bin, "plugin", "server"], &with_a);
    made.check(r, "with the new root key, before any rewrap").await;
    r.controlplane_with(&["up", "--kubekms", bin, "controller"], &with_a);

    // Mid-way (some versions of the key rewrapped, not all), kill the controller.
    let uid = keys.get("data").await.unwrap().metadata.uid.unwrap();
    let midway = eventually(Duration::from_secs(60), "some versions rewrapped, not all", || async {
        let m = materials.get(&uid).await.ok()?;
        let by = roots(&m);
        by.iter().any(|(f, _)| *f == fp_b).then_some(()).and(by.iter().any(|(f, _)| *f == fp_a).then_some(by))
    })
    .await;
    let pid = std::fs::read_to_string(r.run_dir.join("pids/controller.pid")).unwrap();
    let pid = pid.lines().next().unwrap().to_owned();
    let killed = std::process::Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(killed.success());
    let after_kill = roots(&materials.get(&uid).await.unwrap());
    let total: u32 = after_kill.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total, VERSIONS,
        "every version is under one root key or the other: {midway:?} {after_kill:?}"
    );
    made.check(r, "with the controller killed mid-rewrap").await;
    let status = stdout(&r.kubekms(&["root-key", "status"]));
    assert!(status.contains(&format!("other root key {fp_a}")) && status.contains("in progress"), "{status}");
    // Meanwhile a backup is refused: it would hold versions under A.
    let out = r.kubekms(&["keyring", "backup", "--out", &made.path("backup"), "--namespace", NS]);
    assert!(!out.status.success() && stderr(&out).contains(&fp_a), "{}", stderr(&out));

    // Started again, the controller finishes: status says so on the key and for the cluster.
    r.controlplane_with(&["up", "--kubekms", bin, "controller"], &with_a);
    let done = |k: &KmsKey| {
        let s = k.status.as_ref();
        s.is_some_and(|s| {
            s.root_keys.len() == 1 && s.root_keys[0].primary && s.root_keys[0].versions == VERSIONS
        })
    };
    let key = wait_key("every version under the new root key".into(), Box::new(done)).await;
    assert_eq!(key.status.unwrap().root_keys[0].fingerprint, fp_b);
    eventually(Duration::from_secs(60), "root-key status to say complete", || async {
        let out = stdout(&r.kubekms(&["root-key", "status"]));
        (out.contains("complete:") && !out.contains(&fp_a)).then_some(())
    })
    .await;
    // The controller's metrics port: the fourth of the cluster's.
    let port = r.port_base() + 3;
    let (code, metrics) = crate::support::http_get(port, "/metrics").await.expect("the controller's metrics");
    assert_eq!(code, 200);
    let series = format!("kubekms_root_key_versions{{fingerprint=\"{fp_b}\",primary=\"true\"}}");
    assert!(metrics.contains(&series), "{metrics}");
    assert!(!metrics.contains(&fp_a), "no version left under A: {metrics}");
    made.check(r, "after the rewrap, A still configured").await;

    // A removed: everything restarts with B alone, kube-apiserver too (its DEKs come from
    // the plugin again), and all still decrypts.
    std::fs::remove_file(&old).unwrap();
    std::fs::remove_file(&open).unwrap();
    r.controlplane(&["down", "controller", "plugin", "server", "kube-apiserver"]);
    r.controlplane(&["up", "--kubekms", bin]);
    made.check(r, "with B alone, after a restart of everything").await;
    // New versions are B's, and what A wrote before is still readable through B.
    r.kubectl(&[
        "patch",
        "kmskey",
        "data",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"rotation":{"onDemandRequest":"after"}}}"#,
    ]);
    wait_key("a version after the rotation".into(), Box::new(at_version(VERSIONS + 1))).await;
    let m = materials.get(&uid).await.unwrap();
    assert_eq!(roots(&m), [(fp_b.clone(), VERSIONS + 1)]);
    let mut api = r.key_api(NS, "app").await;
    let blob = encrypt(&mut api, "rotate/data", b"after", &[]).await.unwrap();
    assert_eq!(decrypt(&mut api, &blob.ciphertext_blob, &[]).await.unwrap().plaintext, b"after");
    eprintln!("root-key rotation test: {:.0?}", started.elapsed());
    drop(fresh);
}
