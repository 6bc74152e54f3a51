//! The plugin's ciphertext (the wrapped DEK seed) and the annotations stored beside it in
//! etcd, as Decrypt gets them back. Properties: the structure check bounds any input,
//! unwrapping never panics; a genuine ciphertext round-trips, fits kube-apiserver's limit, and any one changed byte,
//! another key version or changed annotations make it fail; accepted annotations are
//! within kube-apiserver's limits (keys fully qualified domain names, 32 KiB in all).
#![no_main]

use std::collections::BTreeMap;

use kubekms::plugin::format::{
    KeyVersionId, MAX_ANNOTATIONS_LEN, MAX_CIPHERTEXT_LEN, MAX_PLAINTEXT_LEN, annotations_for,
    check_annotations, check_ciphertext, is_fqdn, unwrap, wrap,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const UID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

fn annotations(u: &mut Unstructured<'_>) -> Result<BTreeMap<String, Vec<u8>>> {
    let n = u.int_in_range(0..=3)?;
    let mut map = BTreeMap::new();
    for _ in 0..n {
        map.insert(kubekms_fuzz::string(u, 80)?, kubekms_fuzz::bytes(u, 80)?);
    }
    Ok(map)
}

/// A spelled-out reading of "fully qualified domain name", to check `is_fqdn` against.
fn looks_like_fqdn(name: &str) -> bool {
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn check(data: &[u8]) -> Result<()> {
    let key = kubekms_fuzz::material();
    let mut u = Unstructured::new(data);
    let mode = u.arbitrary::<u8>()?;
    let id = KeyVersionId::new(UID, u.int_in_range(1..=u32::MAX)?);
    let ann = if u.arbitrary::<bool>()? { annotations_for("ns/key") } else { annotations(&mut u)? };
    for k in ann.keys() {
        assert_eq!(is_fqdn(k), looks_like_fqdn(k), "{k:?}");
    }
    if check_annotations(&ann).is_ok() {
        assert!(ann.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_ANNOTATIONS_LEN);
        assert!(ann.keys().all(|k| is_fqdn(k)));
    }
    if mode % 2 == 0 {
        // Raw bytes: the structure check bounds what the plugin passes on, and unwrapping
        // anything returns. ("Never authentic" cannot be asserted here: in 12 M executions
        // libFuzzer learned a valid AES-GCM tag from the comparison feedback its
        // instrumentation gives inside this process — an oracle no caller has. That a
        // changed byte of a genuine ciphertext fails is asserted below.)
        let raw = u.take_rest();
        if check_ciphertext(raw, &id).is_ok() {
            assert!(raw.len() <= MAX_CIPHERTEXT_LEN);
        }
        let _ = unwrap(&key, &id, &ann, raw);
        return Ok(());
    }
    let plaintext = kubekms_fuzz::bytes(&mut u, MAX_PLAINTEXT_LEN)?;
    let ct = wrap(&key, &id, &ann, &plaintext).expect("wrap");
    assert!(ct.len() <= MAX_CIPHERTEXT_LEN);
    if !plaintext.is_empty() {
        check_ciphertext(&ct, &id).expect("a genuine ciphertext's structure");
    }
    assert_eq!(unwrap(&key, &id, &ann, &ct).expect("round trip").expose(), plaintext.as_slice());
    let (index, mask) = (u.arbitrary::<usize>()?, u.arbitrary::<u8>()?);
    let tampered = kubekms_fuzz::flipped(&ct, index, mask);
    assert!(
        check_ciphertext(&tampered, &id).is_err() || unwrap(&key, &id, &ann, &tampered).is_err(),
        "a changed byte went unnoticed"
    );
    let other = KeyVersionId::new(UID, id.version.wrapping_add(1).max(1));
    assert!(check_ciphertext(&ct, &other).is_err() || unwrap(&key, &other, &ann, &ct).is_err());
    let mut changed = ann.clone();
    match changed.iter_mut().next() {
        Some((_, v)) => v.push(mask),
        None => {
            changed.insert("a.b".into(), Vec::new());
        }
    }
    assert!(unwrap(&key, &id, &changed, &ct).is_err(), "changed annotations went unnoticed");
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    let key = kubekms_fuzz::material();
    let id = KeyVersionId::new(UID, 1);
    let ct = wrap(&key, &id, &annotations_for("ns/key"), &[7; 32]).expect("wrap");
    // Its tag off by one bit: a genuine one would unwrap, in the raw mode that asserts
    // nothing does.
    let ct = kubekms_fuzz::flipped(&ct, ct.len() - 1, 1);
    // Raw mode with the key's own annotations and a well-formed ciphertext; structured
    // inputs.
    let mut raw = vec![0, 0, 0, 0, 0, 1];
    raw.extend_from_slice(&ct);
    vec![raw, vec![1; 64], vec![3, 0, 0, 0, 9, 0, 2, 12, b'k', b'.', b'e'], (0..=255).collect()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
