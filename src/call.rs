//! The one call pipeline of the plugin and the key API: every call's outcome is mapped to
//! the wire, audited, metered and logged here, and a call whose audit line cannot be
//! written fails closed — the caller gets `unavailable`, never an answer nobody recorded
//! (a refusal included: a caller probing while the log is down learns nothing either).

use std::sync::Arc;
use std::time::Instant;

use tonic::Status;

use crate::audit::{AuditEvent, AuditLog};
use crate::metering::{OperationMetrics, code_name};
use crate::telemetry::error_chain;

/// An error a call can end with: how the caller sees it, and whether it is kubekms's own
/// failure (logged with its causes) rather than the caller's.
pub trait CallError: std::error::Error {
    /// The status the caller gets. Internal details stay in the log.
    fn status(&self) -> Status;
    /// Why the call failed, as its audit line says: the caller's message unless the caller
    /// may not be told more (a refusal that hides whether a key exists says why here).
    fn reason(&self) -> String {
        self.status().message().to_owned()
    }
    /// Whether the failure is kubekms's (a backend, the audit log, randomness), not the
    /// caller's.
    fn is_internal(&self) -> bool;
}

/// Audits, meters and maps the outcome of each call of one component.
#[derive(Debug, Clone)]
pub struct CallPipeline {
    component: &'static str,
    audit: Arc<AuditLog>,
    metrics: OperationMetrics,
}

impl CallPipeline {
    pub fn new(component: &'static str, audit: Arc<AuditLog>, metrics: OperationMetrics) -> Self {
        CallPipeline { component, audit, metrics }
    }

    /// Finishes a call that started at `started`: fills in `event`'s component, result and
    /// reason from `outcome`, writes the audit line, counts the call under `event.key`, and
    /// returns what the caller gets. Waits for the audit line within the log's limits.
    pub async fn finish<T, E: CallError>(
        &self,
        started: Instant,
        mut event: AuditEvent,
        outcome: Result<T, E>,
    ) -> Result<T, Status> {
        let mut reason = None;
        let reply = outcome.map_err(|e| {
            reason = Some(e.reason());
            if e.is_internal() {
                tracing::error!(
                    error = %error_chain(&e),
                    component = self.component,
                    operation = event.operation,
                    request_id = %event.request_id,
                    "call failed"
                );
            }
            e.status()
        });
        event.component = self.component;
        event.result = reply.as_ref().err().map_or("OK", |s| code_name(s.code()));
        event.reason = reason;
        let audited = self.audit.append(&event).await;
        let (result, reply) = match (reply, audited) {
            (reply, Ok(())) => (event.result, reply),
            (_, Err(e)) => {
                tracing::error!(
                    error = %error_chain(&e),
                    component = self.component,
                    operation = event.operation,
                    request_id = %event.request_id,
                    "refusing a call that cannot be audited"
                );
                ("Unavailable", Err(Status::unavailable("the audit log cannot be written")))
            }
        };
        let key = event.key.unwrap_or_default();
        self.metrics.observe(self.component, key, event.operation, result, started.elapsed().as_secs_f64());
        reply
    }
}
