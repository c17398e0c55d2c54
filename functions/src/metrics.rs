//! Per-function counters, updated lock-free on every request, and the serializable
//! snapshot the master's HTTP API shows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outcome::ErrorClass;
use crate::spec::GuestKind;

/// Upper bounds of the latency histogram's buckets, in microseconds; a last, unbounded
/// bucket follows. Fixed so that snapshots from many hosts add up bucket by bucket.
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 60_000_000,
];

/// The live counters of one function.
#[derive(Default)]
pub(crate) struct FunctionMetrics {
    requests: AtomicU64,
    responses: AtomicU64,
    errors: [AtomicU64; ErrorClass::ALL.len()],
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    fuel_used: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
    /// Shared with the requests' `wasi:http` hooks, which count as they decide.
    outbound: Arc<OutboundCounters>,
}

/// Outgoing HTTP requests of a function's components, allowed and denied.
#[derive(Default)]
pub(crate) struct OutboundCounters {
    allowed: AtomicU64,
    denied: AtomicU64,
}

impl OutboundCounters {
    pub(crate) fn record(&self, allowed: bool) {
        let counter = if allowed { &self.allowed } else { &self.denied };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl FunctionMetrics {
    /// The outgoing-request counters, for a request's hooks to hold.
    pub(crate) fn outbound(&self) -> &Arc<OutboundCounters> {
        &self.outbound
    }

    pub(crate) fn record_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished: with the guest's own answer (`error: None`) or a failure.
    pub(crate) fn record_end(&self, error: Option<ErrorClass>, latency: Duration, fuel: u64) {
        match error {
            None => self.responses.fetch_add(1, Ordering::Relaxed),
            Some(class) => self.errors[class.index()].fetch_add(1, Ordering::Relaxed),
        };
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.fuel_used.fetch_add(fuel, Ordering::Relaxed);
    }

    /// Counts one running request until the guard is dropped.
    pub(crate) fn running(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.in_flight)
    }

    /// Counts one waiting request until the guard is dropped.
    pub(crate) fn queued_gauge(&self) -> &AtomicU64 {
        &self.queued
    }

    pub(crate) fn snapshot(&self, id: FunctionIdentity) -> MetricsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let error = |class: ErrorClass| load(&self.errors[class.index()]);
        let counts: Vec<u64> = self.latency.iter().map(load).collect();
        MetricsSnapshot {
            name: id.name,
            tenant: id.tenant,
            kind: id.kind,
            sha256: id.sha256,
            requests: load(&self.requests),
            responses: load(&self.responses),
            errors: ErrorCounts {
                fuel: error(ErrorClass::Fuel),
                memory: error(ErrorClass::Memory),
                deadline: error(ErrorClass::Deadline),
                trap: error(ErrorClass::Trap),
                bad_response: error(ErrorClass::BadResponse),
                output_limit: error(ErrorClass::OutputLimit),
                queue_full: error(ErrorClass::QueueFull),
                queue_timeout: error(ErrorClass::QueueTimeout),
                overloaded: error(ErrorClass::Overloaded),
                internal: error(ErrorClass::Internal),
            },
            latency: LatencyHistogram {
                bounds_us: LATENCY_BUCKETS_US.to_vec(),
                count: counts.iter().sum(),
                counts,
                sum_us: load(&self.latency_sum_us),
            },
            fuel_used: load(&self.fuel_used),
            in_flight: load(&self.in_flight),
            queued: load(&self.queued),
            outbound_allowed: load(&self.outbound.allowed),
            outbound_denied: load(&self.outbound.denied),
        }
    }
}

/// Increments a gauge now and decrements it when dropped.
pub(crate) struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which function a snapshot describes.
pub(crate) struct FunctionIdentity {
    pub name: String,
    pub tenant: String,
    pub kind: GuestKind,
    pub sha256: String,
}

/// A function's metrics at one moment. Counters only grow while the function stays
/// loaded; `in_flight` and `queued` are gauges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// The function's name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Its guest style.
    pub kind: GuestKind,
    /// sha256 of its module.
    pub sha256: String,
    /// Requests received (including those refused by the queue).
    pub requests: u64,
    /// Requests answered by the guest itself, whatever status it chose.
    pub responses: u64,
    /// Requests that failed, by class.
    pub errors: ErrorCounts,
    /// Time from receipt to answer (queueing included), successes and failures.
    pub latency: LatencyHistogram,
    /// Fuel burnt by all requests together (0 while fuel is unlimited and unused).
    pub fuel_used: u64,
    /// Requests running now.
    pub in_flight: u64,
    /// Requests waiting for a slot now.
    pub queued: u64,
    /// Outgoing HTTP requests of its components that were sent (allow-listed, within
    /// the per-request cap), whatever their outcome.
    #[serde(default)]
    pub outbound_allowed: u64,
    /// Outgoing HTTP requests of its components that were refused (not allow-listed,
    /// or over the per-request cap).
    #[serde(default)]
    pub outbound_denied: u64,
}

impl MetricsSnapshot {
    /// Adds `other`'s counters, gauges and histogram to these (summing one function
    /// over several hosts). Identity fields stay as they are; a histogram with other
    /// bucket bounds is not added (all hosts use [`LATENCY_BUCKETS_US`]).
    pub fn add(&mut self, other: &MetricsSnapshot) {
        self.requests += other.requests;
        self.responses += other.responses;
        self.errors.add(&other.errors);
        if self.latency.bounds_us == other.latency.bounds_us
            && self.latency.counts.len() == other.latency.counts.len()
        {
            for (mine, theirs) in self.latency.counts.iter_mut().zip(&other.latency.counts) {
                *mine += theirs;
            }
            self.latency.count += other.latency.count;
            self.latency.sum_us += other.latency.sum_us;
        }
        self.fuel_used += other.fuel_used;
        self.in_flight += other.in_flight;
        self.queued += other.queued;
        self.outbound_allowed += other.outbound_allowed;
        self.outbound_denied += other.outbound_denied;
    }
}

/// Failed requests by [`ErrorClass`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// Fuel exhausted.
    pub fuel: u64,
    /// Memory limit reached.
    pub memory: u64,
    /// Deadline exceeded.
    pub deadline: u64,
    /// Trapped or exited non-zero for another reason.
    pub trap: u64,
    /// Answer not a valid response.
    pub bad_response: u64,
    /// Answer over the output limit.
    pub output_limit: u64,
    /// Refused: queue full (429).
    pub queue_full: u64,
    /// Refused: waited too long (503).
    pub queue_timeout: u64,
    /// Refused: no instance slot on the host (503).
    pub overloaded: u64,
    /// Host failure.
    pub internal: u64,
}

impl ErrorCounts {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &ErrorCounts) {
        self.fuel += other.fuel;
        self.memory += other.memory;
        self.deadline += other.deadline;
        self.trap += other.trap;
        self.bad_response += other.bad_response;
        self.output_limit += other.output_limit;
        self.queue_full += other.queue_full;
        self.queue_timeout += other.queue_timeout;
        self.overloaded += other.overloaded;
        self.internal += other.internal;
    }

    /// All failures together.
    pub fn total(&self) -> u64 {
        self.fuel
            + self.memory
            + self.deadline
            + self.trap
            + self.bad_response
            + self.output_limit
            + self.queue_full
            + self.queue_timeout
            + self.overloaded
            + self.internal
    }
}

/// A fixed-bucket latency histogram: `counts[i]` requests took at most
/// `bounds_us[i]` µs (and more than the bound before it); the last count is the
/// overflow bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Bucket upper bounds in µs ([`LATENCY_BUCKETS_US`]).
    pub bounds_us: Vec<u64>,
    /// One count per bound, plus the overflow bucket.
    pub counts: Vec<u64>,
    /// All requests counted.
    pub count: u64,
    /// Sum of all latencies, in µs.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// The bucket bound at or below which a fraction `q` (0..=1) of requests fell:
    /// an upper estimate of that quantile. `None` when empty or in the overflow bucket.
    pub fn quantile_upper_bound_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let target = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= target {
                return self.bounds_us.get(i).copied();
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets() {
        let m = FunctionMetrics::default();
        m.record_request();
        m.record_request();
        m.record_end(None, Duration::from_micros(70), 10);
        m.record_end(Some(ErrorClass::Deadline), Duration::from_secs(5), 5);
        m.outbound().record(true);
        m.outbound().record(false);
        m.outbound().record(false);
        let s = m.snapshot(FunctionIdentity {
            name: "f".into(),
            tenant: "t".into(),
            kind: GuestKind::CgiModule,
            sha256: String::new(),
        });
        assert_eq!(
            (s.requests, s.responses, s.errors.deadline, s.errors.total()),
            (2, 1, 1, 1)
        );
        assert_eq!(s.fuel_used, 15);
        assert_eq!((s.outbound_allowed, s.outbound_denied), (1, 2));
        assert_eq!(s.latency.count, 2);
        assert_eq!(s.latency.counts[1], 1); // 70µs: the <=100µs bucket
        assert_eq!(s.latency.quantile_upper_bound_us(0.5), Some(100));
        assert_eq!(s.latency.quantile_upper_bound_us(1.0), Some(5_000_000));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"deadline\":1"));
        assert_eq!(serde_json::from_str::<MetricsSnapshot>(&json).unwrap(), s);
        // JSON from hosts that predate the outbound counters still parses.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("outbound_allowed");
        fields.remove("outbound_denied");
        let old: MetricsSnapshot = serde_json::from_value(old).unwrap();
        assert_eq!((old.outbound_allowed, old.outbound_denied), (0, 0));

        let mut sum = s.clone();
        sum.add(&s);
        assert_eq!(
            (
                sum.requests,
                sum.errors.deadline,
                sum.fuel_used,
                sum.latency.count
            ),
            (4, 2, 30, 4)
        );
        assert_eq!(sum.latency.counts[1], 2);
        assert_eq!((sum.outbound_allowed, sum.outbound_denied), (2, 4));
        assert_eq!(sum.latency.sum_us, 2 * s.latency.sum_us);
    }
}
