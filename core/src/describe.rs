//! `kubectl get` and `kubectl describe` views of a [`Cluster`], rendered as Strings.
//!
//! The layouts follow current kubectl: tables are aligned the way kubectl's printers align
//! them (Go's `text/tabwriter` with a minimum cell width of 6 and 3 spaces of padding), and
//! `describe` uses the describe layout (the same tabwriter with 2 spaces of padding, so the
//! values after `Key:` line up). Field order and presence follow kubectl's `describeService`;
//! cells follow its `printService`, `printEndpoints` and `printPod`.
//!
//! Ages are computed from `created` timestamps and [`ViewOptions::now`]; nothing here reads
//! a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{
    Cluster, IpFamily, IpFamilyPolicy, ObjectName, Pod, PodPhase, Service, ServiceName,
    ServiceType, SessionAffinity, TargetPort,
};

/// Options shared by all views.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ViewOptions {
    /// The current time in seconds since the epoch, for the AGE column; `None` shows `<unknown>`.
    pub now: Option<i64>,
    /// `-o wide`: the extra columns kubectl prints (`get svc`: SELECTOR; `get pods`: IP
    /// and NODE), and load balancer addresses in full.
    pub wide: bool,
}

/// The annotation `kubectl describe` never shows.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Longest annotation `key: value` kubectl prints on one line.
const MAX_ANNOTATION_LEN: usize = 140;
/// Width at which kubectl clips load balancer addresses in non-wide tables.
const LOAD_BALANCER_WIDTH: usize = 16;
/// Endpoints shown before `+ N more...`.
const MAX_ENDPOINTS: usize = 3;

/// `kubectl get svc` (`namespace` None: `kubectl get svc -A`, with a NAMESPACE column).
pub fn get_services(cluster: &Cluster, namespace: Option<&str>, opts: &ViewOptions) -> String {
    services_table(
        cluster
            .services()
            .filter(|s| in_namespace(&s.name.namespace, namespace)),
        namespace,
        opts,
    )
}

/// `kubectl get svc NAME -n NS`; `None` when the Service does not exist.
pub fn get_service(cluster: &Cluster, name: &ServiceName, opts: &ViewOptions) -> Option<String> {
    let svc = cluster.service(name)?;
    Some(services_table(
        std::iter::once(svc),
        Some(&name.namespace),
        opts,
    ))
}

fn services_table<'a>(
    services: impl Iterator<Item = &'a Service>,
    namespace: Option<&str>,
    opts: &ViewOptions,
) -> String {
    let rows = services
        .map(|s| {
            let mut cells = vec![
                s.name.name.clone(),
                s.service_type.as_str().to_string(),
                cluster_ip_cell(s),
                external_ip_cell(s, opts.wide),
                ports_cell(s),
                age(s.created, opts.now),
            ];
            // kubectl's printService: `if options.Wide`, the selector as FormatLabels.
            if opts.wide {
                cells.push(selector_cell(s));
            }
            (s.name.namespace.as_str(), cells)
        })
        .collect();
    let mut headers = vec![
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ];
    if opts.wide {
        headers.push("SELECTOR");
    }
    table(&headers, rows, namespace)
}

/// `kubectl get endpoints`: ready `ip:port` entries per Service, as kubectl's formatEndpoints.
pub fn get_endpoints(cluster: &Cluster, namespace: Option<&str>, opts: &ViewOptions) -> String {
    endpoints_table(
        cluster,
        cluster
            .services()
            .filter(|s| in_namespace(&s.name.namespace, namespace)),
        namespace,
        opts,
    )
}

/// `kubectl get endpoints NAME -n NS`; `None` when there is no such Endpoints object (no
/// Service, or a Service without a selector that nobody wrote endpoints for).
pub fn get_endpoints_of(
    cluster: &Cluster,
    name: &ServiceName,
    opts: &ViewOptions,
) -> Option<String> {
    let svc = cluster.service(name)?;
    if !has_endpoints_object(cluster, svc) {
        return None;
    }
    Some(endpoints_table(
        cluster,
        std::iter::once(svc),
        Some(&name.namespace),
        opts,
    ))
}

fn endpoints_table<'a>(
    cluster: &Cluster,
    services: impl Iterator<Item = &'a Service>,
    namespace: Option<&str>,
    opts: &ViewOptions,
) -> String {
    let rows = services
        .filter(|s| has_endpoints_object(cluster, s))
        .map(|s| {
            (
                s.name.namespace.as_str(),
                vec![
                    s.name.name.clone(),
                    endpoints_cell(cluster, s),
                    age(s.created, opts.now),
                ],
            )
        })
        .collect();
    table(&["NAME", "ENDPOINTS", "AGE"], rows, namespace)
}

/// `kubectl get pods -o wide` with the columns NAME READY STATUS RESTARTS AGE IP NODE.
pub fn get_pods_wide(cluster: &Cluster, namespace: Option<&str>, opts: &ViewOptions) -> String {
    let opts = ViewOptions {
        wide: true,
        ..opts.clone()
    };
    get_pods(cluster, namespace, &opts)
}

/// `kubectl get pods`: NAME READY STATUS RESTARTS AGE, and IP NODE with
/// [`ViewOptions::wide`].
pub fn get_pods(cluster: &Cluster, namespace: Option<&str>, opts: &ViewOptions) -> String {
    pods_table(
        cluster
            .pods()
            .filter(|p| in_namespace(&p.name.namespace, namespace)),
        namespace,
        opts,
    )
}

/// `kubectl get pods NAME -n NS`; `None` when the Pod does not exist.
pub fn get_pod(cluster: &Cluster, name: &ObjectName, opts: &ViewOptions) -> Option<String> {
    let pod = cluster.pod(name)?;
    Some(pods_table(
        std::iter::once(pod),
        Some(&name.namespace),
        opts,
    ))
}

fn pods_table<'a>(
    pods: impl Iterator<Item = &'a Pod>,
    namespace: Option<&str>,
    opts: &ViewOptions,
) -> String {
    let rows = pods
        .map(|p| {
            let ready = usize::from(p.ready && p.phase == PodPhase::Running);
            let mut cells = vec![
                p.name.name.clone(),
                format!("{ready}/1"),
                pod_status(p).to_string(),
                "0".to_string(),
                age(p.created, opts.now),
            ];
            if opts.wide {
                cells.push(
                    p.ips
                        .first()
                        .map_or_else(|| "<none>".to_string(), IpAddr::to_string),
                );
                cells.push(p.node_name.clone().unwrap_or_else(|| "<none>".to_string()));
            }
            (p.name.namespace.as_str(), cells)
        })
        .collect();
    let mut headers = vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"];
    if opts.wide {
        headers.extend(["IP", "NODE"]);
    }
    table(&headers, rows, namespace)
}

/// `kubectl describe service`; `None` when the Service does not exist.
pub fn describe_service(
    cluster: &Cluster,
    name: &ServiceName,
    opts: &ViewOptions,
) -> Option<String> {
    // Nothing in a description depends on the time: events and ages are not shown.
    let _ = opts;
    let svc = cluster.service(name)?;
    let external_name = svc.service_type == ServiceType::ExternalName;
    let mut w = String::new();
    field(&mut w, "Name", &svc.name.name);
    field(&mut w, "Namespace", &svc.name.namespace);
    labels_field(&mut w, "Labels", &svc.labels);
    annotations_field(&mut w, &svc.annotations);
    field(&mut w, "Selector", &selector_cell(svc));
    field(&mut w, "Type", svc.service_type.as_str());
    // The API server sets ipFamilyPolicy and ipFamilies on every Service but ExternalName.
    if !external_name {
        field(
            &mut w,
            "IP Family Policy",
            family_policy(svc.ip_family_policy),
        );
    }
    let mut families: Vec<&str> = svc.ip_families.iter().map(|f| f.as_str()).collect();
    if families.is_empty() && !external_name {
        families = svc
            .cluster_ips
            .iter()
            .map(|ip| IpFamily::of(ip).as_str())
            .collect();
    }
    field(&mut w, "IP Families", &or_none(families.join(",")));
    let (ip, ips) = if svc.headless {
        ("None".to_string(), "None".to_string())
    } else {
        let ips: Vec<String> = svc.cluster_ips.iter().map(IpAddr::to_string).collect();
        (
            svc.cluster_ip()
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            or_none(ips.join(",")),
        )
    };
    field(&mut w, "IP", &ip);
    field(&mut w, "IPs", &ips);
    if !svc.external_ips.is_empty() {
        field(&mut w, "External IPs", &join_ips(&svc.external_ips, ","));
    }
    if let Some(n) = svc.external_name.as_deref().filter(|n| !n.is_empty()) {
        field(&mut w, "External Name", n);
    }
    if let Some(ip) = svc.requested_load_balancer_ip {
        field(&mut w, "Desired LoadBalancer IP", &ip.to_string());
    }
    if !svc.load_balancer_ips.is_empty() || !svc.load_balancer_proxy_ips.is_empty() {
        // The API server gives every ingress IP the default ipMode VIP.
        let list: Vec<String> = svc
            .load_balancer_ips
            .iter()
            .map(|ip| format!("{ip} (VIP)"))
            .chain(
                svc.load_balancer_proxy_ips
                    .iter()
                    .map(|ip| format!("{ip} (Proxy)")),
            )
            .collect();
        field(&mut w, "LoadBalancer Ingress", &list.join(", "));
    }
    let endpoints = cluster.endpoints(svc);
    for sp in &svc.ports {
        let name = if sp.name.is_empty() {
            "<unset>"
        } else {
            sp.name.as_str()
        };
        let proto = sp.protocol.as_str();
        w.push_str(&format!("Port:\t{name}\t{}/{proto}\n", sp.port));
        let target = match &sp.target_port {
            TargetPort::Number(n) => n.to_string(),
            TargetPort::Name(s) => s.clone(),
        };
        field(&mut w, "TargetPort", &format!("{target}/{proto}"));
        if let Some(ap) = &sp.app_protocol {
            field(&mut w, "AppProtocol", ap);
        }
        if let Some(np) = sp.node_port {
            w.push_str(&format!("NodePort:\t{name}\t{np}/{proto}\n"));
        }
        let ready: Vec<String> = endpoints
            .get(&sp.name)
            .map(|(_, list)| {
                list.iter()
                    .filter(|e| e.endpoint.ready)
                    .map(|e| host_port(&e.endpoint.ip, e.port))
                    .collect()
            })
            .unwrap_or_default();
        field(&mut w, "Endpoints", &endpoint_list(&ready));
    }
    let affinity = match svc.session_affinity {
        SessionAffinity::None => "None",
        SessionAffinity::ClientIp { .. } => "ClientIP",
    };
    field(&mut w, "Session Affinity", affinity);
    // Defaulted by the API server for externally accessible Services only.
    if svc.service_type.has_node_ports() || !svc.external_ips.is_empty() {
        field(
            &mut w,
            "External Traffic Policy",
            svc.external_traffic_policy.as_str(),
        );
    }
    // Defaulted for ClusterIP, NodePort and LoadBalancer Services.
    if !external_name {
        field(
            &mut w,
            "Internal Traffic Policy",
            svc.internal_traffic_policy.as_str(),
        );
    }
    if let Some(h) = svc.health_check_node_port {
        field(&mut w, "HealthCheck NodePort", &h.to_string());
    }
    if !svc.load_balancer_source_ranges.is_empty() {
        let ranges: Vec<String> = svc
            .load_balancer_source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        field(&mut w, "LoadBalancer Source Ranges", &ranges.join(","));
    }
    field(&mut w, "Events", "<none>");
    Some(tabwrite(&w, 0, 2))
}

// ---------------------------------------------------------------------------------------
// Cells.

fn in_namespace(ns: &str, filter: Option<&str>) -> bool {
    filter.is_none_or(|f| f == ns)
}

/// CLUSTER-IP: the first of `spec.clusterIPs` (`None` for headless), `<none>` without any.
fn cluster_ip_cell(s: &Service) -> String {
    if s.headless {
        "None".to_string()
    } else {
        s.cluster_ip()
            .map_or_else(|| "<none>".to_string(), |ip| ip.to_string())
    }
}

/// `spec.selector` as kubectl's `labels.FormatLabels`: `app=vote,tier=front` (sorted by
/// key), `<none>` without a selector.
fn selector_cell(s: &Service) -> String {
    match &s.selector {
        Some(sel) if !sel.is_empty() => sel.to_string(),
        _ => "<none>".to_string(),
    }
}

/// EXTERNAL-IP, as kubectl's getServiceExternalIP.
fn external_ip_cell(s: &Service, wide: bool) -> String {
    let external = join_ips(&s.external_ips, ",");
    match s.service_type {
        ServiceType::ClusterIp | ServiceType::NodePort => or_none(external),
        ServiceType::LoadBalancer => {
            // loadBalancerStatusStringer: sorted, deduplicated, and `if !wide && len(r) >
            // loadBalancerWidth` clipped to 16 bytes.
            let set: BTreeSet<String> = s
                .load_balancer_ips
                .iter()
                .chain(&s.load_balancer_proxy_ips)
                .map(|ip| ip.to_string())
                .collect();
            let mut lb = set.into_iter().collect::<Vec<_>>().join(",");
            if !wide && lb.len() > LOAD_BALANCER_WIDTH {
                lb.truncate(LOAD_BALANCER_WIDTH - 3);
                lb.push_str("...");
            }
            if !external.is_empty() {
                if lb.is_empty() {
                    external
                } else {
                    format!("{lb},{external}")
                }
            } else if !lb.is_empty() {
                lb
            } else {
                "<pending>".to_string()
            }
        }
        ServiceType::ExternalName => s.external_name.clone().unwrap_or_default(),
    }
}

/// PORT(S): `80/TCP`, `80:30000/TCP` with a node port, comma-joined; `<none>` without ports.
fn ports_cell(s: &Service) -> String {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| match p.node_port {
            Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
            None => format!("{}/{}", p.port, p.protocol),
        })
        .collect();
    or_none(ports.join(","))
}

/// Whether the Service has an Endpoints object: the endpoints controller writes one for
/// every Service with a selector; without one, only user-written endpoints exist.
fn has_endpoints_object(cluster: &Cluster, s: &Service) -> bool {
    match &s.selector {
        Some(_) => s.service_type != ServiceType::ExternalName,
        None => cluster.slices_of(&s.name).next().is_some(),
    }
}

/// ENDPOINTS of `kubectl get endpoints`: per port, the ready addresses in the Endpoints
/// object's order (IP as a string, as the endpoints controller sorts them).
fn endpoints_cell(cluster: &Cluster, s: &Service) -> String {
    let endpoints = cluster.endpoints(s);
    let mut entries = Vec::new();
    for sp in &s.ports {
        let Some((_, list)) = endpoints.get(&sp.name) else {
            continue;
        };
        let mut ready: Vec<(String, u16)> = list
            .iter()
            .filter(|e| e.endpoint.ready)
            .map(|e| (e.endpoint.ip.to_string(), e.port))
            .collect();
        ready.sort();
        ready.dedup();
        entries.extend(ready.iter().map(|(ip, port)| {
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        }));
    }
    endpoint_list(&entries)
}

/// At most three entries, then ` + N more...`; `<none>` when empty.
fn endpoint_list(entries: &[String]) -> String {
    if entries.is_empty() {
        return "<none>".to_string();
    }
    let shown = entries
        .iter()
        .take(MAX_ENDPOINTS)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if entries.len() > MAX_ENDPOINTS {
        format!("{shown} + {} more...", entries.len() - MAX_ENDPOINTS)
    } else {
        shown
    }
}

/// Go's `net.JoinHostPort`: IPv6 addresses in brackets.
fn host_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// STATUS of a Pod with one container, as kubectl's printPod derives it.
fn pod_status(p: &Pod) -> &'static str {
    let terminal = matches!(p.phase, PodPhase::Succeeded | PodPhase::Failed);
    if p.terminating && !terminal {
        return "Terminating";
    }
    match p.phase {
        PodPhase::Pending => "Pending",
        PodPhase::Running => "Running",
        // The container's terminated reason: Completed on exit 0, Error otherwise.
        PodPhase::Succeeded => "Completed",
        PodPhase::Failed => "Error",
    }
}

fn family_policy(p: IpFamilyPolicy) -> &'static str {
    match p {
        IpFamilyPolicy::SingleStack => "SingleStack",
        IpFamilyPolicy::PreferDualStack => "PreferDualStack",
        IpFamilyPolicy::RequireDualStack => "RequireDualStack",
    }
}

fn join_ips(ips: &[IpAddr], sep: &str) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".to_string()
    } else {
        s
    }
}

/// kubectl's `translateTimestampSince`: HumanDuration of now - created.
fn age(created: Option<i64>, now: Option<i64>) -> String {
    match (created, now) {
        (Some(c), Some(n)) => human_duration(n.saturating_sub(c)),
        _ => "<unknown>".to_string(),
    }
}

/// kubectl's HumanDuration (apimachinery `duration.HumanDuration`) for whole seconds:
/// about two significant figures, e.g. `45s`, `5m30s`, `11m`, `5h`, `2d3h`, `400d`, `3y20d`.
fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".to_string();
    }
    if secs < 0 {
        return "0s".to_string();
    }
    if secs < 60 * 2 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{days}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

// ---------------------------------------------------------------------------------------
// Describe fields.

fn field(w: &mut String, key: &str, value: &str) {
    w.push_str(key);
    w.push_str(":\t");
    w.push_str(value);
    w.push('\n');
}

/// kubectl's printLabelsMultiline: one `key=value` per line, sorted, continuation lines
/// start with an empty cell so they align under the first.
fn labels_field(w: &mut String, title: &str, labels: &BTreeMap<String, String>) {
    w.push_str(title);
    w.push_str(":\t");
    if labels.is_empty() {
        w.push_str("<none>\n");
        return;
    }
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            w.push('\t');
        }
        w.push_str(&format!("{k}={v}\n"));
    }
}

/// kubectl's printAnnotationsMultiline: `key: value`, sorted, without the last-applied
/// configuration; long or multi-line values go below their key, each line clipped.
fn annotations_field(w: &mut String, annotations: &BTreeMap<String, String>) {
    w.push_str("Annotations:\t");
    let shown: Vec<(&String, &String)> = annotations
        .iter()
        .filter(|(k, _)| k.as_str() != LAST_APPLIED)
        .collect();
    if shown.is_empty() {
        w.push_str("<none>\n");
        return;
    }
    for (i, (k, v)) in shown.into_iter().enumerate() {
        if i > 0 {
            w.push('\t');
        }
        let value = v.strip_suffix('\n').unwrap_or(v);
        if value.len() + k.len() + 2 > MAX_ANNOTATION_LEN || value.contains('\n') {
            w.push_str(&format!("{k}:\n"));
            for line in value.split('\n') {
                w.push_str(&format!("\t  {}\n", shorten(line, MAX_ANNOTATION_LEN - 2)));
            }
        } else {
            w.push_str(&format!("{k}: {value}\n"));
        }
    }
}

/// The first `max` bytes (backed off to a character boundary) and `...` when longer.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

// ---------------------------------------------------------------------------------------
// Tables and the tabwriter.

/// Renders a `kubectl get` table: upper-case headers, a leading NAMESPACE column for all
/// namespaces, and kubectl's message when there is nothing to show.
fn table(headers: &[&str], rows: Vec<(&str, Vec<String>)>, namespace: Option<&str>) -> String {
    if rows.is_empty() {
        return match namespace {
            Some(ns) => format!("No resources found in {ns} namespace.\n"),
            None => "No resources found\n".to_string(),
        };
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        text.push_str(&cells.join("\t"));
        text.push('\n');
    };
    let mut head: Vec<&str> = Vec::new();
    if namespace.is_none() {
        head.push("NAMESPACE");
    }
    head.extend(headers.iter().copied());
    line(head);
    for (ns, cells) in &rows {
        let mut row: Vec<&str> = Vec::new();
        if namespace.is_none() {
            row.push(ns);
        }
        row.extend(cells.iter().map(String::as_str));
        line(row);
    }
    tabwrite(&text, 6, 3)
}

/// Go's `text/tabwriter` with a space pad character and no flags: every tab-terminated
/// cell belongs to a column, a column block is a run of consecutive lines that have a cell
/// in that column, and each cell of a block is padded to the block's widest cell plus
/// `padding` (at least `min_width`). The text after a line's last tab is not padded.
fn tabwrite(text: &str, min_width: usize, padding: usize) -> String {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let lines: Vec<Vec<&str>> = body.split('\n').map(|l| l.split('\t').collect()).collect();
    let mut tw = TabWriter {
        lines: &lines,
        widths: Vec::new(),
        min_width,
        padding,
        out: String::with_capacity(text.len() * 2),
    };
    tw.format(0, lines.len());
    if !text.ends_with('\n') && tw.out.ends_with('\n') {
        tw.out.pop();
    }
    tw.out
}

struct TabWriter<'a> {
    lines: &'a [Vec<&'a str>],
    widths: Vec<usize>,
    min_width: usize,
    padding: usize,
    out: String,
}

impl TabWriter<'_> {
    /// Number of tab-terminated cells of a line.
    fn cells(&self, line: usize) -> usize {
        self.lines
            .get(line)
            .map_or(0, |l| l.len().saturating_sub(1))
    }

    fn format(&mut self, mut line0: usize, line1: usize) {
        let column = self.widths.len();
        let mut this = line0;
        while this < line1 {
            if column >= self.cells(this) {
                this += 1;
                continue;
            }
            // A block of lines with a cell in this column starts here.
            self.write_lines(line0, this);
            line0 = this;
            let mut width = self.min_width;
            while this < line1 && column < self.cells(this) {
                let w = self.lines[this][column].chars().count() + self.padding;
                width = width.max(w);
                this += 1;
            }
            self.widths.push(width);
            self.format(line0, this);
            self.widths.pop();
            line0 = this;
        }
        self.write_lines(line0, line1);
    }

    fn write_lines(&mut self, line0: usize, line1: usize) {
        for line in &self.lines[line0..line1] {
            for (j, cell) in line.iter().enumerate() {
                self.out.push_str(cell);
                if let Some(&width) = self.widths.get(j) {
                    let pad = width.saturating_sub(cell.chars().count());
                    self.out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            self.out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ClusterConfig, Manifests};
    use crate::model::ObjectName;

    /// 2024-01-01T00:00:00Z.
    const T0: i64 = 1_704_067_200;

    fn config() -> ClusterConfig {
        ClusterConfig {
            default_namespace: "instavote".into(),
            ..ClusterConfig::default()
        }
    }

    fn load(yaml: &str) -> Cluster {
        let cfg = config();
        let mut m = Manifests::from_files([("lab.yaml", yaml)], &cfg);
        let c = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        c
    }

    fn at(secs_after_t0: i64) -> ViewOptions {
        ViewOptions {
            now: Some(T0 + secs_after_t0),
            ..ViewOptions::default()
        }
    }

    fn wide(secs_after_t0: i64) -> ViewOptions {
        ViewOptions {
            wide: true,
            ..at(secs_after_t0)
        }
    }

    fn pod_yaml(name: &str, labels: &str, ip: &str, node: &str) -> String {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{{labels}}}
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  nodeName: {node}
  containers:
  - name: app
    image: example/app
status:
  phase: Running
  podIP: {ip}
"
        )
    }

    const VOTE_SVC: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: vote
  labels:
    role: vote
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  selector:
    role: vote
  clusterIP: 10.108.108.157
  ports:
    - port: 80
      targetPort: 80
      nodePort: 30000
  type: NodePort
";

    /// The lab's five vote pods (`kubectl get pods -o wide`).
    const VOTE_PODS: [(&str, &str, &str); 5] = [
        ("vote-58bpv", "10.32.0.6", "k-02"),
        ("vote-986cl", "10.38.0.5", "k-03"),
        ("vote-9rrfz", "10.38.0.4", "k-03"),
        ("vote-dx8f4", "10.32.0.4", "k-02"),
        ("vote-qxmfl", "10.32.0.5", "k-02"),
    ];

    fn vote_lab(svc: &str) -> Cluster {
        let mut yaml = svc.to_string();
        for (name, ip, node) in VOTE_PODS {
            yaml.push_str(&pod_yaml(name, "role: vote", ip, node));
        }
        load(&yaml)
    }

    fn vote() -> ServiceName {
        ObjectName::new("instavote", "vote")
    }

    #[test]
    fn describe_vote_nodeport_lists_three_endpoints_and_more() {
        let c = vote_lab(VOTE_SVC);
        let out = describe_service(&c, &vote(), &at(660)).expect("vote exists");
        assert_eq!(
            out,
            "\
Name:                     vote
Namespace:                instavote
Labels:                   role=vote
Annotations:              <none>
Selector:                 role=vote
Type:                     NodePort
IP Family Policy:         SingleStack
IP Families:              IPv4
IP:                       10.108.108.157
IPs:                      10.108.108.157
Port:                     <unset>  80/TCP
TargetPort:               80/TCP
NodePort:                 <unset>  30000/TCP
Endpoints:                10.32.0.4:80,10.32.0.5:80,10.32.0.6:80 + 2 more...
Session Affinity:         None
External Traffic Policy:  Cluster
Internal Traffic Policy:  Cluster
Events:                   <none>
"
        );
    }

    #[test]
    fn describe_missing_service_is_none() {
        let c = vote_lab(VOTE_SVC);
        let name = ObjectName::new("instavote", "nosuch");
        assert_eq!(describe_service(&c, &name, &ViewOptions::default()), None);
    }

    #[test]
    fn selector_on_missing_label_describes_no_endpoints() {
        let c = vote_lab(&VOTE_SVC.replace(
            "    role: vote\n  clusterIP",
            "    role: nosuch\n  clusterIP",
        ));
        let out = describe_service(&c, &vote(), &ViewOptions::default()).expect("vote");
        assert!(
            out.contains("\nSelector:                 role=nosuch\n"),
            "{out}"
        );
        assert!(
            out.contains("\nEndpoints:                <none>\n"),
            "{out}"
        );
        assert_eq!(
            get_endpoints(&c, Some("instavote"), &at(60)),
            "\
NAME   ENDPOINTS   AGE
vote   <none>      60s
"
        );
    }

    #[test]
    fn get_svc_vote_row_and_external_ips() {
        let c = vote_lab(VOTE_SVC);
        assert_eq!(
            get_services(&c, Some("instavote"), &at(660)),
            "\
NAME   TYPE       CLUSTER-IP       EXTERNAL-IP   PORT(S)        AGE
vote   NodePort   10.108.108.157   <none>        80:30000/TCP   11m
"
        );
        let with_ips = VOTE_SVC.replace(
            "  type: NodePort\n",
            "  type: NodePort\n  externalIPs:\n    - 206.189.150.190\n    - 159.65.8.227\n",
        );
        let with_ips = with_ips.replace("10.108.108.157", "10.107.71.204");
        let c = vote_lab(&with_ips);
        assert_eq!(
            get_services(&c, Some("instavote"), &at(660)),
            "\
NAME   TYPE       CLUSTER-IP      EXTERNAL-IP                    PORT(S)        AGE
vote   NodePort   10.107.71.204   206.189.150.190,159.65.8.227   80:30000/TCP   11m
"
        );
        let out = describe_service(&c, &vote(), &at(660)).expect("vote");
        assert!(
            out.contains(
                "\nIPs:                      10.107.71.204\n\
                 External IPs:             206.189.150.190,159.65.8.227\n\
                 Port:                     <unset>  80/TCP\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn get_pods_wide_matches_the_lab_columns() {
        let c = vote_lab(VOTE_SVC);
        assert_eq!(
            get_pods_wide(&c, Some("instavote"), &at(5 * 3600)),
            "\
NAME         READY   STATUS    RESTARTS   AGE   IP          NODE
vote-58bpv   1/1     Running   0          5h    10.32.0.6   k-02
vote-986cl   1/1     Running   0          5h    10.38.0.5   k-03
vote-9rrfz   1/1     Running   0          5h    10.38.0.4   k-03
vote-dx8f4   1/1     Running   0          5h    10.32.0.4   k-02
vote-qxmfl   1/1     Running   0          5h    10.32.0.5   k-02
"
        );
    }

    #[test]
    fn pods_pending_terminating_and_not_ready() {
        let mut c = Cluster::simulated();
        let mut pending = Pod::new(
            ObjectName::new("default", "a-pending"),
            IpAddr::from([0, 0, 0, 0]),
        );
        pending.ips.clear();
        pending.phase = PodPhase::Pending;
        pending.ready = false;
        c.upsert_pod(pending);
        let mut term = Pod::new(
            ObjectName::new("default", "b-term"),
            IpAddr::from([10, 0, 0, 2]),
        );
        term.terminating = true;
        term.node_name = Some("node-1".into());
        term.created = Some(T0);
        c.upsert_pod(term);
        let mut unready = Pod::new(
            ObjectName::new("default", "c-unready"),
            IpAddr::from([10, 0, 0, 3]),
        );
        unready.ready = false;
        unready.node_name = Some("node-1".into());
        unready.created = Some(T0);
        c.upsert_pod(unready);
        let mut done = Pod::new(
            ObjectName::new("kube-system", "d-done"),
            IpAddr::from([10, 0, 0, 4]),
        );
        done.phase = PodPhase::Succeeded;
        done.ready = false;
        done.node_name = Some("node-2".into());
        done.created = Some(T0);
        c.upsert_pod(done);
        assert_eq!(
            get_pods_wide(&c, None, &at(45)),
            "\
NAMESPACE     NAME        READY   STATUS        RESTARTS   AGE         IP         NODE
default       a-pending   0/1     Pending       0          <unknown>   <none>     <none>
default       b-term      1/1     Terminating   0          45s         10.0.0.2   node-1
default       c-unready   0/1     Running       0          45s         10.0.0.3   node-1
kube-system   d-done      0/1     Completed     0          45s         10.0.0.4   node-2
"
        );
        assert_eq!(
            get_pods_wide(&c, Some("prod"), &at(45)),
            "No resources found in prod namespace.\n"
        );
    }

    const REDIS: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: redis
  labels:
    role: redis
    tier: back
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{\"apiVersion\":\"v1\",\"kind\":\"Service\"}'
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  selector:
    app: redis
  clusterIP: 10.102.77.6
  ports:
    - port: 6379
      targetPort: 6379
";

    #[test]
    fn describe_redis_clusterip_with_two_endpoints() {
        let mut yaml = REDIS.to_string();
        yaml.push_str(&pod_yaml(
            "redis-6fb9c7b5d-4xv2q",
            "app: redis",
            "10.46.0.6",
            "k-03",
        ));
        yaml.push_str(&pod_yaml(
            "redis-6fb9c7b5d-zl9tg",
            "app: redis",
            "10.32.0.6",
            "k-02",
        ));
        let c = load(&yaml);
        let name = ObjectName::new("instavote", "redis");
        assert_eq!(
            describe_service(&c, &name, &ViewOptions::default()).expect("redis"),
            "\
Name:                     redis
Namespace:                instavote
Labels:                   role=redis
                          tier=back
Annotations:              <none>
Selector:                 app=redis
Type:                     ClusterIP
IP Family Policy:         SingleStack
IP Families:              IPv4
IP:                       10.102.77.6
IPs:                      10.102.77.6
Port:                     <unset>  6379/TCP
TargetPort:               6379/TCP
Endpoints:                10.32.0.6:6379,10.46.0.6:6379
Session Affinity:         None
Internal Traffic Policy:  Cluster
Events:                   <none>
"
        );
        assert_eq!(
            get_endpoints(&c, Some("instavote"), &ViewOptions::default()),
            "\
NAME    ENDPOINTS                       AGE
redis   10.32.0.6:6379,10.46.0.6:6379   <unknown>
"
        );
    }

    const KUBE_SYSTEM: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: kubernetes-dashboard
  namespace: kube-system
  creationTimestamp: \"2024-01-01T04:37:00Z\"
spec:
  type: NodePort
  selector: {k8s-app: kubernetes-dashboard}
  clusterIP: 10.104.42.73
  ports:
  - {port: 80, targetPort: 9090, nodePort: 31000}
";

    #[test]
    fn get_svc_kube_system() {
        let c = load(KUBE_SYSTEM);
        assert_eq!(
            get_services(&c, Some("kube-system"), &at(5 * 3600)),
            "\
NAME                   TYPE        CLUSTER-IP     EXTERNAL-IP   PORT(S)         AGE
kube-dns               ClusterIP   10.96.0.10     <none>        53/UDP,53/TCP   5h
kubernetes-dashboard   NodePort    10.104.42.73   <none>        80:31000/TCP    23m
"
        );
    }

    #[test]
    fn get_endpoints_per_port_and_more() {
        let mut yaml = KUBE_SYSTEM.to_string();
        for (name, ip) in [("coredns-a", "10.244.0.2"), ("coredns-b", "10.244.0.3")] {
            yaml.push_str(
                &pod_yaml(name, "k8s-app: kube-dns", ip, "node-1")
                    .replace("metadata:\n", "metadata:\n  namespace: kube-system\n"),
            );
        }
        let c = load(&yaml);
        assert_eq!(
            get_endpoints(&c, None, &at(3 * 86400 + 7200)),
            "\
NAMESPACE     NAME                   ENDPOINTS                                               AGE
kube-system   kube-dns               10.244.0.2:53,10.244.0.3:53,10.244.0.2:53 + 1 more...   3d2h
kube-system   kubernetes-dashboard   <none>                                                  2d21h
"
        );
        let dns = ObjectName::new("kube-system", "kube-dns");
        let out = describe_service(&c, &dns, &ViewOptions::default()).expect("kube-dns");
        assert!(
            out.contains(
                "\
Port:                     dns  53/UDP
TargetPort:               53/UDP
Endpoints:                10.244.0.2:53,10.244.0.3:53
Port:                     dns-tcp  53/TCP
TargetPort:               53/TCP
Endpoints:                10.244.0.2:53,10.244.0.3:53
"
            ),
            "{out}"
        );
    }

    const ODD_SERVICES: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: db
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  clusterIP: None
  selector: {app: db}
  ports:
  - {port: 5432}
---
apiVersion: v1
kind: Service
metadata:
  name: ext
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  type: ExternalName
  externalName: db.example.com
---
apiVersion: v1
kind: Service
metadata:
  name: lb
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  type: LoadBalancer
  clusterIP: 10.96.7.7
  selector: {app: web}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [192.0.2.0/24, 198.51.100.0/24]
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080}
status:
  loadBalancer:
    ingress:
    - ip: 203.0.113.10
---
apiVersion: v1
kind: Service
metadata:
  name: lb-pending
spec:
  type: LoadBalancer
  clusterIP: 10.96.7.8
  sessionAffinity: ClientIP
  ports:
  - {port: 443, nodePort: 30443}
";

    #[test]
    fn get_svc_headless_externalname_and_load_balancers() {
        let c = load(ODD_SERVICES);
        assert_eq!(
            get_services(&c, None, &at(2 * 86400 + 3 * 3600)),
            "\
NAMESPACE   NAME         TYPE           CLUSTER-IP   EXTERNAL-IP      PORT(S)         AGE
instavote   db           ClusterIP      None         <none>           5432/TCP        2d3h
instavote   ext          ExternalName   <none>       db.example.com   <none>          2d3h
instavote   lb           LoadBalancer   10.96.7.7    203.0.113.10     80:30080/TCP    2d3h
instavote   lb-pending   LoadBalancer   10.96.7.8    <pending>        443:30443/TCP   <unknown>
"
        );
    }

    #[test]
    fn describe_headless_and_externalname() {
        let c = load(ODD_SERVICES);
        let db = describe_service(&c, &ObjectName::new("instavote", "db"), &at(0)).expect("db");
        assert_eq!(
            db,
            "\
Name:                     db
Namespace:                instavote
Labels:                   <none>
Annotations:              <none>
Selector:                 app=db
Type:                     ClusterIP
IP Family Policy:         SingleStack
IP Families:              IPv4
IP:                       None
IPs:                      None
Port:                     <unset>  5432/TCP
TargetPort:               5432/TCP
Endpoints:                <none>
Session Affinity:         None
Internal Traffic Policy:  Cluster
Events:                   <none>
"
        );
        let ext = describe_service(&c, &ObjectName::new("instavote", "ext"), &at(0)).expect("ext");
        // kubectl prints the empty spec.clusterIP as a padded, empty value.
        assert_eq!(
            ext,
            concat!(
                "Name:              ext\n",
                "Namespace:         instavote\n",
                "Labels:            <none>\n",
                "Annotations:       <none>\n",
                "Selector:          <none>\n",
                "Type:              ExternalName\n",
                "IP Families:       <none>\n",
                "IP:                \n",
                "IPs:               <none>\n",
                "External Name:     db.example.com\n",
                "Session Affinity:  None\n",
                "Events:            <none>\n",
            )
        );
    }

    #[test]
    fn describe_load_balancer_with_local_policy() {
        let mut yaml = ODD_SERVICES.to_string();
        yaml.push_str(
            &pod_yaml("web-1", "app: web", "10.244.1.5", "node-1").replace(
                "    image: example/app\n",
                "    image: example/app\n    ports:\n    - {name: web, containerPort: 8080}\n",
            ),
        );
        let c = load(&yaml);
        let lb = describe_service(&c, &ObjectName::new("instavote", "lb"), &at(0)).expect("lb");
        assert_eq!(
            lb,
            "\
Name:                        lb
Namespace:                   instavote
Labels:                      <none>
Annotations:                 <none>
Selector:                    app=web
Type:                        LoadBalancer
IP Family Policy:            SingleStack
IP Families:                 IPv4
IP:                          10.96.7.7
IPs:                         10.96.7.7
LoadBalancer Ingress:        203.0.113.10 (VIP)
Port:                        http  80/TCP
TargetPort:                  web/TCP
NodePort:                    http  30080/TCP
Endpoints:                   10.244.1.5:8080
Session Affinity:            None
External Traffic Policy:     Local
Internal Traffic Policy:     Cluster
HealthCheck NodePort:        32000
LoadBalancer Source Ranges:  192.0.2.0/24,198.51.100.0/24
Events:                      <none>
"
        );
        let pending = describe_service(&c, &ObjectName::new("instavote", "lb-pending"), &at(0))
            .expect("lb-pending");
        assert!(
            pending.contains("\nSession Affinity:         ClientIP\n"),
            "{pending}"
        );
    }

    #[test]
    fn long_annotations_go_below_their_key() {
        let mut svc = Service::new(ObjectName::new("default", "a"));
        svc.annotations.insert("short".into(), "v".into());
        svc.annotations.insert("long".into(), "x".repeat(200));
        svc.annotations.insert("multi".into(), "one\ntwo\n".into());
        let mut c = Cluster::simulated();
        c.upsert_service(svc);
        let out = describe_service(&c, &ObjectName::new("default", "a"), &at(0)).expect("a");
        let pad = " ".repeat(26);
        let expected = format!(
            "Annotations:{}long:\n{pad}  {}...\n{pad}multi:\n{pad}  one\n{pad}  two\n{pad}short: v\n",
            " ".repeat(14),
            "x".repeat(138)
        );
        assert!(out.contains(&expected), "{out}");
    }

    #[test]
    fn human_durations() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (330, "5m30s"),
            (660, "11m"),
            (3600, "60m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 25 * 60, "3h25m"),
            (9 * 3600, "9h"),
            (2 * 86400 + 3 * 3600, "2d3h"),
            (5 * 86400, "5d"),
            (400 * 86400, "400d"),
            (3 * 365 * 86400 + 20 * 86400, "3y20d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
        assert_eq!(age(None, Some(T0)), "<unknown>");
        assert_eq!(age(Some(T0), None), "<unknown>");
    }

    #[test]
    fn tabwriter_blocks_follow_go() {
        // A line without tabs ends every column block; a second column only spans the
        // consecutive lines that have it.
        let text = "a:\tx\nlonger:\ty\tz\nno tabs\nb:\t\n";
        assert_eq!(
            tabwrite(text, 0, 2),
            "a:       x\nlonger:  y  z\nno tabs\nb:  \n"
        );
        assert_eq!(tabwrite("A\tB\nxy\tz\n", 6, 3), "A     B\nxy    z\n");
    }

    #[test]
    fn empty_lists_say_no_resources() {
        let c = Cluster::simulated();
        assert_eq!(
            get_services(&c, Some("default"), &ViewOptions::default()),
            "No resources found in default namespace.\n"
        );
        assert_eq!(
            get_endpoints(&c, None, &ViewOptions::default()),
            "No resources found\n"
        );
    }

    #[test]
    fn get_svc_wide_adds_the_selector_column_last() {
        let c = load(&format!(
            "{ODD_SERVICES}---
apiVersion: v1
kind: Service
metadata:
  name: front
  creationTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  clusterIP: 10.96.7.9
  selector: {{tier: front, app: vote}}
  ports:
  - {{port: 80}}
"
        ));
        // kubectl's order: NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE SELECTOR; the
        // selector sorted by key; `<none>` for ExternalName and selector-less Services.
        assert_eq!(
            get_services(&c, Some("instavote"), &wide(60)),
            "\
NAME         TYPE           CLUSTER-IP   EXTERNAL-IP      PORT(S)         AGE         SELECTOR
db           ClusterIP      None         <none>           5432/TCP        60s         app=db
ext          ExternalName   <none>       db.example.com   <none>          60s         <none>
front        ClusterIP      10.96.7.9    <none>           80/TCP          60s         app=vote,tier=front
lb           LoadBalancer   10.96.7.7    203.0.113.10     80:30080/TCP    60s         app=web
lb-pending   LoadBalancer   10.96.7.8    <pending>        443:30443/TCP   <unknown>   <none>
"
        );
    }

    #[test]
    fn wide_shows_load_balancer_addresses_in_full() {
        let yaml = ODD_SERVICES.replace(
            "    - ip: 203.0.113.10\n",
            "    - ip: 203.0.113.10\n    - ip: 203.0.113.11\n",
        );
        let c = load(&yaml);
        let lb = ObjectName::new("instavote", "lb");
        let narrow = get_service(&c, &lb, &at(60)).expect("lb");
        // `r[0:(loadBalancerWidth-3)] + "..."`: 13 bytes and the dots.
        assert!(narrow.contains("   203.0.113.10,...   "), "{narrow}");
        let full = get_service(&c, &lb, &wide(60)).expect("lb");
        assert!(full.contains("   203.0.113.10,203.0.113.11   "), "{full}");
    }

    #[test]
    fn get_one_object_by_name() {
        let c = vote_lab(VOTE_SVC);
        assert_eq!(
            get_service(&c, &vote(), &at(660)).as_deref(),
            Some(
                "\
NAME   TYPE       CLUSTER-IP       EXTERNAL-IP   PORT(S)        AGE
vote   NodePort   10.108.108.157   <none>        80:30000/TCP   11m
"
            )
        );
        assert_eq!(
            get_endpoints_of(&c, &vote(), &at(60)).as_deref(),
            Some(
                "\
NAME   ENDPOINTS                                            AGE
vote   10.32.0.4:80,10.32.0.5:80,10.32.0.6:80 + 2 more...   60s
"
            )
        );
        let pod = ObjectName::new("instavote", "vote-9rrfz");
        assert_eq!(
            get_pod(&c, &pod, &at(3600)).as_deref(),
            Some(
                "\
NAME         READY   STATUS    RESTARTS   AGE
vote-9rrfz   1/1     Running   0          60m
"
            )
        );
        assert_eq!(
            get_pod(&c, &pod, &wide(3600)).as_deref(),
            Some(
                "\
NAME         READY   STATUS    RESTARTS   AGE   IP          NODE
vote-9rrfz   1/1     Running   0          60m   10.38.0.4   k-03
"
            )
        );
        let missing = ObjectName::new("instavote", "nosuch");
        assert_eq!(get_service(&c, &missing, &at(0)), None);
        assert_eq!(get_endpoints_of(&c, &missing, &at(0)), None);
        assert_eq!(get_pod(&c, &missing, &at(0)), None);
        // The name is looked up in the namespace given, not in every namespace.
        let elsewhere = ObjectName::new("default", "vote");
        assert_eq!(get_service(&c, &elsewhere, &at(0)), None);
    }

    #[test]
    fn a_service_without_selector_or_endpoints_has_no_endpoints_object() {
        let c = load(ODD_SERVICES);
        // ExternalName: no selector, no slices; the endpoints controller writes nothing.
        let ext = ObjectName::new("instavote", "ext");
        assert!(get_service(&c, &ext, &at(0)).is_some());
        assert_eq!(get_endpoints_of(&c, &ext, &at(0)), None);
        // A Service with a selector has one, even when it selects nothing.
        let db = ObjectName::new("instavote", "db");
        assert!(
            get_endpoints_of(&c, &db, &at(0)).is_some_and(|t| t.contains("\ndb     <none>      ")),
            "{:?}",
            get_endpoints_of(&c, &db, &at(0))
        );
    }
}
