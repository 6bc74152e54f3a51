//! `kubekms bench`: latency and throughput of the plugin over a unix socket, next to an
//! empty gRPC call on the same kind of socket (the floor), and of the key API, next to
//! GenerateRandom; each floor is measured in the same run and results are reported as
//! ratios to it — never as absolute pass/fail thresholds.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use kubekms::audit::AuditLog;
use kubekms::crypto::{KeyMaterial, RootKey};
use kubekms::domain::{KeyInfo, KeySnapshot, KeyState};
use kubekms::keyring::FixedKeyring;
use kubekms::metering::OperationMetrics;
use kubekms::plugin::service::KmsPlugin;
use kubekms::plugin::socket::PluginSocket;
use kubekms::proto::kmsv2::key_management_service_client::KeyManagementServiceClient;
use kubekms::proto::kmsv2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use kubekms::proto::kmsv2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};

use super::args::KeyApiArgs;

/// One measured row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub target: String,
    pub operation: String,
    pub concurrency: usize,
    pub calls: usize,
    pub calls_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("failed to set up a socket")]
    Socket(#[from] kubekms::plugin::socket::SocketError),
    #[error("failed to connect to {0}")]
    Connect(PathBuf, #[source] tonic::transport::Error),
    #[error("a call failed: {0}")]
    Call(#[from] Status),
    #[error("failed to generate a key")]
    Random(#[source] getrandom::Error),
    #[error("failed to create a temporary directory")]
    TempDir(#[source] std::io::Error),
}

/// A KMS v2 server that answers Status at once and nothing else: the cost of the socket,
/// HTTP/2 and protobuf alone.
struct Floor;

#[tonic::async_trait]
impl KeyManagementService for Floor {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "floor".into(),
        }))
    }
    async fn encrypt(&self, _: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn decrypt(&self, _: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
}

/// Serves `service` on a new socket in `dir` until `stop`.
async fn serve<S: KeyManagementService>(
    dir: &Path,
    name: &str,
    service: S,
    stop: CancellationToken,
) -> Result<PathBuf, BenchError> {
    let path = dir.join(name);
    let (listener, guard) = PluginSocket::bind(&path).await?.into_parts();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(KeyManagementServiceServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                stop.cancelled_owned(),
            )
            .await;
        drop(guard);
    });
    Ok(path)
}

/// A plugin with a fresh random key and an audit log in `dir`, as the plugin runs for real.
pub async fn start_local_plugin(dir: &Path, stop: CancellationToken) -> Result<PathBuf, BenchError> {
    let root = RootKey::from_material(KeyMaterial::generate().map_err(BenchError::Random)?);
    let key_id = uuid::Uuid::new_v4().to_string();
    let key = KeySnapshot {
        info: KeyInfo {
            namespace: "bench".into(),
            name: "key".into(),
            uid: key_id.clone(),
            key_id,
            state: KeyState::Enabled,
            current_version: Some(1),
            refused_versions: Default::default(),
            valid_to: None,
        },
        versions: [(1, Arc::new(KeyMaterial::generate().map_err(BenchError::Random)?))].into(),
    };
    let audit = AuditLog::open(&dir.join("audit.log"), &root)
        .map_err(|e| BenchError::Call(Status::internal(e.to_string())))?;
    let mut registry = prometheus_client::registry::Registry::default();
    let plugin = KmsPlugin::new(
        FixedKeyring(Some(Arc::new(key))),
        Arc::new(audit),
        OperationMetrics::register(&mut registry),
        // Recorded as in production (the writer aside): its cost is part of each call's.
        Arc::new(kubekms::usage::Recorder::new(kubekms::usage::DEFAULT_GRANULARITY)),
    );
    serve(dir, "kubekms.sock", plugin, stop).await
}

/// Starts the floor server in `dir`.
pub async fn start_floor(dir: &Path, stop: CancellationToken) -> Result<PathBuf, BenchError> {
    serve(dir, "floor.sock", Floor, stop).await
}

/// The `p` quantile of sorted latencies, in microseconds.
pub(super) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Runs `calls` calls of `call` spread over the `clients` (one caller each, concurrently),
/// after a short warm-up.
pub async fn measure<C, F, Fut>(
    target: &str,
    operation: &str,
    clients: Vec<C>,
    calls: usize,
    call: F,
) -> Result<Row, BenchError>
where
    C: Clone + Send + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send,
{
    let concurrency = clients.len().max(1);
    for c in &clients {
        for i in 0..10 {
            call(c.clone(), i).await?;
        }
    }
    let per_caller = calls.div_ceil(concurrency);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(caller, client)| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_caller);
                for i in 0..per_caller {
                    let t = Instant::now();
                    call(client.clone(), caller * per_caller + i).await?;
                    latencies.push(t.elapsed());
                }
                Ok::<_, Status>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(per_caller * concurrency);
    for t in futures::future::join_all(tasks).await {
        latencies.extend(t.map_err(|e| Status::internal(e.to_string()))??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Row {
        target: target.to_owned(),
        operation: operation.to_owned(),
        concurrency,
        calls: latencies.len(),
        calls_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    })
}

/// `n` KMS v2 clients, each with its own connection to `socket`.
pub async fn kms_clients(
    socket: &Path,
    n: usize,
) -> Result<Vec<KeyManagementServiceClient<tonic::transport::Channel>>, BenchError> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(
            kubekms::plugin::client::connect(socket)
                .await
                .map_err(|e| BenchError::Connect(socket.to_owned(), e))?,
        );
    }
    Ok(clients)
}

/// Measures Status on `floor`, and Encrypt and Decrypt on `plugin`, at each concurrency.
pub async fn plugin_rows(
    plugin_name: &str,
    plugin: &Path,
    floor: &Path,
    concurrencies: &[usize],
    calls: usize,
) -> Result<Vec<Row>, BenchError> {
    let mut setup = kubekms::plugin::client::connect(plugin)
        .await
        .map_err(|e| BenchError::Connect(plugin.to_owned(), e))?;
    let sample =
        setup.encrypt(EncryptRequest { plaintext: vec![7; 32], uid: "bench".into() }).await?.into_inner();
    let decrypt = DecryptRequest {
        ciphertext: sample.ciphertext,
        uid: "bench".into(),
        key_id: sample.key_id,
        annotations: sample.annotations,
    };
    let mut rows = Vec::new();
    for &n in concurrencies {
        rows.push(
            measure("floor", "empty call", kms_clients(floor, n).await?, calls, |mut c, _| async move {
                c.status(StatusRequest {}).await.map(|_| ())
            })
            .await?,
        );
        rows.push(
            measure(plugin_name, "Encrypt", kms_clients(plugin, n).await?, calls, |mut c, i| async move {
                c.encrypt(EncryptRequest { plaintext: vec![7; 32], uid: format!("b{i}") }).await.map(|_| ())
            })
            .await?,
        );
        let req = decrypt.clone();
        rows.push(
            measure(plugin_name, "Decrypt", kms_clients(plugin, n).await?, calls, move |mut c, _| {
                let req = req.clone();
                async move { c.decrypt(req).await.map(|_| ()) }
            })
            .await?,
        );
    }
    Ok(rows)
}

/// The key API: GenerateRandom (the floor: authenticated, audited, no key), Encrypt and
/// GenerateDataKey, at each concurrency, each caller on its own connection. Tokens are
/// cached by the server after the warm-up, so this measures the authenticated steady state.
pub async fn keyapi_rows(
    connect: impl AsyncFn() -> Result<kubekms::client::Client, kubekms::client::ClientError>,
    key: &str,
    concurrencies: &[usize],
    calls: usize,
) -> Result<Vec<Row>, BenchError> {
    use kubekms::proto::keyapi::{EncryptRequest, GenerateDataKeyRequest, GenerateRandomRequest};
    let mut rows = Vec::new();
    for &n in concurrencies {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(connect().await.map_err(|e| BenchError::Call(Status::unavailable(e.to_string())))?);
        }
        rows.push(
            measure("floor", "GenerateRandom", clients.clone(), calls, |mut c, _| async move {
                c.generate_random(GenerateRandomRequest { number_of_bytes: 32 }).await.map(|_| ())
            })
            .await?,
        );
        let k = key.to_owned();
        rows.push(
            measure("kubekms", "Encrypt", clients.clone(), calls, move |mut c, _| {
                let key = k.clone();
                async move {
                    c.encrypt(EncryptRequest {
                        key,
                        plaintext: vec![7; 32],
                        encryption_context: Default::default(),
                    })
                    .await
                    .map(|_| ())
                }
            })
            .await?,
        );
        let k = key.to_owned();
        rows.push(
            measure("kubekms", "GenerateDataKey", clients, calls, move |mut c, _| {
                let key = k.clone();
                async move {
                    c.generate_data_key(GenerateDataKeyRequest {
                        key,
                        encryption_context: Default::default(),
                        number_of_bytes: 32,
                    })
                    .await
                    .map(|_| ())
                }
            })
            .await?,
        );
    }
    Ok(rows)
}

/// The rows as a table, each latency and throughput also as a ratio to the floor at the
/// same concurrency.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| target | operation | callers | calls/s | p50 µs | p99 µs | p50 × floor | calls/s ÷ floor |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let floor = rows.iter().find(|f| f.target == "floor" && f.concurrency == r.concurrency);
        let (lat, thr) = match floor {
            Some(f) if f.p50_us > 0.0 && f.calls_per_second > 0.0 => (
                format!("{:.2}", r.p50_us / f.p50_us),
                format!("{:.2}", r.calls_per_second / f.calls_per_second),
            ),
            _ => ("-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
            r.target, r.operation, r.concurrency, r.calls_per_second, r.p50_us, r.p99_us, lat, thr
        ));
    }
    out
}

/// `kubekms bench plugin`: against the plugin at `socket`, or an in-process plugin with a
/// random key when `socket` is `None`.
pub async fn run_plugin_bench(
    socket: Option<&Path>,
    concurrencies: &[usize],
    calls: usize,
) -> Result<Vec<Row>, BenchError> {
    let dir = tempfile_dir()?;
    let stop = CancellationToken::new();
    let floor = start_floor(dir.path(), stop.clone()).await?;
    let (name, plugin) = match socket {
        Some(s) => ("plugin".to_owned(), s.to_owned()),
        None => ("kubekms".to_owned(), start_local_plugin(dir.path(), stop.clone()).await?),
    };
    let rows = plugin_rows(&name, &plugin, &floor, concurrencies, calls).await;
    stop.cancel();
    rows
}

/// A private temporary directory for the benchmark's sockets.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> Result<TempDir, BenchError> {
    let dir = std::env::temp_dir().join(format!("kubekms-bench-{}", uuid::Uuid::new_v4().simple()));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&dir)
        .map_err(BenchError::TempDir)?;
    Ok(TempDir(dir))
}

#[derive(Subcommand)]
pub enum Command {
    /// KMS v2 Encrypt and Decrypt over a unix socket, next to an empty gRPC call on the same
    /// kind of socket (the floor). Without --socket it runs an in-process plugin with a
    /// random key; with --socket it measures the plugin listening there.
    Plugin {
        /// A running plugin's socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Calls per measurement.
        #[arg(long, default_value_t = 20000)]
        calls: usize,
        /// Concurrent callers, each on its own connection (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Also write the rows as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// The key API's Encrypt and GenerateDataKey next to GenerateRandom (the floor: an
    /// authenticated, audited call that touches no key), against a running server.
    Keyapi {
        #[command(flatten)]
        key_api: KeyApiArgs,
        /// The key to use, as NAMESPACE/NAME.
        #[arg(long)]
        key: String,
        /// Calls per measurement.
        #[arg(long, default_value_t = 5000)]
        calls: usize,
        /// Concurrent callers, each on its own connection (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Also write the rows as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// The key API's valid callers (Encrypt, then Decrypt) alone, then while a flood of bad
    /// requests hits it: junk and expired tokens, oversized requests, forged AWS sessions,
    /// junk STS tokens and connections that send nothing. Prints both phases and what the
    /// flood got back.
    Flood(Box<super::flood::FloodArgs>),
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Flood(args) => {
                let report = super::flood::run(&args).await?;
                print!("{}", super::flood::table(&report));
                if let Some(path) = &args.json {
                    std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                        .with_context(|| format!("failed to write {}", path.display()))?;
                }
            }
            Command::Plugin { socket, calls, concurrency, json } => {
                check_load(calls, &concurrency)?;
                let rows = run_plugin_bench(socket.as_deref(), &concurrency, calls).await?;
                print_rows(&rows, json.as_deref())?;
            }
            Command::Keyapi { key_api, key, calls, concurrency, json } => {
                check_load(calls, &concurrency)?;
                let token = key_api.token()?;
                let connect = async || key_api.connect_with(&token).await;
                let rows = keyapi_rows(connect, &key, &concurrency, calls).await?;
                print_rows(&rows, json.as_deref())?;
            }
        }
        Ok(())
    }
}

/// Refuses a measurement of no calls, or with no callers.
fn check_load(calls: usize, concurrency: &[usize]) -> anyhow::Result<()> {
    anyhow::ensure!(
        calls > 0 && concurrency.iter().all(|&c| c > 0),
        "--calls and --concurrency must be positive"
    );
    Ok(())
}

fn print_rows(rows: &[Row], json: Option<&std::path::Path>) -> anyhow::Result<()> {
    print!("{}", table(rows));
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(rows)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smoke run with tiny sizes, so the benchmark cannot rot. It checks that every row is
    /// measured, not how fast anything is.
    #[test]
    fn a_measurement_has_calls_and_callers() {
        assert!(check_load(1, &[1, 16]).is_ok());
        for (calls, concurrency) in [(0, &[1][..]), (20, &[1, 0]), (0, &[0])] {
            let err = check_load(calls, concurrency).unwrap_err();
            assert_eq!(err.to_string(), "--calls and --concurrency must be positive");
        }
        // The flags parse; the check above is what refuses them.
        assert!(crate::cli::parse(&["bench", "plugin", "--calls", "0", "--concurrency", "1,0"]).is_ok());
    }

    #[tokio::test]
    async fn smoke() {
        let rows = run_plugin_bench(None, &[1, 4], 40).await.unwrap();
        assert_eq!(rows.len(), 6);
        assert!(rows.iter().all(|r| r.calls >= 40 && r.calls_per_second > 0.0 && r.p99_us >= r.p50_us));
        let table = table(&rows);
        assert!(table.contains("| kubekms | Encrypt | 4 |") && table.contains("| floor | empty call | 1 |"));
    }
}
