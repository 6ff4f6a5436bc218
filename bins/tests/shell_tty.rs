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

/// A download started at the terminal shows a progress line above the
/// prompt (percent, rate, peers, ETA) and a line when it ends, while the
/// prompt keeps taking commands; `show_downloads` there is the long form.
#[test]
fn a_download_shows_live_progress_while_the_prompt_takes_commands() {
    let dir = TempDir::new("tty-progress");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let info = tracker_info(dir.path(), &[addr]);
    let _tracker = Tracker::start(&info, 1);
    // The sharer, piped, uploads at 1 MB/s: 6 MiB take about 6 s.
    let mut ann = Client::start_with("ann", &info, &format!("127.0.0.1:{}", free_port()), &["--max-upload-rate", "1"]);
    ann.expect("create_user ann pw", &["user ann created"]);
    ann.expect("login ann pw", &["logged in as ann"]);
    ann.expect("create_group g", &["group g created"]);
    let file = dir.path().join("big.bin");
    let mut content = vec![0u8; 6 << 20];
    shoal_core::rng::Rng::from_u64(3).fill(&mut content);
    std::fs::write(&file, &content).unwrap();
    ann.expect(&format!("upload_file {} g", file.display()), &["shared big.bin in g*"]);

    let mut c = TtyClient::start(&info);
    let at = c.wait_for(0, &["shoal> "]);
    c.type_in("create_user bob pw\rlogin bob pw\rjoin_group g\r");
    let at = c.wait_for(at, &["logged in as bob", "join request sent to g"]);
    ann.expect("accept_request g bob", &["bob is now a member of g"]);
    let out = dir.path().join("out.bin");
    c.type_in(&format!("download_file g big.bin {}\r", out.display()));
    let at = c.wait_for(at, &["downloading big.bin into"]);
    let at = c.wait_for(at, &["big.bin: ", "% of 6.3 MB, ", " MB/s, ", " peers, ETA "]);
    // The prompt still answers while the download runs: show_downloads,
    // once the rate is measured, gives the ETA and the bytes per source.
    let deadline = Instant::now() + WAIT;
    let mut from = at;
    let at = loop {
        c.type_in("show_downloads\r");
        let end = c.wait_for(from, &["show_downloads", "[D] g big.bin ", "peers"]);
        let screen = c.screen.lock().unwrap().clone();
        if screen[end..].starts_with(" ETA ") {
            break c.wait_for(end, &["  from 127.0.0.1:"]);
        }
        assert!(Instant::now() < deadline, "show_downloads never gave an ETA:\n{screen}");
        from = end;
    };
    let at = c.wait_for(at, &["big.bin: downloaded 6.3 MB in ", "every chunk's SHA1 checked"]);
    c.type_in("list_my_groups\r");
    c.wait_for(at, &["list_my_groups", "\ng\r\n"]);
    assert_eq!(std::fs::read(&out).unwrap(), content);
}
