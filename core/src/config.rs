//! `tracker_info.txt`: the trackers of a cluster, one a line.
//!
//! Each line is `IP PORT` or `IP:PORT` (IPv6 as `[::1]:7000` or `::1 7000`),
//! optionally followed by the tracker's key id ([`KeyId`], as `tracker
//! --show-id` prints it): a tracker whose line has one must prove that key.
//! Blank lines and `#` comments are ignored. A tracker's id is the 1-based
//! number of the line that names it, so ids stay put when comments change.

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

use crate::identity::{KeyId, KeyIdError};

/// Most trackers a cluster lists.
pub const MAX_TRACKERS: usize = 64;
/// Largest tracker_info file read, in bytes.
pub const MAX_TRACKER_INFO_LEN: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerEntry {
    /// The 1-based line number.
    pub id: u32,
    pub addr: SocketAddr,
    /// The key the tracker must prove, if the line pins one.
    pub key: Option<KeyId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrackerInfoError {
    #[error("line {line}: expected 'IP PORT' or 'IP:PORT', then optionally the tracker's key id, found {found:?}")]
    BadLine { line: u32, found: String },
    #[error("line {line}: bad key id: {error}")]
    BadKey { line: u32, error: KeyIdError },
    #[error("line {line}: tracker {addr} is listed twice")]
    Duplicate { line: u32, addr: SocketAddr },
    #[error("no tracker listed")]
    Empty,
    #[error("more than {MAX_TRACKERS} trackers")]
    TooMany,
    #[error("file larger than {MAX_TRACKER_INFO_LEN} bytes")]
    TooLarge,
}

/// A line's address, and its key id text if it has one.
fn parse_line(s: &str) -> Option<(SocketAddr, Option<&str>)> {
    let parts: Vec<&str> = s.split_whitespace().take(4).collect();
    let port = |p: &str| p.parse::<u16>().ok();
    let ip_port = |ip: &str, p: &str| Some(SocketAddr::new(ip.parse::<IpAddr>().ok()?, port(p)?));
    match parts[..] {
        [a] => Some((a.parse().ok()?, None)),
        [a, b] if port(b).is_some() => Some((ip_port(a, b)?, None)),
        [a, key] => Some((a.parse().ok()?, Some(key))),
        [ip, p, key] => Some((ip_port(ip, p)?, Some(key))),
        _ => None,
    }
}

pub fn parse_tracker_info(text: &str) -> Result<Vec<TrackerEntry>, TrackerInfoError> {
    if text.len() > MAX_TRACKER_INFO_LEN {
        return Err(TrackerInfoError::TooLarge);
    }
    let mut out: Vec<TrackerEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = (i + 1) as u32;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let (addr, key) = parse_line(content)
            .ok_or_else(|| TrackerInfoError::BadLine { line, found: content.chars().take(80).collect() })?;
        let key =
            key.map(|k| k.parse::<KeyId>()).transpose().map_err(|error| TrackerInfoError::BadKey { line, error })?;
        if out.iter().any(|t| t.addr == addr) {
            return Err(TrackerInfoError::Duplicate { line, addr });
        }
        if out.len() == MAX_TRACKERS {
            return Err(TrackerInfoError::TooMany);
        }
        out.push(TrackerEntry { id: line, addr, key });
    }
    if out.is_empty() {
        return Err(TrackerInfoError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_comments_and_blank_lines() {
        let t = parse_tracker_info("# cluster\n127.0.0.1 7001\n\n127.0.0.1:7002  # second\n::1 7003\n[::1]:7004\n")
            .unwrap();
        let ids: Vec<u32> = t.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![2, 4, 5, 6]);
        assert_eq!(t[1].addr, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(t[2].addr, "[::1]:7003".parse().unwrap());
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let e = parse_tracker_info("127.0.0.1 7001\nlocalhost 7002\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: expected 'IP PORT' or 'IP:PORT', then optionally the tracker's key id, found \"localhost 7002\""
        );
        assert!(matches!(parse_tracker_info("1.2.3.4 99999"), Err(TrackerInfoError::BadLine { line: 1, .. })));
        assert!(matches!(parse_tracker_info("1.2.3.4 1 2"), Err(TrackerInfoError::BadKey { line: 1, .. })));
        assert!(matches!(parse_tracker_info("1.2.3.4 1 2 3"), Err(TrackerInfoError::BadLine { .. })));
        assert_eq!(parse_tracker_info("# nothing\n"), Err(TrackerInfoError::Empty));
        assert!(matches!(parse_tracker_info("1.2.3.4:1\n1.2.3.4 1"), Err(TrackerInfoError::Duplicate { line: 2, .. })));
    }

    #[test]
    fn a_line_may_pin_its_trackers_key() {
        let id = KeyId::of_public_key(b"tracker two");
        let text = format!("127.0.0.1 7001\n127.0.0.1 7002 {id}\n[::1]:7003 {}\n", id.to_string().to_lowercase());
        let t = parse_tracker_info(&text).unwrap();
        assert_eq!(t.iter().map(|t| t.key).collect::<Vec<_>>(), vec![None, Some(id), Some(id)]);
        assert_eq!(t[2].addr, "[::1]:7003".parse().unwrap());
        let e = parse_tracker_info("127.0.0.1 7001 NOTAKEY").unwrap_err();
        assert_eq!(e.to_string(), "line 1: bad key id: a key id has 52 letters (A-Z, 2-7; dashes ignored), found 7");
    }
}
