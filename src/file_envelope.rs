//! The file format of `kubekms encrypt` / `kubekms decrypt`: a data key from
//! GenerateDataKey encrypts a stream of any size in chunks, in constant memory.
//!
//! ```text
//! header:  "KKMS" | 0x01 | u32 blob length | blob (the data key wrapped by the KMS key)
//!          | u32 context length | context (canonical JSON) | u32 chunk size | salt (32)
//! chunks:  AES-256-GCM(file key, nonce = chunk index (u64) | 0 0 0 | last flag, aad = SHA-256(header))
//! ```
//!
//! The file key is HKDF-SHA256(data key, salt, "kubekms/v1 file"). Every chunk but the last
//! holds exactly `chunk size` bytes of plaintext; the last (possibly empty) one is flagged,
//! so truncation, reordering, dropped or appended chunks and any change to the header all
//! fail authentication.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::SecretBytes;

const MAGIC: &[u8; 4] = b"KKMS";
const FORMAT_V1: u8 = 0x01;
const FILE_KEY_INFO: &[u8] = b"kubekms/v1 file";
const TAG_LEN: usize = 16;
/// The default plaintext bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
/// The largest chunk a reader accepts (bounds its memory).
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;
const MAX_BLOB: u32 = 16 * 1024;
const MAX_CONTEXT: u32 = 64 * 1024;

/// Why a stream could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("failed to read the input")]
    Read(#[source] std::io::Error),
    #[error("failed to write the output")]
    Write(#[source] std::io::Error),
    #[error("the input is not a kubekms encrypted file")]
    NotOurs,
    #[error("the file uses format version {0}, which this kubekms does not know")]
    UnknownVersion(u8),
    #[error("the file header is malformed: {0}")]
    Header(&'static str),
    #[error("the file is corrupt, truncated or tampered with (chunk {0} failed authentication)")]
    Chunk(u64),
    #[error("the file is truncated: it ends without its final chunk")]
    Truncated,
    #[error("failed to read random bytes from the operating system")]
    Random,
    #[error("the data key is not 32 bytes")]
    DataKey,
}

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The data key, wrapped by the KMS key (a key API ciphertext blob).
    pub blob: Vec<u8>,
    /// The encryption context the data key is bound to.
    pub context: BTreeMap<String, String>,
    pub chunk_size: u32,
    salt: [u8; 32],
}

impl Header {
    pub fn new(
        blob: Vec<u8>,
        context: BTreeMap<String, String>,
        chunk_size: u32,
    ) -> Result<Header, FileError> {
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt).map_err(|_| FileError::Random)?;
        Ok(Header { blob, context, chunk_size, salt })
    }

    fn encode(&self) -> Vec<u8> {
        // BTreeMap serializes in key order: one encoding per context.
        let context = serde_json::to_vec(&self.context).unwrap_or_default();
        let mut out = Vec::with_capacity(64 + self.blob.len() + context.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_V1);
        out.extend_from_slice(&(self.blob.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.blob);
        out.extend_from_slice(&(context.len() as u32).to_be_bytes());
        out.extend_from_slice(&context);
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out
    }

    /// Reads a header from the front of `input`; returns it and its exact bytes.
    pub fn read(input: &mut impl Read) -> Result<(Header, Vec<u8>), FileError> {
        let mut raw = Vec::new();
        let mut take = |n: usize, raw: &mut Vec<u8>| -> Result<Vec<u8>, FileError> {
            let mut buf = vec![0u8; n];
            input.read_exact(&mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FileError::Header("the file ends inside its header"),
                _ => FileError::Read(e),
            })?;
            raw.extend_from_slice(&buf);
            Ok(buf)
        };
        let u32_of = |b: Vec<u8>| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let magic = take(4, &mut raw).map_err(|e| match e {
            FileError::Header(_) => FileError::NotOurs,
            other => other,
        })?;
        if magic != MAGIC {
            return Err(FileError::NotOurs);
        }
        let version = take(1, &mut raw)?[0];
        if version != FORMAT_V1 {
            return Err(FileError::UnknownVersion(version));
        }
        let blob_len = u32_of(take(4, &mut raw)?);
        if blob_len == 0 || blob_len > MAX_BLOB {
            return Err(FileError::Header("the wrapped data key has an impossible length"));
        }
        let blob = take(blob_len as usize, &mut raw)?;
        let context_len = u32_of(take(4, &mut raw)?);
        if context_len > MAX_CONTEXT {
            return Err(FileError::Header("the encryption context is too long"));
        }
        let context_bytes = take(context_len as usize, &mut raw)?;
        let context: BTreeMap<String, String> = serde_json::from_slice(&context_bytes)
            .map_err(|_| FileError::Header("the encryption context is not a JSON object of strings"))?;
        let chunk_size = u32_of(take(4, &mut raw)?);
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(FileError::Header("the chunk size is out of range"));
        }
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&take(32, &mut raw)?);
        let header = Header { blob, context, chunk_size, salt };
        if header.encode() != raw {
            return Err(FileError::Header("the header is not in canonical form"));
        }
        Ok((header, raw))
    }
}

struct ChunkCipher {
    aead: Aes256Gcm,
    aad: [u8; 32],
}

impl ChunkCipher {
    fn new(data_key: &SecretBytes, header: &Header, header_bytes: &[u8]) -> Result<Self, FileError> {
        if data_key.len() != 32 {
            return Err(FileError::DataKey);
        }
        let mut file_key = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(&header.salt), data_key.expose())
            .expand(FILE_KEY_INFO, file_key.as_mut())
            .map_err(|_| FileError::DataKey)?;
        let aead = Aes256Gcm::new_from_slice(file_key.as_ref()).map_err(|_| FileError::DataKey)?;
        Ok(ChunkCipher { aead, aad: Sha256::digest(header_bytes).into() })
    }

    fn nonce(index: u64, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&index.to_be_bytes());
        n[11] = u8::from(last);
        Nonce::from(n)
    }

    fn seal(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), FileError> {
        let tag = self
            .aead
            .encrypt_inout_detached(&Self::nonce(index, last), &self.aad, buf.as_mut_slice().into())
            .map_err(|_| FileError::Chunk(index))?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    fn open(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), FileError> {
        let split = buf.len().checked_sub(TAG_LEN).ok_or(FileError::Chunk(index))?;
        let tag = Tag::try_from(&buf[split..]).map_err(|_| FileError::Chunk(index))?;
        buf.truncate(split);
        self.aead
            .decrypt_inout_detached(&Self::nonce(index, last), &self.aad, buf.as_mut_slice().into(), &tag)
            .map_err(|_| FileError::Chunk(index))
    }
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn fill(input: &mut (impl Read + ?Sized), buf: &mut [u8]) -> Result<usize, FileError> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileError::Read(e)),
        }
    }
    Ok(n)
}

/// How much a decrypting buffer grows at a time.
const READ_STEP: usize = 64 * 1024;

/// Reads into `buf` until it holds `limit` bytes or the input ends, growing it only as the
/// input provides bytes: a header may ask for chunks of up to 16 MiB, and before the first
/// chunk authenticates that header is only a claim, so it must not cost memory the file does
/// not back.
fn fill_up_to(input: &mut (impl Read + ?Sized), buf: &mut Vec<u8>, limit: usize) -> Result<usize, FileError> {
    buf.clear();
    while buf.len() < limit {
        let start = buf.len();
        let want = (limit - start).min(READ_STEP);
        buf.resize(start + want, 0);
        let n = fill(input, &mut buf[start..])?;
        buf.truncate(start + n);
        if n < want {
            break;
        }
    }
    Ok(buf.len())
}

/// Encrypts `input` to `output` with `data_key` (32 bytes, from GenerateDataKey).
/// Returns the number of plaintext bytes.
pub fn encrypt(
    data_key: &SecretBytes,
    header: &Header,
    input: &mut (impl Read + ?Sized),
    output: &mut (impl Write + ?Sized),
) -> Result<u64, FileError> {
    let header_bytes = header.encode();
    let cipher = ChunkCipher::new(data_key, header, &header_bytes)?;
    output.write_all(&header_bytes).map_err(FileError::Write)?;
    let size = header.chunk_size as usize;
    // Two buffers: the chunk being sealed and the one read ahead to learn whether it is the
    // last. Plaintext buffers are wiped on drop.
    let mut current = Zeroizing::new(vec![0u8; size]);
    let mut next = Zeroizing::new(vec![0u8; size]);
    let mut current_len = fill(input, &mut current)?;
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        let next_len = if current_len == size { fill(input, &mut next)? } else { 0 };
        let last = next_len == 0;
        let mut chunk = Zeroizing::new(Vec::with_capacity(current_len + TAG_LEN));
        chunk.extend_from_slice(&current[..current_len]);
        cipher.seal(index, last, &mut chunk)?;
        output.write_all(&chunk).map_err(FileError::Write)?;
        total += current_len as u64;
        if last {
            break;
        }
        std::mem::swap(&mut current, &mut next);
        current_len = next_len;
        index += 1;
    }
    output.flush().map_err(FileError::Write)?;
    Ok(total)
}

/// Decrypts the chunks that follow a header already read (with [`Header::read`]) and
/// writes each only after it authenticated. Fails — having written only authenticated
/// chunks — if the stream was truncated, reordered, extended or altered. (Reads fill each
/// chunk buffer until it is full or the input ends, so bytes appended after the final
/// chunk shift the chunk boundaries and fail authentication.)
pub fn decrypt(
    data_key: &SecretBytes,
    header: &Header,
    header_bytes: &[u8],
    input: &mut (impl Read + ?Sized),
    output: &mut (impl Write + ?Sized),
) -> Result<u64, FileError> {
    let cipher = ChunkCipher::new(data_key, header, header_bytes)?;
    let size = header.chunk_size as usize + TAG_LEN;
    // Ciphertext: nothing to wipe; each holds what the input gave, at most one chunk.
    let mut current = Vec::new();
    let mut next = Vec::new();
    let mut current_len = fill_up_to(input, &mut current, size)?;
    if current_len < TAG_LEN {
        return Err(FileError::Truncated);
    }
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        let next_len = if current_len == size { fill_up_to(input, &mut next, size)? } else { 0 };
        let last = next_len == 0;
        let mut chunk = Zeroizing::new(current[..current_len].to_vec());
        if cipher.open(index, last, &mut chunk).is_err() {
            // A full chunk that fails as the last one may be an early chunk whose
            // successors were cut off: say so.
            let mut probe = Zeroizing::new(current[..current_len].to_vec());
            return Err(if last && cipher.open(index, false, &mut probe).is_ok() {
                FileError::Truncated
            } else {
                FileError::Chunk(index)
            });
        }
        output.write_all(&chunk).map_err(FileError::Write)?;
        total += chunk.len() as u64;
        if last {
            break;
        }
        if next_len < TAG_LEN {
            return Err(FileError::Truncated);
        }
        std::mem::swap(&mut current, &mut next);
        current_len = next_len;
        index += 1;
    }
    output.flush().map_err(FileError::Write)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key() -> SecretBytes {
        SecretBytes::new(vec![9u8; 32])
    }

    fn seal_file(plain: &[u8], chunk: u32) -> Vec<u8> {
        let header =
            Header::new(vec![1, 2, 3], [("tenant".to_owned(), "acme".to_owned())].into(), chunk).unwrap();
        let mut out = Vec::new();
        encrypt(&key(), &header, &mut &plain[..], &mut out).unwrap();
        out
    }

    fn open_file(file: &[u8]) -> Result<Vec<u8>, FileError> {
        let mut input = file;
        let (header, raw) = Header::read(&mut input)?;
        let mut out = Vec::new();
        decrypt(&key(), &header, &raw, &mut input, &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        for len in [0usize, 1, 15, 16, 17, 32, 33, 100] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let file = seal_file(&plain, 16);
            assert_eq!(open_file(&file).unwrap(), plain, "length {len}");
            let (h, _) = Header::read(&mut &file[..]).unwrap();
            assert_eq!(h.context["tenant"], "acme");
        }
    }

    #[test]
    fn a_claimed_chunk_size_costs_only_the_bytes_the_input_gives() {
        let mut buf = Vec::new();
        let n = fill_up_to(&mut &[5u8; 100][..], &mut buf, MAX_CHUNK as usize + TAG_LEN).unwrap();
        assert_eq!((n, buf.as_slice()), (100, &[5u8; 100][..]));
        assert!(buf.capacity() <= READ_STEP, "capacity {}", buf.capacity());
        // Exactly the limit, across several steps, and nothing past it.
        let input: Vec<u8> = (0..3 * READ_STEP + 7).map(|i| i as u8).collect();
        let mut reader = &input[..];
        assert_eq!(fill_up_to(&mut reader, &mut buf, 2 * READ_STEP + 3).unwrap(), 2 * READ_STEP + 3);
        assert_eq!(buf, input[..2 * READ_STEP + 3]);
        assert_eq!(fill_up_to(&mut reader, &mut buf, 2 * READ_STEP + 3).unwrap(), READ_STEP + 4);
        assert_eq!(buf, input[2 * READ_STEP + 3..]);
        assert_eq!(fill_up_to(&mut reader, &mut buf, 10).unwrap(), 0);
    }

    #[test]
    fn truncation_reordering_appending_and_tampering_fail() {
        let plain: Vec<u8> = (0..80u8).collect();
        let file = seal_file(&plain, 16);
        let (_, raw) = Header::read(&mut &file[..]).unwrap();
        let h = raw.len();
        let c = 16 + TAG_LEN;
        // 80 bytes in chunks of 16: five chunks, the fifth flagged last. Dropping it (cutting
        // exactly at a chunk boundary) is truncation.
        assert_eq!(file.len(), h + 5 * c);
        let cut = &file[..h + 4 * c];
        assert!(matches!(open_file(cut), Err(FileError::Truncated)), "{:?}", open_file(cut).err());
        // Cutting anywhere fails.
        for n in 0..file.len() {
            assert!(open_file(&file[..n]).is_err(), "cut at {n}");
        }
        // Swapping two chunks fails.
        let mut swapped = file.clone();
        swapped[h..h + c].copy_from_slice(&file[h + c..h + 2 * c]);
        swapped[h + c..h + 2 * c].copy_from_slice(&file[h..h + c]);
        assert!(matches!(open_file(&swapped), Err(FileError::Chunk(0))));
        // Appending anything fails.
        let mut appended = file.clone();
        appended.extend_from_slice(&[0u8; 40]);
        assert!(open_file(&appended).is_err());
        // Any change anywhere fails.
        for i in 0..file.len() {
            let mut t = file.clone();
            t[i] ^= 1;
            assert!(open_file(&t).is_err(), "flip at {i}");
        }
        // A wrong data key fails.
        let mut input = &file[..];
        let (header, raw) = Header::read(&mut input).unwrap();
        let mut out = Vec::new();
        let wrong = SecretBytes::new(vec![8u8; 32]);
        assert!(decrypt(&wrong, &header, &raw, &mut input, &mut out).is_err());
        assert!(out.is_empty(), "nothing unauthenticated is written");
    }

    #[test]
    fn foreign_input_is_named() {
        assert!(matches!(open_file(b"hello world"), Err(FileError::NotOurs)));
        assert!(matches!(open_file(b""), Err(FileError::NotOurs)));
        assert!(matches!(open_file(b"KKMS\x02"), Err(FileError::UnknownVersion(2))));
        assert!(matches!(open_file(b"KKMS\x01\x00\x00\x00\x00"), Err(FileError::Header(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_decrypt(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut with_magic = b"KKMS\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            prop_assert!(open_file(&bytes).is_err());
            prop_assert!(open_file(&with_magic).is_err());
        }

        #[test]
        fn round_trip_any_length(plain in proptest::collection::vec(any::<u8>(), 0..200), chunk in 1u32..40) {
            prop_assert_eq!(open_file(&seal_file(&plain, chunk)).unwrap(), plain);
        }
    }
}
