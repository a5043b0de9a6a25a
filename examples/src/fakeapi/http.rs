//! Requests in, responses out: authentication, routing, GET, LIST (paged, consistent
//! snapshots), WATCH (chunked newline-delimited events) and the discovery documents.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use data_encoding::BASE64URL_NOPAD;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    Change, Expired, RESOURCES, ResourceInfo, field_value, in_namespace, labels_of,
    resource_by_plural,
};
use super::{Shared, Verb};

/// A response body: a whole JSON document or a watch stream.
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The longest watch the server keeps open, whatever `timeoutSeconds` asks.
const MAX_WATCH: Duration = Duration::from_secs(3600);
/// The API server's default when `timeoutSeconds` is absent (`--min-request-timeout`).
const DEFAULT_WATCH: Duration = Duration::from_secs(1800);

/// Serves one request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    client_cert: bool,
) -> Result<Response<Body>, Infallible> {
    Ok(route(&shared, &req, client_cert))
}

fn route(shared: &Arc<Shared>, req: &Request<Incoming>, client_cert: bool) -> Response<Body> {
    // Authentication comes first; with anonymous auth off, as kubeadm clusters run the
    // kube-apiserver, a request without valid credentials is 401 on every path.
    if !client_cert && !bearer_ok(req, &shared.token) {
        shared.unauthorized.fetch_add(1, Ordering::Relaxed);
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    }
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        );
    }
    let path = req.uri().path().trim_end_matches('/');
    let query = Query::parse(req.uri().query().unwrap_or_default());
    if let Some(doc) = discovery(shared, path) {
        return json_response(StatusCode::OK, &doc);
    }
    let (group_version, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("v1", rest)
    } else if let Some(rest) = path.strip_prefix("/apis/discovery.k8s.io/v1/") {
        ("discovery.k8s.io/v1", rest)
    } else {
        return not_found_path();
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let (namespace, plural, name) = match segments.as_slice() {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return not_found_path(),
    };
    let Some(resource) = resource_by_plural(plural).filter(|r| r.api_version == group_version)
    else {
        return not_found_path();
    };
    if (namespace.is_some() && !resource.namespaced)
        || (name.is_some() && namespace.is_none() && resource.namespaced)
    {
        return not_found_path();
    }
    match name {
        Some(name) => {
            shared.count(Verb::Get, resource.plural);
            get(shared, resource, namespace.unwrap_or_default(), name)
        }
        None if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            shared.count(Verb::Watch, resource.plural);
            match WatchRequest::parse(resource, namespace, &query) {
                Ok(w) => watch(shared, w),
                Err(message) => bad_request(&message),
            }
        }
        None => {
            shared.count(Verb::List, resource.plural);
            list(shared, resource, namespace, &query)
        }
    }
}

fn bearer_ok(req: &Request<Incoming>, token: &str) -> bool {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == token)
}

/// Decoded query parameters (the last value of a repeated one wins).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Query(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn selectors(
    resource: &ResourceInfo,
    query: &Query,
) -> Result<(LabelSelector, FieldSelector), String> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())?;
    let fields = FieldSelector::parse(
        query.get("fieldSelector").unwrap_or_default(),
        resource.fields,
    )?;
    Ok((labels, fields))
}

fn selected(object: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    labels.matches(&labels_of(object)) && fields.matches(object, field_value)
}

fn get(shared: &Shared, resource: &ResourceInfo, namespace: &str, name: &str) -> Response<Body> {
    let key = super::store::key_of(resource, namespace, name);
    let store = shared.lock();
    match store.objects(resource.plural).and_then(|m| m.get(&key)) {
        Some(object) => json_response(StatusCode::OK, object),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", resource.plural),
            Some(json!({"name": name, "kind": resource.plural})),
        ),
    }
}

/// The continue token of the API server (`storage.EncodeContinue`): base64url of
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"KEY\u0000"}`, the list resumes after KEY at
/// version N.
fn encode_continue(rv: u64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}")});
    BASE64URL_NOPAD.encode(token.to_string().as_bytes())
}

fn decode_continue(token: &str) -> Result<(u64, String), String> {
    let bad = |why: &str| format!("continue key is not valid: {why}");
    let raw = BASE64URL_NOPAD
        .decode(token.trim_end_matches('=').as_bytes())
        .map_err(|_| bad("not base64"))?;
    let value: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    if value["v"] != "meta.k8s.io/v1" {
        return Err(bad(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = value["rv"]
        .as_u64()
        .filter(|rv| *rv > 0)
        .ok_or_else(|| bad("incorrect encoded start resourceVersion"))?;
    let start = value["start"].as_str().ok_or_else(|| bad("no start key"))?;
    Ok((rv, start.trim_end_matches('\u{0}').to_string()))
}

fn list(
    shared: &Shared,
    resource: &ResourceInfo,
    namespace: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let (labels, fields) = match selectors(resource, query) {
        Ok(s) => s,
        Err(message) => return bad_request(&message),
    };
    let limit = match query.get("limit").map(str::parse::<u64>) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let rv_param = query.get("resourceVersion").filter(|v| !v.is_empty());
    let rv_match = query.get("resourceVersionMatch").filter(|v| !v.is_empty());
    let store = shared.lock();
    let (at, after_key, via_continue) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            if rv_param.is_some_and(|v| v != "0") {
                return bad_request(
                    "specifying resource version is not allowed when using continue",
                );
            }
            match decode_continue(token) {
                Ok((rv, key)) => (rv, Some(key), true),
                Err(message) => return bad_request(&message),
            }
        }
        None => match (rv_match, rv_param) {
            (Some(_), None) => {
                return bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                );
            }
            (Some("Exact"), Some(rv)) => match rv.parse::<u64>() {
                Ok(rv) if rv > 0 => (rv, None, false),
                _ => return bad_request(&format!("invalid resource version {rv:?}")),
            },
            (Some("NotOlderThan") | None, _) => (store.rv, None, false),
            (Some(other), _) => {
                return bad_request(&format!(
                    "resourceVersionMatch: Unsupported value: {other:?}"
                ));
            }
        },
    };
    let snapshot = match store.snapshot(resource.plural, at) {
        Ok(s) => s,
        Err(Expired { asked, oldest }) => {
            let message = if via_continue {
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue value from the response.".to_string()
            } else {
                format!("too old resource version: {asked} ({oldest})")
            };
            return status(StatusCode::GONE, "Expired", &message, None);
        }
    };
    drop(store);
    let mut matching = snapshot
        .iter()
        .filter(|(key, _)| in_namespace(key, namespace))
        .filter(|(key, _)| {
            after_key
                .as_ref()
                .is_none_or(|after| key.as_str() > after.as_str())
        })
        .filter(|(_, object)| selected(object, &labels, &fields));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, object) in matching.by_ref() {
        if limit.is_some_and(|l| items.len() as u64 >= l) {
            last_key = Some(key.clone());
            break;
        }
        items.push(list_item(object));
    }
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if let Some(first_left) = last_key {
        // Resume after the last item returned.
        let rest = 1 + matching.count();
        let last_returned = snapshot
            .range(..first_left)
            .rev()
            .find(|(k, o)| in_namespace(k, namespace) && selected(o, &labels, &fields))
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        metadata["continue"] = json!(encode_continue(at, &last_returned));
        // Only counted when nothing is filtered, as the API server does.
        if labels.is_empty() && fields.is_empty() {
            metadata["remainingItemCount"] = json!(rest);
        }
    }
    let doc = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, &doc)
}

/// Items of a list carry no kind and apiVersion (the list's own say what they are).
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(m) = item.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    item
}

/// A parsed watch request.
struct WatchRequest {
    resource: &'static ResourceInfo,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    /// None: start from the current state (resourceVersion unset or "0").
    since: Option<u64>,
    bookmarks: bool,
    initial_events: bool,
    timeout: Duration,
}

impl WatchRequest {
    fn parse(
        resource: &'static ResourceInfo,
        namespace: Option<&str>,
        query: &Query,
    ) -> Result<Self, String> {
        let (labels, fields) = selectors(resource, query)?;
        let since = match query
            .get("resourceVersion")
            .filter(|v| !v.is_empty() && *v != "0")
        {
            None => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| format!("invalid resource version {v:?}"))?,
            ),
        };
        let bookmarks = query.get("allowWatchBookmarks") == Some("true");
        let initial_events = query.get("sendInitialEvents") == Some("true");
        if initial_events
            && (!bookmarks || query.get("resourceVersionMatch") != Some("NotOlderThan"))
        {
            return Err(
                "sendInitialEvents requires allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan".into(),
            );
        }
        let timeout = match query.get("timeoutSeconds") {
            None => DEFAULT_WATCH,
            Some(t) => Duration::from_secs(
                t.parse::<u64>()
                    .map_err(|_| format!("invalid timeoutSeconds {t:?}"))?,
            ),
        };
        Ok(WatchRequest {
            resource,
            namespace: namespace.map(str::to_string),
            labels,
            fields,
            since,
            bookmarks,
            initial_events,
            timeout: timeout.min(MAX_WATCH),
        })
    }

    fn selects(&self, object: &Value) -> bool {
        selected(object, &self.labels, &self.fields)
    }

    /// The event a change is for this watch: ADDED when the object enters the selection,
    /// MODIFIED while it stays, DELETED (the old object at the change's version) when it
    /// leaves or is deleted; nothing when it is outside before and after.
    fn event(&self, change: &Change) -> Option<Value> {
        if change.resource != self.resource.plural
            || !in_namespace(&change.key, self.namespace.as_deref())
        {
            return None;
        }
        let was = change.prev.as_ref().is_some_and(|o| self.selects(o));
        let is = change.cur.as_ref().is_some_and(|o| self.selects(o));
        match (was, is, &change.prev, &change.cur) {
            (false, true, _, Some(cur)) => Some(json!({"type": "ADDED", "object": cur})),
            (true, true, _, Some(cur)) => Some(json!({"type": "MODIFIED", "object": cur})),
            (true, false, Some(prev), _) => {
                let mut last = prev.clone();
                last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(json!({"type": "DELETED", "object": last}))
            }
            _ => None,
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"type": "BOOKMARK", "object": {
            "kind": self.resource.kind,
            "apiVersion": self.resource.api_version,
            "metadata": metadata,
        }})
    }
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn expired_event(e: Expired) -> Value {
    json!({"type": "ERROR", "object": status_object(
        StatusCode::GONE,
        "Expired",
        &format!("too old resource version: {} ({})", e.asked, e.oldest),
        None,
    )})
}

/// Counts a watch as open until its stream is dropped.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The state of one watch stream.
struct WatchStream {
    shared: Arc<Shared>,
    request: WatchRequest,
    /// Every change up to this version has been queued.
    cursor: u64,
    queue: VecDeque<Bytes>,
    done: bool,
    deadline: Instant,
    next_bookmark: Instant,
    changed: watch::Receiver<u64>,
    cut: watch::Receiver<u64>,
    closed: watch::Receiver<u64>,
    _open: OpenWatch,
}

impl WatchStream {
    /// Queues every change after the cursor; an ERROR 410 if they are forgotten.
    fn drain(&mut self) {
        self.changed.borrow_and_update();
        let store = self.shared.lock();
        let events: Result<Vec<Value>, Expired> = store
            .changes_after(self.cursor)
            .map(|changes| changes.filter_map(|c| self.request.event(c)).collect());
        match events {
            Ok(events) => {
                self.queue.extend(events.iter().map(line));
                self.cursor = store.rv;
            }
            Err(e) => {
                self.queue.push_back(line(&expired_event(e)));
                self.done = true;
            }
        }
    }
}

/// What ends or feeds a waiting watch.
enum Wake {
    Changed,
    Cut,
    Closed,
    Timeout,
    Bookmark,
}

fn watch(shared: &Arc<Shared>, request: WatchRequest) -> Response<Body> {
    shared.open_watches.fetch_add(1, Ordering::Relaxed);
    let open = OpenWatch(shared.clone());
    let now = Instant::now();
    let mut queue = VecDeque::new();
    let mut done = false;
    let cursor;
    {
        let store = shared.lock();
        match request.since {
            Some(since) if !request.initial_events => {
                cursor = since;
                if since < store.compacted {
                    queue.push_back(line(&expired_event(Expired {
                        asked: since,
                        oldest: store.compacted,
                    })));
                    done = true;
                }
            }
            _ => {
                // No version (or "0", or a streaming list): the current state as ADDED
                // events, then the changes after it.
                cursor = store.rv;
                for (key, object) in store.objects(request.resource.plural).into_iter().flatten() {
                    if in_namespace(key, request.namespace.as_deref()) && request.selects(object) {
                        queue.push_back(line(&json!({"type": "ADDED", "object": object})));
                    }
                }
                if request.initial_events {
                    queue.push_back(line(&request.bookmark(store.rv, true)));
                }
            }
        }
    }
    let state = WatchStream {
        changed: shared.changed.subscribe(),
        cut: shared.cut.subscribe(),
        closed: shared.closed.subscribe(),
        deadline: now + request.timeout,
        next_bookmark: now + shared.options.bookmark_interval,
        shared: shared.clone(),
        request,
        cursor,
        queue,
        done,
        _open: open,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(bytes) = st.queue.pop_front() {
                return Some((Ok(Frame::data(bytes)), st));
            }
            if st.done {
                return None;
            }
            st.drain();
            if !st.queue.is_empty() || st.done {
                continue;
            }
            let wake = tokio::select! {
                r = st.changed.changed() => if r.is_ok() { Wake::Changed } else { Wake::Closed },
                r = st.cut.changed() => if r.is_ok() { Wake::Cut } else { Wake::Closed },
                _ = st.closed.changed() => Wake::Closed,
                () = sleep_until(st.deadline) => Wake::Timeout,
                () = sleep_until(st.next_bookmark), if st.request.bookmarks => Wake::Bookmark,
            };
            match wake {
                Wake::Changed => {}
                // An error from the body makes hyper drop the connection mid-stream,
                // without the last chunk: what a client sees when the network or the
                // server goes away.
                Wake::Cut => {
                    st.done = true;
                    return Some((
                        Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "watch cut",
                        )),
                        st,
                    ));
                }
                // A clean end of the stream: the client resumes from its last version.
                Wake::Closed | Wake::Timeout => return None,
                Wake::Bookmark => {
                    st.next_bookmark = Instant::now() + st.shared.options.bookmark_interval;
                    st.drain();
                    if !st.done {
                        let bookmark = st.request.bookmark(st.cursor, false);
                        st.queue.push_back(line(&bookmark));
                    }
                }
            }
        }
    });
    let body = StreamBody::new(stream.boxed()).boxed_unsync();
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn discovery(shared: &Shared, path: &str) -> Option<Value> {
    let resources = |group_version: &str| -> Value {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.api_version == group_version)
            .map(|r| {
                json!({
                    "name": r.plural,
                    "singularName": r.singular,
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["get", "list", "watch"],
                    "shortNames": r.short_names,
                })
            })
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
    };
    let group = json!({
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    });
    Some(match path {
        "/version" => json!({
            "major": "1",
            "minor": "35",
            "emulationMajor": "1",
            "emulationMinor": "35",
            "minCompatibilityMajor": "1",
            "minCompatibilityMinor": "34",
            "gitVersion": "v1.35.0-fakeapi",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-12-17T00:00:00Z",
            "goVersion": "go1.25.5",
            "compiler": "gc",
            "platform": "linux/amd64",
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr().to_string()}],
        }),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}),
        "/apis/discovery.k8s.io" => {
            let mut g = group;
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        }
        "/api/v1" => resources("v1"),
        "/apis/discovery.k8s.io/v1" => resources("discovery.k8s.io/v1"),
        _ => return None,
    })
}

/// A `Status` object as the API server writes it.
fn status_object(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(details) = details {
        s["details"] = details;
    }
    s
}

fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    json_response(code, &status_object(code, reason, message, details))
}

fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn not_found_path() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

fn json_response(code: StatusCode, doc: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(doc.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn continue_token_round_trips_in_the_api_server_format() {
        let token = encode_continue(42, "default/web");
        let raw = BASE64URL_NOPAD.decode(token.as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            v,
            json!({"v": "meta.k8s.io/v1", "rv": 42, "start": "default/web\u{0}"})
        );
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, "default/web".to_string())
        );
        assert!(decode_continue("not-a-token!").is_err());
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let q = Query::parse(
            "fieldSelector=metadata.name%3Dnode-a&labelSelector=%21a%2Cb+in+%28c%29&x=%zz",
        );
        assert_eq!(q.get("fieldSelector"), Some("metadata.name=node-a"));
        assert_eq!(q.get("labelSelector"), Some("!a,b in (c)"));
        assert_eq!(q.get("x"), Some("%zz"));
    }
}
