//! `svcnat-probe`: the client side of the testbed's traffic checks.
//!
//! ```text
//! svcnat-probe tcp  ADDR:PORT [--count N] [--timeout-ms T]
//! svcnat-probe udp  ADDR:PORT [--count N] [--timeout-ms T] [--source IP] [--source-port P]
//! svcnat-probe sctp ADDR:PORT [--count N] [--timeout-ms T]
//! svcnat-probe hold ADDR:PORT [--timeout-ms T]
//! svcnat-probe get  ADDR:PORT [--timeout-ms T]
//! svcnat-probe many ADDR:PORT [--count N] [--timeout-ms T]
//! ```
//!
//! `tcp` makes N sequential HTTP GETs, each on a new connection; `udp` sends N datagrams,
//! each from a new socket (a new source port, so a new conntrack entry); `sctp` opens N
//! associations one after the other (one-to-one style sockets, [`svcnat_examples::sctp`]),
//! each sending one line and reading the pod server's reply. Each attempt prints one line
//! on stdout:
//!
//! ```text
//! ok pod=NAME client=IP:PORT
//! refused          connection refused (TCP RST, or ICMP port unreachable)
//! timeout          no answer in time (a DROP, or nobody there)
//! unreachable      ICMP host or network unreachable
//! error TEXT       anything else
//! ```
//!
//! `hold` opens one TCP connection in line mode and prints `connected local=IP:PORT` (or
//! one of the failure words above). Then each stdin line is sent and the reply printed as
//! `ok pod=NAME client=IP:PORT line=TEXT` or `error TEXT`; it exits at stdin's end.
//!
//! `many` opens N TCP connections in line mode one after the other and keeps every one
//! open; only then does it send a line on each and read the answer. It prints
//! `many connected=C answered=A pods=NAME,NAME` and a `failure COUNT WORD` line per kind of
//! failure (the words above, and `untried` for those not attempted once 10 failed): N
//! connections through one NAT at the same time, each with its own translation.
//!
//! `get` makes one HTTP/1.1 GET of `/` to any HTTP server (a health check port) and prints
//! `http STATUS BODY` (the body on one line), or one of the failure words.
//!
//! `--source-port` makes every datagram leave from that one UDP port, as a resolver with
//! a connected socket does: the flow keeps one conntrack entry from call to call.
//!
//! `--source` binds the local address; std can only do that for UDP, so TCP rejects it
//! (use a client namespace with the wanted address instead).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tcp,
    Udp,
    Sctp,
    Hold,
    Get,
    Many,
}

struct Args {
    mode: Mode,
    target: SocketAddr,
    count: u32,
    timeout: Duration,
    source: Option<IpAddr>,
    source_port: Option<u16>,
}

const USAGE: &str = "usage: svcnat-probe tcp|udp|sctp|hold|get|many ADDR:PORT [--count N] [--timeout-ms T] [--source IP] [--source-port P]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mode = match args.next().as_deref() {
        Some("tcp") => Mode::Tcp,
        Some("udp") => Mode::Udp,
        Some("sctp") => Mode::Sctp,
        Some("hold") => Mode::Hold,
        Some("get") => Mode::Get,
        Some("many") => Mode::Many,
        other => return Err(format!("unknown mode {other:?}\n{USAGE}")),
    };
    let target = args
        .next()
        .ok_or_else(|| format!("missing ADDR:PORT\n{USAGE}"))?;
    let target: SocketAddr = target
        .parse()
        .map_err(|e| format!("bad ADDR:PORT {target:?}: {e}\n{USAGE}"))?;
    let mut parsed = Args {
        mode,
        target,
        count: 1,
        timeout: Duration::from_millis(1000),
        source: None,
        source_port: None,
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("bad {flag} {value:?}: {e}\n{USAGE}");
        match flag.as_str() {
            "--count" => parsed.count = value.parse().map_err(|e| bad(&e))?,
            "--timeout-ms" => {
                let ms: u64 = value.parse().map_err(|e| bad(&e))?;
                parsed.timeout = Duration::from_millis(ms.max(1));
            }
            "--source" => parsed.source = Some(value.parse().map_err(|e| bad(&e))?),
            "--source-port" => parsed.source_port = Some(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown flag {flag:?}\n{USAGE}")),
        }
    }
    if parsed.source_port.is_some() && mode != Mode::Udp {
        return Err("--source-port works with udp only".to_string());
    }
    if parsed.source.is_some() && mode != Mode::Udp {
        return Err("--source works with udp only (std cannot bind a TCP client)".to_string());
    }
    Ok(parsed)
}

/// The word an error is reported as.
fn classify(e: &io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".to_string(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".to_string(),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable".to_string(),
        _ => format!("error {}", one_line(&e.to_string())),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The server's reply line as the probe reports it, or `error ...` when it is not one.
fn reply_line(reply: &str) -> String {
    let line = reply.lines().next().unwrap_or("").trim();
    if line.starts_with("pod=") {
        format!("ok {line}")
    } else {
        format!("error unexpected reply {:?}", one_line(line))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> String {
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: svcnat-probe\r\nConnection: close\r\n\r\n"
    );
    let io = (|| -> io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        Ok(reply)
    })();
    match io {
        Ok(reply) => match find(&reply, b"\r\n\r\n") {
            Some(at) => reply_line(&String::from_utf8_lossy(&reply[at + 4..])),
            None => format!(
                "error no http reply {:?}",
                one_line(&String::from_utf8_lossy(&reply))
            ),
        },
        Err(e) => classify(&e),
    }
}

/// One SCTP association: a line out, the pod server's reply line back.
fn sctp_once(target: SocketAddr, timeout: Duration) -> String {
    let mut stream = match svcnat_examples::sctp::connect_timeout(target, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let io = (|| -> io::Result<String> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(b"probe\n")?;
        let mut reply = String::new();
        BufReader::new(&mut stream).read_line(&mut reply)?;
        Ok(reply)
    })();
    // Closed with a graceful SHUTDOWN (the association's conntrack entry closes too).
    let _ = stream.shutdown(std::net::Shutdown::Both);
    match io {
        Ok(reply) if reply.is_empty() => "error closed".to_string(),
        Ok(reply) => reply_line(&reply),
        Err(e) => classify(&e),
    }
}

/// One HTTP GET of `/`: `http STATUS BODY`.
fn get_once(target: SocketAddr, timeout: Duration) -> String {
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: svcnat-probe\r\nConnection: close\r\n\r\n"
    );
    let io = (|| -> io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut reply = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut reply)?;
        Ok(reply)
    })();
    let reply = match io {
        Ok(reply) => String::from_utf8_lossy(&reply).into_owned(),
        Err(e) => return classify(&e),
    };
    let status = reply
        .lines()
        .next()
        .and_then(|l| {
            l.strip_prefix("HTTP/1.1 ")
                .or_else(|| l.strip_prefix("HTTP/1.0 "))
        })
        .and_then(|l| l.split_whitespace().next())
        .and_then(|code| code.parse::<u16>().ok());
    match (status, reply.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => format!("http {status} {}", one_line(body)),
        _ => format!("error no http reply {:?}", one_line(&reply)),
    }
}

fn unspecified(target: &SocketAddr) -> IpAddr {
    match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn udp_once(
    target: SocketAddr,
    timeout: Duration,
    source: Option<IpAddr>,
    source_port: Option<u16>,
) -> String {
    let local = SocketAddr::new(
        source.unwrap_or_else(|| unspecified(&target)),
        source_port.unwrap_or(0),
    );
    let io = (|| -> io::Result<Vec<u8>> {
        let socket = UdpSocket::bind(local)?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(b"probe\n")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })();
    match io {
        Ok(reply) => reply_line(&String::from_utf8_lossy(&reply)),
        Err(e) => classify(&e),
    }
}

fn hold(target: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut out = io::stdout().lock();
    let stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => {
            writeln!(out, "{}", classify(&e))?;
            return Ok(());
        }
    };
    writeln!(out, "connected local={}", stream.local_addr()?)?;
    out.flush()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut closed = false;
    for line in io::stdin().lock().lines() {
        let line = line?;
        let answer = if closed {
            "error closed".to_string()
        } else {
            let sent = writer
                .write_all(format!("{}\n", line.trim_end()).as_bytes())
                .and_then(|()| writer.flush());
            let mut reply = String::new();
            match sent.and_then(|()| reader.read_line(&mut reply)) {
                Ok(0) => {
                    closed = true;
                    "error closed".to_string()
                }
                Ok(_) => reply_line(&reply),
                Err(e) => classify(&e),
            }
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// Connections held open at once by `many`, at most (each is a file descriptor).
const MANY_MAX: u32 = 60_000;
/// Failed connection attempts after which `many` stops opening more.
const MANY_GIVE_UP: u32 = 10;

fn many(target: SocketAddr, count: u32, timeout: Duration) -> io::Result<()> {
    let count = count.min(MANY_MAX);
    svcnat_examples::netns::raise_open_files(u64::from(count) + 64)?;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut open = Vec::with_capacity(count as usize);
    let mut failed = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&target, timeout) {
            Ok(s) => open.push(s),
            Err(e) => {
                *failures.entry(classify(&e)).or_default() += 1;
                failed += 1;
                if failed == MANY_GIVE_UP {
                    // Bounded time when something is broken: the rest are not tried.
                    *failures.entry("untried".to_string()).or_default() +=
                        (count - open.len() as u32 - failed) as usize;
                    break;
                }
            }
        }
    }
    // Every connection is open now; each must still be answered through its own
    // translation.
    let mut answered = 0;
    let mut pods = BTreeSet::new();
    for s in &open {
        let io = (|| -> io::Result<String> {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            let mut w = s;
            w.write_all(b"many\n")?;
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply)?;
            Ok(reply)
        })();
        let word = match io {
            Ok(reply) if reply.is_empty() => "error closed".to_string(),
            Ok(reply) => reply_line(&reply),
            Err(e) => classify(&e),
        };
        match word
            .strip_prefix("ok pod=")
            .and_then(|r| r.split_whitespace().next())
        {
            Some(pod) => {
                answered += 1;
                pods.insert(pod.to_string());
            }
            None => *failures.entry(word).or_default() += 1,
        }
    }
    let mut out = io::stdout().lock();
    let pods: Vec<String> = pods.into_iter().collect();
    writeln!(
        out,
        "many connected={} answered={answered} pods={}",
        open.len(),
        pods.join(",")
    )?;
    for (word, n) in failures {
        writeln!(out, "failure {n} {word}")?;
    }
    out.flush()
}

fn run(args: &Args) -> io::Result<()> {
    match args.mode {
        Mode::Hold => hold(args.target, args.timeout),
        Mode::Many => many(args.target, args.count, args.timeout),
        Mode::Get => {
            let mut out = io::stdout().lock();
            writeln!(out, "{}", get_once(args.target, args.timeout))?;
            out.flush()
        }
        Mode::Tcp | Mode::Udp | Mode::Sctp => {
            let mut out = io::stdout().lock();
            for _ in 0..args.count {
                let line = match args.mode {
                    Mode::Tcp => tcp_once(args.target, args.timeout),
                    Mode::Sctp => sctp_once(args.target, args.timeout),
                    _ => udp_once(args.target, args.timeout, args.source, args.source_port),
                };
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Ok(())
        }
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
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svcnat-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
