//! kproxy touches only its own tables: another component's nftables table survives sync,
//! restart and `--cleanup`, and `--cleanup` leaves nothing of kproxy behind. A `kill -9`
//! in the middle of a large sync leaves either the old or the new ruleset (transactions
//! are atomic), and the restarted kproxy converges while an established connection
//! through a ClusterIP keeps working.

mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::Duration;
use support::*;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 100);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn topology() -> Topology {
    let mut t = Topology::new();
    t.add_local_pod(
        "client",
        CLIENT_IP,
        "fd00:10:180:2::100".parse().expect("ip"),
    );
    t
}

/// A host firewall of somebody else's: its own table, base chains on the same hooks,
/// a set, and a counter we can read back.
const HOST_FIREWALL: &str = "add table inet host-fw
add set inet host-fw blocked { type ipv4_addr ; }
add element inet host-fw blocked { 198.51.100.7 }
add chain inet host-fw input { type filter hook input priority 0 ; policy accept ; }
add rule inet host-fw input ip saddr @blocked drop
add rule inet host-fw input tcp dport 22 counter accept
add chain inet host-fw forward { type filter hook forward priority 0 ; policy accept ; }
add rule inet host-fw forward ip saddr @blocked drop
";

fn host_firewall(node: &Netns) -> String {
    node.exec(&["nft", "list", "table", "inet", "host-fw"])
}

fn objects() -> Vec<Value> {
    vec![
        service("a", &["172.30.0.1", "fd00:10:96::1"])
            .port("p80", "TCP", 80, 3001)
            .build(),
        slice(
            "a",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
    ]
}

#[test]
fn other_tables_survive_sync_restart_and_cleanup() {
    if !require_net_admin("other_tables_survive_sync_restart_and_cleanup") {
        return;
    }
    let topo = topology();
    topo.node.nft(HOST_FIREWALL);
    let before = host_firewall(&topo.node);
    let client = topo.pod("client").ns();
    let a = sa(ip("172.30.0.1"), 80);

    sync_once(&topo.node, &objects(), &base_args());
    check_flows(
        &topo,
        &[flow(
            "a",
            Proto::Tcp,
            client,
            CLIENT_IP,
            a,
            reach(&[v4(RPOD1_IP)], false),
        )],
    );
    assert_eq!(
        host_firewall(&topo.node),
        before,
        "sync changed another table"
    );

    // Restart (a new process reading the live table back).
    sync_once(&topo.node, &objects(), &base_args());
    assert_eq!(
        host_firewall(&topo.node),
        before,
        "restart changed another table"
    );

    // --cleanup removes kproxy's tables and nothing else.
    let out = topo
        .node
        .command(env!("CARGO_BIN_EXE_kproxy"))
        .arg("--cleanup")
        .output()
        .expect("run --cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = topo.node.exec(&["nft", "list", "tables"]);
    assert!(!tables.contains("kproxy"), "kproxy objects left: {tables}");
    assert!(tables.contains("table inet host-fw"), "{tables}");
    assert_eq!(
        host_firewall(&topo.node),
        before,
        "--cleanup changed another table"
    );
    // Running it again finds nothing to do and still succeeds.
    let again = topo
        .node
        .command(env!("CARGO_BIN_EXE_kproxy"))
        .arg("--cleanup")
        .output()
        .expect("run --cleanup");
    assert!(again.status.success());
}

#[test]
fn kill_9_during_a_large_sync_then_restart_converges_and_keeps_connections() {
    if !require_net_admin("kill_9_during_a_large_sync_then_restart_converges_and_keeps_connections")
    {
        return;
    }
    let topo = topology();
    echo_server(topo.pod("rpod1").ns(), v4(RPOD1_IP), 7000);
    let echo = vec![
        service("echo", &["172.30.0.7"])
            .port("e", "TCP", 7000, 0)
            .build(),
        slice(
            "echo",
            false,
            &[("e", "TCP", 7000)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
    ];
    sync_once(&topo.node, &echo, &base_args());
    let vip = sa(ip("172.30.0.7"), 7000);
    let mut conn = topo.pod("client").ns().in_ns(move || {
        TcpStream::connect_timeout(&vip, Duration::from_secs(2))
            .expect("connect through the ClusterIP")
    });
    conn.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut round_trip = |msg: &str| {
        writeln!(conn, "{msg}").expect("write");
        let mut line = String::new();
        reader.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), msg, "the established connection broke");
    };
    round_trip("before");

    // A large state: 1500 services with 4 endpoints each, in one manifest.
    let mut big = echo.clone();
    for i in 0..1500u32 {
        let name = format!("s{i}");
        let cip = format!("172.30.{}.{}", 10 + i / 250, 1 + i % 250);
        big.push(service(&name, &[&cip]).port("p80", "TCP", 80, 0).build());
        let eps = (0..4)
            .map(|j| {
                ep(
                    IpAddr::V4(Ipv4Addr::new(
                        10,
                        200,
                        (i / 60) as u8,
                        (4 * (i % 60) + j + 1) as u8,
                    )),
                    NODE2_NAME,
                )
            })
            .collect();
        big.push(slice(&name, false, &[("p80", "TCP", 80)], eps));
    }
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend(big.iter().cloned());
    let path = write_manifest(&all);
    let mut args = vec![
        env!("CARGO_BIN_EXE_kproxy").to_string(),
        "--manifests".into(),
        path.to_str().expect("utf-8").into(),
        "--once".into(),
    ];
    args.extend(base_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();

    // Kill it at later and later points of the sync until one kill comes after the
    // commit; each time the table holds either the old or the new state, never part of
    // it, and the connection keeps working.
    let mut outcomes = Vec::new();
    let mut delay = Duration::from_millis(20);
    loop {
        let mut p = topo.node.start_process(&argv);
        std::thread::sleep(delay);
        unsafe_kill(p.pid());
        let _ = p.signal_and_wait(0, Duration::from_secs(5));
        // nft may still be committing what kproxy handed it: let it finish.
        std::thread::sleep(Duration::from_millis(300));
        let listed = topo
            .node
            .exec(&["nft", "list", "set", "ip", "kproxy", "cluster-ips"]);
        let count = listed.matches("172.30.").count();
        outcomes.push((delay.as_millis(), count));
        assert!(
            count == 1 || count >= 1501,
            "half-applied ruleset after kill -9 at {delay:?}: {count} ClusterIPs"
        );
        round_trip(&format!("after kill at {delay:?}"));
        if count >= 1501 {
            break;
        }
        assert!(
            delay < Duration::from_secs(60),
            "the sync never committed: {outcomes:?}"
        );
        delay = delay * 3 / 2;
    }
    // Start again from the old state for the restart below.
    sync_once(&topo.node, &echo, &base_args());
    // The restart converges to the full state.
    sync_once(&topo.node, &big, &base_args());
    let listed = topo
        .node
        .exec(&["nft", "list", "set", "ip", "kproxy", "cluster-ips"]);
    assert!(
        listed.matches("172.30.").count() >= 1501,
        "restart did not converge"
    );
    round_trip("after restart");
    eprintln!("ClusterIPs present after each kill -9: {outcomes:?}");
}

fn unsafe_kill(pid: u32) {
    // SAFETY: sending a signal to a child process we started; no memory is involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}");
}
