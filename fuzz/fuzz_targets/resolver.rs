//! DNS question names from the wire, through the resolver and the search-path expansion:
//! never a panic, and every answer is consistent (NXDOMAIN and REFUSED carry no records).
#![no_main]

use libfuzzer_sys::fuzz_target;
use svcnat_core::discovery::{DiscoveryConfig, QueryType, Rcode, Resolver, SearchConfig};
use svcnat_core::manifest::{ClusterConfig, Manifests};

const CLUSTER: &str = "apiVersion: v1
kind: Service
metadata: {name: redis, namespace: instavote}
spec: {selector: {app: redis}, ports: [{name: redis, port: 6379}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: instavote}
spec: {clusterIP: None, selector: {app: db}, ports: [{name: pg, port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: instavote, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: pg, image: postgres}]}
status: {podIP: 10.244.0.20}
";

fuzz_target!(|data: &[u8]| {
    let Some((&kind, name)) = data.split_first() else {
        return;
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let cfg = ClusterConfig::default();
    let mut m = Manifests::from_files([("cluster.yaml", CLUSTER)], &cfg);
    let cluster = m.build(&cfg);
    let resolver = Resolver::new(&cluster, DiscoveryConfig::default());
    let qtypes = [
        QueryType::A,
        QueryType::Aaaa,
        QueryType::Srv,
        QueryType::Ptr,
        QueryType::Cname,
        QueryType::Any,
    ];
    let qtype = qtypes[usize::from(kind) % qtypes.len()];
    let answer = resolver.query(name, qtype);
    if answer.rcode != Rcode::NoError {
        assert!(answer.records.is_empty());
    }
    let search = SearchConfig::for_pod("instavote", "cluster.local");
    let _ = resolver.resolve(name, qtype, &search);
});
