//! The SigV4 `Authorization` header and the signature check of the AWS API. Properties: a
//! header that parses has a non-empty access key id, this endpoint's scope, and signs
//! `host` among lowercase header names; a signature the fuzzer makes never verifies; a
//! request signed as a client signs it verifies, and a changed body, method, date or
//! secret, or a changed signature, makes it fail.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use kubekms::server::aws::sigv4::{Authorization, Signer, format_amz_date};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const REGION: &str = "us-east-1";
const SERVICE: &str = "kms";
const HOST: &str = "kms.us-east-1.amazonaws.com";
const SECRET: &[u8] = b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// The targets' clock (2026-05-28).
const NOW: i64 = 1_780_000_000;

fn signer() -> Signer<'static> {
    Signer { access_key_id: "AKIDEXAMPLE", secret: SECRET, region: REGION, service: SERVICE }
}

fn signature_of(authorization: &str) -> &str {
    authorization.rsplit("Signature=").next().unwrap_or_default()
}

fn check_parsed(a: &Authorization) {
    assert!(!a.access_key_id.is_empty() && a.region == REGION && a.service == SERVICE);
    assert!(a.signed_headers.iter().any(|h| h == "host"));
    assert!(a.signed_headers.iter().all(|h| !h.is_empty() && !h.bytes().any(|b| b.is_ascii_uppercase())));
    assert_eq!(a.scope(), format!("{}/{REGION}/{SERVICE}/aws4_request", a.date));
}

fn check(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let mode = u.arbitrary::<u8>()?;
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static(HOST));
    let skew = u.int_in_range(-400..=400)?;
    let date = if mode % 2 == 0 { kubekms_fuzz::string(&mut u, 20)? } else { format_amz_date(NOW + skew) };
    if let Ok(v) = HeaderValue::from_str(&date) {
        headers.insert("x-amz-date", v);
    }
    let method = [Method::POST, Method::GET, Method::PUT][u.int_in_range(0..=2)?].clone();
    let body = kubekms_fuzz::bytes(&mut u, 200)?;
    if mode % 2 == 0 {
        let Ok(value) = HeaderValue::from_bytes(u.take_rest()) else { return Ok(()) };
        headers.insert(http::header::AUTHORIZATION, value);
        if let Ok(a) = Authorization::parse(&headers, SERVICE, REGION, NOW) {
            check_parsed(&a);
            // It verifies only if it is the signature a client with the secret computes.
            let uri = Uri::from_static("/");
            if a.verify(&method, &uri, &headers, &body, SECRET).is_ok() {
                // (The only genuine signature the fuzzer knows is the seed's, of these two.)
                assert_eq!(a.signed_headers, ["host", "x-amz-date"], "a forged signature verified");
                let mut unsigned = headers.clone();
                unsigned.remove(http::header::AUTHORIZATION);
                let genuine = signer().sign(&method, &uri, &unsigned, &body).expect("sign");
                let value = headers[http::header::AUTHORIZATION].to_str().expect("ASCII");
                assert_eq!(signature_of(value), signature_of(&genuine), "a forged signature verified");
            }
        }
        return Ok(());
    }
    let path = kubekms_fuzz::string(&mut u, 30)?;
    let query = kubekms_fuzz::string(&mut u, 30)?;
    let Ok(uri) = format!("/{path}?{query}").parse::<Uri>() else { return Ok(()) };
    for _ in 0..u.int_in_range(0..=3)? {
        let (name, value) = (kubekms_fuzz::string(&mut u, 16)?, kubekms_fuzz::bytes(&mut u, 40)?);
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value))
            && !["host", "x-amz-date", "authorization"].contains(&name.as_str())
        {
            headers.insert(name, value);
        }
    }
    let signature = signer().sign(&method, &uri, &headers, &body).expect("sign");
    let mut signed = headers.clone();
    signed.insert(http::header::AUTHORIZATION, HeaderValue::from_str(&signature).expect("ASCII"));
    let parsed = Authorization::parse(&signed, SERVICE, REGION, NOW);
    if skew.abs() > 300 {
        assert!(parsed.is_err(), "a date {skew} s off was accepted");
        return Ok(());
    }
    let a = parsed.expect("a client's signature parses");
    check_parsed(&a);
    assert!(a.verify(&method, &uri, &signed, &body, SECRET).is_ok(), "a client's signature verified not");
    let mut other_body = body.clone();
    other_body.push(u.arbitrary()?);
    assert!(a.verify(&method, &uri, &signed, &other_body, SECRET).is_err(), "a changed body verified");
    let other_method = if method == Method::POST { Method::PUT } else { Method::POST };
    assert!(a.verify(&other_method, &uri, &signed, &body, SECRET).is_err(), "a changed method verified");
    assert!(a.verify(&method, &uri, &signed, &body, b"another secret").is_err(), "another secret verified");
    let mut later = signed.clone();
    later.insert("x-amz-date", HeaderValue::from_str(&format_amz_date(NOW + skew + 1)).expect("ASCII"));
    let later_ok = Authorization::parse(&later, SERVICE, REGION, NOW)
        .is_ok_and(|a| a.verify(&method, &uri, &later, &body, SECRET).is_ok());
    assert!(!later_ok, "a changed date verified");
    let at = signature.len() - 1 - u.int_in_range(0..=63)?;
    let mut forged = signature.into_bytes();
    forged[at] = if forged[at] == b'0' { b'1' } else { b'0' };
    signed.insert(http::header::AUTHORIZATION, HeaderValue::from_bytes(&forged).expect("ASCII"));
    let forged_ok = Authorization::parse(&signed, SERVICE, REGION, NOW)
        .is_ok_and(|a| a.verify(&method, &uri, &signed, &body, SECRET).is_ok());
    assert!(!forged_ok, "a changed signature verified");
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static(HOST));
    headers.insert("x-amz-date", HeaderValue::from_str(&format_amz_date(NOW)).expect("ASCII"));
    let signature = signer().sign(&Method::POST, &Uri::from_static("/"), &headers, b"{}").expect("sign");
    let date = format_amz_date(NOW);
    // Raw mode: no skew, the date, POST, a body of "{}", then the header.
    let mut raw = vec![0u8, 0, 0, date.len() as u8];
    raw.extend_from_slice(date.as_bytes());
    raw.extend_from_slice(&[0, 2, b'{', b'}']);
    raw.extend_from_slice(signature.as_bytes());
    vec![raw, vec![1; 100], (0..=255).collect()]
}

fuzz_target!(init: kubekms_fuzz::write_seeds_if_asked(seeds), |data: &[u8]| {
    let _ = check(data);
});
