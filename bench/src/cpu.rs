//! CPU time of this process and of the broker's, so a figure can say who
//! spent the time: on two cores shared by the broker and the benchmark,
//! throughput swings by 10 to 20 % from run to run, while CPU time per
//! message holds still.
//!
//! Both come from `/proc/<pid>/stat` (user + system time of all threads, in
//! clock ticks of 10 ms), summed over every run of a figure.

use std::future::Future;
use std::time::Duration;

use crate::side::BenchResult;

/// Linux reports process times in units of `USER_HZ`, which is 100.
const TICK: Duration = Duration::from_millis(10);

/// Reads the CPU time of this process and of the broker's, if it runs here.
pub(crate) struct CpuClock {
    broker: Option<u32>,
}

/// CPU time so far.
#[derive(Clone, Copy)]
pub(crate) struct Reading {
    own: Duration,
    broker: Option<Duration>,
}

/// CPU time spent between two readings.
#[derive(Clone, Copy, Default)]
pub(crate) struct Spent {
    pub(crate) own: Duration,
    pub(crate) broker: Option<Duration>,
}

impl CpuClock {
    /// A clock for `broker` ("rabbitmq", "nats" or "memory") at `url`.
    /// `TR_BENCH_BROKER_PID` names the broker's process; otherwise it is
    /// the process listening on the URL's port, so that with several
    /// servers running (a second NATS, a test cluster) the one measured is
    /// the one the run talks to. Only where no listener can be seen
    /// (another network namespace, other users' descriptors hidden) is it
    /// found by name. A broker on another machine has no CPU figure here
    /// unless a local process of its name is mistaken for it.
    pub(crate) fn new(broker: &str, url: &str) -> Self {
        let from_env = std::env::var("TR_BENCH_BROKER_PID")
            .ok()
            .and_then(|pid| pid.parse().ok());
        let (name, default_port) = match broker {
            "rabbitmq" => ("beam.smp", 5672),
            "nats" => ("nats-server", 4222),
            _ => return CpuClock { broker: None },
        };
        let listening = || listener(port_of(url).unwrap_or(default_port));
        CpuClock {
            broker: from_env.or_else(listening).or_else(|| find_process(name)),
        }
    }

    pub(crate) fn read(&self) -> Reading {
        Reading {
            own: cpu_time("self").unwrap_or_default(),
            broker: self.broker.and_then(|pid| cpu_time(&pid.to_string())),
        }
    }

    /// Runs `work`, which handles `count` messages in the time it returns,
    /// adds the CPU time it took to `spent`, and returns its rate in
    /// messages per second.
    pub(crate) async fn rate(
        &self,
        spent: &mut Spent,
        count: usize,
        work: impl Future<Output = BenchResult<Duration>>,
    ) -> BenchResult<f64> {
        let before = self.read();
        let took = work.await?;
        *spent += self.read().since(before);
        Ok(count as f64 / took.as_secs_f64())
    }
}

impl Reading {
    pub(crate) fn since(self, earlier: Reading) -> Spent {
        Spent {
            own: self.own.saturating_sub(earlier.own),
            broker: match (self.broker, earlier.broker) {
                (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                _ => None,
            },
        }
    }
}

impl std::ops::AddAssign for Spent {
    fn add_assign(&mut self, other: Spent) {
        self.own += other.own;
        if let Some(broker) = other.broker {
            self.broker = Some(self.broker.unwrap_or_default() + broker);
        }
    }
}

/// Less CPU time than this is not reported: at 10 ms a tick, it would be
/// off by more than 5 %.
const MEASURABLE: Duration = Duration::from_millis(200);

impl Spent {
    /// Microseconds of CPU per message: this process's, and the broker's;
    /// `None` where the run was too short to measure.
    pub(crate) fn per_message(&self, messages: usize) -> Option<(f64, Option<f64>)> {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / messages.max(1) as f64;
        let broker = self.broker.filter(|d| *d >= MEASURABLE).map(per);
        (self.own >= MEASURABLE).then(|| (per(self.own), broker))
    }
}

/// User + system time of process `pid` ("self" for this one).
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u32 = fields.get(11)?.parse().ok()?;
    let stime: u32 = fields.get(12)?.parse().ok()?;
    Some(TICK * (utime + stime))
}

/// The port of the first server in a broker URL
/// (`scheme://[user[:password]@]host[:port][,host[:port]...][/...]`);
/// `None` if it names none.
fn port_of(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    let first = hosts.split(',').next()?;
    first.rsplit_once(':')?.1.parse().ok()
}

/// The process with a TCP socket listening on `port`, from
/// `/proc/net/tcp{,6}` (the socket's inode) and `/proc/<pid>/fd`.
fn listener(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    // sl local_address rem_address st ... uid timeout inode
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit_once(':')?.1;
                    let listening = *fields.get(3)? == "0A";
                    let inode = fields.get(9)?;
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    pids().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .any(|target| {
                inodes
                    .iter()
                    .any(|inode| target.as_os_str() == inode.as_str())
            })
    })
}

/// The ids of the processes running now.
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
}

/// The process whose command name is `name`; the busiest if several are.
fn find_process(name: &str) -> Option<u32> {
    pids()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .max_by_key(|pid| cpu_time(&pid.to_string()).unwrap_or_default())
}

/// CPU time the threads of this process that are alive now have spent, to
/// the nanosecond (`/proc/self/task/*/schedstat`): finer than
/// [`CpuClock`]'s ticks, for runs of a few milliseconds, but blind to
/// threads that have exited, so only for spans no thread ends in.
pub(crate) fn threads_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path().join("schedstat");
            let stat = std::fs::read_to_string(path).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(Duration::from_nanos)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_its_first_servers_port() {
        assert_eq!(port_of("nats://127.0.0.1:4223"), Some(4223));
        assert_eq!(port_of("amqp://guest:guest@127.0.0.1:5673/%2f"), Some(5673));
        assert_eq!(port_of("nats://u:p@a:4301,b:4302"), Some(4301));
        assert_eq!(port_of("nats://127.0.0.1"), None);
        assert_eq!(port_of("memory://"), None);
    }

    #[test]
    fn the_listener_on_a_port_is_found() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert_eq!(listener(port), Some(std::process::id()));
    }
}
