//! `svcnat-ctl` as a kubectl user drives it: the built binary on a scratch manifest
//! directory (no root, no network namespaces).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

const CTL: &str = env!("CARGO_BIN_EXE_svcnat-ctl");

/// A manifest directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "svcnat-ctl-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn with(files: &[(&str, &str)]) -> Scratch {
        let s = Scratch::new();
        for (name, text) in files {
            fs::write(s.0.join(name), text).unwrap();
        }
        s
    }

    /// Runs `svcnat-ctl --manifests DIR ARGS...`.
    fn ctl(&self, args: &[&str]) -> Run {
        let out = Command::new(CTL)
            .arg("--manifests")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The lab's front end: a NodePort Service selecting two labels, and its two Pods; a
/// selector-less Service in another namespace.
const APP: &str = "\
apiVersion: v1
kind: Service
metadata: {name: vote, namespace: instavote, creationTimestamp: \"2024-01-01T00:00:00Z\"}
spec:
  type: NodePort
  clusterIP: 10.96.10.10
  selector: {tier: front, app: vote}
  ports: [{port: 80, targetPort: 80, nodePort: 30000}]
---
apiVersion: v1
kind: Pod
metadata: {name: vote-a, namespace: instavote, labels: {app: vote, tier: front}}
spec: {nodeName: k-02, containers: [{name: app, image: vote}]}
status: {phase: Running, podIP: 10.32.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: vote-b, namespace: instavote, labels: {app: vote, tier: front}}
spec: {nodeName: k-03, containers: [{name: app, image: vote}]}
status: {phase: Running, podIP: 10.38.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: external-db, namespace: ops}
spec:
  clusterIP: 10.96.20.20
  ports: [{port: 5432}]
";

/// Kinds svcnat does not read, namespaced and cluster-scoped.
const OTHERS: &str = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: a, namespace: instavote}
data: {k: v}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules: []
---
apiVersion: v1
kind: ConfigMap
metadata: {name: b}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: instavote}
spec: {}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c, namespace: ops}
";

#[test]
fn skipped_kinds_are_counted_on_one_line_and_do_not_fail() {
    let dir = Scratch::with(&[("app.yaml", APP), ("others.yaml", OTHERS)]);
    let run = dir.ctl(&["get", "svc", "-A"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("instavote   vote "), "{run:?}");
    assert_eq!(
        run.stderr,
        "skipped: 3 ConfigMap, 1 ClusterRole, 1 Ingress (kinds svcnat does not read)\n"
    );
    // No object is named on that line, so the cluster-scoped ClusterRole is never shown
    // in the default namespace.
    assert!(!run.stderr.contains("default/"), "{run:?}");
    // Every command reports them, the plan too.
    let plan = dir.ctl(&["plan", "--node-name", "k-02", "--node-ip", "192.168.50.12"]);
    assert_eq!(plan.code, Some(0), "{plan:?}");
    assert!(plan.stderr.starts_with("skipped: 3 ConfigMap"), "{plan:?}");
    // Without such documents, nothing is said.
    let quiet = Scratch::with(&[("app.yaml", APP)]).ctl(&["get", "svc", "-A"]);
    assert_eq!((quiet.code, quiet.stderr.as_str()), (Some(0), ""));
}

#[test]
fn a_broken_file_still_fails_next_to_skipped_kinds() {
    let broken =
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  ports: [{port: 99999}]\n";
    let dir = Scratch::with(&[
        ("app.yaml", APP),
        ("others.yaml", OTHERS),
        ("z.yaml", broken),
    ]);
    let run = dir.ctl(&["get", "svc", "-A"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("skipped: 3 ConfigMap"), "{run:?}");
    assert!(run.stderr.contains("error: "), "{run:?}");
    assert!(run.stderr.contains("z.yaml:5:"), "{run:?}");
    assert!(run.stderr.contains("spec.ports[0].port"), "{run:?}");
}

#[test]
fn get_one_object_by_name() {
    let dir = Scratch::with(&[("app.yaml", APP)]);
    let svc = dir.ctl(&["get", "svc", "vote", "-n", "instavote"]);
    assert_eq!(svc.code, Some(0), "{svc:?}");
    let lines: Vec<&str> = svc.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{svc:?}");
    assert!(lines[0].starts_with("NAME   TYPE       CLUSTER-IP    EXTERNAL-IP   PORT(S)"));
    assert!(lines[1].starts_with("vote   NodePort   10.96.10.10   <none>        80:30000/TCP"));

    let ep = dir.ctl(&["get", "endpoints", "vote", "-n", "instavote"]);
    assert_eq!(ep.code, Some(0), "{ep:?}");
    assert!(
        ep.stdout.contains("\nvote   10.32.0.6:80,10.38.0.5:80   "),
        "{ep:?}"
    );

    let pod = dir.ctl(&["get", "pods", "vote-b", "-n", "instavote", "-o", "wide"]);
    assert_eq!(pod.code, Some(0), "{pod:?}");
    assert_eq!(pod.stdout.lines().count(), 2, "{pod:?}");
    assert!(
        pod.stdout.contains("vote-b   1/1     Running   0 "),
        "{pod:?}"
    );
    assert!(pod.stdout.contains("   10.38.0.5   k-03\n"), "{pod:?}");
}

#[test]
fn a_missing_object_is_kubectls_not_found() {
    let dir = Scratch::with(&[("app.yaml", APP)]);
    for (args, line) in [
        (
            &["get", "svc", "nope", "-n", "instavote"][..],
            "Error from server (NotFound): services \"nope\" not found\n",
        ),
        (
            &["get", "endpoints", "nope", "-n", "instavote"][..],
            "Error from server (NotFound): endpoints \"nope\" not found\n",
        ),
        (
            &["get", "pods", "nope", "-n", "instavote"][..],
            "Error from server (NotFound): pods \"nope\" not found\n",
        ),
        (
            &["describe", "svc", "nope", "-n", "instavote"][..],
            "Error from server (NotFound): services \"nope\" not found\n",
        ),
        // The Service exists in another namespace only: not found here.
        (
            &["get", "svc", "vote"][..],
            "Error from server (NotFound): services \"vote\" not found\n",
        ),
        // A Service without a selector has no Endpoints object unless someone wrote one.
        (
            &["get", "ep", "external-db", "-n", "ops"][..],
            "Error from server (NotFound): endpoints \"external-db\" not found\n",
        ),
        (
            &["get", "svc", "vote", "-A"][..],
            "error: a resource cannot be retrieved by name across all namespaces\n",
        ),
    ] {
        let run = dir.ctl(args);
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(run.stdout, "", "{args:?}");
        assert_eq!(run.stderr, line, "{args:?}");
    }
}

#[test]
fn namespace_and_output_flags_go_anywhere() {
    let dir = Scratch::with(&[("app.yaml", APP)]);
    let reference = dir.ctl(&["get", "svc", "-n", "instavote", "-o", "wide"]);
    assert_eq!(reference.code, Some(0), "{reference:?}");
    for args in [
        &["-n", "instavote", "get", "svc", "-o", "wide"][..],
        &["-n", "instavote", "-o", "wide", "get", "svc"][..],
        &["get", "-o", "wide", "svc", "--namespace", "instavote"][..],
        &["--namespace=instavote", "get", "svc", "-owide"][..],
    ] {
        assert_eq!(dir.ctl(args).stdout, reference.stdout, "{args:?}");
    }
    let all = dir.ctl(&["-A", "get", "svc"]);
    assert_eq!(all.stdout, dir.ctl(&["get", "svc", "-A"]).stdout);
    assert!(all.stdout.starts_with("NAMESPACE "), "{all:?}");
    // The cluster flags too: --default-namespace after the subcommand.
    let defaulted = dir.ctl(&[
        "get",
        "svc",
        "--default-namespace",
        "instavote",
        "-o",
        "wide",
    ]);
    assert_eq!(defaulted.stdout, reference.stdout);
    // -n and -A exclude each other wherever they are.
    for args in [
        &["-A", "get", "svc", "-n", "instavote"][..],
        &["get", "svc", "-n", "instavote", "-A"][..],
    ] {
        let both = dir.ctl(args);
        assert_eq!(both.code, Some(2), "{both:?}");
        assert!(both.stderr.contains("cannot be used with"), "{both:?}");
    }
    // -o belongs to get.
    let describe = dir.ctl(&["describe", "svc", "vote", "-n", "instavote", "-o", "wide"]);
    assert_eq!(describe.code, Some(2), "{describe:?}");
}

#[test]
fn get_svc_wide_adds_the_selector_column() {
    let dir = Scratch::with(&[("app.yaml", APP)]);
    let run = dir.ctl(&["get", "svc", "-A", "-o", "wide"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    // kubectl's order: NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE SELECTOR.
    let head: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        head,
        [
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
            "SELECTOR"
        ]
    );
    assert!(lines[1].starts_with("instavote   vote "), "{run:?}");
    assert!(lines[1].ends_with("   app=vote,tier=front"), "{run:?}");
    assert!(lines[2].starts_with("ops         external-db "), "{run:?}");
    assert!(lines[2].ends_with("   <none>"), "{run:?}");
    // Without -o wide: no SELECTOR.
    let narrow = dir.ctl(&["get", "svc", "-A"]);
    assert!(!narrow.stdout.contains("SELECTOR"), "{narrow:?}");
    assert!(!narrow.stdout.contains("app=vote"), "{narrow:?}");
}

#[test]
fn describe_without_a_name_describes_every_service_in_scope() {
    let dir = Scratch::with(&[("app.yaml", APP)]);
    let run = dir.ctl(&["describe", "svc", "-A"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    // kubectl separates descriptions with two empty lines; Services in name order per
    // namespace.
    let parts: Vec<&str> = run.stdout.split("\n\n\n").collect();
    assert_eq!(parts.len(), 2, "{run:?}");
    assert!(parts[0].starts_with("Name:  "), "{run:?}");
    assert!(parts[0].contains("  vote\nNamespace:  "), "{run:?}");
    assert!(parts[1].contains("  external-db\nNamespace:  "), "{run:?}");
    let none = dir.ctl(&["describe", "svc", "-n", "empty"]);
    assert_eq!(none.code, Some(0), "{none:?}");
    assert_eq!(none.stdout, "");
    assert_eq!(none.stderr, "No resources found in empty namespace.\n");
}

/// A NodePort Service asking for port 8080, and one leaving its node port to allocation.
const LOW_NODE_PORTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, nodePort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  type: NodePort
  selector: {app: api}
  ports: [{port: 81}]
";

#[test]
fn service_node_port_range_sets_the_allowed_node_ports() {
    let dir = Scratch::with(&[("svc.yaml", LOW_NODE_PORTS)]);
    // The default range 30000-32767 refuses 8080, naming the file, line and field.
    let run = dir.ctl(&["get", "svc"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("svc.yaml:7:"), "{run:?}");
    assert!(run.stderr.contains("spec.ports[0].nodePort"), "{run:?}");
    assert!(run.stderr.contains("30000-32767"), "{run:?}");
    // With kube-apiserver's flag the file loads, and allocation stays in the range.
    let run = dir.ctl(&["get", "svc", "--service-node-port-range", "8000-8100"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("80:8080/TCP"), "{run:?}");
    let api = run.stdout.lines().find(|l| l.starts_with("api ")).unwrap();
    let port: u16 = api
        .split_once("81:")
        .and_then(|(_, rest)| rest.split_once("/TCP"))
        .map(|(p, _)| p.parse().unwrap())
        .unwrap();
    assert!((8000..=8100).contains(&port), "{api}");
    // Before the subcommand as well.
    let before = dir.ctl(&["--service-node-port-range", "8000-8100", "get", "svc"]);
    assert_eq!(before.stdout, run.stdout);
}

#[test]
fn an_invalid_node_port_range_is_a_clap_error() {
    let dir = Scratch::with(&[("svc.yaml", LOW_NODE_PORTS)]);
    for (range, why) in [
        (
            "32767-30000",
            "end port cannot be less than start port: 32767-30000",
        ),
        (
            "30000-70000",
            "the port range cannot be greater than 65535: 30000-70000",
        ),
        ("30000:32767", "is not a port number"),
    ] {
        let run = dir.ctl(&["get", "svc", "--service-node-port-range", range]);
        assert_eq!(run.code, Some(2), "{range}: {run:?}");
        assert!(
            run.stderr.starts_with(&format!(
                "error: invalid value '{range}' for '--service-node-port-range <MIN-MAX>': "
            )),
            "{range}: {run:?}"
        );
        assert!(run.stderr.contains(why), "{range}: {run:?}");
    }
}

#[test]
fn graph_draws_a_services_path_through_a_node() {
    let dir = Scratch::with(&[("app.yaml", APP)]);
    let svg = dir.ctl(&[
        "-n",
        "instavote",
        "graph",
        "svc",
        "vote",
        "--node-name",
        "k-02",
        "--node-ip",
        "192.168.50.12",
    ]);
    assert_eq!(svg.code, Some(0), "{svg:?}");
    assert!(svg.stdout.starts_with("<svg"), "{}", svg.stdout);
    assert!(svg.stdout.trim_end().ends_with("</svg>"));
    for want in [
        "vote-a",
        "vote-b",
        "node k-02",
        "node k-03",
        "DNAT 10.32.0.6:80",
        "DNAT 10.38.0.5:80",
        "10.96.10.10:80",
        "192.168.50.12:30000",
        "p 0.5000 → 50%",
        "p 1.0000 → 50%",
    ] {
        assert!(svg.stdout.contains(want), "{want} missing:\n{}", svg.stdout);
    }
    let dot = dir.ctl(&[
        "graph",
        "svc",
        "vote",
        "-n",
        "instavote",
        "--format",
        "dot",
        "--node-ip",
        "192.168.50.12",
    ]);
    assert_eq!(dot.code, Some(0), "{dot:?}");
    assert!(
        dot.stdout.starts_with("digraph \"instavote/vote\""),
        "{}",
        dot.stdout
    );
    // Without --node-name: the first pod's node (the manifests have no Node objects).
    assert!(dot.stdout.contains("on node k-02"), "{}", dot.stdout);
    assert!(
        dot.stdout.contains("-> \"pod:10.38.0.5\""),
        "{}",
        dot.stdout
    );
    let missing = dir.ctl(&["-n", "instavote", "graph", "svc", "nope"]);
    assert_eq!(missing.code, Some(1));
    assert!(
        missing
            .stderr
            .contains("Error from server (NotFound): services \"nope\" not found"),
        "{missing:?}"
    );
    let all = dir.ctl(&["-A", "graph", "svc", "vote"]);
    assert_eq!(all.code, Some(1), "{all:?}");
}
