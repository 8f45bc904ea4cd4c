//! EndpointSlices to endpoints per service port: merged across slices, deduplicated,
//! sorted.

use super::InvalidObject;
use crate::ip::parse_ip;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_backend_api::{Endpoint, IpFamily, Protocol, ServiceName};
use std::collections::BTreeMap;

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The endpoints one slice contributes, keyed by (port name, protocol).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: Option<ServiceName>,
    pub family: Option<IpFamily>,
    pub ports: BTreeMap<(String, Protocol), Vec<Endpoint>>,
}

fn invalid(slice: &EndpointSlice, reason: String) -> InvalidObject {
    InvalidObject::new("EndpointSlice", &slice.metadata, reason)
}

/// Converts one slice. Slices without the service-name label or of address type FQDN
/// contribute nothing; an invalid address or port rejects the slice.
pub fn slice_endpoints(slice: &EndpointSlice, node_name: &str) -> Result<SliceInfo, InvalidObject> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(|svc| {
            ServiceName::new(
                slice
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                svc.clone(),
            )
        });
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(SliceInfo::default()),
        other => {
            return Err(invalid(
                slice,
                format!("addressType: unknown value {other:?}"),
            ))
        }
    };
    let Some(service) = service else {
        return Ok(SliceInfo::default());
    };
    let listed = slice.endpoints.as_deref().unwrap_or_default();
    let mut endpoints = Vec::with_capacity(listed.len());
    for (i, ep) in listed.iter().enumerate() {
        // Only the first address is used, as upstream does.
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let ip = parse_ip(addr).ok_or_else(|| {
            invalid(
                slice,
                format!("endpoints[{i}].addresses: invalid IP {addr:?}"),
            )
        })?;
        if IpFamily::of(&ip) != family {
            return Err(invalid(
                slice,
                format!(
                    "endpoints[{i}].addresses: {addr} is not an {} address",
                    family.label()
                ),
            ));
        }
        let cond = ep.conditions.as_ref();
        let mut zone_hints: Vec<String> = ep
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.clone()).collect())
            .unwrap_or_default();
        zone_hints.sort();
        let mut node_hints: Vec<String> = ep
            .hints
            .as_ref()
            .and_then(|h| h.for_nodes.as_ref())
            .map(|n| n.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default();
        node_hints.sort();
        endpoints.push(Endpoint {
            ip,
            port: 0,
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            is_local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            zone_hints,
            node_hints,
        });
    }
    let mut ports = BTreeMap::new();
    for (i, p) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let proto_text = p.protocol.as_deref().unwrap_or("TCP");
        let protocol = Protocol::from_k8s(proto_text).ok_or_else(|| {
            invalid(
                slice,
                format!("ports[{i}].protocol: unknown protocol {proto_text:?}"),
            )
        })?;
        let Some(number) = p.port else { continue };
        let port = u16::try_from(number)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(
                    slice,
                    format!("ports[{i}].port: {number} is out of range 1-65535"),
                )
            })?;
        let eps = endpoints.iter().cloned().map(|mut e| {
            e.port = port;
            e
        });
        ports
            .entry((p.name.clone().unwrap_or_default(), protocol))
            .or_insert_with(Vec::new)
            .extend(eps);
    }
    Ok(SliceInfo {
        service: Some(service),
        family: Some(family),
        ports,
    })
}

/// Merges one port's endpoints from all slices of a service: the same `ip:port` listed
/// twice keeps the non-terminating entry; the result is sorted by `ip:port` text as
/// upstream sorts it, so load-balancing order is stable.
pub fn merge<'a>(lists: impl IntoIterator<Item = &'a [Endpoint]>) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<String, Endpoint> = BTreeMap::new();
    for ep in lists.into_iter().flatten() {
        let key = ep.socket_addr().to_string();
        match by_addr.get(&key) {
            Some(existing) if !existing.terminating || ep.terminating => {}
            _ => {
                by_addr.insert(key, ep.clone());
            }
        }
    }
    by_addr.into_values().collect()
}
