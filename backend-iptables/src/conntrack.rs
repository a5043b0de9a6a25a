//! Deletes stale kernel conntrack entries over ctnetlink, for the kernel backends (this
//! one and IPVS, which uses it too).
//!
//! [`svcnat_core::conntrack::stale_flows`] says which flows a plan change made wrong;
//! [`Conntrack::delete`] finds them in the kernel and deletes them, one netlink exchange per
//! entry, no process per entry. Per address family it dumps the table once, filtered in the
//! kernel to the protocols at stake (`CTA_FILTER` with `CTA_FILTER_F_CTA_PROTO_NUM`, Linux
//! 5.8 and later; a kernel that refuses it gets an unfiltered dump, matched the same way),
//! matches each entry's original destination and reply source against the stale flows,
//! and deletes the matches by their original tuple (with their zone and id, so an entry
//! that was replaced meanwhile is left alone). An entry that is already gone (`ENOENT`) is
//! not an error.
//!
//! The messages are `netlink-packet-netfilter`'s; the request bytes are checked against
//! the kernel's `nfnetlink_conntrack.h` in the tests below and against the real kernel by
//! the conformance suite's `UdpEndpointReplaced` scenario.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use svcnat_core::conntrack::StaleFlow;
use svcnat_core::model::{IpFamily, Protocol};

/// `CTA_ID` (`enum ctattr_type`): the entry's id, checked on delete.
const CTA_ID: u16 = 12;
/// `CTA_ZONE`: the entry's zone, part of its identity.
const CTA_ZONE: u16 = 18;
/// `CTA_FILTER`: nested dump filter (Linux 5.8).
const CTA_FILTER: u16 = 25;
/// `CTA_FILTER_ORIG_FLAGS` inside `CTA_FILTER`: which fields of `CTA_TUPLE_ORIG` to match.
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// `CTA_FILTER_F_CTA_PROTO_NUM` (`net/netfilter/nf_internals.h`): match the L4 protocol.
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;

/// A failed conntrack operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConntrackError {
    /// The netlink socket could not be opened (or the namespace entered).
    #[error("conntrack: cannot open a netfilter netlink socket{}: {source}", in_ns(.netns))]
    Socket {
        /// The network namespace.
        netns: Option<String>,
        /// The OS error.
        source: io::Error,
    },
    /// Dumping the table failed.
    #[error("conntrack: dumping {family:?} {protocol} entries{} failed: {reason}", in_ns(.netns))]
    Dump {
        /// The network namespace.
        netns: Option<String>,
        /// The address family.
        family: IpFamily,
        /// The protocol dumped.
        protocol: Protocol,
        /// The errno or decoding error.
        reason: String,
    },
    /// Deleting one entry failed.
    #[error("conntrack: deleting {entry} ({flow}){} failed: {reason}", in_ns(.netns))]
    Delete {
        /// The network namespace.
        netns: Option<String>,
        /// The entry (`udp 10.244.0.99:40053 -> 10.96.0.10:53`).
        entry: String,
        /// The stale flow it matched.
        flow: String,
        /// The errno or decoding error.
        reason: String,
    },
}

fn in_ns(netns: &Option<String>) -> String {
    match netns {
        Some(n) => format!(" in netns {n}"),
        None => String::new(),
    }
}

/// What a cleanup did.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Entries deleted.
    pub deleted: usize,
    /// What failed; the other entries were still deleted.
    pub errors: Vec<ConntrackError>,
}

/// The kernel connection tracking table of one network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    netns: Option<String>,
}

/// One dumped entry: its identity for deletion and what stale flows are matched on.
#[derive(Debug)]
struct Entry {
    protocol: Protocol,
    orig_src: SocketAddr,
    orig_dst: SocketAddr,
    reply_src: SocketAddr,
    /// `CTA_TUPLE_ORIG` as the kernel gave it, `CTA_ZONE` and `CTA_ID` when present.
    key: Vec<ConntrackAttribute>,
}

impl Conntrack {
    /// The table of the named network namespace (`/run/netns/NAME`), or of the current
    /// one for `None`.
    pub fn new(netns: Option<String>) -> Conntrack {
        Conntrack { netns }
    }

    /// Deletes the entries of the `pending` stale flows (emptying it) and records the
    /// outcome in `report`: the step both kernel backends run after their rules are in
    /// place (new packets of a flow whose entry is deleted must meet the new rules).
    pub fn clean_into(
        &self,
        pending: &mut BTreeSet<StaleFlow>,
        mut report: svcnat_core::plan::SyncReport,
    ) -> svcnat_core::plan::SyncReport {
        let done = self.delete(&std::mem::take(pending));
        report.conntrack_deleted = done.deleted;
        report.conntrack_errors = done.errors.iter().map(ToString::to_string).collect();
        report
    }

    /// Deletes every entry that belongs to one of `flows`, and nothing else.
    pub fn delete(&self, flows: &BTreeSet<StaleFlow>) -> Cleanup {
        if flows.is_empty() {
            return Cleanup::default();
        }
        let netns = self.netns.clone();
        let result = in_netns(self.netns.as_deref(), || {
            let mut sock = NfSocket::open()?;
            Ok(delete_in(&mut sock, flows, &netns))
        });
        result.unwrap_or_else(|source| Cleanup {
            deleted: 0,
            errors: vec![ConntrackError::Socket {
                netns: self.netns.clone(),
                source,
            }],
        })
    }
}

fn delete_in(sock: &mut NfSocket, flows: &BTreeSet<StaleFlow>, netns: &Option<String>) -> Cleanup {
    let mut out = Cleanup::default();
    let wanted: BTreeSet<(IpFamily, Protocol)> =
        flows.iter().map(|f| (f.family(), f.protocol())).collect();
    for (family, protocol) in wanted {
        // The kernel-side filter is an optimisation: a kernel that refuses it (Debian's
        // 6.1 answers EINVAL) gets an unfiltered dump, matched here all the same.
        let refused = [nix::libc::EINVAL, nix::libc::EOPNOTSUPP].map(errno_text);
        let dumped = match sock.dump(family, protocol, true) {
            Err(reason) if refused.contains(&reason) => {
                sock.dump(family, protocol, false).map_err(|e| {
                    // nfnetlink answers EINVAL for a subsystem it does not have.
                    if refused.contains(&e) {
                        format!("{e} (is nf_conntrack_netlink loaded?)")
                    } else {
                        e
                    }
                })
            }
            other => other,
        };
        let entries = match dumped {
            Ok(replies) => replies,
            Err(reason) => {
                out.errors.push(ConntrackError::Dump {
                    netns: netns.clone(),
                    family,
                    protocol,
                    reason,
                });
                continue;
            }
        };
        for entry in entries.iter().filter_map(parse_entry) {
            let Some(flow) = flows
                .iter()
                .find(|f| f.matches(entry.protocol, entry.orig_dst, entry.reply_src))
            else {
                continue;
            };
            match sock.request(delete_request(family, &entry)) {
                Ok(_) => out.deleted += 1,
                // "Already gone" is what we wanted.
                Err(reason) if reason == errno_text(nix::libc::ENOENT) => {}
                Err(reason) => out.errors.push(ConntrackError::Delete {
                    netns: netns.clone(),
                    entry: format!(
                        "{} {} -> {}",
                        entry.protocol, entry.orig_src, entry.orig_dst
                    ),
                    flow: flow.to_string(),
                    reason,
                }),
            }
        }
    }
    out
}

fn nf_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

fn ct_protocol(protocol: Protocol) -> CtProtocol {
    match protocol {
        Protocol::Tcp => CtProtocol::Tcp,
        Protocol::Udp => CtProtocol::Udp,
        Protocol::Sctp => CtProtocol::Sctp,
    }
}

fn our_protocol(protocol: CtProtocol) -> Option<Protocol> {
    match protocol {
        CtProtocol::Tcp => Some(Protocol::Tcp),
        CtProtocol::Udp => Some(Protocol::Udp),
        CtProtocol::Sctp => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `IPCTNL_MSG_CT_GET` (dump) of one family, the tuple half of the kernel-side filter
/// (`CTA_TUPLE_ORIG` with only the protocol); [`dump_bytes`] adds the `CTA_FILTER` half.
fn dump_request(family: IpFamily, protocol: Protocol) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(nf_family(family), 0, 0),
        ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(vec![Tuple::Proto(
            vec![ProtoTuple::Protocol(ct_protocol(protocol))],
        )])]),
    )
}

/// The dump request's bytes with `CTA_FILTER { CTA_FILTER_ORIG_FLAGS: PROTO_NUM }`
/// appended. `netlink-packet-core`'s `DefaultNla` drops the `NLA_F_NESTED` bit, which the
/// kernel's strict `nla_parse_nested` requires (`EINVAL` without it), so the attribute is
/// written here.
fn dump_bytes(family: IpFamily, protocol: Protocol, seq: u32) -> Vec<u8> {
    let mut buf = serialize(dump_request(family, protocol), NLM_F_DUMP, seq);
    // struct nlattr { u16 nla_len = 12; u16 nla_type = CTA_FILTER | NLA_F_NESTED; }
    buf.extend_from_slice(&12u16.to_ne_bytes());
    buf.extend_from_slice(&(CTA_FILTER | NLA_F_NESTED).to_ne_bytes());
    //   struct nlattr { u16 nla_len = 8; u16 nla_type = CTA_FILTER_ORIG_FLAGS; } u32 flags
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&CTA_FILTER_ORIG_FLAGS.to_ne_bytes());
    buf.extend_from_slice(&CTA_FILTER_F_CTA_PROTO_NUM.to_ne_bytes());
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    if let Some(head) = buf.get_mut(..4) {
        head.copy_from_slice(&len.to_ne_bytes());
    }
    buf
}

/// `IPCTNL_MSG_CT_DELETE` of one entry by its original tuple (and zone and id).
fn delete_request(family: IpFamily, entry: &Entry) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(nf_family(family), 0, 0),
        ConntrackMessage::Delete(entry.key.clone()),
    )
}

/// Source and destination of a tuple.
fn endpoints(tuple: &[Tuple]) -> Option<(Option<CtProtocol>, SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, None, None, None);
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => proto = Some(*n),
                        ProtoTuple::SourcePort(n) => sport = Some(*n),
                        ProtoTuple::DestinationPort(n) => dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst): (IpAddr, IpAddr) = (src?, dst?);
    Some((
        proto,
        SocketAddr::new(src, sport?),
        SocketAddr::new(dst, dport?),
    ))
}

fn parse_entry(msg: &NetfilterMessage) -> Option<Entry> {
    let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = &msg.inner else {
        return None;
    };
    let mut key = Vec::new();
    let (mut orig, mut reply) = (None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => {
                orig = endpoints(t);
                key.push(a.clone());
            }
            ConntrackAttribute::CtaTupleReply(t) => reply = endpoints(t),
            ConntrackAttribute::Other(nla)
                if matches!(netlink_packet_core::Nla::kind(nla), CTA_ZONE | CTA_ID) =>
            {
                key.push(a.clone());
            }
            _ => {}
        }
    }
    let (proto, orig_src, orig_dst) = orig?;
    let (_, reply_src, _) = reply?;
    Some(Entry {
        protocol: our_protocol(proto?)?,
        orig_src,
        orig_dst,
        reply_src,
        key,
    })
}

fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// Runs `f` on a short-lived thread that entered the network namespace `/run/netns/<name>`
/// (or here for `None`): sockets opened there stay bound to that namespace, and
/// `/proc/sys/net` opened there shows its sysctls. The IPVS backend uses it too.
pub fn in_netns<T: Send>(
    netns: Option<&str>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(name) = netns else {
        return f();
    };
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // The namespace is a property of this thread only; the thread ends with `f`.
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("setns({path}): {e}")))?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

/// A `NETLINK_NETFILTER` socket with a sequence counter.
struct NfSocket {
    sock: Socket,
    seq: u32,
}

impl NfSocket {
    fn open() -> io::Result<NfSocket> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        Ok(NfSocket { sock, seq: 0 })
    }

    /// Dumps the entries of one family, filtered in the kernel to one protocol or not.
    fn dump(
        &mut self,
        family: IpFamily,
        protocol: Protocol,
        filtered: bool,
    ) -> Result<Vec<NetfilterMessage>, String> {
        self.seq = self.seq.wrapping_add(1);
        let buf = if filtered {
            dump_bytes(family, protocol, self.seq)
        } else {
            let all = NetfilterMessage::new(
                NetfilterHeader::new(nf_family(family), 0, 0),
                ConntrackMessage::Get(Vec::new()),
            );
            serialize(all, NLM_F_DUMP, self.seq)
        };
        self.exchange(&buf)
    }

    /// Sends one acknowledged request.
    fn request(&mut self, msg: NetfilterMessage) -> Result<Vec<NetfilterMessage>, String> {
        self.seq = self.seq.wrapping_add(1);
        let buf = serialize(msg, NLM_F_ACK, self.seq);
        self.exchange(&buf)
    }

    /// Sends `buf` and collects the replies until `NLMSG_DONE` or the acknowledgement;
    /// errors are the errno's text.
    fn exchange(&mut self, buf: &[u8]) -> Result<Vec<NetfilterMessage>, String> {
        self.sock.send(buf, 0).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(|e| e.to_string())?;
            let mut at = 0;
            while at < data.len() {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&data[at..])
                    .map_err(|e| format!("undecodable reply: {e}"))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err("zero-length netlink message".into());
                }
                at += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(errno_text(-code.get())),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Overrun(_) => return Err("netlink overrun".into()),
                    _ => {}
                }
            }
        }
    }
}

fn serialize(msg: NetfilterMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn the_dump_request_filters_on_the_protocol_in_the_kernel() {
        let bytes = dump_bytes(IpFamily::V4, Protocol::Udp, 7);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // nlmsghdr: length 48, type NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET,
            // flags NLM_F_REQUEST | NLM_F_DUMP (0x301), seq 7, pid 0
            48, 0, 0, 0,  0x01, 0x01,  0x01, 0x03,  7, 0, 0, 0,  0, 0, 0, 0,
            // nfgenmsg: family NFPROTO_IPV4, version NFNETLINK_V0, res_id 0
            2, 0, 0, 0,
            // CTA_TUPLE_ORIG (1 | NLA_F_NESTED), 16 bytes
            16, 0, 0x01, 0x80,
            //   CTA_TUPLE_PROTO (2 | NLA_F_NESTED), 12 bytes
            12, 0, 0x02, 0x80,
            //     CTA_PROTO_NUM (1), u8 17 (UDP), padded
            5, 0, 1, 0,  17, 0, 0, 0,
            // CTA_FILTER (25 | NLA_F_NESTED), 12 bytes
            12, 0, 25, 0x80,
            //   CTA_FILTER_ORIG_FLAGS (1), u32 CTA_FILTER_F_CTA_PROTO_NUM (1 << 3)
            8, 0, 1, 0,  8, 0, 0, 0,
        ];
        assert_eq!(bytes, want);
    }

    #[test]
    fn an_entry_is_deleted_by_its_original_tuple_zone_and_id() {
        // A dumped entry as the kernel sends it (orig 10.244.0.99:40053 -> 10.96.0.10:53,
        // reply from the endpoint 10.244.0.10:5353), with an id.
        #[rustfmt::skip]
        let reply: Vec<u8> = vec![
            // nlmsghdr: length 104, type IPCTNL_MSG_CT_NEW (0x0100), flags NLM_F_MULTI
            104, 0, 0, 0,  0x00, 0x01,  0x02, 0x00,  1, 0, 0, 0,  0, 0, 0, 0,
            2, 0, 0, 0,
            // CTA_TUPLE_ORIG, 52 bytes: CTA_TUPLE_IP { V4_SRC, V4_DST }, CTA_TUPLE_PROTO
            // { NUM 17, SRC_PORT 40053, DST_PORT 53 } (ports big-endian)
            52, 0, 0x01, 0x80,
              20, 0, 0x01, 0x80,  8, 0, 1, 0,  10, 244, 0, 99,  8, 0, 2, 0,  10, 96, 0, 10,
              28, 0, 0x02, 0x80,  5, 0, 1, 0,  17, 0, 0, 0,
                6, 0, 2, 0,  0x9c, 0x75, 0, 0,  6, 0, 3, 0,  0, 53, 0, 0,
            // CTA_TUPLE_REPLY, 52 bytes: 10.244.0.10:5353 -> 10.244.0.99:40053
            52, 0, 0x02, 0x80,
              20, 0, 0x01, 0x80,  8, 0, 1, 0,  10, 244, 0, 10,  8, 0, 2, 0,  10, 244, 0, 99,
              28, 0, 0x02, 0x80,  5, 0, 1, 0,  17, 0, 0, 0,
                6, 0, 2, 0,  0x14, 0xe9, 0, 0,  6, 0, 3, 0,  0x9c, 0x75, 0, 0,
        ];
        let mut reply = reply;
        // CTA_ID (12), u32 big-endian 0xdeadbeef; grow the header's length.
        reply.extend_from_slice(&[8, 0, 12, 0, 0xde, 0xad, 0xbe, 0xef]);
        let len = reply.len() as u32;
        reply[..4].copy_from_slice(&len.to_ne_bytes());
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&reply).unwrap();
        let NetlinkPayload::InnerMessage(msg) = msg.payload else {
            panic!("{msg:?}");
        };
        let entry = parse_entry(&msg).unwrap();
        assert_eq!(entry.protocol, Protocol::Udp);
        assert_eq!(entry.orig_src, "10.244.0.99:40053".parse().unwrap());
        assert_eq!(entry.orig_dst, "10.96.0.10:53".parse().unwrap());
        assert_eq!(entry.reply_src, "10.244.0.10:5353".parse().unwrap());
        let del = serialize(delete_request(IpFamily::V4, &entry), NLM_F_ACK, 9);
        // nlmsghdr (type IPCTNL_MSG_CT_DELETE 0x0102, flags NLM_F_REQUEST | NLM_F_ACK),
        // nfgenmsg, then the original tuple and the id exactly as dumped.
        let mut want: Vec<u8> = vec![0, 0, 0, 0, 0x02, 0x01, 0x05, 0x00, 9, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&[2, 0, 0, 0]);
        want.extend_from_slice(&reply[20..72]);
        want.extend_from_slice(&[8, 0, 12, 0, 0xde, 0xad, 0xbe, 0xef]);
        let len = want.len() as u32;
        want[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(del, want);
    }
}
