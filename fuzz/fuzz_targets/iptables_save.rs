//! What the iptables backend reads back from the kernel's tools: `iptables-save` output
//! (owned chains, base jumps), `iptables-restore`'s error text (the failing line), and
//! restore text through the tracer's restore model and rule parser. Anyone on the node can
//! put anything in those tables, so any text must be read without a panic, and the answers
//! must stay consistent with the text.
#![no_main]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_core::model::Protocol;
use svcnat_core::plan::{NodeContext, Plan};
use svcnat_iptables::driver::{failing_line, has_jump, is_service_chain, owned_in_save};
use svcnat_iptables::render::{Ruleset, Table, base_jumps};
use svcnat_iptables::trace::{Hook, Packet, RecentTable, RestoreModel, Tracer};

const CLUSTER: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  selector: {app: web}
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [198.51.100.0/24]
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.7}]}}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec: {selector: {app: none}, ports: [{port: 81}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: web, image: nginx}]}
status: {podIP: 10.244.0.10}
";

struct Fixture {
    model: RestoreModel,
    fixed: BTreeSet<String>,
    node_ip: IpAddr,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let cfg = ClusterConfig::default();
        let mut m = Manifests::from_files([("cluster.yaml", CLUSTER)], &cfg);
        let cluster = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let node_ip = IpAddr::from([192, 168, 0, 1]);
        let node = NodeContext::new(
            "node-1",
            vec![node_ip],
            vec!["10.244.0.0/24".parse().unwrap()],
        );
        let rules = Ruleset::new(&Plan::compile(&cluster, &node));
        let empty = Ruleset::new(&Plan::empty(NodeContext::new("", Vec::new(), Vec::new())));
        Fixture {
            model: RestoreModel::of(&rules).expect("the renderer's own text restores"),
            fixed: empty.chains().map(|(_, c)| c.to_string()).collect(),
            node_ip,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let f = fixture();

    // iptables-save: every owned chain is one the text declares, and is ours.
    let declared: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for c in owned_in_save(&text, &f.fixed) {
        assert!(declared.contains(c.as_str()), "{c} not declared");
        assert!(
            is_service_chain(&c) || f.fixed.contains(&c),
            "{c} is not ours"
        );
    }
    for (_, builtin, rule) in base_jumps() {
        if has_jump(&text, builtin, &rule) {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("-A {builtin} ")))
            );
        }
    }
    // iptables-restore's stderr: a line number only when the text names one.
    if let Some(n) = failing_line(&text) {
        assert!(
            text.contains("line") && text.contains(&n.to_string()),
            "line {n} from nowhere"
        );
    }

    // Restore text over a real ruleset: applied or refused, and whatever state results is
    // either traced or refused with an error, never a panic or a hang.
    let mut model = f.model.clone();
    let before = model.clone();
    if let Err(e) = model.apply(&text) {
        let _ = e.to_string();
        assert!(e.line >= 1, "{e}");
    }
    if text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .all(|l| l.trim_start().starts_with('#'))
    {
        assert_eq!(model, before, "comments changed the model");
    }
    for (t, _, _) in model.chains() {
        assert!(matches!(t, Table::Nat | Table::Filter));
    }
    let Ok(tracer) = Tracer::from_model(&model, vec![f.node_ip]) else {
        return;
    };
    let packets = [
        (
            IpAddr::from([198, 51, 100, 9]),
            IpAddr::from([203, 0, 113, 7]),
            80,
            Protocol::Tcp,
        ),
        (
            IpAddr::from([10, 244, 0, 10]),
            IpAddr::from([10, 96, 0, 1]),
            81,
            Protocol::Tcp,
        ),
        (
            IpAddr::from([192, 0, 2, 1]),
            f.node_ip,
            30080,
            Protocol::Udp,
        ),
    ];
    for (i, (src, dst, port, protocol)) in packets.into_iter().enumerate() {
        let pkt = Packet {
            src,
            src_port: 40000,
            dst,
            dst_port: port,
            protocol,
        };
        let mut recent = RecentTable::new();
        for hook in [Hook::Prerouting, Hook::Output] {
            let r = data.get(i).map_or(0.5, |b| f64::from(*b) / 256.0);
            let _ = tracer.trace(&pkt, hook, &mut || r, &mut recent, 1000);
        }
    }
});
