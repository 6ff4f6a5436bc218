use super::*;
use crate::chunk::{FileDigest, FileMeta, FileRecord, Sha1Digest, CHUNK_SIZE};
use proptest::prelude::*;

fn u(s: &str) -> UserId {
    UserId::new(s).unwrap()
}
fn g(s: &str) -> GroupId {
    GroupId::new(s).unwrap()
}
fn tok(n: u8) -> SessionToken {
    SessionToken([n; 16])
}
fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000 + n as u16))
}
fn file(name: &str, fill: u8, size: u64) -> FileRecord {
    let chunks = crate::chunk::chunk_count(size);
    FileMeta {
        name: FileName::new(name).unwrap(),
        digest: FileDigest {
            size,
            sha1: Sha1Digest([fill; 20]),
            chunks: vec![Sha1Digest([fill; 20]); chunks as usize],
        },
    }
    .record()
}
fn run(s: &mut MetaState, cmd: Command) -> Result<Reply, ApiError> {
    s.apply(&Entry { id: None, settled_below: 0, cmd })
}
fn hash() -> PasswordHash {
    PasswordHash::derive("pw", [7; 16], PasswordParams::INSECURE_FAST)
}

/// alice (token 1, owner of g1) and bob (token 2), both logged in.
fn two_users() -> MetaState {
    let mut s = MetaState::new();
    for (n, name) in [(1, "alice"), (2, "bob")] {
        run(&mut s, Command::CreateUser { user: u(name), password: hash() }).unwrap();
        run(&mut s, Command::OpenSession { user: u(name), token: tok(n), listen: addr(n) }).unwrap();
    }
    run(&mut s, Command::CreateGroup { token: tok(1), group: g("g1") }).unwrap();
    s
}

#[test]
fn passwords_verify_and_are_not_stored_in_the_clear() {
    let h = PasswordHash::derive("secret", [1; 16], PasswordParams::INSECURE_FAST);
    assert!(h.verify("secret"));
    assert!(!h.verify("secreT"));
    let bytes = postcard::to_allocvec(&h).unwrap();
    assert!(!bytes.windows(6).any(|w| w == b"secret"));
    assert_ne!(h, PasswordHash::derive("secret", [2; 16], PasswordParams::INSECURE_FAST), "salted");
}

#[test]
fn accounts_are_never_overwritten() {
    let mut s = two_users();
    assert_eq!(run(&mut s, Command::CreateUser { user: u("alice"), password: hash() }), Err(ApiError::UserExists));
}

#[test]
fn join_accept_reject_follow_the_rules() {
    let mut s = two_users();
    let join = |t| Command::JoinGroup { token: tok(t), group: g("g1") };
    assert_eq!(run(&mut s, join(1)), Err(ApiError::AlreadyMember));
    run(&mut s, join(2)).unwrap();
    assert_eq!(run(&mut s, join(2)), Err(ApiError::AlreadyRequested));
    assert_eq!(s.list_requests(&u("bob"), &g("g1")), Err(ApiError::NotOwner));
    assert_eq!(s.list_requests(&u("alice"), &g("g1")), Ok(vec![u("bob")]));
    assert_eq!(
        run(&mut s, Command::AcceptRequest { token: tok(2), group: g("g1"), user: u("bob") }),
        Err(ApiError::NotOwner)
    );
    run(&mut s, Command::AcceptRequest { token: tok(1), group: g("g1"), user: u("bob") }).unwrap();
    assert_eq!(
        run(&mut s, Command::RejectRequest { token: tok(1), group: g("g1"), user: u("bob") }),
        Err(ApiError::NoSuchRequest)
    );
    assert_eq!(s.list_my_groups(&u("bob")), vec![MyGroup { group: g("g1"), owner: false }]);
    assert_eq!(s.list_groups()[0].members, 2);
}

#[test]
fn owner_leaving_passes_ownership_and_last_member_deletes_group() {
    let mut s = two_users();
    run(&mut s, Command::JoinGroup { token: tok(2), group: g("g1") }).unwrap();
    run(&mut s, Command::AcceptRequest { token: tok(1), group: g("g1"), user: u("bob") }).unwrap();
    run(&mut s, Command::AddFile { token: tok(1), group: g("g1"), file: file("a.bin", 1, 10) }).unwrap();
    let left = run(&mut s, Command::LeaveGroup { token: tok(1), group: g("g1") }).unwrap();
    assert_eq!(left, Reply::Left { group_deleted: false, new_owner: Some(u("bob")) });
    assert_eq!(s.group(&g("g1")).unwrap().owner, u("bob"));
    assert!(s.group(&g("g1")).unwrap().files.is_empty(), "alice's only sharer entry went with her");
    let left = run(&mut s, Command::LeaveGroup { token: tok(2), group: g("g1") }).unwrap();
    assert_eq!(left, Reply::Left { group_deleted: true, new_owner: None });
    assert!(s.group(&g("g1")).is_none());
}

#[test]
fn files_dedupe_by_content_and_vanish_with_their_last_sharer() {
    let mut s = two_users();
    run(&mut s, Command::JoinGroup { token: tok(2), group: g("g1") }).unwrap();
    assert_eq!(
        run(&mut s, Command::AddFile { token: tok(2), group: g("g1"), file: file("a", 1, 5) }),
        Err(ApiError::NotMember)
    );
    run(&mut s, Command::AcceptRequest { token: tok(1), group: g("g1"), user: u("bob") }).unwrap();
    run(&mut s, Command::AddFile { token: tok(1), group: g("g1"), file: file("a", 1, CHUNK_SIZE + 1) }).unwrap();
    run(&mut s, Command::AddFile { token: tok(2), group: g("g1"), file: file("a", 1, CHUNK_SIZE + 1) }).unwrap();
    assert_eq!(
        run(&mut s, Command::AddFile { token: tok(2), group: g("g1"), file: file("a", 2, CHUNK_SIZE + 1) }),
        Err(ApiError::FileNameTaken)
    );
    let files = s.list_files(&u("alice"), &g("g1"), |_| true).unwrap();
    assert_eq!(files[0].live_sharers, 2);
    run(&mut s, Command::StopShare { token: tok(1), group: g("g1"), name: FileName::new("a").unwrap() }).unwrap();
    assert_eq!(
        run(&mut s, Command::StopShare { token: tok(1), group: g("g1"), name: FileName::new("a").unwrap() }),
        Err(ApiError::NotSharing)
    );
    run(&mut s, Command::StopShare { token: tok(2), group: g("g1"), name: FileName::new("a").unwrap() }).unwrap();
    assert!(s.list_files(&u("alice"), &g("g1"), |_| true).unwrap().is_empty());
}

#[test]
fn a_bad_digest_is_refused() {
    let mut s = two_users();
    let mut file = file("a", 1, 3 * CHUNK_SIZE);
    file.index.ranges.push(Sha1Digest([0; 20]));
    assert!(matches!(
        run(&mut s, Command::AddFile { token: tok(1), group: g("g1"), file }),
        Err(ApiError::InvalidFile(_))
    ));
}

#[test]
fn a_new_login_at_the_same_address_replaces_the_old_session() {
    let mut s = two_users();
    run(&mut s, Command::OpenSession { user: u("bob"), token: tok(9), listen: addr(1) }).unwrap();
    assert_eq!(s.user_of(&tok(1)), Err(ApiError::NotLoggedIn));
    assert_eq!(s.session_at(&addr(1)).unwrap().1.user, u("bob"));
}

#[test]
fn a_retried_request_is_applied_once() {
    let mut s = two_users();
    let id = Some(RequestId { client: 5, seq: 1 });
    let e = Entry { id, settled_below: 0, cmd: Command::JoinGroup { token: tok(2), group: g("g1") } };
    assert_eq!(s.apply(&e), Ok(Reply::Done));
    assert_eq!(s.apply(&e), Ok(Reply::Done), "the retry sees the first answer, not AlreadyRequested");
    assert_eq!(s.group(&g("g1")).unwrap().pending, vec![u("bob")]);
}

/// A client's older write reaching the log after a newer one (a command
/// delayed by a failover, overtaken by a background re-share) is applied
/// with its own result; retries of either see their own first answer.
#[test]
fn a_clients_writes_apply_in_any_order_each_with_its_own_result() {
    let mut s = two_users();
    let at = |seq, settled_below, cmd| Entry { id: Some(RequestId { client: 5, seq }), settled_below, cmd };
    let older = at(7, 7, Command::CreateGroup { token: tok(2), group: g("later") });
    let newer = at(8, 7, Command::JoinGroup { token: tok(2), group: g("g1") });
    assert_eq!(s.apply(&newer), Ok(Reply::Done));
    assert_eq!(s.apply(&older), Ok(Reply::Done), "the older write is applied, not superseded");
    assert!(s.group(&g("later")).is_some());
    assert_eq!(s.apply(&older), Ok(Reply::Done), "its retry sees its first answer");
    assert_eq!(s.apply(&newer), Ok(Reply::Done));
    assert_eq!(s.result_of(RequestId { client: 5, seq: 7 }), Some(Ok(Reply::Done)));
    // Once the client says both are settled, their results are forgotten and
    // a late copy changes nothing.
    let next = at(9, 9, Command::LeaveGroup { token: tok(2), group: g("later") });
    assert!(s.apply(&next).is_ok());
    assert_eq!(s.result_of(RequestId { client: 5, seq: 7 }), None);
    let before = s.clone();
    assert!(matches!(s.apply(&older), Err(ApiError::Limit(_))));
    assert_eq!(s.group(&g("later")), before.group(&g("later")));
}

/// However many writes a client leaves unsettled, what is remembered for it
/// stays bounded, and a write whose result was forgotten is never re-applied.
#[test]
fn unsettled_results_per_client_are_bounded() {
    let mut s = two_users();
    let n = MAX_RESULTS_PER_CLIENT as u64 + 10;
    for seq in 0..n {
        let group = g(&format!("x{seq}"));
        let e = Entry {
            id: Some(RequestId { client: 5, seq }),
            settled_below: 0,
            cmd: Command::CreateGroup { token: tok(2), group },
        };
        assert_eq!(s.apply(&e), Ok(Reply::Done));
    }
    let w = &s.dedupe.clients[&5];
    assert_eq!(w.results.len(), MAX_RESULTS_PER_CLIENT);
    assert_eq!(w.settled_below, 10);
    let first = Entry {
        id: Some(RequestId { client: 5, seq: 0 }),
        settled_below: 0,
        cmd: Command::LeaveGroup { token: tok(2), group: g("x0") },
    };
    assert!(matches!(s.apply(&first), Err(ApiError::Limit(_))), "forgotten, so refused rather than applied again");
    assert!(s.group(&g("x0")).is_some());
}

fn command_strategy() -> impl Strategy<Value = Entry> {
    let user = prop_oneof![Just(u("alice")), Just(u("bob")), Just(u("carol"))];
    let group = prop_oneof![Just(g("g1")), Just(g("g2"))];
    let token = (0u8..4).prop_map(tok);
    let listen = (0u8..4).prop_map(addr);
    let meta = (prop_oneof![Just("a"), Just("b")], 0u8..2, 0u64..(3 * CHUNK_SIZE), any::<bool>()).prop_map(
        |(n, fill, size, corrupt)| {
            let mut m = file(n, fill, size);
            if corrupt {
                m.index.ranges.push(Sha1Digest([0; 20]));
            }
            m
        },
    );
    let cmd = prop_oneof![
        user.clone().prop_map(|user| Command::CreateUser { user, password: hash() }),
        (user.clone(), token.clone(), listen).prop_map(|(user, token, listen)| Command::OpenSession {
            user,
            token,
            listen
        }),
        token.clone().prop_map(|token| Command::CloseSession { token }),
        (token.clone(), group.clone()).prop_map(|(token, group)| Command::CreateGroup { token, group }),
        (token.clone(), group.clone()).prop_map(|(token, group)| Command::JoinGroup { token, group }),
        (token.clone(), group.clone()).prop_map(|(token, group)| Command::LeaveGroup { token, group }),
        (token.clone(), group.clone(), user.clone()).prop_map(|(token, group, user)| Command::AcceptRequest {
            token,
            group,
            user
        }),
        (token.clone(), group.clone(), user).prop_map(|(token, group, user)| Command::RejectRequest {
            token,
            group,
            user
        }),
        (token.clone(), group.clone(), meta).prop_map(|(token, group, file)| Command::AddFile { token, group, file }),
        (token, group, prop_oneof![Just("a"), Just("b")]).prop_map(|(token, group, n)| Command::StopShare {
            token,
            group,
            name: FileName::new(n).unwrap()
        }),
    ];
    (proptest::option::of((0u64..3, 0u64..6, 0u64..4)), cmd).prop_map(|(id, cmd)| Entry {
        id: id.map(|(client, seq, _)| RequestId { client, seq }),
        settled_below: id.map_or(0, |(_, seq, back)| seq.saturating_sub(back)),
        cmd,
    })
}

fn check_invariants(s: &MetaState) {
    for (_, grp) in s.groups() {
        assert!(!grp.members.is_empty(), "an empty group must be deleted");
        assert!(grp.is_member(&grp.owner), "the owner is a member");
        let mut m = grp.members.clone();
        m.sort();
        m.dedup();
        assert_eq!(m.len(), grp.members.len(), "members are unique");
        assert!(grp.pending.iter().all(|p| !grp.is_member(p)), "no member is pending");
        for f in grp.files.values() {
            assert!(!f.sharers.is_empty(), "a file nobody shares is gone");
            assert!(f.sharers.iter().all(|sh| grp.is_member(&sh.user)), "only members share");
            f.meta.index.validate().unwrap();
        }
    }
}

proptest! {
    #[test]
    fn apply_never_panics_keeps_invariants_and_is_deterministic(entries in proptest::collection::vec(command_strategy(), 0..80)) {
        let mut a = MetaState::new();
        let mut b = MetaState::new();
        for e in &entries {
            let ra = a.apply(e);
            let rb = b.apply(e);
            prop_assert_eq!(ra, rb);
            check_invariants(&a);
        }
        prop_assert_eq!(a, b);
    }
}

#[test]
fn a_group_holds_a_bounded_number_of_files() {
    let mut s = two_users();
    for i in 0..MAX_FILES_PER_GROUP {
        let meta = file(&format!("f{i}"), 1, 1);
        run(&mut s, Command::AddFile { token: tok(1), group: g("g1"), file: meta }).unwrap();
    }
    let r = run(&mut s, Command::AddFile { token: tok(1), group: g("g1"), file: file("one-more", 1, 1) });
    assert!(matches!(r, Err(ApiError::Limit(_))), "{r:?}");
    // The same content under a taken name still adds a sharer.
    run(&mut s, Command::AddFile { token: tok(1), group: g("g1"), file: file("f0", 1, 1) }).unwrap();
}

#[test]
fn password_hashes_with_reused_memory_match_argon2s_own() {
    // Hashes are stored and replicated: reusing argon2's working memory must
    // not change a single one, whatever size the previous hash used.
    let fresh = |password: &str, salt: &[u8; 16], p: PasswordParams| {
        let params = argon2::Params::new(p.m_kib, p.t_cost, 1, Some(32)).unwrap();
        let mut out = [0u8; 32];
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(password.as_bytes(), salt, &mut out)
            .unwrap();
        out
    };
    let small = PasswordParams::INSECURE_FAST;
    let large = PasswordParams { m_kib: 256, t_cost: 2 };
    for (i, p) in [small, large, small, large, small].into_iter().enumerate() {
        let salt = [i as u8; 16];
        let h = PasswordHash::derive("correct horse", salt, p);
        assert_eq!(h.hash, fresh("correct horse", &salt, p), "params {p:?}");
        assert!(h.verify("correct horse") && !h.verify("correct horsf"));
    }
}

/// Pages of groups cover every group once, in order, and say when more follow.
#[test]
fn group_pages_cover_every_group_once() {
    let mut s = two_users();
    for n in 0..22 {
        run(&mut s, Command::CreateGroup { token: tok(1), group: g(&format!("p{n}")) }).unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = s.list_groups_page(after.as_ref(), 5);
        assert!(page.len() <= 5);
        after = page.last().map(|g| g.group.clone());
        seen.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(seen.len(), 23);
    assert_eq!(seen, s.list_groups());
    assert!(!s.list_groups_page(None, 23).1, "nothing after the last");
}
