//! Process counters, gauges and histograms, exported in the Prometheus text format at
//! `/metrics`.
//!
//! Hand-written rather than a client crate's: the exporter is small, its output is the
//! classic text format every Prometheus scrapes (the OpenMetrics output of
//! `prometheus-client` would change the existing series' exposition), and an observation
//! here is two relaxed atomic adds with no lock and no allocation (`prometheus-client`'s
//! histogram takes a mutex per observation). Every label set is fixed at start (error codes,
//! provider kinds, outcomes), so the series are known and bounded before anything happens.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorCode;
use crate::orchestrator::config::ProviderKind;

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
        &self.0[index_of(ErrorCode::ALL, &code)]
    }
}

/// Bucket upper bounds, in seconds, of `herald_publish_to_deliver_seconds`: an in-memory
/// publish is delivered in tens of microseconds, a Redis or data-dir one in milliseconds.
pub const PUBLISH_TO_DELIVER_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// ... of `herald_delivery_lag_seconds`, measured against timestamps with millisecond
/// precision; a run waits up to 30 s (`--run-log-deadline-secs`) for an unreachable log.
pub const DELIVERY_LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// ... of `herald_provider_first_token_seconds`.
pub const FIRST_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// ... of `herald_provider_duration_seconds` (a model's timeout is 120 s by default).
pub const PROVIDER_DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// ... of `herald_run_duration_seconds`: a run may wait for clarifications (300 s each by
/// default).
pub const RUN_DURATION_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

/// A Prometheus histogram with fixed buckets, lock-free: an observation is two relaxed
/// atomic adds (its bucket, the sum). Counts are kept per bucket and made cumulative when
/// rendered, and the count is their total, so the `+Inf` bucket always equals `_count`.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending (`le`).
    bounds: &'static [f64],
    /// The same bounds in nanoseconds, so that placing a [`Duration`] is exact.
    bounds_ns: Box<[u64]>,
    /// Observations per bucket, not cumulative: `counts[i]` holds those above
    /// `bounds[i - 1]` and at most `bounds[i]`; the last one those above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of every observation, in nanoseconds (it would take 584 years of observed
    /// time to wrap).
    sum_ns: AtomicU64,
}

impl Histogram {
    /// A histogram with these bucket bounds (seconds, strictly ascending, finite).
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()),
            "bucket bounds must be finite and strictly ascending"
        );
        Self {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9).round() as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound is at least the value: `le` is inclusive.
        let bucket = self.bounds_ns.partition_point(|bound| *bound < ns);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// `name_bucket{labels,le="..."}` lines (cumulative, `+Inf` last), then `name_sum` and
    /// `name_count`. `labels` is the series' own labels (`provider="openai"`), or empty.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let _ = match self.bounds.get(i) {
                Some(bound) => writeln!(
                    out,
                    "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
                ),
                None => writeln!(
                    out,
                    "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
                ),
            };
        }
        let braces = |labels: &str| match labels.is_empty() {
            true => String::new(),
            false => format!("{{{labels}}}"),
        };
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// Histograms of one metric, one per label set of a fixed list.
#[derive(Debug)]
pub struct Family {
    /// Each series' labels as written between the braces (`provider="openai"`).
    series: Box<[(String, Histogram)]>,
}

impl Family {
    fn new(bounds: &'static [f64], labels: impl IntoIterator<Item = String>) -> Self {
        Self {
            series: labels
                .into_iter()
                .map(|labels| (labels, Histogram::new(bounds)))
                .collect(),
        }
    }

    fn get(&self, index: usize) -> &Histogram {
        &self.series[index].1
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (labels, histogram) in &self.series {
            histogram.render(out, name, labels);
        }
    }
}

/// How one provider request (one attempt) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Its stream ended and the output was taken.
    Ok,
    /// It failed: the provider's error, a malformed stream, output over the limit.
    Error,
    /// The model's `timeout_secs` passed first.
    Timeout,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 3] = [Self::Ok, Self::Error, Self::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Timeout => "timeout",
        }
    }
}

/// How an orchestrated session's run ended on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// `completed`.
    Completed,
    /// FAILED: every prompt failed (`ALL_PROMPTS_FAILED`), or the log stayed unreachable
    /// (`BACKEND_UNAVAILABLE`).
    Failed,
    /// FAILED with `CANCELLED`.
    Cancelled,
    /// EXPIRED: a clarification was not answered in time.
    Expired,
    /// FAILED with `NODE_LOST`: the node shut down and nothing could resume the run.
    Lost,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 5] = [
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::Expired,
        Self::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Lost => "lost",
        }
    }
}

fn index_of<T: PartialEq>(all: &[T], item: &T) -> usize {
    all.iter()
        .position(|x| x == item)
        .expect("ALL lists every value")
}

/// The latency histograms (docs/deployment.md, "Metrics", says what each one measures).
#[derive(Debug)]
pub struct Timings {
    /// From the hub accepting a publish to the event being in every local subscriber's
    /// queue, for the events this node logs.
    pub publish_to_deliver: Histogram,
    /// At each event this node delivers (its own and other nodes'): now minus the event's
    /// `timestamp`.
    pub delivery_lag: Histogram,
    /// Per provider kind.
    provider_first_token: Family,
    /// Per provider kind and [`AttemptOutcome`].
    provider_duration: Family,
    /// Per [`RunOutcome`].
    run_duration: Family,
}

impl Default for Timings {
    fn default() -> Self {
        let providers = || ProviderKind::ALL.iter().map(|p| p.as_str());
        Self {
            publish_to_deliver: Histogram::new(PUBLISH_TO_DELIVER_BUCKETS),
            delivery_lag: Histogram::new(DELIVERY_LAG_BUCKETS),
            provider_first_token: Family::new(
                FIRST_TOKEN_BUCKETS,
                providers().map(|p| format!("provider=\"{p}\"")),
            ),
            provider_duration: Family::new(
                PROVIDER_DURATION_BUCKETS,
                providers().flat_map(|p| {
                    AttemptOutcome::ALL
                        .iter()
                        .map(move |o| format!("provider=\"{p}\",outcome=\"{}\"", o.as_str()))
                }),
            ),
            run_duration: Family::new(
                RUN_DURATION_BUCKETS,
                RunOutcome::ALL
                    .iter()
                    .map(|o| format!("outcome=\"{}\"", o.as_str())),
            ),
        }
    }
}

impl Timings {
    pub fn provider_first_token(&self, provider: ProviderKind) -> &Histogram {
        self.provider_first_token
            .get(index_of(&ProviderKind::ALL, &provider))
    }

    pub fn provider_duration(&self, provider: ProviderKind, outcome: AttemptOutcome) -> &Histogram {
        let p = index_of(&ProviderKind::ALL, &provider);
        let o = index_of(&AttemptOutcome::ALL, &outcome);
        self.provider_duration
            .get(p * AttemptOutcome::ALL.len() + o)
    }

    pub fn run_duration(&self, outcome: RunOutcome) -> &Histogram {
        self.run_duration.get(index_of(&RunOutcome::ALL, &outcome))
    }

    fn render(&self, out: &mut String) {
        for (name, help, histogram) in [
            (
                "herald_publish_to_deliver_seconds",
                "From the hub accepting a publish on this node to the event being queued to every local subscriber (events this node logs).",
                &self.publish_to_deliver,
            ),
            (
                "herald_delivery_lag_seconds",
                "At each event this node delivers to its local subscribers (its own and other nodes'): wall-clock now minus the event's timestamp.",
                &self.delivery_lag,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            histogram.render(out, name, "");
        }
        self.provider_first_token.render(
            out,
            "herald_provider_first_token_seconds",
            "From a provider request's start to its first non-empty piece of output, by provider kind.",
        );
        self.provider_duration.render(
            out,
            "herald_provider_duration_seconds",
            "One provider request (attempt), from its start to its end, by provider kind and outcome.",
        );
        self.run_duration.render(
            out,
            "herald_run_duration_seconds",
            "An orchestrated session's run, from its creation to its terminal status, by outcome.",
        );
    }
}

/// What this binary is, for `herald_build_info`.
#[derive(Debug, Clone, Copy)]
pub struct BuildInfo {
    pub version: &'static str,
    /// The git commit built (abbreviated), `unknown` when built outside a git checkout.
    pub commit: &'static str,
    /// The compiler's version, `unknown` when it could not be asked.
    pub rustc: &'static str,
}

impl BuildInfo {
    /// This build's, as `build.rs` found it.
    pub const THIS: BuildInfo = BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("HERALD_GIT_COMMIT"),
        rustc: env!("HERALD_RUSTC_VERSION"),
    };

    fn render(&self, out: &mut String) {
        let name = "herald_build_info";
        let _ = writeln!(
            out,
            "# HELP {name} The herald build serving: version, git commit and compiler; always 1.\n\
             # TYPE {name} gauge\n\
             {name}{{version=\"{}\",commit=\"{}\",rustc=\"{}\"}} 1",
            escape(self.version),
            escape(self.commit),
            escape(self.rustc)
        );
    }
}

/// A label value as the text format writes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Connected subscribers of every transport: Socket.IO sockets, SSE streams (both
    /// routes) and plain WebSocket connections.
    pub connections: Gauge,
    /// Session subscriptions held by those subscribers (a feed watch is not one).
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
    /// The latency histograms.
    pub timings: Timings,
}

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.render_with(&BuildInfo::THIS)
    }

    fn render_with(&self, build: &BuildInfo) -> String {
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
                "Connected subscribers on this node: Socket.IO sockets, SSE streams and plain WebSocket connections.",
                self.connections.get(),
            ),
            (
                "herald_subscriptions",
                "Session subscriptions those subscribers hold on this node.",
                self.subscriptions.get(),
            ),
        ];
        let mut out = String::with_capacity(16 * 1024);
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
        self.timings.render(&mut out);
        build.render(&mut out);
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

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.005, 0.01, 1.0];

    /// `(le, cumulative count)` of every `name_bucket` line, in order.
    fn buckets(text: &str, name: &str) -> Vec<(String, u64)> {
        text.lines()
            .filter_map(|line| line.strip_prefix(&format!("{name}_bucket{{")))
            .map(|rest| {
                let (labels, value) = rest.split_once("} ").unwrap();
                let le = labels.rsplit_once("le=\"").unwrap().1.trim_end_matches('"');
                (le.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn an_observation_on_a_bound_lands_in_that_bucket_and_just_above_it_in_the_next() {
        let histogram = Histogram::new(BOUNDS);
        let at = |d: Duration| {
            let before: Vec<u64> = histogram
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            histogram.observe(d);
            histogram
                .counts
                .iter()
                .zip(before)
                .position(|(c, b)| c.load(Ordering::Relaxed) == b + 1)
                .unwrap()
        };
        assert_eq!(at(Duration::ZERO), 0);
        assert_eq!(at(Duration::from_millis(5)), 0, "le is inclusive");
        assert_eq!(at(Duration::from_nanos(5_000_001)), 1);
        assert_eq!(at(Duration::from_millis(10)), 1);
        assert_eq!(at(Duration::from_secs(1)), 2);
        assert_eq!(
            at(Duration::from_nanos(1_000_000_001)),
            3,
            "above every bound: +Inf"
        );
        assert_eq!(at(Duration::MAX), 3);
        assert_eq!(histogram.count(), 7);
    }

    #[test]
    fn buckets_render_cumulative_with_inf_equal_to_the_count() {
        let histogram = Histogram::new(BOUNDS);
        for ms in [1, 5, 7, 10, 500, 2_000, 3_000] {
            histogram.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        histogram.render(&mut out, "h_seconds", "");
        assert_eq!(
            buckets(&out, "h_seconds"),
            [
                ("0.005".to_owned(), 2),
                ("0.01".to_owned(), 4),
                ("1".to_owned(), 5),
                ("+Inf".to_owned(), 7),
            ]
        );
        assert_eq!(value(&out, "h_seconds_count").as_deref(), Some("7"));
        let sum: f64 = value(&out, "h_seconds_sum").unwrap().parse().unwrap();
        assert!((sum - 5.523).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn labelled_series_carry_their_labels_before_le() {
        let metrics = Metrics::default();
        metrics
            .timings
            .provider_duration(ProviderKind::Openai, AttemptOutcome::Timeout)
            .observe(Duration::from_secs(200));
        metrics
            .timings
            .run_duration(RunOutcome::Cancelled)
            .observe(Duration::from_secs(1));
        let text = metrics.render();
        let series = "herald_provider_duration_seconds_bucket{provider=\"openai\",outcome=\"timeout\",le=\"300\"}";
        assert_eq!(value(&text, series).as_deref(), Some("1"), "{text}");
        let other = "herald_provider_duration_seconds_count{provider=\"openai\",outcome=\"ok\"}";
        assert_eq!(value(&text, other).as_deref(), Some("0"));
        let run = "herald_run_duration_seconds_count{outcome=\"cancelled\"}";
        assert_eq!(value(&text, run).as_deref(), Some("1"));
        // Every series is there before its first observation: 3 provider kinds × 3 outcomes.
        let counts = text
            .lines()
            .filter(|l| l.starts_with("herald_provider_duration_seconds_count{"))
            .count();
        assert_eq!(counts, 9);
        assert!(text.contains("# TYPE herald_run_duration_seconds histogram"));
    }

    #[test]
    fn build_info_is_one_series_with_escaped_labels() {
        let build = BuildInfo {
            version: "1.2.3",
            commit: "unknown",
            rustc: "1.90 \"x\"",
        };
        let text = Metrics::default().render_with(&build);
        let line =
            "herald_build_info{version=\"1.2.3\",commit=\"unknown\",rustc=\"1.90 \\\"x\\\"\"}";
        assert_eq!(value(&text, line).as_deref(), Some("1"), "{text}");
        assert!(BuildInfo::THIS.version == env!("CARGO_PKG_VERSION"));
        assert!(!BuildInfo::THIS.commit.is_empty());
    }
}
