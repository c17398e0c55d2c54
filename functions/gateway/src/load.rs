//! The load of each function: every second, each agent hosting functions is asked for
//! `GET /fn-metrics` (its hosts' metrics summed per function); the answers are summed
//! per function for the planner (in flight, queued, requests) and the HTTP API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agora_fn_api::MetricsSnapshot;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;

use super::planner::Load;
use super::Functions;

/// How often agents' metrics are read.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// Bound on one agent's answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_METRICS_BODY: usize = 4 << 20;
/// How often the agents' HTTP addresses are read again even when all are known.
const AGENTS_EVERY: Duration = Duration::from_secs(10);

/// How the gateway connects to agents' doors: plain HTTP, or HTTPS verified
/// against the cluster's CA as `agora_net::tls::AGENT_HTTP_SERVER_NAME`.
pub(crate) type AgentConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Metrics requests carry no body.
type Http = HttpClient<AgentConnector, Full<Bytes>>;

/// The base URL of an agent's door from the address it advertised: `host:port`
/// (plain HTTP) or `https://host:port`.
pub(crate) fn agent_url(addr: &str, path_and_query: &str) -> String {
    if addr.starts_with("https://") || addr.starts_with("http://") {
        format!("{addr}{path_and_query}")
    } else {
        format!("http://{addr}{path_and_query}")
    }
}

/// A pooled HTTP/1.1 client to the agents (for the proxy and the metrics poller),
/// speaking HTTPS with `tls` to doors advertised as `https://`.
#[allow(
    clippy::expect_used,
    reason = "AGENT_HTTP_SERVER_NAME is a constant valid DNS name"
)]
pub(crate) fn http_client<B>(tls: Arc<rustls::ClientConfig>) -> HttpClient<AgentConnector, B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    // The HTTPS connector hands it https:// URLs too.
    connector.enforce_http(false);
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![agora_net::tls::HTTP_ALPN.to_vec()];
    let name = rustls::pki_types::ServerName::try_from(agora_net::tls::AGENT_HTTP_SERVER_NAME)
        .expect("a DNS name");
    let connector = hyper_rustls::HttpsConnector::new(
        connector,
        tls,
        false,
        Arc::new(hyper_rustls::FixedServerNameResolver::new(name)),
    );
    HttpClient::builder(hyper_util::rt::TokioExecutor::new())
        // Below the agents' doors' idle limit (agora_http_forward::serve::HEADER_TIMEOUT),
        // so the pool never picks a connection the agent is about to close.
        .pool_idle_timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Reads the agents' HTTP addresses through the operator API, like any client.
pub(crate) async fn refresh_agents(functions: &Functions, client: &agora_sdk::Client) {
    match client.agents().await {
        Ok(agents) => {
            let map: BTreeMap<String, String> = agents
                .into_iter()
                .filter(|a| !a.http_address.is_empty())
                .map(|a| (a.agent_id, a.http_address))
                .collect();
            let mut s = functions.lock();
            s.planner.set_agents(map.len() as u32);
            s.agent_http = map;
        }
        Err(e) => tracing::debug!("functions: cannot list agents: {e:#}"),
    }
}

/// One agent's `/fn-metrics`, or why not (for the debug log).
async fn fetch(http: &Http, addr: &str) -> Result<Vec<MetricsSnapshot>, String> {
    let req = hyper::Request::get(agent_url(addr, "/fn-metrics"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad agent address: {e}"))?;
    let work = async {
        let resp = http.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_METRICS_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not metrics JSON: {e}"))
    };
    tokio::time::timeout(POLL_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {POLL_TIMEOUT:?}"))?
}

/// Polls forever (until aborted with the master).
pub(crate) async fn run_poller(functions: Arc<Functions>, client: Arc<agora_sdk::Client>) {
    let http = http_client(functions.agent_tls());
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_agents = tokio::time::Instant::now() - AGENTS_EVERY;
    loop {
        tick.tick().await;
        let (addrs, unknown_agent) = {
            let s = functions.lock();
            let mut addrs = BTreeSet::new();
            let mut unknown = false;
            for h in s.planner.hosts().values() {
                match s.agent_http.get(&h.agent_id) {
                    Some(a) => {
                        addrs.insert(a.clone());
                    }
                    None => unknown = true,
                }
            }
            (addrs, unknown)
        };
        if unknown_agent || last_agents.elapsed() >= AGENTS_EVERY {
            refresh_agents(&functions, &client).await;
            last_agents = tokio::time::Instant::now();
        }
        let answers = futures_join(addrs.into_iter().map(|addr| {
            let http = http.clone();
            async move {
                let r = fetch(&http, &addr).await;
                (addr, r)
            }
        }))
        .await;
        let now = crate::now_ms();
        let mut s = functions.lock();
        s.metrics.clear();
        for (addr, r) in answers {
            match r {
                Ok(m) => {
                    s.metrics.insert(addr, m);
                }
                Err(e) => tracing::debug!(agent = %addr, "functions: no metrics: {e}"),
            }
        }
        let by_fn = s.metrics_by_function();
        let names: Vec<String> = s.planner.functions().keys().cloned().collect();
        for name in names {
            let load = by_fn.get(&name).map_or(Load::default(), |m| Load {
                requests: m.requests,
                in_flight: m.in_flight,
                queued: m.queued,
            });
            s.planner.observe_load(&name, load, now);
        }
        drop(s);
        functions.wake_framework();
    }
}

/// Runs futures concurrently (each its own task) and collects what they return.
async fn futures_join<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
