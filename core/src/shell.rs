//! The client shell's language: parsing a line into a [`ShellCommand`], and
//! turning results into the lines a person (or a script) reads.
//!
//! Words are separated by white space; a word may be put in double quotes to
//! hold spaces (`upload_file "my file.txt" g1`), with `\"` and `\\` inside.

use thiserror::Error;

use crate::ids::{FileName, GroupId, NameError, UserId};
use crate::proto::{ApiError, Reply};

/// Longest input line accepted; a longer one is refused whole.
pub const MAX_LINE_LEN: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShellCommand {
    CreateUser {
        user: UserId,
        password: String,
    },
    Login {
        user: UserId,
        password: String,
    },
    CreateGroup {
        group: GroupId,
    },
    JoinGroup {
        group: GroupId,
    },
    LeaveGroup {
        group: GroupId,
    },
    ListRequests {
        group: GroupId,
    },
    AcceptRequest {
        group: GroupId,
        user: UserId,
    },
    RejectRequest {
        group: GroupId,
        user: UserId,
    },
    ListGroups,
    ListMyGroups,
    ListFiles {
        group: GroupId,
    },
    UploadFile {
        path: String,
        group: GroupId,
    },
    DownloadFile {
        group: GroupId,
        name: FileName,
        destination: String,
    },
    /// `verbose`: each download's bytes per source and banned peers too.
    ShowDownloads {
        verbose: bool,
    },
    /// What this client served: bytes per shared file, and in all.
    ShowUploads,
    StopShare {
        group: GroupId,
        name: FileName,
    },
    Logout,
    Exit,
    Help,
}

/// Every command with its arguments and what it does: the help text and the
/// usage lines come from here.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("create_user", "<user_id> <passwd>", "create an account"),
    ("login", "<user_id> <passwd>", "log in (this client shares its files while logged in)"),
    ("create_group", "<group_id>", "create a group you own"),
    ("join_group", "<group_id>", "ask to join a group"),
    ("leave_group", "<group_id>", "leave a group and stop sharing its files"),
    ("list_requests", "<group_id>", "owner: pending join requests"),
    ("accept_request", "<group_id> <user_id>", "owner: admit a user"),
    ("reject_request", "<group_id> <user_id>", "owner: turn a request down"),
    ("list_groups", "", "every group with its owner and member count"),
    ("list_my_groups", "", "the groups you belong to"),
    ("list_files", "<group_id>", "a group's files, sizes and live sharers"),
    ("upload_file", "<file_path> <group_id>", "share a file with a group"),
    ("download_file", "<group_id> <file_name> <destination>", "fetch a file from its sharers"),
    ("show_downloads", "[-v]", "this client's downloads (-v: bytes per source, banned peers)"),
    ("show_uploads", "", "bytes this client served, per shared file and in all"),
    ("stop_share", "<group_id> <file_name>", "stop sharing a file"),
    ("logout", "", "end the session; sharing stops until the next login"),
    ("exit", "", "log out and quit"),
    ("help", "", "this list"),
];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("input line longer than {MAX_LINE_LEN} bytes")]
    LineTooLong,
    #[error("unknown command '{0}' (type 'help' for the list)")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(String),
    #[error("{what}: {err}")]
    BadName { what: &'static str, err: NameError },
    #[error("unterminated quote")]
    UnterminatedQuote,
    #[error("empty line")]
    Empty,
}

/// The usage line of a command.
pub fn usage(name: &str) -> String {
    COMMANDS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(n, args, _)| if args.is_empty() { n.to_string() } else { format!("{n} {args}") })
        .unwrap_or_default()
}

/// The help text, one command a line.
pub fn help() -> Vec<String> {
    COMMANDS.iter().map(|(n, args, what)| format!("{:<52} {what}", format!("{n} {args}"))).collect()
}

fn words(line: &str) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { return Ok(out) };
        let mut w = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(ParseError::UnterminatedQuote),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\')) => w.push(c),
                        Some(c) => {
                            w.push('\\');
                            w.push(c);
                        }
                        None => return Err(ParseError::UnterminatedQuote),
                    },
                    Some(c) => w.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                chars.next();
            }
        }
        out.push(w);
    }
}

/// Parses one input line.
pub fn parse(line: &str) -> Result<ShellCommand, ParseError> {
    if line.len() > MAX_LINE_LEN {
        return Err(ParseError::LineTooLong);
    }
    let w = words(line)?;
    let Some((name, args)) = w.split_first() else { return Err(ParseError::Empty) };
    let name = name.as_str();
    let Some(&(_, spec, _)) = COMMANDS.iter().find(|(n, _, _)| *n == name) else {
        return Err(ParseError::Unknown(name.chars().take(64).collect()));
    };
    let required = spec.split_whitespace().filter(|w| !w.starts_with('[')).count();
    let optional = spec.split_whitespace().count() - required;
    if args.len() < required || args.len() > required + optional {
        return Err(ParseError::Usage(usage(name)));
    }
    let user = |s: &str| UserId::new(s).map_err(|err| ParseError::BadName { what: "bad user id", err });
    let group = |s: &str| GroupId::new(s).map_err(|err| ParseError::BadName { what: "bad group id", err });
    let file = |s: &str| FileName::new(s).map_err(|err| ParseError::BadName { what: "bad file name", err });
    let a = |i: usize| args[i].as_str();
    Ok(match name {
        "create_user" => ShellCommand::CreateUser { user: user(a(0))?, password: a(1).to_string() },
        "login" => ShellCommand::Login { user: user(a(0))?, password: a(1).to_string() },
        "create_group" => ShellCommand::CreateGroup { group: group(a(0))? },
        "join_group" => ShellCommand::JoinGroup { group: group(a(0))? },
        "leave_group" => ShellCommand::LeaveGroup { group: group(a(0))? },
        "list_requests" => ShellCommand::ListRequests { group: group(a(0))? },
        "accept_request" => ShellCommand::AcceptRequest { group: group(a(0))?, user: user(a(1))? },
        "reject_request" => ShellCommand::RejectRequest { group: group(a(0))?, user: user(a(1))? },
        "list_groups" => ShellCommand::ListGroups,
        "list_my_groups" => ShellCommand::ListMyGroups,
        "list_files" => ShellCommand::ListFiles { group: group(a(0))? },
        "upload_file" => ShellCommand::UploadFile { path: a(0).to_string(), group: group(a(1))? },
        "download_file" => {
            ShellCommand::DownloadFile { group: group(a(0))?, name: file(a(1))?, destination: a(2).to_string() }
        }
        "show_downloads" => match args.first().map(|a| a.as_str()) {
            None => ShellCommand::ShowDownloads { verbose: false },
            Some("-v") => ShellCommand::ShowDownloads { verbose: true },
            Some(_) => return Err(ParseError::Usage(usage(name))),
        },
        "show_uploads" => ShellCommand::ShowUploads,
        "stop_share" => ShellCommand::StopShare { group: group(a(0))?, name: file(a(1))? },
        "logout" => ShellCommand::Logout,
        "exit" => ShellCommand::Exit,
        "help" => ShellCommand::Help,
        _ => unreachable!("every name in COMMANDS is matched above"),
    })
}

/// Why a shell command failed. `Display` is the text after `error: `.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShellError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("already logged in as {0}; log out first")]
    AlreadyLoggedIn(UserId),
    #[error("no tracker answered (tried {tried} of them)")]
    NoTracker { tried: usize },
    #[error("tracker {tracker} proved key {got}, not {expected} ({why}): sent it nothing")]
    TrackerKey {
        tracker: std::net::SocketAddr,
        got: crate::identity::KeyId,
        expected: crate::identity::KeyId,
        why: &'static str,
    },
    #[error("{0}")]
    Local(String),
}

/// What a successful command prints, one string a line.
pub fn render(cmd: &ShellCommand, reply: &Reply) -> Vec<String> {
    use ShellCommand as C;
    let one = |s: String| vec![s];
    match (cmd, reply) {
        (C::CreateUser { user, .. }, _) => one(format!("user {user} created")),
        (C::Login { user, .. }, _) => one(format!("logged in as {user}")),
        (C::CreateGroup { group }, _) => one(format!("group {group} created")),
        (C::JoinGroup { group }, _) => one(format!("join request sent to {group}")),
        (C::LeaveGroup { group }, Reply::Left { group_deleted, new_owner }) => one(match (group_deleted, new_owner) {
            (true, _) => format!("left {group}; it had no members left and was deleted"),
            (false, Some(o)) => format!("left {group}; {o} owns it now"),
            (false, None) => format!("left {group}"),
        }),
        (C::AcceptRequest { group, user }, _) => one(format!("{user} is now a member of {group}")),
        (C::RejectRequest { group, user }, _) => one(format!("request of {user} to join {group} rejected")),
        (C::ListRequests { group }, Reply::Requests(users)) if users.is_empty() => {
            one(format!("no pending requests for {group}"))
        }
        (C::ListRequests { .. }, Reply::Requests(users)) => users.iter().map(|u| u.to_string()).collect(),
        (C::ListGroups, Reply::Groups(gs)) if gs.is_empty() => one("no groups".into()),
        (C::ListGroups, Reply::Groups(gs)) => {
            gs.iter().map(|g| format!("{} owner={} members={}", g.group, g.owner, g.members)).collect()
        }
        (C::ListMyGroups, Reply::MyGroups(gs)) if gs.is_empty() => one("you belong to no group".into()),
        (C::ListMyGroups, Reply::MyGroups(gs)) => {
            gs.iter().map(|g| if g.owner { format!("{} (owner)", g.group) } else { g.group.to_string() }).collect()
        }
        (C::ListFiles { group }, Reply::Files(fs)) if fs.is_empty() => one(format!("no files in {group}")),
        (C::ListFiles { .. }, Reply::Files(fs)) => fs
            .iter()
            .map(|f| {
                let peers = if f.live_sharers == 1 { "peer" } else { "peers" };
                format!("{} {} bytes {} {peers}", f.name, f.size, f.live_sharers)
            })
            .collect(),
        (C::UploadFile { group, .. }, _) => one(format!("shared in {group}")),
        (C::StopShare { group, name }, _) => one(format!("stopped sharing {name} in {group}")),
        (C::Logout, _) => one("logged out".into()),
        (C::Exit, _) => one("bye".into()),
        (_, _) => one("ok".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse("  login alice s3cret ").unwrap(),
            ShellCommand::Login { user: UserId::new("alice").unwrap(), password: "s3cret".into() }
        );
        assert_eq!(
            parse(r#"upload_file "/tmp/my \"big\" file" g1"#).unwrap(),
            ShellCommand::UploadFile { path: r#"/tmp/my "big" file"#.into(), group: GroupId::new("g1").unwrap() }
        );
        for (name, args, _) in COMMANDS {
            // Required arguments as "x", optional ones as spelled.
            let words: Vec<&str> = args
                .split_whitespace()
                .map(|a| a.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or("x"))
                .collect();
            let line = format!("{name} {}", words.join(" "));
            assert!(parse(&line).is_ok(), "{line}");
        }
        assert_eq!(parse("show_downloads").unwrap(), ShellCommand::ShowDownloads { verbose: false });
        assert_eq!(parse("show_downloads -v").unwrap(), ShellCommand::ShowDownloads { verbose: true });
        assert_eq!(parse("show_downloads x"), Err(ParseError::Usage("show_downloads [-v]".into())));
        assert_eq!(parse("show_uploads").unwrap(), ShellCommand::ShowUploads);
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        assert_eq!(parse("login alice"), Err(ParseError::Usage("login <user_id> <passwd>".into())));
        assert_eq!(parse("list_groups extra"), Err(ParseError::Usage("list_groups".into())));
        assert_eq!(parse("frobnicate"), Err(ParseError::Unknown("frobnicate".into())));
        assert!(matches!(parse("create_group a/b"), Err(ParseError::BadName { .. })));
        assert!(matches!(parse("stop_share g ../etc"), Err(ParseError::BadName { .. })));
        assert_eq!(parse("login \"alice"), Err(ParseError::UnterminatedQuote));
        assert_eq!(parse("   "), Err(ParseError::Empty));
        assert_eq!(parse(&"x".repeat(MAX_LINE_LEN + 1)), Err(ParseError::LineTooLong));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(line in ".{0,200}") {
            let _ = parse(&line);
        }
    }
}
