//! The benchmarks' handles on the real programs: a child process driven
//! through its piped shell, and what `/proc` says about it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// A running `tracker` or `client`, its stdout read line by line.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub out: Receiver<String>,
}

impl Proc {
    pub fn spawn(bin: &Path, args: &[String]) -> Result<Proc, String> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (run `cargo build --release` first)", bin.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc { child, stdin, out })
    }

    /// Sends a command without waiting for its answer.
    pub fn send(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}").map_err(|e| e.to_string())
    }

    /// The next line of output (an answer), within two minutes.
    pub fn answer(&mut self, line: &str) -> Result<String, String> {
        self.out.recv_timeout(Duration::from_secs(120)).map_err(|_| format!("no answer to `{line}`"))
    }

    /// Sends a command and returns its first output line.
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.send(line)?;
        self.answer(line)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory of this program, where `cargo build` put `tracker` and
/// `client` beside it.
pub fn bin_dir() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(exe.parent().ok_or("this program is in no directory")?.to_path_buf())
}

/// A loopback address with a port free now.
pub fn free_addr() -> Result<String, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.to_string())
        .map_err(|e| format!("no free port: {e}"))
}

/// CPU seconds (user and system) process `pid` has used.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The fields after the command name (which may hold spaces): state, ppid, ...
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here.
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}
