//! The public contract: custom resources in the `kms.kubekms.io/v1alpha1` API group.
//!
//! `KmsKey` and `KmsGrant` are what users write. `KmsKeyMaterial` is internal: it holds
//! key-version material wrapped by the root key and is readable only by kubekms itself.
//! The CRD YAML in `crds/` and in the Helm chart is generated from these types
//! (`kubekms crds`), and a test fails when the two drift.

// kube-derive's repeated `printcolumn(type_ = …)` arguments trip clippy's
// duplicated_attributes lint, which is meant for repeated attributes, not macro arguments.
#[allow(clippy::duplicated_attributes)]
mod alias;
mod convert;
mod crds;
#[allow(clippy::duplicated_attributes)]
mod grant;
#[allow(clippy::duplicated_attributes)]
mod import;
#[allow(clippy::duplicated_attributes)]
mod key;
#[allow(clippy::duplicated_attributes)]
mod material;
mod principal;
#[allow(clippy::duplicated_attributes)]
mod usage;

pub use alias::{KmsAlias, KmsAliasSpec};
pub use crds::{all_crds, crds_yaml};
pub use grant::{
    GrantConstraints, GrantCreator, GrantState, KeyReference, KmsGrant, KmsGrantSpec, KmsGrantStatus,
};
pub use import::{ImportWrapping, ImportedMaterial, KmsKeyImport, KmsKeyImportSpec, KmsKeyImportStatus};
pub use key::{
    Deletion, Effect, KeyOperation, KeyPolicy, KeySpec, KeyState, KeyUsage, KeyVersionState,
    KeyVersionStatus, KmsKey, KmsKeySpec, KmsKeyStatus, MAX_VERSION_REQUESTS, Origin, PolicyStatement,
    RootKeyUse, Rotation, StorageMigrationPhase, StorageMigrationStatus, VersionRequest,
};
pub use material::{
    DeletionRefusal, KeyOwner, KmsKeyMaterial, KmsKeyMaterialSpec, MAX_VERSIONS, MaterialVersion,
    StorageRecord, VersionTrigger,
};
pub use principal::{Principal, PrincipalKind};
pub use usage::{KmsKeyUsage, KmsKeyUsageSpec, MAX_REPORTERS, ReporterKind, UsageReporter, VersionUse};

/// The API group of every kubekms resource.
pub const GROUP: &str = "kms.kubekms.io";
/// The API version served and stored.
pub const VERSION: &str = "v1alpha1";
