//! Logs, Prometheus metrics and health endpoints shared by every long-running component.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Installs the global log subscriber: JSON lines when `json`, readable text otherwise;
/// the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// An error and its causes on one line, for Events and conditions (never secret: errors
/// carry names and API messages only).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        match e.downcast_ref::<kube::Error>() {
            // The API server's own message, without the Debug dump of its Status.
            Some(kube::Error::Api(status)) => {
                text.push_str(&status.message);
                break;
            }
            _ => text.push_str(&e.to_string()),
        }
        source = e.source();
    }
    text
}

/// What `/healthz` and `/readyz` report.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    /// Unix seconds of the main loop's last sign of life.
    heartbeat: AtomicI64,
    /// How long the main loop may be silent before `/healthz` fails.
    stall_after_secs: i64,
}

impl Health {
    pub fn new(stall_after_secs: i64) -> Arc<Self> {
        Arc::new(Health {
            ready: AtomicBool::new(false),
            heartbeat: AtomicI64::new(jiff::Timestamp::now().as_second()),
            stall_after_secs,
        })
    }

    /// The main loop is alive.
    pub fn beat(&self) {
        self.heartbeat.store(jiff::Timestamp::now().as_second(), Ordering::Relaxed);
    }

    /// Whether the component is ready to do its work.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        jiff::Timestamp::now().as_second() - self.heartbeat.load(Ordering::Relaxed) <= self.stall_after_secs
    }
}

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    if s.health.is_live() { (StatusCode::OK, "ok\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "stalled\n") }
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed to encode metrics\n").into_response(),
    }
}

/// Binds the `/healthz`, `/readyz` and `/metrics` endpoints.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Shared { registry, health });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Starts the endpoints on `addr` in the background, if an address is given.
pub async fn spawn_endpoints(
    addr: Option<SocketAddr>,
    registry: Registry,
    health: Arc<Health>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = bind(addr).await?;
    Ok(Some(tokio::spawn(serve(listener, Arc::new(registry), health, shutdown.cancelled_owned()))))
}
