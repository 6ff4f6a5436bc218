//! A long path on loopback, for the benchmarks: a TCP relay that holds every
//! byte for a one-way delay in each direction, and lets at most a window of
//! bytes be unacknowledged per direction, as a TCP sender's buffer does
//! (Linux's `tcp_wmem` maximum is 4 MiB by default). A bulk flow through it
//! therefore runs at most at window / round trip, as over a real path of
//! that round trip; a request-response protocol waits a round trip for each
//! answer it did not ask for ahead of time.
//!
//! No root, no `netem`: this machine's kernel has no `sch_netem`. What it
//! does not model is loss, and the congestion window's growth after it.
//!
//! The relay can also connect onward from a chosen loopback address
//! (`from_ip`): a client's tracker connection through it is seen as coming
//! from that address, the way a host behind NAT is seen, so the tracker lists
//! that client's peer port at that address, where a delaying relay listens.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The path a relay emulates.
#[derive(Clone, Copy, Debug)]
pub struct PathSpec {
    /// Round trip: half of it each way.
    pub rtt: Duration,
    /// Bytes unacknowledged per direction, at most.
    pub window: usize,
}

impl PathSpec {
    /// No delay, no window to speak of: a plain forwarder.
    pub fn direct() -> PathSpec {
        PathSpec { rtt: Duration::ZERO, window: 64 << 20 }
    }
}

/// A running relay: connections to `addr` reach `target` over the path.
pub struct Relay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` and relays each connection to `target`,
    /// connecting from `from_ip` if given.
    pub fn start(listen: SocketAddr, target: SocketAddr, from_ip: Option<IpAddr>, path: PathSpec) -> io::Result<Relay> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (stop2, open2) = (stop.clone(), open.clone());
        let accept = std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(near) = s else { continue };
                let Ok(far) = connect(target, from_ip) else { continue };
                let _ = near.set_nodelay(true);
                let _ = far.set_nodelay(true);
                if let (Ok(a), Ok(b)) = (near.try_clone(), far.try_clone()) {
                    if let Ok(mut o) = open2.lock() {
                        o.push(a);
                        o.push(b);
                    }
                }
                let (Ok(near2), Ok(far2)) = (near.try_clone(), far.try_clone()) else { continue };
                pipe(near, far, path);
                pipe(far2, near2, path);
            }
        });
        Ok(Relay { addr, stop, open, accept: Some(accept) })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(open) = self.open.lock() {
            for s in open.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A blocking connect to `target` from `from_ip` (any port).
fn connect(target: SocketAddr, from_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = from_ip else { return TcpStream::connect(target) };
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if target.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&fd, &SocketAddr::new(ip, 0))?;
    rustix::net::connect(&fd, &target)?;
    Ok(TcpStream::from(fd))
}

/// One direction of a relayed connection, and what its two threads share.
#[derive(Default)]
struct Flight {
    /// Bytes read and not yet delivered, each with when it is due.
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes delivered, each with when its acknowledgement is back.
    acks: VecDeque<(Instant, usize)>,
    /// Bytes read and not yet acknowledged.
    in_flight: usize,
    /// The reading side ended (`eof`) or the writing side failed (`dead`).
    eof: bool,
    dead: bool,
}

impl Flight {
    fn release_acks(&mut self, now: Instant) {
        while let Some(&(at, n)) = self.acks.front() {
            if at > now {
                break;
            }
            self.acks.pop_front();
            self.in_flight -= n;
        }
    }
}

/// Starts the two threads that carry `from`'s bytes to `to` over `path`.
fn pipe(mut from: TcpStream, mut to: TcpStream, path: PathSpec) {
    let one_way = path.rtt / 2;
    let shared = Arc::new((Mutex::new(Flight::default()), Condvar::new()));
    let reader = shared.clone();
    // The writer closes the reading side when delivery fails.
    let from_again = from.try_clone();
    std::thread::spawn(move || {
        let (lock, cv) = &*reader;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut f) = lock.lock() else { return };
            // Wait for the window to open: acknowledgements come back one
            // way after their bytes were delivered.
            loop {
                let now = Instant::now();
                f.release_acks(now);
                if f.dead || f.in_flight < path.window {
                    break;
                }
                let wait = f.acks.front().map_or(Duration::from_millis(10), |&(at, _)| at - now);
                let Ok((g, _)) = cv.wait_timeout(f, wait) else { return };
                f = g;
            }
            if f.dead {
                return;
            }
            let room = (path.window - f.in_flight).min(buf.len());
            drop(f);
            let n = match from.read(&mut buf[..room]) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let Ok(mut f) = lock.lock() else { return };
            if n == 0 {
                f.eof = true;
                cv.notify_all();
                return;
            }
            f.queue.push_back((Instant::now() + one_way, buf[..n].to_vec()));
            f.in_flight += n;
            cv.notify_all();
        }
    });
    std::thread::spawn(move || {
        let (lock, cv) = &*shared;
        loop {
            let item = {
                let Ok(mut f) = lock.lock() else { return };
                while f.queue.is_empty() && !f.eof {
                    let Ok(g) = cv.wait(f) else { return };
                    f = g;
                }
                f.queue.pop_front()
            };
            let Some((due, data)) = item else { break };
            let now = Instant::now();
            if due > now {
                // The delay being emulated, not a synchronisation.
                std::thread::sleep(due - now);
            }
            let ok = to.write_all(&data).is_ok();
            let Ok(mut f) = lock.lock() else { return };
            if !ok {
                f.dead = true;
                cv.notify_all();
                if let Ok(s) = &from_again {
                    let _ = s.shutdown(Shutdown::Both);
                }
                return;
            }
            f.acks.push_back((Instant::now() + one_way, data.len()));
            cv.notify_all();
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind a relay: bytes come back whole and in order,
    /// each round trip at least the relay's (twice: there and back).
    #[test]
    fn a_relay_delays_both_ways_and_loses_nothing() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let path = PathSpec { rtt: Duration::from_millis(20), window: 8192 };
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), target, None, path).unwrap();
        let mut c = TcpStream::connect(relay.addr).unwrap();
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        let mut writer = c.try_clone().unwrap();
        let data = sent.clone();
        let w = std::thread::spawn(move || {
            writer.write_all(&data).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        w.join().unwrap();
        echo.join().unwrap();
        assert_eq!(got, sent);
        // 100,000 bytes through an 8 KiB window: at least 12 windows, each
        // held a round trip on the way there (and the echo's on the way back).
        assert!(t.elapsed() >= Duration::from_millis(20 * 12), "{:?}", t.elapsed());
    }
}
