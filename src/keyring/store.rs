//! Where `KmsKeyMaterial` objects are read and written: a thin adapter over the API
//! server. What goes into them is decided in [`super::material`].

use kube::api::PostParams;
use kube::{Api, Client};

use super::material::{MaterialError, Owner, check_owner};
use crate::api::KmsKeyMaterial;

/// Key material stored in the cluster.
#[derive(Clone)]
pub struct MaterialStore {
    api: Api<KmsKeyMaterial>,
}

impl MaterialStore {
    pub fn new(client: Client) -> Self {
        MaterialStore { api: Api::all(client) }
    }

    /// The material of the key `key_id`, if any.
    pub async fn get(&self, key_id: &str) -> Result<Option<KmsKeyMaterial>, MaterialError> {
        self.api
            .get_opt(key_id)
            .await
            .map_err(|source| MaterialError::Get { name: key_id.to_owned(), source })
    }

    /// Creates `object`, the material of `owner`. If it already exists (a previous attempt
    /// got this far), returns the existing object after checking that it is this key's.
    pub async fn create(
        &self,
        owner: &Owner,
        object: &KmsKeyMaterial,
    ) -> Result<KmsKeyMaterial, MaterialError> {
        match self.api.create(&PostParams::default(), object).await {
            Ok(created) => Ok(created),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = self.get(&owner.uid).await?.ok_or_else(|| MaterialError::Get {
                    name: owner.uid.clone(),
                    source: kube::Error::Api(e),
                })?;
                check_owner(&existing, owner)?;
                Ok(existing)
            }
            Err(source) => Err(MaterialError::Create { name: owner.uid.clone(), source }),
        }
    }

    /// Replaces the object with `updated`, which carries the resourceVersion it was made
    /// from: the write fails with a conflict (see [`MaterialError::is_conflict`]) if the
    /// object changed meanwhile.
    pub async fn replace(&self, updated: &KmsKeyMaterial) -> Result<KmsKeyMaterial, MaterialError> {
        let name = updated.metadata.name.clone().unwrap_or_default();
        self.api
            .replace(&name, &PostParams::default(), updated)
            .await
            .map_err(|source| MaterialError::Update { name, source })
    }

    /// Removes the material object of a key whose material is destroyed and whose KmsKey
    /// is going away.
    pub async fn delete(&self, key_id: &str) -> Result<(), MaterialError> {
        match self.api.delete(key_id, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(MaterialError::Delete { name: key_id.to_owned(), source }),
        }
    }
}
