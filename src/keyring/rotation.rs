//! What a root-key rotation has left to do: how many key versions each root key other than
//! the primary still wraps, and in which keys. Pure: `kubekms root-key status` lists the
//! material objects and prints this.

use std::collections::BTreeMap;
use std::fmt;

use super::material::versions_by_root;
use crate::api::KmsKeyMaterial;

/// The versions each root key wraps, counted over every key's material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationReport {
    pub primary: String,
    /// By fingerprint, the primary's included: the versions it wraps and the keys
    /// (`namespace/name`) they belong to.
    pub roots: BTreeMap<String, RootUse>,
}

/// What one root key wraps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootUse {
    pub versions: u64,
    pub keys: Vec<String>,
}

impl RotationReport {
    pub fn new<'a>(primary: &str, materials: impl IntoIterator<Item = &'a KmsKeyMaterial>) -> Self {
        let mut roots: BTreeMap<String, RootUse> = BTreeMap::new();
        roots.entry(primary.to_owned()).or_default();
        for m in materials {
            let owner = format!("{}/{}", m.spec.owner.namespace, m.spec.owner.name);
            for (fingerprint, n) in versions_by_root(&m.spec) {
                let r = roots.entry(fingerprint.to_owned()).or_default();
                r.versions += u64::from(n);
                r.keys.push(owner.clone());
            }
        }
        for r in roots.values_mut() {
            r.keys.sort();
        }
        RotationReport { primary: primary.to_owned(), roots }
    }

    /// Versions that root keys other than the primary still wrap.
    pub fn remaining(&self) -> u64 {
        self.roots.iter().filter(|(fp, _)| **fp != self.primary).map(|(_, r)| r.versions).sum()
    }
}

/// The most keys named per root key.
const KEYS_SHOWN: usize = 10;

impl fmt::Display for RotationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (fingerprint, r) in &self.roots {
            let role = if *fingerprint == self.primary { "primary root key" } else { "other root key" };
            write!(f, "{role} {fingerprint}: {} versions in {} keys", r.versions, r.keys.len())?;
            if *fingerprint != self.primary {
                let more = r.keys.len().saturating_sub(KEYS_SHOWN);
                let shown = r.keys.iter().take(KEYS_SHOWN).cloned().collect::<Vec<_>>().join(", ");
                write!(
                    f,
                    " ({shown}{})",
                    if more > 0 { format!(" and {more} more") } else { String::new() }
                )?;
            }
            writeln!(f)?;
        }
        match self.remaining() {
            0 => writeln!(
                f,
                "complete: every key version is wrapped by the primary root key {}; previous root keys may be removed from every component",
                self.primary
            ),
            n => writeln!(
                f,
                "in progress: {n} key versions are still wrapped by other root keys; keep them configured as previous root keys until this says complete"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyOwner, MaterialVersion, VersionTrigger};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn material(name: &str, root: &str, versions: &[Option<&str>], destroyed: &[u32]) -> KmsKeyMaterial {
        let versions = versions
            .iter()
            .zip(1..)
            .map(|(fp, version)| {
                let gone = destroyed.contains(&version);
                MaterialVersion {
                    version,
                    created: Time(jiff::Timestamp::UNIX_EPOCH),
                    trigger: VersionTrigger::Created,
                    request: None,
                    wrapped: (!gone).then(|| "AA==".to_owned()),
                    root_key_fingerprint: fp.map(str::to_owned),
                    deletion_time: None,
                    destroyed_at: gone.then_some(Time(jiff::Timestamp::UNIX_EPOCH)),
                    expired_at: None,
                }
            })
            .collect();
        KmsKeyMaterial::new(
            name,
            crate::testing::material_spec(
                KeyOwner { namespace: "ns".into(), name: name.into(), uid: name.into() },
                root,
                versions,
            ),
        )
    }

    #[test]
    fn counts_what_each_root_key_wraps_and_says_when_the_old_one_may_go() {
        let a = material("a", "rk1-old", &[None, Some("rk1-new"), None], &[]);
        let b = material("b", "rk1-new", &[None], &[]);
        // A destroyed version needs no root key.
        let c = material("c", "rk1-old", &[None, Some("rk1-new")], &[1]);
        let report = RotationReport::new("rk1-new", [&a, &b, &c]);
        assert_eq!(report.remaining(), 2);
        assert_eq!(report.roots["rk1-old"], RootUse { versions: 2, keys: vec!["ns/a".into()] });
        assert_eq!(report.roots["rk1-new"].versions, 3);
        let text = report.to_string();
        assert!(text.contains("other root key rk1-old: 2 versions in 1 keys (ns/a)"), "{text}");
        assert!(text.contains("in progress: 2 key versions"), "{text}");

        let done = RotationReport::new("rk1-new", [&b, &material("c", "rk1-old", &[Some("rk1-new")], &[])]);
        assert_eq!(done.remaining(), 0);
        assert!(!done.roots.contains_key("rk1-old"));
        assert!(
            done.to_string()
                .contains("complete: every key version is wrapped by the primary root key rk1-new")
        );
        // No material at all: nothing to rewrap.
        assert_eq!(RotationReport::new("rk1-new", []).remaining(), 0);
    }
}
