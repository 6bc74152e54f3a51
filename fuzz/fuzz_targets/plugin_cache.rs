//! The plugin's cache file (its state directory's `key-cache-v1`), read at every start.
//! Properties: a file the fuzzer makes that passes the MAC is consistent and decodes to
//! what it encodes to (not "only a genuine file passes": in-process comparison feedback can
//! teach libFuzzer a valid tag, an oracle no reader of the file has); a body it makes with a valid MAC
//! (the target computes it, as if the fuzzer held the root key) is refused unless
//! consistent (versions increasing, at most the CRD's limit, the current one cached), and
//! what is accepted encodes and decodes to itself; a changed byte of a genuine file fails.
#![no_main]

use hmac::{Hmac, KeyInit, Mac};
use kubekms::api::{KeyState, MAX_VERSIONS};
use kubekms::plugin::cache::{CachedKey, decode, encode, mac_key};
use libfuzzer_sys::fuzz_target;

/// The first line of the format.
const HEADER: &str = "kubekms-plugin-cache v1";

fn with_mac(body: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(mac_key(&kubekms_fuzz::root()).expose())
        .expect("any key length");
    mac.update(body);
    let tag: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    [HEADER.as_bytes(), b"\n", body, b"\n", tag.as_bytes(), b"\n"].concat()
}

fn check_consistent(cache: &CachedKey) {
    assert!(cache.versions.len() <= MAX_VERSIONS);
    assert!(cache.versions.windows(2).all(|w| w[0].version < w[1].version));
    if let Some(current) = cache.current_version {
        assert!(cache.state == KeyState::Destroyed || cache.versions.iter().any(|v| v.version == current));
    }
}

const SAMPLE: &str = r#"{"namespace":"ns","name":"key","keyId":"6ece15cd-0195-4985-aff9-395763ad0a3b","state":"Enabled","currentVersion":2,"refusedVersions":{"1":"Disabled"},"rootKeyFingerprint":"ab12","versions":[{"version":1,"wrapped":"AQID"},{"version":2,"wrapped":"BAUG"}]}"#;

fn seeds() -> Vec<Vec<u8>> {
    let cache: CachedKey = serde_json::from_str(SAMPLE).expect("the sample");
    let file = encode(&cache, &mac_key(&kubekms_fuzz::root())).expect("encode");
    vec![
        kubekms_fuzz::seed(0, &file),
        kubekms_fuzz::seed(1, SAMPLE.as_bytes()),
        kubekms_fuzz::seed(1, SAMPLE.replace("\"currentVersion\":2", "\"currentVersion\":3").as_bytes()),
    ]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = mac_key(&kubekms_fuzz::root());
    let file = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        with_mac(rest)
    };
    let Ok(cache) = decode(&file, &key) else { return };
    check_consistent(&cache);
    let again = encode(&cache, &key).expect("encode");
    assert_eq!(decode(&again, &key).expect("re-decode"), cache, "what decodes encodes to itself");
    for (i, mask) in [(rest.len(), 1u8), (again.len() / 2, 0x20), (again.len() - 2, 0x01)] {
        assert!(decode(&kubekms_fuzz::flipped(&again, i, mask), &key).is_err(), "a changed byte at {i}");
    }
});
