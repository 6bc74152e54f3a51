//! What the fuzz targets share: fixed keys, small builders of structured inputs, and the
//! writer of each target's seed corpus.
//!
//! A target writes its own seeds (`KUBEKMS_FUZZ_SEEDS=DIR <target binary>` writes them into
//! DIR and exits; `fuzz/run.sh seeds` does it for every target), so the committed corpus is
//! made of genuine samples of the format each target reads, under the keys below.

use std::collections::BTreeMap;

use kubekms::crypto::{KeyMaterial, RootKey};
use libfuzzer_sys::arbitrary::{Result, Unstructured};

/// The key version material of the targets (fixed, so that seeds stay valid).
pub fn material() -> KeyMaterial {
    KeyMaterial::from_slice(&[0x5a; 32]).expect("32 bytes")
}

/// The root key of the targets.
pub fn root() -> RootKey {
    RootKey::from_material(KeyMaterial::from_slice(&[0x3c; 32]).expect("32 bytes"))
}

/// A string of at most `max` bytes.
pub fn string(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let len = u.int_in_range(0..=max)?;
    let bytes = u.bytes(len.min(u.len()))?;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Bytes, at most `max`.
pub fn bytes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let len = u.int_in_range(0..=max)?;
    Ok(u.bytes(len.min(u.len()))?.to_vec())
}

/// A string map of at most `pairs` pairs, keys and values of at most `len` bytes each.
pub fn string_map(u: &mut Unstructured<'_>, pairs: usize, len: usize) -> Result<BTreeMap<String, String>> {
    let n = u.int_in_range(0..=pairs)?;
    let mut map = BTreeMap::new();
    for _ in 0..n {
        map.insert(string(u, len)?, string(u, len)?);
    }
    Ok(map)
}

/// `data` with the byte at `index` (modulo its length) XORed with a non-zero `mask`.
pub fn flipped(data: &[u8], index: usize, mask: u8) -> Vec<u8> {
    let mut out = data.to_vec();
    if !out.is_empty() {
        let i = index % out.len();
        out[i] ^= mask.max(1);
    }
    out
}

/// Writes `seeds()` into `$KUBEKMS_FUZZ_SEEDS` and exits, when that variable is set; call it
/// from a target's `init`.
pub fn write_seeds_if_asked(seeds: impl FnOnce() -> Vec<Vec<u8>>) {
    let Some(dir) = std::env::var_os("KUBEKMS_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the seed directory");
    for (i, seed) in seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), seed).expect("write a seed");
    }
    std::process::exit(0);
}

/// A seed for a target that reads its input with [`Unstructured`]: a mode byte, then `rest`.
pub fn seed(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(rest);
    out
}
