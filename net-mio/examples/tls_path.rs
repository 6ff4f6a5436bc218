//! CPU per GiB of a peer connection's data path, three ways in turns:
//! plaintext (`sendfile`), rustls throughout, and rustls for the handshake
//! then records sealed and opened in place. One thread runs both ends, so
//! the figure is the whole path's cost on one core.
//!
//! `cargo run --release -p shoal-net-mio --example tls_path -- [MiB] [rounds]`

use std::io::Write;
use std::sync::Arc;

use shoal_net_mio::pathbench::{run, PathKind};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    // A 64 MiB file, read over and over (in the page cache, as a sharer's).
    let path = std::env::temp_dir().join(format!("shoal-tls-path-{}", std::process::id()));
    let len = 64u64 << 20;
    {
        let mut f = std::fs::File::create(&path)?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..len >> 20 {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
    }
    let file = Arc::new(std::fs::File::open(&path)?);
    let _ = std::fs::remove_file(&path);
    let kinds = [PathKind::Plaintext, PathKind::Rustls, PathKind::Records];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let bytes = mib << 20;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    for round in 1..=rounds {
        // Each round in another order, so drift favours none.
        for k in (0..kinds.len()).map(|i| (i + round) % kinds.len()) {
            let (secs, wall) = run(kinds[k], &file, len, bytes)?;
            println!(
                "round {round} {:9?}: {:.3} CPU s/GiB ({:.0} MB/s)",
                kinds[k],
                secs / gib,
                bytes as f64 / wall.as_secs_f64() / 1e6
            );
            cpu[k].push(secs / gib);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let m: Vec<f64> = cpu.iter_mut().map(med).collect();
    println!("median CPU s/GiB: plaintext {:.3}, rustls {:.3}, records {:.3}", m[0], m[1], m[2]);
    println!("TLS cost over plaintext, per GiB: rustls {:.3} s, records {:.3} s", m[1] - m[0], m[2] - m[0]);
    Ok(())
}
