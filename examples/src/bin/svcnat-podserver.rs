//! `svcnat-podserver`: the server every testbed pod runs.
//!
//! ```text
//! svcnat-podserver --name NAME [--tcp PORT...] [--udp PORT...] [--sctp PORT...] [--watch-stdin]
//!                  [--vote-app REDIS_HOST:PORT]
//! ```
//!
//! Every port is bound on the wildcard address of both families when the namespace has
//! IPv6 (one dual-stack socket, or two sockets when `bindv6only` is set), otherwise on
//! `0.0.0.0`. Once every socket is bound it prints `ready` on stdout.
//!
//! - TCP, HTTP (the first bytes are `GET `, `HEAD `, `POST ` or `PUT `): one reply
//!   `HTTP/1.1 200 OK` with the body `pod=NAME client=IP:PORT\n`, then the connection is
//!   closed. `client` is the peer address as the pod sees it, which shows whether the source
//!   address was kept or masqueraded.
//! - TCP, anything else (line mode): each line is answered with
//!   `pod=NAME client=IP:PORT line=LINE\n` and the connection stays open, so a test can
//!   prove that an established connection survives a rule change.
//! - UDP: each datagram is answered with `pod=NAME client=IP:PORT\n`.
//! - SCTP (one-to-one style sockets, [`svcnat_examples::sctp`]): as TCP, HTTP or line mode
//!   on the association's byte stream; `client` is the association's primary peer address.
//!
//! With `--vote-app REDIS_HOST:PORT`, HTTP requests from browsers (an `Accept` header naming
//! `text/html`) get the lab's vote page instead, and a POSTed vote is stored in that redis
//! ([`svcnat_examples::voteapp`]); other clients still get the one-line reply.
//!
//! With `--watch-stdin` the server exits when its stdin reaches end of file, so a server
//! whose parent (the test process) died does not linger in a leaked namespace.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use svcnat_examples::voteapp;

/// Longest HTTP request head accepted, in bytes.
const MAX_HEAD: usize = 16 * 1024;

struct Args {
    name: String,
    tcp: Vec<u16>,
    udp: Vec<u16>,
    sctp: Vec<u16>,
    watch_stdin: bool,
    vote_app: Option<String>,
}

/// What every connection handler needs.
struct Pod {
    name: String,
    vote_app: Option<String>,
}

/// Which port list the next numbers belong to.
#[derive(Clone, Copy)]
enum List {
    Tcp,
    Udp,
    Sctp,
}

fn usage() -> String {
    "usage: svcnat-podserver --name NAME [--tcp PORT...] [--udp PORT...] [--sctp PORT...] \
     [--watch-stdin] [--vote-app REDIS_HOST:PORT]"
        .to_string()
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut name = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut sctp = Vec::new();
    let mut watch_stdin = false;
    let mut vote_app = None;
    let mut list: Option<List> = None;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => {
                list = None;
                name = Some(
                    args.next()
                        .ok_or_else(|| format!("--name needs a value\n{}", usage()))?,
                );
            }
            "--tcp" => list = Some(List::Tcp),
            "--udp" => list = Some(List::Udp),
            "--sctp" => list = Some(List::Sctp),
            "--watch-stdin" => {
                list = None;
                watch_stdin = true;
            }
            "--vote-app" => {
                list = None;
                vote_app = Some(
                    args.next()
                        .ok_or_else(|| format!("--vote-app needs a value\n{}", usage()))?,
                );
            }
            "-h" | "--help" => return Err(usage()),
            value => {
                let Some(list) = list else {
                    return Err(format!("unexpected argument {value:?}\n{}", usage()));
                };
                let port: u16 = value
                    .parse()
                    .map_err(|_| format!("bad port {value:?}\n{}", usage()))?;
                match list {
                    List::Tcp => tcp.push(port),
                    List::Udp => udp.push(port),
                    List::Sctp => sctp.push(port),
                }
            }
        }
    }
    let name = name.ok_or_else(|| format!("--name is required\n{}", usage()))?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("--name must be one word, got {name:?}"));
    }
    Ok(Args {
        name,
        tcp,
        udp,
        sctp,
        watch_stdin,
        vote_app,
    })
}

/// Binds `[::]:port` (dual stack) and, when that does not cover IPv4 or IPv6 is missing,
/// `0.0.0.0:port` as well.
fn bind_all<T>(port: u16, bind: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<Vec<T>> {
    let mut sockets = Vec::new();
    let v6 = bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    let v6_ok = v6.is_ok();
    if let Ok(socket) = v6 {
        sockets.push(socket);
    }
    match bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
        Ok(socket) => sockets.push(socket),
        // The dual-stack socket already receives IPv4.
        Err(e) if v6_ok && e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("bind 0.0.0.0:{port}: {e}"),
            ));
        }
    }
    Ok(sockets)
}

/// The peer as the pod sees it, IPv4-mapped IPv6 shown as IPv4.
fn peer_text(peer: SocketAddr) -> String {
    SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string()
}

fn is_http(head: &[u8]) -> bool {
    [&b"GET "[..], b"HEAD ", b"POST ", b"PUT "]
        .iter()
        .any(|m| head.starts_with(m))
}

fn could_become_http(head: &[u8]) -> bool {
    [&b"GET "[..], b"HEAD ", b"POST ", b"PUT "]
        .iter()
        .any(|m| m.starts_with(head))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn serve_tcp(mut stream: TcpStream, pod: &Pod) -> io::Result<()> {
    let name = pod.name.as_str();
    let peer = peer_text(stream.peer_addr()?);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the first bytes decide between HTTP and line mode.
    loop {
        if is_http(&head) || !could_become_http(&head) || head.contains(&b'\n') {
            break;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    if is_http(&head) {
        // Read the whole request head so that closing never resets unread data.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        while find(&head, b"\r\n\r\n").is_none() && find(&head, b"\n\n").is_none() {
            if head.len() > MAX_HEAD {
                break;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        if let Some(redis) = &pod.vote_app {
            let text = String::from_utf8_lossy(&head).into_owned();
            if voteapp::wants_html(&text) {
                return serve_vote_app(stream, name, redis, head);
            }
        }
        let body = format!("pod={name} client={peer}\n");
        let head_only = head.starts_with(b"HEAD ");
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            if head_only { "" } else { body.as_str() }
        );
        stream.write_all(reply.as_bytes())?;
        stream.flush()?;
        stream.shutdown(std::net::Shutdown::Write)?;
        // Drain what the client still sends until it closes, so the close is a FIN.
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        return Ok(());
    }
    // Line mode: `head` holds the first bytes already read.
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(head.as_slice().chain(stream));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let text = line.trim_end_matches(['\r', '\n']);
        writer.write_all(format!("pod={name} client={peer} line={text}\n").as_bytes())?;
    }
}

/// The vote page for a browser: GET shows it, POST stores the vote first (HTTP 500 with the
/// reason when redis cannot take it). `head` holds what was read so far.
fn serve_vote_app(
    mut stream: TcpStream,
    name: &str,
    redis: &str,
    mut head: Vec<u8>,
) -> io::Result<()> {
    let end = find(&head, b"\r\n\r\n").map_or(head.len(), |i| i + 4);
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut body = head.split_off(end);
    let voter = voteapp::voter_id(&text).unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{:x}", (nanos ^ u128::from(std::process::id())) as u64)
    });
    let (status, page) = if text.starts_with("POST ") {
        let want = voteapp::header(&text, "content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(voteapp::MAX_BODY);
        let mut buf = [0u8; 1024];
        while body.len() < want {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        let outcome = match voteapp::parse_vote(&body) {
            Some(vote) => match voteapp::record(redis, &voter, vote) {
                Ok(n) => voteapp::Outcome::Recorded(vote, n),
                Err(why) => voteapp::Outcome::Failed(why),
            },
            None => voteapp::Outcome::Failed("the form holds no vote".into()),
        };
        let status = match outcome {
            voteapp::Outcome::Recorded(..) => "200 OK",
            voteapp::Outcome::Failed(_) => "500 Internal Server Error",
        };
        (status, voteapp::page(name, Some(&outcome)))
    } else {
        ("200 OK", voteapp::page(name, None))
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nSet-Cookie: voter_id={voter}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{page}",
        page.len()
    );
    stream.write_all(reply.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

fn run_tcp(listener: TcpListener, pod: Arc<Pod>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let pod = Arc::clone(&pod);
                thread::spawn(move || {
                    // A client going away mid-request is not worth reporting.
                    let _ = serve_tcp(stream, &pod);
                });
            }
            Err(e) => eprintln!("svcnat-podserver {}: accept: {e}", pod.name),
        }
    }
}

fn run_udp(socket: UdpSocket, name: Arc<str>) {
    let mut buf = [0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let reply = format!("pod={name} client={}\n", peer_text(peer));
                if let Err(e) = socket.send_to(reply.as_bytes(), peer) {
                    eprintln!("svcnat-podserver {name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("svcnat-podserver {name}: udp receive: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Connections a pod server may hold at once (one file descriptor and thread each).
const OPEN_FILES: u64 = 65_536;

fn run(args: Args) -> io::Result<()> {
    // Clients may hold thousands of connections open at once (`svcnat-probe many`).
    if let Err(e) = svcnat_examples::netns::raise_open_files(OPEN_FILES) {
        eprintln!("svcnat-podserver {}: open files limit: {e}", args.name);
    }
    let name: Arc<str> = Arc::from(args.name.as_str());
    let pod = Arc::new(Pod {
        name: args.name.clone(),
        vote_app: args.vote_app.clone(),
    });
    let mut threads = Vec::new();
    for &port in &args.tcp {
        for listener in bind_all(port, TcpListener::bind)? {
            let pod = Arc::clone(&pod);
            threads.push(thread::spawn(move || run_tcp(listener, pod)));
        }
    }
    for &port in &args.sctp {
        let listeners = svcnat_examples::sctp::listen_all(port)
            .map_err(|e| io::Error::new(e.kind(), format!("sctp port {port}: {e}")))?;
        for listener in listeners {
            let pod = Arc::clone(&pod);
            threads.push(thread::spawn(move || run_tcp(listener, pod)));
        }
    }
    for &port in &args.udp {
        for socket in bind_all(port, UdpSocket::bind)? {
            let name = Arc::clone(&name);
            threads.push(thread::spawn(move || run_udp(socket, name)));
        }
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    drop(stdout);
    if args.watch_stdin {
        let mut sink = [0u8; 256];
        let mut stdin = io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        return Ok(());
    }
    for t in threads {
        let _ = t.join();
    }
    // No ports: stay up until killed, like a pod whose server listens on nothing.
    loop {
        thread::park();
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let name = args.name.clone();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svcnat-podserver {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
