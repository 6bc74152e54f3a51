//! The etcd value `kubekms envelope` reads: `k8s:enc:kms:v2:<provider>:` and an
//! EncryptedObject. Properties: what parses starts with the prefix and names a provider
//! without a colon; an EncryptedObject kube-apiserver would store parses back to what it
//! holds (with or without the newline `etcdctl` prints after it).
#![no_main]

use kubekms::envelope::parse;
use kubekms::proto::kmsv2::EncryptedObject;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const PREFIX: &[u8] = b"k8s:enc:kms:v2:";

fn check(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    if u.arbitrary::<u8>()? % 2 == 0 {
        let raw = u.take_rest();
        if let Ok(e) = parse(raw) {
            assert!(raw.starts_with(PREFIX) && !e.provider.contains(':'));
            assert!(e.encrypted_dek_source_bytes + e.encrypted_data_bytes <= raw.len());
        }
        return Ok(());
    }
    let provider: String = kubekms_fuzz::string(&mut u, 20)?.replace(':', "");
    let n = u.int_in_range(0..=3)?;
    let mut annotations = std::collections::HashMap::new();
    for _ in 0..n {
        annotations.insert(kubekms_fuzz::string(&mut u, 30)?, kubekms_fuzz::bytes(&mut u, 30)?);
    }
    let object = EncryptedObject {
        encrypted_data: kubekms_fuzz::bytes(&mut u, 200)?,
        key_id: kubekms_fuzz::string(&mut u, 60)?,
        encrypted_dek_source: kubekms_fuzz::bytes(&mut u, 100)?,
        annotations,
        encrypted_dek_source_type: u.int_in_range(0..=2)?,
    };
    let mut value = [PREFIX, provider.as_bytes(), b":"].concat();
    value.extend(object.encode_to_vec());
    if u.arbitrary()? {
        value.push(b'\n');
    }
    let e = parse(&value).expect("a stored value parses");
    assert_eq!((e.provider.as_str(), e.key_id.as_str()), (provider.as_str(), object.key_id.as_str()));
    assert_eq!(e.encrypted_data_bytes, object.encrypted_data.len());
    assert_eq!(e.encrypted_dek_source_bytes, object.encrypted_dek_source.len());
    assert_eq!(e.encrypted_dek_source_type, object.encrypted_dek_source_type().as_str_name());
    assert_eq!(e.annotations.len(), object.annotations.len());
    for (k, v) in &object.annotations {
        assert_eq!(e.annotations[k], String::from_utf8_lossy(v));
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    let object = EncryptedObject {
        encrypted_data: vec![1; 40],
        key_id: "kubekms:6ece15cd-0195-4985-aff9-395763ad0a3b:1".into(),
        encrypted_dek_source: vec![2; 85],
        annotations: [("key.kms.kubekms.io".to_owned(), b"ns/key".to_vec())].into(),
        encrypted_dek_source_type: 1,
    };
    let value = [&[0u8][..], PREFIX, b"kubekms:", &object.encode_to_vec(), b"\n"].concat();
    vec![value, vec![1; 60], (0..=255).collect()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
