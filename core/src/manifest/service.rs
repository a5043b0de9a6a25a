//! The Service converter: a `v1.Service` validated as the API server validates it
//! (`ValidateService` in `pkg/apis/core/validation`) and defaulted as it defaults it, then
//! turned into the model's [`Service`]. One function per group of rules: identity and
//! type, selector, cluster IPs and families, ports and node ports, external addresses and
//! load balancer fields, session affinity, traffic policies.
//!
//! Role in the loader: a converter, like the Pod, workload and EndpointSlice converters
//! in the parent module; allocation of what a Service leaves out (cluster IPs, node ports)
//! and clashes between Services are the Builder's business, later.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Converted, Ctx, NameRule, Object, ValidateError, dns_label_error, dns_subdomain_error,
    port_name_error, timestamp,
};
use crate::model::*;

/// Converts a Service; any error leaves it out.
pub(super) fn convert_service(s: corev1::Service, mut ctx: Ctx<'_>) -> Converted {
    let md = &s.metadata;
    let name = md.name.clone().unwrap_or_default();
    // "a DNS-1035 label": a Service's name becomes a DNS label of its own.
    ctx.check_name("metadata.name", &name, NameRule::Label1035);
    let namespace = ctx.namespace(md);
    let mut svc = Service::new(ObjectName::new(namespace, name));
    svc.labels = ctx.labels("metadata.labels", md.labels.as_ref());
    svc.annotations = md.annotations.clone().unwrap_or_default();
    svc.created = timestamp(md.creation_timestamp.as_ref());
    let spec = s.spec.unwrap_or_default();
    let Some(ty) = service_type(&mut ctx, &spec) else {
        return (None, ctx.errors);
    };
    svc.service_type = ty;
    selector(&mut ctx, &spec, &mut svc);
    cluster_ips(&mut ctx, &spec, &mut svc);
    ip_families(&mut ctx, &spec, &mut svc);
    ports(&mut ctx, &spec, &mut svc);
    external_addresses(&mut ctx, &spec, s.status.as_ref(), &mut svc);
    session_affinity(&mut ctx, &spec, &mut svc);
    traffic_policies(&mut ctx, &spec, &mut svc);
    svc.publish_not_ready_addresses = spec.publish_not_ready_addresses.unwrap_or(false);
    if let Some(td) = spec.traffic_distribution.as_deref() {
        match TrafficDistribution::parse(td) {
            Some(t) => svc.traffic_distribution = Some(t),
            None => ctx.err(
                "spec.trafficDistribution",
                ValidateError::Unsupported {
                    value: td.to_string(),
                    supported: "\"PreferClose\", \"PreferSameNode\", \"PreferSameZone\"",
                },
            ),
        }
    }
    ctx.finish(Object::Service(svc))
}

/// `spec.type`: "ClusterIP" when absent; an unknown type stops the conversion, since every
/// later rule depends on it.
fn service_type(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec) -> Option<ServiceType> {
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => Some(ServiceType::ClusterIp),
        Some("NodePort") => Some(ServiceType::NodePort),
        Some("LoadBalancer") => Some(ServiceType::LoadBalancer),
        Some("ExternalName") => Some(ServiceType::ExternalName),
        Some(other) => {
            ctx.err(
                "spec.type",
                ValidateError::Unsupported {
                    value: other.to_string(),
                    supported: "\"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"",
                },
            );
            None
        }
    }
}

/// `spec.selector`: "Route service traffic to pods with label keys and values matching
/// this selector. If empty or not present, the service is assumed to have an external
/// process managing its endpoints" (matchLabels only; keys and values are label syntax).
fn selector(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    if let Some(sel) = spec.selector.as_ref().filter(|m| !m.is_empty()) {
        let labels = ctx.labels("spec.selector", Some(sel));
        svc.selector = Some(LabelSelector::from_labels(labels));
    }
}

/// `spec.clusterIP` and `spec.clusterIPs`: "clusterIPs[0] must be equal to clusterIP";
/// ExternalName Services have none and need `spec.externalName`; "None" (headless) stands
/// alone and only for type ClusterIP; otherwise valid addresses, at most one per family.
fn cluster_ips(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    let ty = svc.service_type;
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if let Some(primary) = spec.cluster_ip.as_ref().filter(|s| !s.is_empty()) {
        match ips.first() {
            None => ips.push(primary.clone()),
            Some(first) if first != primary => ctx.err(
                "spec.clusterIPs[0]",
                ValidateError::Invalid {
                    value: first.clone(),
                    reason: format!("must be equal to spec.clusterIP ({primary})"),
                },
            ),
            _ => {}
        }
    }
    if ty == ServiceType::ExternalName {
        // "may not be set for type ExternalName" ("None" is tolerated, as it allocates
        // nothing).
        if !ips.is_empty() && ips.iter().any(|ip| ip != "None") {
            ctx.err(
                "spec.clusterIP",
                ValidateError::Forbidden("may not be set for type ExternalName".into()),
            );
        }
        external_name(ctx, spec, svc);
    } else if ips.first().map(String::as_str) == Some("None") {
        svc.headless = true;
        if ips.len() > 1 {
            ctx.err(
                "spec.clusterIPs",
                ValidateError::Invalid {
                    value: ips.join(","),
                    reason: "a headless service must have only \"None\"".into(),
                },
            );
        }
        if ty != ServiceType::ClusterIp {
            ctx.err(
                "spec.clusterIP",
                ValidateError::Invalid {
                    value: "None".into(),
                    reason: format!("may not be set to 'None' for {} services", ty.as_str()),
                },
            );
        }
    } else {
        for (i, s) in ips.iter().enumerate() {
            let field = if i == 0 {
                "spec.clusterIP".to_string()
            } else {
                format!("spec.clusterIPs[{i}]")
            };
            let Some(ip) = ctx.ip(&field, s) else {
                continue;
            };
            // Dual stack: "may not be of the same IP family as another clusterIP".
            if svc
                .cluster_ips
                .iter()
                .any(|o| IpFamily::of(o) == IpFamily::of(&ip))
            {
                ctx.err(
                    field,
                    ValidateError::Invalid {
                        value: s.clone(),
                        reason: "may not be of the same IP family as another clusterIP".into(),
                    },
                );
            } else {
                svc.cluster_ips.push(ip);
            }
        }
    }
}

/// `spec.externalName` of an ExternalName Service: required, "a lowercase RFC 1123
/// subdomain" once a trailing dot is dropped (case does not matter in DNS).
fn external_name(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    match spec.external_name.as_deref() {
        None | Some("") => ctx.err("spec.externalName", ValidateError::Required),
        Some(n) => {
            let n = n.trim_end_matches('.');
            if let Some(reason) = dns_subdomain_error(&n.to_ascii_lowercase()) {
                ctx.err(
                    "spec.externalName",
                    ValidateError::Invalid {
                        value: n.to_string(),
                        reason,
                    },
                );
            }
            svc.external_name = Some(n.to_string());
        }
    }
}

/// `spec.ipFamilies` and `spec.ipFamilyPolicy`: "IPv4" or "IPv6", each once; SingleStack
/// (the default) allows one family and one cluster IP; "ipFamilies[i]" must match the
/// family of "clusterIPs[i]". When ipFamilies is absent the API server defaults it from
/// the cluster IPs ("the ipFamilies field ... is set based on clusterIPs"), so a Service
/// that names its cluster IPs is proxied on their families.
fn ip_families(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        let fam = match f.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            other => {
                ctx.err(
                    format!("spec.ipFamilies[{i}]"),
                    ValidateError::Unsupported {
                        value: other.to_string(),
                        supported: "\"IPv4\", \"IPv6\"",
                    },
                );
                continue;
            }
        };
        if svc.ip_families.contains(&fam) {
            ctx.err(
                format!("spec.ipFamilies[{i}]"),
                ValidateError::Duplicate(f.clone()),
            );
        } else {
            svc.ip_families.push(fam);
        }
    }
    svc.ip_family_policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => IpFamilyPolicy::SingleStack,
        Some("PreferDualStack") => IpFamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => IpFamilyPolicy::RequireDualStack,
        Some(other) => {
            ctx.err(
                "spec.ipFamilyPolicy",
                ValidateError::Unsupported {
                    value: other.to_string(),
                    supported: "\"PreferDualStack\", \"RequireDualStack\", \"SingleStack\"",
                },
            );
            IpFamilyPolicy::SingleStack
        }
    };
    if svc.ip_family_policy == IpFamilyPolicy::SingleStack
        && (svc.ip_families.len() > 1 || svc.cluster_ips.len() > 1)
    {
        ctx.err(
            "spec.ipFamilyPolicy",
            ValidateError::Invalid {
                value: "SingleStack".into(),
                reason: "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified".into(),
            },
        );
    }
    for (i, ip) in svc.cluster_ips.iter().enumerate() {
        if let Some(f) = svc.ip_families.get(i)
            && *f != IpFamily::of(ip)
        {
            ctx.err(
                format!("spec.ipFamilies[{i}]"),
                ValidateError::Invalid {
                    value: f.as_str().into(),
                    reason: format!("does not match the family of clusterIPs[{i}] ({ip})"),
                },
            );
        }
    }
    if svc.ip_families.is_empty() {
        svc.ip_families = svc.cluster_ips.iter().map(IpFamily::of).collect();
    }
}

/// Uniqueness across a Service's ports: names, (port, protocol), (nodePort, protocol).
#[derive(Default)]
struct SeenPorts {
    names: BTreeSet<String>,
    ports: BTreeSet<(u16, Protocol)>,
    node_ports: BTreeSet<(u16, Protocol)>,
}

/// `spec.ports`: required unless the Service is headless or ExternalName; each port is
/// checked by [`service_port`].
fn ports(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && svc.service_type != ServiceType::ExternalName && !svc.headless {
        ctx.err("spec.ports", ValidateError::Required);
    }
    let mut seen = SeenPorts::default();
    for (i, p) in ports.iter().enumerate() {
        if let Some(sp) = service_port(ctx, i, p, ports.len(), svc.service_type, &mut seen) {
            svc.ports.push(sp);
        }
    }
}

/// One `spec.ports[i]`: "name" required when there are several ports, a DNS-1123 label,
/// unique; protocol TCP, UDP or SCTP; port 1-65535, unique with its protocol; then its
/// targetPort and nodePort.
fn service_port(
    ctx: &mut Ctx<'_>,
    i: usize,
    p: &corev1::ServicePort,
    count: usize,
    ty: ServiceType,
    seen: &mut SeenPorts,
) -> Option<ServicePort> {
    let f = format!("spec.ports[{i}]");
    let name = p.name.clone().unwrap_or_default();
    if count > 1 && name.is_empty() {
        ctx.err(format!("{f}.name"), ValidateError::Required);
    }
    if !name.is_empty() {
        if let Some(reason) = dns_label_error(&name, false) {
            ctx.err(
                format!("{f}.name"),
                ValidateError::Invalid {
                    value: name.clone(),
                    reason,
                },
            );
        }
        if !seen.names.insert(name.clone()) {
            ctx.err(
                format!("{f}.name"),
                ValidateError::Duplicate(format!("{name:?}")),
            );
        }
    }
    let protocol = ctx.protocol(&format!("{f}.protocol"), p.protocol.as_ref())?;
    let port = ctx.port(&format!("{f}.port"), p.port)?;
    if !seen.ports.insert((port, protocol)) {
        ctx.err(
            f.clone(),
            ValidateError::Duplicate(format!("{{\"Port\":{port},\"Protocol\":\"{protocol}\"}}")),
        );
    }
    let target_port = target_port(ctx, &f, p.target_port.as_ref(), port)?;
    let node_port = node_port(ctx, &f, p.node_port, ty, protocol, seen);
    Some(ServicePort {
        name,
        protocol,
        port,
        target_port,
        node_port,
        app_protocol: p.app_protocol.clone(),
    })
}

/// `targetPort`: defaults to `port`; "Number must be in the range 1 to 65535. Name must be
/// an IANA_SVC_NAME". `None` (after reporting) when invalid.
fn target_port(
    ctx: &mut Ctx<'_>,
    f: &str,
    target: Option<&IntOrString>,
    port: u16,
) -> Option<TargetPort> {
    let field = format!("{f}.targetPort");
    match target {
        None => Some(TargetPort::Number(port)),
        Some(IntOrString::Int(n)) => ctx.port(&field, *n).map(TargetPort::Number),
        // A string of digits is a number in YAML written as a string.
        Some(IntOrString::String(s)) => match s.parse::<i32>() {
            Ok(n) => ctx.port(&field, n).map(TargetPort::Number),
            Err(_) => match port_name_error(s) {
                Some(reason) => {
                    ctx.err(
                        field,
                        ValidateError::Invalid {
                            value: s.clone(),
                            reason,
                        },
                    );
                    None
                }
                None => Some(TargetPort::Name(s.clone())),
            },
        },
    }
}

/// `nodePort`: only for NodePort and LoadBalancer Services ("may not be used when `type`
/// is 'ClusterIP'"), inside the node port range, unique with its protocol. 0 or absent
/// means "allocate one" (the Builder does).
fn node_port(
    ctx: &mut Ctx<'_>,
    f: &str,
    node_port: Option<i32>,
    ty: ServiceType,
    protocol: Protocol,
    seen: &mut SeenPorts,
) -> Option<u16> {
    let np = node_port.filter(|np| *np != 0)?;
    let field = format!("{f}.nodePort");
    if !ty.has_node_ports() {
        ctx.err(
            field,
            ValidateError::Forbidden(format!("may not be used when `type` is '{}'", ty.as_str())),
        );
        return None;
    }
    let (min, max) = ctx.config.node_port_range;
    match u16::try_from(np) {
        Ok(v) if (min..=max).contains(&v) => {
            if !seen.node_ports.insert((v, protocol)) {
                ctx.err(field, ValidateError::Duplicate(format!("{v}")));
            }
            Some(v)
        }
        _ => {
            ctx.err(
                field,
                ValidateError::NodePortOutOfRange {
                    value: np.into(),
                    min,
                    max,
                },
            );
            None
        }
    }
}

/// `spec.externalIPs` (valid, neither unspecified nor loopback), `spec.loadBalancerIP`
/// and `status.loadBalancer.ingress[].ip` (the addresses a load balancer serves; the
/// requested one until a status says otherwise), `spec.loadBalancerSourceRanges` (CIDRs).
/// The load balancer fields "may only be used when `type` is 'LoadBalancer'".
fn external_addresses(
    ctx: &mut Ctx<'_>,
    spec: &corev1::ServiceSpec,
    status: Option<&corev1::ServiceStatus>,
    svc: &mut Service,
) {
    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        let Some(ip) = ctx.ip(&field, s) else {
            continue;
        };
        if ip.is_unspecified() || ip.is_loopback() {
            ctx.err(
                field,
                ValidateError::Invalid {
                    value: s.clone(),
                    reason: "may not be unspecified or loopback".into(),
                },
            );
        } else {
            svc.external_ips.push(ip);
        }
    }
    if let Some(s) = spec.load_balancer_ip.as_ref().filter(|s| !s.is_empty()) {
        svc.requested_load_balancer_ip = ctx.ip("spec.loadBalancerIP", s);
    }
    let ingress = status
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // "ipMode: Proxy": the load balancer sends the traffic to the node with the node's
        // address as destination; kube-proxy writes no rule for the ingress IP.
        let proxy_mode = match ing.ip_mode.as_deref() {
            None | Some("VIP") => false,
            Some("Proxy") => true,
            Some(other) => {
                ctx.err(
                    format!("status.loadBalancer.ingress[{i}].ipMode"),
                    ValidateError::Unsupported {
                        value: other.to_string(),
                        supported: "\"Proxy\", \"VIP\"",
                    },
                );
                false
            }
        };
        if let Some(s) = &ing.ip
            && let Some(ip) = ctx.ip(&format!("status.loadBalancer.ingress[{i}].ip"), s)
        {
            let list = if proxy_mode {
                &mut svc.load_balancer_proxy_ips
            } else {
                &mut svc.load_balancer_ips
            };
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    if svc.load_balancer_ips.is_empty()
        && svc.load_balancer_proxy_ips.is_empty()
        && let Some(ip) = svc.requested_load_balancer_ip
    {
        svc.load_balancer_ips.push(ip);
    }
    let is_lb = svc.service_type == ServiceType::LoadBalancer;
    if !svc.load_balancer_ips.is_empty() && !is_lb {
        ctx.err(
            "spec.loadBalancerIP",
            ValidateError::Forbidden("may only be used when `type` is 'LoadBalancer'".into()),
        );
    }
    let ranges = spec.load_balancer_source_ranges.iter().flatten();
    for (i, s) in ranges.enumerate() {
        if let Some(n) = ctx.cidr(&format!("spec.loadBalancerSourceRanges[{i}]"), s) {
            svc.load_balancer_source_ranges.push(n);
        }
    }
    if !svc.load_balancer_source_ranges.is_empty() && !is_lb {
        ctx.err(
            "spec.loadBalancerSourceRanges",
            ValidateError::Forbidden("may only be used when `type` is 'LoadBalancer'".into()),
        );
    }
}

/// `spec.sessionAffinity` "None" (default) or "ClientIP"; `sessionAffinityConfig` "must
/// not be set when session affinity is None"; its timeout "must be greater than 0 and less
/// than 86400" and defaults to 10800 seconds.
fn session_affinity(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    let client_ip = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref());
    match spec.session_affinity.as_deref() {
        None | Some("None") => {
            if client_ip.is_some() {
                ctx.err(
                    "spec.sessionAffinityConfig",
                    ValidateError::Forbidden(
                        "must not be set when session affinity is None".into(),
                    ),
                );
            }
        }
        Some("ClientIP") => {
            let timeout = match client_ip.and_then(|c| c.timeout_seconds) {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) if t > 0 && (t as u32) <= MAX_AFFINITY_TIMEOUT => t as u32,
                Some(t) => {
                    ctx.err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        ValidateError::Invalid {
                            value: t.to_string(),
                            reason: format!(
                                "must be greater than 0 and less than {MAX_AFFINITY_TIMEOUT}"
                            ),
                        },
                    );
                    DEFAULT_AFFINITY_TIMEOUT
                }
            };
            svc.session_affinity = SessionAffinity::ClientIp {
                timeout_seconds: timeout,
            };
        }
        Some(other) => ctx.err(
            "spec.sessionAffinity",
            ValidateError::Unsupported {
                value: other.to_string(),
                supported: "\"ClientIP\", \"None\"",
            },
        ),
    }
}

/// One traffic policy: "Cluster" (default) or "Local".
fn traffic_policy(ctx: &mut Ctx<'_>, field: &str, v: Option<&str>) -> TrafficPolicy {
    match v {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            ctx.err(
                field,
                ValidateError::Unsupported {
                    value: other.to_string(),
                    supported: "\"Cluster\", \"Local\"",
                },
            );
            TrafficPolicy::Cluster
        }
    }
}

/// `spec.externalTrafficPolicy` and `spec.internalTrafficPolicy`, and
/// `spec.healthCheckNodePort`, which "may only be set when `type` is 'LoadBalancer' and
/// `externalTrafficPolicy` is 'Local'" and lies in the node port range.
fn traffic_policies(ctx: &mut Ctx<'_>, spec: &corev1::ServiceSpec, svc: &mut Service) {
    let ty = svc.service_type;
    svc.external_traffic_policy = traffic_policy(
        ctx,
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    );
    svc.internal_traffic_policy = traffic_policy(
        ctx,
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    );
    // "externalTrafficPolicy ... may only be set on services with an external address":
    // NodePort, LoadBalancer, or externalIPs.
    if spec.external_traffic_policy.is_some()
        && !ty.has_node_ports()
        && svc.external_ips.is_empty()
        && svc.external_traffic_policy == TrafficPolicy::Local
    {
        ctx.err(
            "spec.externalTrafficPolicy",
            ValidateError::Invalid {
                value: "Local".into(),
                reason: "may only be set for services with external addresses (NodePort, LoadBalancer or externalIPs)".into(),
            },
        );
    }
    let Some(h) = spec.health_check_node_port.filter(|h| *h != 0) else {
        return;
    };
    if ty != ServiceType::LoadBalancer || svc.external_traffic_policy != TrafficPolicy::Local {
        ctx.err(
            "spec.healthCheckNodePort",
            ValidateError::Forbidden(
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'".into(),
            ),
        );
        return;
    }
    let (min, max) = ctx.config.node_port_range;
    match u16::try_from(h) {
        Ok(v) if (min..=max).contains(&v) => svc.health_check_node_port = Some(v),
        _ => ctx.err(
            "spec.healthCheckNodePort",
            ValidateError::NodePortOutOfRange {
                value: h.into(),
                min,
                max,
            },
        ),
    }
}
