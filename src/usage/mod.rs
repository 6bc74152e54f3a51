//! Usage reporting: when each version of each key was last used, as this plugin or key
//! API server saw it. The call paths [record](recorder) uses in memory at period
//! granularity; a [writer] task writes this reporter's entry of each key's `KmsKeyUsage`
//! (through [k8s], the one adapter that knows the API server), at most once per key,
//! version and kind of use per period. The controller reads the record to decide whether a
//! deletion needs `force` and whether a destruction must wait.

pub mod k8s;
pub mod recorder;
pub mod writer;

pub use recorder::{NoRecorder, Recorder, UseRecorder};
pub use writer::{Reporter, UsageMetrics, Writer};

/// A day: the period of usage records unless a flag says otherwise.
pub const DEFAULT_GRANULARITY: std::num::NonZeroU32 = std::num::NonZeroU32::new(86_400).unwrap();
