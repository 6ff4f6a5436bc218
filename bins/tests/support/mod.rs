//! Starts the real `tracker` and `client` binaries on loopback for tests.
//! Every process is killed when its handle drops; every wait is bounded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(30);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("shoal-test-{tag}-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

pub use shoal_net_mio::tls::TlsStream;

/// A TLS connection to a tracker with a fresh key of our own, the handshake
/// done (reads time out after [`WAIT`]).
pub fn tls_connect(addr: SocketAddr) -> TlsStream {
    let me = shoal_net_mio::tls::Identity::ephemeral().unwrap();
    shoal_net_mio::tls::connect_blocking(addr, &me, WAIT).expect("TLS handshake with the tracker").0
}

/// A TLS connection to `addr` (a tracker or a peer) with the key `me`, the
/// handshake done: the stream and the key the other end proved.
pub fn tls_connect_as(addr: SocketAddr, me: &shoal_net_mio::tls::Identity) -> (TlsStream, shoal_core::identity::KeyId) {
    shoal_net_mio::tls::connect_blocking(addr, me, WAIT).expect("TLS handshake")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a tracker_info file listing `addrs`.
pub fn tracker_info(dir: &Path, addrs: &[SocketAddr]) -> PathBuf {
    let p = dir.join("tracker_info.txt");
    let text: String = addrs.iter().map(|a| format!("{} {}\n", a.ip(), a.port())).collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// Lines from a child's output, read on a thread.
fn line_reader(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The remote ports of the established TCP connections process `pid` holds
/// (Linux: its socket descriptors, looked up in /proc/net/tcp).
pub fn connected_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // remote address, state (01: established), ..., inode.
            if f.len() > 9 && f[3] == "01" && inodes.iter().any(|i| i == f[9]) {
                if let Some(port) = f[2].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

pub struct Tracker {
    pub child: Child,
    pub addr: SocketAddr,
    out: Receiver<String>,
}

impl Tracker {
    /// Starts tracker `id` of `info` and waits until it says it listens.
    pub fn start(info: &Path, id: u32) -> Tracker {
        Tracker::start_with(info, id, &[])
    }

    /// Starts tracker `id` with extra command-line arguments.
    pub fn start_with(info: &Path, id: u32, args: &[&str]) -> Tracker {
        let text = std::fs::read_to_string(info).unwrap();
        let line = text.lines().nth(id as usize - 1).unwrap();
        let addr: SocketAddr = line.replace(' ', ":").parse().unwrap();
        let data = info.parent().unwrap().join(format!("tracker-data-{id}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracker"))
            .arg(info)
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = line_reader(child.stdout.take().unwrap());
        let first = out.recv_timeout(WAIT).expect("tracker did not start");
        assert!(first.starts_with(&format!("tracker {id} listening on")), "{first}");
        Tracker { child, addr, out }
    }

    /// Kills the tracker at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The next line the tracker prints.
    pub fn line(&mut self) -> String {
        self.out.recv_timeout(WAIT).expect("a line from the tracker")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Reads what the tracker printed so far; returns the last leader it named.
    pub fn leader_so_far(&mut self, last: &mut Option<u32>) {
        while let Ok(l) = self.out.try_recv() {
            if let Some(rest) = l.strip_prefix("leader: tracker ") {
                *last = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            } else if l.starts_with("leader: none") {
                *last = None;
            }
        }
    }

    /// Waits (bounded) for the tracker to print a line starting with `prefix`.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        loop {
            let l = self.out.recv_timeout(WAIT).unwrap_or_else(|_| panic!("tracker never printed {prefix:?}"));
            if l.starts_with(prefix) {
                return l;
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client driven line by line, its stdout and stderr merged in order.
pub struct Client {
    pub child: Child,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    pub name: String,
}

impl Client {
    pub fn start(name: &str, info: &Path) -> Client {
        Client::start_with(name, info, "127.0.0.1:0", &[])
    }

    /// A client listening at `listen`, with extra arguments. Its logs stay
    /// at their default (warnings): tests read the shell's output only.
    pub fn start_with(name: &str, info: &Path, listen: &str, extra: &[&str]) -> Client {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_client"))
            .arg(listen)
            .arg(info)
            .args(extra)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Client { child, stdin, out: line_reader(reader), name: name.into() }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// The next `n` output lines.
    pub fn lines(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.out
                    .recv_timeout(WAIT)
                    .unwrap_or_else(|_| panic!("{}: no output line {} within {WAIT:?}", self.name, i + 1))
            })
            .collect()
    }

    /// Runs `cmd` and returns its first `n` output lines, skipping log lines.
    pub fn answers(&mut self, cmd: &str, n: usize) -> Vec<String> {
        self.send_raw(format!("{cmd}\n").as_bytes());
        let mut got = Vec::new();
        while got.len() < n {
            let l = self
                .out
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("{}: `{cmd}`: no answer within {WAIT:?} (got {got:?})", self.name));
            let log = [" INFO ", " WARN ", " DEBUG ", " ERROR "].iter().any(|k| l.contains(k));
            if !log {
                got.push(l);
            }
        }
        got
    }

    /// Runs `cmd` and returns every line it printed, however many (log
    /// lines aside): a `help` after it marks the end (its last line).
    pub fn answers_all(&mut self, cmd: &str) -> Vec<String> {
        self.send_raw(format!("{cmd}\nhelp\n").as_bytes());
        let help = shoal_core::shell::help();
        let (first, last) = (help.first().cloned().unwrap_or_default(), help.last().cloned().unwrap_or_default());
        let mut got = Vec::new();
        loop {
            let l = self
                .out
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("{}: `{cmd}`: no end within {WAIT:?} (got {got:?})", self.name));
            if l == first {
                while self.out.recv_timeout(WAIT).is_ok_and(|l| l != last) {}
                return got;
            }
            if ![" INFO ", " WARN ", " DEBUG ", " ERROR "].iter().any(|k| l.contains(k)) {
                got.push(l);
            }
        }
    }

    pub fn answer(&mut self, cmd: &str) -> String {
        self.answers(cmd, 1).remove(0)
    }

    /// Runs `cmd` and checks its output lines (log lines aside). An expected line ending in `*`
    /// matches any line starting with what comes before the `*`.
    pub fn expect(&mut self, cmd: &str, expected: &[&str]) {
        // Log lines (a peer banned meanwhile, say) may come before the
        // command's own, on stderr: only the command's are compared.
        let got = self.answers(cmd, expected.len().max(1));
        for (g, e) in got.iter().zip(expected) {
            let ok = match e.strip_suffix('*') {
                Some(prefix) => g.starts_with(prefix),
                None => g == e,
            };
            assert!(ok, "{}: `{cmd}`\n  expected: {expected:?}\n  got:      {got:?}", self.name);
        }
    }

    /// Closes stdin, waits (bounded) for the exit, and returns the status and
    /// every output line not read yet.
    pub fn finish_output(mut self) -> (ExitStatus, Vec<String>) {
        let out = std::mem::replace(&mut self.out, mpsc::channel().1);
        let status = self.finish();
        // The reader thread hangs up at end of output.
        let mut rest = Vec::new();
        while let Ok(line) = out.recv_timeout(WAIT) {
            rest.push(line);
        }
        (status, rest)
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes stdin and waits (bounded) for the exit status.
    pub fn finish(mut self) -> ExitStatus {
        drop(self.stdin.take());
        // A watchdog kills the client if it does not exit in time.
        let (done, watch) = mpsc::channel::<()>();
        let pid = self.child.id();
        let dog = std::thread::spawn(move || {
            let timed_out = watch.recv_timeout(WAIT).is_err();
            if timed_out {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            timed_out
        });
        let status = self.child.wait().unwrap();
        let _ = done.send(());
        assert!(!dog.join().unwrap(), "{} did not exit within {WAIT:?}", self.name);
        status
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
