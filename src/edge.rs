//! The limits of the HTTP edge (SPEC §5, "Bounded everything"): keyed request-rate
//! limiters per client address and per credential, and the deadline of a request body.
//!
//! The accept loop (connection cap, header timeout) is in `server.rs`; the middleware that
//! applies these to each request, and the errors it answers, are in `http.rs`.

use std::error::Error as StdError;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use governor::{DefaultKeyedRateLimiter, Quota};
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// Keys one limiter holds at most. A key costs some 50 bytes, so the cap is a few MB; a
/// flood from more addresses than this shares one bucket until idle keys are forgotten.
const MAX_KEYS: usize = 100_000;

/// How often idle keys (whose bucket has refilled) are forgotten.
const RETAIN_EVERY: Duration = Duration::from_secs(10);

/// Requests between two checks of a limiter's size.
const SIZE_CHECK_EVERY: u64 = 1024;

/// The edge's settings (`Config::edge_limits`).
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub per_address: Option<Rate>,
    pub per_credential: Option<Rate>,
    /// Ingest events (items of a batch, each counted) per credential.
    pub ingest_per_credential: Option<Rate>,
    /// Whether the per-address limit applies to loopback clients too.
    pub limit_loopback: bool,
}

/// A sustained rate (requests per second) and a burst above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    per_second: NonZeroU32,
    burst: NonZeroU32,
}

impl Rate {
    /// `None` for a rate of 0 (no limit). A burst below the rate is raised to it.
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        let per_second = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst.max(per_second.get()))?;
        Some(Self { per_second, burst })
    }

    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// A request over a limit: try again in this many whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u64);

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Address(RetryAfter),
    Credential(RetryAfter),
    /// Ingest events per credential.
    Events(RetryAfter),
}

/// The per-address and per-credential request-rate limiters, shared by every connection.
pub struct RateLimits {
    per_address: Option<KeyedLimiter<IpAddr>>,
    per_credential: Option<KeyedLimiter<u64>>,
    ingest_per_credential: Option<KeyedLimiter<u64>>,
    /// Credentials are keyed by a hash of their subject: no allocation per request.
    hasher: RandomState,
    limit_loopback: bool,
}

impl RateLimits {
    pub fn new(limits: &EdgeLimits) -> Self {
        Self {
            per_address: limits
                .per_address
                .map(|rate| KeyedLimiter::new(rate, IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
            per_credential: limits.per_credential.map(|rate| KeyedLimiter::new(rate, 0)),
            ingest_per_credential: limits
                .ingest_per_credential
                .map(|rate| KeyedLimiter::new(rate, 0)),
            hasher: RandomState::new(),
            limit_loopback: limits.limit_loopback,
        }
    }

    pub fn limits_credentials(&self) -> bool {
        self.per_credential.is_some()
    }

    /// Counts a request from `addr` against its address's budget.
    pub fn check_address(&self, addr: IpAddr) -> Result<(), Limited> {
        let Some(limiter) = &self.per_address else {
            return Ok(());
        };
        let addr = address_key(addr);
        if addr.is_loopback() && !self.limit_loopback {
            return Ok(());
        }
        limiter.check(addr).map_err(Limited::Address)
    }

    /// Counts a request by `subject` (a token's `sub`, `key:<name>`) against its budget.
    pub fn check_credential(&self, subject: &str) -> Result<(), Limited> {
        let Some(limiter) = &self.per_credential else {
            return Ok(());
        };
        // 0 is the overflow bucket's key; a subject hashing to it merely shares that bucket.
        limiter
            .check(self.hasher.hash_one(subject))
            .map_err(Limited::Credential)
    }

    /// Counts `events` ingested by `subject` against its event budget. A batch larger than
    /// the burst can never pass; the burst is at least `--max-batch` (`Config::edge_limits`).
    pub fn check_ingest(&self, subject: &str, events: usize) -> Result<(), Limited> {
        let Some(limiter) = &self.ingest_per_credential else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        limiter
            .check_n(self.hasher.hash_one(subject), n)
            .map_err(Limited::Events)
    }

    /// Keys held by the address and credential limiters (for tests and metrics).
    pub fn keys_held(&self) -> (usize, usize) {
        (
            self.per_address.as_ref().map_or(0, KeyedLimiter::len),
            self.per_credential.as_ref().map_or(0, KeyedLimiter::len),
        )
    }
}

/// The address a client is counted under: IPv4 as is (an IPv4-mapped IPv6 address as the
/// IPv4 one), IPv6 by its /64, the smallest block a single subscriber is usually given.
fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// governor's keyed limiter, with the number of keys it holds bounded.
struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    /// The key every request is counted under while the limiter is full.
    overflow_key: K,
    overflowing: AtomicBool,
    requests: AtomicU64,
    /// Milliseconds after `started` of the last forgetting of idle keys.
    last_retain_ms: AtomicU64,
    started: Instant,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    fn new(rate: Rate, overflow_key: K) -> Self {
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(rate.quota()),
            overflow_key,
            overflowing: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            last_retain_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn len(&self) -> usize {
        self.limiter.len()
    }

    fn check(&self, key: K) -> Result<(), RetryAfter> {
        self.bound_keys();
        let key = if self.overflowing.load(Ordering::Relaxed) {
            &self.overflow_key
        } else {
            &key
        };
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(Instant::now());
            RetryAfter(whole_seconds(wait))
        })
    }

    /// [`Self::check`] for `n` units at once (all or none).
    fn check_n(&self, key: K, n: NonZeroU32) -> Result<(), RetryAfter> {
        self.bound_keys();
        let key = if self.overflowing.load(Ordering::Relaxed) {
            &self.overflow_key
        } else {
            &key
        };
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RetryAfter(whole_seconds(
                not_until.wait_time_from(Instant::now()),
            ))),
            // More than the burst: never passes as one batch (not reached: see check_ingest).
            Err(_) => Err(RetryAfter(1)),
        }
    }

    /// Forgets idle keys every [`RETAIN_EVERY`], and, every [`SIZE_CHECK_EVERY`] requests,
    /// switches to the shared overflow bucket while more than [`MAX_KEYS`] are held.
    fn bound_keys(&self) {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_retain_ms.load(Ordering::Relaxed);
        let retain_due = now_ms.saturating_sub(last) >= RETAIN_EVERY.as_millis() as u64
            && self
                .last_retain_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        let size_due = self
            .requests
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIZE_CHECK_EVERY);
        if !retain_due && !size_due {
            return;
        }
        if retain_due || self.limiter.len() > MAX_KEYS {
            self.limiter.retain_recent();
        }
        let full = self.limiter.len() > MAX_KEYS;
        if self.overflowing.swap(full, Ordering::Relaxed) != full && full {
            tracing::warn!(
                keys = MAX_KEYS,
                "rate limiter full: clients beyond it share one bucket until idle keys are forgotten"
            );
        }
    }
}

/// `wait` in whole seconds, rounded up, at least 1 (`Retry-After` has no fractions).
fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// A request body that must be received in full by a deadline (`--body-timeout-ms`).
///
/// tower-http's `TimeoutBody` bounds the wait for each frame, so a client trickling a
/// byte at a time never trips it; this bounds the whole body. When the deadline passes the
/// body fails with [`BodyTimedOut`] and raises its flag, which the middleware reads to
/// answer 408 and close the connection whatever the handler made of the error.
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

impl DeadlineBody {
    /// Wraps `inner`; the returned flag is raised if the deadline passes first.
    pub fn new(inner: Body, timeout: Duration) -> (Self, Arc<AtomicBool>) {
        let expired = Arc::new(AtomicBool::new(false));
        let body = Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            expired: expired.clone(),
        };
        (body, expired)
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        // Data already here is taken even at the deadline.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body did not arrive within `--body-timeout-ms`.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within the body timeout (--body-timeout-ms)")]
pub struct BodyTimedOut;

/// Whether `error` is, or was caused by, a [`BodyTimedOut`].
pub fn is_body_timeout(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyTimedOut>() {
            return true;
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(10)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(address_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_burst_passes_then_the_address_is_limited_and_others_are_not() {
        let limits = RateLimits::new(&EdgeLimits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            max_connections: 1,
            per_address: Rate::new(1, 3),
            per_credential: Rate::new(1, 2),
            ingest_per_credential: Rate::new(10, 10),
            limit_loopback: false,
        });
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limits.check_address(one), Ok(()));
        }
        assert!(matches!(
            limits.check_address(one),
            Err(Limited::Address(RetryAfter(1)))
        ));
        assert_eq!(limits.check_address("10.0.0.2".parse().unwrap()), Ok(()));
        // Loopback is not limited unless asked.
        for _ in 0..10 {
            assert_eq!(limits.check_address("127.0.0.1".parse().unwrap()), Ok(()));
        }
        assert_eq!(limits.check_credential("alice"), Ok(()));
        assert_eq!(limits.check_credential("alice"), Ok(()));
        assert!(limits.check_credential("alice").is_err());
        assert_eq!(limits.check_credential("bob"), Ok(()));
        assert_eq!(limits.check_ingest("alice", 6), Ok(()));
        assert!(matches!(
            limits.check_ingest("alice", 6),
            Err(Limited::Events(_))
        ));
        assert_eq!(limits.check_ingest("alice", 4), Ok(()));
        assert_eq!(limits.check_ingest("bob", 10), Ok(()));
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        assert_eq!(Rate::new(0, 10), None);
        assert_eq!(Rate::new(5, 1), Rate::new(5, 5));
    }
}
