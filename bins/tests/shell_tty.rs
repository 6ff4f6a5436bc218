//! The interactive shell on a real pseudo-terminal: lines typed ahead or
//! pasted while a command runs all run, in order, none dropped.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// A client on the slave side of a new pty; what it prints, as read from
/// the master; and the master to type into.
struct TtyClient {
    child: std::process::Child,
    master: std::fs::File,
    screen: Arc<Mutex<String>>,
}

impl TtyClient {
    fn start(info: &std::path::Path) -> TtyClient {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(name.to_str().unwrap()).unwrap();
        let winsize = rustix::termios::Winsize { ws_row: 40, ws_col: 200, ws_xpixel: 0, ws_ypixel: 0 };
        rustix::termios::tcsetwinsize(&slave, winsize).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_client"))
            .arg(&listen)
            .arg(info)
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(String::new()));
        let (mut r, s) = (master.try_clone().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        TtyClient { child, master, screen }
    }

    fn type_in(&mut self, bytes: &str) {
        self.master.write_all(bytes.as_bytes()).unwrap();
    }

    /// Waits until the screen shows `texts` in this order after `from`;
    /// where the last one ends.
    fn wait_for(&self, from: usize, texts: &[&str]) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen.lock().unwrap().clone();
            let mut at = from;
            let mut all = true;
            for t in texts {
                match screen.get(at..).and_then(|s| s.find(t)) {
                    Some(i) => at += i + t.len(),
                    None => {
                        all = false;
                        break;
                    }
                }
            }
            if all {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {texts:?} in order after byte {from}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TtyClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lines_typed_ahead_and_pasted_all_run_in_order() {
    let dir = TempDir::new("tty");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let _tracker = Tracker::start(&info, 1);
    let mut c = TtyClient::start(&info);
    let at = c.wait_for(0, &["type 'help' for commands", "shoal> "]);
    // Typed ahead in one burst, each line with its Enter: the first runs
    // while the others wait in the terminal.
    c.type_in("create_user tty pw\rlogin tty pw\rcreate_group g1\rcreate_group g2\r");
    let at = c.wait_for(at, &["user tty created", "logged in as tty", "group g1 created", "group g2 created"]);
    // A paste of several lines (bracketed, as terminals send it), then Enter.
    c.type_in("\x1b[200~list_my_groups\nleave_group g2\nlist_groups\nshow_downloads\nshow_uploads\x1b[201~\r");
    c.wait_for(
        at,
        &["g1 (owner)", "g2 (owner)", "left g2", "g1 owner=tty members=1", "no downloads", "0 bytes served in all"],
    );
}
