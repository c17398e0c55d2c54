//! Per-tenant admission on this agent: a tenant's limit (`agora fn tenant set`,
//! carried to the agent in each host's `FunctionInfo.tenant_limit`) bounds how many
//! requests of all its functions together the agent passes to their hosts at once.
//! Beyond it requests wait in a bounded queue for a bounded time, then get 429 (queue
//! full) or 503 (waited too long) with `Retry-After`, as a function's own limit does on
//! its host. Every request to a function goes through some agent's HTTP server (the
//! master forwards to one), so this holds for calls through the master and for edge
//! clients calling an agent directly alike.
//!
//! While a tenant's hosts are replaced after its limit changed, old and new hosts run
//! side by side; the strictest of their limits applies until the old ones are gone.
//! A changed limit starts a fresh gate: requests admitted by the old one finish
//! without counting against the new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agora_fn_api::MetricsSnapshot;
use agora_proto::v1::TenantLimit;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One tenant's gate on this agent.
pub(crate) struct TenantGate {
    tenant: String,
    limit: TenantLimit,
    slots: Arc<Semaphore>,
    /// Requests waiting now; also the queue's length.
    queued: AtomicU64,
}

/// Why a request was not let through, with the seconds for `Retry-After`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The tenant's queue is full (429).
    Full { message: String, retry_after: u32 },
    /// It waited the longest the limit allows (503).
    Waited { message: String, retry_after: u32 },
}

/// Per-function counts of requests the tenant gates refused, and of those waiting
/// now, added to the hosts' own metrics in `/fn-metrics`.
#[derive(Default)]
pub(crate) struct GateCounts {
    full: AtomicU64,
    waited: AtomicU64,
    queued: AtomicU64,
}

impl GateCounts {
    /// Adds these counts to a function's metrics summed over its hosts: refusals are
    /// requests that failed with the same classes a host's own queue uses.
    pub(crate) fn add_to(&self, m: &mut MetricsSnapshot) {
        let full = self.full.load(Ordering::Relaxed);
        let waited = self.waited.load(Ordering::Relaxed);
        m.requests += full + waited;
        m.errors.queue_full += full;
        m.errors.queue_timeout += waited;
        m.queued += self.queued.load(Ordering::Relaxed);
    }
}

impl TenantGate {
    pub(crate) fn new(tenant: &str, limit: TenantLimit) -> Self {
        TenantGate {
            tenant: tenant.to_string(),
            slots: Arc::new(Semaphore::new(limit.max_concurrency as usize)),
            limit,
            queued: AtomicU64::new(0),
        }
    }

    pub(crate) fn tenant(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn limit(&self) -> &TenantLimit {
        &self.limit
    }

    /// Takes one of the tenant's slots, waiting in its queue if there is room, for at
    /// most the limit's queue wait. The slot is held until the permit is dropped.
    pub(crate) async fn admit(
        &self,
        function: &str,
        counts: &GateCounts,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let wait = Duration::from_millis(self.limit.max_queue_wait_ms);
        let retry_after = u32::try_from(wait.as_secs().max(1)).unwrap_or(u32::MAX);
        let queue_len = u64::from(self.limit.queue_len);
        let mut len = self.queued.load(Ordering::Relaxed);
        loop {
            if len >= queue_len {
                counts.full.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Full {
                    message: format!(
                        "function {function}: tenant {} has {} requests running on this agent and {} waiting, the most its limit allows (see `agora fn tenant ls`)",
                        self.tenant, self.limit.max_concurrency, self.limit.queue_len
                    ),
                    retry_after,
                });
            }
            match self.queued.compare_exchange_weak(
                len,
                len + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => len = now,
            }
        }
        counts.queued.fetch_add(1, Ordering::Relaxed);
        let _leave = Leave(&self.queued, &counts.queued);
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as a timeout all the same.
            Ok(Err(_)) | Err(_) => {
                counts.waited.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Waited {
                    message: format!(
                        "function {function}: waited {} ms for one of tenant {}'s {} request slots on this agent",
                        self.limit.max_queue_wait_ms, self.tenant, self.limit.max_concurrency
                    ),
                    retry_after,
                })
            }
        }
    }
}

/// Leaves the queue however the wait ends (admitted, timed out, client gone).
struct Leave<'a>(&'a AtomicU64, &'a AtomicU64);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The limit to enforce for each tenant, from the serving hosts' limits: the
/// strictest (fewest slots, then shortest queue) of those that carry one.
pub(crate) fn strictest<'a>(
    hosts: impl IntoIterator<Item = (&'a str, Option<&'a TenantLimit>)>,
) -> HashMap<String, TenantLimit> {
    let mut out: HashMap<String, TenantLimit> = HashMap::new();
    for (tenant, limit) in hosts {
        let Some(limit) = limit.filter(|l| l.max_concurrency > 0) else {
            continue;
        };
        let key = |l: &TenantLimit| (l.max_concurrency, l.queue_len, l.max_queue_wait_ms);
        match out.get_mut(tenant) {
            Some(have) if key(limit) < key(have) => *have = limit.clone(),
            Some(_) => {}
            None => {
                out.insert(tenant.to_string(), limit.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u32, queue: u32, wait_ms: u64) -> TenantLimit {
        TenantLimit {
            role: "t".into(),
            max_concurrency: n,
            queue_len: queue,
            max_queue_wait_ms: wait_ms,
        }
    }

    #[tokio::test]
    async fn over_the_limit_requests_queue_then_are_refused() {
        let gate = Arc::new(TenantGate::new("acme", limit(1, 1, 60_000)));
        let counts = Arc::new(GateCounts::default());
        let first = gate.admit("f", &counts).await.expect("a free slot");
        // The second waits in the queue (one place) until the first is done.
        let waiter = {
            let (gate, counts) = (gate.clone(), counts.clone());
            tokio::spawn(async move { gate.admit("g", &counts).await.map(drop) })
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while gate.queued.load(Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second request queues");
        // The third finds the queue full: 429 at once, naming the tenant.
        match gate.admit("h", &counts).await {
            Err(Refusal::Full {
                message,
                retry_after,
            }) => {
                assert!(message.contains("tenant acme"), "{message}");
                assert!(message.contains("function h"), "{message}");
                assert_eq!(retry_after, 60);
            }
            other => panic!("expected a full queue, got {other:?}"),
        }
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the queued request is admitted once a slot frees")
            .unwrap()
            .expect("admitted");
        let mut m = snapshot();
        counts.add_to(&mut m);
        assert_eq!((m.requests, m.errors.queue_full, m.queued), (1, 1, 0));
    }

    #[tokio::test]
    async fn a_long_wait_is_refused_with_503() {
        let gate = TenantGate::new("acme", limit(1, 8, 250));
        let counts = GateCounts::default();
        let _held = gate.admit("f", &counts).await.unwrap();
        match gate.admit("f", &counts).await {
            Err(Refusal::Waited {
                message,
                retry_after,
            }) => {
                assert!(message.contains("waited 250 ms"), "{message}");
                assert_eq!(retry_after, 1);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(gate.queued.load(Ordering::Relaxed), 0, "left the queue");
        let mut m = snapshot();
        counts.add_to(&mut m);
        assert_eq!((m.requests, m.errors.queue_timeout), (1, 1));
    }

    #[test]
    fn the_strictest_limit_of_a_tenant_applies() {
        let (a, b) = (limit(8, 4, 100), limit(2, 16, 100));
        let got = strictest([
            ("t", Some(&a)),
            ("t", Some(&b)),
            ("t", None),
            ("u", None),
            ("v", Some(&a)),
        ]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["t"], b);
        assert_eq!(got["v"], a);
    }

    fn snapshot() -> MetricsSnapshot {
        serde_json::from_value(serde_json::json!({
            "name": "f", "tenant": "acme", "kind": "cgi_module", "sha256": "",
            "requests": 0, "responses": 0,
            "errors": {"fuel": 0, "memory": 0, "deadline": 0, "trap": 0, "bad_response": 0,
                       "output_limit": 0, "queue_full": 0, "queue_timeout": 0,
                       "overloaded": 0, "internal": 0},
            "latency": {"bounds_us": [], "counts": [0], "count": 0, "sum_us": 0},
            "fuel_used": 0, "in_flight": 0, "queued": 0
        }))
        .expect("a snapshot")
    }
}
