//! Prints the rate of one SHA-1 stream (the `sha1` crate and ours) and of two
//! streams hashed together, over the same 512 KiB buffers, in one run:
//! `cargo run --release -p shoal-sha1x --example rate`.

use std::time::Instant;

use sha1::Digest;
use shoal_sha1x::Sha1;

const CHUNK: usize = 512 * 1024;
const TOTAL: usize = 1 << 30;

fn rate(label: &str, bytes: usize, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    let s = t.elapsed().as_secs_f64();
    println!("{label:<34} {:7.0} MB/s", bytes as f64 / s / 1e6);
}

fn main() {
    let a: Vec<u8> = (0..CHUNK).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<u8> = (0..CHUNK).map(|i| (i * 11 % 241) as u8).collect();
    let n = TOTAL / CHUNK;
    for _ in 0..2 {
        rate("sha1 crate, 1 stream", TOTAL, || {
            let mut h = sha1::Sha1::new();
            (0..n).for_each(|_| h.update(&a));
            std::hint::black_box(h.finalize());
        });
        rate("shoal-sha1x, 1 stream", TOTAL, || {
            let mut h = Sha1::new();
            (0..n).for_each(|_| h.update(&a));
            std::hint::black_box(h.finalize());
        });
        rate("shoal-sha1x, 2 streams (sum)", 2 * TOTAL, || {
            let (mut ha, mut hb) = (Sha1::new(), Sha1::new());
            (0..n).for_each(|_| Sha1::update2(&mut ha, &a, &mut hb, &b));
            std::hint::black_box((ha.finalize(), hb.finalize()));
        });
    }
}
