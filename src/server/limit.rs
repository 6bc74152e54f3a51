//! Limits on the TokenReviews the server asks the API server for — reviews of tokens it has
//! no cached answer for — so that a flood of new or junk tokens costs kube-apiserver a
//! bounded number of reviews: a token bucket per client (its IP address; an IPv6 client by
//! its /64) and one for everyone. Past a limit the caller is told when to retry.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::cache::Lru;

/// At most `reviews` reviews in any `per`, in bursts of up to `reviews`; written
/// `REVIEWS/DURATION`, e.g. `30/1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    reviews: u32,
    per: Duration,
}

/// Why a rate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("expected REVIEWS/DURATION, for example 30/1m")]
    Syntax,
    #[error("the number of reviews must be a whole number from 1")]
    Reviews,
    #[error("the duration must be positive and at most a day, for example 10s or 1m")]
    Duration,
}

/// The longest period a rate may have.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

impl Rate {
    pub fn new(reviews: u32, per: Duration) -> Result<Rate, RateError> {
        if reviews == 0 {
            return Err(RateError::Reviews);
        }
        if per.is_zero() || per > LONGEST {
            return Err(RateError::Duration);
        }
        Ok(Rate { reviews, per })
    }

    /// A rate known to be valid, for constants (a zero count counts as one).
    pub(super) const fn const_new(reviews: u32, per: Duration) -> Rate {
        Rate { reviews: if reviews == 0 { 1 } else { reviews }, per }
    }

    /// How long one review takes to come back into the bucket.
    fn interval(&self) -> Duration {
        self.per / self.reviews
    }

    /// How far ahead of now a bucket's schedule may run: a full burst less one review.
    fn tolerance(&self) -> Duration {
        self.interval() * (self.reviews - 1)
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let (reviews, per) = s.split_once('/').ok_or(RateError::Syntax)?;
        let reviews = reviews.trim().parse().map_err(|_| RateError::Reviews)?;
        let per: jiff::SignedDuration = per.trim().parse().map_err(|_| RateError::Duration)?;
        Rate::new(reviews, Duration::try_from(per).map_err(|_| RateError::Duration)?)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = jiff::SignedDuration::try_from(self.per).map_err(|_| fmt::Error)?;
        write!(f, "{}/{per:#}", self.reviews)
    }
}

/// A token bucket, kept as the instant its schedule has reached (the generic cell rate
/// algorithm): each review moves it one interval on from now or from where it stood, and a
/// review is allowed while it runs no further ahead of now than a burst allows. Exact, in
/// whole nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    next: Instant,
}

impl Bucket {
    /// How long until the bucket allows a review (zero when it does now).
    fn wait(&self, rate: Rate, now: Instant) -> Duration {
        let next = self.next.max(now);
        next.saturating_duration_since(now).saturating_sub(rate.tolerance())
    }

    /// The bucket once a review is taken at `now`.
    fn take(&self, rate: Rate, now: Instant) -> Bucket {
        let next = self.next.max(now);
        Bucket { next: next.checked_add(rate.interval()).unwrap_or(next) }
    }
}

/// A review refused, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    /// This client asked for too many reviews.
    #[error("too many new tokens from this client; retry in {} s", whole_seconds(*.retry_after))]
    Client { retry_after: Duration },
    /// Everyone together did.
    #[error("the key API is reviewing too many new tokens; retry in {} s", whole_seconds(*.retry_after))]
    Everyone { retry_after: Duration },
}

impl Throttled {
    pub fn retry_after(&self) -> Duration {
        match self {
            Throttled::Client { retry_after } | Throttled::Everyone { retry_after } => *retry_after,
        }
    }
}

/// A wait in whole seconds, rounded up, at least one (as `retry-after` gives it).
pub fn whole_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

/// How many clients' buckets are kept; the least recently seen makes room (starting again
/// with a full bucket, which the limit for everyone still bounds).
const CLIENTS: usize = 10_000;

/// Counts reviews per client and for everyone.
pub struct ReviewLimiter {
    per_client: Rate,
    everyone: Rate,
    state: Mutex<State>,
}

struct State {
    everyone: Option<Bucket>,
    clients: Lru<IpAddr, Bucket>,
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64 (what one host
/// usually gets), an IPv4-mapped IPv6 address as IPv4.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl ReviewLimiter {
    pub fn new(per_client: Rate, everyone: Rate) -> Self {
        ReviewLimiter {
            per_client,
            everyone,
            state: Mutex::new(State { everyone: None, clients: Lru::new(CLIENTS) }),
        }
    }

    /// Takes one review for `client` at `now`, or says when to retry. A client past its
    /// own limit does not use up everyone's.
    pub fn acquire(&self, client: IpAddr, now: Instant) -> Result<(), Throttled> {
        let Ok(mut state) = self.state.lock() else {
            return Err(Throttled::Everyone { retry_after: Duration::from_secs(1) });
        };
        let client = client_of(client);
        let fresh = Bucket { next: now };
        let mine = state.clients.get(&client).copied().unwrap_or(fresh);
        let all = state.everyone.unwrap_or(fresh);
        let (wait_mine, wait_all) = (mine.wait(self.per_client, now), all.wait(self.everyone, now));
        if !wait_mine.is_zero() {
            return Err(Throttled::Client { retry_after: wait_mine });
        }
        if !wait_all.is_zero() {
            return Err(Throttled::Everyone { retry_after: wait_all });
        }
        state.clients.insert(client, mine.take(self.per_client, now));
        state.everyone = Some(all.take(self.everyone, now));
        Ok(())
    }

    /// How many clients' buckets are kept (at most 10,000).
    pub fn clients(&self) -> usize {
        self.state.lock().map_or(0, |state| state.clients.len())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rates_are_written_reviews_per_duration() {
        let rate: Rate = "30/1m".parse().unwrap();
        assert_eq!(rate, Rate::new(30, Duration::from_secs(60)).unwrap());
        assert_eq!(rate.to_string(), "30/1m");
        assert_eq!("500/10s".parse::<Rate>().unwrap().to_string(), "500/10s");
        assert_eq!("5/1500ms".parse::<Rate>().unwrap(), Rate::new(5, Duration::from_millis(1500)).unwrap());
        assert_eq!("30".parse::<Rate>(), Err(RateError::Syntax));
        assert_eq!("0/1m".parse::<Rate>(), Err(RateError::Reviews));
        assert_eq!("x/1m".parse::<Rate>(), Err(RateError::Reviews));
        assert_eq!("30/0s".parse::<Rate>(), Err(RateError::Duration));
        assert_eq!("30/25h".parse::<Rate>(), Err(RateError::Duration));
        assert_eq!("30/-1m".parse::<Rate>(), Err(RateError::Duration));
        assert_eq!("30/soon".parse::<Rate>(), Err(RateError::Duration));
    }

    #[test]
    fn a_client_gets_its_burst_then_one_review_per_interval() {
        let limiter = ReviewLimiter::new("3/30s".parse().unwrap(), "100/1s".parse().unwrap());
        let t0 = Instant::now();
        let client = ip("10.0.0.1");
        for _ in 0..3 {
            limiter.acquire(client, t0).unwrap();
        }
        assert_eq!(
            limiter.acquire(client, t0),
            Err(Throttled::Client { retry_after: Duration::from_secs(10) })
        );
        let err = limiter.acquire(client, t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(err.retry_after(), Duration::from_secs(6), "refused calls use up nothing");
        assert_eq!(err.to_string(), "too many new tokens from this client; retry in 6 s");
        limiter.acquire(client, t0 + Duration::from_secs(10)).unwrap();
        assert!(limiter.acquire(client, t0 + Duration::from_secs(10)).is_err());
        // Another client has its own bucket.
        limiter.acquire(ip("10.0.0.2"), t0 + Duration::from_secs(10)).unwrap();
        // Idle long enough, a client has its whole burst again, and no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.acquire(client, later).unwrap();
        }
        assert!(limiter.acquire(client, later).is_err());
    }

    #[test]
    fn everyone_together_is_bounded_too_and_a_throttled_client_uses_none_of_it() {
        let limiter = ReviewLimiter::new("2/1h".parse().unwrap(), "5/10s".parse().unwrap());
        let t0 = Instant::now();
        limiter.acquire(ip("10.0.0.1"), t0).unwrap();
        limiter.acquire(ip("10.0.0.1"), t0).unwrap();
        for _ in 0..10 {
            assert!(matches!(limiter.acquire(ip("10.0.0.1"), t0), Err(Throttled::Client { .. })));
        }
        for n in 2..5 {
            limiter.acquire(IpAddr::V4(Ipv4Addr::new(10, 0, 1, n)), t0).unwrap();
        }
        let err = limiter.acquire(ip("10.0.0.9"), t0).unwrap_err();
        assert_eq!(err, Throttled::Everyone { retry_after: Duration::from_secs(2) });
        assert_eq!(err.to_string(), "the key API is reviewing too many new tokens; retry in 2 s");
        limiter.acquire(ip("10.0.0.9"), t0 + Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn buckets_are_kept_for_a_bounded_number_of_clients() {
        let limiter = ReviewLimiter::new("1/1h".parse().unwrap(), "1000000/1s".parse().unwrap());
        let t0 = Instant::now();
        limiter.acquire(ip("192.168.0.1"), t0).unwrap();
        // A flood from many addresses (one per IPv6 /64) keeps at most CLIENTS buckets.
        for n in 0..u32::try_from(CLIENTS).unwrap() + 500 {
            let addr = IpAddr::V6((u128::from(n) << 64 | 1).into());
            limiter.acquire(addr, t0).unwrap();
        }
        assert_eq!(limiter.clients(), CLIENTS);
        // The client seen least recently was forgotten, and starts with a full bucket.
        limiter.acquire(ip("192.168.0.1"), t0).unwrap();
        assert!(limiter.acquire(ip("192.168.0.1"), t0).is_err());
        assert_eq!(limiter.clients(), CLIENTS);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_as_ipv4() {
        let limiter = ReviewLimiter::new("1/1h".parse().unwrap(), "100/1s".parse().unwrap());
        let t0 = Instant::now();
        limiter.acquire(ip("2001:db8:1:2::1"), t0).unwrap();
        assert!(limiter.acquire(ip("2001:db8:1:2:ffff::9"), t0).is_err(), "the same /64");
        limiter.acquire(ip("2001:db8:1:3::1"), t0).unwrap();
        limiter.acquire(ip("192.0.2.1"), t0).unwrap();
        assert!(limiter.acquire(ip("::ffff:192.0.2.1"), t0).is_err());
    }

    #[test]
    fn waits_are_told_in_whole_seconds_rounded_up() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001)), 3);
    }
}
