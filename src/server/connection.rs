//! One accepted connection: HTTP/1.1 through hyper (with upgrades, for websockets), its
//! slot under `--max-connections`, and the header read timeout's answer.
//!
//! hyper's header read timeout closes a connection without a word. A client that began a
//! request and did not finish its head in time gets `408 Request Timeout` (SPEC §5) before
//! the close instead; a connection that sent nothing (a fresh one, or one idle between
//! requests) is closed silently, as nginx and Node do, so that a kept-alive connection a
//! client is about to reuse never carries a stray answer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// What a client that did not finish its request head in time is told.
const HEAD_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: application/json\r\n\
connection: close\r\n\
content-length: 90\r\n\
\r\n\
{\"error\":{\"code\":\"REQUEST_TIMEOUT\",\"message\":\"the request head was not received in time\"}}";

/// Serves `stream` over HTTP/1.1 with upgrades, holding `slot` for as long as the stream
/// lives (for a websocket, until the socket closes, long after hyper handed it over).
pub(super) async fn serve(
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    draining: CancellationToken,
) {
    let head_timed_out = Arc::new(AtomicBool::new(false));
    let io = Counted {
        stream,
        _slot: slot,
        mid_head: false,
        head_timed_out: head_timed_out.clone(),
    };
    let service = app.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        // Only hyper's head timer ends a connection with a timeout; the body deadline is
        // answered by the service itself.
        if error.is_timeout() {
            head_timed_out.store(true, Ordering::Relaxed);
        }
        tracing::trace!(%peer, %error, "connection ended");
    }
    // Dropping the connection drops the stream, which answers a timed-out head.
}

/// A connection's stream with its slot under `--max-connections`, and what it needs to
/// answer a head that timed out: whether bytes came in since herald last wrote (a request
/// head is under way), and the flag `serve` raises when hyper's head timer fired.
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    mid_head: bool,
    head_timed_out: Arc<AtomicBool>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.mid_head && self.head_timed_out.load(Ordering::Relaxed) {
            // A direct send(2): the answer is a few hundred bytes, which an open socket's
            // send buffer takes whole; if it does not, the close says the rest.
            let _ = socket2::SockRef::from(&self.stream).send(HEAD_TIMEOUT_RESPONSE);
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.mid_head = true;
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.mid_head = false;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.mid_head = false;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_answer_is_well_formed() {
        let text = std::str::from_utf8(HEAD_TIMEOUT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body.trim_end()).unwrap();
        assert_eq!(
            json["error"]["code"],
            crate::error::ErrorCode::RequestTimeout.as_str()
        );
    }
}
