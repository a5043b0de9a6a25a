//! Raw DNS messages into the server's sans-IO handler, over both transports: never a panic,
//! and every reply is a well-formed response to that query: same id, QR set, RA clear (the
//! server never recurses), within the transport's size limit, and never a reply to a
//! response; silence over UDP only for what is not a plausible query, never over TCP.
#![no_main]

use std::sync::OnceLock;

use hickory_proto::op::{Header, Message, MessageType, OpCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use libfuzzer_sys::fuzz_target;
use svcnat_core::discovery::{DiscoveryConfig, Resolver};
use svcnat_core::manifest::{ClusterConfig, Manifests};
use svcnat_examples::dns::{EDNS_PAYLOAD, TCP_MAX_MESSAGE, Transport, handle_query};

/// A small cluster with every kind of name: ClusterIP with named ports (SRV), headless with
/// hostnames, ExternalName (CNAME), PTR and many endpoints
/// (truncation over UDP).
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
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.50
  selector: {app: web}
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: search, namespace: default}
spec: {type: ExternalName, externalName: search.example.com}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: instavote}
spec:
  replicas: 60
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {subdomain: db, containers: [{name: pg, image: postgres}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: instavote, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: pg, image: postgres}]}
status: {podIP: 10.244.0.20}
";

fn resolver() -> &'static Resolver {
    static RESOLVER: OnceLock<Resolver> = OnceLock::new();
    RESOLVER.get_or_init(|| {
        let cfg = ClusterConfig::default();
        let mut m = Manifests::from_files([("cluster.yaml", CLUSTER)], &cfg);
        let cluster = m.build(&cfg);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        Resolver::new(&cluster, DiscoveryConfig::default())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, query)) = data.split_first() else {
        return;
    };
    let transport = if how & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let Some(reply) = handle_query(resolver(), query, transport) else {
        // Silence for what has no header or is itself a response, and over UDP (where the
        // source is unproven) for anything that is not a plausible query: another opcode
        // than QUERY, a message that does not parse, not exactly one question. Over TCP
        // every query is answered, with NOTIMP or FORMERR when it must be.
        if let Ok(h) = Header::read(&mut BinDecoder::new(query))
            && h.message_type == MessageType::Query
        {
            let plausible = h.op_code == OpCode::Query
                && Message::from_vec(query).is_ok_and(|m| m.queries.len() == 1);
            assert!(
                transport == Transport::Udp && !plausible,
                "a query went unanswered over {transport:?} (plausible: {plausible})"
            );
        }
        return;
    };
    let limit = match transport {
        Transport::Udp => usize::from(EDNS_PAYLOAD),
        Transport::Tcp => TCP_MAX_MESSAGE,
    };
    assert!(
        reply.len() <= limit,
        "{} bytes over {transport:?}",
        reply.len()
    );
    let question =
        Header::read(&mut BinDecoder::new(query)).expect("answered a headerless message");
    let answer = Message::from_vec(&reply).expect("the reply parses");
    assert_eq!(answer.metadata.id, question.id);
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    assert!(!answer.metadata.recursion_available, "RA set");
    assert_eq!(
        answer.metadata.recursion_desired,
        question.recursion_desired
    );
});
