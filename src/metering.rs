//! Metering: every cryptographic operation counted per key, operation and result, with a
//! latency histogram per operation. Shared by the plugin and the key API server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub component: &'static str,
    /// `namespace/name`, or empty when the key is unknown.
    pub key: String,
    pub operation: &'static str,
    /// `OK` or a gRPC status code name.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub component: &'static str,
    pub operation: &'static str,
}

/// The operation counters and latency histograms.
#[derive(Debug, Clone)]
pub struct OperationMetrics {
    pub operations: Family<OperationLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 20 µs … 2.6 s
    Histogram::new(exponential_buckets(0.000_02, 2.0, 18))
}

impl OperationMetrics {
    /// Registers `kubekms_operations_total` and `kubekms_operation_duration_seconds`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = OperationMetrics {
            operations: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "kubekms_operations",
            "Cryptographic operations by key, operation and result",
            m.operations.clone(),
        );
        registry.register(
            "kubekms_operation_duration_seconds",
            "Time to serve one operation",
            m.latency.clone(),
        );
        m
    }

    /// Counts one operation and its latency.
    pub fn observe(
        &self,
        component: &'static str,
        key: String,
        operation: &'static str,
        result: &'static str,
        seconds: f64,
    ) {
        self.operations.get_or_create(&OperationLabels { component, key, operation, result }).inc();
        self.latency.get_or_create(&LatencyLabels { component, operation }).observe(seconds);
    }
}

/// The name of a gRPC status code, as audit lines and metrics write it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Cancelled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}
