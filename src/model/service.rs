//! Service objects to service ports, per IP family, with validation.

use super::InvalidObject;
use crate::ip::{parse_cidr, parse_ip};
use k8s_openapi::api::core::v1::Service;
use kproxy_backend_api::{
    IpFamily, Protocol, ServiceName, ServicePort, ServicePortName, TrafficPolicy,
};
use std::net::IpAddr;

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

/// What a valid Service contributes: its ports for each family. Empty for services
/// kube-proxy ignores (headless, ExternalName, no ClusterIP yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub ports: Vec<ServicePort>,
}

fn invalid(svc: &Service, reason: String) -> InvalidObject {
    InvalidObject::new("Service", &svc.metadata, reason)
}

/// Converts a Service. An invalid field rejects the whole Service, with a reason naming
/// the field; nothing half-valid is ever programmed.
pub fn service_ports(svc: &Service) -> Result<ServiceInfo, InvalidObject> {
    let name = ServiceName::new(
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    if name.name.is_empty() {
        return Err(invalid(svc, "metadata.name is empty".into()));
    }
    let Some(spec) = &svc.spec else {
        return Ok(ServiceInfo::default());
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(ServiceInfo::default());
    }
    let mut cluster_ips: Vec<&str> = spec
        .cluster_ips
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_deref());
    }
    if cluster_ips.is_empty() || cluster_ips.contains(&"None") {
        // Not allocated yet, or headless: nothing to proxy.
        return Ok(ServiceInfo::default());
    }
    let mut parsed_cluster_ips = Vec::new();
    for ip in cluster_ips {
        let parsed = parse_ip(ip)
            .ok_or_else(|| invalid(svc, format!("spec.clusterIPs: invalid IP {ip:?}")))?;
        parsed_cluster_ips.push(parsed);
    }
    let ips = |field: &str, list: Option<&Vec<String>>| -> Result<Vec<IpAddr>, InvalidObject> {
        list.map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|s| parse_ip(s).ok_or_else(|| invalid(svc, format!("{field}: invalid IP {s:?}"))))
            .collect()
    };
    let external_ips = ips("spec.externalIPs", spec.external_ips.as_ref())?;
    let is_lb = svc_type == "LoadBalancer";
    let mut lb_ips = Vec::new();
    if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for ing in ingress.map(Vec::as_slice).unwrap_or_default() {
            // ipMode Proxy: the LB delivers to the node itself, so the VIP must not be
            // short-circuited here.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                let parsed = parse_ip(ip).ok_or_else(|| {
                    invalid(
                        svc,
                        format!("status.loadBalancer.ingress.ip: invalid IP {ip:?}"),
                    )
                })?;
                lb_ips.push(parsed);
            }
        }
    }
    let mut source_ranges = Vec::new();
    for r in spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default()
    {
        let net = parse_cidr(r).ok_or_else(|| {
            invalid(
                svc,
                format!("spec.loadBalancerSourceRanges: invalid CIDR {r:?}"),
            )
        })?;
        source_ranges.push(net);
    }
    let affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS as i32);
            if !(1..=86400).contains(&t) {
                return Err(invalid(
                    svc,
                    format!("spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is not in 1..=86400"),
                ));
            }
            Some(t as u32)
        }
        None | Some("None") => None,
        Some(other) => {
            return Err(invalid(
                svc,
                format!("spec.sessionAffinity: unknown value {other:?}"),
            ))
        }
    };
    let policy = |field: &str, v: Option<&str>| match v {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(invalid(svc, format!("{field}: unknown value {other:?}"))),
    };
    let node_port_capable = is_lb || svc_type == "NodePort";
    let external_policy = policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    let internal_policy = policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if is_lb && external_policy == TrafficPolicy::Local && p != 0 => {
            Some(port_number(p).ok_or_else(|| {
                invalid(
                    svc,
                    format!("spec.healthCheckNodePort: {p} is out of range"),
                )
            })?)
        }
        _ => None,
    };

    let mut out = ServiceInfo::default();
    let mut seen = std::collections::BTreeSet::new();
    for (i, sp) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
        let proto_text = sp.protocol.as_deref().unwrap_or("TCP");
        let protocol = Protocol::from_k8s(proto_text).ok_or_else(|| {
            invalid(
                svc,
                format!("spec.ports[{i}].protocol: unknown protocol {proto_text:?}"),
            )
        })?;
        let port = port_number(sp.port).ok_or_else(|| {
            invalid(
                svc,
                format!("spec.ports[{i}].port: {} is out of range 1-65535", sp.port),
            )
        })?;
        let node_port = match sp.node_port {
            Some(np) if node_port_capable && np != 0 => Some(port_number(np).ok_or_else(|| {
                invalid(
                    svc,
                    format!("spec.ports[{i}].nodePort: {np} is out of range"),
                )
            })?),
            _ => None,
        };
        let port_name = sp.name.clone().unwrap_or_default();
        if !seen.insert((port_name.clone(), protocol)) {
            return Err(invalid(
                svc,
                format!("spec.ports[{i}]: duplicate port name {port_name:?} for {protocol}"),
            ));
        }
        for family in IpFamily::ALL {
            let Some(cluster_ip) = parsed_cluster_ips
                .iter()
                .find(|ip| IpFamily::of(ip) == family)
            else {
                continue;
            };
            let of_family = |v: &[IpAddr]| -> Vec<IpAddr> {
                v.iter()
                    .copied()
                    .filter(|ip| IpFamily::of(ip) == family)
                    .collect()
            };
            out.ports.push(ServicePort {
                name: ServicePortName::new(name.clone(), port_name.clone(), protocol),
                family,
                cluster_ip: *cluster_ip,
                port,
                node_port,
                external_ips: of_family(&external_ips),
                load_balancer_ips: of_family(&lb_ips),
                source_ranges: source_ranges
                    .iter()
                    .copied()
                    .filter(|n| IpFamily::of(&n.addr()) == family)
                    .collect(),
                session_affinity_seconds: affinity,
                external_policy,
                internal_policy,
                health_check_node_port,
            });
        }
    }
    Ok(out)
}

fn port_number(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}
