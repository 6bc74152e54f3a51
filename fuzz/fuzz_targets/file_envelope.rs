//! The `kubekms encrypt` file format, read by `kubekms decrypt` as a stream. Properties:
//! a header that reads is canonical (its bytes are the front of the input and read back
//! alike) and within bounds; a file the fuzzer makes decrypts only if it is byte for byte
//! the encryption of what it decrypts to (a genuine seed, unchanged); a genuine file, read in pieces of any size, decrypts to its plaintext, and
//! any change to it (a flipped byte, a cut, bytes appended, chunks dropped or swapped)
//! fails — having written only whole, authenticated chunks, a prefix of the plaintext,
//! and nothing at all when the header was changed.
#![no_main]

use std::io::Read;

use kubekms::crypto::SecretBytes;
use kubekms::file_envelope::{Header, MAX_CHUNK, decrypt, encrypt};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// A reader that hands out at most `piece` bytes per read, as a pipe may.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn data_key() -> SecretBytes {
    SecretBytes::new(vec![0x44; 32])
}

/// Reads and decrypts `file` in pieces of `piece` bytes; returns the outcome, what was
/// written and the header, if it read.
fn open(file: &[u8], piece: usize) -> (bool, Vec<u8>, Option<Header>) {
    let mut input = Pieces { data: file, piece };
    let mut out = Vec::new();
    let Ok((header, raw)) = Header::read(&mut input) else { return (false, out, None) };
    assert_eq!(raw.as_slice(), &file[..raw.len()], "the header's bytes are the front of the file");
    assert!(header.chunk_size >= 1 && header.chunk_size <= MAX_CHUNK && !header.blob.is_empty());
    let (again, raw_again) = Header::read(&mut raw.as_slice()).expect("a header reads back");
    assert_eq!((again, raw_again.as_slice()), (header.clone(), raw.as_slice()));
    let ok = decrypt(&data_key(), &header, &raw, &mut input, &mut out).is_ok();
    assert!(out.len() % header.chunk_size as usize == 0 || ok, "only whole chunks are written");
    (ok, out, Some(header))
}

fn check(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let mode = u.arbitrary::<u8>()?;
    let piece = u.int_in_range(1..=64)?;
    if mode % 2 == 0 {
        let file = u.take_rest();
        if let (true, out, Some(header)) = open(file, piece) {
            let mut again = Vec::new();
            encrypt(&data_key(), &header, &mut out.as_slice(), &mut again).expect("encrypt");
            assert_eq!(again, file, "a file that decrypts is the encryption of its plaintext");
        }
        return Ok(());
    }
    let chunk = u.int_in_range(1..=48)?;
    let context = kubekms_fuzz::string_map(&mut u, 2, 12)?;
    let blob = [&[1u8][..], &kubekms_fuzz::bytes(&mut u, 40)?].concat();
    let plaintext = kubekms_fuzz::bytes(&mut u, 400)?;
    let header = Header::new(blob, context, chunk).expect("a header");
    let mut file = Vec::new();
    encrypt(&data_key(), &header, &mut plaintext.as_slice(), &mut file).expect("encrypt");
    let (ok, out, _) = open(&file, piece);
    assert!(ok && out == plaintext, "a genuine file decrypts to its plaintext");

    let header_len = Header::read(&mut file.as_slice()).expect("the header").1.len();
    let sealed = chunk as usize + 16;
    let chunks = (file.len() - header_len).div_ceil(sealed);
    let at = u.arbitrary::<usize>()?;
    let changed: Vec<u8> = match u.int_in_range(0..=4)? {
        0 => kubekms_fuzz::flipped(&file, at, u.arbitrary()?),
        1 => file[..at % file.len()].to_vec(),
        2 => {
            let mut extra = kubekms_fuzz::bytes(&mut u, 64)?;
            extra.push(u.arbitrary()?);
            [&file[..], &extra].concat()
        }
        3 => {
            let drop = at % chunks;
            let start = header_len + drop * sealed;
            [&file[..start], &file[(start + sealed).min(file.len())..]].concat()
        }
        _ => {
            let (a, b) = (at % chunks, u.arbitrary::<usize>()? % chunks);
            let piece =
                |i: usize| &file[header_len + i * sealed..(header_len + (i + 1) * sealed).min(file.len())];
            let mut out = file[..header_len].to_vec();
            for i in 0..chunks {
                out.extend_from_slice(piece(if i == a {
                    b
                } else if i == b {
                    a
                } else {
                    i
                }));
            }
            out
        }
    };
    let (ok, out, _) = open(&changed, piece);
    if changed == file {
        assert!(ok && out == plaintext);
        return Ok(());
    }
    assert!(!ok, "a changed file decrypted");
    assert!(plaintext.starts_with(&out), "only plaintext of the genuine file is written");
    let header_changed = changed.len() < header_len || changed[..header_len] != file[..header_len];
    assert!(!header_changed || out.is_empty(), "nothing is written under a changed header");
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    let header = Header::new(vec![1, 2, 3], [("tenant".into(), "acme".into())].into(), 16).expect("header");
    let mut file = Vec::new();
    encrypt(&data_key(), &header, &mut &[7u8; 40][..], &mut file).expect("encrypt");
    vec![
        [&[0u8, 63][..], &file].concat(),
        [&[0u8, 0][..], b"KKMS\x01\x00\x00\x00\x03abc\x00\x00\x00\x02{}\x00\x00\x00\x10"].concat(),
        vec![1; 120],
        (0..=255).collect(),
    ]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
