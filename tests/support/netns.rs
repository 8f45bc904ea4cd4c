//! Named network namespaces that clean up after themselves.
//!
//! Namespaces are created with `ip netns add`, so they are visible to every
//! tool (`ip netns exec`, `nft`, `conntrack`, a kproxy child process) by name,
//! and can be entered from Rust threads through `/run/netns/NAME`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::thread::JoinHandle;

use super::process::Background;
use super::server::Server;

/// Prefix of every namespace this harness creates; also how stale ones from
/// killed test runs are recognised.
const NAME_PREFIX: &str = "kp-";

/// Distinguishes namespaces created by parallel tests in one process.
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by the test; `ip netns del` on drop.
///
/// Deleting only unmounts the name: the kernel frees the namespace (and the
/// veth pairs in it) once the last socket or process inside it is gone, so
/// drop servers and kill child processes first when prompt cleanup matters.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace named `kp-<prefix>-<pid>-<n>`, with `lo` up
    /// and the baseline sysctls every namespace of the harness shares:
    ///
    /// * `accept_dad=0`: IPv6 addresses are usable at once instead of staying
    ///   tentative for a second (we add them with `nodad` as well);
    /// * `accept_redirects=0`: an ICMP redirect received before kproxy is
    ///   programmed must not reroute later probes;
    /// * ICMP error rate limits off (per destination, and the namespace-wide
    ///   budget raised far beyond what tests send): probing a rejecting
    ///   service many times must keep yielding "rejected", not "dropped"
    ///   once a limiter kicks in;
    /// * `rp_filter=0`, pinned so results do not depend on the host's
    ///   `net.core.devconf_inherit_init_net`.
    pub fn new(prefix: &str) -> Netns {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_namespaces);

        let prefix: String = prefix.chars().take(8).collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{prefix}-{}-{n}", std::process::id());
        check(Command::new("ip").args(["netns", "add", &name]), None);
        // Constructed before further setup so a failure below still deletes it.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.all.accept_redirects", "0"),
            ("net.ipv6.conf.default.accept_redirects", "0"),
            ("net.ipv4.conf.all.accept_redirects", "0"),
            ("net.ipv4.conf.default.accept_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.icmp_ratelimit", "0"),
            ("net.ipv6.icmp.ratelimit", "0"),
            // Shared by IPv4 and IPv6. Kept below 2^32 / HZ: the kernel
            // multiplies it by elapsed jiffies in 32 bits.
            ("net.ipv4.icmp_msgs_per_sec", "1000000"),
            ("net.ipv4.icmp_msgs_burst", "1000000"),
        ]);
        ns
    }

    /// The name under `/run/netns`, usable with `ip -n`, `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `setns(2)`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A `Command` that runs `program` inside the namespace (via
    /// `ip netns exec`), for callers that need to set arguments, environment
    /// or stdio themselves — e.g. to spawn kproxy as a long-running child.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `args` inside the namespace and returns its stdout; panics with
    /// the command line, exit status, stdout and stderr if it fails.
    pub fn exec(&self, args: &[&str]) -> String {
        let (program, rest) = args.split_first().expect("exec needs a program to run");
        check(self.command(program).args(rest), None)
    }

    /// Like [`Netns::exec`] but returns the raw output, for commands whose
    /// failure is an expected result.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("exec needs a program to run");
        let mut cmd = self.command(program);
        cmd.args(rest);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&cmd)))
    }

    /// Runs a shell script inside the namespace with `sh -ec` (stops at the
    /// first failing command) and returns its stdout; panics on failure.
    pub fn sh(&self, script: &str) -> String {
        check(self.command("sh").args(["-ec", script]), None)
    }

    /// `ip -n NAME args...`; returns stdout, panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        check(Command::new("ip").args(["-n", &self.name]).args(args), None)
    }

    /// Runs several `ip` commands (without the leading `ip`) in one process
    /// with `ip -batch`, which keeps topology setup fast. Stops at the first
    /// failing line and panics showing the numbered script.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> String {
        let script: String = lines.iter().map(|l| format!("{}\n", l.as_ref())).collect();
        check(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(&script),
        )
    }

    /// Loads an nftables ruleset (`nft -f -`) into this namespace.
    pub fn nft(&self, ruleset: &str) -> String {
        check(self.command("nft").args(["-f", "-"]), Some(ruleset))
    }

    /// Sets sysctls of this namespace. Written through `/proc/sys` from a
    /// thread inside the namespace: network sysctls resolve against the
    /// namespace of the task that opens the file.
    pub fn sysctl(&self, settings: &[(&str, &str)]) {
        self.in_ns(|| {
            for (key, value) in settings {
                let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value).unwrap_or_else(|e| {
                    panic!("sysctl -w {key}={value} in netns {}: {e}", self.name)
                });
            }
        });
    }

    /// Reads one sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> String {
        self.in_ns(|| {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("sysctl {key} in netns {}: {e}", self.name))
                .trim()
                .to_string()
        })
    }

    /// Global-scope IPv4 and IPv6 addresses configured in the namespace.
    pub fn addresses(&self) -> Vec<std::net::IpAddr> {
        let out = self.ip(&["-o", "addr", "show", "scope", "global"]);
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                let cidr = words.next()?;
                cidr.split('/').next()?.parse().ok()
            })
            .collect()
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns
    /// its result (re-raising its panic). Sockets created inside `f` belong
    /// to this namespace for their whole life, whichever thread uses them
    /// later; the caller's own thread never changes namespace.
    pub fn in_ns<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                enter(&path);
                f()
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a long-lived, named thread inside this namespace.
    pub fn spawn_thread<F, R>(&self, thread_name: &str, f: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || {
                enter(&path);
                f()
            })
            .unwrap_or_else(|e| panic!("cannot spawn thread {thread_name}: {e}"))
    }

    /// Starts a long-running process (e.g. kproxy, via
    /// `env!("CARGO_BIN_EXE_kproxy")`) inside the namespace; it is killed
    /// when the returned guard drops. See [`Background`].
    pub fn start_process(&self, args: &[&str]) -> Background {
        Background::start(self, args)
    }

    /// Starts TCP, UDP and SCTP responders on `ports` for every global
    /// address of this namespace (see [`Server`]); stops when dropped.
    pub fn serve(&self, ports: &[u16]) -> Server {
        Server::start(self, &self.addresses(), ports)
    }

    /// Like [`Netns::serve`] but only on the given addresses.
    pub fn serve_on(&self, addrs: &[std::net::IpAddr], ports: &[u16]) -> Server {
        Server::start(self, addrs, ports)
    }

    /// A human-readable dump of addresses, routes, the nftables ruleset and
    /// conntrack table, to attach to assertion messages.
    pub fn diagnostics(&self) -> String {
        let mut report = format!("==== netns {} ====\n", self.name);
        for args in [
            &["ip", "-br", "addr"][..],
            &["ip", "route"],
            &["ip", "-6", "route"],
            &["nft", "list", "ruleset"],
            &["conntrack", "-L"],
        ] {
            let out = self.try_exec(args);
            report += &format!(
                "--- {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        report
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let result = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            // Panicking in drop would abort during unwinding; a leaked
            // namespace is removed by the next run's stale-namespace sweep.
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &std::path::Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    // SAFETY: `file` is an open namespace file descriptor for the duration
    // of the call; setns only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!(
            "setns({}, CLONE_NEWNET): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Deletes namespaces left behind by earlier test processes that were killed
/// before their `Drop` ran: `kp-<prefix>-<pid>-<n>` whose pid is gone (or is
/// ours — this runs before we create any, so a match is a reused pid).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(_prefix)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(_), Ok(pid)) = (n.parse::<usize>(), pid.parse::<u32>()) else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if pid == me || !alive {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Renders a command line for error messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` (feeding `stdin` if given) and returns stdout; panics with the
/// command, status, stdout and stderr unless it exits successfully.
pub(crate) fn check(cmd: &mut Command, stdin: Option<&str>) -> String {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was requested as a pipe");
        // A write error (EPIPE) means the tool exited early; its status and
        // stderr below explain why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", describe(cmd)));
    if !out.status.success() {
        let input = stdin
            .map(|s| {
                let numbered: String = s
                    .lines()
                    .enumerate()
                    .map(|(i, l)| format!("{:>4}: {l}\n", i + 1))
                    .collect();
                format!("--- stdin:\n{numbered}")
            })
            .unwrap_or_default();
        panic!(
            "command failed ({}): {}\n{input}--- stdout:\n{}--- stderr:\n{}",
            out.status,
            describe(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}
