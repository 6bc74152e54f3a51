//! An alias: a second name of a key in the same namespace (`alias/<name>` in the AWS API,
//! `namespace/alias/<name>` in the gRPC API and the CLI), movable to another key.

/// A `KmsAlias`, as the key API resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Alias {
    pub namespace: String,
    /// The alias's name, without `alias/`.
    pub name: String,
    /// The object's UID.
    pub uid: String,
    /// The name of the key it names, in the same namespace.
    pub target_key: String,
}

/// The prefix of alias names in the AWS API, and in kubekms's `namespace/alias/<name>`.
pub const ALIAS_PREFIX: &str = "alias/";
