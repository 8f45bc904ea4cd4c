//! Long-running processes inside a namespace (kproxy itself, typically).
//!
//! A test that panics must not leave its kproxy running: the process would
//! keep the namespace alive and keep writing rules. [`Background`] kills
//! the process when dropped, and keeps its output in a log file so failure
//! messages can include it.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::netns::Netns;

/// A child process running in a namespace; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Background {
    child: Child,
    command: String,
    log: PathBuf,
}

impl Background {
    /// Starts `args` inside `ns` with stdout and stderr going to a log file.
    /// `ip netns exec` execs the program, so the child's pid is the
    /// program's own and signals reach it directly.
    pub fn start(ns: &Netns, args: &[&str]) -> Background {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let (program, rest) = args.split_first().expect("need a program to start");
        let command = args.join(" ");
        let log = std::env::temp_dir().join(format!(
            "{}-{}.log",
            ns.name(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let out = File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create log {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate log handle: {e}"));
        let child = ns
            .command(program)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}` in {}: {e}", ns.name()));
        Background {
            child,
            command,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (false once it exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) and waits up to `timeout` for
    /// the process to exit; `None` if it is still running afterwards.
    pub fn signal_and_wait(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the child has
        // not been reaped (try_wait said so), so the pid is still ours.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return None,
            }
        }
    }

    /// Graceful stop: SIGTERM, then wait up to `timeout`; panics (with the
    /// log) if the process does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM, timeout)
            .unwrap_or_else(|| {
                panic!(
                    "`{}` did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.command,
                    self.log()
                )
            })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
