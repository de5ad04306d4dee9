//! Process counters, exported in the Prometheus text format at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::error::ErrorCode;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One counter per [`ErrorCode`]: the label set is the catalogue, so it is bounded and
/// every code is exported (at 0) before it first happens.
#[derive(Debug)]
pub struct CountsByCode(Vec<Counter>);

impl Default for CountsByCode {
    fn default() -> Self {
        Self(ErrorCode::ALL.iter().map(|_| Counter::default()).collect())
    }
}

impl CountsByCode {
    pub fn inc(&self, code: ErrorCode) {
        self.counter(code).inc();
    }

    pub fn get(&self, code: ErrorCode) -> u64 {
        self.counter(code).get()
    }

    fn counter(&self, code: ErrorCode) -> &Counter {
        let index = ErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .expect("ALL lists every code");
        &self.0[index]
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub events_logged: Counter,
    pub broadcasts: Counter,
    pub broadcast_failures: Counter,
    pub replayed: Counter,
    pub slow_consumers: Counter,
    pub socket_errors: Counter,
    /// HTTP error responses (status 4xx and 5xx), by the code of their body.
    pub http_errors: CountsByCode,
    /// Socket.IO connections refused at the handshake (bad or missing credentials), by code.
    pub auth_refusals: CountsByCode,
    pub ingest_retries: Counter,
    /// Socket.IO emitters' messages forwarded to the ingest stream, one per session room.
    pub emitter_forwarded: Counter,
    /// Socket.IO emitters' messages refused (described in the ingest errors stream).
    pub emitter_refused: Counter,
    /// Socket.IO emitters' messages dropped because the translator fell behind.
    pub emitter_dropped: Counter,
}

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let counters: [(&str, &str, u64); 10] = [
            (
                "herald_events_logged_total",
                "Events appended to session logs.",
                self.events_logged.get(),
            ),
            (
                "herald_broadcasts_total",
                "Events broadcast to session rooms.",
                self.broadcasts.get(),
            ),
            (
                "herald_broadcast_failures_total",
                "Broadcasts that did not reach every socket.",
                self.broadcast_failures.get(),
            ),
            (
                "herald_replayed_events_total",
                "Events sent as replay on subscribe.",
                self.replayed.get(),
            ),
            (
                "herald_slow_consumers_total",
                "Sockets disconnected for not draining their queue.",
                self.slow_consumers.get(),
            ),
            (
                "herald_socket_errors_total",
                "Error events sent to sockets for bad input.",
                self.socket_errors.get(),
            ),
            (
                "herald_ingest_retries_total",
                "Redis ingest entries whose logging failed for a backend error and is retried.",
                self.ingest_retries.get(),
            ),
            (
                "herald_emitter_forwarded_total",
                "Socket.IO emitter messages (python-socketio, @socket.io/redis-emitter) forwarded to the ingest stream, one per session room.",
                self.emitter_forwarded.get(),
            ),
            (
                "herald_emitter_refused_total",
                "Socket.IO emitter messages refused; each is described in the ingest errors stream.",
                self.emitter_refused.get(),
            ),
            (
                "herald_emitter_dropped_total",
                "Socket.IO emitter messages dropped because the translator fell behind (pub/sub is at most once).",
                self.emitter_dropped.get(),
            ),
        ];
        let gauges: [(&str, &str, i64); 2] = [
            (
                "herald_connections",
                "Connected Socket.IO sockets.",
                self.connections.get(),
            ),
            (
                "herald_subscriptions",
                "Active session subscriptions.",
                self.subscriptions.get(),
            ),
        ];
        let mut out = String::with_capacity(1024);
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        render_by_code(
            &mut out,
            "herald_http_errors_total",
            "HTTP requests answered with an error (4xx or 5xx), by error code.",
            &self.http_errors,
        );
        render_by_code(
            &mut out,
            "herald_connect_refusals_total",
            "Socket.IO connections refused for their credentials, by error code.",
            &self.auth_refusals,
        );
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// `name{code="SESSION_NOT_FOUND"} 3`, one line per code.
fn render_by_code(out: &mut String, name: &str, help: &str, counts: &CountsByCode) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for code in ErrorCode::ALL {
        let value = counts.get(*code);
        let _ = writeln!(out, "{name}{{code=\"{code}\"}} {value}");
    }
}
