//! Authentication: a ServiceAccount (or any Kubernetes) bearer token, checked with a
//! TokenReview for the server's audience. Results are cached by the token's SHA-256 for a
//! bounded time, and never beyond the token's own expiry, in a bounded cache where rejected
//! tokens have a smaller bound of their own ([`Answers`]). Tokens without a cached answer
//! are reviewed within limits per client and for everyone ([`ReviewLimiter`]), and once
//! however many calls bring the same one at the same time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use super::BackendError;
use super::cache::{AnswerMetrics, Answers, Cached, Lru};
use super::limit::{Rate, ReviewLimiter, Throttled};
use crate::domain::Identity;

/// Why a caller is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `authorization: Bearer <ServiceAccount token>`")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("invalid or expired token, or a token not meant for audience {0:?}")]
    Rejected(String),
    #[error("failed to review the token with the API server")]
    Backend(#[source] BackendError),
    #[error(transparent)]
    Throttled(Throttled),
}

/// Asks whether a token is valid for one of `audiences`; `None` when it is not.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<Option<Identity>, BackendError>;
}

/// The token's `exp` claim, if it is a JWT (read without verifying: the TokenReview did).
pub fn jwt_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("exp")?.as_i64()
}

/// How long a rejected token is remembered, so that retrying it does not turn into a
/// TokenReview per call.
const REJECTED_TTL: i64 = 10;

/// How tokens are reviewed and their results kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Token audiences accepted (a token must be issued for one of them).
    pub audiences: Vec<String>,
    /// How long a TokenReview result is reused (never past the token's expiry).
    pub cache_ttl: Duration,
    /// How many valid tokens' identities are kept; the least recently used makes room.
    pub cache_size: usize,
    /// How many rejected tokens are remembered, apart from valid ones (so that junk tokens
    /// cannot push a valid one out), each for ten seconds.
    pub rejected_cache_size: usize,
    /// How many tokens without a cached answer one client (IP address, or IPv6 /64) may have
    /// reviewed.
    pub reviews_per_client: Rate,
    /// How many tokens without a cached answer everyone together may have reviewed.
    pub reviews: Rate,
}

/// 60 new tokens a minute per client, in bursts of up to 60.
const REVIEWS_PER_CLIENT: Rate = Rate::const_new(60, Duration::from_secs(60));
/// 500 new tokens in ten seconds for everyone (50 a second), in bursts of up to 500.
const REVIEWS: Rate = Rate::const_new(500, Duration::from_secs(10));

impl Default for Settings {
    fn default() -> Self {
        Settings {
            audiences: vec!["kubekms".into()],
            cache_ttl: Duration::from_secs(60),
            cache_size: 10_000,
            rejected_cache_size: 1_000,
            reviews_per_client: REVIEWS_PER_CLIENT,
            reviews: REVIEWS,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    /// `key-api` (gRPC bearer tokens) or `sts` (web identity tokens).
    authenticator: &'static str,
    /// `valid` or `rejected`.
    answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThrottleLabels {
    authenticator: &'static str,
    /// `client` or `everyone`.
    limit: &'static str,
}

/// The authenticators' metrics: how full their caches are, what made room, and the reviews
/// the limits refused.
#[derive(Clone, Debug, Default)]
pub struct AuthMetrics {
    cache: AnswerMetrics<CacheLabels>,
    throttled: Family<ThrottleLabels, Counter>,
    /// By authenticator: clients whose review bucket is kept, and tokens in review.
    clients: Family<AuthenticatorLabel, Gauge>,
    in_flight: Family<AuthenticatorLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthenticatorLabel {
    authenticator: &'static str,
}

impl AuthMetrics {
    /// Registers `kubekms_server_token_cache_entries`, `…_evicted_total`,
    /// `kubekms_server_token_reviews_throttled_total`, `…_review_clients` and
    /// `…_reviews_in_flight`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = AuthMetrics::default();
        m.cache.register(
            registry,
            "kubekms_server_token_cache",
            "TokenReview answers",
            "authenticator and answer",
        );
        registry.register(
            "kubekms_server_token_reviews_throttled",
            "Tokens not reviewed because a review limit was reached, by authenticator and limit",
            m.throttled.clone(),
        );
        registry.register(
            "kubekms_server_token_review_clients",
            "Client addresses whose TokenReview bucket is kept, by authenticator (at most 10,000)",
            m.clients.clone(),
        );
        registry.register(
            "kubekms_server_token_reviews_in_flight",
            "Distinct tokens being reviewed or waited for, by authenticator",
            m.in_flight.clone(),
        );
        m
    }
}

/// Authenticates bearer tokens, with a bounded cache.
pub struct Authenticator<R> {
    /// Its name in metric labels, and its metrics.
    name: &'static str,
    metrics: AuthMetrics,
    reviewer: R,
    audiences: Vec<String>,
    ttl: Duration,
    /// By the token's SHA-256, until Unix seconds.
    cache: Mutex<Answers<[u8; 32], Identity, i64>>,
    /// Tokens a review found valid, by SHA-256, until their expiry (Unix seconds; none
    /// known: the longest cache lifetime apart): re-reviewing one when its cached answer
    /// runs out is not subject to the review limits, so that a flood of junk tokens from
    /// the same address, or from everyone, cannot lock out a caller it once let in. Only a
    /// valid token gets in here, and no more of them than the cache of valid answers holds.
    known: Mutex<Lru<[u8; 32], i64>>,
    limiter: ReviewLimiter,
    flights: Flights,
}

/// The reviews in flight, by the token's SHA-256: a call bringing a token that is being
/// reviewed waits for that review, then finds its answer cached.
#[derive(Default)]
struct Flights {
    map: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// The map's size, for `kubekms_server_token_reviews_in_flight`.
    size: Gauge,
}

/// A review in flight; dropping it lets the next caller of the same token on.
struct Flight<'a> {
    flights: &'a Flights,
    hash: [u8; 32],
    guard: tokio::sync::OwnedMutexGuard<()>,
}

/// Beyond this many entries, joining a flight first forgets those nobody holds (left by a
/// call that was cancelled while waiting).
const FLIGHTS_SWEPT_BEYOND: usize = 1024;

impl Flights {
    async fn join(&self, hash: [u8; 32]) -> Flight<'_> {
        let lock = match self.map.lock() {
            Ok(mut flights) => {
                if flights.len() > FLIGHTS_SWEPT_BEYOND {
                    flights.retain(|_, lock| Arc::strong_count(lock) > 1);
                }
                let lock = flights.entry(hash).or_default().clone();
                self.size.set(i64::try_from(flights.len()).unwrap_or(i64::MAX));
                lock
            }
            Err(_) => Arc::default(),
        };
        Flight { flights: self, hash, guard: lock.lock_owned().await }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.flights.map.lock() {
            // The map's reference and this flight's: nobody else waits.
            if Arc::strong_count(tokio::sync::OwnedMutexGuard::mutex(&self.guard)) == 2 {
                flights.remove(&self.hash);
            }
            self.flights.size.set(i64::try_from(flights.len()).unwrap_or(i64::MAX));
        }
    }
}

impl<R: TokenReviewer> Authenticator<R> {
    pub fn new(reviewer: R, settings: Settings) -> Self {
        Authenticator {
            name: "key-api",
            metrics: AuthMetrics::default(),
            reviewer,
            audiences: settings.audiences,
            ttl: settings.cache_ttl,
            cache: Mutex::new(Answers::new(settings.cache_size, settings.rejected_cache_size)),
            known: Mutex::new(Lru::new(settings.cache_size)),
            limiter: ReviewLimiter::new(settings.reviews_per_client, settings.reviews),
            flights: Flights::default(),
        }
    }

    /// Reports to `metrics` under the label `name` (`key-api`, `sts`).
    pub fn with_metrics(self, name: &'static str, metrics: AuthMetrics) -> Self {
        let size = metrics.in_flight.get_or_create(&AuthenticatorLabel { authenticator: name }).clone();
        Authenticator { name, metrics, flights: Flights { size, ..self.flights }, ..self }
    }

    /// The audiences tokens must be issued for.
    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// Extracts the token from an `authorization` header value.
    pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::Malformed);
        }
        Ok(token.trim())
    }

    /// Who `token` belongs to.
    /// Who `token`, sent by `client` at `now` (Unix seconds), belongs to.
    pub async fn authenticate(&self, token: &str, now: i64, client: IpAddr) -> Result<Identity, AuthError> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.cached(&hash, now) {
            return answer;
        }
        let expiry = jwt_expiry(token);
        if expiry.is_some_and(|exp| exp <= now) {
            return Err(AuthError::Rejected(self.audiences.join(",")));
        }
        let _flight = self.flights.join(hash).await;
        // Reviewed while this call waited for the review in flight?
        if let Some(answer) = self.cached(&hash, now) {
            return answer;
        }
        if !self.known_valid(&hash, now)
            && let Err(throttled) = self.limiter.acquire(client, tokio::time::Instant::now())
        {
            let limit = match throttled {
                Throttled::Client { .. } => "client",
                Throttled::Everyone { .. } => "everyone",
            };
            self.metrics.throttled.get_or_create(&ThrottleLabels { authenticator: self.name, limit }).inc();
            return Err(AuthError::Throttled(throttled));
        }
        let clients = i64::try_from(self.limiter.clients()).unwrap_or(i64::MAX);
        self.metrics.clients.get_or_create(&AuthenticatorLabel { authenticator: self.name }).set(clients);
        let reviewed = self.reviewer.review(token, &self.audiences).await.map_err(AuthError::Backend)?;
        if let Ok(mut known) = self.known.lock() {
            match &reviewed {
                Some(_) => {
                    known.insert(hash, expiry.unwrap_or(i64::MAX));
                }
                None => known.remove(&hash),
            }
        }
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let until = match &reviewed {
            Some(_) => expiry.map_or(now.saturating_add(ttl), |exp| exp.min(now.saturating_add(ttl))),
            None => now.saturating_add(REJECTED_TTL),
        };
        if let Ok(mut cache) = self.cache.lock() {
            let answer = reviewed.clone().map_or(Cached::No, Cached::Yes);
            cache.insert_reported(hash, answer, until, &self.metrics.cache, |valid| CacheLabels {
                authenticator: self.name,
                answer: if valid { "valid" } else { "rejected" },
            });
        }
        reviewed.ok_or_else(|| AuthError::Rejected(self.audiences.join(",")))
    }

    /// Whether a review found the token valid before, and it has not expired since.
    fn known_valid(&self, hash: &[u8; 32], now: i64) -> bool {
        self.known.lock().ok().and_then(|mut known| known.get(hash).copied()).is_some_and(|exp| now < exp)
    }

    /// The cached answer for a token, if there is one.
    fn cached(&self, hash: &[u8; 32], now: i64) -> Option<Result<Identity, AuthError>> {
        match self.cache.lock().ok()?.get(hash, now)? {
            Cached::Yes(identity) => Some(Ok(identity)),
            Cached::No => Some(Err(AuthError::Rejected(self.audiences.join(",")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Accepts tokens starting with "good" for audience "kubekms", and counts reviews.
    struct Counting(AtomicUsize);

    #[tonic::async_trait]
    impl TokenReviewer for Counting {
        async fn review(&self, token: &str, audiences: &[String]) -> Result<Option<Identity>, BackendError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok((token.starts_with("good") && audiences.contains(&"kubekms".to_owned()))
                .then(|| Identity { username: "system:serviceaccount:a:b".into(), ..Default::default() }))
        }
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    impl<R: TokenReviewer> Authenticator<R> {
        async fn authenticate_at(&self, token: &str, now: i64) -> Result<Identity, AuthError> {
            self.authenticate(token, now, CLIENT).await
        }
    }

    fn jwt(exp: i64) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("good.{}.sig", b64.encode(format!(r#"{{"exp":{exp}}}"#)))
    }

    #[tokio::test]
    async fn results_are_cached_for_a_bounded_time_and_never_past_expiry() {
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), Settings::default());
        let token = jwt(1_000_030);
        auth.authenticate_at(&token, 1_000_000).await.unwrap();
        auth.authenticate_at(&token, 1_000_010).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1, "cached");
        // The token expires at 1_000_030: the cache does not outlive it.
        assert!(matches!(auth.authenticate_at(&token, 1_000_031).await, Err(AuthError::Rejected(_))));

        let long = jwt(9_000_000);
        auth.authenticate_at(&long, 1_000_000).await.unwrap();
        auth.authenticate_at(&long, 1_000_059).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 2);
        auth.authenticate_at(&long, 1_000_061).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 3, "re-reviewed after the cache TTL");
    }

    #[tokio::test]
    async fn rejected_tokens_are_remembered_briefly() {
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), Settings::default());
        for t in 0..5 {
            assert!(matches!(auth.authenticate_at("bad", 100 + t).await, Err(AuthError::Rejected(_))));
        }
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1);
        assert!(auth.authenticate_at("bad", 100 + REJECTED_TTL).await.is_err());
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_flood_of_rejected_tokens_never_pushes_out_a_valid_one() {
        let unlimited: Rate = "10000/1h".parse().unwrap();
        let settings = Settings {
            cache_size: 2,
            rejected_cache_size: 4,
            reviews_per_client: unlimited,
            reviews: unlimited,
            ..Settings::default()
        };
        let mut registry = Registry::default();
        let metrics = AuthMetrics::register(&mut registry);
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), settings).with_metrics("sts", metrics);
        let valid = jwt(9_000_000);
        auth.authenticate_at(&valid, 100).await.unwrap();
        for junk in 0..1000 {
            assert!(auth.authenticate_at(&format!("junk-{junk}"), 101).await.is_err());
        }
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1001);
        assert_eq!(auth.cache.lock().unwrap().len(), (1, 4), "junk stays within its own bound");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"kubekms_server_token_cache_entries{authenticator="sts",answer="valid"} 1"#,
            r#"kubekms_server_token_cache_entries{authenticator="sts",answer="rejected"} 4"#,
            r#"kubekms_server_token_cache_evicted_total{authenticator="sts",answer="rejected"} 996"#,
            r#"kubekms_server_token_review_clients{authenticator="sts"} 1"#,
            r#"kubekms_server_token_reviews_in_flight{authenticator="sts"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        auth.authenticate_at(&valid, 102).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1001, "the valid token is still cached");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_new_tokens_costs_a_bounded_number_of_reviews() {
        let settings = Settings {
            reviews_per_client: "5/1m".parse().unwrap(),
            reviews: "8/1m".parse().unwrap(),
            ..Settings::default()
        };
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), settings);
        let reviews = || auth.reviewer.0.load(Ordering::SeqCst);
        let valid = jwt(9_000_000);
        auth.authenticate_at(&valid, 100).await.unwrap();
        let mut throttled = 0;
        for junk in 0..100 {
            match auth.authenticate_at(&format!("junk-{junk}"), 100).await {
                Err(AuthError::Rejected(_)) => {}
                Err(AuthError::Throttled(Throttled::Client { retry_after })) => {
                    assert_eq!(retry_after, Duration::from_secs(12));
                    throttled += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((reviews(), throttled), (5, 96), "the client's burst of 5, its valid token one of them");
        let counted = |limit| {
            auth.metrics.throttled.get_or_create(&ThrottleLabels { authenticator: "key-api", limit }).get()
        };
        assert_eq!(counted("client"), 96);
        // The valid token is served from the cache all along.
        auth.authenticate_at(&valid, 100).await.unwrap();
        // Other clients go on, until everyone's limit.
        let other = |n: u8| IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, n));
        for n in 1..=3 {
            assert!(matches!(
                auth.authenticate(&format!("junk-{n}-a"), 100, other(n)).await,
                Err(AuthError::Rejected(_))
            ));
        }
        let err = auth.authenticate("junk-4-a", 100, other(4)).await.unwrap_err();
        assert!(matches!(err, AuthError::Throttled(Throttled::Everyone { .. })), "{err:?}");
        assert_eq!(reviews(), 8);
        // Twelve seconds on, the client may have one more reviewed.
        tokio::time::advance(Duration::from_secs(12)).await;
        assert!(matches!(auth.authenticate_at("junk-again", 112).await, Err(AuthError::Rejected(_))));
        assert_eq!(reviews(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_junk_from_the_same_client_does_not_lock_out_a_valid_token_when_its_answer_expires() {
        let settings = Settings {
            cache_ttl: Duration::from_secs(60),
            reviews_per_client: "5/1m".parse().unwrap(),
            reviews: "8/1m".parse().unwrap(),
            ..Settings::default()
        };
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), settings);
        let reviews = || auth.reviewer.0.load(Ordering::SeqCst);
        let valid = jwt(1_000);
        auth.authenticate_at(&valid, 100).await.unwrap();
        for junk in 0..100 {
            assert!(auth.authenticate_at(&format!("junk-{junk}"), 100).await.is_err());
        }
        assert!(matches!(
            auth.authenticate_at("junk-more", 100).await,
            Err(AuthError::Throttled(Throttled::Client { .. }))
        ));
        let before = reviews();
        // Its cached answer has run out and the client's reviews are used up, yet the valid
        // token is reviewed again, and found still valid.
        auth.authenticate_at(&valid, 161).await.unwrap();
        assert_eq!(reviews(), before + 1, "re-reviewed");
        assert!(matches!(
            auth.authenticate_at("junk-after", 161).await,
            Err(AuthError::Throttled(Throttled::Client { .. }))
        ));
        // Once expired, it is a new token like any other: limited (and then rejected).
        assert!(matches!(
            auth.authenticate_at(&valid, 1_000).await,
            Err(AuthError::Throttled(_) | AuthError::Rejected(_))
        ));
    }

    /// Accepts every token while its flag is up.
    struct Flip(std::sync::atomic::AtomicBool);

    #[tonic::async_trait]
    impl TokenReviewer for Flip {
        async fn review(&self, _: &str, _: &[String]) -> Result<Option<Identity>, BackendError> {
            Ok(self.0.load(Ordering::SeqCst).then(Identity::default))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_once_valid_and_then_refused_is_limited_again() {
        let settings = Settings { reviews_per_client: "1/1h".parse().unwrap(), ..Settings::default() };
        let auth = Authenticator::new(Flip(true.into()), settings);
        let token = jwt(9_000_000);
        auth.authenticate_at(&token, 100).await.unwrap();
        auth.reviewer.0.store(false, Ordering::SeqCst);
        // Re-reviewed past the limit (it was valid), and refused.
        assert!(matches!(auth.authenticate_at(&token, 161).await, Err(AuthError::Rejected(_))));
        // Once the refusal is forgotten, it is limited like any new token.
        assert!(matches!(auth.authenticate_at(&token, 172).await, Err(AuthError::Throttled(_))));
    }

    /// Like [`Counting`], but each review takes a second.
    struct Slow(AtomicUsize);

    #[tonic::async_trait]
    impl TokenReviewer for Slow {
        async fn review(&self, token: &str, audiences: &[String]) -> Result<Option<Identity>, BackendError> {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Counting(AtomicUsize::new(0)).review(token, audiences).await.inspect(|_| {
                self.0.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_with_one_new_token_share_one_review() {
        let metrics = AuthMetrics::default();
        let auth = Authenticator::new(Slow(AtomicUsize::new(0)), Settings::default())
            .with_metrics("key-api", metrics.clone());
        let in_flight =
            || metrics.in_flight.get_or_create(&AuthenticatorLabel { authenticator: "key-api" }).get();
        let token = jwt(9_000_000);
        let calls = (0..64).map(|_| auth.authenticate_at(&token, 100));
        let mut calls = std::pin::pin!(futures::future::join_all(calls));
        assert!(futures::poll!(calls.as_mut()).is_pending());
        assert_eq!(in_flight(), 1, "one token in review, 63 callers waiting for it");
        let answers = calls.await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1, "64 callers, one review, within the limit");
        let junk = (0..64).map(|_| auth.authenticate_at("junk", 100));
        assert!(
            futures::future::join_all(junk).await.iter().all(|a| matches!(a, Err(AuthError::Rejected(_))))
        );
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 2);
        assert!(auth.flights.map.lock().unwrap().is_empty(), "no flight is left behind");
        assert_eq!(in_flight(), 0);
    }

    #[tokio::test]
    async fn bad_tokens_and_headers_are_refused() {
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), Settings::default());
        assert!(matches!(auth.authenticate_at("bad", 0).await, Err(AuthError::Rejected(_))));
        let other = Settings { audiences: vec!["other".into()], ..Settings::default() };
        let other_audience = Authenticator::new(Counting(AtomicUsize::new(0)), other);
        assert!(matches!(other_audience.authenticate_at("good", 0).await, Err(AuthError::Rejected(_))));
        assert!(matches!(Authenticator::<Counting>::bearer(None), Err(AuthError::Missing)));
        assert!(matches!(Authenticator::<Counting>::bearer(Some("Basic abc")), Err(AuthError::Malformed)));
        assert!(matches!(Authenticator::<Counting>::bearer(Some("Bearer ")), Err(AuthError::Malformed)));
        assert_eq!(Authenticator::<Counting>::bearer(Some("Bearer abc")).unwrap(), "abc");
    }
}
