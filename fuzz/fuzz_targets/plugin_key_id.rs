//! The plugin's KMS v2 key id (`kubekms:<keyId>:<version>`), as kube-apiserver hands it
//! back in Decrypt. Properties: what parses is exactly the one string of its version
//! (`to_kms` gives the input back, so one version never has two key ids); every version
//! of every keyId round-trips, except version 0, which never exists.
#![no_main]

use kubekms::plugin::format::{KeyVersionId, MAX_KEY_ID_LEN};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

const UID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        format!("kubekms:{UID}:1"),
        format!("kubekms:{UID}:4294967295"),
        format!("kubekms:{UID}:0"),
        format!("kubekms:{}:1", UID.to_uppercase()),
        format!("kubekms:{UID}:1:2"),
    ]
    .into_iter()
    .map(|s| kubekms_fuzz::seed(0, s.as_bytes()))
    .collect();
    out.push(kubekms_fuzz::seed(1, &[7; 20]));
    out
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let Ok(s) = std::str::from_utf8(rest) else { return };
        if let Some(id) = KeyVersionId::parse(s) {
            assert_eq!(id.to_kms(), s, "a key id that parses is the canonical one of its version");
            assert!(id.version >= 1 && s.len() <= MAX_KEY_ID_LEN);
            assert!(uuid::Uuid::try_parse(&id.key_id).is_ok());
        }
    } else {
        let mut u = Unstructured::new(rest);
        let (Ok(uid), Ok(version)) = (u.arbitrary::<[u8; 16]>(), u.arbitrary::<u32>()) else { return };
        let id = KeyVersionId::new(&uuid::Uuid::from_bytes(uid).hyphenated().to_string(), version);
        let kms = id.to_kms();
        assert!(kms.len() <= MAX_KEY_ID_LEN);
        let parsed = KeyVersionId::parse(&kms);
        if version == 0 {
            assert_eq!(parsed, None, "version 0 never exists");
        } else {
            assert_eq!(parsed, Some(id), "every version's key id round-trips");
        }
    }
});
