//! The lab's vote front end, as `svcnat-podserver --vote-app REDIS` serves it to browsers:
//! a page with two options and "Processed by container ID `<pod>`"; a vote is a form POST
//! that the pod stores in redis (`RPUSH votes {"voter_id":...,"vote":"a"}`), reaching redis
//! by the name given (`redis:6379`) through the pod's resolver (svcnat-dns, the search
//! list of its resolv.conf) and the Service's ClusterIP. When redis cannot be reached the
//! vote fails with HTTP 500 and says why, as the lab's reader sees before the redis
//! Service exists.
//!
//! Written for the lab from its description (a two-option vote page whose pod name shows
//! which endpoint answered), not from the original app's code. Only browsers get the page
//! (an `Accept` header naming `text/html`); the testbed's probes keep getting the
//! podserver's one-line reply.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The largest form body read, in bytes.
pub const MAX_BODY: usize = 4096;

/// How long storing a vote may take: name lookup aside, connect, write and read each.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// One of the two options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Option a.
    A,
    /// Option b.
    B,
}

impl Vote {
    /// The option's label on the page.
    pub fn label(self) -> &'static str {
        match self {
            Vote::A => "Cats",
            Vote::B => "Dogs",
        }
    }

    /// The value stored in redis.
    pub fn value(self) -> &'static str {
        match self {
            Vote::A => "a",
            Vote::B => "b",
        }
    }
}

/// What became of a vote, shown on the page after a POST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored: redis now holds this many votes in the list.
    Recorded(Vote, i64),
    /// Not stored, and why.
    Failed(String),
}

/// Whether an HTTP request head comes from a browser (asks for HTML).
pub fn wants_html(head: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("text/html")
        })
    })
}

/// The value of header `name` in an HTTP request head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// The voter id from a `Cookie: voter_id=...` header, if it is a plausible one (hex, at
/// most 32 characters).
pub fn voter_id(head: &str) -> Option<String> {
    header(head, "cookie")?.split(';').find_map(|c| {
        let v = c.trim().strip_prefix("voter_id=")?;
        (!v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| v.to_string())
    })
}

/// The vote in an `application/x-www-form-urlencoded` body (`vote=a` or `vote=b`).
pub fn parse_vote(body: &[u8]) -> Option<Vote> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|kv| match kv.trim() {
        "vote=a" => Some(Vote::A),
        "vote=b" => Some(Vote::B),
        _ => None,
    })
}

/// A redis command as RESP (an array of bulk strings).
pub fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Stores `vote` in the list `votes` of the redis at `target` (`host:port`, the host
/// resolved by the system resolver): returns the list's new length.
pub fn record(target: &str, voter: &str, vote: Vote) -> Result<i64, String> {
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| format!("{target} has no address"))?;
    let mut stream = TcpStream::connect_timeout(addr, REDIS_TIMEOUT)
        .map_err(|e| format!("cannot connect to {target} ({addr}): {e}"))?;
    let io = |e: io::Error| format!("redis at {addr}: {e}");
    stream.set_read_timeout(Some(REDIS_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(REDIS_TIMEOUT)).map_err(io)?;
    let item = format!("{{\"voter_id\":\"{voter}\",\"vote\":\"{}\"}}", vote.value());
    stream
        .write_all(&resp_command(&["RPUSH", "votes", &item]))
        .map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream.take_limited())
        .read_line(&mut reply)
        .map_err(io)?;
    let reply = reply.trim_end();
    match reply.strip_prefix(':') {
        Some(n) => n
            .parse()
            .map_err(|_| format!("redis at {addr} answered {reply:?}")),
        None => Err(format!("redis at {addr} answered {reply:?}")),
    }
}

/// A reader that stops after a few hundred bytes (a redis reply line is short).
trait TakeLimited: io::Read + Sized {
    fn take_limited(self) -> io::Take<Self> {
        self.take(512)
    }
}

impl<R: io::Read> TakeLimited for R {}

/// The page: the two options, the outcome of the last vote if any, and the pod's name.
pub fn page(pod: &str, outcome: Option<&Outcome>) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Cats vs Dogs!</title>\n<style>\
         body{font-family:sans-serif;text-align:center;background:#f4f1ea;margin-top:3em}\
         button{font-size:1.6em;width:8em;margin:.6em;padding:.6em;border-radius:.4em;\
         border:0;color:white;cursor:pointer}#a{background:#2d7dd2}#b{background:#e4572e}\
         #result{font-size:1.2em}.failed{color:#b00}#pod{color:#555;margin-top:3em}\
         </style></head>\n<body>\n<h1>Cats vs Dogs!</h1>\n\
         <form method=\"POST\" action=\"/\">\
         <button id=\"a\" name=\"vote\" value=\"a\">Cats</button>\
         <button id=\"b\" name=\"vote\" value=\"b\">Dogs</button></form>\n",
    );
    match outcome {
        Some(Outcome::Recorded(v, n)) => {
            let _ = writeln!(
                html,
                "<p id=\"result\">Your vote for {} was recorded ({n} so far).</p>",
                v.label()
            );
        }
        Some(Outcome::Failed(why)) => {
            let _ = writeln!(
                html,
                "<p id=\"result\" class=\"failed\">Your vote could not be recorded: {}</p>",
                svcnat_core::graph::xml_escape(why)
            );
        }
        None => {}
    }
    let _ = writeln!(
        html,
        "<p id=\"pod\">Processed by container ID <b>{}</b></p>\n</body></html>",
        svcnat_core::graph::xml_escape(pod)
    );
    html
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn forms_cookies_and_commands() {
        assert_eq!(parse_vote(b"vote=a"), Some(Vote::A));
        assert_eq!(parse_vote(b"x=1&vote=b"), Some(Vote::B));
        assert_eq!(parse_vote(b"vote=c"), None);
        assert_eq!(parse_vote(&[0xff, 0xfe]), None);
        let head = "POST / HTTP/1.1\r\nAccept: text/html,*/*\r\nCookie: a=1; voter_id=abc123\r\n";
        assert!(wants_html(head));
        assert!(!wants_html(
            "GET / HTTP/1.1\r\nUser-Agent: svcnat-probe\r\n"
        ));
        assert_eq!(voter_id(head).as_deref(), Some("abc123"));
        assert_eq!(voter_id("Cookie: voter_id=\"><script>"), None);
        assert_eq!(
            resp_command(&["RPUSH", "votes", "x y"]),
            b"*3\r\n$5\r\nRPUSH\r\n$5\r\nvotes\r\n$3\r\nx y\r\n"
        );
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let p = page("vote-1", Some(&Outcome::Failed("<b>".into())));
        assert!(p.contains("&lt;b&gt;"));
        assert!(p.contains("Processed by container ID <b>vote-1</b>"));
        let p = page("vote-1", Some(&Outcome::Recorded(Vote::B, 3)));
        assert!(p.contains("Your vote for Dogs was recorded (3 so far)."));
    }

    #[test]
    fn a_vote_is_pushed_to_redis_and_its_reply_read() {
        use std::io::Read;
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            s.write_all(b":7\r\n").unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert_eq!(record(&target, "ab12", Vote::A), Ok(7));
        let sent = t.join().unwrap();
        assert!(sent.contains("RPUSH"), "{sent}");
        assert!(sent.contains(r#"{"voter_id":"ab12","vote":"a"}"#), "{sent}");
        let err = record("127.0.0.1:1", "ab12", Vote::A).unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
