//! The fake API server against kube-rs, the client svcnat-proxy and svcnat-dns use: list
//! and get, authentication, paging, and the watcher through every fault the server can
//! make (compaction, cut connections, the server going away). No root needed: the server
//! listens on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config, ResourceExt};
use svcnat_examples::fakeapi::{FakeApiOptions, FakeApiServer, Verb};

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn client(server: &FakeApiServer, context: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig_path()).unwrap();
    let options = KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)], port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ports: Some(vec![ServicePort {
                port,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(namespace: &str, name: &str, address: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                "web".to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![address.into()],
            ..Default::default()
        }]),
        ports: None,
    }
}

fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A watcher event in a few words: `Init`, `InitApply web`, `Apply web`, `Delete web`,
/// `Err 410`, `Err other`.
fn describe<K: ResourceExt>(event: &watcher::Result<Event<K>>) -> String {
    match event {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(o)) => format!("InitApply {}", o.name_any()),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(o)) => format!("Apply {}", o.name_any()),
        Ok(Event::Delete(o)) => format!("Delete {}", o.name_any()),
        Err(watcher::Error::WatchError(status)) => format!("Err {}", status.code),
        Err(e) => format!("Err other: {e}"),
    }
}

/// The next event, within `limit`.
async fn next<S, K>(stream: &mut S, limit: Duration) -> watcher::Result<Event<K>>
where
    S: Stream<Item = watcher::Result<Event<K>>> + Unpin,
{
    tokio::time::timeout(limit, stream.next())
        .await
        .expect("no watcher event in time")
        .expect("the watcher ended")
}

/// Events until (and with) the first one described as `until`.
async fn events_until<S, K>(stream: &mut S, until: &str, limit: Duration) -> Vec<String>
where
    S: Stream<Item = watcher::Result<Event<K>>> + Unpin,
    K: ResourceExt,
{
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {until:?} in time; saw {seen:?}"))
            .expect("the watcher ended");
        let text = describe(&event);
        seen.push(text.clone());
        if text == until {
            return seen;
        }
    }
}

/// Drives the watcher (which only connects when polled) until `ok`; it must yield no
/// event meanwhile.
async fn poll_until<S, K>(stream: &mut S, what: &str, mut ok: impl FnMut() -> bool)
where
    S: Stream<Item = watcher::Result<Event<K>>> + Unpin,
    K: ResourceExt,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
            panic!(
                "unexpected event while waiting for {what}: {:?}",
                event.map(|e| describe(&e))
            );
        }
    }
}

#[test]
fn list_and_get_with_the_bearer_token() {
    let server = FakeApiServer::start_new().unwrap();
    let web = server
        .apply(&service("shop", "web", &[("app", "web")], 80))
        .unwrap();
    server
        .apply(&service(
            "shop",
            "db",
            &[("service.kubernetes.io/service-proxy-name", "other")],
            5432,
        ))
        .unwrap();
    server.apply(&service("default", "api", &[], 8080)).unwrap();
    server.apply(&node("node-a")).unwrap();
    server.apply(&node("node-b")).unwrap();

    // What the API server wrote into the Service.
    let spec = web.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let ip = spec.cluster_ip.clone().unwrap();
    assert!(ip.starts_with("10.96."), "{ip}");
    assert_eq!(spec.cluster_ips, Some(vec![ip.clone()]));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
    assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );
    assert_eq!(web.metadata.generation, Some(1));
    assert!(web.metadata.uid.as_ref().is_some_and(|u| u.len() == 36));
    assert!(web.metadata.creation_timestamp.is_some());
    let managed = web.metadata.managed_fields.as_ref().unwrap();
    assert_eq!(managed[0].operation.as_deref(), Some("Update"));
    assert!(managed[0].fields_v1.is_some());

    block_on(async {
        let client = client(&server, "fakeapi").await;
        let all: Api<Service> = Api::all(client.clone());
        let names: Vec<String> = all
            .list(&ListParams::default())
            .await
            .unwrap()
            .iter()
            .map(|s| s.name_any())
            .collect();
        // Storage-key order: namespace, then name.
        assert_eq!(names, ["api", "db", "web"]);

        let shop: Api<Service> = Api::namespaced(client.clone(), "shop");
        let list = shop.list(&ListParams::default()).await.unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(
            list.metadata.resource_version,
            Some(server.resource_version().to_string())
        );

        // kube-proxy's Service selector leaves out Services of another proxy.
        let mine = all
            .list(&ListParams::default().labels("!service.kubernetes.io/service-proxy-name"))
            .await
            .unwrap();
        let names: Vec<String> = mine.iter().map(|s| s.name_any()).collect();
        assert_eq!(names, ["api", "web"]);

        let got = shop.get("web").await.unwrap();
        assert_eq!(got.spec.unwrap().cluster_ip, Some(ip));
        assert_eq!(got.metadata.resource_version, web.metadata.resource_version);
        let missing = shop.get("nope").await.unwrap_err();
        match missing {
            kube::Error::Api(status) => {
                assert_eq!(status.code, 404);
                assert_eq!(status.reason, "NotFound");
            }
            other => panic!("expected 404, got {other}"),
        }

        // kube-proxy follows its own Node with a field selector.
        let nodes: Api<Node> = Api::all(client.clone());
        let own = nodes
            .list(&ListParams::default().fields("metadata.name=node-b"))
            .await
            .unwrap();
        assert_eq!(
            own.items.iter().map(|n| n.name_any()).collect::<Vec<_>>(),
            ["node-b"]
        );
        let bad = nodes
            .list(&ListParams::default().fields("spec.nope=x"))
            .await
            .unwrap_err();
        assert!(
            matches!(bad, kube::Error::Api(s) if s.code == 400),
            "unsupported field is 400"
        );

        let version = client.apiserver_version().await.unwrap();
        assert_eq!(version.major, "1");
    });
    assert_eq!(server.requests(Verb::List, "services"), 3);
    assert_eq!(server.requests(Verb::Get, "services"), 2);
    assert_eq!(server.requests(Verb::List, "nodes"), 2);
    assert_eq!(server.unauthorized_requests(), 0);
}

#[test]
fn no_credentials_or_a_wrong_token_is_401_and_a_client_certificate_is_enough() {
    let server = FakeApiServer::start_new().unwrap();
    server.apply(&service("default", "web", &[], 80)).unwrap();
    block_on(async {
        let anonymous: Api<Service> = Api::all(client(&server, "fakeapi-anonymous").await);
        match anonymous.list(&ListParams::default()).await.unwrap_err() {
            kube::Error::Api(status) => {
                assert_eq!(status.code, 401);
                assert_eq!(status.reason, "Unauthorized");
            }
            other => panic!("expected 401, got {other}"),
        }

        let kubeconfig = Kubeconfig::read_from(server.kubeconfig_path()).unwrap();
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        config.auth_info.token = Some(format!("{}x", server.token()).into());
        let wrong: Api<Service> = Api::all(Client::try_from(config).unwrap());
        assert!(
            matches!(wrong.list(&ListParams::default()).await.unwrap_err(), kube::Error::Api(s) if s.code == 401)
        );

        let cert: Api<Service> = Api::all(client(&server, "fakeapi-cert").await);
        assert_eq!(
            cert.list(&ListParams::default()).await.unwrap().items.len(),
            1
        );
    });
    assert_eq!(server.unauthorized_requests(), 2);
    assert_eq!(server.requests(Verb::List, "services"), 1);
}

#[test]
fn paged_list_is_one_consistent_snapshot_until_compacted() {
    let server = FakeApiServer::start_new().unwrap();
    for i in 0..7 {
        server
            .apply(&slice("shop", &format!("web-{i}"), &format!("10.0.0.{i}")))
            .unwrap();
    }
    block_on(async {
        let slices: Api<EndpointSlice> = Api::namespaced(client(&server, "fakeapi").await, "shop");
        let first = slices.list(&ListParams::default().limit(3)).await.unwrap();
        let names: Vec<String> = first.iter().map(|s| s.name_any()).collect();
        assert_eq!(names, ["web-0", "web-1", "web-2"]);
        assert_eq!(first.metadata.remaining_item_count, Some(4));
        let token = first.metadata.continue_.clone().unwrap();
        let at = first.metadata.resource_version.clone().unwrap();

        // Changes after the first page do not show in the later pages.
        server.delete("EndpointSlice", "shop", "web-5").unwrap();
        server.apply(&slice("shop", "web-3", "10.9.9.9")).unwrap();
        server.apply(&slice("shop", "web-8", "10.0.0.8")).unwrap();

        let second = slices
            .list(&ListParams::default().limit(3).continue_token(&token))
            .await
            .unwrap();
        let names: Vec<String> = second.iter().map(|s| s.name_any()).collect();
        assert_eq!(names, ["web-3", "web-4", "web-5"]);
        assert_eq!(
            second.items[0].endpoints.as_ref().unwrap()[0].addresses,
            ["10.0.0.3"]
        );
        assert_eq!(
            second.metadata.resource_version.as_deref(),
            Some(at.as_str())
        );
        let token = second.metadata.continue_.clone().unwrap();
        let third = slices
            .list(&ListParams::default().limit(3).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(
            third.iter().map(|s| s.name_any()).collect::<Vec<_>>(),
            ["web-6"]
        );
        assert_eq!(third.metadata.continue_, None);
        assert_eq!(third.metadata.remaining_item_count, None);

        // A fresh list sees the changes.
        let now = slices.list(&ListParams::default()).await.unwrap();
        let names: Vec<String> = now.iter().map(|s| s.name_any()).collect();
        assert_eq!(
            names,
            [
                "web-0", "web-1", "web-2", "web-3", "web-4", "web-6", "web-8"
            ]
        );

        // After compaction the old token is 410 Expired, as the API server answers.
        server.compact();
        match slices
            .list(&ListParams::default().limit(3).continue_token(&token))
            .await
            .unwrap_err()
        {
            kube::Error::Api(status) => {
                assert_eq!(status.code, 410);
                assert_eq!(status.reason, "Expired");
            }
            other => panic!("expected 410, got {other}"),
        }
    });
    assert_eq!(server.requests(Verb::List, "endpointslices"), 5);
}

#[test]
fn watch_stream_follows_selectors_versions_and_timeout() {
    let server = FakeApiServer::start_new().unwrap();
    server
        .apply(&service("default", "web", &[("tier", "front")], 80))
        .unwrap();
    let start = server.resource_version();
    block_on(async {
        let api: Api<Service> = Api::all(client(&server, "fakeapi").await);
        let params = WatchParams::default().labels("tier=front").timeout(2);
        let mut stream = api
            .watch(&params, &start.to_string())
            .await
            .unwrap()
            .boxed();
        // Leaves the selection: DELETED; comes back: ADDED; outside: nothing.
        server
            .apply(&service("default", "web", &[("tier", "back")], 80))
            .unwrap();
        server.apply(&service("default", "other", &[], 80)).unwrap();
        server
            .apply(&service("default", "web", &[("tier", "front")], 81))
            .unwrap();
        let mut seen = Vec::new();
        let began = Instant::now();
        while let Some(event) = stream.next().await {
            seen.push(match event.unwrap() {
                WatchEvent::Added(s) => {
                    format!("ADDED {} {}", s.name_any(), s.resource_version().unwrap())
                }
                WatchEvent::Modified(s) => format!("MODIFIED {}", s.name_any()),
                WatchEvent::Deleted(s) => {
                    format!("DELETED {} {}", s.name_any(), s.resource_version().unwrap())
                }
                WatchEvent::Bookmark(_) => "BOOKMARK".to_string(),
                WatchEvent::Error(e) => format!("ERROR {}", e.code),
            });
        }
        // timeoutSeconds=2 ends the stream.
        let took = began.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
            "{took:?}"
        );
        assert_eq!(
            seen,
            [
                format!("DELETED web {}", start + 1),
                format!("ADDED web {}", start + 3)
            ]
        );

        // Too old after compaction: HTTP 200 and one ERROR event with a 410 Status.
        server.compact();
        let mut stream = api
            .watch(&WatchParams::default(), &start.to_string())
            .await
            .unwrap()
            .boxed();
        match stream.next().await.unwrap().unwrap() {
            WatchEvent::Error(status) => {
                assert_eq!(status.code, 410);
                assert_eq!(status.reason, "Expired");
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the error"
        );
    });
}

#[test]
fn watcher_sees_added_modified_deleted_in_order() {
    let server = FakeApiServer::with_options(
        FakeApiOptions::default().bookmark_interval(Duration::from_millis(200)),
    )
    .unwrap();
    server.apply(&service("default", "old", &[], 80)).unwrap();
    block_on(async {
        let api: Api<Service> = Api::all(client(&server, "fakeapi").await);
        let mut w = watcher::watcher(api, watcher::Config::default()).boxed();
        let initial = events_until(&mut w, "InitDone", Duration::from_secs(10)).await;
        assert_eq!(initial, ["Init", "InitApply old", "InitDone"]);
        server.apply(&service("default", "web", &[], 80)).unwrap();
        server.apply(&service("default", "web", &[], 81)).unwrap();
        server.delete("Service", "default", "web").unwrap();
        server.delete("Service", "default", "old").unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(describe(&next(&mut w, Duration::from_secs(10)).await));
        }
        assert_eq!(seen, ["Apply web", "Apply web", "Delete web", "Delete old"]);
        // Bookmarks flow (and move the watcher's version) without events.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.apply(&service("default", "late", &[], 80)).unwrap();
        assert_eq!(
            describe(&next(&mut w, Duration::from_secs(10)).await),
            "Apply late"
        );
    });
    assert_eq!(server.requests(Verb::List, "services"), 1);
    assert_eq!(server.requests(Verb::Watch, "services"), 1);
}

#[test]
fn after_compaction_the_watcher_relists_and_sees_a_delete_made_during_the_relist() {
    let server = FakeApiServer::start_new().unwrap();
    for name in ["s0", "s1", "s2", "s3", "s4"] {
        server.apply(&service("default", name, &[], 80)).unwrap();
    }
    block_on(async {
        let api: Api<Service> = Api::all(client(&server, "fakeapi").await);
        let mut w = watcher::watcher(api, watcher::Config::default().page_size(2)).boxed();
        events_until(&mut w, "InitDone", Duration::from_secs(10)).await;
        assert_eq!(server.requests(Verb::List, "services"), 3);
        poll_until(&mut w, "the watch", || server.open_watches() == 1).await;

        server.compact();
        let until_init = events_until(&mut w, "Init", Duration::from_secs(10)).await;
        assert_eq!(until_init, ["Err 410", "Init"]);
        // The first page is fetched before its first object comes out.
        assert_eq!(
            describe(&next(&mut w, Duration::from_secs(10)).await),
            "InitApply s0"
        );
        server.delete("Service", "default", "s0").unwrap();
        server.delete("Service", "default", "s4").unwrap();
        let relist = events_until(&mut w, "InitDone", Duration::from_secs(10)).await;
        // Later pages come from the first page's snapshot ...
        assert_eq!(
            relist,
            [
                "InitApply s1",
                "InitApply s2",
                "InitApply s3",
                "InitApply s4",
                "InitDone"
            ]
        );
        // ... and the watch from that snapshot's version brings the deletes.
        let after = [
            describe(&next(&mut w, Duration::from_secs(10)).await),
            describe(&next(&mut w, Duration::from_secs(10)).await),
        ];
        assert_eq!(after, ["Delete s0", "Delete s4"]);
    });
    assert_eq!(server.requests(Verb::List, "services"), 6);
}

#[test]
fn cut_watches_reconnect_from_their_version_and_miss_nothing() {
    let server = FakeApiServer::start_new().unwrap();
    server.apply(&service("default", "a", &[], 80)).unwrap();
    block_on(async {
        let api: Api<Service> = Api::all(client(&server, "fakeapi").await);
        let mut w = watcher::watcher(api, watcher::Config::default()).boxed();
        events_until(&mut w, "InitDone", Duration::from_secs(10)).await;
        poll_until(&mut w, "the watch", || server.open_watches() == 1).await;

        server.cut_watches();
        // Written while the watcher is (or is about to be) disconnected.
        server.apply(&service("default", "a", &[], 81)).unwrap();
        server.apply(&service("default", "b", &[], 80)).unwrap();
        server.delete("Service", "default", "a").unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let event = describe(&next(&mut w, Duration::from_secs(10)).await);
            // A cut may surface as a read error before the reconnect; never as a re-list.
            if !event.starts_with("Err other") {
                seen.push(event);
            }
        }
        assert_eq!(seen, ["Apply a", "Apply b", "Delete a"]);
        poll_until(&mut w, "the new watch", || server.open_watches() == 1).await;
    });
    assert_eq!(server.requests(Verb::List, "services"), 1, "no re-list");
    assert_eq!(server.requests(Verb::Watch, "services"), 2);
}

#[test]
fn watcher_recovers_with_backoff_after_the_server_is_away_for_3_seconds() {
    let server = FakeApiServer::start_new().unwrap();
    server.apply(&service("default", "a", &[], 80)).unwrap();
    block_on(async {
        let api: Api<Service> = Api::all(client(&server, "fakeapi").await);
        let mut w = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        events_until(&mut w, "InitDone", Duration::from_secs(10)).await;
        poll_until(&mut w, "the watch", || server.open_watches() == 1).await;

        server.stop().unwrap();
        assert!(
            std::net::TcpStream::connect(server.addr()).is_err(),
            "the port refuses connections"
        );
        server.apply(&service("default", "b", &[], 80)).unwrap();
        let mut errors = 0;
        let away = Instant::now();
        while away.elapsed() < Duration::from_secs(3) {
            // Reconnect attempts fail meanwhile.
            if let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(100), w.next()).await
            {
                assert!(
                    event.is_err(),
                    "only errors while the server is away: {}",
                    describe(&event)
                );
                errors += 1;
            }
        }
        assert!(errors >= 1, "the watcher tried to reconnect");
        server.start().unwrap();
        server.delete("Service", "default", "a").unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let event = describe(&next(&mut w, Duration::from_secs(40)).await);
            if !event.starts_with("Err") {
                seen.push(event);
            }
        }
        assert_eq!(seen, ["Apply b", "Delete a"]);
    });
    assert_eq!(
        server.requests(Verb::List, "services"),
        1,
        "resumed from its version, no re-list"
    );
}

#[test]
fn serves_objects_as_a_real_api_server_wrote_them() {
    let server = FakeApiServer::start_new().unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakeapi");
    for file in [
        "service-kubernetes.json",
        "endpointslice-kubernetes.json",
        "node.json",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        server
            .apply_json(serde_json::from_str(&text).unwrap())
            .unwrap();
    }
    block_on(async {
        let client = client(&server, "fakeapi").await;
        let svc = Api::<Service>::namespaced(client.clone(), "default")
            .get("kubernetes")
            .await
            .unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.1"));
        let managers: Vec<_> = svc
            .metadata
            .managed_fields
            .unwrap()
            .into_iter()
            .map(|m| m.manager.unwrap())
            .collect();
        assert_eq!(managers, ["kube-apiserver"]);

        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
            .await
            .unwrap();
        assert_eq!(slices.items.len(), 1);
        assert_eq!(
            slices.items[0].endpoints.as_ref().unwrap()[0].addresses,
            ["172.18.0.2"]
        );
        assert_eq!(slices.items[0].ports.as_ref().unwrap()[0].port, Some(6443));

        let nodes: Api<Node> = Api::all(client);
        let node = nodes
            .list(&ListParams::default().fields("metadata.name=node-default-pool-something"))
            .await
            .unwrap()
            .items
            .remove(0);
        let internal: Vec<_> = node
            .status
            .unwrap()
            .addresses
            .unwrap()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        assert_eq!(internal, ["10.0.0.1"]);
        let managed = node.metadata.managed_fields.unwrap();
        assert_eq!(managed.len(), 3);
        assert_eq!(managed[2].subresource.as_deref(), Some("status"));
        // Created here: the server writes its own uid, creationTimestamp and version.
        let uid = node.metadata.uid.unwrap();
        assert_eq!(uid.len(), 36);
        assert_ne!(uid, "0c24d0e1-a265-11e9-abe4-42010a80026b");
        assert_ne!(node.metadata.resource_version.as_deref(), Some("211582541"));
    });
}

/// Reads from a raw TLS connection until `done` holds for what was read, or EOF.
async fn read_until<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    while !done(buf) {
        match tokio::time::timeout(Duration::from_secs(5), io.read(&mut chunk))
            .await
            .expect("read in time")
        {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn watch_on_the_wire_is_chunked_json_lines_and_a_cut_leaves_the_last_chunk_out() {
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let server = FakeApiServer::start_new().unwrap();
    server.apply(&service("default", "web", &[], 80)).unwrap();
    block_on(async {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(server.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let request = format!(
            "GET /api/v1/namespaces/default/services?watch=true&resourceVersion=0 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
            server.addr(),
            server.token()
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        read_until(&mut tls, &mut buf, |b| {
            String::from_utf8_lossy(b).contains("}\n")
        })
        .await;
        let text = String::from_utf8_lossy(&buf).to_string();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{text}"
        );
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{text}"
        );
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let line = body.lines().nth(1).unwrap();
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["metadata"]["name"], "web");
        assert_eq!(event["object"]["kind"], "Service");

        server.cut_watches();
        let before = buf.len();
        read_until(&mut tls, &mut buf, |_| false).await;
        let rest = String::from_utf8_lossy(&buf[before..]).to_string();
        // Dropped mid-stream: no terminating zero-length chunk.
        assert!(!rest.contains("0\r\n\r\n"), "{rest:?}");
        assert_eq!(server.requests(Verb::Watch, "services"), 1);
    });
}
