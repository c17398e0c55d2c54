//! Who may run now: a request needs a slot of its function, one of its tenant and one
//! of the host's instance pool. Without all three it waits in the function's bounded
//! queue, for a bounded time; a full queue answers 429 at once, a long wait 503.
//!
//! Slots are taken in that fixed order (function, tenant, pool), so two requests never
//! hold what the other waits for. The semaphores are tokio's, which are fair (FIFO).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agora_proto::units::format_duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::outcome::{ErrorClass, Failure};
use crate::units::retry_after_secs;

/// The slots a running request holds; dropping it frees them.
pub(crate) struct Permits {
    _function: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
    _instance: OwnedSemaphorePermit,
}

/// A tenant's shared concurrency limit.
pub(crate) struct TenantSlots {
    pub name: String,
    pub limit: u32,
    pub slots: Arc<Semaphore>,
}

/// One function's admission control.
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    max_concurrency: u32,
    queue_len: u32,
    max_wait: Duration,
}

/// What a queued request is waiting for, for the 503's reason.
const WAIT_FUNCTION: u8 = 0;
const WAIT_TENANT: u8 = 1;
const WAIT_POOL: u8 = 2;

impl Admission {
    pub(crate) fn new(max_concurrency: u32, queue_len: u32, max_wait: Duration) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrency as usize)),
            max_concurrency,
            queue_len,
            max_wait,
        }
    }

    /// Refuses every waiting and future request: the function is being removed.
    pub(crate) fn close(&self) {
        self.slots.close();
    }

    /// Takes the three slots, waiting in the queue if needed. `queued` is the
    /// function's queue gauge: its value is also the queue's length.
    pub(crate) async fn admit(
        &self,
        tenant: &TenantSlots,
        pool: &Arc<Semaphore>,
        queued: &AtomicU64,
    ) -> Result<Permits, Failure> {
        // Fast path: everything free, no queueing, no allocation.
        let function = self.slots.clone().try_acquire_owned();
        if let Ok(function) = function {
            if let Ok(tenant_permit) = tenant.slots.clone().try_acquire_owned() {
                if let Ok(instance) = pool.clone().try_acquire_owned() {
                    return Ok(Permits {
                        _function: function,
                        _tenant: tenant_permit,
                        _instance: instance,
                    });
                }
                return self
                    .wait(Some(function), Some(tenant_permit), tenant, pool, queued)
                    .await;
            }
            return self.wait(Some(function), None, tenant, pool, queued).await;
        }
        if self.slots.is_closed() {
            return Err(removed());
        }
        self.wait(None, None, tenant, pool, queued).await
    }

    async fn wait(
        &self,
        function: Option<OwnedSemaphorePermit>,
        tenant_permit: Option<OwnedSemaphorePermit>,
        tenant: &TenantSlots,
        pool: &Arc<Semaphore>,
        queued: &AtomicU64,
    ) -> Result<Permits, Failure> {
        let retry_after = Some(retry_after_secs(self.max_wait));
        // Join the queue only if there is room; the gauge is the queue.
        let mut len = queued.load(Ordering::Relaxed);
        loop {
            if len >= u64::from(self.queue_len) {
                return Err(Failure {
                    class: ErrorClass::QueueFull,
                    message: format!(
                        "too many requests: {} running and {} waiting, the most this function allows",
                        self.max_concurrency, self.queue_len
                    ),
                    retry_after,
                });
            }
            match queued.compare_exchange_weak(len, len + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => len = now,
            }
        }
        // Leave the queue however this ends (admitted, timed out, client gone).
        struct Leave<'a>(&'a AtomicU64);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _leave = Leave(queued);

        let waiting_for = AtomicU8::new(WAIT_FUNCTION);
        let acquire = async {
            let function = match function {
                Some(p) => p,
                None => self
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| removed())?,
            };
            waiting_for.store(WAIT_TENANT, Ordering::Relaxed);
            let tenant_permit = match tenant_permit {
                Some(p) => p,
                None => tenant
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| removed())?,
            };
            waiting_for.store(WAIT_POOL, Ordering::Relaxed);
            let instance = pool.clone().acquire_owned().await.map_err(|_| removed())?;
            Ok(Permits {
                _function: function,
                _tenant: tenant_permit,
                _instance: instance,
            })
        };
        match tokio::time::timeout(self.max_wait, acquire).await {
            Ok(result) => result,
            Err(_) => {
                let what = match waiting_for.load(Ordering::Relaxed) {
                    WAIT_FUNCTION => format!(
                        "the function's {} concurrent requests were all busy",
                        self.max_concurrency
                    ),
                    WAIT_TENANT => format!(
                        "tenant {:?} had all its {} concurrent requests busy",
                        tenant.name, tenant.limit
                    ),
                    _ => "the host had no free instance slot".to_string(),
                };
                Err(Failure {
                    class: ErrorClass::QueueTimeout,
                    message: format!(
                        "waited {} in the queue and {what}; try again later",
                        format_duration(self.max_wait)
                    ),
                    retry_after,
                })
            }
        }
    }
}

fn removed() -> Failure {
    Failure::new(
        ErrorClass::Overloaded,
        "the function is being removed from this host",
    )
}
