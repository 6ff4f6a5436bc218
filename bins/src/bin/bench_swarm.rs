//! `bench-swarm`: a flash crowd on loopback, against the fluid-model bound.
//!
//! Build everything first (`cargo build --release`), then run
//! `target/release/bench-swarm --leechers 24 --rate 8`. It starts one
//! tracker, one seeder sharing a file of random bytes, and N leechers (the
//! real `tracker` and `client` binaries beside this one), every client's
//! upload capped with `--max-upload-rate` (downloads uncapped). All
//! leechers ask for the file at once; it prints when each finished, the
//! makespan (the last), the fluid bound and their ratio, and how many
//! copies of the file the seeder sent.
//!
//! The fluid bound for the last finisher with a seeder and N leechers that
//! all upload at u: max(F/u, N*F/((N+1)*u)), which is F/u: the seeder must
//! send every byte once, and the swarm cannot move more than (N+1)*u. The
//! seeder's copies are the block bytes it served (its `show_uploads`) over
//! the file's size: above 1, its scarce upload went to chunks the swarm
//! already had.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use shoal_bins::procs::{cpu_secs, free_addr, Proc};

#[derive(Parser)]
#[command(name = "bench-swarm", version, about = "A flash crowd of leechers on loopback against the fluid bound")]
struct Args {
    /// Leechers that all start together.
    #[arg(long, default_value_t = 8)]
    leechers: usize,
    /// Every client's upload cap, in MB/s (10^6 bytes).
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// The file's size, in MiB.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Scratch directory (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    if !(args.rate.is_finite() && args.rate > 0.0) || args.leechers == 0 || args.mib == 0 {
        return Err("--rate, --leechers and --mib must be positive".into());
    }
    let bindir = shoal_bins::procs::bin_dir()?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("shoal-bench-swarm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let r = swarm(&bindir, &dir, args);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn swarm(bindir: &Path, dir: &Path, args: &Args) -> Result<(), String> {
    let size = args.mib << 20;
    let file = dir.join("data.bin");
    shoal_bins::write_random_file(&file, size).map_err(|e| e.to_string())?;
    let info = dir.join("tracker_info.txt");
    std::fs::write(&info, format!("{}\n", free_addr()?)).map_err(|e| e.to_string())?;
    let data = dir.join("tracker-data").display().to_string();
    let tracker =
        Proc::spawn(&bindir.join("tracker"), &[info.display().to_string(), "1".into(), "--data-dir".into(), data])?;
    tracker.out.recv_timeout(Duration::from_secs(30)).map_err(|_| "tracker did not start")?;
    let rate = format!("{}", args.rate);
    let client = || {
        let a = [free_addr()?, info.display().to_string(), "--max-upload-rate".into(), rate.clone()];
        Proc::spawn(&bindir.join("client"), &a)
    };
    let mut seeder = client()?;
    seeder.cmd("create_user seed pw")?;
    seeder.cmd("login seed pw")?;
    seeder.cmd("create_group swarm")?;
    seeder.cmd(&format!("upload_file {} swarm", file.display()))?;
    let mut leechers = Vec::new();
    for i in 0..args.leechers {
        let mut p = client()?;
        p.cmd(&format!("create_user l{i} pw"))?;
        p.cmd(&format!("login l{i} pw"))?;
        p.cmd("join_group swarm")?;
        seeder.cmd(&format!("accept_request swarm l{i}"))?;
        let out = dir.join(format!("l{i}"));
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        leechers.push((p, out));
    }
    // Everyone asks at once: the commands go out first, the answers are
    // read after.
    let pids: Vec<u32> = [&seeder].into_iter().chain(leechers.iter().map(|(p, _)| p)).map(Proc::pid).collect();
    let cpu_before: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
    let start = Instant::now();
    for (p, out) in leechers.iter_mut() {
        p.send(&format!("download_file swarm data.bin {}", out.display()))?;
    }
    for (p, _) in leechers.iter_mut() {
        let first = p.answer("download_file")?;
        if !first.starts_with("downloading") {
            return Err(format!("a download did not start: {first}"));
        }
    }
    let mut done: Vec<Option<f64>> = vec![None; leechers.len()];
    // When the seeder had sent one copy's worth: from then on the swarm
    // spreads what it has; before, the seeder's idle time shows.
    let mut one_copy: Option<f64> = None;
    let limit = Duration::from_secs_f64((size as f64 / (args.rate * 1e6)) * 20.0 + 60.0);
    while done.iter().any(Option::is_none) {
        for (i, (p, _)) in leechers.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let line = p.cmd("show_downloads")?;
            if line.starts_with("[C]") {
                done[i] = Some(start.elapsed().as_secs_f64());
            } else if line.starts_with("[F]") {
                return Err(format!("leecher {i}: {line}"));
            }
        }
        if one_copy.is_none() && served(&mut seeder)? >= size {
            one_copy = Some(start.elapsed().as_secs_f64());
        }
        if start.elapsed() > limit {
            return Err(format!("not done after {:.0} s", limit.as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = pids.iter().map(|&p| cpu_secs(p)).sum::<f64>() - cpu_before;
    let sent = served(&mut seeder)?;
    let mut traded = 0;
    for (p, _) in leechers.iter_mut() {
        traded += served(p)?;
    }
    let times: Vec<f64> = done.into_iter().flatten().collect();
    let n = args.leechers as f64;
    let u = args.rate * 1e6;
    let f = size as f64;
    let bound = (f / u).max(n * f / ((n + 1.0) * u));
    let makespan = times.iter().copied().fold(0.0, f64::max);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "file {} MiB, 1 seeder + {} leechers, every upload capped at {} MB/s, loopback",
        args.mib, args.leechers, args.rate
    );
    let shown: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    println!("  leechers done (s, in start order): {}", shown.join(" "));
    println!("  first / median / last:     {:.1} / {:.1} / {:.1} s", sorted[0], sorted[sorted.len() / 2], makespan);
    println!("  fluid bound:               {bound:.1} s");
    println!("  makespan / bound:          {:.2}", makespan / bound);
    println!("  copies the seeder sent:    {:.2}", sent as f64 / f);
    if let Some(t) = one_copy {
        // The seeder at its cap would have sent one copy by the bound.
        println!(
            "  seeder's first copy sent:  {t:.1} s ({:.2} of the bound), the rest took {:.1} s",
            t / bound,
            makespan - t
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "  clients' CPU:              {cpu:.1} s, {:.0}% of {cores} cores over the makespan",
        cpu / (cores * makespan) * 100.0
    );
    // Of what the leechers received, the share they served each other, and
    // how busy their capped uploads were until the last finished.
    println!(
        "  leechers served each other: {:.2} copies ({:.0}% of their upload capacity over the makespan)",
        traded as f64 / f,
        traded as f64 / (n * u * makespan) * 100.0
    );
    Ok(())
}

/// The block bytes `p` served in all, from its `show_uploads`.
fn served(p: &mut Proc) -> Result<u64, String> {
    p.send("show_uploads")?;
    loop {
        let line = p.answer("show_uploads")?;
        if let Some(n) = line.strip_suffix(" bytes served in all") {
            return n.parse().map_err(|_| format!("cannot read `{line}`"));
        }
    }
}
