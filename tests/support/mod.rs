//! Shared harness for kproxy's privileged integration tests.
//!
//! Include it from an integration test with `mod support;`. It builds a
//! realistic, dual-stack node network out of network namespaces (see
//! [`topology`]) and drives real TCP, UDP and SCTP traffic through it (see
//! [`probe`]), so tests can assert on what a client actually experiences
//! — which endpoint answered, which source address it saw, or whether the
//! packet was rejected or silently dropped — instead of on rule text.
//!
//! Everything happens inside namespaces created here: nothing is ever
//! configured in the root network namespace, and all traffic stays between
//! the namespaces of one [`Topology`]. Every test must call
//! [`require_net_admin`] first, because all of this needs root.
//!
//! The typical shape of a test:
//!
//! ```ignore
//! mod support;
//! use support::*;
//!
//! #[test]
//! fn cluster_ip_reaches_remote_pod() {
//!     if !require_net_admin("cluster_ip_reaches_remote_pod") {
//!         return;
//!     }
//!     let topo = Topology::new();
//!     // ... start kproxy in topo.node, then:
//!     let out = probe_tcp(topo.pod("lpod1").ns(), None, "172.30.0.10:80".parse().unwrap());
//!     assert!(out.is_answered(), "{out}");
//! }
//! ```

// Each integration test binary compiles this module separately and uses only
// part of it; without this every binary would warn about the rest.
#![allow(dead_code, unused_imports)]

pub mod apiserver;
pub mod cluster;
pub mod netns;
pub mod probe;
pub mod process;
pub mod sctp;
pub mod server;
mod sys;
pub mod topology;

pub use cluster::*;
pub use netns::Netns;
pub use probe::{
    probe, probe_many, probe_sctp, probe_tcp, probe_udp, Outcome, Probe, Proto, Tally,
    DEFAULT_TIMEOUT,
};
pub use process::Background;
pub use server::{SctpArrival, Server};
pub use topology::*;

use std::io::Write;
use std::path::Path;

/// Returns whether this process may build namespaced topologies: it must run
/// as root, and `ip` (iproute2) and `nft` (nftables) must be on `PATH`.
///
/// Privileged tests start with `if !require_net_admin("name") { return; }`.
/// On a developer machine a missing privilege is not a failure — the test is
/// reported as skipped on stderr so the gap stays visible. With `CI=true` a
/// skip would silently hide lost coverage, so it panics instead.
pub fn require_net_admin(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        missing.push(format!("not running as root (euid {euid})"));
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if !on_path(tool) {
            missing.push(format!("`{tool}` ({package}) not found on PATH"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root, iproute2 and nftables: {missing}");
    }
    // Written to the stderr handle rather than with eprintln!: libtest
    // captures the print macros of passing tests, which would hide the skip.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root + iproute2 + nftables ({missing}) \
         (run: sudo -E cargo test --test {})",
        test_binary_name()
    );
    false
}

/// Whether an executable called `tool` exists in one of the `PATH` entries.
fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(tool);
        candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The `--test` target name of the running binary (cargo names it
/// `<target>-<hash>`), used to print a copy-pasteable command line.
fn test_binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_stem)
        .and_then(|s| s.to_str())
        .unwrap_or("packet_flow");
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
        _ => stem.to_string(),
    }
}
