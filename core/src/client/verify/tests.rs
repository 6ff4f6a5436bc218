use super::*;
use crate::chunk::{FileHasher, CHUNK_SIZE};
use crate::rng::Rng;
use proptest::prelude::*;

fn file_of(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::from_u64(seed).fill(&mut v);
    v
}

fn digest_of(data: &[u8]) -> FileDigest {
    let mut h = FileHasher::new();
    h.update(data).unwrap();
    h.finish().unwrap()
}

fn chunk_of(data: &[u8], c: u32) -> Vec<u8> {
    let at = c as usize * CHUNK_SIZE as usize;
    data[at..(at + CHUNK_SIZE as usize).min(data.len())].to_vec()
}

/// The driver side: a part file in memory, operations completed in a
/// random order, hash jobs run (or, for a test of that, not).
struct Disk {
    part: Vec<u8>,
    ops: Vec<VerifyOp>,
    good: Vec<u32>,
    bad: Vec<u32>,
    rechecked: bool,
    complete: bool,
    failed: Option<String>,
    max_ops: usize,
    writes: Vec<u32>,
    chain: HashChain,
}

impl Disk {
    fn new(size: usize) -> Disk {
        Disk {
            part: vec![0; size],
            ops: Vec::new(),
            good: Vec::new(),
            bad: Vec::new(),
            rechecked: false,
            complete: false,
            failed: None,
            max_ops: 0,
            writes: Vec::new(),
            chain: HashChain::default(),
        }
    }

    fn collect(&mut self, v: &mut Verifier) {
        while let Some(ev) = v.poll() {
            match ev {
                // Run in the order handed out (the chain), returned whenever.
                VerifyEvent::Op(VerifyOp::Hash(mut job)) => {
                    job.run(&mut self.chain);
                    self.ops.push(VerifyOp::Hash(job))
                }
                VerifyEvent::Op(op) => {
                    if let VerifyOp::Write { chunk, .. } = &op {
                        self.writes.push(*chunk);
                    }
                    self.ops.push(op)
                }
                VerifyEvent::Good(c) => self.good.push(c),
                VerifyEvent::Bad(c) => self.bad.push(c),
                VerifyEvent::Buffer(_) => {}
                VerifyEvent::Rechecked => self.rechecked = true,
                VerifyEvent::Complete => self.complete = true,
                VerifyEvent::Failed(e) => self.failed = Some(e),
            }
        }
        self.max_ops = self.max_ops.max(v.ops_out());
    }

    /// Completes one queued operation, chosen by `rng`.
    fn step(&mut self, v: &mut Verifier, d: &FileDigest, rng: &mut Rng) -> bool {
        if self.ops.is_empty() {
            return false;
        }
        let i = rng.below(self.ops.len() as u64) as usize;
        match self.ops.swap_remove(i) {
            VerifyOp::Hash(job) => v.handle_hashed(job, d),
            VerifyOp::Read { chunk, mut buf } => {
                let at = chunk as usize * CHUNK_SIZE as usize;
                let len = buf.len();
                buf.copy_from_slice(&self.part[at..at + len]);
                v.handle_read(chunk, buf, Ok(()), d);
            }
            VerifyOp::Write { chunk, data } => {
                let at = chunk as usize * CHUNK_SIZE as usize;
                self.part[at..at + data.len()].copy_from_slice(&data);
                v.handle_written(chunk, data, Ok(()), d);
            }
        }
        self.collect(v);
        true
    }

    fn settle(&mut self, v: &mut Verifier, d: &FileDigest, rng: &mut Rng) {
        while self.step(v, d, rng) {}
    }
}

fn damaged(mut b: Vec<u8>) -> Vec<u8> {
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever the arrival order, the chunks resumed from an earlier run,
    /// the damaged copies, the order the driver's results come back in and
    /// the chunks it may hold: every good chunk is written once and reported
    /// good once it is, every damaged copy is refused and never written, the
    /// whole file completes with the right content, the disk queue stays
    /// within its bound and the chunks held within theirs.
    #[test]
    fn any_arrival_and_completion_order_completes_the_file(
        n in 1u32..40,
        tail in 1usize..=CHUNK_SIZE as usize,
        seed in any::<u64>(),
        flags in proptest::collection::vec(0u8..8, 40),
        held in prop_oneof![Just(MAX_HELD_CHUNKS), 1usize..8],
    ) {
        let len = (n as usize - 1) * CHUNK_SIZE as usize + tail;
        let data = file_of(len, seed);
        let d = digest_of(&data);
        let mut rng = Rng::from_u64(seed);
        let mut disk = Disk::new(len);
        let resumed: Vec<u32> = (0..n).filter(|&c| flags[c as usize] == 0).collect();
        let mut claimed = Bitmap::new(n);
        for &c in &resumed {
            claimed.set(c);
            let at = c as usize * CHUNK_SIZE as usize;
            let chunk = chunk_of(&data, c);
            disk.part[at..at + chunk.len()].copy_from_slice(&chunk);
        }
        // A claim whose bytes never reached the disk: fetched again.
        let lost: Vec<u32> = (0..n).filter(|&c| flags[c as usize] == 2).collect();
        for &c in &lost {
            claimed.set(c);
        }
        let mut v = Verifier::new(&d, &claimed).with_max_held(held);
        disk.collect(&mut v);
        disk.settle(&mut v, &d, &mut rng);
        prop_assert!(disk.rechecked);
        let mut expect_stored = Bitmap::new(n);
        resumed.iter().for_each(|&c| expect_stored.set(c));
        prop_assert_eq!(v.stored(), &expect_stored, "only claims whose bytes match count");
        let mut order: Vec<u32> = (0..n).filter(|c| !resumed.contains(c)).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let corrupt: Vec<u32> = (0..n).filter(|&c| flags[c as usize] == 1).collect();
        for &c in &order {
            if corrupt.contains(&c) {
                v.submit(c, damaged(chunk_of(&data, c)), &d);
                disk.collect(&mut v);
                // Some results come back before the next chunk arrives.
                for _ in 0..rng.below(3) {
                    disk.step(&mut v, &d, &mut rng);
                }
                // The good copy is asked for once the damaged one is
                // refused (other results may still be out).
                let refused = |disk: &Disk| disk.bad.iter().filter(|&&b| b == c).count();
                let before = refused(&disk);
                while refused(&disk) == before && disk.step(&mut v, &d, &mut rng) {}
            }
            v.submit(c, chunk_of(&data, c), &d);
            disk.collect(&mut v);
            for _ in 0..rng.below(3) {
                disk.step(&mut v, &d, &mut rng);
            }
        }
        disk.settle(&mut v, &d, &mut rng);
        prop_assert_eq!(disk.failed.clone(), None);
        prop_assert!(disk.complete, "the file completes");
        prop_assert_eq!(&disk.part, &data);
        let mut good = disk.good.clone();
        good.sort();
        prop_assert_eq!(good, order.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>());
        let mut bad = disk.bad.clone();
        bad.sort();
        let corrupt_fetched: Vec<u32> = corrupt.iter().copied().filter(|c| order.contains(c)).collect();
        prop_assert_eq!(bad, corrupt_fetched);
        let mut writes = disk.writes.clone();
        writes.sort();
        writes.dedup();
        prop_assert_eq!(writes.len(), disk.writes.len(), "a chunk is written once");
        prop_assert!(disk.max_ops <= crate::client::disk::MAX_DISK_OPS);
        prop_assert!(v.stats().max_held as usize <= held, "held {} of at most {held}", v.stats().max_held);
    }
}

#[test]
fn a_damaged_chunk_at_the_cursor_leaves_the_whole_file_hash_intact() {
    // Chunk 0 arrives damaged: its check runs with the whole-file fold over
    // the same bytes, which must be thrown away.
    let data = file_of(3 * CHUNK_SIZE as usize + 1000, 1);
    let d = digest_of(&data);
    let mut rng = Rng::from_u64(1);
    let mut disk = Disk::new(data.len());
    let mut v = Verifier::new(&d, &Bitmap::new(4));
    disk.collect(&mut v);
    for c in 0..4 {
        v.submit(c, damaged(chunk_of(&data, c)), &d);
        disk.collect(&mut v);
        disk.settle(&mut v, &d, &mut rng);
        v.submit(c, chunk_of(&data, c), &d);
        disk.collect(&mut v);
        disk.settle(&mut v, &d, &mut rng);
    }
    assert_eq!(disk.bad, vec![0, 1, 2, 3]);
    assert!(disk.complete, "{:?}", disk.failed);
    assert_eq!(disk.part, data);
}

#[test]
fn chunks_far_out_of_order_are_read_back_and_checked_again() {
    // Reversed: the whole-file hash can start only at the end, with more
    // chunks past it than are held.
    let n = MAX_HELD_CHUNKS as u32 + 6;
    let data = file_of((n as usize - 1) * CHUNK_SIZE as usize + 77, 2);
    let d = digest_of(&data);
    let mut rng = Rng::from_u64(2);
    // Every chunk arrives, last first; `rot` damages the disk after chunk `c` is in.
    let mut reversed = |rot: &dyn Fn(u32, &mut Disk)| {
        let mut disk = Disk::new(data.len());
        let mut v = Verifier::new(&d, &Bitmap::new(n));
        for c in (0..n).rev() {
            v.submit(c, chunk_of(&data, c), &d);
            disk.collect(&mut v);
            disk.settle(&mut v, &d, &mut rng);
            rot(c, &mut disk);
        }
        disk
    };
    let disk = reversed(&|_, _| {});
    assert!(disk.complete);
    assert_eq!(disk.part, data);

    // The same, with the first chunk written (the last in the file, soon
    // not held) rotting on disk before the hash reads it back.
    let disk = reversed(&|c, disk| {
        if c == n - 1 {
            disk.part[(n as usize - 1) * CHUNK_SIZE as usize + 10] ^= 1;
        }
    });
    assert!(!disk.complete);
    let why = disk.failed.expect("the download fails");
    assert!(why.contains(&format!("chunk {}", n - 1)) && why.contains("no longer matches"), "{why}");
}

#[test]
fn a_hash_job_handed_back_unrun_reports_nothing_good() {
    let data = file_of(1000, 3);
    let d = digest_of(&data);
    let mut v = Verifier::new(&d, &Bitmap::new(1));
    v.submit(0, data.clone(), &d);
    let job = std::iter::from_fn(|| v.poll())
        .find_map(|e| if let VerifyEvent::Op(VerifyOp::Hash(j)) = e { Some(j) } else { None })
        .expect("a hash job");
    v.handle_hashed(job, &d);
    let evs: Vec<VerifyEvent> = std::iter::from_fn(|| v.poll()).collect();
    assert!(evs.iter().all(|e| !matches!(e, VerifyEvent::Good(_) | VerifyEvent::Op(VerifyOp::Write { .. }))));
    assert!(evs.iter().any(|e| matches!(e, VerifyEvent::Failed(_))), "{evs:?}");
}

#[test]
fn an_empty_file_completes_at_once() {
    let d = digest_of(&[]);
    let mut v = Verifier::new(&d, &Bitmap::new(0));
    let evs: Vec<VerifyEvent> = std::iter::from_fn(|| v.poll()).collect();
    assert!(matches!(evs.as_slice(), [VerifyEvent::Rechecked, VerifyEvent::Complete]), "{evs:?}");
}

#[test]
fn a_second_job_checks_what_waited_and_continues_the_first_jobs_folds() {
    let data = file_of(12 * CHUNK_SIZE as usize, 4);
    let d = digest_of(&data);
    let mut v = Verifier::new(&d, &Bitmap::new(12));
    let jobs = |v: &mut Verifier| -> Vec<HashJob> {
        std::iter::from_fn(|| v.poll())
            .filter_map(|e| if let VerifyEvent::Op(VerifyOp::Hash(j)) = e { Some(j) } else { None })
            .collect()
    };
    v.submit(0, chunk_of(&data, 0), &d);
    let first = jobs(&mut v);
    assert_eq!(first.len(), 1);
    assert!(matches!(first[0].start, Start::Given(_)), "the first fold starts from the engine's state");
    v.submit(1, chunk_of(&data, 1), &d);
    let second = jobs(&mut v);
    assert_eq!(second.len(), 1, "a second job while the first is out");
    let folded: Vec<u32> = second[0].folds.iter().map(|f| f.chunk).collect();
    assert_eq!(folded, vec![1], "folded over its own bytes");
    assert!(matches!(second[0].start, Start::Chained), "from where the first job leaves the hash");
    for c in [2, 3, 4] {
        v.submit(c, chunk_of(&data, c), &d);
    }
    assert!(jobs(&mut v).is_empty(), "no third job: they wait, to go in one");
    // Run in order; hand back out of order: the file still completes.
    let mut chain = HashChain::default();
    let (mut a, mut b) = (first.into_iter().next().unwrap(), second.into_iter().next().unwrap());
    a.run(&mut chain);
    b.run(&mut chain);
    let mut disk = Disk::new(data.len());
    v.handle_hashed(b, &d);
    v.handle_hashed(a, &d);
    disk.collect(&mut v);
    let mut rng = Rng::from_u64(4);
    disk.settle(&mut v, &d, &mut rng);
    for c in 5..12 {
        v.submit(c, chunk_of(&data, c), &d);
        disk.collect(&mut v);
        disk.settle(&mut v, &d, &mut rng);
    }
    assert!(disk.complete, "{:?}", disk.failed);
    assert_eq!(v.folded(), 12);
}

#[test]
fn folds_built_on_a_rejected_fold_are_thrown_away() {
    // Chunk 0 arrives damaged and is folded speculatively; chunk 1's job,
    // out at the same time, folds on top of it. Both folds must go.
    let data = file_of(3 * CHUNK_SIZE as usize, 5);
    let d = digest_of(&data);
    let mut v = Verifier::new(&d, &Bitmap::new(3));
    let mut disk = Disk::new(data.len());
    disk.collect(&mut v);
    v.submit(0, damaged(chunk_of(&data, 0)), &d);
    v.submit(1, chunk_of(&data, 1), &d);
    disk.collect(&mut v);
    assert_eq!(v.ops_out(), 2, "both jobs out");
    let mut rng = Rng::from_u64(5);
    disk.settle(&mut v, &d, &mut rng);
    assert_eq!(disk.bad, vec![0]);
    assert_eq!(v.folded(), 0, "nothing folded past the rejected chunk");
    for c in [0, 2] {
        v.submit(c, chunk_of(&data, c), &d);
        disk.collect(&mut v);
        disk.settle(&mut v, &d, &mut rng);
    }
    assert!(disk.complete, "{:?}", disk.failed);
    assert_eq!(disk.part, data);
}

#[test]
fn a_rejected_fold_with_a_check_only_job_out_restarts_the_folds_at_the_cursor() {
    // Chunk 0 arrives damaged and is folded speculatively; chunk 5's job,
    // out at the same time, has nothing to fold. Once the first is refused
    // the next folds start at chunk 0 again, not past it.
    let data = file_of(8 * CHUNK_SIZE as usize, 6);
    let d = digest_of(&data);
    let mut v = Verifier::new(&d, &Bitmap::new(8));
    let mut disk = Disk::new(data.len());
    disk.collect(&mut v);
    v.submit(0, damaged(chunk_of(&data, 0)), &d);
    v.submit(5, chunk_of(&data, 5), &d);
    disk.collect(&mut v);
    assert_eq!(v.ops_out(), 2, "both jobs out");
    // The damaged fold's job comes back first; the check-only one stays out.
    let first = disk.ops.iter().position(|op| matches!(op, VerifyOp::Hash(j) if !j.folds.is_empty())).unwrap();
    let VerifyOp::Hash(job) = disk.ops.swap_remove(first) else { unreachable!() };
    v.handle_hashed(job, &d);
    disk.collect(&mut v);
    assert_eq!(disk.bad, vec![0]);
    let mut rng = Rng::from_u64(6);
    for c in [0, 1, 2, 3, 4, 6, 7] {
        v.submit(c, chunk_of(&data, c), &d);
        disk.collect(&mut v);
    }
    disk.settle(&mut v, &d, &mut rng);
    assert!(disk.complete, "{:?}", disk.failed);
    assert_eq!(disk.part, data);
}
