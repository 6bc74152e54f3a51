//! Authentication: a ServiceAccount (or any Kubernetes) bearer token, checked with a
//! TokenReview for the server's audience. Results are cached by the token's SHA-256 for a
//! bounded time, and never beyond the token's own expiry, in a bounded cache where rejected
//! tokens have a smaller bound of their own ([`Answers`]).

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::BackendError;
use super::cache::{Answers, Cached};
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
}

/// Asks whether a token is valid for one of `audiences`; `None` when it is not.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<Option<Identity>, BackendError>;
}

/// The token's `exp` claim, if it is a JWT (read without verifying: the TokenReview did).
fn jwt_expiry(token: &str) -> Option<i64> {
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            audiences: vec!["kubekms".into()],
            cache_ttl: Duration::from_secs(60),
            cache_size: 10_000,
            rejected_cache_size: 1_000,
        }
    }
}

/// Authenticates bearer tokens, with a bounded cache.
pub struct Authenticator<R> {
    reviewer: R,
    audiences: Vec<String>,
    ttl: Duration,
    /// By the token's SHA-256, until Unix seconds.
    cache: Mutex<Answers<[u8; 32], Identity, i64>>,
}

impl<R: TokenReviewer> Authenticator<R> {
    pub fn new(reviewer: R, settings: Settings) -> Self {
        Authenticator {
            reviewer,
            audiences: settings.audiences,
            ttl: settings.cache_ttl,
            cache: Mutex::new(Answers::new(settings.cache_size, settings.rejected_cache_size)),
        }
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
    pub async fn authenticate(&self, token: &str, now: i64) -> Result<Identity, AuthError> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.cache.lock().ok().and_then(|mut cache| cache.get(&hash, now));
        match cached {
            Some(Cached::Yes(identity)) => return Ok(identity),
            Some(Cached::No) => return Err(AuthError::Rejected(self.audiences.join(","))),
            None => {}
        }
        let expiry = jwt_expiry(token);
        if expiry.is_some_and(|exp| exp <= now) {
            return Err(AuthError::Rejected(self.audiences.join(",")));
        }
        let reviewed = self.reviewer.review(token, &self.audiences).await.map_err(AuthError::Backend)?;
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let until = match &reviewed {
            Some(_) => expiry.map_or(now.saturating_add(ttl), |exp| exp.min(now.saturating_add(ttl))),
            None => now.saturating_add(REJECTED_TTL),
        };
        if let Ok(mut cache) = self.cache.lock() {
            let answer = reviewed.clone().map_or(Cached::No, Cached::Yes);
            cache.insert(hash, answer, until);
        }
        reviewed.ok_or_else(|| AuthError::Rejected(self.audiences.join(",")))
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

    fn jwt(exp: i64) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("good.{}.sig", b64.encode(format!(r#"{{"exp":{exp}}}"#)))
    }

    #[tokio::test]
    async fn results_are_cached_for_a_bounded_time_and_never_past_expiry() {
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), Settings::default());
        let token = jwt(1_000_030);
        auth.authenticate(&token, 1_000_000).await.unwrap();
        auth.authenticate(&token, 1_000_010).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1, "cached");
        // The token expires at 1_000_030: the cache does not outlive it.
        assert!(matches!(auth.authenticate(&token, 1_000_031).await, Err(AuthError::Rejected(_))));

        let long = jwt(9_000_000);
        auth.authenticate(&long, 1_000_000).await.unwrap();
        auth.authenticate(&long, 1_000_059).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 2);
        auth.authenticate(&long, 1_000_061).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 3, "re-reviewed after the cache TTL");
    }

    #[tokio::test]
    async fn rejected_tokens_are_remembered_briefly() {
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), Settings::default());
        for t in 0..5 {
            assert!(matches!(auth.authenticate("bad", 100 + t).await, Err(AuthError::Rejected(_))));
        }
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1);
        assert!(auth.authenticate("bad", 100 + REJECTED_TTL).await.is_err());
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_flood_of_rejected_tokens_never_pushes_out_a_valid_one() {
        let settings = Settings { cache_size: 2, rejected_cache_size: 4, ..Settings::default() };
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), settings);
        let valid = jwt(9_000_000);
        auth.authenticate(&valid, 100).await.unwrap();
        for junk in 0..1000 {
            assert!(auth.authenticate(&format!("junk-{junk}"), 101).await.is_err());
        }
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1001);
        assert_eq!(auth.cache.lock().unwrap().len(), (1, 4), "junk stays within its own bound");
        auth.authenticate(&valid, 102).await.unwrap();
        assert_eq!(auth.reviewer.0.load(Ordering::SeqCst), 1001, "the valid token is still cached");
    }

    #[tokio::test]
    async fn bad_tokens_and_headers_are_refused() {
        let auth = Authenticator::new(Counting(AtomicUsize::new(0)), Settings::default());
        assert!(matches!(auth.authenticate("bad", 0).await, Err(AuthError::Rejected(_))));
        let other = Settings { audiences: vec!["other".into()], ..Settings::default() };
        let other_audience = Authenticator::new(Counting(AtomicUsize::new(0)), other);
        assert!(matches!(other_audience.authenticate("good", 0).await, Err(AuthError::Rejected(_))));
        assert!(matches!(Authenticator::<Counting>::bearer(None), Err(AuthError::Missing)));
        assert!(matches!(Authenticator::<Counting>::bearer(Some("Basic abc")), Err(AuthError::Malformed)));
        assert!(matches!(Authenticator::<Counting>::bearer(Some("Bearer ")), Err(AuthError::Malformed)));
        assert_eq!(Authenticator::<Counting>::bearer(Some("Bearer abc")).unwrap(), "abc");
    }
}
