//! `client <ip>:<port> tracker_info.txt`: a shoal peer with its shell.
//!
//! On a terminal: a line editor with history; lines typed or pasted while a
//! command runs wait their turn, and a pasted block of several lines runs
//! line by line, in order. With stdin piped: one command
//! a line, each finished before the next is read; results on stdout, failures
//! as `error: <reason>` on stderr; exit status 0 if every command succeeded.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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

fn repl(handle: &ClientHandle) -> ExitCode {
    use rustyline::error::ReadlineError;
    let mut rl = match rustyline::DefaultEditor::new() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the line editor: {e}")),
    };
    println!("shoal client serving peers at {}; type 'help' for commands", handle.listen_addr());
    let mut user: Option<String> = None;
    loop {
        let prompt = match &user {
            Some(u) => format!("{u}@shoal> "),
            None => "shoal> ".to_string(),
        };
        match rl.readline(&prompt) {
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
                            let r = handle.run(cmd);
                            report(&r);
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
                report(&handle.run(ShellCommand::Exit));
                return ExitCode::SUCCESS;
            }
            Err(e) => return fail(&format!("reading input: {e}")),
        }
    }
}
