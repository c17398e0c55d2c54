//! Caps on the connections a listener holds: in all, and from one peer address.
//! Every listener that accepts from the network (the master's QUIC endpoint, the
//! HTTP front doors) admits each new connection through a [`Gate`] before doing any
//! work for it, and holds the [`Pass`] for as long as the connection lives. A refusal
//! is logged once per peer address a minute, so a flood cannot flood the log too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a refusal of one peer address is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Most peer addresses remembered as recently logged (older ones are forgotten).
const LOGGED_MAX: usize = 4096;

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections held at once, from everyone.
    pub total: usize,
    /// Connections held at once from one IP address.
    pub per_ip: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the listener holds its most connections ({0}) already")]
    Total(usize),
    #[error("this address holds its most connections ({0}) already")]
    PerIp(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
    logged: HashMap<IpAddr, Instant>,
}

/// Counts a listener's connections against its [`Caps`].
#[derive(Clone)]
pub struct Gate {
    name: &'static str,
    caps: Caps,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Pass {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Gate {
    /// `name` says which listener this is in the refusal log line.
    pub fn new(name: &'static str, caps: Caps) -> Gate {
        Gate {
            name,
            caps,
            counts: Arc::default(),
        }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Admits a connection from `ip`, or says why not (and logs the refusal, once a
    /// minute per address).
    pub fn admit(&self, ip: IpAddr) -> Result<Pass, Refusal> {
        // Nothing below can panic with the lock held; a poisoned lock still counts.
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let from_ip = c.by_ip.get(&ip).copied().unwrap_or(0);
        let refusal = if c.total >= self.caps.total {
            Some(Refusal::Total(self.caps.total))
        } else if from_ip >= self.caps.per_ip {
            Some(Refusal::PerIp(self.caps.per_ip))
        } else {
            None
        };
        if let Some(r) = refusal {
            let now = Instant::now();
            let due = c
                .logged
                .get(&ip)
                .is_none_or(|at| now.duration_since(*at) >= LOG_EVERY);
            if due {
                if c.logged.len() >= LOGGED_MAX {
                    c.logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
                }
                if c.logged.len() < LOGGED_MAX {
                    c.logged.insert(ip, now);
                }
                tracing::warn!(
                    listener = self.name,
                    peer = %ip,
                    "connection refused: {r} (logged once a minute per address)"
                );
            }
            return Err(r);
        }
        c.total += 1;
        *c.by_ip.entry(ip).or_insert(0) += 1;
        Ok(Pass {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_address_and_in_all_and_places_come_back() {
        let g = Gate::new(
            "test",
            Caps {
                total: 3,
                per_ip: 2,
            },
        );
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = g.admit(a).unwrap();
        let _a2 = g.admit(a).unwrap();
        assert_eq!(g.admit(a).unwrap_err(), Refusal::PerIp(2));
        let _b1 = g.admit(b).unwrap();
        assert_eq!(g.admit(b).unwrap_err(), Refusal::Total(3));
        assert_eq!(g.held(), 3);
        drop(a1);
        assert_eq!(g.held(), 2);
        let _a3 = g.admit(a).unwrap();
        assert_eq!(g.held(), 3);
    }
}
