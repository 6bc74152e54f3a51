//! Reading what kube-apiserver stored in etcd: `k8s:enc:kms:v2:<provider>:` followed by an
//! EncryptedObject. Used by `kubekms envelope` to show which key version protects a value.

use prost::Message;
use serde::Serialize;

use crate::proto::kmsv2::EncryptedObject;

const PREFIX: &[u8] = b"k8s:enc:kms:v2:";

/// What an etcd value says about its encryption (never the data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub provider: String,
    pub key_id: String,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub encrypted_dek_source_type: String,
    pub encrypted_dek_source_bytes: usize,
    pub encrypted_data_bytes: usize,
}

/// Why a value is not a KMS v2 envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the value is not encrypted by a KMS v2 provider (it does not start with k8s:enc:kms:v2:)")]
    NotKmsV2,
    #[error("the value has no provider name after k8s:enc:kms:v2:")]
    NoProvider,
    #[error("the value after the prefix is not an EncryptedObject")]
    Malformed,
}

/// Parses an etcd value. A single trailing newline (as `etcdctl --print-value-only`
/// prints) is ignored.
pub fn parse(value: &[u8]) -> Result<Envelope, EnvelopeError> {
    let rest = value.strip_prefix(PREFIX).ok_or(EnvelopeError::NotKmsV2)?;
    let colon = rest.iter().position(|b| *b == b':').ok_or(EnvelopeError::NoProvider)?;
    let provider = String::from_utf8_lossy(&rest[..colon]).into_owned();
    let body = &rest[colon + 1..];
    let object = EncryptedObject::decode(body)
        .or_else(|e| body.strip_suffix(b"\n").map_or(Err(e), EncryptedObject::decode))
        .map_err(|_| EnvelopeError::Malformed)?;
    Ok(Envelope {
        provider,
        key_id: object.key_id.clone(),
        annotations: object
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
        encrypted_dek_source_type: object.encrypted_dek_source_type().as_str_name().to_owned(),
        encrypted_dek_source_bytes: object.encrypted_dek_source.len(),
        encrypted_data_bytes: object.encrypted_data.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_kube_apiserver_stores() {
        let object = EncryptedObject {
            encrypted_data: vec![1; 40],
            key_id: "kubekms:k:1".into(),
            encrypted_dek_source: vec![2; 85],
            annotations: [("key.kms.kubekms.io".to_owned(), b"ns/k".to_vec())].into(),
            encrypted_dek_source_type: 1,
        };
        let mut value = b"k8s:enc:kms:v2:kubekms:".to_vec();
        value.extend(object.encode_to_vec());
        let e = parse(&value).unwrap();
        assert_eq!(e.provider, "kubekms");
        assert_eq!(e.key_id, "kubekms:k:1");
        assert_eq!(e.encrypted_dek_source_type, "HKDF_SHA256_XNONCE_AES_GCM_SEED");
        assert_eq!(e.annotations["key.kms.kubekms.io"], "ns/k");
        value.push(b'\n');
        assert_eq!(parse(&value).unwrap(), e);
        assert_eq!(parse(b"k8s:enc:aescbc:v1:x:..."), Err(EnvelopeError::NotKmsV2));
        assert_eq!(parse(b"{\"kind\":\"Secret\"}"), Err(EnvelopeError::NotKmsV2));
        assert_eq!(parse(b"k8s:enc:kms:v2:kubekms"), Err(EnvelopeError::NoProvider));
        assert_eq!(parse(b"k8s:enc:kms:v2:kubekms:\xff\xff\xff"), Err(EnvelopeError::Malformed));
    }
}
