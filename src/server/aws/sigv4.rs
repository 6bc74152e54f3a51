//! AWS Signature Version 4, verified as AWS verifies it: the `Authorization` header's
//! credential scope (access key id, date, region, service), the request's date within five
//! minutes, and the HMAC-SHA256 signature over the canonical request. Written from the
//! SigV4 specification (IAM user guide, "Create a signed AWS API request"); only the header
//! form is accepted (no presigned query strings, no chunked payloads, no SigV4a).
//!
//! [`Authorization::parse`] reads and checks everything that needs no secret; the caller
//! then finds the secret for the access key id (from the session token) and calls
//! [`Authorization::verify`].

use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::crypto::hex;

/// The only algorithm served.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's date may be from the server's clock, as AWS allows.
pub const MAX_SKEW_SECONDS: i64 = 5 * 60;
/// The header that carries a session token.
pub const SECURITY_TOKEN_HEADER: &str = "x-amz-security-token";

/// Why a signature is refused, each with the error code AWS answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// No `Authorization` header at all (`MissingAuthenticationTokenException`).
    #[error("Missing Authentication Token")]
    Missing,
    /// The header or the request is not a complete SigV4 signature
    /// (`IncompleteSignatureException`).
    #[error("{0}")]
    Incomplete(String),
    /// The signature, its scope or its date is wrong (`InvalidSignatureException`).
    #[error("{0}")]
    Invalid(String),
}

impl SigError {
    /// AWS's error code.
    pub fn code(&self) -> &'static str {
        match self {
            SigError::Missing => "MissingAuthenticationTokenException",
            SigError::Incomplete(_) => "IncompleteSignatureException",
            SigError::Invalid(_) => "InvalidSignatureException",
        }
    }
}

/// A parsed, scope- and date-checked `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `YYYYMMDD`, from the credential scope.
    pub date: String,
    pub region: String,
    pub service: String,
    /// Lowercase header names, as the client listed them.
    pub signed_headers: Vec<String>,
    /// The signature, decoded from hex.
    signature: Vec<u8>,
    /// `x-amz-date` as sent (`YYYYMMDDTHHMMSSZ`).
    amz_date: String,
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `YYYYMMDDTHHMMSSZ` as Unix seconds.
fn parse_amz_date(value: &str) -> Option<i64> {
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = value.get(r)?;
        s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok())?
    };
    let date = jiff::civil::Date::new(
        i16::try_from(digits(0..4)?).ok()?,
        i8::try_from(digits(4..6)?).ok()?,
        i8::try_from(digits(6..8)?).ok()?,
    )
    .ok()?;
    let time = jiff::civil::Time::new(
        i8::try_from(digits(9..11)?).ok()?,
        i8::try_from(digits(11..13)?).ok()?,
        i8::try_from(digits(13..15)?).ok()?,
        0,
    )
    .ok()?;
    Some(date.to_datetime(time).to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp().as_second())
}

/// Formats Unix seconds as `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(unix: i64) -> String {
    let t = Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH);
    t.strftime("%Y%m%dT%H%M%SZ").to_string()
}

impl Authorization {
    /// Reads the `Authorization` header and the request date from `headers` and checks the
    /// credential scope (`service`, `region`) and the date against `now` (Unix seconds).
    pub fn parse(headers: &http::HeaderMap, service: &str, region: &str, now: i64) -> Result<Self, SigError> {
        let incomplete = |m: &str| SigError::Incomplete(m.to_owned());
        let value = match headers.get(http::header::AUTHORIZATION) {
            None => return Err(SigError::Missing),
            Some(v) => v.to_str().map_err(|_| incomplete("Authorization header is not ASCII"))?,
        };
        let rest = value.strip_prefix(ALGORITHM).filter(|r| r.starts_with(' ')).ok_or_else(|| {
            incomplete(&format!("Unsupported AWS 'algorithm': only '{ALGORITHM}' is accepted"))
        })?;
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let part = part.trim();
            let (name, v) = part.split_once('=').ok_or_else(|| {
                incomplete(
                    "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters",
                )
            })?;
            match name {
                "Credential" => credential = Some(v),
                "SignedHeaders" => signed = Some(v),
                "Signature" => signature = Some(v),
                _ => {}
            }
        }
        let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
            return Err(incomplete(
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters",
            ));
        };
        let scope: Vec<&str> = credential.split('/').collect();
        let [access_key_id, date, cred_region, cred_service, terminator] = scope[..] else {
            return Err(incomplete(
                "Credential must have the form <access key id>/<date>/<region>/<service>/aws4_request",
            ));
        };
        if access_key_id.is_empty() || terminator != "aws4_request" {
            return Err(incomplete(
                "Credential must have the form <access key id>/<date>/<region>/<service>/aws4_request",
            ));
        }
        let signature = crate::crypto::unhex(signature)
            .filter(|s| s.len() == 32)
            .ok_or_else(|| incomplete("Signature must be 64 hexadecimal digits"))?;
        let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
        if signed_headers.iter().any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase())) {
            return Err(incomplete("SignedHeaders must be lowercase header names separated by ';'"));
        }
        if !signed_headers.iter().any(|h| h == "host") {
            return Err(incomplete("'Host' must be a 'SignedHeader' in the AWS Authorization."));
        }
        let amz_date = header(headers, "x-amz-date")
            .ok_or_else(|| incomplete("Authorization header requires existence of a 'X-Amz-Date' header"))?;
        let sent = parse_amz_date(amz_date)
            .ok_or_else(|| incomplete("X-Amz-Date must have the form YYYYMMDDTHHMMSSZ"))?;
        if cred_service != service {
            return Err(SigError::Invalid(format!(
                "Credential should be scoped to correct service: '{service}'."
            )));
        }
        if cred_region != region {
            return Err(SigError::Invalid(format!(
                "Credential should be scoped to a valid region, not '{cred_region}'; this endpoint serves '{region}'."
            )));
        }
        if amz_date.get(..8) != Some(date) {
            return Err(SigError::Invalid(format!(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{date}' != '{}'",
                &amz_date[..8]
            )));
        }
        if sent < now - MAX_SKEW_SECONDS {
            return Err(SigError::Invalid(format!(
                "Signature expired: {amz_date} is now earlier than {} ({} - 5 min.)",
                format_amz_date(now - MAX_SKEW_SECONDS),
                format_amz_date(now)
            )));
        }
        if sent > now + MAX_SKEW_SECONDS {
            return Err(SigError::Invalid(format!(
                "Signature not yet current: {amz_date} is still later than {} ({} + 5 min.)",
                format_amz_date(now + MAX_SKEW_SECONDS),
                format_amz_date(now)
            )));
        }
        Ok(Authorization {
            access_key_id: access_key_id.to_owned(),
            date: date.to_owned(),
            region: cred_region.to_owned(),
            service: cred_service.to_owned(),
            signed_headers,
            signature,
            amz_date: amz_date.to_owned(),
        })
    }

    /// The credential scope: `date/region/service/aws4_request`.
    pub fn scope(&self) -> String {
        format!("{}/{}/{}/aws4_request", self.date, self.region, self.service)
    }

    /// Checks the signature of the request (`method`, `uri`, `headers`, `body`) under
    /// `secret`, the secret access key of [`Self::access_key_id`], in constant time.
    pub fn verify(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        body: &[u8],
        secret: &[u8],
    ) -> Result<(), SigError> {
        let canonical = canonical_request(method, uri, headers, &self.signed_headers, body)?;
        let to_sign = string_to_sign(&self.amz_date, &self.scope(), &canonical);
        let expected =
            hmac(&signing_key(secret, &self.date, &self.region, &self.service), to_sign.as_bytes());
        if bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_slice(), self.signature.as_slice())) {
            return Ok(());
        }
        Err(SigError::Invalid(
            "The request signature we calculated does not match the signature you provided. \
                 Check your AWS Secret Access Key and signing method."
                .to_owned(),
        ))
    }
}

/// HMAC-SHA256 of `data` under `key`. HMAC takes a key of any length, so the error branch
/// (an empty MAC, which matches no signature) is never taken.
fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// The signing key: HMAC chain from `"AWS4" + secret` over date, region, service and
/// `aws4_request`.
pub fn signing_key(secret: &[u8], date: &str, region: &str, service: &str) -> zeroize::Zeroizing<Vec<u8>> {
    let mut start = zeroize::Zeroizing::new(Vec::with_capacity(4 + secret.len()));
    start.extend_from_slice(b"AWS4");
    start.extend_from_slice(secret);
    let k_date = zeroize::Zeroizing::new(hmac(&start, date.as_bytes()));
    let k_region = zeroize::Zeroizing::new(hmac(&k_date, region.as_bytes()));
    let k_service = zeroize::Zeroizing::new(hmac(&k_region, service.as_bytes()));
    zeroize::Zeroizing::new(hmac(&k_service, b"aws4_request"))
}

/// `AWS4-HMAC-SHA256 \n date \n scope \n hex(sha256(canonical request))`.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())))
}

/// Percent-encodes every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`), in upper
/// case hex; `/` too unless `keep_slash`.
pub fn uri_encode(input: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(input.len());
    for &b in input {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (`+` stays `+`, as SigV4 clients send `%20` for a space).
fn percent_decode(input: &str) -> Vec<u8> {
    let b = input.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = input.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The canonical URI of a path as it came over the wire: each segment encoded once more,
/// as every service but S3 signs it (`/` for an empty path).
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    uri_encode(path.as_bytes(), true)
}

/// The canonical query string: every parameter decoded, encoded again, sorted by name and
/// then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(&percent_decode(k), false), uri_encode(&percent_decode(v), false))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// A header's values, each trimmed and with runs of spaces collapsed, joined by commas.
fn canonical_header_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| {
            let s = String::from_utf8_lossy(v.as_bytes());
            s.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// The canonical request: method, URI, query, the signed headers with their values, the
/// signed header list and the hex SHA-256 of the body.
pub fn canonical_request(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    signed_headers: &[String],
    body: &[u8],
) -> Result<String, SigError> {
    let mut lines = String::new();
    for name in signed_headers {
        let value = if name == "host" {
            // HTTP/1.1 sends Host; a client that signed `host` over HTTP/2 signed :authority.
            canonical_header_value(headers, name).or_else(|| uri.authority().map(|a| a.to_string()))
        } else {
            canonical_header_value(headers, name)
        };
        let value = value
            .ok_or_else(|| SigError::Invalid(format!("the signed header '{name}' is not in the request")))?;
        lines.push_str(&format!("{name}:{value}\n"));
    }
    Ok(format!(
        "{}\n{}\n{}\n{lines}\n{}\n{}",
        method.as_str(),
        canonical_uri(uri.path()),
        canonical_query(uri.query().unwrap_or("")),
        signed_headers.join(";"),
        hex(&Sha256::digest(body)),
    ))
}

/// Credentials and a scope to sign requests with, as a client does (the tests' client).
pub struct Signer<'a> {
    pub access_key_id: &'a str,
    pub secret: &'a [u8],
    pub region: &'a str,
    pub service: &'a str,
}

impl Signer<'_> {
    /// The `Authorization` header value for a request, signing every header it has
    /// (`x-amz-date` among them).
    pub fn sign(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<String, SigError> {
        let Signer { access_key_id, secret, region, service } = *self;
        let amz_date = header(headers, "x-amz-date")
            .ok_or_else(|| SigError::Incomplete("no x-amz-date header to sign".into()))?;
        let date = amz_date.get(..8).unwrap_or_default();
        let mut signed: Vec<String> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        signed.sort();
        signed.dedup();
        let canonical = canonical_request(method, uri, headers, &signed, body)?;
        let scope = format!("{date}/{region}/{service}/aws4_request");
        let to_sign = string_to_sign(amz_date, &scope, &canonical);
        let signature = hex(&hmac(&signing_key(secret, date, region, service), to_sign.as_bytes()));
        Ok(format!(
            "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={signature}",
            signed.join(";")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// The example of AWS's SigV4 documentation: IAM ListUsers, signed on 2015-08-30.
    fn example() -> (http::Method, http::Uri, http::HeaderMap) {
        let mut headers = http::HeaderMap::new();
        headers.insert("host", "iam.amazonaws.com".parse().unwrap());
        headers.insert("content-type", "application/x-www-form-urlencoded; charset=utf-8".parse().unwrap());
        headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        let uri: http::Uri =
            "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08".parse().unwrap();
        (http::Method::GET, uri, headers)
    }

    fn example_now() -> i64 {
        parse_amz_date("20150830T123600Z").unwrap()
    }

    const EXAMPLE_SIGNATURE: &str = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";

    fn signed_example() -> http::HeaderMap {
        let (_, _, mut headers) = example();
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={EXAMPLE_SIGNATURE}"
        );
        headers.insert("authorization", auth.parse().unwrap());
        headers
    }

    #[test]
    fn the_documented_example_hashes_and_signs_as_aws_says() {
        let (method, uri, headers) = example();
        let signed: Vec<String> = ["content-type", "host", "x-amz-date"].map(String::from).to_vec();
        let canonical = canonical_request(&method, &uri, &headers, &signed, b"").unwrap();
        assert_eq!(
            hex(&Sha256::digest(canonical.as_bytes())),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        let signer =
            Signer { access_key_id: "AKIDEXAMPLE", secret: SECRET, region: "us-east-1", service: "iam" };
        let auth = signer.sign(&method, &uri, &headers, b"").unwrap();
        assert!(auth.ends_with(EXAMPLE_SIGNATURE), "{auth}");
    }

    #[test]
    fn a_genuine_signature_verifies() {
        let (method, uri, _) = example();
        let headers = signed_example();
        let auth = Authorization::parse(&headers, "iam", "us-east-1", example_now()).unwrap();
        assert_eq!(auth.access_key_id, "AKIDEXAMPLE");
        assert_eq!(auth.scope(), "20150830/us-east-1/iam/aws4_request");
        auth.verify(&method, &uri, &headers, b"", SECRET).unwrap();
    }

    #[test]
    fn a_signature_has_one_spelling() {
        // Found by the sigv4 fuzz target: uppercase digits, and a '+' that u8::from_str_radix
        // reads as a sign ("+f" is 15), spelled the same signature otherwise.
        let (_, _, mut headers) = example();
        let upper = EXAMPLE_SIGNATURE.to_uppercase();
        let signed = format!("{}+{}", &EXAMPLE_SIGNATURE[..62], &EXAMPLE_SIGNATURE[63..]);
        for signature in [upper, signed] {
            let auth = format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, Signature={signature}"
            );
            headers.insert("authorization", auth.parse().unwrap());
            let parsed = Authorization::parse(&headers, "iam", "us-east-1", example_now());
            assert!(matches!(parsed, Err(SigError::Incomplete(_))), "{signature}: {parsed:?}");
        }
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let (method, uri, _) = example();
        let headers = signed_example();
        let auth = Authorization::parse(&headers, "iam", "us-east-1", example_now()).unwrap();
        let invalid = |r: Result<(), SigError>| matches!(r, Err(SigError::Invalid(_)));
        assert!(invalid(auth.verify(&method, &uri, &headers, b"", b"wrong secret")), "wrong secret");
        assert!(invalid(auth.verify(&method, &uri, &headers, b"{}", SECRET)), "changed body");
        assert!(invalid(auth.verify(&http::Method::POST, &uri, &headers, b"", SECRET)), "changed method");
        let other: http::Uri =
            "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-09".parse().unwrap();
        assert!(invalid(auth.verify(&method, &other, &headers, b"", SECRET)), "changed query");
        let mut changed = headers.clone();
        changed.insert("content-type", "application/json".parse().unwrap());
        assert!(invalid(auth.verify(&method, &uri, &changed, b"", SECRET)), "changed signed header");
        let mut missing = headers.clone();
        missing.remove("content-type");
        assert!(invalid(auth.verify(&method, &uri, &missing, b"", SECRET)), "missing signed header");
        // An unsigned header may change.
        let mut extra = headers.clone();
        extra.insert("user-agent", "x".parse().unwrap());
        auth.verify(&method, &uri, &extra, b"", SECRET).unwrap();
    }

    #[test]
    fn stale_and_future_dates_are_refused() {
        let headers = signed_example();
        let now = example_now();
        Authorization::parse(&headers, "iam", "us-east-1", now + MAX_SKEW_SECONDS).unwrap();
        Authorization::parse(&headers, "iam", "us-east-1", now - MAX_SKEW_SECONDS).unwrap();
        let err = Authorization::parse(&headers, "iam", "us-east-1", now + MAX_SKEW_SECONDS + 1).unwrap_err();
        assert_eq!(err.code(), "InvalidSignatureException");
        assert!(
            err.to_string().starts_with("Signature expired: 20150830T123600Z is now earlier than"),
            "{err}"
        );
        let err = Authorization::parse(&headers, "iam", "us-east-1", now - MAX_SKEW_SECONDS - 1).unwrap_err();
        assert!(err.to_string().starts_with("Signature not yet current"), "{err}");
    }

    #[test]
    fn the_scope_must_be_this_service_region_and_day() {
        let headers = signed_example();
        let now = example_now();
        let err = Authorization::parse(&headers, "kms", "us-east-1", now).unwrap_err();
        assert_eq!(err, SigError::Invalid("Credential should be scoped to correct service: 'kms'.".into()));
        let err = Authorization::parse(&headers, "iam", "eu-west-1", now).unwrap_err();
        assert_eq!(err.code(), "InvalidSignatureException");
        let mut other_day = headers.clone();
        let auth = headers["authorization"].to_str().unwrap().replace("/20150830/", "/20150831/");
        other_day.insert("authorization", auth.parse().unwrap());
        let err = Authorization::parse(&other_day, "iam", "us-east-1", now).unwrap_err();
        assert!(err.to_string().starts_with("Date in Credential scope does not match"), "{err}");
    }

    #[test]
    fn malformed_headers_are_incomplete_and_missing_ones_missing() {
        let now = example_now();
        let (_, _, plain) = example();
        assert_eq!(Authorization::parse(&plain, "iam", "us-east-1", now), Err(SigError::Missing));
        assert_eq!(SigError::Missing.code(), "MissingAuthenticationTokenException");
        let good = signed_example()["authorization"].to_str().unwrap().to_owned();
        for bad in [
            "Bearer abc".to_owned(),
            "AWS4-HMAC-SHA256".to_owned(),
            "AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/iam/aws4_request".to_owned(),
            good.replace("/aws4_request", ""),
            good.replace("Signature=5d", "Signature=zz"),
            good.replace(EXAMPLE_SIGNATURE, "abcd"),
            good.replace("content-type;host;x-amz-date", "content-type;x-amz-date"),
            good.replace("content-type;host", "Content-Type;host"),
            good.replace("Credential=AKIDEXAMPLE", "Credential="),
        ] {
            let mut headers = plain.clone();
            headers.insert("authorization", bad.parse().unwrap());
            let err = Authorization::parse(&headers, "iam", "us-east-1", now).unwrap_err();
            assert_eq!(err.code(), "IncompleteSignatureException", "{bad}: {err}");
        }
        let mut no_date = signed_example();
        no_date.remove("x-amz-date");
        let err = Authorization::parse(&no_date, "iam", "us-east-1", now).unwrap_err();
        assert_eq!(err.code(), "IncompleteSignatureException");
        for bad_date in ["2015-08-30T12:36:00Z", "20151330T123600Z", "20150830T253600Z", "2015083OT123600Z"] {
            let mut h = signed_example();
            h.insert("x-amz-date", bad_date.parse().unwrap());
            let err = Authorization::parse(&h, "iam", "us-east-1", now).unwrap_err();
            assert_eq!(err.code(), "IncompleteSignatureException", "{bad_date}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_authorization_headers_never_verify(value in "[ -~]{0,300}", date in "[0-9TZ]{0,20}") {
            let (method, uri, mut headers) = example();
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                headers.insert("authorization", v);
            }
            if let Ok(v) = http::HeaderValue::from_str(&date) {
                headers.insert("x-amz-date", v);
            }
            if let Ok(auth) = Authorization::parse(&headers, "iam", "us-east-1", example_now()) {
                proptest::prop_assert!(auth.verify(&method, &uri, &headers, b"", SECRET).is_err());
            }
        }
    }

    #[test]
    fn canonical_forms_follow_the_specification() {
        assert_eq!(uri_encode(b"a b/c~d*e", false), "a%20b%2Fc~d%2Ae");
        assert_eq!(uri_encode(b"/a b/", true), "/a%20b/");
        assert_eq!(canonical_query("b=2&a=1&a=0&c"), "a=0&a=1&b=2&c=");
        assert_eq!(canonical_query("k=a%20b&k2=%2F"), "k=a%20b&k2=%2F");
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a%20b"), "/a%2520b");
        let mut h = http::HeaderMap::new();
        h.append("x-multi", "  a   b ".parse().unwrap());
        h.append("x-multi", "c".parse().unwrap());
        assert_eq!(canonical_header_value(&h, "x-multi").as_deref(), Some("a b,c"));
        assert_eq!(format_amz_date(example_now()), "20150830T123600Z");
    }
}
