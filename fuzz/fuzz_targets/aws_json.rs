//! The AWS JSON 1.1 request decoder (every KMS operation's body) and the `KeyId` forms it
//! reads. Properties: a refused body is the caller's fault (HTTP 400) with an AWS error
//! body, and a body that is not the request's JSON is refused with a message that says
//! where it went wrong and nothing of what it held; a `KeyId` that parses is one kubekms can hold (a lowercase
//! UUID, an alias name of the CRD's alphabet, or exactly `namespace/name`).
#![no_main]

use kubekms::server::aws::ops::{OPERATIONS, decode_request};
use kubekms::server::aws::protocol::KeyName;
use libfuzzer_sys::fuzz_target;

const REGION: &str = "us-east-1";

fn check_key_name(value: &str) {
    match KeyName::parse(value, REGION) {
        Ok(KeyName::Id { key_id, namespace }) => {
            assert!(uuid::Uuid::try_parse(&key_id).is_ok() && key_id == key_id.to_ascii_lowercase());
            assert!(namespace.is_none_or(|n| !n.is_empty()));
        }
        Ok(KeyName::Alias { name, .. }) => {
            assert!(!name.is_empty() && name.len() <= 250);
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
        Ok(KeyName::Name(name)) => {
            let (ns, key) = name.split_once('/').expect("namespace/name");
            assert!(!ns.is_empty() && !key.is_empty() && !key.contains('/'));
        }
        Err(fault) => assert_eq!(fault.status, 400),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let bodies: &[(u8, &str)] = &[
        (0, r#"{"KeyId":"alias/app","Plaintext":"aGVsbG8=","EncryptionContext":{"tenant":"acme"}}"#),
        (1, r#"{"CiphertextBlob":"AQID","EncryptionContext":{"a":"b"},"KeyId":"ns/key"}"#),
        (
            2,
            r#"{"CiphertextBlob":"AQID","DestinationKeyId":"arn:aws:kms:us-east-1:ns:key/6ece15cd-0195-4985-aff9-395763ad0a3b"}"#,
        ),
        (3, r#"{"KeyId":"6ece15cd-0195-4985-aff9-395763ad0a3b","KeySpec":"AES_256","DryRun":true}"#),
        (5, r#"{"NumberOfBytes":32,"Recipient":{"AttestationDocument":"AA=="}}"#),
        (9, r#"{"KeyId":"arn:aws:kms:us-east-1:ns:alias/app","Limit":10,"Marker":"x"}"#),
        (
            10,
            r#"{"KeyId":"ns/key","GranteePrincipal":"arn:aws:iam::ns:role/web","Operations":["Decrypt"],"Constraints":{"EncryptionContextSubset":{"a":"b"}}}"#,
        ),
        (11, r#"{"GrantId":"g","KeyId":"ns/key"}"#),
        (0, r#"{"Plaintext":"not base64!","KeyId":1}"#),
    ];
    bodies.iter().map(|(op, body)| kubekms_fuzz::seed(*op, body.as_bytes())).collect()
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let Some((&op, body)) = data.split_first() else { return };
    if let Ok(s) = std::str::from_utf8(body) {
        check_key_name(s);
    }
    let op = OPERATIONS[usize::from(op) % OPERATIONS.len()];
    let Err(fault) = decode_request(op, body) else { return };
    assert_eq!(fault.status, 400, "{op}: {fault:?}");
    let answer: serde_json::Value = serde_json::from_slice(&fault.body()).expect("an AWS error body");
    assert_eq!(answer["__type"], fault.code);
    if fault.code == "SerializationException" {
        // Exactly "failed to read the request body (<category> at line <n> column <n>)".
        let shown = fault.message.strip_prefix("failed to read the request body (").expect("the message");
        let shown = shown.strip_suffix(')').expect("the message");
        let words: Vec<&str> = shown.split(' ').collect();
        let [category, "at", "line", line, "column", column] = words[..] else {
            panic!("{op}: the fault says more than where: {:?}", fault.message)
        };
        assert!(["Io", "Syntax", "Data", "Eof"].contains(&category), "{category}");
        assert!(line.parse::<usize>().is_ok() && column.parse::<usize>().is_ok());
    } else {
        assert!(!fault.message.contains(String::from_utf8_lossy(body).as_ref()) || body.len() < 8);
    }
});
