//! The processes a benchmark runs (collector, exporter, a Kafka broker) and what it reads
//! from them: their ready lines, their `/metrics`, their CPU time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flowattr_common::proc_stat::ProcStat;

/// A child process, killed when dropped.
pub struct Process {
    pub child: Child,
    /// Stderr up to and including the ready line.
    startup: Vec<String>,
}

/// Has the kernel SIGKILL the process `command` starts when the thread starting it ends,
/// however it ends: a benchmark killed mid-run, or its test timed out, leaves no broker or
/// collector behind ([`Drop`] runs only on a clean exit). So a process is started from a
/// thread that outlives it: the benchmark's main thread, a test's own.
fn dies_with_this_thread(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; prctl and getppid are plain system calls.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the request took effect. (No allocation here:
            // another thread may have held the allocator's lock at the fork.)
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    }
}

impl Process {
    /// Starts `command` and waits for the stderr line starting with `ready_prefix`; later
    /// stderr lines are echoed with `name: `.
    pub fn start(
        command: &mut Command,
        name: &'static str,
        ready_prefix: &str,
    ) -> anyhow::Result<Process> {
        let mut child = dies_with_this_thread(command)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut startup = Vec::new();
        loop {
            match lines.next() {
                Some(line) => {
                    let line = line?;
                    let ready = line.starts_with(ready_prefix);
                    eprintln!("{name}: {line}");
                    startup.push(line);
                    if ready {
                        break;
                    }
                }
                None => bail!("{name} exited before it was ready"),
            }
        }
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("{name}: {line}");
            }
        });
        Ok(Process { child, startup })
    }

    /// Starts `command` with its output discarded (a helper such as a broker).
    pub fn start_quiet(command: &mut Command) -> anyhow::Result<Process> {
        let child = dies_with_this_thread(command)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Process {
            child,
            startup: Vec::new(),
        })
    }

    /// The address after the word `field` in the first start-up line holding it
    /// (`... ingest 127.0.0.1:7400 ...`, `... on http://127.0.0.1:7402`).
    pub fn address(&self, field: &str) -> anyhow::Result<SocketAddr> {
        for line in &self.startup {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(at) = words.iter().position(|word| *word == field) {
                let value = words.get(at + 1).context("a value")?;
                return Ok(value.trim_start_matches("http://").parse()?);
            }
        }
        bail!("no {field} in the start-up lines {:?}", self.startup)
    }

    /// CPU seconds (user + system) the process has used, its ended threads' included.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(&ProcStat::read(format!("/proc/{}/stat", self.child.id()))?)
    }

    /// CPU seconds each of the process's running threads has used, summed by thread name (as
    /// the kernel keeps it: 15 bytes).
    pub fn cpu_seconds_by_thread_name(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut by_name = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            // A thread that ended between the listing and the read used what the process's
            // total still counts.
            let Ok(stat) = ProcStat::read(task?.path().join("stat")) else {
                continue;
            };
            *by_name.entry(stat.name().to_owned()).or_default() += cpu_seconds(&stat)?;
        }
        Ok(by_name)
    }

    /// Keeps every thread of the process on `cpus`, and so every thread it starts from now on
    /// (a thread inherits its creator's CPUs). A pass that finds a thread the one before did
    /// not (started meanwhile by a thread not yet moved) is followed by another.
    pub fn keep_on(&self, cpus: &[usize]) -> anyhow::Result<()> {
        // SAFETY: cpu_set_t is a plain bit array, valid all zeroes.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            // SAFETY: CPU_SET sets one bit of `set` (a CPU past its 1,024 panics).
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        let mut moved = std::collections::BTreeSet::new();
        loop {
            let mut new = 0;
            for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
                let name = task?.file_name();
                let thread: libc::pid_t = name.to_string_lossy().parse()?;
                if !moved.insert(thread) {
                    continue;
                }
                new += 1;
                // SAFETY: `set` is a valid cpu_set_t of the size given.
                let result =
                    unsafe { libc::sched_setaffinity(thread, std::mem::size_of_val(&set), &set) };
                if result != 0 {
                    let error = std::io::Error::last_os_error();
                    // A thread that ended meanwhile needs no CPUs.
                    if error.raw_os_error() != Some(libc::ESRCH) {
                        return Err(error)
                            .with_context(|| format!("moving thread {thread} to CPUs {cpus:?}"));
                    }
                }
            }
            if new == 0 {
                return Ok(());
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Kafka-compatible broker (Tansu) on a free loopback port, storing in memory; stopped when
/// dropped. Benchmarks, the demo and the tests start one each.
pub struct Broker {
    process: Process,
    /// `host:port`, as clients are given it.
    pub address: String,
    binary: PathBuf,
}

impl Broker {
    /// The broker binary named by `FLOWATTR_KAFKA_BROKER` (scripts/test and scripts/demo-cluster
    /// install Tansu and set it).
    pub fn binary_from_env() -> anyhow::Result<PathBuf> {
        std::env::var_os("FLOWATTR_KAFKA_BROKER")
            .map(PathBuf::from)
            .context("FLOWATTR_KAFKA_BROKER must name a Kafka-compatible broker binary (scripts/fetch-broker installs Tansu)")
    }

    /// Starts `binary` on a free port and waits until it listens.
    pub fn start(binary: &Path) -> anyhow::Result<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Broker::start_on(binary, port)
    }

    /// Starts `binary` on `port` (a broker coming back where its clients expect it) and waits
    /// until it listens. Its storage is in memory: it starts empty.
    pub fn start_on(binary: &Path, port: u16) -> anyhow::Result<Broker> {
        Broker::start_with(binary, port, None, &format!("127.0.0.1:{port}"))
    }

    /// As [`Broker::start`], telling clients to reach it at `advertised` (`host:port`): a TLS
    /// terminator in front of it, say.
    pub fn start_advertising(binary: &Path, advertised: &str) -> anyhow::Result<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Broker::start_with(binary, port, None, advertised)
    }

    /// As [`Broker::start_on`], keeping its topics in `dir` (SQLite), so that a broker started
    /// again on the same `dir` has them: a Tansu built with its `libsql` feature
    /// (`FLOWATTR_KAFKA_BROKER_SQLITE=1` says the binary is one).
    pub fn start_keeping(binary: &Path, port: u16, dir: &Path) -> anyhow::Result<Broker> {
        Broker::start_with(binary, port, Some(dir), &format!("127.0.0.1:{port}"))
    }

    /// Whether `FLOWATTR_KAFKA_BROKER` names a broker that can keep its topics on disk.
    pub fn keeps_storage() -> bool {
        std::env::var("FLOWATTR_KAFKA_BROKER_SQLITE").is_ok_and(|value| value == "1")
    }

    fn start_with(
        binary: &Path,
        port: u16,
        kept_in: Option<&Path>,
        advertised: &str,
    ) -> anyhow::Result<Broker> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(binary);
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &format!("tcp://{advertised}"),
        ]);
        match kept_in {
            // Tansu takes the file relative to its working directory.
            Some(dir) => command
                .current_dir(dir)
                .args(["--storage-engine", "sqlite://tansu.db"]),
            None => command.args(["--storage-engine", "memory://tansu/"]),
        };
        let process = Process::start_quiet(&mut command)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the broker {} never listened on port {port}",
                    binary.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Broker {
            process,
            address: format!("127.0.0.1:{port}"),
            binary: binary.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Keeps the broker on `cpus` (see [`Process::keep_on`]).
    pub fn keep_on(&self, cpus: &[usize]) -> anyhow::Result<()> {
        self.process.keep_on(cpus)
    }

    /// CPU seconds the broker has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.process.cpu_seconds()
    }

    pub fn port(&self) -> u16 {
        self.address
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("host:port")
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> anyhow::Result<()> {
        self.topic_command(&["create", topic, "--partitions", &partitions.to_string()])
            .with_context(|| format!("creating topic {topic}"))
    }

    /// Deletes `topic`, as an operator (or a broker losing its storage) would under its
    /// clients.
    pub fn delete_topic(&self, topic: &str) -> anyhow::Result<()> {
        self.topic_command(&["delete", topic])
            .with_context(|| format!("deleting topic {topic}"))
    }

    fn topic_command(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(&self.binary)
            .arg("topic")
            .args(args)
            .arg("--broker")
            .arg(format!("tcp://{}", self.address))
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("{status}");
        }
        Ok(())
    }
}

/// `GET path` over HTTP/1.1; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// A metric summed over its series (optionally only those whose labels contain `label`).
/// The `q` quantile of what the Prometheus histogram `name` (in seconds) counted between the
/// scrapes `before` and `after`, in seconds: linear within the bucket it falls in, as
/// PromQL's `histogram_quantile` does. 0 if it counted nothing.
pub fn histogram_quantile(before: &str, after: &str, name: &str, q: f64) -> f64 {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|line| {
                let (bound, count) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
                Some((
                    if bound == "+Inf" {
                        f64::INFINITY
                    } else {
                        bound.parse().ok()?
                    },
                    count.parse().ok()?,
                ))
            })
            .collect()
    };
    let (before, after) = (buckets(before), buckets(after));
    let counted: Vec<(f64, f64)> = after
        .iter()
        .map(|&(bound, count)| {
            (
                bound,
                count
                    - before
                        .iter()
                        .find(|(known, _)| *known == bound)
                        .map_or(0.0, |(_, count)| *count),
            )
        })
        .collect();
    let Some(&(_, total)) = counted.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in counted {
        if count >= rank {
            // Past the last finite bound nothing is known but that bound.
            return if bound.is_infinite() {
                lower
            } else {
                lower + (bound - lower) * (rank - below) / (count - below).max(f64::MIN_POSITIVE)
            };
        }
        (lower, below) = (bound, count);
    }
    lower
}

pub fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| label.is_none_or(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// User + system CPU seconds of a process or a thread.
fn cpu_seconds(stat: &ProcStat) -> anyhow::Result<f64> {
    let ticks = stat.cpu_ticks().context("no CPU times in /proc stat")?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_come_from_the_counts_between_two_scrapes() {
        let scrape = |counts: [u64; 3]| {
            format!(
                "# TYPE lag_seconds histogram\nlag_seconds_bucket{{le=\"1\"}} {}\nlag_seconds_bucket{{le=\"2\"}} {}\nlag_seconds_bucket{{le=\"+Inf\"}} {}\nlag_seconds_count {}\n",
                counts[0], counts[1], counts[2], counts[2]
            )
        };
        // Before: 1000 slow ones, which the window leaves out. Between: 50 under 1 s, 50 more
        // under 2 s, none slower.
        let (before, after) = (scrape([0, 0, 1000]), scrape([50, 100, 1100]));
        assert_eq!(histogram_quantile(&before, &after, "lag_seconds", 0.5), 1.0);
        assert_eq!(
            histogram_quantile(&before, &after, "lag_seconds", 0.75),
            1.5
        );
        assert_eq!(
            histogram_quantile(&after, &after, "lag_seconds", 0.5),
            0.0,
            "nothing counted"
        );
        // Past the last finite bound: that bound.
        assert_eq!(
            histogram_quantile(&scrape([0, 0, 0]), &before, "lag_seconds", 0.99),
            2.0
        );
    }

    /// Every thread of a running process moves, and a thread it starts afterwards is born on
    /// the same CPU (a python3 child: any multithreaded one would do).
    #[test]
    fn a_kept_process_s_threads_now_and_later_run_on_the_cpus_given() {
        let script = "import threading, time\n\
            def nap(): time.sleep(20)\n\
            for _ in range(3): threading.Thread(target=nap).start()\n\
            print('started', flush=True)\n\
            input()\n\
            threading.Thread(target=nap).start()\n\
            print('later', flush=True)\n\
            time.sleep(20)\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdin = child.stdin.take().unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "started");
        let process = Process {
            child,
            startup: Vec::new(),
        };
        let allowed = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{}/task", process.child.id()))
                .unwrap()
                .map(|task| {
                    let status = std::fs::read_to_string(task.unwrap().path().join("status"))
                        .unwrap_or_default();
                    status
                        .lines()
                        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                        .unwrap_or("gone")
                        .trim()
                        .to_owned()
                })
                .collect()
        };
        // The first CPU this test may use itself (a container's set may leave out CPU 0).
        let cpu = core_affinity::get_core_ids().expect("this process's CPUs")[0].id;
        let only = cpu.to_string();
        assert!(allowed().len() >= 4, "{:?}", allowed());
        process.keep_on(&[cpu]).unwrap();
        assert!(
            allowed().iter().all(|cpus| *cpus == only),
            "{:?}",
            allowed()
        );
        stdin.write_all(b"\n").unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "later");
        let threads = allowed();
        assert!(
            threads.len() >= 5 && threads.iter().all(|cpus| *cpus == only),
            "{threads:?}"
        );
    }
}
