//! The canonical encoding of an encryption context (bound as associated data into every
//! key API blob) and of the plugin's annotations. Properties: it is unambiguous — a small
//! independent reader recovers exactly the map from its encoding, with nothing left over,
//! so two different maps never encode alike — and a blob sealed under one context opens
//! under another only when the two are equal.
#![no_main]

use std::collections::BTreeMap;

use kubekms::crypto::canonical_map;
use kubekms::server::blob::{open_blob, seal_blob};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Reads the encoding back: a u32 count, then length-prefixed keys and values.
fn read(mut bytes: &[u8]) -> Option<BTreeMap<String, String>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (bytes.get(..n)?, bytes.get(n..)?);
        *bytes = tail;
        Some(head)
    }
    fn u32_of(bytes: &mut &[u8]) -> Option<usize> {
        let b = take(bytes, 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn string(bytes: &mut &[u8]) -> Option<String> {
        let n = u32_of(bytes)?;
        String::from_utf8(take(bytes, n)?.to_vec()).ok()
    }
    let count = u32_of(&mut bytes)?;
    let mut map = BTreeMap::new();
    let mut last: Option<String> = None;
    for _ in 0..count {
        let (k, v) = (string(&mut bytes)?, string(&mut bytes)?);
        // Keys come in strictly increasing order: one encoding per map.
        assert!(last.as_ref().is_none_or(|l| *l < k), "keys out of order");
        last = Some(k.clone());
        map.insert(k, v);
    }
    bytes.is_empty().then_some(map)
}

fn check(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let a = kubekms_fuzz::string_map(&mut u, 6, 24)?;
    let b = if u.arbitrary::<bool>()? {
        kubekms_fuzz::string_map(&mut u, 6, 24)?
    } else {
        // A near miss: a boundary moved between a key and its value, or one pair dropped.
        let mut b = a.clone();
        if let Some((k, v)) = a.iter().next() {
            b.remove(k);
            if u.arbitrary::<bool>()? && !k.is_empty() {
                let cut = k.char_indices().last().map_or(0, |(i, _)| i);
                b.insert(k[..cut].to_owned(), format!("{}{v}", &k[cut..]));
            }
        }
        b
    };
    let (ea, eb) = (canonical_map(&a), canonical_map(&b));
    assert_eq!(read(&ea).as_ref(), Some(&a), "the encoding reads back as the map");
    assert_eq!(ea == eb, a == b, "two maps encode alike exactly when they are equal");
    let key = kubekms_fuzz::material();
    let blob = seal_blob(&key, &uuid::Uuid::nil(), 1, &a, b"x").expect("seal");
    assert_eq!(open_blob(&key, &b, &blob).is_ok(), a == b, "a blob opens only under its own context");
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    vec![vec![0; 8], vec![1; 40], vec![2, 3, 1, b'a', 1, b'b', 0, 2, b'a', b'b', 0], (0..=255).collect()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
