//! `kubekms bench flood`: the key API under load from valid callers, first alone (the
//! reference) and then while a second client floods it with what an attacker or a broken
//! client sends — tokens that are junk or expired, requests over the size limits, forged AWS
//! signatures and sessions, junk STS tokens, and connections that never finish a handshake.
//! It reports the valid callers' latency and errors in both phases, what the flood got back
//! (by gRPC code, HTTP status and AWS error type) and the server's resident memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use kubekms::proto::keyapi::key_service_client::KeyServiceClient;
use kubekms::proto::keyapi::{DecryptRequest, EncryptRequest};

use super::args::KeyApiArgs;
use super::bench::percentile;

/// What `kubekms bench flood` is told.
#[derive(clap::Args)]
pub struct FloodArgs {
    #[command(flatten)]
    pub key_api: KeyApiArgs,
    /// The key the valid callers use, as NAMESPACE/NAME.
    #[arg(long)]
    pub key: String,
    /// The server's AWS API (https://HOST:PORT); without it only the gRPC API is flooded.
    #[arg(long, value_name = "URL")]
    pub aws_endpoint: Option<String>,
    /// The region AWS requests are signed for.
    #[arg(long, default_value = "kubekms-local")]
    pub aws_region: String,
    /// How long each phase (alone, then flooded) lasts.
    #[arg(long, default_value = "2m")]
    pub duration: jiff::SignedDuration,
    /// Valid callers, each on its own connection, each doing Encrypt then Decrypt.
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Concurrent flooding tasks per kind of bad request.
    #[arg(long, default_value_t = 2)]
    pub flooders: usize,
    /// Connections held open without a TLS handshake on each port during the flood.
    #[arg(long, default_value_t = 200)]
    pub idle_connections: usize,
    /// The server's process id, whose VmRSS is sampled (from /proc/PID/status).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// What the valid callers saw in one phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    pub calls: u64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    pub error_rate: f64,
    pub calls_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The server's VmRSS (KiB) when the phase began, its highest sample, and at its end.
    pub rss_start_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
}

/// Everything one invocation measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub phases: Vec<Phase>,
    /// For each kind of bad request, its answers (gRPC code, or HTTP status and AWS error
    /// type) and how often.
    pub flood: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

/// Counts outcomes by name.
#[derive(Default, Clone)]
struct Tally(Arc<Mutex<BTreeMap<String, u64>>>);

impl Tally {
    fn add(&self, outcome: impl Into<String>) {
        if let Ok(mut t) = self.0.lock() {
            *t.entry(outcome.into()).or_default() += 1;
        }
    }

    fn take(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// Samples VmRSS of `pid` until `stop`.
fn sample_rss(pid: Option<u32>, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let Some(pid) = pid else { return samples };
        loop {
            if let Some(kib) = rss_kib(pid) {
                samples.push(kib);
            }
            tokio::select! {
                () = stop.cancelled() => return samples,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    })
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A valid caller's failure as it is counted: its code and the start of its message.
fn failure(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message().chars().take(80).collect::<String>())
}

/// The valid callers for `duration`: each Encrypts, then Decrypts what it got, over and over.
async fn valid_callers(
    args: &FloodArgs,
    clients: &[kubekms::client::Client],
    duration: Duration,
) -> (Vec<Duration>, BTreeMap<String, u64>, f64) {
    let errors = Tally::default();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|mut client| {
            let key = args.key.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let encrypt = EncryptRequest {
                        key: key.clone(),
                        plaintext: vec![7; 32],
                        encryption_context: Default::default(),
                    };
                    let blob = match client.encrypt(encrypt).await {
                        Ok(r) => r.into_inner().ciphertext_blob,
                        Err(s) => {
                            errors.add(failure(&s));
                            latencies.push(t.elapsed());
                            continue;
                        }
                    };
                    latencies.push(t.elapsed());
                    let t = Instant::now();
                    let decrypt = DecryptRequest { ciphertext_blob: blob, ..Default::default() };
                    match client.decrypt(decrypt).await {
                        Ok(r) if r.get_ref().plaintext == [7; 32] => {}
                        Ok(_) => errors.add("wrong plaintext"),
                        Err(s) => errors.add(failure(&s)),
                    }
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in futures::future::join_all(tasks).await {
        match t {
            Ok(l) => latencies.extend(l),
            Err(_) => errors.add("caller task failed"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    (latencies, errors.take(), seconds)
}

/// One phase: the valid callers, with the server's memory sampled throughout.
async fn phase(
    name: &'static str,
    args: &FloodArgs,
    clients: &[kubekms::client::Client],
    duration: Duration,
) -> Phase {
    let stop = CancellationToken::new();
    let rss = sample_rss(args.server_pid, stop.clone());
    let (latencies, errors, seconds) = valid_callers(args, clients, duration).await;
    stop.cancel();
    let rss = rss.await.unwrap_or_default();
    let calls = latencies.len() as u64;
    let failed: u64 = errors.values().sum();
    Phase {
        name,
        seconds,
        calls,
        error_rate: if calls == 0 { 1.0 } else { failed as f64 / calls as f64 },
        errors,
        calls_per_second: calls as f64 / seconds.max(1e-9),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        rss_start_kib: rss.first().copied(),
        rss_peak_kib: rss.iter().max().copied(),
        rss_end_kib: rss.last().copied(),
    }
}

/// A random string of `bytes` random bytes, URL-safe base64.
fn random(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        buf = uuid::Uuid::new_v4().as_bytes().repeat(bytes.div_ceil(16));
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// A JWT-shaped token, never issued by anyone, expiring at `exp` (Unix seconds).
fn fake_jwt(exp: i64) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"RS256","kid":"flood"}"#);
    let claims =
        format!(r#"{{"aud":["kubekms"],"exp":{exp},"sub":"system:serviceaccount:flood:{}"}}"#, random(6));
    format!("{header}.{}.{}", b64.encode(claims), random(256))
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The kinds of bad gRPC request.
#[derive(Clone, Copy)]
enum GrpcJunk {
    /// A new junk token on every call: the server has no cached answer for it.
    NewToken,
    /// A JWT whose `exp` has passed.
    ExpiredToken,
    /// An Encrypt of 256 KiB, over the server's 64 KiB request limit.
    Oversized,
}

impl GrpcJunk {
    fn name(self) -> &'static str {
        match self {
            GrpcJunk::NewToken => "gRPC, a new junk token each call",
            GrpcJunk::ExpiredToken => "gRPC, expired token",
            GrpcJunk::Oversized => "gRPC, 256 KiB Encrypt (limit 64 KiB)",
        }
    }

    fn request(self, key: &str) -> tonic::Request<EncryptRequest> {
        let (token, size) = match self {
            GrpcJunk::NewToken => (fake_jwt(now() + 3600), 32),
            GrpcJunk::ExpiredToken => (fake_jwt(now() - 60), 32),
            GrpcJunk::Oversized => (fake_jwt(now() + 3600), 256 * 1024),
        };
        let mut request = tonic::Request::new(EncryptRequest {
            key: key.to_owned(),
            plaintext: vec![1; size],
            encryption_context: Default::default(),
        });
        if let Ok(v) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", v);
        }
        request
    }
}

/// Sends `junk` over one connection until `stop`, counting the answers.
async fn flood_grpc(
    channel: tonic::transport::Channel,
    junk: GrpcJunk,
    key: String,
    tally: Tally,
    stop: CancellationToken,
) {
    let mut client = KeyServiceClient::new(channel);
    while !stop.is_cancelled() {
        match client.encrypt(junk.request(&key)).await {
            Ok(_) => tally.add("OK (accepted!)"),
            Err(s) => tally.add(format!("{:?}", s.code())),
        }
    }
}

/// The kinds of bad AWS request.
#[derive(Clone, Copy)]
enum AwsJunk {
    /// A KMS Encrypt signed under a made-up access key with a made-up session token.
    ForgedSession,
    /// A KMS Encrypt whose body is 256 KiB, over the 64 KiB limit.
    Oversized,
    /// STS AssumeRoleWithWebIdentity with a new junk web identity token each call.
    StsJunkToken,
}

impl AwsJunk {
    fn name(self) -> &'static str {
        match self {
            AwsJunk::ForgedSession => "AWS, Encrypt signed with a forged session",
            AwsJunk::Oversized => "AWS, 256 KiB Encrypt body (limit 64 KiB)",
            AwsJunk::StsJunkToken => "STS, a new junk web identity token each call",
        }
    }

    fn request(self, host: &str, region: &str, key: &str) -> http::Request<axum::body::Body> {
        let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        let day = &stamp[..8];
        let builder = || http::Request::post("/").header(http::header::HOST, host);
        let kms = |body: String| {
            let credential = format!("AKIA{}/{day}/{region}/kms/aws4_request", random(12));
            let signature: String = random(32).bytes().take(32).map(|b| format!("{b:02x}")).collect();
            builder()
                .header("x-amz-target", "TrentService.Encrypt")
                .header(http::header::CONTENT_TYPE, "application/x-amz-json-1.1")
                .header("x-amz-date", &stamp)
                .header("x-amz-security-token", random(300))
                .header(
                    http::header::AUTHORIZATION,
                    format!(
                        "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders=host;x-amz-date, Signature={signature}"
                    ),
                )
                .body(axum::body::Body::from(body))
        };
        let request = match self {
            AwsJunk::ForgedSession => kms(format!(r#"{{"KeyId":"{key}","Plaintext":"AAAA"}}"#)),
            AwsJunk::Oversized => {
                kms(format!(r#"{{"KeyId":"{key}","Plaintext":"{}"}}"#, "A".repeat(256 * 1024)))
            }
            AwsJunk::StsJunkToken => builder()
                .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(axum::body::Body::from(format!(
                    "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3Aflood%3Arole%2Fx\
                     &RoleSessionName=flood&WebIdentityToken={}",
                    fake_jwt(now() + 3600)
                ))),
        };
        request.unwrap_or_default()
    }
}

/// A TLS client configuration trusting the CA in `ca`.
fn tls_client(ca: Option<&Path>) -> anyhow::Result<Arc<tokio_rustls::rustls::ClientConfig>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("failed to read {}", ca.display()))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert?)?;
        }
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Where an https:// URL points: host, port.
fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let uri: http::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    let host = uri.host().context("no host")?.trim_matches(['[', ']']).to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Sends `junk` to the AWS port until `stop`, on one keep-alive connection at a time
/// (a new one when the server closes it), counting the answers.
async fn flood_aws(
    endpoint: (String, u16),
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    region: String,
    key: String,
    junk: AwsJunk,
    tally: Tally,
    stop: CancellationToken,
) {
    let (host, port) = endpoint;
    let authority = format!("{host}:{port}");
    let connector = tokio_rustls::TlsConnector::from(tls);
    while !stop.is_cancelled() {
        let Ok(name) = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone()) else {
            tally.add("bad host name");
            return;
        };
        let tcp = match tokio::net::TcpStream::connect((host.as_str(), port)).await {
            Ok(s) => s,
            Err(_) => {
                tally.add("connection refused");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(stream) = connector.connect(name, tcp).await else {
            tally.add("TLS handshake failed");
            continue;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            tally.add("HTTP handshake failed");
            continue;
        };
        let driver = tokio::spawn(conn);
        while !stop.is_cancelled() && sender.ready().await.is_ok() {
            match sender.send_request(junk.request(&authority, &region, &key)).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let kind = response
                        .headers()
                        .get("x-amzn-errortype")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1 << 20)
                        .await
                        .unwrap_or_default();
                    // STS answers in XML: its error code is in <Code>.
                    let kind = kind.or_else(|| {
                        let text = String::from_utf8_lossy(&body);
                        let (_, rest) = text.split_once("<Code>")?;
                        Some(rest.split_once("</Code>")?.0.to_owned())
                    });
                    tally.add(format!("HTTP {status} {}", kind.unwrap_or_default()).trim_end().to_owned());
                }
                Err(_) => {
                    tally.add("connection closed by the server");
                    break;
                }
            }
        }
        driver.abort();
    }
}

/// Holds up to `count` TCP connections to `addr` that send nothing, reopening those the
/// server closes, until `stop`; counts how many it opened and how many the server closed.
async fn idle_connections(addr: (String, u16), count: usize, tally: Tally, stop: CancellationToken) {
    let mut held = tokio::task::JoinSet::new();
    while !stop.is_cancelled() {
        while held.len() < count && !stop.is_cancelled() {
            match tokio::net::TcpStream::connect((addr.0.as_str(), addr.1)).await {
                Ok(mut stream) => {
                    tally.add("opened");
                    let tally = tally.clone();
                    let stop = stop.clone();
                    held.spawn(async move {
                        let mut buf = [0u8; 64];
                        tokio::select! {
                            () = stop.cancelled() => { let _ = stream.shutdown().await; }
                            read = tokio::io::AsyncReadExt::read(&mut stream, &mut buf) => {
                                let _ = read;
                                tally.add("closed by the server");
                            }
                        }
                    });
                }
                Err(_) => {
                    tally.add("connect failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            _ = held.join_next() => {}
        }
    }
    held.shutdown().await;
}

/// Starts every flooder; they run until `stop`.
async fn start_flood(
    args: &FloodArgs,
    stop: &CancellationToken,
) -> anyhow::Result<(BTreeMap<&'static str, Tally>, tokio::task::JoinSet<()>)> {
    let mut tallies = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let ca = args.key_api.ca.as_deref();
    for junk in [GrpcJunk::NewToken, GrpcJunk::ExpiredToken, GrpcJunk::Oversized] {
        let tally = Tally::default();
        tallies.insert(junk.name(), tally.clone());
        for _ in 0..args.flooders {
            let channel = kubekms::client::channel(&args.key_api.server, ca).await?;
            tasks.spawn(flood_grpc(channel, junk, args.key.clone(), tally.clone(), stop.clone()));
        }
    }
    let tally = Tally::default();
    tallies.insert("gRPC port, connections that send nothing", tally.clone());
    tasks.spawn(idle_connections(
        host_port(&args.key_api.server)?,
        args.idle_connections,
        tally,
        stop.clone(),
    ));
    if let Some(endpoint) = &args.aws_endpoint {
        let tls = tls_client(ca)?;
        let at = host_port(endpoint)?;
        for junk in [AwsJunk::ForgedSession, AwsJunk::Oversized, AwsJunk::StsJunkToken] {
            let tally = Tally::default();
            tallies.insert(junk.name(), tally.clone());
            for _ in 0..args.flooders {
                tasks.spawn(flood_aws(
                    at.clone(),
                    tls.clone(),
                    args.aws_region.clone(),
                    args.key.clone(),
                    junk,
                    tally.clone(),
                    stop.clone(),
                ));
            }
        }
        let tally = Tally::default();
        tallies.insert("AWS port, connections that send nothing", tally.clone());
        tasks.spawn(idle_connections(at, args.idle_connections, tally, stop.clone()));
    }
    Ok((tallies, tasks))
}

/// Both phases: the valid callers alone, then under the flood.
pub async fn run(args: &FloodArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.callers > 0, "--callers must be positive");
    let duration = Duration::try_from(args.duration)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--duration must be positive")?;
    let token = args.key_api.token()?;
    let mut clients = Vec::with_capacity(args.callers);
    for _ in 0..args.callers {
        clients.push(args.key_api.connect_with(&token).await?);
    }
    // Warm up until a second of calls has no error (the token reviewed and cached, the key's
    // material unwrapped, the key usable): a phase measures a serving server, not its start.
    let warm_up = Instant::now();
    loop {
        let (_, errors, _) = valid_callers(args, &clients, Duration::from_secs(1)).await;
        if errors.is_empty() {
            break;
        }
        anyhow::ensure!(
            warm_up.elapsed() < Duration::from_secs(60),
            "the valid callers still fail after 60 s of warm-up, before any flood: {errors:?}"
        );
    }
    let alone = phase("alone", args, &clients, duration).await;
    let stop = CancellationToken::new();
    let (tallies, mut flooders) = start_flood(args, &stop).await?;
    let flooded = phase("flood", args, &clients, duration).await;
    stop.cancel();
    while flooders.join_next().await.is_some() {}
    let flood = tallies.into_iter().map(|(name, t)| (name, t.take())).collect();
    Ok(Report { phases: vec![alone, flooded], flood })
}

/// The report as text: the phases side by side, then the flood's answers.
pub fn table(report: &Report) -> String {
    let mut out = String::from(
        "| phase | seconds | calls | calls/s | p50 µs | p99 µs | errors | error rate | VmRSS start / peak / end MiB |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---|\n",
    );
    let mib = |k: Option<u64>| k.map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
    for p in &report.phases {
        let errors: Vec<String> = p.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push_str(&format!(
            "| {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} | {:.5} | {} / {} / {} |\n",
            p.name,
            p.seconds,
            p.calls,
            p.calls_per_second,
            p.p50_us,
            p.p99_us,
            if errors.is_empty() { "none".to_owned() } else { errors.join(", ") },
            p.error_rate,
            mib(p.rss_start_kib),
            mib(p.rss_peak_kib),
            mib(p.rss_end_kib),
        ));
    }
    out.push_str("\n| flood | requests | answers |\n|---|---:|---|\n");
    for (name, answers) in &report.flood {
        let total: u64 = answers.values().sum();
        let shown: Vec<String> = answers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push_str(&format!("| {name} | {total} | {} |\n", shown.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_tokens_are_jwts_with_the_expiry_asked_for() {
        let token = fake_jwt(1_234);
        assert_eq!(kubekms::server::auth::jwt_expiry(&token), Some(1_234));
        assert_ne!(fake_jwt(1_234), token, "a new token each time");
    }

    #[test]
    fn a_forged_aws_request_is_well_formed_so_that_the_server_checks_its_session() {
        let request = AwsJunk::ForgedSession.request("127.0.0.1:1", "kubekms-local", "a/b");
        let parsed = kubekms::server::aws::sigv4::Authorization::parse(
            request.headers(),
            "kms",
            "kubekms-local",
            now(),
        );
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }

    #[test]
    fn the_report_shows_both_phases_and_every_answer() {
        let phase = |name, errors: BTreeMap<String, u64>| Phase {
            name,
            seconds: 10.0,
            calls: 1000,
            error_rate: errors.values().sum::<u64>() as f64 / 1000.0,
            errors,
            calls_per_second: 100.0,
            p50_us: 900.0,
            p99_us: 4000.0,
            rss_start_kib: Some(10240),
            rss_peak_kib: Some(20480),
            rss_end_kib: None,
        };
        let report = Report {
            phases: vec![phase("alone", BTreeMap::new()), phase("flood", [("Unavailable".into(), 2)].into())],
            flood: [("gRPC, expired token", [("Unauthenticated".to_owned(), 7)].into())].into(),
        };
        let text = table(&report);
        assert!(
            text.contains("| alone | 10 | 1000 | 100 | 900 | 4000 | none | 0.00000 | 10.0 / 20.0 / - |"),
            "{text}"
        );
        assert!(
            text.contains("| flood | 10 | 1000 | 100 | 900 | 4000 | Unavailable: 2 | 0.00200 |"),
            "{text}"
        );
        assert!(text.contains("| gRPC, expired token | 7 | Unauthenticated: 7 |"), "{text}");
    }
}
