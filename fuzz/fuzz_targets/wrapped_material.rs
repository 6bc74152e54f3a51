//! Key version material wrapped by the root key (a file root key's format, as stored in a
//! KmsKeyMaterial and in the plugin's cache). Properties: unwrapping any bytes returns;
//! genuine material unwraps to itself for its key and version only, and any one changed
//! byte makes it fail.
#![no_main]

use kubekms::crypto::{KeyMaterial, WrapContext};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const KEY_ID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";

fn check(data: &[u8]) -> Result<()> {
    let root = kubekms_fuzz::root();
    let mut u = Unstructured::new(data);
    let mode = u.arbitrary::<u8>()?;
    let key_id = if u.arbitrary()? { KEY_ID.to_owned() } else { kubekms_fuzz::string(&mut u, 40)? };
    let ctx = WrapContext { key_id: &key_id, version: u.arbitrary()? };
    if mode % 2 == 0 {
        // Not "never unwraps": libFuzzer's comparison feedback inside this process can teach it a valid tag (it did, for the plugin's ciphertext, after 12 M executions) — an oracle no caller has. That a changed byte of genuine material fails is
        // asserted below.
        let _ = root.unwrap(u.take_rest(), ctx);
        return Ok(());
    }
    let material = KeyMaterial::from_slice(&u.arbitrary::<[u8; 32]>()?).expect("32 bytes");
    let wrapped = root.wrap(&material, ctx).expect("wrap");
    assert!(root.unwrap(&wrapped, ctx).expect("round trip").ct_eq(&material));
    let tampered = kubekms_fuzz::flipped(&wrapped, u.arbitrary()?, u.arbitrary()?);
    assert!(root.unwrap(&tampered, ctx).is_err(), "a changed byte went unnoticed");
    let other_version = WrapContext { version: ctx.version.wrapping_add(1), ..ctx };
    assert!(root.unwrap(&wrapped, other_version).is_err(), "material moved to another version");
    let other_key = format!("{key_id}x");
    let other_key = WrapContext { key_id: &other_key, ..ctx };
    assert!(root.unwrap(&wrapped, other_key).is_err(), "material moved to another key");
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    vec![vec![0; 70], vec![1; 80], (0..=255).collect()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
