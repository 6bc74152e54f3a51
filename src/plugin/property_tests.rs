//! Property tests over every parser of bytes that reach the plugin from outside: the key
//! id, the ciphertext and annotations of a Decrypt (from etcd, possibly years old or
//! tampered with), and the cache file (from disk).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::cache::{self, CachedKey, CachedVersion};
use super::format::{self, KeyVersionId};
use crate::api::KeyState;
use crate::crypto::KeyMaterial;

const KEY_ID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

fn key() -> KeyMaterial {
    KeyMaterial::from_slice(&[0x5a; 32]).unwrap()
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    proptest::collection::btree_map(
        "[a-zA-Z0-9._/ -]{0,20}",
        proptest::collection::vec(any::<u8>(), 0..40),
        0..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn key_id_parsing_never_panics_and_round_trips(s in "\\PC{0,80}", version in 1u32..) {
        let _ = KeyVersionId::parse(&s);
        let id = KeyVersionId::new(KEY_ID, version);
        prop_assert_eq!(KeyVersionId::parse(&id.to_kms()), Some(id));
    }

    #[test]
    fn arbitrary_ciphertexts_never_decrypt(bytes in proptest::collection::vec(any::<u8>(), 0..1200), ann in annotations()) {
        let id = KeyVersionId::new(KEY_ID, 1);
        let accepted = format::check_ciphertext(&bytes, &id).is_ok() && format::unwrap(&key(), &id, &ann, &bytes).is_ok();
        prop_assert!(!accepted);
        let _ = format::check_annotations(&ann);
    }

    #[test]
    fn any_change_to_a_genuine_ciphertext_is_caught(
        seed in proptest::collection::vec(any::<u8>(), 1..=64),
        index in any::<prop::sample::Index>(),
        flip in 1u8..,
        cut in any::<prop::sample::Index>(),
    ) {
        let id = KeyVersionId::new(KEY_ID, 1);
        let ann = format::annotations_for("ns/k");
        let ct = format::wrap(&key(), &id, &ann, &seed).unwrap();
        let opened = format::unwrap(&key(), &id, &ann, &ct).unwrap();
        prop_assert_eq!(opened.expose(), &seed[..]);
        let mut tampered = ct.clone();
        tampered[index.index(ct.len())] ^= flip;
        let ok = format::check_ciphertext(&tampered, &id).is_ok() && format::unwrap(&key(), &id, &ann, &tampered).is_ok();
        prop_assert!(!ok);
        let truncated = &ct[..cut.index(ct.len())];
        let ok = format::check_ciphertext(truncated, &id).is_ok() && format::unwrap(&key(), &id, &ann, truncated).is_ok();
        prop_assert!(!ok);
    }

    #[test]
    fn annotation_checks_never_panic(ann in annotations()) {
        let verdict = format::check_annotations(&ann);
        if verdict.is_ok() {
            prop_assert!(ann.keys().all(|k| format::is_fqdn(k)));
        }
    }

    #[test]
    fn arbitrary_cache_files_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(cache::decode(&bytes, &key()).is_err());
    }

    #[test]
    fn any_change_to_a_genuine_cache_file_is_refused(
        current in 1u32..5,
        index in any::<prop::sample::Index>(),
        flip in 1u8..,
    ) {
        let c = CachedKey {
            namespace: "ns".into(),
            name: "k".into(),
            key_id: KEY_ID.into(),
            uid: None,
            state: KeyState::Enabled,
            current_version: Some(current),
            refused_versions: Default::default(),
            root_key_fingerprint: "rk1-0000000000000000".into(),
            versions: (1..=current).map(|v| CachedVersion { version: v, wrapped: format!("AA{v}="), root_key_fingerprint: None }).collect(),
            valid_to: None,
        };
        let bytes = cache::encode(&c, &key()).unwrap();
        prop_assert_eq!(cache::decode(&bytes, &key()).unwrap(), c);
        let mut changed = bytes.clone();
        changed[index.index(bytes.len())] ^= flip;
        prop_assert!(cache::decode(&changed, &key()).is_err());
    }

    #[test]
    fn audit_verification_never_panics(text in "\\PC{0,300}") {
        let _ = crate::audit::verify(text.as_bytes(), None);
    }
}
