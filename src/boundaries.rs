//! The dependency rule, checked: the domain, the crypto, the call pipeline and the data
//! paths of the plugin and the key API know nothing of Kubernetes. Only adapters (watches,
//! stores, the token reviewer, the SubjectAccessReview checker) may import `kube` or
//! `k8s_openapi`; this test fails when a kube type enters one of the modules below.

use std::path::{Path, PathBuf};

/// Modules that must stay kube-free: directories (every file in them) and single files.
const KUBE_FREE: &[&str] = &[
    "src/domain",
    "src/crypto",
    "src/call.rs",
    "src/plugin/service.rs",
    "src/plugin/format.rs",
    "src/server/service.rs",
    "src/server/auth.rs",
    "src/server/authz.rs",
    "src/server/directory.rs",
    "src/server/grant_request.rs",
    "src/server/blob.rs",
    "src/server/aws/sigv4.rs",
    "src/server/aws/sts.rs",
    "src/server/aws/protocol.rs",
    "src/server/aws/ops.rs",
    "src/server/aws/admin.rs",
    "src/keyring/snapshot.rs",
    "src/usage/recorder.rs",
    "src/usage/writer.rs",
];

/// What an import of Kubernetes types looks like.
const KUBE_PATHS: &[&str] = &["kube::", "kube_runtime", "k8s_openapi", "crate::api", "super::api"];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()))
        .flat_map(|entry| rust_files(&entry.unwrap().path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    files
}

/// `path:line: text` for every line of `text` that names a Kubernetes path.
fn offending_lines(path: &Path, text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .filter(|(_, line)| KUBE_PATHS.iter().any(|k| line.contains(k)))
        .map(|(n, line)| format!("{}:{}: {}", path.display(), n + 1, line.trim()))
        .collect()
}

#[test]
fn the_core_and_the_data_paths_import_no_kube_type() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offences = Vec::new();
    for module in KUBE_FREE {
        let files = rust_files(&root.join(module));
        assert!(!files.is_empty(), "{module} has no Rust files: update KUBE_FREE");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            offences.extend(offending_lines(file.strip_prefix(root).unwrap_or(&file), &text));
        }
    }
    assert!(offences.is_empty(), "kube types in kube-free modules:\n{}", offences.join("\n"));
}

#[test]
fn the_check_sees_an_import() {
    let p = Path::new("x.rs");
    assert_eq!(offending_lines(p, "use kube::Api;\n// kube:: in a comment\nfn f() {}").len(), 1);
    assert_eq!(offending_lines(p, "let t: k8s_openapi::Time;").len(), 1);
    assert_eq!(offending_lines(p, "use crate::api::KmsKey;").len(), 1);
    assert!(offending_lines(p, "use crate::domain::Key;").is_empty());
}
