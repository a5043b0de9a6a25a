//! Bad input: every case under `tests/bad_inputs/` (a `*.yaml` or `*.json` file, or a
//! directory whose `*.yaml` and `*.json` files load in name order like `kubectl apply -f DIR`) is loaded and built, and
//! the exact errors and warnings `manifest::LoadError` prints, together with what survived
//! (each Service with its endpoint count, each Pod, EndpointSlice and Node), must equal the
//! case's `.expected` file: every bad object is named with its field, and nothing good in
//! the same files is lost. Also: a huge manifest loads without blowup, and deeply nested
//! or self-multiplying YAML gives a clean error.
//!
//! After a deliberate change, regenerate with `SVCNAT_BLESS=1 cargo test -p svcnat-core
//! --test bad_inputs` and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use svcnat_core::manifest::{ClusterConfig, Manifests, Object, ValidateError};
use svcnat_core::model::Cluster;
use svcnat_core::plan::{NodeContext, Plan};

fn cases() -> Vec<(String, Vec<PathBuf>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs");
    let mut cases = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            let mut files: Vec<PathBuf> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "json"))
                .collect();
            files.sort();
            cases.push((name, files));
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "json") {
            cases.push((name, vec![p]));
        }
    }
    cases
}

/// Loads the files under their base names and reports errors, warnings and survivors.
fn report(files: &[PathBuf]) -> String {
    let texts: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            (
                f.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read_to_string(f).unwrap(),
            )
        })
        .collect();
    let cfg = ClusterConfig::default();
    let mut m = Manifests::from_files(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())), &cfg);
    let cluster = m.build(&cfg);
    let mut out = String::new();
    for e in &m.errors {
        writeln!(out, "error: {e}").unwrap();
    }
    for w in &m.warnings {
        writeln!(out, "warning: {w}").unwrap();
    }
    out.push_str(&survivors(&m, &cluster));
    // Whatever loaded also compiles and renders.
    let node = NodeContext::new("node-1", vec![[192, 168, 0, 1].into()], Vec::new());
    let plan = Plan::compile(&cluster, &node);
    assert!(!plan.render().is_empty());
    out
}

fn survivors(m: &Manifests, cluster: &Cluster) -> String {
    let mut out = String::new();
    for svc in cluster.services() {
        let endpoints: usize = cluster
            .endpoints(svc)
            .values()
            .map(|(_, eps)| eps.len())
            .sum();
        writeln!(out, "loaded: Service {} ({endpoints} endpoints)", svc.name).unwrap();
    }
    for pod in cluster.pods() {
        writeln!(out, "loaded: Pod {}", pod.name).unwrap();
    }
    for l in &m.objects {
        if let Object::Slices(slices) = &l.object {
            for s in slices {
                writeln!(out, "loaded: EndpointSlice {} of {}", s.name, s.service).unwrap();
            }
        }
    }
    for n in cluster.nodes() {
        writeln!(out, "loaded: Node {}", n.name).unwrap();
    }
    out
}

#[test]
fn every_bad_input_gives_its_exact_error_and_the_rest_loads() {
    let bless = std::env::var_os("SVCNAT_BLESS").is_some();
    let cases = cases();
    assert!(cases.len() >= 8, "cases found: {}", cases.len());
    let mut failed = Vec::new();
    for (name, files) in &cases {
        let got = report(files);
        let expected_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/bad_inputs")
            .join(format!("{name}.expected"));
        if bless {
            fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        if got != want {
            eprintln!("--- {name}: expected\n{want}--- got\n{got}");
            failed.push(name.clone());
        }
        // Every case holds at least one bad object and one good one that survives.
        assert!(got.contains("error: "), "{name}: no error");
        assert!(got.contains("loaded: "), "{name}: nothing loaded");
    }
    assert!(failed.is_empty(), "differ: {failed:?}");
}

/// 50,000 objects (25,000 Services each selecting one of 25,000 Pods), tens of megabytes
/// of YAML in one file: all load, each Service finds its Pod, and one bad object in the
/// middle is reported without losing its neighbours.
#[test]
fn a_huge_manifest_loads_whole() {
    const N: usize = 25_000;
    let mut text = String::with_capacity(N * 700);
    for i in 0..N {
        let port = if i == N / 2 { 70000 } else { 80 };
        write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: ns-{ns}\n  \
             labels: {{app: app-{i}, tier: backend, team: team-{team}}}\n  annotations:\n    \
             description: \"{pad}\"\nspec:\n  selector: {{app: app-{i}}}\n  ports:\n  - name: \
             http\n    port: {port}\n    targetPort: 8080\n---\napiVersion: v1\nkind: Pod\n\
             metadata:\n  name: pod-{i}\n  namespace: ns-{ns}\n  labels: {{app: app-{i}}}\n\
             spec:\n  nodeName: node-1\n  containers: [{{name: c, image: nginx, ports: \
             [{{containerPort: 8080}}]}}]\nstatus:\n  phase: Running\n  podIP: 10.{a}.{b}.{c}\n  \
             conditions: [{{type: Ready, status: \"True\"}}]\n",
            ns = i % 50,
            team = i % 7,
            pad = "x".repeat(300),
            a = 244 + i / 65_536,
            b = (i / 256) % 256,
            c = i % 256,
        )
        .unwrap();
    }
    assert!(text.len() > 20_000_000, "{} bytes", text.len());
    let cfg = {
        let mut cfg = ClusterConfig::default();
        cfg.pod_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        cfg
    };
    let mut m = Manifests::from_files([("huge.yaml", text.as_str())], &cfg);
    let cluster = m.build(&cfg);
    let errors: Vec<String> = m.errors.iter().map(ToString::to_string).collect();
    let bad = N / 2;
    assert_eq!(
        errors,
        [format!(
            "huge.yaml:{}: document {}: Service ns-{}/svc-{bad}: spec.ports[0].port: Invalid \
             value: 70000: must be between 1 and 65535, inclusive",
            text.lines().position(|l| l == "    port: 70000").unwrap() + 1,
            2 * bad,
            bad % 50
        )]
    );
    assert_eq!(cluster.services().count(), N - 1);
    assert_eq!(cluster.pods().count(), N);
    let with_one_endpoint = cluster
        .services()
        .filter(|s| {
            cluster
                .endpoints(s)
                .values()
                .map(|(_, e)| e.len())
                .sum::<usize>()
                == 1
        })
        .count();
    assert_eq!(with_one_endpoint, N - 1);
}

/// YAML nested far deeper than any manifest: a clean error at the document, no stack
/// overflow, and the next document still loads.
#[test]
fn deeply_nested_yaml_errors_cleanly() {
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let depth = 100_000;
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {}{}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: next}}\nspec: {{ports: [{{port: 80}}]}}\n",
            open.repeat(depth),
            close.repeat(depth)
        );
        let cfg = ClusterConfig::default();
        let mut m = Manifests::from_files([("deep.yaml", text.as_str())], &cfg);
        let cluster = m.build(&cfg);
        let errors: Vec<String> = m.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            ["deep.yaml:4: document 0: invalid YAML: recursion limit exceeded"],
            "{open}"
        );
        let names: Vec<String> = cluster.services().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["default/next"]);
    }
}

/// A "billion laughs" document (aliases that multiply a value a billion times) is refused
/// instead of expanded, and the next document still loads.
#[test]
fn self_multiplying_aliases_are_refused() {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: laughs}\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        writeln!(
            text,
            "x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]"
        )
        .unwrap();
    }
    text.push_str("spec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: next}\nspec: {ports: [{port: 80}]}\n");
    let cfg = ClusterConfig::default();
    let mut m = Manifests::from_files([("laughs.yaml", text.as_str())], &cfg);
    let cluster = m.build(&cfg);
    assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
    let e = &m.errors[0];
    assert_eq!(e.document, 0);
    assert!(
        matches!(&e.error, ValidateError::Yaml(msg) if msg.contains("repetition limit exceeded")),
        "{e}"
    );
    let names: Vec<String> = cluster.services().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["default/next"]);
}
