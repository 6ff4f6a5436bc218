//! What an operator sees of a tracker over HTTP (`tracker --http ADDR`):
//! `GET /metrics` in the Prometheus text format (OpenMetrics), `GET
//! /status` as JSON, and `GET /`, a self-contained dashboard page (no
//! external scripts or fonts) that polls `/status` once a second.
//!
//! Off unless asked. The event loop never waits on it: once every
//! [`PUBLISH_EVERY`] it moves the node's counters into the metrics (atomic
//! adds) and leaves a copy of the cluster view under a mutex; a thread of
//! its own answers the requests from that copy. The fsync figures come from
//! the log's sync thread directly. Nothing secret is shown (no password,
//! token or grant): user ids, group and file names, addresses and counts.
//! It is plain HTTP, for a loopback address or an operators' network.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use shoal_core::tracker::{ClusterView, Counters, NodeId, Replicator, TrackerNode, Transfer};
use shoal_core::Millis;

/// How often the loop publishes what the page and the metrics show.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Rate samples kept for the page's charts: one a second, five minutes.
pub const HISTORY: usize = 300;

type Labels = Vec<(String, String)>;

/// The metric handles (each an `Arc` of atomics: cloned, they are the same
/// metric) and the registry that encodes them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    writes: Counter,
    write_latency: Histogram,
    reads: Counter,
    leader_changes: Counter,
    is_leader: Gauge,
    decided: Gauge,
    applied: Gauge,
    snapshot_index: Gauge,
    log_entries: Gauge,
    log_bytes: Gauge,
    range_store_bytes: Gauge,
    /// fsyncs of the log (and range store), by the sync thread.
    pub(crate) fsyncs: Counter,
    pub(crate) fsync_latency: Histogram,
    link_up: Family<Labels, Gauge>,
    link_lag: Family<Labels, Gauge>,
    clients: Gauge,
    sessions: Gauge,
    groups: Gauge,
    files: Gauge,
    transfers: Gauge,
    failed_logins: Counter,
    grants: Counter,
    refusals: Family<Labels, Counter>,
    connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 0.5 ms to about 16 s.
    exponential_buckets(0.0005, 2.0, 16)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("shoal_tracker");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            writes: Counter::default(),
            write_latency: Histogram::new(latency_buckets()),
            reads: Counter::default(),
            leader_changes: Counter::default(),
            is_leader: Gauge::default(),
            decided: Gauge::default(),
            applied: Gauge::default(),
            snapshot_index: Gauge::default(),
            log_entries: Gauge::default(),
            log_bytes: Gauge::default(),
            range_store_bytes: Gauge::default(),
            fsyncs: Counter::default(),
            fsync_latency: Histogram::new(latency_buckets()),
            link_up: Family::default(),
            link_lag: Family::default(),
            clients: Gauge::default(),
            sessions: Gauge::default(),
            groups: Gauge::default(),
            files: Gauge::default(),
            transfers: Gauge::default(),
            failed_logins: Counter::default(),
            grants: Counter::default(),
            refusals: Family::default(),
            connections_refused: Counter::default(),
        };
        r.register("writes", "Writes of this tracker's clients decided and answered", m.writes.clone());
        r.register_with_unit(
            "write_latency",
            "Time from a write's arrival to its answer, once decided",
            Unit::Seconds,
            m.write_latency.clone(),
        );
        r.register("reads", "Requests answered from the local state", m.reads.clone());
        r.register("leader_changes", "Times the leader this tracker names changed", m.leader_changes.clone());
        r.register("is_leader", "1 if this tracker leads the cluster", m.is_leader.clone());
        r.register("decided_index", "Log index up to which entries are decided", m.decided.clone());
        r.register("applied_index", "Log entries applied to the state", m.applied.clone());
        r.register(
            "snapshot_index",
            "Log index below which entries live only in the snapshot",
            m.snapshot_index.clone(),
        );
        r.register("log_entries", "Decided entries in the log since its snapshot", m.log_entries.clone());
        r.register_with_unit("log", "Size of the write-ahead log file", Unit::Bytes, m.log_bytes.clone());
        r.register_with_unit(
            "range_store",
            "Size of the chunk-list range store file",
            Unit::Bytes,
            m.range_store_bytes.clone(),
        );
        r.register("fsyncs", "fsyncs of the log and range store", m.fsyncs.clone());
        r.register_with_unit(
            "fsync_latency",
            "Time to make the log durable (write, fsync)",
            Unit::Seconds,
            m.fsync_latency.clone(),
        );
        r.register("link_up", "1 while the link to that tracker is up and answering", m.link_up.clone());
        r.register("link_lag", "Log entries that tracker has applied fewer than this one", m.link_lag.clone());
        r.register("client_connections", "Client connections open", m.clients.clone());
        r.register("sessions_alive", "Sessions whose lease is alive", m.sessions.clone());
        r.register("groups", "Groups", m.groups.clone());
        r.register("files", "Files shared, in all groups", m.files.clone());
        r.register("transfers", "Downloads in progress clients reported", m.transfers.clone());
        r.register("failed_logins", "Logins refused for a wrong user id or password", m.failed_logins.clone());
        r.register("grants_issued", "Download grants issued", m.grants.clone());
        r.register("refusals", "Requests answered with an error, by reason", m.refusals.clone());
        r.register(
            "connections_refused",
            "Connections closed for breaking the protocol or its limits",
            m.connections_refused.clone(),
        );
        Metrics { registry: Arc::new(r), ..m }
    }

    /// The text `GET /metrics` answers.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What the loop leaves for the HTTP thread.
#[derive(Clone)]
struct Published {
    view: ClusterView,
    transfers: Vec<Transfer>,
    counters: Counters,
    /// Reads answered by each tracker (ours and as the others reported).
    reads_total: u64,
}

/// The loop's side: moves the node's figures into the metrics and
/// publishes its view, every [`PUBLISH_EVERY`].
pub(crate) struct Observer {
    metrics: Metrics,
    seen: Counters,
    shared: Arc<Mutex<Option<Published>>>,
    next: Instant,
}

impl Observer {
    pub(crate) fn observe<R: Replicator>(&mut self, node: &mut TrackerNode<R>, now: Millis) {
        let at = Instant::now();
        if at < self.next {
            return;
        }
        self.next = at + PUBLISH_EVERY;
        let m = &self.metrics;
        for ms in node.take_write_latencies() {
            m.write_latency.observe(ms as f64 / 1000.0);
        }
        let c = node.counters().clone();
        let s = &self.seen;
        m.writes.inc_by(c.writes - s.writes);
        m.reads.inc_by(c.reads - s.reads);
        m.leader_changes.inc_by(c.leader_changes - s.leader_changes);
        m.failed_logins.inc_by(c.failed_logins - s.failed_logins);
        m.grants.inc_by(c.grants - s.grants);
        m.connections_refused.inc_by(c.connections_refused - s.connections_refused);
        for (reason, n) in &c.refusals {
            let before = s.refusals.get(reason).copied().unwrap_or(0);
            m.refusals.get_or_create(&vec![("reason".into(), reason.to_string())]).inc_by(n - before);
        }
        let view = node.cluster_view(now);
        let h = &view.health;
        let (decided, compacted) = node.replicator().log_indexes().unwrap_or((h.applied, 0));
        m.decided.set(decided as i64);
        m.applied.set(h.applied as i64);
        m.snapshot_index.set(compacted as i64);
        m.log_entries.set(decided.saturating_sub(compacted) as i64);
        m.is_leader.set((h.leader == Some(view.me)) as i64);
        m.clients.set(h.clients as i64);
        m.sessions.set(h.sessions as i64);
        m.groups.set(h.groups as i64);
        m.files.set(h.files as i64);
        let mut reads_total = h.reads;
        for p in &view.peers {
            let peer = vec![("peer".into(), p.node.to_string())];
            m.link_up.get_or_create(&peer).set(p.up as i64);
            match &p.health {
                Some((ph, _)) => {
                    m.link_lag.get_or_create(&peer).set(h.applied.saturating_sub(ph.applied) as i64);
                    reads_total += ph.reads;
                }
                None => {
                    m.link_lag.remove(&peer);
                }
            }
        }
        let transfers = node.transfers(now);
        m.transfers.set(transfers.len() as i64);
        self.seen = c.clone();
        let published = Published { view, transfers, counters: c, reads_total };
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(published);
    }
}

/// Where the HTTP side finds what it shows besides the loop's view.
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// Every tracker of `tracker_info.txt`, by id.
    pub trackers: Vec<(NodeId, SocketAddr)>,
    /// The log file and range store, to report their sizes.
    pub log_path: Option<PathBuf>,
    pub range_store_path: Option<PathBuf>,
}

/// Starts the HTTP thread; returns the loop's side and the address bound.
pub(crate) fn start(cfg: HttpConfig, metrics: Metrics) -> std::io::Result<(Observer, SocketAddr)> {
    let server = tiny_http::Server::http(cfg.addr)
        .map_err(|e| std::io::Error::other(format!("cannot serve HTTP on {}: {e}", cfg.addr)))?;
    let bound = server.server_addr().to_ip().unwrap_or(cfg.addr);
    let shared = Arc::new(Mutex::new(None));
    let observer =
        Observer { metrics: metrics.clone(), seen: Counters::default(), shared: shared.clone(), next: Instant::now() };
    let mut page = Page { cfg, metrics, shared, history: VecDeque::new(), started: Instant::now() };
    std::thread::Builder::new().name("shoal-tracker-http".into()).spawn(move || page.serve(server))?;
    Ok((observer, bound))
}

/// The highest applied index any tracker reported (ours included).
fn newest_applied(v: &ClusterView) -> u64 {
    let peers = v.peers.iter().filter_map(|x| x.health.as_ref().map(|(h, _)| h.applied));
    peers.chain([v.health.applied]).max().unwrap_or(0)
}

/// A rate sample: when, the cluster's applied index, and reads answered.
#[derive(Clone, Copy)]
struct Sample {
    secs: f64,
    applied: u64,
    reads: u64,
}

struct Page {
    cfg: HttpConfig,
    metrics: Metrics,
    shared: Arc<Mutex<Option<Published>>>,
    history: VecDeque<Sample>,
    started: Instant,
}

const DASHBOARD: &str = include_str!("dashboard.html");

impl Page {
    fn serve(&mut self, server: tiny_http::Server) {
        let mut next_sample = Instant::now();
        loop {
            match server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(req)) => self.answer(req),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the HTTP server stopped");
                    return;
                }
            }
            if Instant::now() >= next_sample {
                next_sample += Duration::from_secs(1);
                self.sample();
            }
        }
    }

    fn published(&self) -> Option<Published> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn sample(&mut self) {
        let Some(p) = self.published() else { return };
        let applied = newest_applied(&p.view);
        let s = Sample { secs: self.started.elapsed().as_secs_f64(), applied, reads: p.reads_total };
        if self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(s);
    }

    fn answer(&self, req: tiny_http::Request) {
        use tiny_http::{Header, Method, Response};
        let header = |v: &str| Header::from_bytes("Content-Type", v).expect("a valid header");
        let no_store = Header::from_bytes("Cache-Control", "no-store").expect("a valid header");
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let r = if *req.method() != Method::Get && *req.method() != Method::Head {
            Response::from_string("only GET\n").with_status_code(405)
        } else {
            match path.as_str() {
                "/metrics" => {
                    let size =
                        |p: &Option<PathBuf>| p.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len());
                    self.metrics.log_bytes.set(size(&self.cfg.log_path).unwrap_or(0) as i64);
                    self.metrics.range_store_bytes.set(size(&self.cfg.range_store_path).unwrap_or(0) as i64);
                    Response::from_string(self.metrics.encode())
                        .with_header(header("application/openmetrics-text; version=1.0.0; charset=utf-8"))
                }
                "/status" => Response::from_string(self.status().to_string())
                    .with_header(header("application/json"))
                    .with_header(no_store.clone()),
                "/" | "/index.html" => Response::from_string(DASHBOARD).with_header(header("text/html; charset=utf-8")),
                _ => Response::from_string("not found\n").with_status_code(404),
            }
        };
        // Never chunked: every answer's length is known.
        if let Err(e) = req.respond(r.with_chunked_threshold(usize::MAX)) {
            tracing::debug!(error = %e, "an HTTP answer was not sent");
        }
    }

    /// The JSON `GET /status` answers.
    fn status(&self) -> serde_json::Value {
        use serde_json::json;
        let Some(p) = self.published() else {
            return json!({ "starting": true });
        };
        let v = &p.view;
        let leader = v.health.leader;
        let newest = newest_applied(v);
        let trackers: Vec<serde_json::Value> = self
            .cfg
            .trackers
            .iter()
            .map(|(id, addr)| {
                if *id == v.me {
                    let h = &v.health;
                    return json!({
                        "id": id, "addr": addr.to_string(), "self": true, "up": true,
                        "leader": leader == Some(*id), "applied": h.applied,
                        "lag": newest - h.applied, "heard_ms_ago": 0, "synced": h.synced,
                        "clients": h.clients,
                    });
                }
                let peer = v.peers.iter().find(|x| x.node == *id);
                let up = peer.is_some_and(|x| x.up);
                let health = peer.and_then(|x| x.health.as_ref());
                json!({
                    "id": id, "addr": addr.to_string(), "self": false, "up": up,
                    "leader": up && leader == Some(*id),
                    "applied": health.map(|(h, _)| h.applied),
                    "lag": health.map(|(h, _)| newest.saturating_sub(h.applied)),
                    "heard_ms_ago": peer.and_then(|x| x.heard_ago).map(|m| m.0),
                    "synced": health.map(|(h, _)| h.synced),
                    "clients": health.filter(|_| up).map(|(h, _)| h.clients),
                })
            })
            .collect();
        let clients: u32 = v.health.clients
            + v.peers.iter().filter(|x| x.up).filter_map(|x| x.health.as_ref()).map(|(h, _)| h.clients).sum::<u32>();
        let rates = |f: fn(&Sample) -> u64| -> Vec<f64> {
            self.history
                .iter()
                .zip(self.history.iter().skip(1))
                .map(|(a, b)| f(b).saturating_sub(f(a)) as f64 / (b.secs - a.secs).max(1e-3))
                .collect()
        };
        let transfers: Vec<serde_json::Value> = p
            .transfers
            .iter()
            .map(|t| {
                json!({
                    "user": t.user.to_string(), "at": t.listen.to_string(),
                    "group": t.group.to_string(), "file": t.name.to_string(),
                    "size": t.size, "done": t.done,
                    "percent": (t.done as f64 * 100.0 / t.size.max(1) as f64).min(100.0),
                    "rate": t.rate,
                    "eta_secs": (t.rate > 0 && t.done < t.size).then(|| (t.size - t.done).div_ceil(t.rate)),
                    "sources": t.sources.iter().map(|(a, b)| json!({ "addr": a.to_string(), "bytes": b })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "me": v.me,
            "leader": leader,
            "trackers": trackers,
            "clients": clients,
            "sessions": v.health.sessions,
            "groups": v.health.groups,
            "files": v.health.files,
            "writes_here": p.counters.writes,
            "rates": { "every_secs": 1, "writes": rates(|s| s.applied), "reads": rates(|s| s.reads) },
            "transfers": transfers,
        })
    }
}
