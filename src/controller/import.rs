//! Import without the root key: for each EXTERNAL KmsKey that waits for material, keep a
//! wrapping key in its material object (private half sealed), publish the public half and
//! an import token in the KmsKeyImport of the same name, and turn a submission there into
//! version 1 — or refuse it, with the reason, in the Imported condition. Imported material
//! with a validTo is deleted here when that time comes, and the key waits for the same
//! material again.
//!
//! What decides is in `keyring::import` (token, expiry, unwrapping); this is the shell that
//! reads and writes. The key's own reconciler then sees version 1 and makes the key Enabled.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::cluster::FIELD_MANAGER;
use super::lifecycle::condition;
use super::{Error, key::owner};
use crate::api::{
    ImportWrapping, KeyState, KmsKey, KmsKeyImport, KmsKeyImportStatus, KmsKeyMaterial, Origin,
};
use crate::crypto::{RootKey, WRAPPING_ALGORITHM, WRAPPING_KEY_SPEC};
use crate::domain::WrappedMaterial;
use crate::keyring::{self, MaterialStore, Owner, Refusal};

/// The condition that reports the last submission.
pub const IMPORTED: &str = "Imported";

/// What the import reconciler needs.
pub struct ImportContext {
    pub client: Client,
    pub root: Arc<RootKey>,
    pub store: MaterialStore,
}

pub async fn reconcile(key: Arc<KmsKey>, ctx: Arc<ImportContext>) -> Result<Action, Error> {
    if key.spec.origin != Origin::External {
        return Ok(Action::await_change());
    }
    let owner = owner(&key)?;
    let now = Timestamp::now();
    let material = match ctx.store.get(&owner.uid).await? {
        Some(m) => Some(expire_if_due(&ctx, &owner, m, now).await?),
        None => None,
    };
    // Material that will expire wakes this reconciler at its validTo, to delete it then.
    let expires = material
        .as_ref()
        .filter(|m| m.spec.destroyed_at.is_none())
        .and_then(|m| m.spec.imported.as_ref()?.valid_to.as_ref())
        .map(|t| t.0)
        .filter(|at| *at > now);
    let later = || expires.map_or(Action::await_change(), |at| Action::requeue(until(at, now)));
    if key.meta().deletion_timestamp.is_some() {
        return Ok(later());
    }
    let imports: Api<KmsKeyImport> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let import = imports.get_opt(&owner.name).await.map_err(Error::ReadImport)?;
    let (state, _) = key.intent().state(material.as_ref().map(WrappedMaterial::from).as_ref());
    if state != KeyState::PendingImport {
        settle_not_pending(&ctx, &imports, import, material, state, now).await?;
        return Ok(later());
    }
    let key_id = material.as_ref().map_or(owner.uid.clone(), |m| m.spec.key_id().to_owned());
    let (material, mut wrapping) = match material {
        Some(m) => match m.spec.import_wrapping.clone() {
            Some(w) if !keyring::wrapping_spent(Some(&w), now) => (m, w),
            _ => replace_wrapping(&ctx, &key, &owner, Some(m), &key_id, now).await?,
        },
        None => replace_wrapping(&ctx, &key, &owner, None, &key_id, now).await?,
    };
    let import = match import {
        Some(import) => import,
        None => create_import(&imports, &key).await?,
    };
    let generation = import.meta().generation.unwrap_or(0);
    let prev = import.status.clone().unwrap_or_default();
    let submitted = !import.spec.encrypted_key_material.is_empty() || !import.spec.import_token.is_empty();
    let mut conditions = prev.conditions.clone();
    let mut imported = false;
    if submitted && prev.observed_generation != Some(generation) {
        let outcome = keyring::unwrap_submission(&ctx.root, &key_id, &wrapping, &import.spec, now)
            .and_then(|km| keyring::check_reimport(&material, &km).map(|()| km));
        match outcome {
            Ok(km) => {
                let valid_to = import.spec.valid_to.as_ref().map(|t| t.0);
                let again = material.spec.imported.is_some();
                let next = keyring::with_imported(&material, &ctx.root, &km, valid_to, now)?;
                ctx.store.replace(&next).await?;
                let mut message = if again {
                    "the same key material was imported again: its versions decrypt again".to_owned()
                } else {
                    "the key material was imported as version 1".to_owned()
                };
                match valid_to {
                    Some(at) => message.push_str(&format!("; it expires at {at}")),
                    None => message.push_str("; it does not expire"),
                }
                tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id, again, valid_to = ?valid_to, "imported key material");
                answer(&mut conditions, &prev.conditions, ("True", "Imported", message), generation, now);
                imported = true;
            }
            Err(refusal) => {
                tracing::warn!(key = %format!("{}/{}", owner.namespace, owner.name), reason = refusal.reason(), %refusal, "refused an import");
                if refusal.failed_decryption() {
                    (_, wrapping) = count_failure(&ctx, &key, &owner, material, &key_id, now).await?;
                }
                let message = refusal_message(&refusal);
                answer(
                    &mut conditions,
                    &prev.conditions,
                    ("False", refusal.reason(), message),
                    generation,
                    now,
                );
            }
        }
    } else if !submitted {
        let message =
            "waiting for key material wrapped under status.publicKey, with status.importToken".to_owned();
        answer(&mut conditions, &prev.conditions, ("False", "AwaitingMaterial", message), generation, now);
    }
    let published = if imported { None } else { Some(&wrapping) };
    let next = status(
        &ctx.root,
        &key_id,
        published,
        prev.observed_generation.max(submitted.then_some(generation)),
        conditions,
    )?;
    if next != prev {
        patch_status(&imports, &owner.name, &next).await?;
    }
    Ok(Action::requeue(until(wrapping.valid_to.0, now)))
}

/// How long from `now` until `at` (at least a second).
fn until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::from_secs(60)).max(Duration::from_secs(1))
}

/// Deletes imported material that has reached its validTo (whatever the key's state, even
/// pending deletion): its versions stay listed as expired until the same material is
/// imported again. The key's reconciler then reports it PendingImport.
async fn expire_if_due(
    ctx: &ImportContext,
    owner: &Owner,
    material: KmsKeyMaterial,
    now: Timestamp,
) -> Result<KmsKeyMaterial, Error> {
    let Some(at) = material.spec.imported.as_ref().and_then(|i| i.valid_to.as_ref()).map(|t| t.0) else {
        return Ok(material);
    };
    if at > now || material.spec.destroyed_at.is_some() {
        return Ok(material);
    }
    let Some(expired) = keyring::with_expired(&material, at) else { return Ok(material) };
    let written = ctx.store.replace(&expired).await?;
    tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = written.spec.key_id(), valid_to = %at, "imported key material expired: deleted; the key waits for the same material");
    Ok(written)
}

/// A key that does not (or no longer) wait for material: its wrapping key is discarded, its
/// KmsKeyImport no longer offers one, and a new submission is refused as NotPendingImport.
async fn settle_not_pending(
    ctx: &ImportContext,
    imports: &Api<KmsKeyImport>,
    import: Option<KmsKeyImport>,
    material: Option<KmsKeyMaterial>,
    state: KeyState,
    now: Timestamp,
) -> Result<(), Error> {
    if let Some(mut m) = material.filter(|m| m.spec.import_wrapping.is_some()) {
        m.spec.import_wrapping = None;
        ctx.store.replace(&m).await?;
    }
    let Some(import) = import else { return Ok(()) };
    let generation = import.meta().generation.unwrap_or(0);
    let prev = import.status.clone().unwrap_or_default();
    let submitted = !import.spec.encrypted_key_material.is_empty() || !import.spec.import_token.is_empty();
    let mut conditions = prev.conditions.clone();
    let mut observed = prev.observed_generation;
    if submitted && prev.observed_generation != Some(generation) {
        let refusal = Refusal::NotPendingImport(state.as_str());
        answer(
            &mut conditions,
            &prev.conditions,
            ("False", refusal.reason(), refusal.to_string()),
            generation,
            now,
        );
        observed = Some(generation);
    }
    let next = status(&ctx.root, "", None, observed, conditions)?;
    if next != prev {
        patch_status(imports, &import.name_any(), &next).await?;
    }
    Ok(())
}

/// Writes a new wrapping key into the material object (creating one without versions if
/// there is none yet), replacing any earlier one.
async fn replace_wrapping(
    ctx: &ImportContext,
    key: &KmsKey,
    owner: &Owner,
    material: Option<KmsKeyMaterial>,
    key_id: &str,
    now: Timestamp,
) -> Result<(KmsKeyMaterial, ImportWrapping), Error> {
    let wrapping = keyring::new_wrapping(&ctx.root, key_id, now).map_err(Error::Wrapping)?;
    let written = match material {
        Some(mut m) => {
            m.spec.import_wrapping = Some(wrapping.clone());
            ctx.store.replace(&m).await?
        }
        None => {
            let mut m = keyring::new_material(owner, key.spec.origin, &ctx.root, None, None, now)?;
            m.spec.import_wrapping = Some(wrapping.clone());
            ctx.store.create(owner, &m).await?
        }
    };
    // A create that found an object made meanwhile returns that object: use what it holds.
    let wrapping = written.spec.import_wrapping.clone().ok_or(Error::Unsettled)?;
    tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), valid_to = %wrapping.valid_to.0, "published a new import wrapping key");
    Ok((written, wrapping))
}

/// Counts a submission that did not decrypt; at the limit the wrapping key is replaced.
async fn count_failure(
    ctx: &ImportContext,
    key: &KmsKey,
    owner: &Owner,
    mut material: KmsKeyMaterial,
    key_id: &str,
    now: Timestamp,
) -> Result<(KmsKeyMaterial, ImportWrapping), Error> {
    let Some(wrapping) = material.spec.import_wrapping.as_mut() else { return Err(Error::Unsettled) };
    wrapping.failed_decryptions += 1;
    if keyring::wrapping_spent(Some(wrapping), now) {
        return replace_wrapping(ctx, key, owner, Some(material), key_id, now).await;
    }
    let written = ctx.store.replace(&material).await?;
    let wrapping = written.spec.import_wrapping.clone().ok_or(Error::Unsettled)?;
    Ok((written, wrapping))
}

fn refusal_message(refusal: &Refusal) -> String {
    if refusal.failed_decryption() {
        format!(
            "{refusal}; after {} such submissions the wrapping key and token are replaced",
            keyring::MAX_FAILED_DECRYPTIONS
        )
    } else {
        refusal.to_string()
    }
}

/// The status to publish: the wrapping key and its token while the key waits for
/// material, nothing of them otherwise.
fn status(
    root: &RootKey,
    key_id: &str,
    wrapping: Option<&ImportWrapping>,
    observed_generation: Option<i64>,
    conditions: Vec<Condition>,
) -> Result<KmsKeyImportStatus, Error> {
    let token = wrapping.map(|w| keyring::token_for(root, key_id, w)).transpose().map_err(Error::Wrapping)?;
    Ok(KmsKeyImportStatus {
        wrapping_algorithm: Some(WRAPPING_ALGORITHM.to_owned()),
        wrapping_key_spec: Some(WRAPPING_KEY_SPEC.to_owned()),
        public_key: wrapping.map(|w| w.public_key.clone()),
        import_token: token,
        parameters_valid_to: wrapping.map(|w| Time(w.valid_to.0)),
        observed_generation,
        conditions,
    })
}

/// Sets the Imported condition to (status, reason, message) for `generation`.
fn answer(
    conditions: &mut Vec<Condition>,
    prev: &[Condition],
    (status, reason, message): (&str, &str, String),
    generation: i64,
    now: Timestamp,
) {
    conditions.retain(|c| c.type_ != IMPORTED);
    conditions.push(condition(prev, IMPORTED, status, reason, message, generation, now));
}

async fn create_import(imports: &Api<KmsKeyImport>, key: &KmsKey) -> Result<KmsKeyImport, Error> {
    let mut object = KmsKeyImport::new(&key.name_any(), Default::default());
    object.metadata.owner_references = Some(vec![OwnerReference {
        api_version: KmsKey::api_version(&()).into_owned(),
        kind: KmsKey::kind(&()).into_owned(),
        name: key.name_any(),
        uid: key.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    match imports.create(&PostParams::default(), &object).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            imports.get(&key.name_any()).await.map_err(Error::ReadImport)
        }
        Err(e) => Err(Error::WriteImport(e)),
    }
}

async fn patch_status(
    imports: &Api<KmsKeyImport>,
    name: &str,
    status: &KmsKeyImportStatus,
) -> Result<(), Error> {
    let body = json!({ "apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsKeyImport", "status": status });
    imports
        .patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))
        .await
        .map(|_| ())
        .map_err(Error::WriteImport)
}

pub fn error_policy(_key: Arc<KmsKey>, error: &Error, _ctx: Arc<ImportContext>) -> Action {
    tracing::warn!(error = %error, category = error.category(), "import reconcile failed");
    Action::requeue(if error.is_conflict() { Duration::from_secs(1) } else { Duration::from_secs(10) })
}
