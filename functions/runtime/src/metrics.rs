//! Per-function counters, updated lock-free on every request, and the serializable
//! snapshot the master's HTTP API shows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use agora_fn_api::{
    ErrorCounts, GuestKind, LatencyHistogram, MetricsSnapshot, LATENCY_BUCKETS_US,
};

use crate::outcome::ErrorClass;

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
            Some(class) => self.errors_of(class).fetch_add(1, Ordering::Relaxed),
        };
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        #[allow(
            clippy::indexing_slicing,
            reason = "one bucket more than LATENCY_BUCKETS_US, whose length is the last"
        )]
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.fuel_used.fetch_add(fuel, Ordering::Relaxed);
    }

    fn errors_of(&self, class: ErrorClass) -> &AtomicU64 {
        #[allow(
            clippy::indexing_slicing,
            reason = "index() is a position in ErrorClass::ALL, whose length the array has"
        )]
        &self.errors[class.index()]
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
        let error = |class: ErrorClass| load(self.errors_of(class));
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
