//! The operator's view over HTTP (`tracker --http`), end to end with real
//! trackers and clients: `/metrics` parses as the Prometheus text format and
//! its counters move as clients drive the cluster; the dashboard, loaded in
//! a real browser (headless Chromium, driven over the DevTools protocol),
//! shows the three trackers, the leader and a running download, and shows a
//! killed tracker down within 5 s.
//!
//! Chromium: `chromium` on the PATH (Debian's package, which `.ci/run`
//! installs), or the binary `SHOAL_CHROMIUM` names. Without one the browser
//! test says so and passes, unless `SHOAL_REQUIRE_BROWSER=1` (set by
//! `.ci/run`), when it fails.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{LineInfo, Scrape, Value};
use serde_json::json;
use support::*;

/// `GET path` over HTTP/1.1: the status code and the body (of the length
/// `Content-Length` gives, or up to the end).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
            });
            if let Some(len) = len {
                if buf.len() >= end + 4 + len {
                    return (code, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string());
                }
            }
        }
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            let end =
                head_end.unwrap_or_else(|| panic!("no HTTP answer from {addr}: {:?}", String::from_utf8_lossy(&buf)));
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            return (code, String::from_utf8_lossy(&buf[end + 4..]).to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Three trackers, each serving HTTP on a port of its own.
struct Cluster {
    dir: TempDir,
    info: PathBuf,
    trackers: Vec<Option<Tracker>>,
    http: Vec<SocketAddr>,
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let dir = TempDir::new(tag);
        let addrs: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
        let info = tracker_info(dir.path(), &addrs);
        let mut trackers = Vec::new();
        let mut http = Vec::new();
        for id in 1..=3 {
            let mut t = Tracker::start_with(&info, id, &["--http", "127.0.0.1:0"]);
            let line = t.wait_for("dashboard: http://");
            let addr = line["dashboard: http://".len()..].split('/').next().unwrap().parse().unwrap();
            http.push(addr);
            trackers.push(Some(t));
        }
        // A leader, as every tracker names it, before the first write.
        for t in trackers.iter_mut().flatten() {
            t.wait_for("leader: tracker");
        }
        Cluster { dir, info, trackers, http }
    }

    /// A logged-in client (its tracker is the first of tracker_info: 1).
    fn client(&self, user: &str, extra: &[&str]) -> Client {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut c = Client::start_with(user, &self.info, &listen, extra);
        c.expect(&format!("create_user {user} pw"), &[&format!("user {user} created")]);
        c.expect(&format!("login {user} pw"), &[&format!("logged in as {user}")]);
        c
    }
}

/// Scrapes `/metrics`, checking every line is Prometheus (OpenMetrics)
/// text: a `# HELP`, `# TYPE` or `# UNIT` line or a sample, `# EOF` last.
fn scrape(addr: SocketAddr) -> Scrape {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition must end with # EOF");
    let mut counters = Vec::new();
    for l in &lines[..lines.len() - 1] {
        if l.starts_with("# UNIT ") {
            continue;
        }
        match LineInfo::parse(l) {
            LineInfo::Ignored | LineInfo::Empty => panic!("not Prometheus text format: {l:?}"),
            LineInfo::Type { metric_name, sample_type: prometheus_parse::SampleType::Counter, .. } => {
                counters.push(metric_name)
            }
            LineInfo::Sample { metric_name, .. } => {
                if let Some(c) = counters.iter().find(|c| metric_name.starts_with(c.as_str())) {
                    assert_eq!(metric_name, format!("{c}_total"), "a counter's sample is named <name>_total");
                }
            }
            _ => {}
        }
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// A sample's value (a histogram's: its count); `label` picks one of a family.
fn value(s: &Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?} in /metrics"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(_) => panic!("{name} is a summary"),
    }
}

/// Scrapes `addr` until `done` holds (the loop publishes every 250 ms).
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(addr);
        if done(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            let shown: Vec<String> =
                s.samples.iter().map(|x| format!("{} {:?} {:?}", x.metric, x.labels, x.value)).collect();
            panic!("/metrics never showed {what}:\n{}", shown.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A figure summed over the trackers' scrapes (a client talks to any one).
fn total(scrapes: &[Scrape], name: &str, label: Option<(&str, &str)>) -> f64 {
    scrapes
        .iter()
        .map(|s| {
            let found =
                s.samples.iter().any(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)));
            if found {
                value(s, name, label)
            } else {
                0.0
            }
        })
        .sum()
}

fn scrape_all(addrs: &[SocketAddr]) -> Vec<Scrape> {
    addrs.iter().map(|a| scrape(*a)).collect()
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_the_cluster() {
    let c = Cluster::start("metrics");
    let before = scrape_all(&c.http);
    let mut ann = c.client("ann", &[]);
    ann.expect("create_group g", &["group g created"]);
    ann.expect("create_group g", &["error: group already exists"]);
    ann.answers_all("list_groups");
    let mut bob = Client::start_with("bob", &c.info, &format!("127.0.0.1:{}", free_port()), &[]);
    bob.expect("login ann wrong", &["error: wrong user id or password"]);
    let w0 = total(&before, "shoal_tracker_writes_total", None);
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let s = scrape_all(&c.http);
        let done = total(&s, "shoal_tracker_writes_total", None) >= w0 + 4.0
            && total(&s, "shoal_tracker_failed_logins_total", None) >= 1.0
            && total(&s, "shoal_tracker_reads_total", None) >= 1.0;
        if done {
            break s;
        }
        assert!(Instant::now() < deadline, "/metrics never showed the writes, reads and failed login");
        std::thread::sleep(Duration::from_millis(50));
    };
    let moved = |n: &str| total(&after, n, None) - total(&before, n, None);
    // create_user, login, create_group and the refused one all went through the log.
    assert_eq!(moved("shoal_tracker_writes_total"), 4.0);
    assert_eq!(moved("shoal_tracker_write_latency_seconds"), 4.0, "every decided write's latency is observed");
    assert!(moved("shoal_tracker_reads_total") >= 1.0, "list_groups is a read");
    assert_eq!(moved("shoal_tracker_failed_logins_total"), 1.0);
    assert!(moved("shoal_tracker_fsyncs_total") >= 3.0, "each tracker made the log durable");
    assert!(moved("shoal_tracker_fsync_latency_seconds") >= 3.0);
    assert_eq!(total(&after, "shoal_tracker_refusals_total", Some(("reason", "group_exists"))), 1.0);
    assert_eq!(total(&after, "shoal_tracker_refusals_total", Some(("reason", "bad_credentials"))), 1.0);
    assert!(total(&after, "shoal_tracker_client_connections", None) >= 2.0, "ann and bob are connected");
    for s in &after {
        assert!(value(s, "shoal_tracker_decided_index", None) >= value(s, "shoal_tracker_applied_index", None));
        assert!(value(s, "shoal_tracker_log_bytes", None) > 0.0);
    }
    for (i, s) in after.iter().enumerate() {
        for peer in (1..=3).filter(|p| *p != i + 1) {
            assert_eq!(value(s, "shoal_tracker_link_up", Some(("peer", &peer.to_string()))), 1.0);
        }
    }
    // Every tracker applies the same writes, knows the session and the
    // group; exactly one leads.
    let applied = after.iter().map(|s| value(s, "shoal_tracker_applied_index", None)).fold(0.0, f64::max);
    assert!(applied >= 4.0);
    let mut leaders = 0.0;
    for addr in &c.http {
        let s = scrape_until(*addr, "the writes applied", |s| {
            value(s, "shoal_tracker_applied_index", None) >= applied
                && value(s, "shoal_tracker_sessions_alive", None) >= 1.0
        });
        assert_eq!(value(&s, "shoal_tracker_groups", None), 1.0);
        leaders += value(&s, "shoal_tracker_is_leader", None);
    }
    assert_eq!(leaders, 1.0, "exactly one tracker leads");
    // Anything else is not found; only GET is served.
    assert_eq!(http_get(c.http[0], "/nothing").0, 404);
    let (code, status) = http_get(c.http[0], "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["trackers"].as_array().map(|a| a.len()), Some(3));
    assert_eq!(status["groups"], json!(1));
}

// ---- the browser ----

/// Headless Chromium with its DevTools endpoint, killed on drop.
struct Browser {
    child: Child,
    _profile: TempDir,
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

impl Browser {
    /// Opens `url` in a fresh headless Chromium.
    fn open(bin: &Path, url: &str) -> Browser {
        let profile = TempDir::new("chromium-profile");
        let mut child = Command::new(bin)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "--window-size=1280,900"])
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].to_string());
                }
            }
        });
        let browser_ws = rx.recv_timeout(WAIT).expect("Chromium never said where its DevTools listen");
        let port: SocketAddr = browser_ws["ws://".len()..].split('/').next().unwrap().parse().unwrap();
        // The page's own endpoint.
        let deadline = Instant::now() + WAIT;
        let page_ws = loop {
            let (_, list) = http_get(port, "/json/list");
            let list: serde_json::Value = serde_json::from_str(&list).unwrap_or(json!([]));
            let page = list.as_array().and_then(|a| a.iter().find(|t| t["type"] == "page").cloned());
            if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str().map(String::from)) {
                break ws;
            }
            assert!(Instant::now() < deadline, "Chromium opened no page");
            std::thread::sleep(Duration::from_millis(50));
        };
        let stream = TcpStream::connect_timeout(&port, WAIT).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client(page_ws.as_str(), stream).expect("DevTools WebSocket handshake");
        Browser { child, _profile: profile, ws, next_id: 1 }
    }

    /// Calls a DevTools method and returns its result.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let m = self.ws.read().expect("an answer from Chromium");
            let Ok(text) = m.to_text() else { continue };
            let v: serde_json::Value = serde_json::from_str(text).unwrap_or(json!({}));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// What the rendered page shows: each tracker's row and each transfer's.
    fn shown(&mut self) -> serde_json::Value {
        let js = r##"JSON.stringify({
            updated: document.getElementById("updated").textContent,
            trackers: [...document.querySelectorAll("#trackers tbody tr")].map(r => ({
                id: r.dataset.tracker, state: r.dataset.state, leader: r.dataset.leader, text: r.innerText })),
            transfers: [...document.querySelectorAll("#transfers tbody tr[data-transfer]")].map(r => ({
                file: r.dataset.transfer, percent: Number(r.dataset.percent), text: r.innerText })),
        })"##;
        let r = self.call("Runtime.evaluate", json!({ "expression": js, "returnByValue": true }));
        serde_json::from_str(r["result"]["value"].as_str().unwrap_or("{}")).unwrap()
    }

    /// Polls what the page shows until `done` holds, for at most `within`.
    fn until(&mut self, within: Duration, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.shown();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "the page never showed {what} within {within:?}: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, to: &Path) {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64_decode(r["data"].as_str().expect("screenshot data"));
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').map(val).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, v)| n | (*v as u32) << (18 - 6 * i));
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn rows<'a>(shown: &'a serde_json::Value, key: &str) -> &'a Vec<serde_json::Value> {
    static EMPTY: Vec<serde_json::Value> = Vec::new();
    shown[key].as_array().unwrap_or(&EMPTY)
}

#[test]
fn the_dashboard_in_a_browser_shows_the_cluster_a_download_and_a_tracker_going_down() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("SHOAL_REQUIRE_BROWSER").is_none(),
            "SHOAL_REQUIRE_BROWSER is set but no chromium is on the PATH (apt-get install chromium)"
        );
        eprintln!("skipped: no chromium on the PATH (apt-get install chromium, or set SHOAL_CHROMIUM)");
        return;
    };
    let mut c = Cluster::start("dashboard");
    let mut ann = c.client("ann", &["--max-upload-rate", "1"]);
    let mut bob = c.client("bob", &[]);
    ann.expect("create_group g", &["group g created"]);
    bob.expect("join_group g", &["join request sent to g"]);
    ann.expect("accept_request g bob", &["bob is now a member of g"]);
    let file = c.dir.path().join("big.bin");
    let mut content = vec![0u8; 24 << 20];
    shoal_core::rng::Rng::from_u64(17).fill(&mut content);
    std::fs::write(&file, &content).unwrap();
    ann.expect(&format!("upload_file {} g", file.display()), &["shared big.bin in g*"]);
    let out = c.dir.path().join("out.bin");
    bob.expect(&format!("download_file g big.bin {}", out.display()), &["downloading big.bin into *"]);

    let mut page = Browser::open(&bin, &format!("http://{}/", c.http[0]));
    // Three trackers up, one leader, the download and its progress.
    let shown = page.until(WAIT, "three trackers, a leader and bob's download", |s| {
        let trackers = rows(s, "trackers");
        let transfers = rows(s, "transfers");
        trackers.len() == 3
            && trackers.iter().all(|t| t["state"] == "up")
            && trackers.iter().filter(|t| t["leader"] == "true").count() == 1
            && transfers.iter().any(|t| t["file"] == "g/big.bin" && t["percent"].as_u64().is_some_and(|p| p < 100))
    });
    for t in rows(&shown, "trackers") {
        let text = t["text"].as_str().unwrap_or("");
        assert!(text.contains("up"), "a tracker's row says it is up: {text}");
    }
    let leader = rows(&shown, "trackers").iter().find(|t| t["leader"] == "true").unwrap().clone();
    assert!(leader["text"].as_str().unwrap_or("").contains("leader"), "{leader}");
    let leader_id: u32 = leader["id"].as_str().unwrap().parse().unwrap();
    // The leader the page shows is the one that says it leads.
    let leads = scrape(c.http[leader_id as usize - 1]);
    assert_eq!(value(&leads, "shoal_tracker_is_leader", None), 1.0, "tracker {leader_id} leads");
    let transfer = rows(&shown, "transfers").iter().find(|t| t["file"] == "g/big.bin").unwrap().clone();
    let text = transfer["text"].as_str().unwrap_or("");
    assert!(text.contains("bob") && text.contains("big.bin") && text.contains('%'), "{text}");
    // The page is live: the download's progress moves on it.
    let first = transfer["percent"].as_u64().unwrap();
    page.until(WAIT, "the download's progress moving", |s| {
        rows(s, "transfers")
            .iter()
            .any(|t| t["file"] == "g/big.bin" && t["percent"].as_u64().is_some_and(|p| p > first))
    });

    let s = scrape_all(&c.http);
    assert!(total(&s, "shoal_tracker_grants_issued_total", None) >= 1.0, "bob's download was granted");
    for one in &s {
        assert!(value(one, "shoal_tracker_transfers", None) >= 1.0, "every tracker knows of bob's download");
    }

    // A tracker dies (the leader, unless it serves the page): the page,
    // already open, shows it down within 5 s.
    let victim = if leader_id != 1 { leader_id } else { 3 };
    let victim_id = victim.to_string();
    let is_victim = |t: &&serde_json::Value| t["id"].as_str() == Some(victim_id.as_str());
    let killed_at = Instant::now();
    c.trackers[victim as usize - 1].take().unwrap().kill();
    let shown = page.until(Duration::from_secs(5), &format!("tracker {victim} down"), |s| {
        rows(s, "trackers").iter().filter(is_victim).any(|t| t["state"] == "down")
    });
    let took = killed_at.elapsed();
    let row = rows(&shown, "trackers").iter().find(is_victim).unwrap().clone();
    assert!(row["text"].as_str().unwrap_or("").contains("down"), "{row}");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    page.screenshot(&shot);
    eprintln!("tracker {victim} shown down {took:?} after it was killed; screenshot at {}", shot.display());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot of the page");
    // The dead tracker's row keeps what it last said, and says how long ago.
    assert!(row["text"].as_str().unwrap_or("").contains("s ago"), "{row}");
}
