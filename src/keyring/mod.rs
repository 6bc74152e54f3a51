//! Key versions: where wrapped material is stored (`KmsKeyMaterial`), and how it is read
//! back into memory.

mod import;
mod material;

pub use import::{ImportError, import, read_material};
pub use material::{MaterialError, MaterialStore, Owner, unwrap_version};
