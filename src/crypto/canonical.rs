//! Canonical, unambiguous encodings of values bound as associated data: every field is
//! length-prefixed, and maps are written in key order.

use std::collections::BTreeMap;

/// Builds an unambiguous byte string from labelled fields.
#[derive(Default)]
pub struct CanonicalWriter(Vec<u8>);

impl CanonicalWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(mut self, value: &[u8]) -> Self {
        self.0.extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.0.extend_from_slice(value);
        self
    }

    /// Appends a length-prefixed string.
    pub fn str(self, value: &str) -> Self {
        self.bytes(value.as_bytes())
    }

    /// Appends a 32-bit number.
    pub fn u32(mut self, value: u32) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Appends a map: its size, then each key and value in key order.
    pub fn map(mut self, map: &BTreeMap<String, String>) -> Self {
        self.0.extend_from_slice(&(map.len() as u32).to_be_bytes());
        for (k, v) in map {
            self = self.str(k).str(v);
        }
        self
    }

    /// Appends a map with byte values: its size, then each key and value in key order.
    pub fn bytes_map(mut self, map: &BTreeMap<String, Vec<u8>>) -> Self {
        self.0.extend_from_slice(&(map.len() as u32).to_be_bytes());
        for (k, v) in map {
            self = self.str(k).bytes(v);
        }
        self
    }

    /// The encoding.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The canonical encoding of a string map (an encryption context, KMS annotations).
pub fn canonical_map(map: &BTreeMap<String, String>) -> Vec<u8> {
    CanonicalWriter::new().map(map).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn order_of_insertion_does_not_matter() {
        let a = map(&[("a", "1"), ("b", "2")]);
        let b = map(&[("b", "2"), ("a", "1")]);
        assert_eq!(canonical_map(&a), canonical_map(&b));
    }

    #[test]
    fn boundaries_are_unambiguous() {
        assert_ne!(canonical_map(&map(&[("ab", "c")])), canonical_map(&map(&[("a", "bc")])));
        assert_ne!(canonical_map(&map(&[])), canonical_map(&map(&[("", "")])));
    }
}
