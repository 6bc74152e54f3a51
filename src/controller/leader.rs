//! Leader election through a `coordination.k8s.io/v1` Lease, so that several controller
//! replicas run safely with one active.
//!
//! As in client-go, a lease held by someone else counts as expired only when this
//! replica has watched it unchanged for the whole lease duration on its own monotonic
//! clock, so clock skew between nodes cannot cause two leaders. A leader that cannot renew
//! within the renew deadline (shorter than the lease) stops before anyone may take over.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

/// Why leader election failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to read Lease {name}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to write Lease {name}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Timing of the election.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leadership.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Why a timing is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the {what} must not be negative")]
    Negative { what: &'static str, value: SignedDuration },
    #[error(
        "the renew deadline ({renew_deadline:#?}) must be shorter than the lease duration ({lease_duration:#?})"
    )]
    RenewDeadlineNotShorter { renew_deadline: Duration, lease_duration: Duration },
}

impl Timing {
    /// A timing from signed durations (as a command line gives them), checked: none is
    /// negative, and the leader stops renewing before its lease can run out, so that it
    /// has stopped before another replica may take over.
    pub fn new(
        lease_duration: SignedDuration,
        renew_deadline: SignedDuration,
        retry_period: SignedDuration,
    ) -> Result<Timing, TimingError> {
        let unsigned = |what, value: SignedDuration| {
            Duration::try_from(value).map_err(|_| TimingError::Negative { what, value })
        };
        let timing = Timing {
            lease_duration: unsigned("lease duration", lease_duration)?,
            renew_deadline: unsigned("renew deadline", renew_deadline)?,
            retry_period: unsigned("retry period", retry_period)?,
        };
        if timing.renew_deadline >= timing.lease_duration {
            return Err(TimingError::RenewDeadlineNotShorter {
                renew_deadline: timing.renew_deadline,
                lease_duration: timing.lease_duration,
            });
        }
        Ok(timing)
    }
}

/// One replica's view of one Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The record last seen held by someone else, and when it was first seen so.
    observed: Option<(String, Instant)>,
}

/// What an attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease.
    Leading,
    /// Someone else does.
    Following { holder: String },
}

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, identity: String, timing: Timing) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            timing,
            observed: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The timing in use.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    fn spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Acquires the lease if it is free or expired, or renews it if held.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaderError> {
        let existing = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaderError::Get { name: self.name.clone(), source })?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following { holder: String::new() }),
                Err(source) => Err(LeaderError::Write { name: self.name.clone(), source }),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.identity {
            self.spec(transitions, spec.acquire_time.clone())
        } else if holder.is_empty() {
            self.spec(transitions + 1, None)
        } else {
            // Someone else holds it: it has expired only if we have seen the same record
            // for a whole lease duration (their lease duration, or ours if longer).
            let record = lease.metadata.resource_version.clone().unwrap_or_default();
            let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64)
                .max(self.timing.lease_duration);
            match &self.observed {
                Some((seen, since)) if *seen == record && since.elapsed() >= duration => {}
                Some((seen, _)) if *seen == record => return Ok(Attempt::Following { holder }),
                _ => {
                    self.observed = Some((record, Instant::now()));
                    return Ok(Attempt::Following { holder });
                }
            }
            self.spec(transitions + 1, None)
        };
        lease.spec = Some(new_spec);
        // replace() carries the resourceVersion we read: if anyone wrote meanwhile, the
        // API server refuses and we try again later.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                self.observed = None;
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following { holder }),
            Err(source) => Err(LeaderError::Write { name: self.name.clone(), source }),
        }
    }

    /// Gives the lease up (on graceful shutdown), so another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaderError::Get { name: self.name.clone(), source })?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(|source| LeaderError::Write { name: self.name.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: i64) -> SignedDuration {
        SignedDuration::from_secs(s)
    }

    #[test]
    fn a_timing_is_checked() {
        let t = Timing::new(secs(15), secs(10), secs(2)).unwrap();
        assert_eq!(
            (t.lease_duration, t.renew_deadline, t.retry_period),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
        );
        let d = Timing::default();
        assert_eq!(
            (d.lease_duration, d.renew_deadline, d.retry_period),
            (t.lease_duration, t.renew_deadline, t.retry_period)
        );
        assert!(Timing::new(secs(15), secs(0), secs(0)).is_ok());
    }

    #[test]
    fn no_duration_may_be_negative() {
        for (timing, what) in [
            (Timing::new(secs(-1), secs(10), secs(2)), "lease duration"),
            (Timing::new(secs(15), secs(-1), secs(2)), "renew deadline"),
            (Timing::new(secs(15), secs(10), secs(-1)), "retry period"),
        ] {
            assert_eq!(timing.unwrap_err(), TimingError::Negative { what, value: secs(-1) });
        }
        let err = Timing::new(secs(15), secs(10), secs(-2)).unwrap_err();
        assert_eq!(err.to_string(), "the retry period must not be negative");
    }

    #[test]
    fn the_leader_stops_renewing_before_its_lease_runs_out() {
        for (lease, renew) in [(15, 15), (15, 20), (0, 0)] {
            let err = Timing::new(secs(lease), secs(renew), secs(2)).unwrap_err();
            assert!(matches!(err, TimingError::RenewDeadlineNotShorter { .. }), "{lease} {renew}: {err}");
        }
        let err = Timing::new(secs(15), secs(20), secs(2)).unwrap_err();
        assert_eq!(err.to_string(), "the renew deadline (20s) must be shorter than the lease duration (15s)");
    }
}
