//! What the nftables driver reads back from the kernel, over `NETLINK_NETFILTER`, without
//! running `nft` and without listing rules or elements: whether svcnat's table exists (and
//! its handle, which changes when someone deletes and re-creates it), how many rules a
//! chain holds, and the names of the table's chains and sets.
//!
//! `nft list` fetches the whole table into its cache before it prints anything (kube-proxy
//! measured 40 s for `nft list table` at 44,000 Services); these requests ask the kernel
//! for one object or one kind of object, so a drift check costs a few netlink messages at
//! any size. Requests are built and replies parsed here by hand (`nfgenmsg` and
//! attributes of `linux/netfilter/nf_tables.h`); the reply parser takes any bytes, and the
//! fuzz target `nft_netlink` holds it to that.

use std::io;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};
use svcnat_core::model::IpFamily;

use super::batch::{Batch, getgen_request};
use crate::conntrack::in_netns;

/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS: u16 = 10;
/// `NFT_MSG_NEWTABLE` and `NFT_MSG_GETTABLE`.
const MSG_NEWTABLE: u16 = 0;
const MSG_GETTABLE: u16 = 1;
/// `NFT_MSG_NEWCHAIN` and `NFT_MSG_GETCHAIN`.
const MSG_NEWCHAIN: u16 = 3;
const MSG_GETCHAIN: u16 = 4;
/// `NFT_MSG_NEWRULE` and `NFT_MSG_GETRULE`.
const MSG_NEWRULE: u16 = 6;
const MSG_GETRULE: u16 = 7;
/// `NFT_MSG_NEWSET` and `NFT_MSG_GETSET`.
const MSG_NEWSET: u16 = 9;
const MSG_GETSET: u16 = 10;
/// `NFTA_TABLE_NAME`, `NFTA_TABLE_HANDLE`.
const TABLE_NAME: u16 = 1;
const TABLE_HANDLE: u16 = 4;
/// `NFTA_CHAIN_TABLE`, `NFTA_CHAIN_NAME` (same numbers for `NFTA_RULE_TABLE`,
/// `NFTA_RULE_CHAIN` = 2 and `NFTA_SET_TABLE`, `NFTA_SET_NAME` = 2).
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `NFPROTO_IPV4`, `NFPROTO_IPV6`.
fn nfproto(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => 2,
        IpFamily::V6 => 10,
    }
}

/// One message of a reply, as far as svcnat reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A table: its name and handle.
    Table {
        /// `NFTA_TABLE_NAME`.
        name: String,
        /// `NFTA_TABLE_HANDLE`.
        handle: Option<u64>,
    },
    /// A chain: its table and name.
    Chain {
        /// `NFTA_CHAIN_TABLE`.
        table: String,
        /// `NFTA_CHAIN_NAME`.
        name: String,
    },
    /// A rule (counted, not read).
    Rule,
    /// A set or map: its table and name.
    Set {
        /// `NFTA_SET_TABLE`.
        table: String,
        /// `NFTA_SET_NAME`.
        name: String,
    },
    /// The end of a dump, or an acknowledgement (errno 0).
    Done,
    /// An error: the errno, positive.
    Error(i32),
    /// A message of another type, skipped.
    Other(u16),
}

/// A reply that is not a well-formed sequence of netlink messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("undecodable nf_tables reply at byte {at}: {what}")]
pub struct ParseError {
    /// Offset of the bad message in the buffer.
    pub at: usize,
    /// What is wrong.
    pub what: &'static str,
}

/// One netlink message of a datagram.
struct Message<'a> {
    /// Its offset in the datagram.
    at: usize,
    kind: u16,
    seq: u32,
    /// What follows the 16-byte header.
    body: &'a [u8],
}

impl Message<'_> {
    /// The errno of an `NLMSG_ERROR` message: 0 for an acknowledgement, else positive
    /// (the kernel sends it negated); `EPROTO` for a positive code, which is no errno.
    fn errno(&self) -> Result<i32, ParseError> {
        let Some(&[a, b, c, d]) = self.body.get(..4) else {
            return Err(ParseError {
                at: self.at,
                what: "short error message",
            });
        };
        let code = i32::from_ne_bytes([a, b, c, d]);
        Ok(if code <= 0 {
            code.saturating_neg()
        } else {
            nix::libc::EPROTO
        })
    }
}

/// The netlink messages of one datagram, in order (a trailing piece shorter than a header
/// is ignored); a message whose length runs out of bounds ends the walk with an error.
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, ParseError>> {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at + 16 > buf.len() {
            return None;
        }
        let len = u32_ne(buf, at) as usize;
        let Some(body) = buf.get(at + 16..at + len).filter(|_| len >= 16) else {
            failed = true;
            return Some(Err(ParseError {
                at,
                what: "message length out of bounds",
            }));
        };
        let m = Message {
            at,
            kind: u16_ne(buf, at + 4),
            seq: u32_ne(buf, at + 8),
            body,
        };
        at += (len + 3) & !3;
        Some(Ok(m))
    })
}

/// Parses one datagram of netlink messages (replies to svcnat's requests with sequence
/// number `seq`; others are skipped). Any bytes give messages or an error, never a panic.
pub fn parse_replies(buf: &[u8], seq: u32) -> Result<Vec<Reply>, ParseError> {
    let mut out = Vec::new();
    for m in messages(buf) {
        let m = m?;
        if m.seq != seq {
            continue;
        }
        let reply = match m.kind {
            NLMSG_ERROR => match m.errno()? {
                0 => Reply::Done,
                errno => Reply::Error(errno),
            },
            NLMSG_DONE => Reply::Done,
            k if k >> 8 == SUBSYS => {
                // nfgenmsg (4 bytes), then attributes.
                let attrs = m.body.get(4..).unwrap_or(&[]);
                match k & 0xff {
                    MSG_NEWTABLE => Reply::Table {
                        name: attr_str(attrs, TABLE_NAME).unwrap_or_default(),
                        handle: attr(attrs, TABLE_HANDLE).and_then(|v| {
                            v.get(..8).map(|b| {
                                u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                            })
                        }),
                    },
                    MSG_NEWCHAIN => Reply::Chain {
                        table: attr_str(attrs, CHAIN_TABLE).unwrap_or_default(),
                        name: attr_str(attrs, CHAIN_NAME).unwrap_or_default(),
                    },
                    MSG_NEWRULE => Reply::Rule,
                    MSG_NEWSET => Reply::Set {
                        table: attr_str(attrs, SET_TABLE).unwrap_or_default(),
                        name: attr_str(attrs, SET_NAME).unwrap_or_default(),
                    },
                    _ => Reply::Other(k),
                }
            }
            k => Reply::Other(k),
        };
        out.push(reply);
    }
    Ok(out)
}

/// Acknowledgements and errors in one datagram: `(sequence number, errno)` per
/// `NLMSG_ERROR` message (errno 0 for an acknowledgement, else positive; `EPROTO` for a
/// malformed positive code), other messages skipped. Any bytes give acknowledgements or an
/// error, never a panic.
pub fn parse_acks(buf: &[u8]) -> Result<Vec<(u32, i32)>, ParseError> {
    let mut out = Vec::new();
    for m in messages(buf) {
        let m = m?;
        if m.kind == NLMSG_ERROR {
            out.push((m.seq, m.errno()?));
        }
    }
    Ok(out)
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_ne_bytes(x)
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        x.copy_from_slice(s);
    }
    u16::from_ne_bytes(x)
}

/// The payload of the first attribute of type `kind` (nested flag ignored).
fn attr(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16_ne(attrs, 0));
        let t = u16_ne(attrs, 2) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == kind {
            return attrs.get(4..len);
        }
        let next = (len + 3) & !3;
        attrs = attrs.get(next..).unwrap_or(&[]);
    }
    None
}

fn attr_str(attrs: &[u8], kind: u16) -> Option<String> {
    let v = attr(attrs, kind)?;
    let v = v.split(|b| *b == 0).next().unwrap_or(v);
    Some(String::from_utf8_lossy(v).into_owned())
}

/// A request: header, `nfgenmsg`, string attributes.
fn request(msg: u16, flags: u16, family: IpFamily, seq: u32, attrs: &[(u16, &str)]) -> Vec<u8> {
    let mut buf = vec![0u8; 16];
    buf.extend_from_slice(&[nfproto(family), 0, 0, 0]);
    for (t, s) in attrs {
        let len = 4 + s.len() + 1;
        buf.extend_from_slice(&(len as u16).to_ne_bytes());
        buf.extend_from_slice(&t.to_ne_bytes());
        buf.extend_from_slice(s.as_bytes());
        buf.push(0);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
    }
    let total = buf.len() as u32;
    buf[0..4].copy_from_slice(&total.to_ne_bytes());
    buf[4..6].copy_from_slice(&((SUBSYS << 8) | msg).to_ne_bytes());
    buf[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    buf
}

/// What the kernel holds of one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    /// The table's handle; `None` when it does not exist.
    pub handle: Option<u64>,
    /// Rules in the watched chain (0 when it or the table is missing).
    pub watched_rules: usize,
}

/// Reads nf_tables objects of one network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kernel {
    netns: Option<String>,
}

impl Kernel {
    /// The kernel of the named network namespace, or the current one for `None`.
    pub fn new(netns: Option<String>) -> Kernel {
        Kernel { netns }
    }

    fn exchange(&self, reqs: Vec<Vec<u8>>) -> io::Result<Vec<Vec<Reply>>> {
        in_netns(self.netns.as_deref(), move || {
            let mut sock = Socket::new(NETLINK_NETFILTER)?;
            sock.bind_auto()?;
            let mut out = Vec::new();
            for req in reqs {
                let seq = u32_ne(&req, 8);
                sock.send(&req, 0)?;
                let mut replies = Vec::new();
                'recv: loop {
                    let (data, _) = sock.recv_from_full()?;
                    let got = parse_replies(&data, seq)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    for r in got {
                        let end = matches!(r, Reply::Done | Reply::Error(_));
                        replies.push(r);
                        if end {
                            break 'recv;
                        }
                    }
                }
                out.push(replies);
            }
            Ok(out)
        })
    }

    /// Whether `family table` exists, its handle, and how many rules `chain` holds.
    pub fn table_state(
        &self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> io::Result<TableState> {
        let replies = self.exchange(vec![
            request(MSG_GETTABLE, NLM_F_ACK, family, 1, &[(TABLE_NAME, table)]),
            request(
                MSG_GETRULE,
                NLM_F_DUMP,
                family,
                2,
                &[(RULE_TABLE, table), (RULE_CHAIN, chain)],
            ),
        ])?;
        let mut state = TableState::default();
        for r in replies.iter().flatten() {
            match r {
                Reply::Table { name, handle } if name == table => {
                    state.handle = Some(handle.unwrap_or(0));
                }
                Reply::Rule => state.watched_rules += 1,
                Reply::Error(e) if *e != libc_enoent() => {
                    return Err(io::Error::from_raw_os_error(*e));
                }
                _ => {}
            }
        }
        Ok(state)
    }

    /// The names of the chains and sets of `family table` (empty when it does not exist).
    pub fn listing(&self, family: IpFamily, table: &str) -> io::Result<super::render::Listing> {
        let replies = self.exchange(vec![
            request(MSG_GETCHAIN, NLM_F_DUMP, family, 3, &[(CHAIN_TABLE, table)]),
            request(MSG_GETSET, NLM_F_DUMP, family, 4, &[(SET_TABLE, table)]),
        ])?;
        let mut out = super::render::Listing::new();
        for r in replies.iter().flatten() {
            match r {
                Reply::Chain { table: t, name } if t == table => {
                    out.chains.insert(name.clone());
                }
                Reply::Set { table: t, name } if t == table => {
                    out.sets.insert(name.clone());
                }
                Reply::Error(e) if *e != libc_enoent() => {
                    return Err(io::Error::from_raw_os_error(*e));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// A batch the kernel refused, with the first refused command; the kernel kept the
/// previous state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the kernel refused `{command}`: {}", std::io::Error::from_raw_os_error(*.errno))]
pub struct Refused {
    /// The command of the transaction text whose message was refused.
    pub command: String,
    /// The errno the kernel answered.
    pub errno: i32,
}

/// How long a batch waits for the kernel's answer before giving up.
const BATCH_TIMEOUT_SECS: i64 = 10;

impl Kernel {
    /// Sends a batch as one nf_tables transaction over a socket of its own (see
    /// [`BatchSocket::apply`]).
    pub fn apply_batch(&self, batch: &Batch) -> io::Result<Result<(), Refused>> {
        self.batch_socket()?.apply(batch)
    }

    /// A socket for batches, opened in this kernel's network namespace; it stays there, so
    /// later batches need no thread entering the namespace (on a loaded node, each such
    /// hop waited for a scheduler tick: 4 ms of a 5 ms change).
    pub fn batch_socket(&self) -> io::Result<BatchSocket> {
        let sock = in_netns(self.netns.as_deref(), || {
            let mut sock = Socket::new(NETLINK_NETFILTER)?;
            sock.bind_auto()?;
            Ok(sock)
        })?;
        // Errors without a copy of the refused message.
        sock.set_cap_ack(true)?;
        // Room for the errors of a large refused batch (best effort: capped by
        // net.core.rmem_max).
        let _ = setsockopt(&sock, sockopt::RcvBuf, &(1 << 20));
        let timeout = nix::sys::time::TimeVal::new(BATCH_TIMEOUT_SECS, 0);
        setsockopt(&sock, sockopt::ReceiveTimeout, &timeout).map_err(io::Error::from)?;
        Ok(BatchSocket {
            sock,
            seq: 1,
            sndbuf: 0,
        })
    }
}

/// A `NETLINK_NETFILTER` socket that sends nf_tables batches (in the network namespace it
/// was opened in).
pub struct BatchSocket {
    sock: Socket,
    /// The next sequence number: each batch takes its own range, so a late answer to an
    /// earlier one is never read as this one's.
    seq: u32,
    /// The send buffer asked for so far.
    sndbuf: usize,
}

impl std::fmt::Debug for BatchSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSocket")
            .field("seq", &self.seq)
            .finish()
    }
}

impl BatchSocket {
    /// Sends a batch as one nf_tables transaction and reads the kernel's answers to its
    /// refused messages. `Ok(Err(_))` when the kernel refused it (then nothing changed),
    /// with the first refused command; `Err` when the exchange itself failed (then the
    /// socket should be dropped).
    pub fn apply(&mut self, batch: &Batch) -> io::Result<Result<(), Refused>> {
        let first = self.seq;
        let bytes = batch.encode(first);
        let n = batch.commands().len() as u32;
        // BATCH_BEGIN is `first`, commands follow, then BATCH_END, then the GETGEN.
        let cmd_seq = |i: u32| first.wrapping_add(1).wrapping_add(i);
        let probe = cmd_seq(n + 1);
        self.seq = probe.wrapping_add(1);
        // The batch is one datagram, which must fit the send buffer; `nft` raises it the
        // same way (CAP_NET_ADMIN, which programming nf_tables needs anyway). Without it
        // a batch above the default (208 KiB) fails with EMSGSIZE.
        let want = bytes.len().saturating_add(64 * 1024);
        if want > 200 * 1024 && want > self.sndbuf {
            let _ = setsockopt(&self.sock, sockopt::SndBufForce, &want);
            self.sndbuf = want;
        }
        self.sock.send(&bytes, 0)?;
        // The kernel handles the batch within the send and answers only refused messages
        // (none ask for an acknowledgement), so once the GETGEN's acknowledgement is read
        // every answer to the batch was: none means accepted.
        self.sock.send(&getgen_request(probe), 0)?;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let got =
                parse_acks(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let done = got.iter().any(|(seq, _)| *seq == probe);
            answers.extend(got);
            if done {
                break;
            }
        }
        let index = |seq: u32| {
            let i = seq.wrapping_sub(first).wrapping_sub(1);
            (i < n).then_some(i)
        };
        let refused = answers
            .iter()
            .filter_map(|(seq, errno)| Some((index(*seq)?, *errno)))
            .filter(|(_, errno)| *errno != 0)
            .min_by_key(|(i, _)| *i);
        if let Some((i, errno)) = refused {
            let command = batch
                .commands()
                .get(i as usize)
                .map(|c| c.text.clone())
                .unwrap_or_default();
            return Ok(Err(Refused { command, errno }));
        }
        // An error on the batch markers themselves (e.g. EPERM on BATCH_BEGIN).
        let ours = |seq: u32| seq == first || seq == cmd_seq(n);
        if let Some((_, errno)) = answers.iter().find(|(seq, e)| *e != 0 && ours(*seq)) {
            return Ok(Err(Refused {
                command: "(batch)".into(),
                errno: *errno,
            }));
        }
        Ok(Ok(()))
    }
}

fn libc_enoent() -> i32 {
    nix::libc::ENOENT
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn builds_a_get_table_request() {
        let r = request(
            MSG_GETTABLE,
            NLM_F_ACK,
            IpFamily::V4,
            9,
            &[(TABLE_NAME, "svcnat")],
        );
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // nlmsghdr: length 32, type NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE,
            // flags NLM_F_REQUEST | NLM_F_ACK, seq 9, pid 0
            32, 0, 0, 0,  0x01, 0x0a,  0x05, 0x00,  9, 0, 0, 0,  0, 0, 0, 0,
            // nfgenmsg: NFPROTO_IPV4, NFNETLINK_V0, res_id 0
            2, 0, 0, 0,
            // NFTA_TABLE_NAME "svcnat\0", padded to 4
            11, 0, 1, 0,  b's', b'v', b'c', b'n', b'a', b't', 0, 0,
        ];
        assert_eq!(r, want);
    }

    #[test]
    fn parses_tables_chains_errors_and_the_end() {
        let mut buf = request(MSG_NEWTABLE, 0, IpFamily::V6, 5, &[(TABLE_NAME, "svcnat")]);
        // A handle attribute: 12 bytes, big-endian 7.
        buf.extend_from_slice(&[12, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        let chain = request(
            MSG_NEWCHAIN,
            0,
            IpFamily::V6,
            5,
            &[(CHAIN_TABLE, "svcnat"), (CHAIN_NAME, "services")],
        );
        buf.extend_from_slice(&chain);
        // Another sequence number: skipped.
        buf.extend_from_slice(&request(MSG_NEWRULE, 0, IpFamily::V6, 6, &[]));
        // NLMSG_ERROR with -ENOENT.
        let mut err = vec![20, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&(-2i32).to_ne_bytes());
        buf.extend_from_slice(&err);
        let got = parse_replies(&buf, 5).unwrap();
        assert_eq!(
            got,
            vec![
                Reply::Table {
                    name: "svcnat".into(),
                    handle: Some(7)
                },
                Reply::Chain {
                    table: "svcnat".into(),
                    name: "services".into()
                },
                Reply::Error(2),
            ]
        );
        assert!(parse_replies(&[255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0).is_err());
        assert_eq!(parse_replies(&[1, 2, 3], 0), Ok(Vec::new()));
        // A positive code is no errno: both readers say EPROTO, never a negative errno.
        let mut odd = vec![20, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
        odd.extend_from_slice(&7i32.to_ne_bytes());
        assert_eq!(
            parse_replies(&odd, 5),
            Ok(vec![Reply::Error(nix::libc::EPROTO)])
        );
        assert_eq!(parse_acks(&odd), Ok(vec![(5, nix::libc::EPROTO)]));
        // An error message too short for its code is reported at its own offset.
        let mut short = err.clone();
        short.extend_from_slice(&[16, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        let at = err.len();
        for got in [
            parse_replies(&short, 5).map(|_| ()),
            parse_acks(&short).map(|_| ()),
        ] {
            assert_eq!(
                got,
                Err(ParseError {
                    at,
                    what: "short error message"
                })
            );
        }
    }
}
