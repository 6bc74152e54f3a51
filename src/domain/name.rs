//! `NAMESPACE/NAME`: how a person names one namespaced object (a KmsKey, a
//! ServiceAccount) on the command line, parsed once into a type that cannot hold anything
//! else.

use std::fmt;
use std::str::FromStr;

/// The name of a namespaced object, written `NAMESPACE/NAME`: two non-empty parts and
/// exactly one slash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    namespace: String,
    name: String,
}

impl NamespacedName {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace and the name.
    pub fn into_parts(self) -> (String, String) {
        (self.namespace, self.name)
    }
}

/// Why a string is not `NAMESPACE/NAME`; each variant holds the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespacedNameError {
    #[error("{0:?} is not NAMESPACE/NAME: it has no slash")]
    NoSlash(String),
    #[error("{0:?} is not NAMESPACE/NAME: the namespace is empty")]
    EmptyNamespace(String),
    #[error("{0:?} is not NAMESPACE/NAME: the name is empty")]
    EmptyName(String),
    #[error("{0:?} is not NAMESPACE/NAME: it has more than one slash")]
    ExtraSlash(String),
}

impl FromStr for NamespacedName {
    type Err = NamespacedNameError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let refused = |error: fn(String) -> NamespacedNameError| Err(error(value.to_owned()));
        match value.split_once('/') {
            None => refused(NamespacedNameError::NoSlash),
            Some(("", _)) => refused(NamespacedNameError::EmptyNamespace),
            Some((_, "")) => refused(NamespacedNameError::EmptyName),
            Some((_, name)) if name.contains('/') => refused(NamespacedNameError::ExtraSlash),
            Some((namespace, name)) => {
                Ok(NamespacedName { namespace: namespace.to_owned(), name: name.to_owned() })
            }
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_must_be_namespace_slash_name() {
        let key: NamespacedName = "kube-system/k".parse().unwrap();
        assert_eq!((key.namespace(), key.name()), ("kube-system", "k"));
        for bad in ["k", "/k", "ns/", "a/b/c", ""] {
            let err = bad.parse::<NamespacedName>().unwrap_err().to_string();
            assert!(err.contains("is not NAMESPACE/NAME"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_error_says_what_is_wrong() {
        use NamespacedNameError::*;
        for (bad, want) in [
            ("k", NoSlash("k".into())),
            ("", NoSlash(String::new())),
            ("/k", EmptyNamespace("/k".into())),
            ("/", EmptyNamespace("/".into())),
            ("ns/", EmptyName("ns/".into())),
            ("a/b/c", ExtraSlash("a/b/c".into())),
            ("a//", ExtraSlash("a//".into())),
        ] {
            assert_eq!(bad.parse::<NamespacedName>(), Err(want), "{bad:?}");
        }
        assert_eq!(
            "a/b/c".parse::<NamespacedName>().unwrap_err().to_string(),
            r#""a/b/c" is not NAMESPACE/NAME: it has more than one slash"#
        );
    }

    #[test]
    fn it_prints_as_it_was_written() {
        let key: NamespacedName = "kube-system/cluster-secrets".parse().unwrap();
        assert_eq!(key.to_string(), "kube-system/cluster-secrets");
        assert_eq!(key.clone().into_parts(), ("kube-system".to_owned(), "cluster-secrets".to_owned()));
        assert_eq!(key.to_string().parse::<NamespacedName>(), Ok(key));
    }
}
