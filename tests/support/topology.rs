//! A small dual-stack cluster in network namespaces, modelled on the
//! addressing conventions of upstream kube-proxy's tests.
//!
//! ```text
//!   ext (external client, no forwarding)
//!    | eth0 192.168.0.10 2001:db8::10
//!    | lo   203.0.113.2 (allowed) 203.0.113.130 (blocked)
//!    |      2001:db8:ff::2 (allowed) 2001:db8:ff::82 (blocked)
//!    |
//!    | eth0 192.168.0.2 192.168.1.2 2001:db8::1 2001:db8:1::2
//!   node (kproxy runs here, forwarding) -- cbr0 10.180.2.254 fd00:10:180:2::fe
//!    | eth1 192.168.2.2 fd00:aa::2            +- lpod1 10.180.2.1 fd00:10:180:2::1
//!    |                                         +- lpod2 10.180.2.2 fd00:10:180:2::2
//!    | eth0 192.168.2.3 fd00:aa::3
//!   node2 (forwarding) -- cbr0 10.180.0.254 fd00:10:180::fe
//!                          +- rpod1 10.180.0.1 fd00:10:180::1
//!                          +- rpod2 10.180.0.2 fd00:10:180::2
//! ```
//!
//! `node` routes everything it does not know (service VIPs in particular) to
//! `ext`, which does not forward: a VIP kproxy does not handle is therefore
//! silently dropped there, as on a real network, rather than refused.
//!
//! The bridges behave like kubelet's: `br_netfilter` is on (the kernel
//! default for new namespaces), so bridged pod traffic crosses the IP
//! netfilter hooks, and every pod port has hairpin mode on so a pod can
//! reach itself through a service VIP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::netns::Netns;
use super::server::Server;

/// Primary node IPv4 address (on `node` eth0, towards `ext`).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
/// Secondary node IPv4 address (also on eth0, in its own subnet).
pub const NODE_IP_SECONDARY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// Primary node IPv6 address.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Secondary node IPv6 address.
pub const NODE_IP6_SECONDARY: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// `node`'s address on the link to `node2` (eth1): the source of traffic
/// masqueraded towards remote pods.
pub const NODE_ETH1_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 2);
pub const NODE_ETH1_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 2);
/// `node`'s pod bridge (cbr0) addresses: gateway of local pods, and the
/// source of traffic masqueraded towards them (hairpin).
pub const NODE_CBR0_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 254);
pub const NODE_CBR0_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 0xfe);

/// `node2`'s address on the node-to-node link.
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 3);
pub const NODE2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 3);
pub const NODE2_CBR0_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 0, 254);
pub const NODE2_CBR0_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 0, 0, 0, 0, 0xfe);

/// `ext`'s address on the node's network (its router-facing address).
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
pub const EXT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// External client address inside [`ALLOWED_SOURCE_RANGE`].
pub const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// External client address outside [`ALLOWED_SOURCE_RANGE`].
pub const EXT_CLIENT_BLOCKED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 130);
pub const EXT_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
pub const EXT_CLIENT6_BLOCKED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x82);
/// All external client addresses (routed to `ext` by `node`).
pub const EXT_CLIENT_CIDR: &str = "203.0.113.0/24";
pub const EXT_CLIENT_CIDR6: &str = "2001:db8:ff::/64";
/// A `loadBalancerSourceRanges` entry admitting [`EXT_CLIENT`] but not
/// [`EXT_CLIENT_BLOCKED`] (and likewise for IPv6).
pub const ALLOWED_SOURCE_RANGE: &str = "203.0.113.0/25";
pub const ALLOWED_SOURCE_RANGE6: &str = "2001:db8:ff::/121";

/// Node subnets (what `--nodeport-addresses` would select).
pub const NODE_CIDR: &str = "192.168.0.0/24";
pub const NODE_CIDR6: &str = "2001:db8::/64";

/// The cluster's pod network (`--cluster-cidr`), and each node's share.
pub const CLUSTER_CIDR: &str = "10.180.0.0/16";
pub const CLUSTER_CIDR6: &str = "fd00:10:180::/48";
pub const LOCAL_POD_CIDR: &str = "10.180.2.0/24";
pub const LOCAL_POD_CIDR6: &str = "fd00:10:180:2::/64";
pub const REMOTE_POD_CIDR: &str = "10.180.0.0/24";
pub const REMOTE_POD_CIDR6: &str = "fd00:10:180::/64";

/// Suggested service CIDRs for test VIPs. Nothing routes them specially:
/// `node`'s default route sends them towards `ext`, where they die.
pub const SERVICE_CIDR: &str = "172.30.0.0/16";
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";

/// The default pods and their addresses.
pub const LPOD1_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 1);
pub const LPOD1_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 1);
pub const LPOD2_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 2);
pub const LPOD2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 2);
pub const RPOD1_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 0, 1);
pub const RPOD1_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 0, 0, 0, 0, 1);
pub const RPOD2_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 0, 2);
pub const RPOD2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 0, 0, 0, 0, 2);

/// Interface names on `node`, for kproxy flags such as
/// `--pod-bridge-interface` / `--pod-interface-name-prefix`.
pub const NODE_EXT_IFACE: &str = "eth0";
pub const NODE_NODE2_IFACE: &str = "eth1";
pub const POD_BRIDGE: &str = "cbr0";
/// Host-side pod veths are named `veth<pod name>` (as kubelet's are `veth*`).
pub const POD_VETH_PREFIX: &str = "veth";

/// Ports every pod serves (TCP, UDP and SCTP) unless configured otherwise.
pub const DEFAULT_PORTS: &[u16] = &[80, 443, 8080, 8443, 53, 5353, 3001];

/// Which node a pod runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PodHost {
    /// `node`, where kproxy runs: the pod's endpoints are local.
    Node,
    /// `node2`: the pod's endpoints are remote.
    Node2,
}

/// A pod: its own namespace with `eth0` on its node's bridge, and a
/// [`Server`] answering on its addresses.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub host: PodHost,
    /// The pod's veth in the node namespace (a port of `cbr0`).
    pub host_ifname: String,
    // Declared before `ns`: fields drop in order, and the responders should
    // stop before the namespace is deleted.
    pub server: Server,
    pub ns: Netns,
}

impl Pod {
    /// The pod namespace, e.g. to probe from it.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The pod's address in the family of `ipv6`.
    pub fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }

    /// `ipv4:port`.
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ipv4, port))
    }

    /// `[ipv6]:port`.
    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ipv6, port))
    }

    pub fn is_local(&self) -> bool {
        self.host == PodHost::Node
    }
}

/// The whole network; everything is torn down on drop.
#[derive(Debug)]
pub struct Topology {
    // Pods drop first: their veths hang off the nodes' bridges.
    pods: Vec<Pod>,
    /// Where kproxy runs.
    pub node: Netns,
    /// The other node, hosting the remote pods.
    pub node2: Netns,
    /// An external client / the upstream router.
    pub ext: Netns,
    ports: Vec<u16>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Topology {
    /// The standard topology: nodes, `ext`, and pods `lpod1`, `lpod2` (on
    /// `node`) and `rpod1`, `rpod2` (on `node2`), each serving
    /// [`DEFAULT_PORTS`].
    pub fn new() -> Topology {
        Topology::with_ports(DEFAULT_PORTS)
    }

    /// The standard topology with pods serving `ports` instead.
    pub fn with_ports(ports: &[u16]) -> Topology {
        let mut topo = Topology::without_pods(ports);
        topo.add_local_pod("lpod1", LPOD1_IP, LPOD1_IP6);
        topo.add_local_pod("lpod2", LPOD2_IP, LPOD2_IP6);
        topo.add_remote_pod("rpod1", RPOD1_IP, RPOD1_IP6);
        topo.add_remote_pod("rpod2", RPOD2_IP, RPOD2_IP6);
        topo
    }

    /// Nodes and `ext` only; pods added later with [`Topology::add_local_pod`]
    /// and [`Topology::add_remote_pod`] serve `ports`.
    pub fn without_pods(ports: &[u16]) -> Topology {
        let node = Netns::new("node");
        let node2 = Netns::new("node2");
        let ext = Netns::new("ext");
        let router = [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // Node traffic hairpinning out of the interface it came in on
            // (ext -> VIP -> ext) must not teach ext shortcuts.
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ];
        node.sysctl(&router);
        node2.sysctl(&router);

        let (n2, x) = (node2.name(), ext.name());
        node.ip_batch(&[
            format!("link add eth0 type veth peer name eth0 netns {x}"),
            format!("link add eth1 type veth peer name eth0 netns {n2}"),
            bridge_cmd("02:00:0a:b4:02:fe"),
            format!("addr add {NODE_IP}/24 dev eth0"),
            format!("addr add {NODE_IP_SECONDARY}/24 dev eth0"),
            format!("addr add {NODE_IP6}/64 dev eth0 nodad"),
            format!("addr add {NODE_IP6_SECONDARY}/64 dev eth0 nodad"),
            format!("addr add {NODE_ETH1_IP}/24 dev eth1"),
            format!("addr add {NODE_ETH1_IP6}/64 dev eth1 nodad"),
            format!("addr add {NODE_CBR0_IP}/24 dev cbr0"),
            format!("addr add {NODE_CBR0_IP6}/64 dev cbr0 nodad"),
            "link set eth0 up".into(),
            "link set eth1 up".into(),
            "link set cbr0 up".into(),
            format!("route add default via {EXT_IP} dev eth0"),
            format!("route add ::/0 via {EXT_IP6} dev eth0"),
            format!("route add {REMOTE_POD_CIDR} via {NODE2_IP} dev eth1"),
            format!("route add {REMOTE_POD_CIDR6} via {NODE2_IP6} dev eth1"),
            format!("route add {EXT_CLIENT_CIDR} via {EXT_IP} dev eth0"),
            format!("route add {EXT_CLIENT_CIDR6} via {EXT_IP6} dev eth0"),
        ]);
        ext.ip_batch(&[
            format!("addr add {EXT_IP}/24 dev eth0"),
            format!("addr add {EXT_IP6}/64 dev eth0 nodad"),
            format!("addr add {EXT_CLIENT}/32 dev lo"),
            format!("addr add {EXT_CLIENT_BLOCKED}/32 dev lo"),
            format!("addr add {EXT_CLIENT6}/128 dev lo nodad"),
            format!("addr add {EXT_CLIENT6_BLOCKED}/128 dev lo nodad"),
            "link set eth0 up".into(),
            format!("route add default via {NODE_IP} dev eth0"),
            format!("route add ::/0 via {NODE_IP6} dev eth0"),
        ]);
        node2.ip_batch(&[
            bridge_cmd("02:00:0a:b4:00:fe"),
            format!("addr add {NODE2_IP}/24 dev eth0"),
            format!("addr add {NODE2_IP6}/64 dev eth0 nodad"),
            format!("addr add {NODE2_CBR0_IP}/24 dev cbr0"),
            format!("addr add {NODE2_CBR0_IP6}/64 dev cbr0 nodad"),
            "link set eth0 up".into(),
            "link set cbr0 up".into(),
            format!("route add default via {NODE_ETH1_IP} dev eth0"),
            format!("route add ::/0 via {NODE_ETH1_IP6} dev eth0"),
        ]);
        Topology {
            pods: Vec::new(),
            node,
            node2,
            ext,
            ports: ports.to_vec(),
        }
    }

    /// Adds a pod on `node` (a local endpoint for kproxy). Its addresses
    /// must lie in [`LOCAL_POD_CIDR`] / [`LOCAL_POD_CIDR6`].
    pub fn add_local_pod(&mut self, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> &Pod {
        self.add_pod(PodHost::Node, name, ipv4, ipv6)
    }

    /// Adds a pod on `node2` (a remote endpoint for kproxy). Its addresses
    /// must lie in [`REMOTE_POD_CIDR`] / [`REMOTE_POD_CIDR6`].
    pub fn add_remote_pod(&mut self, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> &Pod {
        self.add_pod(PodHost::Node2, name, ipv4, ipv6)
    }

    fn add_pod(&mut self, host: PodHost, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> &Pod {
        assert!(
            self.pods.iter().all(|p| p.name != name),
            "pod {name} already exists"
        );
        let (host_ns, gw4, gw6, cidr4, cidr6) = match host {
            PodHost::Node => (
                &self.node,
                NODE_CBR0_IP,
                NODE_CBR0_IP6,
                LOCAL_POD_CIDR,
                LOCAL_POD_CIDR6,
            ),
            PodHost::Node2 => (
                &self.node2,
                NODE2_CBR0_IP,
                NODE2_CBR0_IP6,
                REMOTE_POD_CIDR,
                REMOTE_POD_CIDR6,
            ),
        };
        // Routing on the nodes only knows these subnets; anything else would
        // be silently unreachable, so refuse it here with a clear message.
        assert!(
            same_subnet(ipv4.into(), gw4.into(), 24) && same_subnet(ipv6.into(), gw6.into(), 64),
            "pod {name} ({ipv4}, {ipv6}) must be inside {cidr4} and {cidr6}"
        );
        let ns = Netns::new(name);
        // Kubelet names host-side veths "veth..."; keep within IFNAMSIZ.
        let mut host_ifname = format!("{POD_VETH_PREFIX}{name}");
        if host_ifname.len() > 15 {
            host_ifname = format!("{POD_VETH_PREFIX}{}", self.pods.len());
        }
        host_ns.ip_batch(&[
            format!(
                "link add {host_ifname} type veth peer name eth0 netns {}",
                ns.name()
            ),
            format!("link set {host_ifname} master cbr0"),
            format!("link set {host_ifname} type bridge_slave hairpin on"),
            format!("link set {host_ifname} up"),
        ]);
        ns.ip_batch(&[
            format!("addr add {ipv4}/24 dev eth0"),
            format!("addr add {ipv6}/64 dev eth0 nodad"),
            "link set eth0 up".into(),
            format!("route add default via {gw4} dev eth0"),
            format!("route add ::/0 via {gw6} dev eth0"),
        ]);
        let server = Server::start(&ns, &[ipv4.into(), ipv6.into()], &self.ports);
        self.pods.push(Pod {
            name: name.to_string(),
            ipv4,
            ipv6,
            host,
            host_ifname,
            server,
            ns,
        });
        self.pods.last().expect("a pod was just pushed")
    }

    /// The pod called `name`; panics (listing the pods) if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| {
                let names: Vec<_> = self.pods.iter().map(|p| p.name.as_str()).collect();
                panic!("no pod {name} in topology (have {names:?})")
            })
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pods on `node`.
    pub fn local_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(|p| p.is_local())
    }

    /// Pods on `node2`.
    pub fn remote_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(|p| !p.is_local())
    }

    /// Every namespace of the topology.
    pub fn namespaces(&self) -> Vec<&Netns> {
        [&self.node, &self.node2, &self.ext]
            .into_iter()
            .chain(self.pods.iter().map(|p| &p.ns))
            .collect()
    }

    /// State of the routers (`node`, `node2`): addresses, routes, ruleset and
    /// conntrack, for assertion messages.
    pub fn diagnostics(&self) -> String {
        self.node.diagnostics() + &self.node2.diagnostics()
    }
}

/// A pod bridge with a fixed MAC (a bridge otherwise takes the lowest MAC of
/// its ports, so adding a pod later would change the gateway's MAC under
/// the other pods' neighbour caches), no STP (ports forward at once) and no
/// multicast snooping (IPv6 neighbour discovery needs no querier).
fn bridge_cmd(mac: &str) -> String {
    format!("link add cbr0 address {mac} type bridge stp_state 0 mcast_snooping 0")
}

/// Whether `a` and `b` share their first `bits` bits.
fn same_subnet(a: IpAddr, b: IpAddr, bits: u32) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}
