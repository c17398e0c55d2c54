//! `GET /metrics` on the master's HTTP server: the functions' metrics in the
//! Prometheus text exposition format (version 0.0.4), for a scraper to collect.
//!
//! One series per function (labels `function` and `tenant`), summed over its hosts as
//! `/fn-metrics` is: requests and responses, errors by class, the latency histogram
//! (seconds, cumulative buckets), fuel burnt, requests in flight and queued, and
//! hosts running and wanted. Counters fall when a host goes away (they are sums of
//! the live hosts'), which Prometheus's `rate()` treats as a counter reset.

use std::fmt::Write as _;

use agora_fn_api::MetricsSnapshot;

/// What is known about one function's hosts besides their metrics.
pub(crate) struct HostCounts {
    pub running: usize,
    pub target: u32,
}

/// Renders the exposition text for `functions` (name, tenant, metrics if any
/// host answered, host counts).
pub(crate) fn render(
    functions: &[(String, String, Option<MetricsSnapshot>, HostCounts)],
) -> String {
    let mut out = String::new();
    let labels = |name: &str, tenant: &str| {
        format!(
            "function=\"{}\",tenant=\"{}\"",
            escape(name),
            escape(tenant)
        )
    };
    type Get = fn(&MetricsSnapshot) -> u64;
    let simple: [(&str, &str, &str, Get); 7] = [
        (
            "agora_fn_requests_total",
            "counter",
            "Requests received, refused ones included.",
            |m| m.requests,
        ),
        (
            "agora_fn_responses_total",
            "counter",
            "Requests answered by the guest itself, whatever its status.",
            |m| m.responses,
        ),
        (
            "agora_fn_fuel_used_total",
            "counter",
            "Fuel burnt by the function's requests.",
            |m| m.fuel_used,
        ),
        (
            "agora_fn_outbound_allowed_total",
            "counter",
            "Outgoing HTTP requests of components that their allow-list let through.",
            |m| m.outbound_allowed,
        ),
        (
            "agora_fn_outbound_denied_total",
            "counter",
            "Outgoing HTTP requests of components denied (not allowed, or over the cap).",
            |m| m.outbound_denied,
        ),
        (
            "agora_fn_in_flight",
            "gauge",
            "Requests running now.",
            |m| m.in_flight,
        ),
        (
            "agora_fn_queued",
            "gauge",
            "Requests waiting for a slot now.",
            |m| m.queued,
        ),
    ];
    for (metric, kind, help, get) in simple {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, tenant, m, _) in functions {
            let v = m.as_ref().map_or(0, get);
            let _ = writeln!(out, "{metric}{{{}}} {v}", labels(name, tenant));
        }
    }

    let _ = writeln!(
        out,
        "# HELP agora_fn_errors_total Failed requests by class.\n# TYPE agora_fn_errors_total counter"
    );
    for (name, tenant, m, _) in functions {
        let e = m.as_ref().map(|m| m.errors).unwrap_or_default();
        for (class, v) in [
            ("fuel", e.fuel),
            ("memory", e.memory),
            ("deadline", e.deadline),
            ("trap", e.trap),
            ("bad_response", e.bad_response),
            ("output_limit", e.output_limit),
            ("queue_full", e.queue_full),
            ("queue_timeout", e.queue_timeout),
            ("overloaded", e.overloaded),
            ("internal", e.internal),
        ] {
            let _ = writeln!(
                out,
                "agora_fn_errors_total{{{},class=\"{class}\"}} {v}",
                labels(name, tenant)
            );
        }
    }

    let metric = "agora_fn_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {metric} Time from receipt to answer on the host, queueing included.\n# TYPE {metric} histogram"
    );
    for (name, tenant, m, _) in functions {
        let Some(h) = m.as_ref().map(|m| &m.latency) else {
            continue;
        };
        let l = labels(name, tenant);
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds_us.iter().zip(&h.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{metric}_bucket{{{l},le=\"{}\"}} {cumulative}",
                seconds(*bound)
            );
        }
        let _ = writeln!(out, "{metric}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{metric}_sum{{{l}}} {}", seconds(h.sum_us));
        let _ = writeln!(out, "{metric}_count{{{l}}} {}", h.count);
    }

    for (metric, help, get) in [
        (
            "agora_fn_hosts_running",
            "Hosts of the function serving now.",
            (|c: &HostCounts| c.running as u64) as fn(&HostCounts) -> u64,
        ),
        (
            "agora_fn_hosts_target",
            "Hosts the functions framework wants now.",
            |c: &HostCounts| u64::from(c.target),
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for (name, tenant, _, counts) in functions {
            let _ = writeln!(out, "{metric}{{{}}} {}", labels(name, tenant), get(counts));
        }
    }
    out
}

/// µs as seconds, without float noise (`0.00005`, `1`, `2.5`).
fn seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// A label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> MetricsSnapshot {
        serde_json::from_value(serde_json::json!({
            "name": "echo", "tenant": "acme", "kind": "cgi_module", "sha256": "",
            "requests": 5, "responses": 3,
            "errors": {"fuel": 1, "memory": 0, "deadline": 0, "trap": 0, "bad_response": 0,
                       "output_limit": 0, "queue_full": 1, "queue_timeout": 0,
                       "overloaded": 0, "internal": 0},
            "latency": {"bounds_us": [50, 100, 1500000], "counts": [2, 1, 1, 1],
                        "count": 5, "sum_us": 2500250},
            "fuel_used": 77, "in_flight": 1, "queued": 0, "outbound_denied": 3
        }))
        .expect("a snapshot")
    }

    #[test]
    fn exposition_has_counters_histogram_and_hosts() {
        let text = render(&[
            (
                "echo".into(),
                "acme".into(),
                Some(snapshot()),
                HostCounts {
                    running: 2,
                    target: 3,
                },
            ),
            (
                "we\"ird".into(),
                "default".into(),
                None,
                HostCounts {
                    running: 0,
                    target: 0,
                },
            ),
        ]);
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            )
        };
        has("# TYPE agora_fn_requests_total counter");
        has("agora_fn_requests_total{function=\"echo\",tenant=\"acme\"} 5");
        has("agora_fn_requests_total{function=\"we\\\"ird\",tenant=\"default\"} 0");
        has("agora_fn_errors_total{function=\"echo\",tenant=\"acme\",class=\"fuel\"} 1");
        has("agora_fn_errors_total{function=\"echo\",tenant=\"acme\",class=\"queue_full\"} 1");
        has("agora_fn_fuel_used_total{function=\"echo\",tenant=\"acme\"} 77");
        has("agora_fn_outbound_denied_total{function=\"echo\",tenant=\"acme\"} 3");
        // Buckets are cumulative, in seconds; the overflow only in +Inf.
        has("agora_fn_request_duration_seconds_bucket{function=\"echo\",tenant=\"acme\",le=\"0.00005\"} 2");
        has("agora_fn_request_duration_seconds_bucket{function=\"echo\",tenant=\"acme\",le=\"0.0001\"} 3");
        has("agora_fn_request_duration_seconds_bucket{function=\"echo\",tenant=\"acme\",le=\"1.5\"} 4");
        has("agora_fn_request_duration_seconds_bucket{function=\"echo\",tenant=\"acme\",le=\"+Inf\"} 5");
        has("agora_fn_request_duration_seconds_sum{function=\"echo\",tenant=\"acme\"} 2.50025");
        has("agora_fn_request_duration_seconds_count{function=\"echo\",tenant=\"acme\"} 5");
        has("agora_fn_hosts_running{function=\"echo\",tenant=\"acme\"} 2");
        has("agora_fn_hosts_target{function=\"echo\",tenant=\"acme\"} 3");
        assert!(
            !text.contains("duration_seconds_bucket{function=\"we"),
            "no histogram without metrics"
        );
        // Every TYPE line names a metric once.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
    }

    #[test]
    fn seconds_are_exact() {
        assert_eq!(seconds(50), "0.00005");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(60_000_000), "60");
        assert_eq!(seconds(2_500_250), "2.50025");
    }
}
