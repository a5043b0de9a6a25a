//! A packet's path through one node's dataplane for a Service, as a drawing: frontends
//! (ClusterIP, NodePorts, external and load balancer addresses) → the Service port's chain
//! → one endpoint chain per endpoint with the probability its rule matches and the share
//! of new connections it gets → the pods, grouped by the node they run on.
//!
//! Built from a node's [`Plan`] (what the node would program) and the [`Cluster`] (pod
//! names of the endpoints), rendered as Graphviz DOT ([`ServiceGraph::to_dot`]) or as a
//! self-contained SVG laid out here ([`ServiceGraph::to_svg`], no Graphviz needed). Chain
//! names are the iptables dialect's (`KUBE-SVC-`, `KUBE-SVL-`, `KUBE-SEP-`), spelled as the
//! plan's [`ChainIdStyle`](crate::plan::ChainIdStyle) says.
//!
//! ```
//! use svcnat_core::graph::ServiceGraph;
//! use svcnat_core::manifest::{ClusterConfig, Manifests};
//! use svcnat_core::model::ObjectName;
//! use svcnat_core::plan::{NodeContext, Plan};
//!
//! let yaml = "
//! apiVersion: v1
//! kind: Service
//! metadata: {name: web, namespace: default}
//! spec:
//!   clusterIP: 10.96.0.20
//!   selector: {app: web}
//!   ports: [{port: 80, targetPort: 8080}]
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web-a, namespace: default, labels: {app: web}}
//! spec: {nodeName: n1, containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
//! status: {podIP: 10.244.1.5, conditions: [{type: Ready, status: 'True'}]}
//! ";
//! let config = ClusterConfig::default();
//! let mut m = Manifests::from_files([("web.yaml", yaml)], &config);
//! let cluster = m.build(&config);
//! let plan = Plan::compile(&cluster, &NodeContext::new("n1".to_string(), Vec::new(), Vec::new()));
//! let graph = ServiceGraph::build(&cluster, &plan, &ObjectName::new("default", "web"))
//!     .expect("the Service is proxied");
//! assert!(graph.to_dot().contains("\"pod:10.244.1.5\" [label=\"web-a\\n10.244.1.5\""));
//! assert!(graph.to_svg().starts_with("<svg"));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{Cluster, ServiceName};
use crate::plan::{
    EmptyAction, FrontendKey, Locality, Masquerade, Plan, PlanEndpoint, ServicePortName,
};

/// One Service's path through a node's dataplane.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceGraph {
    /// The Service.
    pub service: ServiceName,
    /// The node whose plan this is.
    pub node: String,
    /// Where traffic arrives, and the chain each frontend jumps to.
    pub frontends: Vec<FrontendNode>,
    /// The Service ports' chains (cluster-wide and node-local sets).
    pub chains: Vec<ChainNode>,
    /// The pods behind the endpoints, by address.
    pub pods: BTreeMap<IpAddr, PodNode>,
}

/// A frontend: address, port, protocol, kind.
#[derive(Clone, Debug, PartialEq)]
pub struct FrontendNode {
    /// The frontend.
    pub key: FrontendKey,
    /// The chain it jumps to (an index into [`ServiceGraph::chains`]).
    pub chain: usize,
    /// The node-local shortcut's chain for pods and the node itself
    /// (`externalTrafficPolicy: Local`), if any.
    pub shortcut: Option<usize>,
    /// Whether traffic through it is masqueraded.
    pub masquerade: Masquerade,
    /// What happens without endpoints.
    pub on_empty: EmptyAction,
}

/// The chain of a backend set.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainNode {
    /// `KUBE-SVC-...` or `KUBE-SVL-...`.
    pub name: String,
    /// The Service port.
    pub port: ServicePortName,
    /// Cluster-wide or node-local.
    pub locality: Locality,
    /// One branch per endpoint, in rule order.
    pub branches: Vec<Branch>,
}

/// One endpoint's rule in a chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Branch {
    /// `KUBE-SEP-...`.
    pub chain: String,
    /// The endpoint.
    pub endpoint: PlanEndpoint,
    /// The probability this rule matches, given the earlier ones did not (iptables'
    /// `--probability`).
    pub probability: f64,
    /// The share of new connections this endpoint gets: its weight over the set's.
    pub share: f64,
}

/// A pod behind an endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct PodNode {
    /// The pod's name, when the EndpointSlice names it.
    pub name: Option<String>,
    /// The node it runs on.
    pub node: Option<String>,
}

impl ServiceGraph {
    /// The graph of `service` in `plan`; `None` when the plan has nothing for it (not a
    /// proxied Service, or unknown).
    pub fn build(cluster: &Cluster, plan: &Plan, service: &ServiceName) -> Option<ServiceGraph> {
        let style = plan.node().chain_ids;
        let mut chains: Vec<ChainNode> = Vec::new();
        let mut index = BTreeMap::new();
        for (id, set) in plan
            .backend_sets()
            .filter(|(id, _)| id.service_port.service == *service)
        {
            let prefix = match id.locality {
                Locality::Cluster => "KUBE-SVC-",
                Locality::Local => "KUBE-SVL-",
            };
            let total: u64 = set.endpoints.iter().map(|e| u64::from(e.weight)).sum();
            let branches = set
                .endpoints
                .iter()
                .zip(set.probabilities())
                .map(|(e, p)| Branch {
                    chain: format!("KUBE-SEP-{}", set.endpoint_chain(style, e)),
                    endpoint: e.clone(),
                    probability: p.as_f64(),
                    share: if total == 0 {
                        0.0
                    } else {
                        f64::from(e.weight) / total as f64
                    },
                })
                .collect();
            index.insert(id.clone(), chains.len());
            chains.push(ChainNode {
                name: format!("{prefix}{}", set.chain),
                port: id.service_port.clone(),
                locality: id.locality,
                branches,
            });
        }
        let frontends: Vec<FrontendNode> = plan
            .frontends()
            .filter(|(_, f)| f.service_port.service == *service)
            .filter_map(|(k, f)| {
                Some(FrontendNode {
                    key: *k,
                    chain: *index.get(&f.backends)?,
                    shortcut: f
                        .local_shortcut
                        .as_ref()
                        .and_then(|s| index.get(s).copied()),
                    masquerade: f.masquerade,
                    on_empty: f.on_empty,
                })
            })
            .collect();
        if frontends.is_empty() && chains.is_empty() {
            return None;
        }
        let mut names: BTreeMap<IpAddr, PodNode> = BTreeMap::new();
        if let Some(svc) = cluster.service(service) {
            for (_, eps) in cluster.endpoints(svc).values() {
                for e in eps {
                    names.insert(
                        e.endpoint.ip,
                        PodNode {
                            name: e.endpoint.pod.clone(),
                            node: e.endpoint.node_name.clone(),
                        },
                    );
                }
            }
        }
        let pods = chains
            .iter()
            .flat_map(|c| &c.branches)
            .map(|b| {
                let ip = b.endpoint.addr.ip();
                let pod = names.get(&ip).cloned().unwrap_or(PodNode {
                    name: None,
                    node: b.endpoint.node.clone(),
                });
                (ip, pod)
            })
            .collect();
        Some(ServiceGraph {
            service: service.clone(),
            node: plan.node().node_name.clone(),
            frontends,
            chains,
            pods,
        })
    }

    /// Graphviz DOT (`dot -Tsvg` draws it).
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "digraph {} {{", dot_quote(&self.service.to_string()));
        let _ = writeln!(
            out,
            "  label={}; labelloc=t; rankdir=LR;",
            dot_quote(&format!("{} on node {}", self.service, self.node))
        );
        out.push_str("  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
        out.push_str("  edge [fontname=\"monospace\", fontsize=9];\n");
        for f in &self.frontends {
            let _ = writeln!(
                out,
                "  {} [label={}];",
                dot_quote(&frontend_id(&f.key)),
                dot_quote(&frontend_label(f))
            );
            let _ = writeln!(
                out,
                "  {} -> {};",
                dot_quote(&frontend_id(&f.key)),
                dot_quote(&self.chains[f.chain].name)
            );
            if let Some(s) = f.shortcut {
                let _ = writeln!(
                    out,
                    "  {} -> {} [style=dashed, label=\"pods and the node\"];",
                    dot_quote(&frontend_id(&f.key)),
                    dot_quote(&self.chains[s].name)
                );
            }
        }
        for c in &self.chains {
            let _ = writeln!(
                out,
                "  {} [label={}];",
                dot_quote(&c.name),
                dot_quote(&chain_label(c))
            );
            for b in &c.branches {
                let _ = writeln!(
                    out,
                    "  {} [label={}];",
                    dot_quote(&b.chain),
                    dot_quote(&format!("{}\nDNAT {}", b.chain, b.endpoint.addr))
                );
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    dot_quote(&c.name),
                    dot_quote(&b.chain),
                    dot_quote(&branch_label(b))
                );
                let _ = writeln!(
                    out,
                    "  {} -> {};",
                    dot_quote(&b.chain),
                    dot_quote(&format!("pod:{}", b.endpoint.addr.ip()))
                );
            }
        }
        for (node, pods) in self.pods_by_node() {
            let _ = writeln!(
                out,
                "  subgraph {} {{",
                dot_quote(&format!("cluster_{}", node.unwrap_or("unknown")))
            );
            let _ = writeln!(
                out,
                "    label={};",
                dot_quote(&format!("node {}", node.unwrap_or("(unknown)")))
            );
            for (ip, pod) in pods {
                let _ = writeln!(
                    out,
                    "    {} [label={}, shape=ellipse];",
                    dot_quote(&format!("pod:{ip}")),
                    dot_quote(&pod_label(*ip, pod))
                );
            }
            out.push_str("  }\n");
        }
        out.push_str("}\n");
        out
    }

    /// A self-contained SVG: four columns (frontends, Service chains, endpoint chains,
    /// pods boxed by node), edges labelled with rule probabilities and shares.
    pub fn to_svg(&self) -> String {
        const ROW: f64 = 46.0;
        const TOP: f64 = 86.0;
        const BOX_H: f64 = 34.0;
        const COLS: [(f64, f64); 4] = [
            (16.0, 220.0),
            (300.0, 230.0),
            (680.0, 240.0),
            (990.0, 200.0),
        ];
        // Rows: one per branch (an empty chain takes one row of its own).
        let mut chain_y = Vec::new();
        let mut branch_y: Vec<Vec<f64>> = Vec::new();
        let mut row = 0.0_f64;
        for c in &self.chains {
            let first = row;
            let mut ys = Vec::new();
            for _ in &c.branches {
                ys.push(TOP + row * ROW);
                row += 1.0;
            }
            if c.branches.is_empty() {
                row += 1.0;
            }
            chain_y.push(TOP + (first + row - 1.0) / 2.0 * ROW);
            branch_y.push(ys);
        }
        // Pods: grouped by node, a gap between nodes.
        let mut pod_y: BTreeMap<IpAddr, f64> = BTreeMap::new();
        let mut groups = Vec::new();
        let mut prow = 0.0_f64;
        for (node, pods) in self.pods_by_node() {
            let first = prow;
            for (ip, _) in &pods {
                pod_y.insert(**ip, TOP + 14.0 + prow * ROW);
                prow += 1.0;
            }
            groups.push((node, first, prow));
            prow += 0.6;
        }
        let rows = row.max(prow).max(self.frontends.len() as f64).max(1.0);
        let height = TOP + rows * ROW + 30.0;
        let frontend_y: Vec<f64> = (0..self.frontends.len())
            .map(|i| {
                let spread = (rows - 1.0).max(0.0) * ROW;
                let step = if self.frontends.len() > 1 {
                    spread / (self.frontends.len() - 1) as f64
                } else {
                    0.0
                };
                TOP + if self.frontends.len() > 1 {
                    i as f64 * step
                } else {
                    spread / 2.0
                }
            })
            .collect();
        let width = COLS[3].0 + COLS[3].1 + 16.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"monospace\" font-size=\"11\">"
        );
        let _ = writeln!(
            s,
            "<title>{}</title>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
            xml_escape(&format!("{} on node {}", self.service, self.node))
        );
        let _ = writeln!(
            s,
            "<text x=\"16\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{}</text>",
            xml_escape(&format!("{} on node {}", self.service, self.node))
        );
        for (i, title) in ["frontends", "Service chains", "endpoint chains", "pods"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                s,
                "<text x=\"{:.0}\" y=\"48\" fill=\"#555\">{title}</text>",
                COLS[i].0
            );
        }
        // Node boxes behind the pods.
        for (node, first, last) in &groups {
            let y0 = TOP + 14.0 + first * ROW - BOX_H / 2.0 - 16.0;
            let h = (last - first - 1.0) * ROW + BOX_H + 24.0;
            let _ = writeln!(
                s,
                "<rect x=\"{:.0}\" y=\"{y0:.1}\" width=\"{:.0}\" height=\"{h:.1}\" rx=\"8\" fill=\"#f3f6fb\" stroke=\"#9ab\"/><text x=\"{:.0}\" y=\"{:.1}\" fill=\"#345\">{}</text>",
                COLS[3].0 - 8.0,
                COLS[3].1 + 16.0,
                COLS[3].0,
                y0 + 12.0,
                xml_escape(&format!("node {}", node.unwrap_or("(unknown)")))
            );
        }
        // Edges first, boxes over them.
        for (f, y) in self.frontends.iter().zip(&frontend_y) {
            edge(&mut s, COLS[0], *y, COLS[1], chain_y[f.chain], None, false);
            if let Some(sc) = f.shortcut {
                edge(
                    &mut s,
                    COLS[0],
                    *y,
                    COLS[1],
                    chain_y[sc],
                    Some("pods, node"),
                    true,
                );
            }
        }
        for (ci, c) in self.chains.iter().enumerate() {
            for (b, y) in c.branches.iter().zip(&branch_y[ci]) {
                edge(
                    &mut s,
                    COLS[1],
                    chain_y[ci],
                    COLS[2],
                    *y,
                    Some(&branch_label(b)),
                    false,
                );
                if let Some(py) = pod_y.get(&b.endpoint.addr.ip()) {
                    edge(&mut s, COLS[2], *y, COLS[3], *py, None, false);
                }
            }
        }
        for (f, y) in self.frontends.iter().zip(&frontend_y) {
            node_box(&mut s, COLS[0], *y, &frontend_label(f), "#fff7e0");
        }
        for (ci, c) in self.chains.iter().enumerate() {
            node_box(&mut s, COLS[1], chain_y[ci], &chain_label(c), "#e8f4ea");
            for (b, y) in c.branches.iter().zip(&branch_y[ci]) {
                let label = format!("{}\nDNAT {}", b.chain, b.endpoint.addr);
                node_box(&mut s, COLS[2], *y, &label, "#eef");
            }
        }
        for (ip, pod) in &self.pods {
            if let Some(y) = pod_y.get(ip) {
                node_box(&mut s, COLS[3], *y, &pod_label(*ip, pod), "#fff");
            }
        }
        s.push_str("</svg>\n");
        s
    }

    fn pods_by_node(&self) -> BTreeMap<Option<&str>, Vec<(&IpAddr, &PodNode)>> {
        let mut by: BTreeMap<Option<&str>, Vec<(&IpAddr, &PodNode)>> = BTreeMap::new();
        for (ip, pod) in &self.pods {
            by.entry(pod.node.as_deref()).or_default().push((ip, pod));
        }
        by
    }
}

fn frontend_id(k: &FrontendKey) -> String {
    format!("frontend:{k}")
}

fn frontend_label(f: &FrontendNode) -> String {
    let mut l = format!(
        "{} {}\n{}",
        f.key.kind.as_str(),
        f.key.protocol,
        std::net::SocketAddr::new(f.key.addr, f.key.port)
    );
    match f.masquerade {
        Masquerade::Never => {}
        Masquerade::OffCluster => l.push_str("\nmasquerade unless from a pod"),
        Masquerade::Always => l.push_str("\nmasquerade"),
    }
    if f.on_empty == EmptyAction::Drop {
        l.push_str("\nno endpoint: DROP");
    }
    l
}

fn chain_label(c: &ChainNode) -> String {
    let what = match c.locality {
        Locality::Cluster => "every endpoint",
        Locality::Local => "this node's endpoints",
    };
    if c.branches.is_empty() {
        format!("{}\n{what}: none", c.name)
    } else {
        format!("{}\n{what}", c.name)
    }
}

fn branch_label(b: &Branch) -> String {
    let mut l = format!("p {:.4} → {:.0}%", b.probability, b.share * 100.0);
    if b.endpoint.terminating {
        l.push_str(" terminating");
    }
    l
}

fn pod_label(ip: IpAddr, pod: &PodNode) -> String {
    match &pod.name {
        Some(name) => format!("{name}\n{ip}"),
        None => ip.to_string(),
    }
}

fn dot_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {}
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// `s` as XML or HTML text or attribute value: `& < > " '` escaped, control characters
/// other than newline dropped.
pub fn xml_escape(s: &str) -> String {
    let mut e = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => e.push_str("&amp;"),
            '<' => e.push_str("&lt;"),
            '>' => e.push_str("&gt;"),
            '"' => e.push_str("&quot;"),
            '\'' => e.push_str("&apos;"),
            c if c.is_control() && c != '\n' => {}
            c => e.push(c),
        }
    }
    e
}

/// A box centred vertically on `y` with one or two lines of text.
fn node_box(s: &mut String, (x, w): (f64, f64), y: f64, label: &str, fill: &str) {
    let lines: Vec<&str> = label.lines().collect();
    let h = 14.0 * lines.len() as f64 + 8.0;
    let _ = write!(
        s,
        "<rect x=\"{x:.0}\" y=\"{:.1}\" width=\"{w:.0}\" height=\"{h:.1}\" rx=\"4\" fill=\"{fill}\" stroke=\"#333\"/>",
        y - h / 2.0
    );
    for (i, l) in lines.iter().enumerate() {
        let _ = write!(
            s,
            "<text x=\"{:.0}\" y=\"{:.1}\">{}</text>",
            x + 6.0,
            y - h / 2.0 + 15.0 + 14.0 * i as f64,
            xml_escape(l)
        );
    }
    s.push('\n');
}

/// A curve from the right side of one column to the left side of the next.
fn edge(
    s: &mut String,
    (x0, w0): (f64, f64),
    y0: f64,
    (x1, _): (f64, f64),
    y1: f64,
    label: Option<&str>,
    dashed: bool,
) {
    let (ax, bx) = (x0 + w0, x1);
    let mid = (ax + bx) / 2.0;
    let dash = if dashed {
        " stroke-dasharray=\"5,3\""
    } else {
        ""
    };
    let _ = write!(
        s,
        "<path d=\"M{ax:.1},{y0:.1} C{mid:.1},{y0:.1} {mid:.1},{y1:.1} {bx:.1},{y1:.1}\" fill=\"none\" stroke=\"#567\"{dash}/>"
    );
    if let Some(l) = label {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#246\" text-anchor=\"end\">{}</text>",
            bx - 4.0,
            y1 - 5.0,
            xml_escape(l)
        );
    }
    s.push('\n');
}

/// Which Services `plan` has something for, for listing.
pub fn services(plan: &Plan) -> BTreeSet<ServiceName> {
    plan.backend_sets()
        .map(|(id, _)| id.service_port.service.clone())
        .chain(
            plan.frontends()
                .map(|(_, f)| f.service_port.service.clone()),
        )
        .collect()
}
