use super::*;
use crate::proto::ApiError;
use crate::wire::decode;

fn engine() -> ClientEngine {
    let trackers = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()];
    ClientEngine::new(ClientConfig::new("127.0.0.1:9".parse().unwrap(), trackers), Rng::from_u64(3))
}

fn drain(e: &mut ClientEngine) -> Vec<ClientOutput> {
    std::iter::from_fn(|| e.poll_output()).collect()
}

fn sent_requests(outs: &[ClientOutput]) -> Vec<(RequestId, Request)> {
    outs.iter()
        .filter_map(|o| match o {
            ClientOutput::Transmit(b) => match decode(&b[4..]).unwrap() {
                Message::Request { id, body, .. } => Some((id, body)),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn commands_needing_a_session_fail_locally_without_one() {
    let mut e = engine();
    e.handle_command(Ticket(1), ShellCommand::ListGroups, Millis(0));
    assert_eq!(
        drain(&mut e),
        vec![ClientOutput::Done { ticket: Ticket(1), result: Err(ShellError::Api(ApiError::NotLoggedIn)) }]
    );
}

#[test]
fn a_silent_tracker_is_failed_over_and_the_request_resent_with_its_id() {
    let mut e = engine();
    let cmd = ShellCommand::CreateUser { user: UserId::new("a").unwrap(), password: "p".into() };
    e.handle_command(Ticket(1), cmd, Millis(0));
    let first = match drain(&mut e).as_slice() {
        [ClientOutput::Connect { addr }] => *addr,
        o => panic!("{o:?}"),
    };
    e.handle_tracker_connected(Millis(10));
    let sent = sent_requests(&drain(&mut e));
    assert_eq!(sent.len(), 1);
    let deadline = e.poll_timeout().unwrap();
    e.handle_timeout(deadline);
    let outs = drain(&mut e);
    let second = outs
        .iter()
        .find_map(|o| if let ClientOutput::Connect { addr } = o { Some(*addr) } else { None })
        .expect("fails over");
    assert_ne!(first, second);
    e.handle_tracker_connected(deadline);
    let resent = sent_requests(&drain(&mut e));
    assert_eq!(resent, sent, "same request id after failover");
}

#[test]
fn an_unanswered_request_fails_after_the_give_up_time() {
    let mut e = engine();
    e.handle_command(
        Ticket(1),
        ShellCommand::CreateUser { user: UserId::new("a").unwrap(), password: "p".into() },
        Millis(0),
    );
    let mut now = Millis(0);
    let mut done = None;
    for _ in 0..1000 {
        for o in drain(&mut e) {
            match o {
                ClientOutput::Connect { .. } => e.handle_tracker_closed(now),
                ClientOutput::Done { result, .. } => done = Some(result),
                _ => {}
            }
        }
        if done.is_some() {
            break;
        }
        now = e.poll_timeout().expect("a deadline while a request waits");
        e.handle_timeout(now);
    }
    assert!(matches!(done, Some(Err(ShellError::NoTracker { .. }))));
    assert!(now <= Millis(20_000) && now >= Millis(19_000), "{now}");
}
