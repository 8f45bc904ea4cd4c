//! Minimal diffs against the real kernel: a partial sync touches only the changed
//! service, a no-op sync sends nothing, a restart on a live table rewrites no endpoint
//! chain or element and keeps established connections, and `--manifests` edits are
//! applied live.

mod support;

use kproxy::model::{self, ProxyConfig, ProxyState};
use kproxy_backend_api::{Backend, Changes, IpFamily};
use kproxy_nftables::transaction::Op;
use kproxy_nftables::writer::NftCli;
use kproxy_nftables::NftablesBackend;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};
use support::*;
use Proto::Tcp;

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

/// Builds the model's state from objects, as kproxy does from manifests.
fn state(objects: &[Value]) -> ProxyState {
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend_from_slice(objects);
    let mut cfg = ProxyConfig::new(NODE_NAME);
    cfg.cluster_cidrs = vec![CLUSTER_CIDR.parse().expect("cidr")];
    model::build(&cluster_objects(all), &cfg, &[])
}

/// Syncs the IPv4 family; `previous` makes it partial.
fn sync(b: &mut NftablesBackend<NftCli>, st: &ProxyState, previous: Option<&ProxyState>) -> usize {
    let fam = &st.families[&IpFamily::V4];
    let changes = match previous {
        Some(p) => Changes::Services(model::changed_services(
            &p.families[&IpFamily::V4].services,
            &fam.services,
        )),
        None => Changes::Full,
    };
    b.sync(&fam.node, &fam.services, &changes)
        .expect("sync")
        .operations
}

fn svc(name: &str, cip: &str) -> Value {
    service(name, &[cip]).port("p80", "TCP", 80, 0).build()
}

fn eps(name: &str, ips: &[Ipv4Addr]) -> Value {
    let e = ips
        .iter()
        .map(|i| {
            ep(
                v4(*i),
                if i.octets()[2] == 2 {
                    NODE_NAME
                } else {
                    NODE2_NAME
                },
            )
        })
        .collect();
    slice(name, false, &[("p80", "TCP", 80)], e)
}

/// Every operation names only `svc`'s objects (chains, or elements keyed by its IP).
fn assert_only_touches(tx: &kproxy_nftables::transaction::Transaction, svc: &str, cip: &str) {
    let marker = format!("ns/{svc}/");
    for op in &tx.ops {
        let ok = match op {
            Op::AddChain { name, .. } | Op::FlushChain(name) | Op::DeleteChain(name) => {
                name.as_str().contains(&marker)
            }
            Op::AddRule { chain, .. } => chain.as_str().contains(&marker),
            Op::AddElement { key, .. } | Op::DeleteElement { key, .. } => {
                key.to_string().starts_with(cip)
            }
            other => panic!("unexpected op in a partial sync: {other:?}"),
        };
        assert!(ok, "operation outside {svc}: {op:?}\n{}", tx.render());
    }
}

#[test]
fn partial_syncs_send_only_the_difference() {
    if !require_net_admin("partial_syncs_send_only_the_difference") {
        return;
    }
    let topo = topology();
    let client = topo.pod("client").ns();
    let mut b = NftablesBackend::new(IpFamily::V4, NftCli::in_netns(topo.node.name()));

    let s1 = state(&[
        svc("a", "172.30.0.1"),
        eps("a", &[RPOD1_IP]),
        svc("b", "172.30.0.2"),
        eps("b", &[RPOD2_IP]),
    ]);
    assert!(sync(&mut b, &s1, None) > 0);
    let a = sa(ip("172.30.0.1"), 80);
    let bb = sa(ip("172.30.0.2"), 80);
    check_flows(
        &topo,
        &[
            flow(
                "a",
                Tcp,
                client,
                CLIENT_IP,
                a,
                reach(&[v4(RPOD1_IP)], false),
            ),
            flow(
                "b",
                Tcp,
                client,
                CLIENT_IP,
                bb,
                reach(&[v4(RPOD2_IP)], false),
            ),
        ],
    );

    // A no-op sync sends nothing at all.
    assert_eq!(sync(&mut b, &s1, Some(&s1)), 0);
    assert!(
        b.last_transaction().is_none(),
        "a no-op sync must not call the kernel"
    );

    // Add an endpoint to a: its new endpoint chain (add + 2 rules) and its service
    // chain rewritten (flush + 2 rules); nothing of b.
    let s2 = state(&[
        svc("a", "172.30.0.1"),
        eps("a", &[RPOD1_IP, LPOD1_IP]),
        svc("b", "172.30.0.2"),
        eps("b", &[RPOD2_IP]),
    ]);
    assert_eq!(
        sync(&mut b, &s2, Some(&s1)),
        6,
        "{}",
        b.last_transaction().expect("tx").render()
    );
    assert_only_touches(b.last_transaction().expect("tx"), "a", "172.30.0.1");
    check_flows(
        &topo,
        &[flow(
            "a has two endpoints",
            Tcp,
            client,
            CLIENT_IP,
            a,
            reach(&[v4(RPOD1_IP), v4(LPOD1_IP)], false),
        )],
    );

    // Remove an endpoint: the stale chain goes in the same transaction.
    assert_eq!(
        sync(&mut b, &s1, Some(&s2)),
        5,
        "{}",
        b.last_transaction().expect("tx").render()
    );
    assert_only_touches(b.last_transaction().expect("tx"), "a", "172.30.0.1");
    let chains = topo.node.exec(&["nft", "list", "chains", "ip"]);
    assert!(
        !chains.contains("10.180.2.1/80"),
        "stale endpoint chain left behind:\n{chains}"
    );

    // Delete service b: its elements and chains go, a is untouched.
    let s3 = state(&[svc("a", "172.30.0.1"), eps("a", &[RPOD1_IP])]);
    sync(&mut b, &s3, Some(&s1));
    assert_only_touches(b.last_transaction().expect("tx"), "b", "172.30.0.2");
    check_flows(
        &topo,
        &[
            flow(
                "a still works",
                Tcp,
                client,
                CLIENT_IP,
                a,
                reach(&[v4(RPOD1_IP)], false),
            ),
            flow(
                "b is gone (unallocated: drop)",
                Tcp,
                client,
                CLIENT_IP,
                bb,
                Expect::Drop,
            ),
        ],
    );

    // The kernel holds exactly what a fresh full sync of the same state produces.
    let live = topo.node.exec(&["nft", "list", "table", "ip", "kproxy"]);
    let fresh = Topology::without_pods(&[]);
    let mut f = NftablesBackend::new(IpFamily::V4, NftCli::in_netns(fresh.node.name()));
    sync(&mut f, &s3, None);
    assert_eq!(
        live,
        fresh.node.exec(&["nft", "list", "table", "ip", "kproxy"])
    );
}

fn round_trip(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, msg: &str) -> String {
    writeln!(conn, "{msg}").expect("write on the established connection");
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("read on the established connection");
    line.trim().to_string()
}

#[test]
fn restart_keeps_live_objects_and_established_connections() {
    if !require_net_admin("restart_keeps_live_objects_and_established_connections") {
        return;
    }
    let topo = topology();
    echo_server(topo.pod("rpod1").ns(), v4(RPOD1_IP), 7000);
    let objects = vec![
        service("echo", &["172.30.0.7"])
            .port("e", "TCP", 7000, 0)
            .build(),
        slice(
            "echo",
            false,
            &[("e", "TCP", 7000)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        svc("a", "172.30.0.1"),
        eps("a", &[RPOD1_IP, RPOD2_IP]),
    ];
    sync_once(&topo.node, &objects, &base_args());

    let vip = sa(ip("172.30.0.7"), 7000);
    let mut conn = topo.pod("client").ns().in_ns(move || {
        TcpStream::connect_timeout(&vip, Duration::from_secs(2))
            .expect("connect through the ClusterIP")
    });
    conn.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    assert_eq!(round_trip(&mut conn, &mut reader, "before"), "before");

    // A restart (a new process) reads the live table: no endpoint chain and no element is
    // re-added.
    let st = state(&objects);
    let mut restarted = NftablesBackend::new(IpFamily::V4, NftCli::in_netns(topo.node.name()));
    sync(&mut restarted, &st, None);
    let tx = restarted
        .last_transaction()
        .expect("a full sync rewrites the skeleton");
    for op in &tx.ops {
        match op {
            Op::AddChain { name, .. } => assert!(
                !name.as_str().starts_with("endpoint-"),
                "endpoint chain re-added: {name}"
            ),
            Op::AddElement { .. } | Op::DeleteElement { .. } => {
                panic!("element rewritten on restart: {op:?}")
            }
            _ => {}
        }
    }
    assert_eq!(
        round_trip(&mut conn, &mut reader, "after library restart"),
        "after library restart"
    );

    // And the real binary restarting, twice, with traffic checked in between.
    for i in 0..2 {
        sync_once(&topo.node, &objects, &base_args());
        let msg = format!("after binary restart {i}");
        assert_eq!(round_trip(&mut conn, &mut reader, &msg), msg);
        check_flows(
            &topo,
            &[flow(
                "new connections still work",
                Tcp,
                topo.pod("client").ns(),
                CLIENT_IP,
                sa(ip("172.30.0.1"), 80),
                reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false),
            )],
        );
    }
}

#[test]
fn manifest_edits_are_applied_live_and_sigterm_keeps_rules() {
    if !require_net_admin("manifest_edits_are_applied_live_and_sigterm_keeps_rules") {
        return;
    }
    let topo = topology();
    let with = |ips: &[Ipv4Addr]| {
        let mut v = vec![node_object(), service_cidr_object(), svc("a", "172.30.0.1")];
        v.push(eps("a", ips));
        v
    };
    let path = write_manifest(&with(&[RPOD1_IP]));
    let p = path.to_str().expect("utf-8 path").to_string();
    let mut args = vec![
        env!("CARGO_BIN_EXE_kproxy").to_string(),
        "--manifests".into(),
        p,
    ];
    args.extend(base_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = topo.node.start_process(&argv);
    let client = topo.pod("client").ns();
    let a = sa(ip("172.30.0.1"), 80);
    let wait_for = |want: &[IpAddr]| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let t = Probe::tcp(client, a).from(v4(CLIENT_IP)).run_many(10);
            let got: Vec<IpAddr> = t.endpoints.iter().map(|e| e.ip()).collect();
            if t.all_answered() && got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rules did not converge to {want:?}: {t}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(&[v4(RPOD1_IP)]);
    // Edit the file in place: the endpoint moves.
    let docs: Vec<String> = with(&[RPOD2_IP]).iter().map(Value::to_string).collect();
    std::fs::write(&path, docs.join("\n---\n")).expect("rewrite manifest");
    wait_for(&[v4(RPOD2_IP)]);
    // A broken edit keeps the current rules.
    std::fs::write(&path, "kind: [unclosed").expect("break manifest");
    std::thread::sleep(Duration::from_millis(2500));
    wait_for(&[v4(RPOD2_IP)]);
    assert!(
        proc.is_running(),
        "a bad edit must not kill kproxy:\n{}",
        proc.log()
    );
    // SIGTERM: exits and leaves the rules (traffic keeps flowing while the pod restarts).
    proc.terminate(Duration::from_secs(5));
    wait_for(&[v4(RPOD2_IP)]);
}
