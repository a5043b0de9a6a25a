//! The cluster DNS server behind `svcnat-dns`: [`core::discovery`](svcnat_core::discovery)
//! answers on the wire, and what the cluster does not answer forwarded upstream for allowed
//! clients.
//!
//! Layers, each usable alone:
//! - [`handle_query`] is sans-IO: one DNS message in (bytes from a UDP datagram or a TCP
//!   frame without its length prefix), at most one message out. It parses with
//!   `hickory-proto`, asks a [`Resolver`], and builds the response: id, opcode and RD
//!   copied, QR set, AA for names in our zones (the cluster domain and the reverse zones),
//!   RA clear. NXDOMAIN and NODATA carry the zone's SOA; names outside our zones are
//!   REFUSED (no open resolver). UDP responses that do not fit 512 bytes, or the client's
//!   EDNS payload size, lose the additional section and then everything but the question,
//!   with TC set (RFC 2181 section 9).
//! - [`handle_query_step`] is the same with recursion allowed for the client: RA set, and
//!   a [`Step::Forward`] with a [`Pending`] query for names outside our zones, reverse
//!   names the cluster lacks, and ExternalName targets outside the cluster. [`Pending`]
//!   builds the upstream query, checks the answer ([`Pending::accepts`]: id and question)
//!   and turns it into the client's response (still sans-IO).
//! - [`forward::Forwarder`] sends pending queries upstream (random ids and source ports,
//!   UDP then TCP on truncation, a bounded table of queries in flight, a timeout).
//! - [`rrl::RateLimiter`] is the pure response-rate limiter (token bucket per client
//!   network, bounded table, slip).
//! - [`Server`] owns the current [`Resolver`] behind an `RwLock<Arc<_>>`: a query holds
//!   the lock only to clone the `Arc`, a reload only to swap it, so reloads never stall
//!   queries. [`Server::serve_udp`] and [`Server::serve_tcp`] are the blocking socket
//!   loops (std only; TCP frames carry the 2-byte length, several queries per connection,
//!   an idle timeout between messages and a deadline per message from its first byte; at
//!   the connection limit a newcomer closes the connection that made no progress for
//!   longest, so slow or idle clients never lock others out); with a forwarder, UDP
//!   workers hand forwarded queries over and go on, and every UDP response is charged to
//!   the rate limiter first. A datagram that is not a plausible query, or comes from a
//!   [`REFLECTOR_PORTS`] port or the server's own address, gets no answer at all
//!   ([`udp_answerable`]).
//!
//! The manifests come from the proxy's [`ManifestDir`](crate::proxy::ManifestDir), so the
//! DNS server and the proxy apply the same files by the same rules (an invalid object
//! keeps its last good version) and allocate the same cluster IPs from the same flags.
//!
//! Errors and limits on the wire, in the order they are checked: fewer than 12 bytes or
//! the QR bit set: dropped (no reply to a reply); an opcode other than QUERY: NOTIMP over
//! TCP, dropped over UDP; a message that does not parse after its header: FORMERR over
//! TCP, dropped over UDP; not exactly one question: FORMERR over TCP, dropped over UDP (a
//! UDP source can be spoofed: an error sent to an echoing service would start an endless
//! exchange, so only plausible queries are answered); an OPT record of an EDNS version above 0: BADVERS (RFC 6891 6.1.3); a class
//! other than IN (or ANY): REFUSED; zone transfers: REFUSED; other types the resolver has
//! no records of (TXT, MX, HTTPS, ...): NODATA or NXDOMAIN.

pub mod forward;
pub mod rrl;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record as WireRecord, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use svcnat_core::discovery::{Answer, QueryType, Rcode, Record, RecordData, Resolver};
use tracing::{debug, warn};

use self::forward::Forwarder;
use self::rrl::{RateLimiter, RrlConfig, Verdict};

/// The largest UDP response without EDNS (RFC 1035 4.2.1).
pub const UDP_MIN_PAYLOAD: usize = 512;
/// The UDP payload size we advertise in our OPT record and the most we send over UDP
/// whatever the client advertises: 1232 bytes, the DNS flag day 2020 value that avoids IP
/// fragmentation.
pub const EDNS_PAYLOAD: u16 = 1232;
/// The largest message a TCP frame's 2-byte length can carry.
pub const TCP_MAX_MESSAGE: usize = 65535;
/// How long a TCP connection may stay idle between queries (RFC 7766 6.2.3 suggests
/// seconds, not minutes).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most TCP connections served at once. A new connection beyond it closes the one
/// that made no progress for longest (idle, or trickling a message), so that slow or idle
/// connections can never hold every slot; when every connection is busy answering, the
/// new one is closed.
pub const TCP_MAX_CONNECTIONS: usize = 256;
/// How long one TCP message may take to arrive from its first byte: a client trickling a
/// query byte by byte is closed once it is over (RFC 7766 6.2.3: servers "may also
/// close... to ensure that resources are not consumed by ... slow" clients).
pub const TCP_MESSAGE_DEADLINE: Duration = Duration::from_secs(3);
/// Source ports a UDP query never comes from, and so are never answered: port 0, and the
/// services that answer (or reflect) whatever datagram they get: echo, daytime, qotd,
/// chargen, time, DNS, NTP, NetBIOS, SNMP, CLDAP, SSDP, memcached. A "query" from one of
/// them is spoofed, and answering it would start an endless exchange or a reflection.
pub const REFLECTOR_PORTS: [u16; 13] = [0, 7, 13, 17, 19, 37, 53, 123, 137, 161, 389, 1900, 11211];
/// How often the socket loops look at their stop flag.
const STOP_POLL: Duration = Duration::from_millis(250);
/// The receive buffer for one UDP datagram (queries are small; larger ones are FORMERR).
const UDP_RECV_BUFFER: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Sans-IO: one message in, at most one out
// ---------------------------------------------------------------------------------------------

/// How a message arrived, which decides the response's size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A UDP datagram: 512 bytes, or the client's EDNS payload size (at most
    /// [`EDNS_PAYLOAD`]); larger responses are truncated with TC.
    Udp,
    /// A TCP frame (without its 2-byte length): up to 65535 bytes.
    Tcp,
}

/// What [`handle_query`] did with a message, for logs and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The question's name, when there was exactly one question.
    pub qname: Option<String>,
    /// The question's type, when there was exactly one question.
    pub qtype: Option<RecordType>,
    /// The response code sent (`None` when the message was dropped).
    pub rcode: Option<ResponseCode>,
    /// Whether the response was truncated (TC).
    pub truncated: bool,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qname.as_deref().unwrap_or("-"))?;
        if let Some(qtype) = self.qtype {
            write!(f, " {qtype}")?;
        }
        match self.rcode {
            Some(rcode) => write!(f, " -> {}", rcode_name(rcode))?,
            None => f.write_str(" -> dropped")?,
        }
        if self.truncated {
            f.write_str(" (truncated)")?;
        }
        Ok(())
    }
}

/// The mnemonic `dig` prints for a response code (`NOERROR`, `NXDOMAIN`, ...).
pub fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        // 16 is BADVERS in a response to an OPT record (hickory reads it as BADSIG).
        other if u16::from(other) == 16 => "BADVERS".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// Answers one DNS message from `resolver`; `None` means send nothing (too short to have a
/// header, or not a query). Names outside the cluster's zones are REFUSED.
pub fn handle_query(resolver: &Resolver, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    handle_query_outcome(resolver, query, transport).0
}

/// Like [`handle_query`], and also says what happened.
pub fn handle_query_outcome(
    resolver: &Resolver,
    query: &[u8],
    transport: Transport,
) -> (Option<Vec<u8>>, Outcome) {
    match handle_query_step(resolver, query, transport, false) {
        (Step::Reply(out), outcome) => (out, outcome),
        // Without recursion nothing is forwarded; answer as an upstream failure would.
        (Step::Forward(pending), _) => pending.fail(),
    }
}

/// What to do with one query: reply now, or ask an upstream server first.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes (`None`: send nothing).
    Reply(Option<Vec<u8>>),
    /// Ask an upstream server [`Pending::upstream_query`], then reply with
    /// [`Pending::complete`] (or [`Pending::fail`] when no upstream answered).
    Forward(Box<Pending>),
}

/// Answers one DNS message like [`handle_query_outcome`], forwarding when `recursion` is
/// allowed for this client: names outside the cluster's zones, reverse names the cluster
/// does not have (CoreDNS's `fallthrough in-addr.arpa ip6.arpa`), and the targets of
/// ExternalName CNAMEs that point outside the cluster. With `recursion`, responses carry
/// RA.
pub fn handle_query_step(
    resolver: &Resolver,
    query: &[u8],
    transport: Transport,
    recursion: bool,
) -> (Step, Outcome) {
    let mut outcome = Outcome {
        qname: None,
        qtype: None,
        rcode: None,
        truncated: false,
    };
    // RFC 1035 4.1.1: every message starts with a 12-byte header. Without one there is no
    // id to answer to.
    let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
        return (Step::Reply(None), outcome);
    };
    // Never answer a response: two servers could bounce errors at each other forever.
    if header.message_type == MessageType::Response {
        return (Step::Reply(None), outcome);
    }
    let header_only = |rcode: ResponseCode, outcome: &mut Outcome| {
        let mut msg = Message::error_msg(header.id, header.op_code, rcode);
        msg.metadata.recursion_desired = header.recursion_desired;
        outcome.rcode = Some(rcode);
        Step::Reply(msg.to_vec().ok())
    };
    // Over UDP the source address is not proven: a datagram that is not a plausible
    // query may be a spoofed one from an echoing service, and an error answer to it starts
    // a loop between the two (or reflects at a victim). Only TCP gets the errors.
    let silent = transport == Transport::Udp;
    if header.op_code != OpCode::Query {
        // RFC 1035 4.1.1: "4 Not Implemented - The name server does not support the
        // requested kind of query."
        let out = if silent {
            Step::Reply(None)
        } else {
            header_only(ResponseCode::NotImp, &mut outcome)
        };
        return (out, outcome);
    }
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            debug!("malformed query {}: {e}", header.id);
            let out = if silent {
                Step::Reply(None)
            } else {
                header_only(ResponseCode::FormErr, &mut outcome)
            };
            return (out, outcome);
        }
    };
    // RFC 9619: a QUERY with a QDCOUNT other than 1 is a format error.
    let [question] = request.queries.as_slice() else {
        let out = if silent {
            Step::Reply(None)
        } else {
            header_only(ResponseCode::FormErr, &mut outcome)
        };
        return (out, outcome);
    };
    let qname = question.name().to_ascii();
    let mut response = Message::response(header.id, OpCode::Query);
    response.metadata.recursion_desired = header.recursion_desired;
    // RFC 1035 4.1.1: RA "denotes whether recursive query support is available in the
    // name server": for this client.
    response.metadata.recursion_available = recursion;
    response.add_query(question.clone());
    let mut limit = match transport {
        Transport::Udp => UDP_MIN_PAYLOAD,
        Transport::Tcp => TCP_MAX_MESSAGE,
    };
    if let Some(edns) = &request.edns {
        // RFC 6891 7: "If an OPT record is present in a received request, compliant
        // responders MUST include an OPT record in their respective responses."
        let mut ours = Edns::new();
        ours.set_max_payload(EDNS_PAYLOAD);
        ours.set_version(0);
        response.set_edns(ours);
        if transport == Transport::Udp {
            limit = usize::from(edns.max_payload().min(EDNS_PAYLOAD)).max(UDP_MIN_PAYLOAD);
        }
        // RFC 6891 6.1.3: "If a responder does not implement the VERSION level of the
        // request, then it MUST respond with RCODE=BADVERS."
        if edns.version() > 0 {
            response.metadata.response_code = ResponseCode::BADVERS;
            outcome.rcode = Some(ResponseCode::BADVERS);
            return (Step::Reply(response.to_vec().ok()), outcome);
        }
    }
    outcome.qname = Some(qname.clone());
    outcome.qtype = Some(question.query_type());
    let rcode = match answer_question(resolver, &qname, question, &mut response, recursion) {
        Ok(Local::Answered(rcode)) => rcode,
        Ok(Local::Forward(upstream)) => {
            let pending = Box::new(Pending {
                response,
                question: upstream,
                limit,
                outcome: outcome.clone(),
            });
            return (Step::Forward(pending), outcome);
        }
        Err(e) => {
            warn!("cannot encode the answer to {}: {e}", question.name());
            response.answers.clear();
            response.authorities.clear();
            response.additionals.clear();
            response.metadata.authoritative = false;
            ResponseCode::ServFail
        }
    };
    response.metadata.response_code = rcode;
    outcome.rcode = Some(rcode);
    let (out, truncated) = encode_within(&mut response, limit);
    outcome.truncated = truncated;
    (Step::Reply(out), outcome)
}

/// A query waiting for an upstream server's answer: the response so far (header, question,
/// OPT, and the cluster's own CNAME records for an ExternalName) and the question to ask.
#[derive(Debug)]
pub struct Pending {
    response: Message,
    question: Query,
    limit: usize,
    outcome: Outcome,
}

impl Pending {
    /// The question to ask upstream (the client's, or an ExternalName's target).
    pub fn question(&self) -> &Query {
        &self.question
    }

    /// What happened so far, for logs.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// The query to send upstream with the id `id`: the question, RD set, and an OPT
    /// record advertising [`EDNS_PAYLOAD`] (so that fewer answers come back truncated).
    pub fn upstream_query(&self, id: u16) -> Option<Vec<u8>> {
        let mut query = Message::query();
        query.metadata.id = id;
        query.metadata.recursion_desired = true;
        query.add_query(self.question.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_version(0);
        query.set_edns(edns);
        query.to_vec().ok()
    }

    /// Parses `bytes` as the upstream's answer to [`Pending::upstream_query`]`(id)`: a
    /// response with that id, opcode QUERY, and exactly our question (name compared
    /// without case, RFC 4343). Anything else is not ours (a late answer, a forgery) and
    /// gives `None`.
    pub fn accepts(&self, id: u16, bytes: &[u8]) -> Option<Message> {
        let message = Message::from_vec(bytes).ok()?;
        let ours = message.metadata.id == id
            && message.metadata.message_type == MessageType::Response
            && message.metadata.op_code == OpCode::Query
            && matches!(message.queries.as_slice(), [q]
                if q.query_type() == self.question.query_type()
                    && q.query_class() == self.question.query_class()
                    && q.name() == self.question.name());
        ours.then_some(message)
    }

    /// The client's response built from the upstream's answer: its rcode and sections
    /// after our own records, the client's id and question, RA set, AA only when the
    /// cluster answered part of it (the ExternalName CNAME), within the client's size
    /// limit.
    pub fn complete(mut self, upstream: Message) -> (Option<Vec<u8>>, Outcome) {
        let rcode = upstream.metadata.response_code;
        // An extended rcode (BADVERS...) belongs to our exchange with the upstream, not to
        // the client's.
        if u16::from(rcode) > 15 {
            return self.fail();
        }
        let response = &mut self.response;
        response.metadata.authoritative = !response.answers.is_empty();
        response.metadata.recursion_available = true;
        response.metadata.response_code = rcode;
        // A truncated answer we could not complete stays truncated (TC) for the client.
        response.metadata.truncation = upstream.metadata.truncation;
        response.answers.extend(upstream.answers);
        response.authorities.clear();
        response.authorities.extend(upstream.authorities);
        response.additionals.clear();
        response.additionals.extend(upstream.additionals);
        self.outcome.rcode = Some(rcode);
        let (out, truncated) = encode_within(response, self.limit);
        self.outcome.truncated = truncated;
        (out, self.outcome)
    }

    /// The client's response when no upstream answered in time: SERVFAIL (RFC 1035
    /// 4.1.1: "the name server was unable to process this query due to a problem with the
    /// name server"). The cluster's own records are dropped with the rest.
    pub fn fail(self) -> (Option<Vec<u8>>, Outcome) {
        self.reply_with(ResponseCode::ServFail)
    }

    /// The client's response when too many queries are already waiting upstream: REFUSED,
    /// as CoreDNS's `forward` answers past its `max_concurrent`.
    pub fn refuse(self) -> (Option<Vec<u8>>, Outcome) {
        self.reply_with(ResponseCode::Refused)
    }

    fn reply_with(mut self, rcode: ResponseCode) -> (Option<Vec<u8>>, Outcome) {
        let response = &mut self.response;
        response.answers.clear();
        response.authorities.clear();
        response.additionals.clear();
        response.metadata.authoritative = false;
        response.metadata.response_code = rcode;
        self.outcome.rcode = Some(rcode);
        let (out, truncated) = encode_within(response, self.limit);
        self.outcome.truncated = truncated;
        (out, self.outcome)
    }
}

/// The response to a query over its client's rate limit on a slip turn: the id, the
/// question, TC set and nothing else, so that a real client asks again over TCP (BIND's
/// RRL "slip"). `None` for what would get no answer anyway.
pub fn slip_response(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query
        || request.metadata.op_code != OpCode::Query
    {
        return None;
    }
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.truncation = true;
    response.add_queries(request.queries);
    response.to_vec().ok()
}

/// What the cluster's zones say about a question.
enum Local {
    /// Answered (the response's sections and AA are filled); the rcode.
    Answered(ResponseCode),
    /// Ask upstream this question; the response holds what the cluster adds in front.
    Forward(Query),
}

/// Fills the answer, authority and additional sections and the AA bit, or says what to ask
/// upstream (only with `recursion`).
fn answer_question(
    resolver: &Resolver,
    name: &str,
    question: &Query,
    response: &mut Message,
    recursion: bool,
) -> Result<Local, String> {
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        // Our zones are class IN; Chaos `version.bind` and friends are not ours to answer.
        return Ok(Local::Answered(ResponseCode::Refused));
    }
    let qtype = question.query_type();
    let answer = match qtype {
        RecordType::A => resolver.query(name, QueryType::A),
        RecordType::AAAA => resolver.query(name, QueryType::Aaaa),
        RecordType::CNAME => resolver.query(name, QueryType::Cname),
        RecordType::SRV => resolver.query(name, QueryType::Srv),
        RecordType::PTR => resolver.query(name, QueryType::Ptr),
        RecordType::NS => resolver.query(name, QueryType::Ns),
        RecordType::SOA => resolver.query(name, QueryType::Soa),
        RecordType::ANY => resolver.query(name, QueryType::Any),
        // We serve no zone transfers, nor forward them.
        RecordType::AXFR | RecordType::IXFR => return Ok(Local::Answered(ResponseCode::Refused)),
        _ => answer_other_type(resolver, name),
    };
    let rcode = match answer.rcode {
        Rcode::NoError => ResponseCode::NoError,
        Rcode::NxDomain if recursion && is_reverse_name(name) => {
            // CoreDNS's default Corefile: `kubernetes cluster.local in-addr.arpa ip6.arpa
            // { fallthrough in-addr.arpa ip6.arpa }`: reverse names the cluster does not
            // have go on to `forward`.
            return Ok(Local::Forward(question.clone()));
        }
        Rcode::NxDomain => ResponseCode::NXDomain,
        // Outside our zones: forwarded for allowed clients, else REFUSED (no open
        // resolver).
        Rcode::Refused if recursion => return Ok(Local::Forward(question.clone())),
        Rcode::Refused => return Ok(Local::Answered(ResponseCode::Refused)),
    };
    // RFC 1035 4.1.1: AA "specifies that the responding name server is an authority for
    // the domain name in question section": every name the resolver does not refuse.
    response.metadata.authoritative = true;
    for r in &answer.records {
        response.add_answer(wire_record(r)?);
    }
    if recursion && let Some(target) = external_target(resolver, &answer, qtype) {
        // An ExternalName pointing outside: CoreDNS completes the CNAME with the
        // upstream's answer for the target, so that pods resolve it in one query.
        let mut target = wire_name(&target)?;
        target.set_fqdn(true);
        let mut upstream = Query::query(target, qtype);
        upstream.set_query_class(DNSClass::IN);
        return Ok(Local::Forward(upstream));
    }
    for r in &answer.authority {
        response.add_authority(wire_record(r)?);
    }
    for r in &answer.additional {
        response.add_additional(wire_record(r)?);
    }
    Ok(Local::Answered(rcode))
}

/// The target of the CNAME chain that ends `answer`, when it leaves the cluster's zones and
/// the question asks for more than the CNAME itself.
fn external_target(resolver: &Resolver, answer: &Answer, qtype: RecordType) -> Option<String> {
    if matches!(qtype, RecordType::CNAME | RecordType::ANY) || answer.rcode != Rcode::NoError {
        return None;
    }
    let RecordData::Cname(target) = &answer.records.last()?.data else {
        return None;
    };
    (resolver.query(target, QueryType::Soa).rcode == Rcode::Refused).then(|| target.clone())
}

/// Whether `name` lies in `in-addr.arpa` or `ip6.arpa`.
fn is_reverse_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    ["in-addr.arpa", "ip6.arpa"]
        .iter()
        .any(|zone| name == *zone || name.ends_with(&format!(".{zone}")))
}

/// A question of a type the resolver has no records of (TXT, MX, HTTPS, ...): NXDOMAIN when
/// the name does not exist, else NODATA, with CNAMEs inside our zones followed.
///
/// Asks for NS, which exists only at zone apexes and follows CNAMEs like any other type,
/// then removes the NS records it found, leaving NODATA at the apex.
fn answer_other_type(resolver: &Resolver, name: &str) -> Answer {
    let mut answer = resolver.query(name, QueryType::Ns);
    let apex = answer
        .records
        .iter()
        .find(|r| r.data.rtype() == QueryType::Ns)
        .map(|r| r.name.clone());
    if let Some(apex) = apex {
        answer.records.retain(|r| r.data.rtype() != QueryType::Ns);
        answer.additional.clear();
        // RFC 2308 2.2: NODATA carries the zone's SOA.
        answer.authority = resolver.query(&apex, QueryType::Soa).records;
    }
    answer
}

fn wire_name(name: &str) -> Result<Name, String> {
    Name::from_ascii(name).map_err(|e| format!("{name:?}: {e}"))
}

/// A discovery record as a hickory record (class IN).
fn wire_record(r: &Record) -> Result<WireRecord, String> {
    let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let data = match &r.data {
        RecordData::A(ip) => RData::A(A(*ip)),
        RecordData::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        RecordData::Cname(n) => RData::CNAME(CNAME(wire_name(n)?)),
        RecordData::Ptr(n) => RData::PTR(PTR(wire_name(n)?)),
        RecordData::Ns(n) => RData::NS(NS(wire_name(n)?)),
        RecordData::Srv {
            priority,
            weight,
            port,
            target,
        } => RData::SRV(SRV::new(*priority, *weight, *port, wire_name(target)?)),
        RecordData::Soa {
            mname,
            rname,
            serial,
            refresh,
            retry,
            expire,
            minimum,
        } => RData::SOA(SOA::new(
            wire_name(mname)?,
            wire_name(rname)?,
            *serial,
            clamp(*refresh),
            clamp(*retry),
            clamp(*expire),
            *minimum,
        )),
    };
    Ok(WireRecord::from_rdata(wire_name(&r.name)?, r.ttl, data))
}

/// Encodes `response` in at most `limit` bytes; returns the bytes and whether TC is set.
///
/// RFC 2181 9: the TC bit "should not be set merely because some extra information could
/// have been included in a reply, but there was no room for it": the additional section
/// goes first without TC. When the answer still does not fit, the client must ask again
/// over TCP and gets the question alone (and the OPT record) with TC.
fn encode_within(response: &mut Message, limit: usize) -> (Option<Vec<u8>>, bool) {
    let fits = |m: &Message| match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit && !m.metadata.truncation => {
            // The encoder drops records that overflow 65535 bytes and sets TC itself.
            let tc = bytes.get(2).is_some_and(|b| b & 0x02 != 0);
            (!tc).then_some(bytes)
        }
        _ => None,
    };
    if let Some(bytes) = fits(response) {
        return (Some(bytes), false);
    }
    if !response.additionals.is_empty() {
        response.additionals.clear();
        if let Some(bytes) = fits(response) {
            return (Some(bytes), false);
        }
    }
    response.answers.clear();
    response.authorities.clear();
    response.metadata.truncation = true;
    (response.to_vec().ok(), true)
}

// ---------------------------------------------------------------------------------------------
// Server: the current resolver, and the socket loops
// ---------------------------------------------------------------------------------------------

/// Serves DNS from a resolver that can be replaced while queries run, forwarding for
/// allowed clients when it has a [`Forwarder`], rate limiting UDP responses when it has a
/// [`RateLimiter`].
#[derive(Debug)]
pub struct Server {
    resolver: RwLock<Arc<Resolver>>,
    tcp: Mutex<TcpSlots>,
    tcp_max_connections: usize,
    tcp_idle_timeout: Duration,
    tcp_message_deadline: Duration,
    forwarder: Option<Forwarder>,
    allow_recursion: Vec<IpNet>,
    rrl: Option<Mutex<RateLimiter>>,
    /// The rate limiter's time origin.
    epoch: Instant,
}

impl Server {
    /// A server answering from `resolver`, forwarding nothing and limiting nothing.
    pub fn new(resolver: Resolver) -> Server {
        Server {
            resolver: RwLock::new(Arc::new(resolver)),
            tcp: Mutex::new(TcpSlots::default()),
            tcp_max_connections: TCP_MAX_CONNECTIONS,
            tcp_idle_timeout: TCP_IDLE_TIMEOUT,
            tcp_message_deadline: TCP_MESSAGE_DEADLINE,
            forwarder: None,
            allow_recursion: Vec::new(),
            rrl: None,
            epoch: Instant::now(),
        }
    }

    /// Sets how long a TCP connection may stay idle (default [`TCP_IDLE_TIMEOUT`]).
    pub fn with_tcp_idle_timeout(mut self, timeout: Duration) -> Server {
        self.tcp_idle_timeout = timeout;
        self
    }

    /// Sets how long one TCP message may take from its first byte (default
    /// [`TCP_MESSAGE_DEADLINE`]).
    pub fn with_tcp_message_deadline(mut self, deadline: Duration) -> Server {
        self.tcp_message_deadline = deadline;
        self
    }

    /// Sets how many TCP connections are served at once (default [`TCP_MAX_CONNECTIONS`],
    /// at least 1).
    pub fn with_tcp_max_connections(mut self, max: usize) -> Server {
        self.tcp_max_connections = max.max(1);
        self
    }

    /// How many TCP connections are being served now.
    pub fn tcp_connections(&self) -> usize {
        self.tcp_slots().live.len()
    }

    /// Forwards names the cluster does not answer through `forwarder`, for clients inside
    /// `allow` only (everyone else keeps getting REFUSED for them).
    pub fn with_forwarder(mut self, forwarder: Forwarder, allow: Vec<IpNet>) -> Server {
        self.forwarder = Some(forwarder);
        self.allow_recursion = allow;
        self
    }

    /// Limits the UDP responses each client network gets (see [`rrl`]).
    pub fn with_rate_limit(mut self, config: RrlConfig) -> Server {
        self.rrl = Some(Mutex::new(RateLimiter::new(config)));
        self
    }

    /// Whether `client` gets forwarding (and RA).
    pub fn recursion_for(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.forwarder.is_some() && self.allow_recursion.iter().any(|n| n.contains(&client))
    }

    /// The resolver queries are answered from now.
    pub fn resolver(&self) -> Arc<Resolver> {
        // A poisoned lock still holds a whole `Arc` (a swap cannot be half done).
        Arc::clone(&self.resolver.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the resolver; queries already running finish with the old one.
    pub fn set_resolver(&self, resolver: Resolver) {
        let new = Arc::new(resolver);
        let old = std::mem::replace(
            &mut *self
                .resolver
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            new,
        );
        // The old zone is freed here, outside the lock.
        drop(old);
    }

    /// Answers one message with the current resolver (see [`handle_query_step`]), logging
    /// it at debug level. A forwarded query blocks the caller until the upstream answers
    /// or the forwarder's timeout passes. No rate limit applies here.
    pub fn handle(&self, query: &[u8], transport: Transport, peer: SocketAddr) -> Option<Vec<u8>> {
        let resolver = self.resolver();
        let recursion = self.recursion_for(peer.ip());
        let (out, outcome) = match handle_query_step(&resolver, query, transport, recursion) {
            (Step::Reply(out), outcome) => (out, outcome),
            (Step::Forward(pending), _) => match &self.forwarder {
                Some(f) => f.forward_blocking(pending, transport == Transport::Tcp),
                None => pending.fail(),
            },
        };
        debug!("{peer} {transport:?} {outcome}");
        out
    }

    /// The rate limiter's verdict on one more UDP response to `peer` (always
    /// [`Verdict::Send`] without a limiter).
    fn rate_limit(&self, peer: IpAddr) -> Verdict {
        let Some(rrl) = &self.rrl else {
            return Verdict::Send;
        };
        let now = self.epoch.elapsed();
        rrl.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(peer, now)
    }

    /// Answers datagrams on `socket` until `stop` is set (checked every 250 ms). Several
    /// threads may serve clones of one socket. Forwarded queries are answered from the
    /// forwarder's thread, so a slow upstream never holds a worker.
    ///
    /// Every response is charged to the client's network first (RRL): over the budget the
    /// query is dropped unanswered, or answered with TC on a slip turn.
    pub fn serve_udp(&self, socket: &UdpSocket, stop: &AtomicBool) -> io::Result<()> {
        socket.set_read_timeout(Some(STOP_POLL))?;
        let local = socket.local_addr()?;
        // The forwarder's replies go out through a clone of the socket.
        let replies = Arc::new(socket.try_clone()?);
        let mut buf = vec![0u8; UDP_RECV_BUFFER];
        while !stop.load(Ordering::Relaxed) {
            let (len, peer) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error from an earlier send surfaces here on Linux; not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            let Some(query) = buf.get(..len) else {
                continue;
            };
            // Checked before the rate limiter: spoofed datagrams must not spend a real
            // client's budget either.
            if !udp_answerable(query, peer, local) {
                debug!("{peer} Udp not a plausible query: dropped");
                continue;
            }
            let response = match self.rate_limit(peer.ip()) {
                Verdict::Send => self.handle_udp(query, peer, &replies),
                Verdict::Slip => {
                    debug!("{peer} Udp over the rate limit: truncated");
                    slip_response(query)
                }
                Verdict::Drop => {
                    debug!("{peer} Udp over the rate limit: dropped");
                    None
                }
            };
            if let Some(response) = response
                && let Err(e) = socket.send_to(&response, peer)
            {
                debug!("send to {peer}: {e}");
            }
        }
        Ok(())
    }

    /// One UDP query: the response to send now, or `None` (nothing, or the forwarder
    /// sends it later through `replies`).
    fn handle_udp(
        &self,
        query: &[u8],
        peer: SocketAddr,
        replies: &Arc<UdpSocket>,
    ) -> Option<Vec<u8>> {
        let resolver = self.resolver();
        let recursion = self.recursion_for(peer.ip());
        match handle_query_step(&resolver, query, Transport::Udp, recursion) {
            (Step::Reply(out), outcome) => {
                debug!("{peer} Udp {outcome}");
                out
            }
            (Step::Forward(pending), _) => {
                let Some(forwarder) = &self.forwarder else {
                    return pending.fail().0;
                };
                let replies = Arc::clone(replies);
                forwarder.spawn(pending, false, move |out, outcome| {
                    debug!("{peer} Udp {outcome} (forwarded)");
                    if let Some(out) = out
                        && let Err(e) = replies.send_to(&out, peer)
                    {
                        debug!("send to {peer}: {e}");
                    }
                });
                None
            }
        }
    }

    /// Accepts connections on `listener` until `stop` is set, serving each in its own
    /// thread (at most [`TCP_MAX_CONNECTIONS`] at once; beyond that a new connection
    /// closes the one that made no progress for longest, see [`TCP_MAX_CONNECTIONS`]). A
    /// blocked `accept` sees `stop` at the next connection; [`wake_tcp`] makes one.
    pub fn serve_tcp(
        self: &Arc<Self>,
        listener: &TcpListener,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        for stream in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    debug!("accept: {e}");
                    // Out of descriptors and the like: do not spin.
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Some(slot) = self.admit(&stream) else {
                debug!("every TCP connection is busy answering; closing a new one");
                continue;
            };
            let server = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name("dns-tcp".into())
                .spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = server.serve_connection(stream, Some(slot)) {
                        debug!("tcp {peer:?}: {e}");
                    }
                    server.tcp_slots().live.remove(&slot);
                });
            if let Err(e) = spawned {
                self.tcp_slots().live.remove(&slot);
                warn!("cannot start a TCP connection thread: {e}");
            }
        }
        Ok(())
    }

    fn tcp_slots(&self) -> MutexGuard<'_, TcpSlots> {
        self.tcp.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a connection slot for `stream`, closing the connection that made no
    /// progress for longest when every slot is taken; `None` when every connection is
    /// busy answering (or the stream cannot be registered).
    fn admit(&self, stream: &TcpStream) -> Option<u64> {
        let handle = stream.try_clone().ok()?;
        let mut slots = self.tcp_slots();
        if slots.live.len() >= self.tcp_max_connections {
            let victim = slots
                .live
                .iter()
                .filter(|(_, s)| !s.busy)
                .min_by_key(|(_, s)| s.since)
                .map(|(id, _)| *id)?;
            if let Some(old) = slots.live.remove(&victim) {
                debug!(
                    "TCP connections at the limit; closing one without progress for {:?}",
                    old.since.elapsed()
                );
                // Its thread's blocked read or write returns, and it ends.
                let _ = old.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        let id = slots.next;
        slots.next += 1;
        slots.live.insert(
            id,
            TcpSlot {
                stream: handle,
                since: Instant::now(),
                busy: false,
            },
        );
        Some(id)
    }

    /// Marks a connection busy answering (it is not closed for a newcomer meanwhile), or
    /// done with a message (progress: it goes to the back of the eviction order).
    fn mark(&self, slot: Option<u64>, busy: bool) {
        let Some(id) = slot else { return };
        if let Some(s) = self.tcp_slots().live.get_mut(&id) {
            s.busy = busy;
            s.since = Instant::now();
        }
    }

    /// Serves one TCP connection: length-prefixed queries, answered in order, until the
    /// client closes it, stays idle for the idle timeout (RFC 7766), or takes longer than
    /// the message deadline to send one message. Not counted in the connection limit.
    pub fn serve_tcp_connection(&self, stream: TcpStream) -> io::Result<()> {
        self.serve_connection(stream, None)
    }

    fn serve_connection(&self, mut stream: TcpStream, slot: Option<u64>) -> io::Result<()> {
        let peer = stream.peer_addr()?;
        stream.set_write_timeout(Some(self.tcp_message_deadline))?;
        stream.set_nodelay(true)?;
        loop {
            let Some(query) = read_frame(
                &mut stream,
                self.tcp_idle_timeout,
                self.tcp_message_deadline,
            )?
            else {
                return Ok(());
            };
            self.mark(slot, true);
            let response = self.handle(&query, Transport::Tcp, peer);
            self.mark(slot, false);
            let Some(response) = response else {
                // RFC 7766 7: a server may close a connection it cannot make sense of.
                return Ok(());
            };
            let Ok(n) = u16::try_from(response.len()) else {
                return Ok(());
            };
            let mut frame = Vec::with_capacity(response.len() + 2);
            frame.extend_from_slice(&n.to_be_bytes());
            frame.extend_from_slice(&response);
            stream.write_all(&frame)?;
            self.mark(slot, false);
        }
    }
}

/// The TCP connections being served, for the connection limit.
#[derive(Debug, Default)]
struct TcpSlots {
    next: u64,
    live: std::collections::BTreeMap<u64, TcpSlot>,
}

/// One TCP connection being served.
#[derive(Debug)]
struct TcpSlot {
    /// A handle on the connection, to close it for a newcomer.
    stream: TcpStream,
    /// When it was accepted or last made progress (a message read or answered).
    since: Instant,
    /// Answering a message now (never closed for a newcomer then).
    busy: bool,
}

/// Reads one length-prefixed message: `None` when the client closed the connection or
/// sent nothing for `idle`; an error when the message did not arrive whole within
/// `deadline` of its first byte.
fn read_frame(
    stream: &mut TcpStream,
    idle: Duration,
    deadline: Duration,
) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    stream.set_read_timeout(Some(idle))?;
    loop {
        match stream.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let end = Instant::now() + deadline;
    read_before(stream, &mut len[1..], end)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read_before(stream, &mut buf, end)?;
    Ok(Some(buf))
}

/// Fills `buf` from `stream`, failing once `end` passes.
fn read_before(stream: &mut TcpStream, buf: &mut [u8], end: Instant) -> io::Result<()> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TCP message not complete within the message deadline",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(rest) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a UDP datagram from `peer`, received on a socket bound to `local`, gets any
/// answer: not from a [`REFLECTOR_PORTS`] port, not from the server's own address and
/// port, and shaped like a query (a 12-byte header with QR clear, opcode QUERY and
/// exactly one question). Everything else is dropped unanswered.
pub fn udp_answerable(datagram: &[u8], peer: SocketAddr, local: SocketAddr) -> bool {
    if REFLECTOR_PORTS.contains(&peer.port()) {
        return false;
    }
    let (pip, lip) = (peer.ip().to_canonical(), local.ip().to_canonical());
    if peer.port() == local.port() && (pip == lip || lip.is_unspecified()) {
        return false;
    }
    let Some(header) = datagram.get(..12) else {
        return false;
    };
    let flags = header[2];
    let qr = flags & 0x80 != 0;
    let opcode = (flags >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    !qr && opcode == 0 && qdcount == 1
}

/// Connects to a TCP listener so that a thread blocked in [`Server::serve_tcp`]'s accept
/// wakes and sees its stop flag (an unspecified address is reached on loopback).
pub fn wake_tcp(addr: SocketAddr) {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let _ = TcpStream::connect_timeout(&target, Duration::from_millis(500));
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcnat_core::discovery::DiscoveryConfig;
    use svcnat_core::manifest::{ClusterConfig, Manifests};

    const LAB: &str = "\
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: instavote}
spec:
  clusterIP: 10.102.77.6
  selector: {app: redis}
  ports: [{name: redis, port: 6379}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: instavote}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: instavote, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: pg, image: postgres}]}
status: {podIP: 10.244.0.20}
";

    fn resolver_of(yaml: &str) -> Resolver {
        let config = ClusterConfig::default();
        let mut m = Manifests::from_files([("lab.yaml", yaml)], &config);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let cluster = m.build(&config);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        Resolver::new(&cluster, DiscoveryConfig::default())
    }

    fn lab() -> Resolver {
        resolver_of(LAB)
    }

    /// A headless Service `big` in `default` with `n` ready endpoints.
    fn big(n: usize) -> Resolver {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec:\n  clusterIP: None\n  \
             ports: [{port: 80}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: big}\n\
             subsets:\n- ports: [{port: 80}]\n  addresses:\n",
        );
        for i in 0..n {
            yaml.push_str(&format!("  - ip: 10.244.{}.{}\n", i / 200, 10 + i % 200));
        }
        resolver_of(&yaml)
    }

    /// A query built byte by byte: header, one question, optionally an OPT record.
    fn query_bytes(id: u16, flags: u16, name: &str, qtype: u16, opt: Option<(u16, u8)>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
        b.extend_from_slice(&[0, 0, 0, 0]); // ANCOUNT, NSCOUNT
        b.extend_from_slice(&u16::from(opt.is_some()).to_be_bytes()); // ARCOUNT
        for label in name.trim_end_matches('.').split('.') {
            b.push(label.len() as u8);
            b.extend_from_slice(label.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes()); // IN
        if let Some((payload, version)) = opt {
            b.push(0); // root owner
            b.extend_from_slice(&41u16.to_be_bytes()); // OPT
            b.extend_from_slice(&payload.to_be_bytes()); // CLASS = payload size
            b.extend_from_slice(&[0, version, 0, 0]); // ext-rcode, version, flags
            b.extend_from_slice(&0u16.to_be_bytes()); // RDLENGTH
        }
        b
    }

    const RD: u16 = 0x0100;
    const T_A: u16 = 1;
    const T_AAAA: u16 = 28;
    const T_TXT: u16 = 16;

    fn ask(r: &Resolver, name: &str, qtype: u16) -> Vec<u8> {
        handle_query(
            r,
            &query_bytes(0xbeef, RD, name, qtype, None),
            Transport::Udp,
        )
        .expect("a response")
    }

    fn parse(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).expect("a valid response")
    }

    fn counts(b: &[u8]) -> [u16; 4] {
        [4, 6, 8, 10].map(|i| u16::from_be_bytes([b[i], b[i + 1]]))
    }

    fn rcode(b: &[u8]) -> u8 {
        b[3] & 0x0f
    }

    #[test]
    fn a_record_header_bits_and_answer() {
        let r = lab();
        let out = ask(&r, "redis.instavote.svc.cluster.local", T_A);
        assert_eq!(&out[..2], &[0xbe, 0xef], "id echoed");
        // QR=1, opcode 0, AA=1, TC=0, RD=1 | RA=0, Z=0, rcode 0
        assert_eq!(out[2], 0b1000_0101);
        assert_eq!(out[3], 0b0000_0000);
        assert_eq!(counts(&out), [1, 1, 0, 0]);
        // The answer's owner is a pointer to the question name at offset 12.
        let q_end = 12 + "redis.instavote.svc.cluster.local".len() + 2 + 4;
        let rr = &out[q_end..];
        assert_eq!(&rr[..2], &[0xc0, 12], "compressed owner");
        assert_eq!(&rr[2..4], &T_A.to_be_bytes());
        assert_eq!(&rr[4..6], &[0, 1], "class IN");
        assert_eq!(&rr[6..10], &5u32.to_be_bytes(), "TTL");
        assert_eq!(&rr[10..12], &[0, 4]);
        assert_eq!(&rr[12..16], &[10, 102, 77, 6]);
        assert_eq!(rr.len(), 16);
        // Without RD, RD stays clear.
        let out = handle_query(
            &r,
            &query_bytes(7, 0, "redis.instavote.svc.cluster.local", T_A, None),
            Transport::Udp,
        )
        .unwrap();
        assert_eq!(out[2], 0b1000_0100);
    }

    #[test]
    fn question_case_is_preserved() {
        let out = ask(&lab(), "ReDiS.InstaVote.svc.cluster.local", T_A);
        let m = parse(&out);
        assert_eq!(
            m.queries[0].name().to_ascii(),
            "ReDiS.InstaVote.svc.cluster.local."
        );
        assert_eq!(
            m.answers[0].name.to_ascii(),
            "ReDiS.InstaVote.svc.cluster.local."
        );
    }

    #[test]
    fn nodata_and_nxdomain_carry_the_soa() {
        let r = lab();
        let out = ask(&r, "redis.instavote.svc.cluster.local", T_AAAA);
        assert_eq!(rcode(&out), 0);
        assert_eq!(out[2] & 0x04, 0x04, "AA");
        assert_eq!(counts(&out), [1, 0, 1, 0]);
        let m = parse(&out);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(m.authorities[0].name.to_ascii(), "cluster.local.");

        let out = ask(&r, "nosuch.instavote.svc.cluster.local", T_A);
        assert_eq!(rcode(&out), 3, "NXDOMAIN");
        assert_eq!(out[2] & 0x04, 0x04, "AA");
        assert_eq!(counts(&out), [1, 0, 1, 0]);
        assert_eq!(parse(&out).authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn outside_names_are_refused_without_aa_or_ra() {
        let out = ask(&lab(), "example.com", T_A);
        assert_eq!(rcode(&out), 5);
        assert_eq!(out[2], 0b1000_0001, "QR and RD only");
        assert_eq!(out[3] & 0x80, 0, "RA clear");
        assert_eq!(counts(&out), [1, 0, 0, 0]);
    }

    #[test]
    fn other_types_are_nodata_or_nxdomain() {
        let r = lab();
        let out = ask(&r, "redis.instavote.svc.cluster.local", T_TXT);
        assert_eq!((rcode(&out), counts(&out)), (0, [1, 0, 1, 0]));
        let out = ask(&r, "cluster.local", T_TXT);
        assert_eq!(
            (rcode(&out), counts(&out)),
            (0, [1, 0, 1, 0]),
            "apex NODATA"
        );
        assert_eq!(parse(&out).authorities[0].record_type(), RecordType::SOA);
        let out = ask(&r, "nosuch.instavote.svc.cluster.local", 65);
        assert_eq!((rcode(&out), counts(&out)), (3, [1, 0, 1, 0]));
        assert_eq!(rcode(&ask(&r, "example.com", T_TXT)), 5);
        assert_eq!(rcode(&ask(&r, "cluster.local", 252)), 5, "AXFR refused");
    }

    #[test]
    fn srv_has_additional_addresses_and_headless_names_answer() {
        let r = lab();
        let m = parse(&ask(
            &r,
            "_redis._tcp.redis.instavote.svc.cluster.local",
            33,
        ));
        assert_eq!(m.answers.len(), 1);
        let RData::SRV(srv) = &m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!(srv.port, 6379);
        assert_eq!(srv.target.to_ascii(), "redis.instavote.svc.cluster.local.");
        assert_eq!(m.additionals.len(), 1);
        let m = parse(&ask(&r, "db-0.db.instavote.svc.cluster.local", T_A));
        assert_eq!(
            m.answers[0].data,
            RData::A(A("10.244.0.20".parse().unwrap()))
        );
        let m = parse(&ask(&r, "6.77.102.10.in-addr.arpa", 12));
        assert_eq!(
            m.answers[0].data,
            RData::PTR(PTR(
                Name::from_ascii("redis.instavote.svc.cluster.local.").unwrap()
            ))
        );
    }

    #[test]
    fn garbage_is_formerr_over_tcp_and_dropped_over_udp() {
        let r = lab();
        assert_eq!(handle_query(&r, &[], Transport::Udp), None);
        assert_eq!(handle_query(&r, &[1, 2, 3], Transport::Udp), None);
        // A header that promises a question that is not there.
        let mut q = query_bytes(0x1234, RD, "redis.instavote.svc.cluster.local", T_A, None);
        q.truncate(20);
        let out = handle_query(&r, &q, Transport::Tcp).unwrap();
        assert_eq!(out, vec![0x12, 0x34, 0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(handle_query(&r, &q, Transport::Udp), None);
        // A label running past the end.
        let mut q = vec![0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 40];
        q.extend_from_slice(b"short");
        let out = handle_query(&r, &q, Transport::Tcp).unwrap();
        assert_eq!(&out[..4], &[0xab, 0xcd, 0x80, 0x01]);
        assert_eq!(handle_query(&r, &q, Transport::Udp), None);
        // A response is never answered.
        let mut q = query_bytes(1, RD, "redis.instavote.svc.cluster.local", T_A, None);
        q[2] |= 0x80;
        assert_eq!(handle_query(&r, &q, Transport::Udp), None);
    }

    #[test]
    fn question_count_other_than_one_is_formerr() {
        let r = lab();
        let none = [0, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let out = handle_query(&r, &none, Transport::Tcp).unwrap();
        assert_eq!(out, vec![0, 9, 0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(handle_query(&r, &none, Transport::Udp), None);
        let mut two = query_bytes(9, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let question = two[12..].to_vec();
        two.extend_from_slice(&question);
        two[5] = 2;
        let out = handle_query(&r, &two, Transport::Tcp).unwrap();
        assert_eq!(rcode(&out), 1);
        assert_eq!(counts(&out), [0, 0, 0, 0]);
        assert_eq!(handle_query(&r, &two, Transport::Udp), None);
    }

    #[test]
    fn other_opcodes_are_notimp() {
        let r = lab();
        for opcode in [1u16, 2, 4, 5, 15] {
            let q = query_bytes(0x4242, RD | (opcode << 11), "cluster.local", T_A, None);
            assert_eq!(
                handle_query(&r, &q, Transport::Udp),
                None,
                "opcode {opcode}"
            );
            let out = handle_query(&r, &q, Transport::Tcp).unwrap();
            assert_eq!(&out[..2], &[0x42, 0x42]);
            assert_eq!(out[2], 0x80 | (opcode as u8) << 3 | 0x01, "opcode {opcode}");
            assert_eq!(rcode(&out), 4, "NOTIMP");
        }
    }

    #[test]
    fn edns_is_echoed_and_badvers_refused() {
        let r = lab();
        let q = query_bytes(
            3,
            RD,
            "redis.instavote.svc.cluster.local",
            T_A,
            Some((4096, 0)),
        );
        let m = parse(&handle_query(&r, &q, Transport::Udp).unwrap());
        let edns = m.edns.as_ref().expect("OPT echoed");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert_eq!(m.answers.len(), 1);
        let q = query_bytes(
            3,
            RD,
            "redis.instavote.svc.cluster.local",
            T_A,
            Some((4096, 1)),
        );
        let out = handle_query(&r, &q, Transport::Udp).unwrap();
        let m = parse(&out);
        // BADVERS and BADSIG share the value 16; hickory reads it back as BADSIG.
        assert_eq!(u16::from(m.response_code), 16);
        assert!(m.answers.is_empty());
        assert_eq!(
            rcode(&out),
            0,
            "BADVERS is 16: low bits 0, the rest in the OPT TTL"
        );
    }

    #[test]
    fn large_udp_answers_are_truncated_and_complete_over_tcp() {
        let r = big(60);
        let name = "big.default.svc.cluster.local";
        let out = ask(&r, name, T_A);
        assert!(out.len() <= UDP_MIN_PAYLOAD);
        assert_eq!(out[2] & 0x02, 0x02, "TC");
        assert_eq!(counts(&out), [1, 0, 0, 0]);
        assert_eq!(parse(&out).queries[0].name().to_ascii(), format!("{name}."));
        // With EDNS 1232 the 60 records (16 bytes each) fit.
        let q = query_bytes(1, RD, name, T_A, Some((1232, 0)));
        let out = handle_query(&r, &q, Transport::Udp).unwrap();
        assert_eq!(out[2] & 0x02, 0);
        assert_eq!(counts(&out), [1, 60, 0, 1]);
        // A client advertising more than we allow still gets at most EDNS_PAYLOAD.
        let r = big(100);
        let q = query_bytes(1, RD, name, T_A, Some((65000, 0)));
        let out = handle_query(&r, &q, Transport::Udp).unwrap();
        assert!(out.len() <= usize::from(EDNS_PAYLOAD));
        assert_eq!(out[2] & 0x02, 0x02);
        assert_eq!(counts(&out), [1, 0, 0, 1], "question and OPT only");
        let q = query_bytes(1, RD, name, T_A, None);
        let out = handle_query(&r, &q, Transport::Tcp).unwrap();
        assert_eq!(out[2] & 0x02, 0);
        assert_eq!(counts(&out), [1, 100, 0, 0]);
    }

    #[test]
    fn the_additional_section_goes_before_tc() {
        // 9 named ports: 9 SRV records of 50 bytes (targets are never compressed, RFC 2782)
        // fit 512 bytes only without the glue A record.
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: many}\nspec:\n  clusterIP: 10.96.3.3\n  ports:\n",
        );
        for i in 0..9 {
            yaml.push_str(&format!("  - {{name: p{i}, port: {}}}\n", 1000 + i));
        }
        let r = resolver_of(&yaml);
        let full = handle_query(
            &r,
            &query_bytes(1, 0, "many.default.svc.cluster.local", 33, None),
            Transport::Tcp,
        )
        .unwrap();
        assert_eq!(counts(&full), [1, 9, 0, 1]);
        assert!(full.len() > UDP_MIN_PAYLOAD, "{}", full.len());
        let out = ask(&r, "many.default.svc.cluster.local", 33);
        assert_eq!(out[2] & 0x02, 0, "no TC for the additional section");
        assert_eq!(counts(&out), [1, 9, 0, 0]);
    }

    /// The lab plus an ExternalName Service `ext` pointing at `example.org`.
    fn lab_with_external() -> Resolver {
        resolver_of(&format!(
            "{LAB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: instavote}}\n\
             spec: {{type: ExternalName, externalName: example.org}}\n"
        ))
    }

    /// Steps one query with recursion allowed and expects it to be forwarded.
    fn forwarded(r: &Resolver, query: &[u8], transport: Transport) -> Box<Pending> {
        match handle_query_step(r, query, transport, true) {
            (Step::Forward(p), _) => p,
            (Step::Reply(out), outcome) => panic!("answered locally: {outcome} {out:?}"),
        }
    }

    /// The upstream's answer to `query` (bytes as sent upstream): `ips` as A records.
    fn upstream_answer(query: &[u8], ips: &[&str]) -> Message {
        let q = parse(query);
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_available = true;
        m.add_queries(q.queries.clone());
        for ip in ips {
            m.add_answer(WireRecord::from_rdata(
                q.queries[0].name().clone(),
                300,
                RData::A(A(ip.parse().unwrap())),
            ));
        }
        m
    }

    #[test]
    fn outside_names_are_forwarded_with_a_fresh_id_and_the_clients_restored() {
        let r = lab();
        let q = query_bytes(0xbeef, RD, "Example.ORG", T_A, None);
        let p = forwarded(&r, &q, Transport::Udp);
        assert_eq!(p.question().name().to_ascii(), "Example.ORG.");
        let up = p.upstream_query(0x1234).unwrap();
        let m = parse(&up);
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type(), RecordType::A);
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(EDNS_PAYLOAD));

        // The answer must carry our id and our question (any case).
        let answer = upstream_answer(&up, &["192.0.2.80"]).to_vec().unwrap();
        assert!(p.accepts(0x1235, &answer).is_none(), "another id");
        let mut other = upstream_answer(&up, &["192.0.2.80"]);
        other.queries[0].set_query_type(RecordType::AAAA);
        assert!(
            p.accepts(0x1234, &other.to_vec().unwrap()).is_none(),
            "another type"
        );
        let mut other = upstream_answer(&up, &["192.0.2.80"]);
        other.queries[0].set_name(Name::from_ascii("example.net.").unwrap());
        assert!(
            p.accepts(0x1234, &other.to_vec().unwrap()).is_none(),
            "another name"
        );
        assert!(p.accepts(0x1234, &up).is_none(), "a query is no answer");
        assert!(
            p.accepts(0x1234, &answer[..answer.len() - 3]).is_none(),
            "cut short"
        );
        let mut lower = upstream_answer(&up, &["192.0.2.80"]);
        lower.queries[0].set_name(Name::from_ascii("example.org.").unwrap());
        assert!(
            p.accepts(0x1234, &lower.to_vec().unwrap()).is_some(),
            "case"
        );

        let accepted = p.accepts(0x1234, &answer).unwrap();
        let (out, outcome) = p.complete(accepted);
        let out = out.unwrap();
        assert_eq!(&out[..2], &[0xbe, 0xef], "the client's id");
        // QR, RD | RA; no AA (not ours).
        assert_eq!((out[2], out[3]), (0b1000_0001, 0b1000_0000));
        assert_eq!(counts(&out), [1, 1, 0, 0], "no OPT: the client sent none");
        let m = parse(&out);
        assert_eq!(m.queries[0].name().to_ascii(), "Example.ORG.");
        assert_eq!(
            m.answers[0].data,
            RData::A(A("192.0.2.80".parse().unwrap()))
        );
        assert_eq!(outcome.rcode, Some(ResponseCode::NoError));
    }

    #[test]
    fn without_recursion_outside_names_stay_refused_and_ra_clear() {
        let r = lab();
        let q = query_bytes(1, RD, "example.org", T_A, None);
        let (step, _) = handle_query_step(&r, &q, Transport::Udp, false);
        let Step::Reply(Some(out)) = step else {
            panic!("{step:?}")
        };
        assert_eq!((rcode(&out), out[3] & 0x80), (5, 0));
        // With recursion, cluster names are answered locally, with RA.
        let q = query_bytes(2, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let (step, _) = handle_query_step(&r, &q, Transport::Udp, true);
        let Step::Reply(Some(out)) = step else {
            panic!("{step:?}")
        };
        assert_eq!((out[2], out[3]), (0b1000_0101, 0b1000_0000), "AA, RD, RA");
        // Class CHAOS and zone transfers are never forwarded.
        let mut q = query_bytes(3, RD, "version.bind", T_TXT, None);
        let n = q.len();
        q[n - 1] = 3;
        assert!(matches!(
            handle_query_step(&r, &q, Transport::Udp, true).0,
            Step::Reply(Some(ref out)) if rcode(out) == 5
        ));
        let q = query_bytes(4, RD, "example.org", 252, None);
        assert!(matches!(
            handle_query_step(&r, &q, Transport::Tcp, true).0,
            Step::Reply(Some(ref out)) if rcode(out) == 5
        ));
    }

    #[test]
    fn upstream_failure_is_servfail_and_a_full_table_refused() {
        let r = lab();
        let q = query_bytes(0x0a0b, RD, "example.org", T_A, Some((1232, 0)));
        let (out, outcome) = forwarded(&r, &q, Transport::Udp).fail();
        let out = out.unwrap();
        assert_eq!(&out[..2], &[0x0a, 0x0b]);
        assert_eq!(rcode(&out), 2, "SERVFAIL");
        assert_eq!(out[3] & 0x80, 0x80, "RA");
        assert_eq!(counts(&out), [1, 0, 0, 1], "question and OPT");
        assert_eq!(outcome.rcode, Some(ResponseCode::ServFail));
        let (out, _) = forwarded(&r, &q, Transport::Udp).refuse();
        assert_eq!(rcode(&out.unwrap()), 5);
    }

    #[test]
    fn external_name_cnames_are_completed_from_upstream() {
        let r = lab_with_external();
        let q = query_bytes(7, RD, "ext.instavote.svc.cluster.local", T_A, None);
        // Without recursion: the CNAME alone, as before.
        let out = handle_query(&r, &q, Transport::Udp).unwrap();
        assert_eq!(counts(&out), [1, 1, 0, 0]);
        let p = forwarded(&r, &q, Transport::Udp);
        assert_eq!(p.question().name().to_ascii(), "example.org.");
        assert_eq!(p.question().query_type(), RecordType::A);
        let up = p.upstream_query(99).unwrap();
        let answer = upstream_answer(&up, &["192.0.2.80", "192.0.2.81"]);
        let (out, _) = p.complete(answer);
        let out = out.unwrap();
        assert_eq!(&out[..2], &[0, 7]);
        assert_eq!(out[2] & 0x04, 0x04, "AA: the CNAME is ours");
        let m = parse(&out);
        let data: Vec<_> = m.answers.iter().map(|a| a.data.clone()).collect();
        assert_eq!(
            data,
            [
                RData::CNAME(CNAME(Name::from_ascii("example.org.").unwrap())),
                RData::A(A("192.0.2.80".parse().unwrap())),
                RData::A(A("192.0.2.81".parse().unwrap())),
            ]
        );
        assert_eq!(
            m.answers[0].name.to_ascii(),
            "ext.instavote.svc.cluster.local."
        );
        // The upstream's NXDOMAIN for the target is the answer's rcode (RFC 6604), the
        // CNAME stays.
        let p = forwarded(&r, &q, Transport::Udp);
        let mut nx = upstream_answer(&p.upstream_query(5).unwrap(), &[]);
        nx.metadata.response_code = ResponseCode::NXDomain;
        let out = p.complete(nx).0.unwrap();
        assert_eq!((rcode(&out), counts(&out)), (3, [1, 1, 0, 0]));
        // Asking for the CNAME itself needs nothing from upstream.
        let q = query_bytes(8, RD, "ext.instavote.svc.cluster.local", 5, None);
        assert!(matches!(
            handle_query_step(&r, &q, Transport::Udp, true).0,
            Step::Reply(Some(_))
        ));
    }

    #[test]
    fn reverse_names_the_cluster_lacks_fall_through_to_upstream() {
        let r = lab();
        let q = query_bytes(1, RD, "8.8.8.8.in-addr.arpa", 12, None);
        assert_eq!(
            forwarded(&r, &q, Transport::Udp).question().query_type(),
            RecordType::PTR
        );
        // Without recursion: NXDOMAIN from our reverse zone, as before.
        assert_eq!(rcode(&handle_query(&r, &q, Transport::Udp).unwrap()), 3);
        // A reverse name the cluster has is answered locally.
        let q = query_bytes(1, RD, "6.77.102.10.in-addr.arpa", 12, None);
        assert!(matches!(
            handle_query_step(&r, &q, Transport::Udp, true).0,
            Step::Reply(Some(ref out)) if counts(out)[1] == 1
        ));
    }

    #[test]
    fn forwarded_answers_are_truncated_for_udp_clients() {
        let r = lab();
        let ips: Vec<String> = (0..60).map(|i| format!("192.0.2.{i}")).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let q = query_bytes(1, RD, "example.org", T_A, None);
        let p = forwarded(&r, &q, Transport::Udp);
        let answer = upstream_answer(&p.upstream_query(1).unwrap(), &ips);
        let (out, outcome) = p.complete(answer.clone());
        let out = out.unwrap();
        assert!(out.len() <= UDP_MIN_PAYLOAD && outcome.truncated);
        assert_eq!((out[2] & 0x02, counts(&out)), (0x02, [1, 0, 0, 0]));
        let p = forwarded(&r, &q, Transport::Tcp);
        let out = p.complete(answer).0.unwrap();
        assert_eq!(counts(&out), [1, 60, 0, 0]);
        // An upstream answer that stayed truncated is passed on truncated.
        let p = forwarded(&r, &q, Transport::Tcp);
        let mut tc = upstream_answer(&p.upstream_query(1).unwrap(), &["192.0.2.1"]);
        tc.metadata.truncation = true;
        let out = p.complete(tc).0.unwrap();
        assert_eq!(out[2] & 0x02, 0x02);
    }

    #[test]
    fn slip_responses_are_truncated_echoes_of_the_question() {
        let q = query_bytes(0x5151, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let out = slip_response(&q).unwrap();
        assert_eq!(&out[..2], &[0x51, 0x51]);
        assert_eq!((out[2], out[3]), (0b1000_0011, 0), "QR, TC, RD");
        assert_eq!(counts(&out), [1, 0, 0, 0]);
        assert_eq!(&out[12..], &q[12..], "the question");
        let mut response = q.clone();
        response[2] |= 0x80;
        assert_eq!(slip_response(&response), None);
        assert_eq!(slip_response(&[1, 2, 3]), None);
    }

    /// A stub upstream on loopback UDP: answers A questions with 192.0.2.80 and records
    /// the ids it saw; `silent` makes it answer nothing.
    type Seen = Arc<Mutex<Vec<(u16, SocketAddr)>>>;

    fn stub_upstream(silent: bool) -> (SocketAddr, Seen) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let q = parse(&buf[..n]);
                log.lock().unwrap().push((q.metadata.id, from));
                if !silent {
                    let answer = upstream_answer(&buf[..n], &["192.0.2.80"]);
                    let _ = socket.send_to(&answer.to_vec().unwrap(), from);
                }
            }
        });
        (addr, seen)
    }

    fn udp_server(
        server: Server,
    ) -> (
        SocketAddr,
        Arc<AtomicBool>,
        thread::JoinHandle<io::Result<()>>,
    ) {
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let worker = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || server.serve_udp(&socket, &stop))
        };
        (addr, stop, worker)
    }

    fn udp_ask(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        client.send_to(query, server).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = client.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }

    #[test]
    fn udp_forwarding_on_loopback_with_random_ids_and_ports() {
        let (upstream, seen) = stub_upstream(false);
        let forwarder = Forwarder::new(forward::ForwardConfig::new(vec![upstream])).unwrap();
        let server =
            Server::new(lab()).with_forwarder(forwarder, vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(server.recursion_for("127.0.0.1".parse().unwrap()));
        assert!(!server.recursion_for("192.0.2.1".parse().unwrap()));
        let (addr, stop, worker) = udp_server(server);
        for id in [1u16, 1, 1, 1] {
            let out = udp_ask(addr, &query_bytes(id, RD, "example.org", T_A, None)).unwrap();
            assert_eq!(&out[..2], &id.to_be_bytes());
            assert_eq!(rcode(&out), 0);
            assert_eq!(
                parse(&out).answers[0].data,
                RData::A(A("192.0.2.80".parse().unwrap()))
            );
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4);
        let ids: std::collections::HashSet<u16> = seen.iter().map(|s| s.0).collect();
        let ports: std::collections::HashSet<u16> = seen.iter().map(|s| s.1.port()).collect();
        assert!(ids.len() >= 3 && ports.len() >= 3, "{seen:?}");
        assert!(!ids.contains(&1));
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn a_silent_upstream_gives_servfail_after_the_timeout() {
        let (upstream, seen) = stub_upstream(true);
        let mut config = forward::ForwardConfig::new(vec![upstream]);
        config.timeout = Duration::from_millis(300);
        let forwarder = Forwarder::new(config).unwrap();
        let server =
            Server::new(lab()).with_forwarder(forwarder, vec!["127.0.0.0/8".parse().unwrap()]);
        let (addr, stop, worker) = udp_server(server);
        let started = std::time::Instant::now();
        let out = udp_ask(addr, &query_bytes(9, RD, "example.org", T_A, None)).unwrap();
        let took = started.elapsed();
        assert_eq!((rcode(&out), &out[..2]), (2, &[0u8, 9][..]));
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn udp_responses_are_rate_limited_per_network() {
        let mut config = RrlConfig::new(1, 3);
        config.slip = 2;
        let server = Server::new(lab()).with_rate_limit(config);
        let (addr, stop, worker) = udp_server(server);
        let q = query_bytes(3, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Refill is one response a second: the seven queries take well under that.
        client
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..7 {
            client.send_to(&q, addr).unwrap();
            let mut buf = [0u8; 2048];
            got.push(match client.recv_from(&mut buf) {
                Ok((n, _)) if buf[2] & 0x02 != 0 => {
                    assert_eq!(counts(&buf[..n]), [1, 0, 0, 0]);
                    "slip"
                }
                Ok(_) => "answer",
                Err(_) => "dropped",
            });
        }
        assert_eq!(
            got,
            [
                "answer", "answer", "answer", "dropped", "slip", "dropped", "slip"
            ]
        );
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn server_swaps_the_resolver() {
        let server = Server::new(lab());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let q = query_bytes(5, RD, "big.default.svc.cluster.local", T_A, None);
        let out = server.handle(&q, Transport::Tcp, peer).unwrap();
        assert_eq!(rcode(&out), 3);
        let old = server.resolver();
        server.set_resolver(big(2));
        let out = server.handle(&q, Transport::Tcp, peer).unwrap();
        assert_eq!(counts(&out), [1, 2, 0, 0]);
        // A query that started with the old resolver still holds it.
        assert_eq!(
            old.query("redis.instavote.svc.cluster.local", QueryType::A)
                .records
                .len(),
            1
        );
    }

    /// Writes `query` as one TCP frame and reads one framed response.
    fn tcp_exchange(stream: &mut TcpStream, query: &[u8]) -> Vec<u8> {
        let mut frame = (query.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(query);
        stream.write_all(&frame).unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).unwrap();
        let mut out = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut out).unwrap();
        out
    }

    #[test]
    fn tcp_serves_several_queries_per_connection_then_times_out() {
        let server =
            Arc::new(Server::new(big(60)).with_tcp_idle_timeout(Duration::from_millis(300)));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            thread::spawn(move || server.serve_tcp(&listener, &stop))
        };
        let mut client = TcpStream::connect(addr).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let name = "big.default.svc.cluster.local";
        for id in [1u16, 2] {
            let out = tcp_exchange(&mut client, &query_bytes(id, RD, name, T_A, None));
            assert_eq!(&out[..2], &id.to_be_bytes());
            assert_eq!(out[2] & 0x02, 0, "no TC over TCP");
            assert_eq!(counts(&out), [1, 60, 0, 0]);
        }
        // Idle past the timeout: the server closes (EOF on our side).
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
        assert!(started.elapsed() < Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        wake_tcp(addr);
        acceptor.join().unwrap().unwrap();
    }

    #[test]
    fn udp_answers_and_truncates_on_a_socket() {
        // A headless Service with 100 endpoints: 1,600 bytes of A records.
        let server = Arc::new(Server::new(big(100)));
        let stop = Arc::new(AtomicBool::new(false));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let worker = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            thread::spawn(move || server.serve_udp(&socket, &stop))
        };
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .send_to(
                &query_bytes(77, RD, "big.default.svc.cluster.local", T_A, None),
                addr,
            )
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, addr);
        assert!(n <= UDP_MIN_PAYLOAD);
        assert_eq!(&buf[..2], &77u16.to_be_bytes());
        assert_eq!(buf[2] & 0x02, 0x02, "TC");
        // With EDNS 1232 the answer still does not fit: TC, within the size advertised.
        client
            .send_to(
                &query_bytes(
                    78,
                    RD,
                    "big.default.svc.cluster.local",
                    T_A,
                    Some((1232, 0)),
                ),
                addr,
            )
            .unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert!(n <= usize::from(EDNS_PAYLOAD));
        assert_eq!(buf[2] & 0x02, 0x02, "TC");
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn only_plausible_queries_from_plausible_ports_are_answered() {
        let local: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let q = query_bytes(1, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let client: SocketAddr = "127.0.0.9:40000".parse().unwrap();
        assert!(udp_answerable(&q, client, local));
        for port in REFLECTOR_PORTS {
            let from = SocketAddr::new(client.ip(), port);
            assert!(!udp_answerable(&q, from, local), "port {port}");
        }
        // Our own address and port (a reflection of our own answer).
        assert!(!udp_answerable(
            &q,
            "127.0.0.1:5353".parse().unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        ));
        assert!(!udp_answerable(
            &q,
            "10.0.0.1:5353".parse().unwrap(),
            "0.0.0.0:5353".parse().unwrap()
        ));
        let mut response = q.clone();
        response[2] |= 0x80;
        let mut notify = q.clone();
        notify[2] |= 4 << 3;
        let mut two = q.clone();
        two[5] = 2;
        for bad in [
            &response[..],
            &notify[..],
            &two[..],
            &q[..11],
            &[0u8; 12][..],
        ] {
            assert!(!udp_answerable(bad, client, local), "{bad:?}");
        }
    }

    #[test]
    fn spoofed_echo_port_and_garbage_datagrams_get_silence() {
        let (addr, stop, worker) = udp_server(Server::new(lab()));
        let recv = |socket: &UdpSocket| {
            let mut buf = [0u8; 2048];
            socket
                .recv_from(&mut buf)
                .ok()
                .map(|(n, _)| buf[..n].to_vec())
        };
        // A datagram "from" an echo service (root binds port 7 on loopback).
        let echo = UdpSocket::bind("127.0.0.7:7").expect("bind 127.0.0.7:7 (needs root)");
        echo.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let q = query_bytes(5, RD, "redis.instavote.svc.cluster.local", T_A, None);
        echo.send_to(&q, addr).unwrap();
        assert_eq!(recv(&echo), None, "an echo port got an answer");
        // Garbage, a NOTIFY, a response, two questions from a normal port: silence.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut notify = q.clone();
        notify[2] |= 4 << 3;
        let mut response = q.clone();
        response[2] |= 0x80;
        let mut two = q.clone();
        two[5] = 2;
        let mut cut = q.clone();
        cut.truncate(20);
        for bad in [vec![0u8; 12], vec![0xff; 40], notify, response, two, cut] {
            client.send_to(&bad, addr).unwrap();
            assert_eq!(recv(&client), None, "answered {bad:?}");
        }
        // The same socket still gets its real query answered.
        client.send_to(&q, addr).unwrap();
        let out = recv(&client).expect("an answer");
        assert_eq!(&out[..2], &5u16.to_be_bytes());
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap().unwrap();
    }

    #[test]
    fn slow_tcp_connections_never_lock_out_a_client() {
        let server = Arc::new(Server::new(lab()));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            thread::spawn(move || server.serve_tcp(&listener, &stop))
        };
        // 300 attackers: each connects, sends one byte of a length prefix, then one byte a
        // second; when closed, it connects again.
        let attacking = Arc::new(AtomicBool::new(true));
        let mut attackers = Vec::new();
        for _ in 0..300 {
            let attacking = Arc::clone(&attacking);
            attackers.push(thread::spawn(move || {
                while attacking.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let mut frame = vec![0u8, 200];
                    frame.resize(202, 7);
                    for b in frame {
                        if !attacking.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                            break;
                        }
                        thread::sleep(Duration::from_millis(1000));
                    }
                }
            }));
        }
        // Let the attackers take every slot.
        thread::sleep(Duration::from_secs(2));
        assert!(server.tcp_connections() >= TCP_MAX_CONNECTIONS - 10);
        let q = query_bytes(9, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let mut client = TcpStream::connect(addr).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let out = tcp_exchange(&mut client, &q);
            assert_eq!(&out[..2], &9u16.to_be_bytes());
            assert_eq!(counts(&out)[1], 1);
            worst = worst.max(started.elapsed());
            thread::sleep(Duration::from_millis(200));
        }
        assert!(worst < Duration::from_secs(1), "{worst:?}");
        assert!(server.tcp_connections() <= TCP_MAX_CONNECTIONS);
        attacking.store(false, Ordering::Relaxed);
        for a in attackers {
            a.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        wake_tcp(addr);
        acceptor.join().unwrap().unwrap();
    }

    #[test]
    fn a_trickled_message_is_cut_off_at_the_deadline() {
        let server =
            Arc::new(Server::new(lab()).with_tcp_message_deadline(Duration::from_millis(400)));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            thread::spawn(move || server.serve_tcp(&listener, &stop))
        };
        let q = query_bytes(4, RD, "redis.instavote.svc.cluster.local", T_A, None);
        let mut frame = (q.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&q);
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let started = Instant::now();
        // One byte each 100 ms: the whole message would take seconds, more than 400 ms.
        let mut closed = false;
        for b in &frame {
            if s.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let mut rest = Vec::new();
        let got = s.read_to_end(&mut rest);
        assert!(closed || matches!(got, Ok(0) | Err(_)), "{got:?} {rest:?}");
        assert!(rest.is_empty(), "answered a trickled message");
        assert!(started.elapsed() < Duration::from_secs(6));
        stop.store(true, Ordering::Relaxed);
        wake_tcp(addr);
        acceptor.join().unwrap().unwrap();
    }
}
