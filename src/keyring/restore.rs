//! A cluster's keys read into a [`Backup`], and recreated from one: the thin adapter
//! between [`super::backup`] and the API server.
//!
//! A restore checks everything before it writes anything: the file (see
//! [`super::backup::open_backup`]) and the cluster (no KmsKey of the same name, no keyId
//! already in use by another key). It then creates, key by key, the KmsKey (annotated, so the controller
//! makes no material of its own for it) and its KmsKeyMaterial — with the keyId and
//! versions of the backup under the new key's UID — and removes the annotation.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::backup::{Backup, BackupKey, Existing, Step, plan_restore};
use super::material::{Owner, material_metadata};
use crate::api::{KmsKey, KmsKeyMaterial, KmsKeyMaterialSpec};
use crate::crypto::RootKey;

/// The annotation of a KmsKey that `kubekms keyring restore` is recreating: the keyId it
/// will have. While the key has no material, the controller makes none.
pub const RESTORE_ANNOTATION: &str = "kms.kubekms.io/restoring-key-id";

/// Why a backup could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("failed to list {0}")]
    List(&'static str, #[source] kube::Error),
    #[error(
        "the material of KmsKey {key} is wrapped by root key {found}, not by this one ({expected}); during a root-key rotation, back up once `kubekms root-key status` says it is complete"
    )]
    ForeignRootKey { key: String, found: String, expected: String },
    #[error("refused, nothing was restored: {}", .0.join("; "))]
    Conflicts(Vec<String>),
    #[error("failed to create namespace {0}")]
    Namespace(String, #[source] kube::Error),
    #[error("failed to {step} for {key} (restored before it: {})", restored_list(.restored))]
    Write {
        step: &'static str,
        key: String,
        restored: Vec<String>,
        #[source]
        source: kube::Error,
    },
}

fn restored_list(restored: &[String]) -> String {
    if restored.is_empty() { "none".to_owned() } else { restored.join(", ") }
}

/// Every key of `namespaces` (every namespace when empty) with its material as stored,
/// except destroyed keys. Refuses material that `root` does not wrap.
pub async fn collect(client: Client, root: &RootKey, namespaces: &[String]) -> Result<Backup, RestoreError> {
    let mut keys: Vec<KmsKey> = Vec::new();
    if namespaces.is_empty() {
        let all = Api::<KmsKey>::all(client.clone()).list(&ListParams::default()).await;
        keys = all.map_err(|e| RestoreError::List("KmsKeys", e))?.items;
    }
    for ns in namespaces {
        let list = Api::<KmsKey>::namespaced(client.clone(), ns).list(&ListParams::default()).await;
        keys.extend(list.map_err(|e| RestoreError::List("KmsKeys", e))?.items);
    }
    let materials = Api::<KmsKeyMaterial>::all(client).list(&ListParams::default()).await;
    let materials: BTreeMap<String, KmsKeyMaterial> = materials
        .map_err(|e| RestoreError::List("KmsKeyMaterials", e))?
        .items
        .into_iter()
        .map(|m| (m.name_any(), m))
        .collect();
    let mut out = Vec::new();
    for key in keys {
        let (namespace, name, uid) = (key.namespace().unwrap_or_default(), key.name_any(), key.uid());
        let material = uid.and_then(|uid| materials.get(&uid).filter(|m| m.spec.owner.uid == uid)).map(|m| {
            KmsKeyMaterialSpec {
                storage: None,
                deletion_refused: None,
                import_wrapping: None,
                ..m.spec.clone()
            }
        });
        if material.as_ref().is_some_and(|m| m.destroyed_at.is_some()) {
            continue;
        }
        let material = match material {
            Some(m) => Some(crate::keyring::material::under_primary(m, root).map_err(|found| {
                RestoreError::ForeignRootKey {
                    key: format!("{namespace}/{name}"),
                    found,
                    expected: root.fingerprint().to_owned(),
                }
            })?),
            None => None,
        };
        let labels = key.labels().clone();
        out.push(BackupKey { namespace, name, labels, spec: key.spec, material });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(Backup { created: Timestamp::now(), root_key_fingerprint: root.fingerprint().to_owned(), keys: out })
}

/// What the cluster holds that a restore must not collide with.
async fn existing(client: &Client) -> Result<Existing, RestoreError> {
    let keys = Api::<KmsKey>::all(client.clone()).list(&ListParams::default()).await;
    let keys = keys.map_err(|e| RestoreError::List("KmsKeys", e))?.items;
    let materials = Api::<KmsKeyMaterial>::all(client.clone()).list(&ListParams::default()).await;
    let materials = materials.map_err(|e| RestoreError::List("KmsKeyMaterials", e))?.items;
    let mut out = Existing::default();
    let mut key_id_of = BTreeMap::new();
    for m in &materials {
        out.key_ids.insert(m.spec.key_id().to_owned());
        out.key_ids.insert(m.spec.owner.uid.clone());
        key_id_of.insert(m.name_any(), (m.spec.owner.uid.clone(), m.spec.key_id().to_owned()));
    }
    for key in &keys {
        let name = (key.namespace().unwrap_or_default(), key.name_any());
        let uid = key.uid().unwrap_or_default();
        let key_id = key_id_of.get(&uid).filter(|(owner, _)| *owner == uid).map(|(_, id)| id.clone());
        if let Some(id) = key.annotations().get(RESTORE_ANNOTATION).filter(|_| key_id.is_none()) {
            out.awaiting.insert(name.clone(), id.clone());
        }
        out.keys.insert(name, key_id);
        out.key_ids.insert(uid);
    }
    Ok(out)
}

/// What a restore did: the keys it restored, and those that were here already (restored
/// before, with the same keyId), as `namespace/name`.
#[derive(Debug, Default)]
pub struct Restored {
    pub restored: Vec<String>,
    pub already_here: Vec<String>,
}

/// Recreates every key of `backup` (already opened and checked) in the cluster, refusing
/// them all if any conflicts; resumes a key an interrupted restore left without material,
/// and leaves alone the keys restored before.
pub async fn restore(client: Client, backup: &Backup) -> Result<Restored, RestoreError> {
    let steps = plan_restore(backup, &existing(&client).await?).map_err(RestoreError::Conflicts)?;
    let mut out = Restored::default();
    for (key, step) in backup.keys.iter().zip(steps) {
        if step == Step::AlreadyHere {
            out.already_here.push(key.display());
            continue;
        }
        let restored = &out.restored;
        ensure_namespace(&client, &key.namespace).await?;
        let fail = |what| {
            let (key, restored) = (key.display(), restored.clone());
            move |source| RestoreError::Write { step: what, key, restored, source }
        };
        let keys: Api<KmsKey> = Api::namespaced(client.clone(), &key.namespace);
        let mut object = KmsKey::new(&key.name, key.spec.clone());
        object.metadata.labels = (!key.labels.is_empty()).then(|| key.labels.clone());
        if let Some(id) = key.key_id() {
            object.metadata.annotations = Some([(RESTORE_ANNOTATION.to_owned(), id.to_owned())].into());
        }
        let created = if step == Step::Resume {
            keys.get(&key.name).await.map_err(fail("read the KmsKey"))?
        } else {
            keys.create(&PostParams::default(), &object).await.map_err(fail("create the KmsKey"))?
        };
        if let Some(material) = &key.material {
            let owner = Owner {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: created.uid().unwrap_or_default(),
            };
            let object = KmsKeyMaterial {
                metadata: material_metadata(&owner),
                spec: KmsKeyMaterialSpec {
                    owner: owner.to_api(),
                    key_id: Some(material.key_id().to_owned()),
                    storage: None,
                    deletion_refused: None,
                    import_wrapping: None,
                    ..material.clone()
                },
            };
            Api::<KmsKeyMaterial>::all(client.clone())
                .create(&PostParams::default(), &object)
                .await
                .map_err(fail("create the KmsKeyMaterial"))?;
            let done = serde_json::json!({"metadata": {"annotations": {RESTORE_ANNOTATION: null}}});
            keys.patch(&key.name, &PatchParams::default(), &Patch::Merge(&done))
                .await
                .map_err(fail("remove the restore annotation"))?;
        }
        out.restored.push(key.display());
    }
    Ok(out)
}

async fn ensure_namespace(client: &Client, name: &str) -> Result<(), RestoreError> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let fail = |e| RestoreError::Namespace(name.to_owned(), e);
    if namespaces.get_opt(name).await.map_err(fail)?.is_some() {
        return Ok(());
    }
    let object = Namespace {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(fail(e)),
    }
}
