//! `client <ip>:<port> tracker_info.txt`: a shoal peer with its shell.
//!
//! On a terminal: a line editor with history; lines typed or pasted while a
//! command runs wait their turn, and a pasted block of several lines runs
//! line by line, in order. Running downloads show a progress line each
//! just above the prompt (percent, rate, peers, ETA), redrawn in place once
//! a second, and `show_downloads` is the long form (`-v`: the ETA, bytes
//! from each source peer). With stdin piped: one command
//! a line, each finished before the next is read; results on stdout, failures
//! as `error: <reason>` on stderr; exit status 0 if every command succeeded.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use clap::Parser;
use shoal_bins::{read_line_bounded, Line};
use shoal_core::client::ClientConfig;
use shoal_core::shell::{parse, ParseError, ShellCommand, MAX_LINE_LEN};
use shoal_net_mio::client::{ClientHandle, CommandResult};

/// A shoal client: shares files with its groups and downloads theirs.
#[derive(Parser)]
#[command(name = "client", version, about)]
struct Args {
    /// Where this client serves chunks to other peers, e.g. 127.0.0.1:9001.
    listen: SocketAddr,
    /// The cluster's trackers, one `IP PORT` or `IP:PORT` a line.
    tracker_info: PathBuf,
    /// Upload at most this many MB (10^6 bytes) per second, over all peers.
    #[arg(long, value_name = "MB_PER_S")]
    max_upload_rate: Option<f64>,
    /// INSECURE: talk to peers without TLS. File contents and download grants
    /// cross the network in the clear and no peer's key is checked. Only for
    /// measuring TLS's cost: such a client reaches and serves only peers run
    /// with this flag too (the trackers are still reached over TLS).
    #[arg(long)]
    insecure_plaintext_peers: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    shoal_bins::init_logging();
    let entries = match shoal_bins::load_tracker_info(&args.tracker_info) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let mut cfg = ClientConfig::new(args.listen, entries.iter().map(|t| t.addr).collect());
    // Pinned in tracker_info.txt, or published beside it by the trackers.
    cfg.tracker_keys = shoal_bins::tracker_keys(&args.tracker_info, &entries);
    match args.max_upload_rate {
        Some(r) if r.is_finite() && r > 0.0 => cfg.max_upload_rate = Some((r * 1e6) as u64),
        Some(_) => return fail("--max-upload-rate must be a positive number of MB/s"),
        None => {}
    }
    if args.insecure_plaintext_peers {
        eprintln!(
            "warning: --insecure-plaintext-peers: peer connections are NOT encrypted and peers' keys are NOT checked"
        );
        cfg.plaintext_peers = true;
    }
    let handle = match ClientHandle::start(cfg) {
        Ok(h) => h,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen)),
    };
    if io::stdin().is_terminal() {
        repl(&handle)
    } else {
        piped(&handle)
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

/// Prints a result; true if it succeeded.
fn report(r: &CommandResult) -> bool {
    match &r.result {
        Ok(lines) => {
            let mut out = io::stdout().lock();
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = out.flush();
            true
        }
        Err(e) => {
            eprintln!("error: {e}");
            false
        }
    }
}

fn piped(handle: &ClientHandle) -> ExitCode {
    let mut stdin = io::stdin().lock();
    let mut all_ok = true;
    loop {
        let line = match read_line_bounded(&mut stdin, MAX_LINE_LEN) {
            Ok(Some(Line::Text(l))) => l,
            Ok(Some(Line::TooLong)) => {
                eprintln!("error: {}", ParseError::LineTooLong);
                all_ok = false;
                continue;
            }
            Ok(Some(Line::NotUtf8)) => {
                eprintln!("error: input line is not UTF-8");
                all_ok = false;
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!("error: reading stdin: {e}");
                all_ok = false;
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse(&line) {
            Err(e) => {
                eprintln!("error: {e}");
                all_ok = false;
            }
            Ok(cmd) => {
                let exit = cmd == ShellCommand::Exit;
                all_ok &= report(&handle.run(cmd));
                if exit {
                    return status(all_ok);
                }
            }
        }
    }
    // End of input: let running downloads finish, then log out like `exit`.
    handle.wait_downloads();
    for d in handle.download_stats() {
        if let Some(reason) = d.failed {
            eprintln!("error: download of {} from {} failed: {reason}", d.name, d.group);
            all_ok = false;
        }
    }
    let r = handle.run(ShellCommand::Exit);
    if let Err(e) = r.result {
        tracing::debug!(error = %e, "logout at end of input failed");
    }
    status(all_ok)
}

fn status(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Interactive: a line editor, and a progress line for each running
/// download kept just above the prompt: printed after each command, and
/// redrawn in place once a second (the cursor saved and restored, so the
/// line being typed is untouched and nothing typed is lost).
fn repl(handle: &ClientHandle) -> ExitCode {
    let mut rl = match rustyline::DefaultEditor::new() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the line editor: {e}")),
    };
    println!("shoal client serving peers at {}; type 'help' for commands", handle.listen_addr());
    let shown = Mutex::new(Progress::default());
    // Redrawing in place needs a terminal that moves its cursor.
    let live = io::stdout().is_terminal() && std::env::var("TERM").is_ok_and(|t| t != "dumb");
    std::thread::scope(|scope| {
        let (stop, stopped) = mpsc::channel::<()>();
        if live {
            let shown = &shown;
            scope.spawn(move || redraw_progress(handle, shown, stopped));
        }
        let code = read_lines(handle, &mut rl, &shown, live);
        drop(stop);
        code
    })
}

fn read_lines(
    handle: &ClientHandle,
    rl: &mut rustyline::DefaultEditor,
    shown: &Mutex<Progress>,
    live: bool,
) -> ExitCode {
    use rustyline::error::ReadlineError;
    let lock = || shown.lock().unwrap_or_else(|e| e.into_inner());
    let run = |cmd: ShellCommand| {
        let r = handle.run(cmd);
        report(&r);
        r
    };
    let mut user: Option<String> = None;
    loop {
        let prompt = match &user {
            Some(u) => format!("{u}@shoal> "),
            None => "shoal> ".to_string(),
        };
        if live {
            lock().print_above_prompt(handle);
        }
        let read = rl.readline(&prompt);
        // The lines above the prompt scrolled up with the line entered.
        lock().rows = 0;
        match read {
            // A paste of several lines arrives as one text (bracketed
            // paste): each line runs, in order.
            Ok(text) => {
                for line in text.lines() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    if line.len() <= MAX_LINE_LEN {
                        let _ = rl.add_history_entry(line);
                    }
                    match parse(line) {
                        Err(e) => eprintln!("error: {e}"),
                        Ok(cmd) => {
                            let exit = cmd == ShellCommand::Exit;
                            // At a terminal, show_downloads is the long
                            // form: ETA and bytes from each source peer.
                            let cmd = match cmd {
                                ShellCommand::ShowDownloads { .. } => ShellCommand::ShowDownloads { verbose: true },
                                c => c,
                            };
                            let r = run(cmd);
                            user = r.user.map(|u| u.to_string());
                            if exit {
                                return ExitCode::SUCCESS;
                            }
                        }
                    }
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => {
                run(ShellCommand::Exit);
                return ExitCode::SUCCESS;
            }
            Err(e) => return fail(&format!("reading input: {e}")),
        }
    }
}

/// The progress lines and where they are.
#[derive(Default)]
struct Progress {
    /// Downloads seen running whose end was not printed yet.
    running: std::collections::BTreeSet<(String, String)>,
    /// Progress lines printed just above the prompt (0: none there now).
    rows: usize,
}

impl Progress {
    /// A line for each running download, and for each that ended since
    /// (those are forgotten once printed by `print_above_prompt`); the
    /// keys of the ended ones.
    fn lines(&mut self, handle: &ClientHandle) -> (Vec<String>, Vec<(String, String)>) {
        let mb = |b: u64| b as f64 / 1e6;
        let (mut lines, mut ended) = (Vec::new(), Vec::new());
        for d in handle.download_stats() {
            let key = (d.group.to_string(), d.name.to_string());
            // One terminal row each, so a redraw finds them.
            let name = d.name.to_string();
            let name = if name.chars().count() > 32 {
                format!("{}...", name.chars().take(29).collect::<String>())
            } else {
                name
            };
            if d.complete || d.failed.is_some() {
                if !self.running.contains(&key) {
                    continue;
                }
                lines.push(match &d.failed {
                    Some(e) => format!("{name}: download failed: {e}"),
                    None => {
                        let secs = d.elapsed.0 as f64 / 1000.0;
                        format!(
                            "{name}: downloaded {:.1} MB in {secs:.1} s ({:.1} MB/s), every chunk's SHA1 checked",
                            mb(d.size),
                            mb(d.size) / secs.max(0.001)
                        )
                    }
                });
                ended.push(key);
                continue;
            }
            self.running.insert(key);
            let pct = (d.verified * 100).checked_div(d.size).unwrap_or(100);
            let eta = d.eta_secs().map_or("-".into(), shoal_core::client::format_secs);
            lines.push(format!(
                "{name}: {pct}% of {:.1} MB, {:.1} MB/s, {} peers, ETA {eta}",
                mb(d.size),
                mb(d.rate),
                d.peers
            ));
        }
        (lines, ended)
    }

    /// Prints the lines before the prompt is drawn (nothing is being typed).
    fn print_above_prompt(&mut self, handle: &ClientHandle) {
        let (lines, ended) = self.lines(handle);
        for k in ended {
            self.running.remove(&k);
        }
        let mut out = io::stdout().lock();
        for l in &lines {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
        self.rows = lines.len();
    }

    /// Redraws the lines above the prompt in place, if they are still there
    /// and as many.
    fn redraw(&mut self, handle: &ClientHandle) {
        if self.rows == 0 {
            return;
        }
        let (lines, _) = self.lines(handle);
        if lines.len() != self.rows {
            return;
        }
        // Save the cursor, go up to the first line, rewrite each (down a
        // row after each, never scrolling), restore the cursor.
        let mut s = format!("\x1b7\x1b[{}A", self.rows);
        for l in &lines {
            s.push_str(&format!("\r\x1b[2K{l}\x1b[1B"));
        }
        s.push_str("\x1b8");
        let mut out = io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }
}

/// Once a second, the progress lines above the prompt are redrawn.
fn redraw_progress(handle: &ClientHandle, shown: &Mutex<Progress>, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(Duration::from_secs(1)) {
        shown.lock().unwrap_or_else(|e| e.into_inner()).redraw(handle);
    }
}
