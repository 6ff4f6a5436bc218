//! The messages of shoal's wire protocol (encoded by [`crate::wire`]).
//!
//! Every connection opens with [`Message::Hello`] from the side that connected.
//! A client then sends [`Message::Request`]s, each answered by one
//! [`Message::Response`] with the same [`RequestId`], in any order.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::chunk::{FileIndex, FileRecord, Sha1Digest};
use crate::client::peer::Grant;
use crate::identity::KeyId;
use crate::ids::{FileName, GroupId, SessionToken, UserId};

/// Bumped on any incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 7;

/// Longest password accepted, in bytes: hashing is slow, so its input is bounded.
pub const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Client,
    Tracker,
    Peer,
}

/// Identifies a request for its whole life, across retries and tracker failover:
/// a tracker applies a write with a given id at most once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// Chosen at random by each client process.
    pub client: u64,
    /// Increases by one with each request of that client.
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello {
        protocol_version: u32,
        role: Role,
    },
    /// The receiver will not talk to the sender (wrong version or role); it hangs up next.
    Refused {
        reason: String,
    },
    Request {
        id: RequestId,
        /// Every earlier request of this client below this sequence number
        /// has its answer (or was given up): trackers may forget their results.
        settled_below: u64,
        session: Option<SessionToken>,
        body: Request,
    },
    Response {
        id: RequestId,
        result: Result<Reply, ApiError>,
    },
    /// Between trackers, after `Hello { role: Tracker }`.
    Tracker(TrackerFrame),
}

/// What trackers say to each other. Each tracker opens one connection to
/// every other and sends on it; the other side only answers its `Ping`s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrackerFrame {
    /// The first frame after `Hello`: which tracker (line of `tracker_info.txt`) this is.
    Join {
        node: u64,
    },
    /// A consensus message, in the replicator's own encoding.
    Consensus(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Soft state learned since the last one (all of it on a new link).
    Soft(SoftState),
    /// A link's heartbeat; answered with `Pong` on the same connection (the
    /// one frame that travels back on a link).
    Ping,
    Pong,
    /// Chunk-list range bytes (20-byte hashes one after the other), named by
    /// their SHA1: pushed to every tracker by the one a client gave them to,
    /// or sent to a tracker that asked for them (`RangeWanted`). Answered,
    /// once durable, with `RangeStored` on the receiver's own link.
    Range(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The sender holds this range durably.
    RangeStored(Sha1Digest),
    /// The sender lacks this range (it caught up without it): send it, if held.
    RangeWanted(Sha1Digest),
    /// A part of a consensus message too big for one frame (a snapshot):
    /// the parts of one `xfer`, in order, make up the message.
    ConsensusPart {
        xfer: u64,
        last: bool,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The sender received this many bytes of parts: the window moves on.
    ConsensusAck {
        xfer: u64,
        bytes: u32,
    },
    /// The sender will send a consensus message of `len` bytes (a sync with
    /// a snapshot) as the parts of `xfer`, once answered with
    /// `ConsensusResume`; its first `base_len` bytes (the snapshot's base
    /// state) hash to `base`.
    ConsensusOffer {
        xfer: u64,
        base: Sha1Digest,
        base_len: u64,
        len: u64,
    },
    /// The sender holds the first `from` bytes of the message offered as
    /// `xfer` (kept from a transfer of the same base that broke off): the
    /// parts start there.
    ConsensusResume {
        xfer: u64,
        from: u64,
    },
    /// How the sender is (its applied index, the leader it names, its
    /// clients): sent once a second, for the operator's view of the
    /// cluster ([`crate::tracker::health`]).
    Health(crate::tracker::Health),
}

/// Soft state, kept out of the log: which sessions are alive, grants issued,
/// who holds parts of a file. Times are durations left, so clocks need not agree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftState {
    pub leases: Vec<(SessionToken, u64)>,
    pub grants: Vec<SoftGrant>,
    pub partial: Vec<(GroupId, FileName, SocketAddr, UserId)>,
    /// Downloads in progress, as their clients reported them.
    pub transfers: Vec<crate::tracker::Transfer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftGrant {
    pub grant: Grant,
    pub user: UserId,
    /// The key the downloader proved to the tracker that issued it (`None`:
    /// its session serves and fetches in plaintext).
    pub key: Option<KeyId>,
    pub group: GroupId,
    pub name: FileName,
    pub ttl_ms: u64,
}

/// What a client asks a tracker. The session travels beside it in [`Message::Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    CreateUser {
        user: UserId,
        password: String,
    },
    /// The client serves chunks on `listen`'s port. The tracker names it as a
    /// sharer at the address it sees the client connect from, with that port
    /// (as BitTorrent trackers do): `listen`'s IP is not believed. The
    /// session is bound to the key this connection proved.
    /// `plaintext_peers`: the client talks to peers without TLS (an opt-in
    /// for benchmarks); downloaders cannot check its key then.
    Login {
        user: UserId,
        password: String,
        listen: SocketAddr,
        plaintext_peers: bool,
    },
    Logout,
    /// Keeps the session's lease alive (sent when the client is otherwise quiet).
    Heartbeat,
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
    /// Shares a file: its name and index. The tracker answers
    /// [`ApiError::MissingRanges`] while the trackers do not hold every range
    /// of its chunk list: the client sends those (`PutRange`) and asks again.
    UploadFile {
        group: GroupId,
        file: FileRecord,
    },
    DownloadFile {
        group: GroupId,
        name: FileName,
    },
    StopShare {
        group: GroupId,
        name: FileName,
    },
    /// One range of a chunk list (at most [`crate::chunk::RANGE_CHUNKS`]
    /// hashes), for a file about to be shared: answered once it is durable
    /// on a majority of the trackers.
    PutRange {
        hashes: Vec<Sha1Digest>,
    },
    /// Range `range` of a shared file's chunk list, for a member.
    GetRange {
        group: GroupId,
        name: FileName,
        range: u32,
    },
    /// This client verified a chunk of a file it is downloading: it can serve it.
    HaveChunk {
        group: GroupId,
        name: FileName,
        chunk: u32,
    },
    /// A peer asks whether a downloader's grant is a member's, for that file,
    /// and was issued to the key `holder` that downloader proved on the peer
    /// connection (`None`: a plaintext connection, which only a grant issued
    /// to a plaintext session passes).
    CheckGrant {
        grant: Grant,
        group: GroupId,
        name: FileName,
        holder: Option<KeyId>,
    },
    /// The groups after `after` (from the first if `None`), in order, at
    /// most [`GROUPS_PAGE`] of them: `list_groups` pages through a cluster
    /// of any size, never past the reply limit.
    ListGroupsPage {
        after: Option<GroupId>,
    },
    /// A running download's progress, sent about once a second while it
    /// runs (soft state, for the operator's view of transfers): `done`
    /// bytes of `size` verified, at `rate` bytes a second, and the bytes
    /// verified from each source peer (at most
    /// [`crate::tracker::health::MAX_PROGRESS_SOURCES`]).
    Progress {
        group: GroupId,
        name: FileName,
        size: u64,
        done: u64,
        rate: u64,
        sources: Vec<(SocketAddr, u64)>,
    },
}

/// Most groups one [`Request::ListGroupsPage`] answers (each at most about
/// 140 bytes: 700 KB, within [`crate::wire::MAX_REPLY_FRAME`]).
pub const GROUPS_PAGE: usize = 5_000;

impl Request {
    /// Writes change the replicated metadata; everything else is answered locally.
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Request::Heartbeat
                | Request::ListRequests { .. }
                | Request::ListGroups
                | Request::ListGroupsPage { .. }
                | Request::ListMyGroups
                | Request::ListFiles { .. }
                | Request::DownloadFile { .. }
                | Request::PutRange { .. }
                | Request::GetRange { .. }
                | Request::HaveChunk { .. }
                | Request::CheckGrant { .. }
                | Request::Progress { .. }
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: GroupId,
    pub owner: UserId,
    pub members: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MyGroup {
    pub group: GroupId,
    pub owner: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    pub name: FileName,
    pub size: u64,
    /// Sharers whose session is alive now.
    pub live_sharers: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Session {
        token: SessionToken,
    },
    Left {
        group_deleted: bool,
        new_owner: Option<UserId>,
    },
    Groups(Vec<GroupSummary>),
    MyGroups(Vec<MyGroup>),
    Requests(Vec<UserId>),
    Files(Vec<FileSummary>),
    /// The file's index (its chunk list is fetched range by range with
    /// `GetRange`), the live peers holding some of it, and a grant that those
    /// peers will accept (from this client's key only).
    Download {
        index: FileIndex,
        sharers: Vec<SharerAddr>,
        grant: Grant,
    },
    /// A range of a chunk list.
    Range {
        hashes: Vec<Sha1Digest>,
    },
    /// The grant is valid: it was issued to this member.
    GrantValid {
        user: UserId,
    },
    /// A page of groups; `more`: groups after the last one remain.
    GroupsPage {
        groups: Vec<GroupSummary>,
        more: bool,
    },
}

/// Where a downloader finds a peer holding a file, and the key that peer
/// proved to its tracker: a peer at `addr` proving another key is not it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SharerAddr {
    pub addr: SocketAddr,
    /// `None`: the peer serves in plaintext (`--insecure-plaintext-peers`).
    pub key: Option<KeyId>,
}

/// Why a request failed. The `Display` texts are what the user reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Error)]
pub enum ApiError {
    #[error("not logged in")]
    NotLoggedIn,
    #[error("user already exists")]
    UserExists,
    #[error("wrong user id or password")]
    BadCredentials,
    #[error("group already exists")]
    GroupExists,
    #[error("no such group")]
    NoSuchGroup,
    #[error("already a member of this group")]
    AlreadyMember,
    #[error("a join request for this group is already pending")]
    AlreadyRequested,
    #[error("not a member of this group")]
    NotMember,
    #[error("only the group's owner may do that")]
    NotOwner,
    #[error("no pending request from that user")]
    NoSuchRequest,
    #[error("a different file with that name is already shared in this group")]
    FileNameTaken,
    #[error("no such file in this group")]
    NoSuchFile,
    #[error("this client does not share that file")]
    NotSharing,
    #[error("invalid file description: {0}")]
    InvalidFile(String),
    #[error("limit reached: {0}")]
    Limit(String),
    #[error("password too long (at most {MAX_PASSWORD_LEN} bytes)")]
    PasswordTooLong,
    #[error("no tracker quorum")]
    NoQuorum,
    #[error("invalid or expired download grant")]
    BadGrant,
    #[error("too many failed logins; try again in {retry_after_secs} s")]
    TooManyAttempts { retry_after_secs: u64 },
    #[error("tracker is catching up with the others")]
    CatchingUp,
    #[error(
        "another user's client is logged in at this address (seen from your connection, with the port you listen on)"
    )]
    AddressInUse,
    #[error("bad listen address: {0}")]
    BadAddress(String),
    #[error("this connection proved no key (TLS is required)")]
    Unsecured,
    /// The trackers do not hold these ranges of the file's chunk list yet
    /// (by index): send them with `PutRange`, then share again.
    #[error("the trackers lack {} range(s) of this file's chunk list", ranges.len())]
    MissingRanges { ranges: Vec<u32> },
    #[error("this tracker cannot find that part of the file's chunk list yet; try again")]
    RangeUnavailable,
}

impl ApiError {
    /// A short name for the kind of error (a metric's label).
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotLoggedIn => "not_logged_in",
            ApiError::UserExists => "user_exists",
            ApiError::BadCredentials => "bad_credentials",
            ApiError::GroupExists => "group_exists",
            ApiError::NoSuchGroup => "no_such_group",
            ApiError::AlreadyMember => "already_member",
            ApiError::AlreadyRequested => "already_requested",
            ApiError::NotMember => "not_member",
            ApiError::NotOwner => "not_owner",
            ApiError::NoSuchRequest => "no_such_request",
            ApiError::FileNameTaken => "file_name_taken",
            ApiError::NoSuchFile => "no_such_file",
            ApiError::NotSharing => "not_sharing",
            ApiError::InvalidFile(_) => "invalid_file",
            ApiError::Limit(_) => "limit",
            ApiError::PasswordTooLong => "password_too_long",
            ApiError::NoQuorum => "no_quorum",
            ApiError::BadGrant => "bad_grant",
            ApiError::TooManyAttempts { .. } => "too_many_attempts",
            ApiError::CatchingUp => "catching_up",
            ApiError::AddressInUse => "address_in_use",
            ApiError::BadAddress(_) => "bad_address",
            ApiError::Unsecured => "unsecured",
            ApiError::MissingRanges { .. } => "missing_ranges",
            ApiError::RangeUnavailable => "range_unavailable",
        }
    }
}
