//! A bound on the connections one port of the key API holds at once — counted from accept,
//! before the TLS handshake, so that connections that never finish one (or idle ones held
//! by a broken or hostile client) cannot take every file descriptor and lock out the
//! callers behind them. Past the bound a new connection is closed at once and counted.

use std::io;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many connections a port holds by default.
pub const DEFAULT_MAX: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// The connections one port may hold, with its metrics.
#[derive(Clone)]
pub struct Slots {
    free: Arc<Semaphore>,
    max: usize,
    open: Gauge,
    refused: Counter,
}

/// One connection's slot, given back when it is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Slots {
    /// At most `max` connections.
    pub fn new(max: NonZeroUsize) -> Self {
        let max = max.get();
        Slots {
            free: Arc::new(Semaphore::new(max)),
            max,
            open: Gauge::default(),
            refused: Counter::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Registers `kubekms_server_connections` and `…_refused` for the port named `port`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry, port: &'static str) {
        let sub = registry.sub_registry_with_label(("port".into(), port.into()));
        sub.register("kubekms_server_connections", "Connections the port holds now", self.open.clone());
        sub.register(
            "kubekms_server_connections_refused",
            "Connections closed at accept because the port held its maximum",
            self.refused.clone(),
        );
    }

    /// A slot for a new connection, or `None` (counted) when all are taken.
    pub fn take(&self) -> Option<Slot> {
        match self.free.clone().try_acquire_owned() {
            Ok(permit) => {
                self.open.inc();
                Some(Slot { _permit: permit, open: self.open.clone() })
            }
            Err(_) => {
                self.refused.inc();
                None
            }
        }
    }

    /// Accepts the next connection that gets a slot; those that find none are closed.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, std::net::SocketAddr, Slot) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match self.take() {
                    Some(slot) => return (stream, peer, slot),
                    None => {
                        tracing::warn!(%peer, max = self.max, "closing a connection: the port holds its maximum")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The connections of `listener` that get a slot, each holding it while open: what
    /// the gRPC server serves.
    pub fn incoming(self, listener: TcpListener) -> impl futures::Stream<Item = io::Result<Held>> {
        futures::stream::unfold((self, listener), |(slots, listener)| async move {
            let (stream, _, slot) = slots.accept(&listener).await;
            Some((Ok(Held { stream, _slot: slot }), (slots, listener)))
        })
    }
}

/// A TCP connection and its slot.
pub struct Held {
    stream: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Held {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    use super::*;

    fn value(registry: &prometheus_client::registry::Registry, name: &str) -> Option<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).ok()?;
        text.lines().find(|l| l.starts_with(name)).map(str::to_owned)
    }

    #[tokio::test]
    async fn a_port_holds_its_maximum_and_closes_the_next_connection_until_one_ends() {
        let slots = Slots::new(NonZeroUsize::new(2).unwrap());
        let mut registry = prometheus_client::registry::Registry::default();
        slots.register(&mut registry, "grpc");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(slots.clone().incoming(listener));
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        let a = incoming.next().await.unwrap().unwrap();
        let _b = incoming.next().await.unwrap().unwrap();
        assert_eq!(
            value(&registry, "kubekms_server_connections{").as_deref(),
            Some(r#"kubekms_server_connections{port="grpc"} 2"#)
        );
        // A third is closed as soon as it is accepted (the stream waits for a slot).
        let mut third = TcpStream::connect(addr).await.unwrap();
        let accept_next = tokio::spawn(async move { incoming.next().await.map(|h| h.is_ok()) });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
        assert_eq!(read.expect("the third connection is closed, not held").unwrap(), 0);
        assert_eq!(
            value(&registry, "kubekms_server_connections_refused_total").as_deref(),
            Some(r#"kubekms_server_connections_refused_total{port="grpc"} 1"#)
        );
        // One ends: the next connection gets its slot.
        drop((a, first));
        let _fourth = TcpStream::connect(addr).await.unwrap();
        assert_eq!(accept_next.await.unwrap(), Some(true));
        assert_eq!(slots.max(), 2);
    }
}
