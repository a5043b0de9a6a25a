//! `nft -f` transactions as nf_tables netlink batches, without the `nft` program.
//!
//! Before it evaluates any command, `nft` fetches the table's chains and sets (and for
//! `add rule`, more) into its cache: at 10,000 Services that is about 1 MB of netlink and
//! 70-100 ms, whatever the transaction holds (only a lone `flush chain` skips it). A
//! partial sync changes one chain and an element or two, so it is written here directly:
//! the transaction text the renderer made (which stays the debuggable form: golden files,
//! `nft -c`, `svcnat-ctl`) is translated command by command into the messages `nft` would
//! send (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_NEWCHAIN`, `NEWRULE`, `DELRULE` for a flush,
//! `NEWSETELEM`, `DELSETELEM`, `DELCHAIN`, `NEWSET`, `DELSET`, `NFNL_MSG_BATCH_END`), the
//! expressions exactly as `nft --debug=netlink` prints them for the same rule.
//!
//! The translation covers exactly the commands and rule statements the renderer writes for
//! a Service port's chains, elements and affinity sets (see [`translate`]); anything else
//! is [`Unsupported`] and the caller sends the text through `nft -f` instead. The batch is
//! one kernel transaction: a refused message aborts all of it, and the kernel's reply
//! names the message, hence the command (see `Kernel::apply_batch`).
//!
//! Pure: bytes in, bytes out. Attribute and constant numbers are those of
//! `linux/netfilter/nf_tables.h`, `nfnetlink.h` and `nf_nat.h`.

use std::net::IpAddr;

use ipnet::IpNet;

/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN`, `NFNL_MSG_BATCH_END`.
const BATCH_BEGIN: u16 = 0x10;
const BATCH_END: u16 = 0x11;
/// `NFT_MSG_*`.
const MSG_NEWCHAIN: u16 = 3;
const MSG_DELCHAIN: u16 = 5;
const MSG_NEWRULE: u16 = 6;
const MSG_DELRULE: u16 = 8;
const MSG_NEWSET: u16 = 9;
const MSG_DELSET: u16 = 11;
const MSG_NEWSETELEM: u16 = 12;
const MSG_DELSETELEM: u16 = 14;
/// `NFT_MSG_GETGEN`: a request after the batch, whose reply says all of the batch's
/// replies were read.
pub(crate) const MSG_GETGEN: u16 = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

/// `NFTA_CHAIN_*`, `NFTA_RULE_*`, `NFTA_SET_*`, `NFTA_SET_ELEM_LIST_*`, `NFTA_SET_ELEM_*`.
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_TIMEOUT: u16 = 11;
const SET_ID: u16 = 10;
const ELEM_LIST_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
/// `NFTA_LIST_ELEM`, `NFTA_EXPR_NAME`, `NFTA_EXPR_DATA`, `NFTA_DATA_VALUE`,
/// `NFTA_DATA_VERDICT`, `NFTA_VERDICT_CODE`, `NFTA_VERDICT_CHAIN`.
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;
/// `NFT_SET_TIMEOUT`, `NFT_SET_EVAL` (`flags dynamic,timeout`).
const SET_F_TIMEOUT: u32 = 0x10;
const SET_F_EVAL: u32 = 0x20;
/// nft's datatype numbers for set keys: `ipaddr` 7, `ip6addr` 8.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;

/// Registers: `NFT_REG_VERDICT`, `NFT_REG_1`, `NFT_REG_2` (what `nft` allocates).
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// One nf_tables expression of a rule, as `nft --debug=netlink` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    /// `[ payload load LENb @ BASE header + OFFSET => reg 1 ]`.
    Payload { base: u32, offset: u32, len: u32 },
    /// `[ cmp OP reg 1 DATA ]`.
    Cmp { op: u32, data: Vec<u8> },
    /// `[ bitwise reg 1 = ( reg 1 & MASK ) ^ 0 ]`.
    Mask { mask: Vec<u8> },
    /// `[ meta load KEY => reg 1 ]`.
    Meta { key: u32 },
    /// `[ numgen reg 1 = random mod M ]`.
    Numgen { modulus: u32 },
    /// `[ byteorder reg 1 = hton(reg 1, 4, 4) ]`.
    Hton32,
    /// `[ lookup reg 1 set NAME ]`.
    Lookup { set: String },
    /// `[ dynset update reg_key 1 set NAME ]`.
    DynsetUpdate { set: String },
    /// `[ fib saddr type => reg 1 ]`.
    FibSaddrType,
    /// `[ immediate reg R DATA ]`.
    Immediate { reg: u32, data: Vec<u8> },
    /// `[ immediate reg 0 VERDICT ]`.
    Verdict(Verdict),
    /// `[ nat dnat FAMILY addr_min reg 1 proto_min reg 2 flags 0x2 ]`.
    Dnat { nfproto: u32 },
}

/// A verdict: code (`enum nft_verdicts`, `NF_DROP`, `NF_ACCEPT`) and target chain.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdict {
    code: i32,
    chain: Option<String>,
}

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
/// `NFT_PAYLOAD_NETWORK_HEADER`, `NFT_PAYLOAD_TRANSPORT_HEADER`.
const NETWORK: u32 = 1;
const TRANSPORT: u32 = 2;
/// `NFT_CMP_EQ`, `NFT_CMP_NEQ`, `NFT_CMP_LT`.
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const CMP_LT: u32 = 2;
/// `NFT_META_L4PROTO`.
const META_L4PROTO: u32 = 16;
/// `RTN_LOCAL`, as `fib ... type local` compares it (host byte order).
const RTN_LOCAL: u32 = 2;

/// A command of the transaction text the translation does not cover; the caller falls
/// back to `nft -f`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not translated to netlink: {command}")]
pub struct Unsupported {
    /// The command (its first line).
    pub command: String,
}

/// One command of a transaction and its netlink messages (header fields filled in when
/// the batch is sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The command as the transaction text writes it (for an element list: the verb, the
    /// set and that element).
    pub text: String,
    /// Message type (`NFT_MSG_*`), flags, and `nfgenmsg` plus attributes.
    msg: (u16, u16, Vec<u8>),
}

/// A transaction translated to nf_tables messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    commands: Vec<Command>,
}

impl Batch {
    /// The commands, in order; message `i` of the batch (sequence number `first + 1 + i`,
    /// see [`Batch::encode`]) is command `i`.
    pub fn commands(&self) -> &[Command] {
        &self.commands
    }

    /// The length of [`Batch::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        40 + self
            .commands
            .iter()
            .map(|c| 16 + c.msg.2.len().next_multiple_of(4))
            .sum::<usize>()
    }

    /// Whether the batch holds no command.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The bytes of the whole batch: `BATCH_BEGIN` with sequence number `first`, command
    /// `i` with `first + 1 + i`, `BATCH_END` after them. Every command asks for an
    /// acknowledgement, so the kernel answers each with its own error code.
    pub fn encode(&self, first: u32) -> Vec<u8> {
        let size: usize = self.commands.iter().map(|c| c.msg.2.len() + 16).sum();
        let mut out = Vec::with_capacity(size + 40);
        // The batch messages: AF_UNSPEC, res_id = NFNL_SUBSYS_NFTABLES (big endian).
        let batch_gen = [0u8, 0, 0, SUBSYS as u8];
        header(&mut out, BATCH_BEGIN, NLM_F_REQUEST, first, &batch_gen);
        for (i, c) in self.commands.iter().enumerate() {
            let (kind, flags, body) = &c.msg;
            let seq = first.wrapping_add(1).wrapping_add(i as u32);
            header(
                &mut out,
                (SUBSYS << 8) | kind,
                NLM_F_REQUEST | flags,
                seq,
                body,
            );
        }
        let end = first
            .wrapping_add(1)
            .wrapping_add(self.commands.len() as u32);
        header(&mut out, BATCH_END, NLM_F_REQUEST, end, &batch_gen);
        out
    }
}

/// Appends one netlink message (16-byte header, then `body`, padded to 4).
fn header(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    let len = 16 + body.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The request `NFT_MSG_GETGEN` (family unspecified) with sequence number `seq`.
pub fn getgen_request(seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    header(
        &mut out,
        (SUBSYS << 8) | MSG_GETGEN,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &[0, 0, 0, 0],
    );
    out
}

/// Netlink attributes being written.
struct Attrs(Vec<u8>);

impl Attrs {
    /// Starts a message body: `nfgenmsg` of the family (`NFPROTO_*`), version 0.
    fn message(nfproto: u8) -> Attrs {
        Attrs(vec![nfproto, 0, 0, 0])
    }

    fn put(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn string(&mut self, kind: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(kind, &v);
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.put(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0, 0, 0, 0]);
        f(self);
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[at + 2..at + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn data_value(&mut self, kind: u16, v: &[u8]) {
        self.nest(kind, |a| a.put(DATA_VALUE, v));
    }

    fn verdict(&mut self, kind: u16, v: &Verdict) {
        self.nest(kind, |a| {
            a.nest(DATA_VERDICT, |a| {
                a.put(VERDICT_CODE, &v.code.to_be_bytes());
                if let Some(c) = &v.chain {
                    a.string(VERDICT_CHAIN, c);
                }
            })
        });
    }
}

impl Expr {
    fn emit(&self, a: &mut Attrs) {
        let name = match self {
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Mask { .. } => "bitwise",
            Expr::Meta { .. } => "meta",
            Expr::Numgen { .. } => "numgen",
            Expr::Hton32 => "byteorder",
            Expr::Lookup { .. } => "lookup",
            Expr::DynsetUpdate { .. } => "dynset",
            Expr::FibSaddrType => "fib",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Dnat { .. } => "nat",
        };
        a.nest(LIST_ELEM, |a| {
            a.string(EXPR_NAME, name);
            a.nest(EXPR_DATA, |a| match self {
                // NFTA_PAYLOAD_DREG 1, BASE 2, OFFSET 3, LEN 4.
                Expr::Payload { base, offset, len } => {
                    a.u32(1, REG_1);
                    a.u32(2, *base);
                    a.u32(3, *offset);
                    a.u32(4, *len);
                }
                // NFTA_CMP_SREG 1, OP 2, DATA 3.
                Expr::Cmp { op, data } => {
                    a.u32(1, REG_1);
                    a.u32(2, *op);
                    a.data_value(3, data);
                }
                // NFTA_BITWISE_SREG 1, DREG 2, LEN 3, MASK 4, XOR 5.
                Expr::Mask { mask } => {
                    a.u32(1, REG_1);
                    a.u32(2, REG_1);
                    a.u32(3, mask.len() as u32);
                    a.data_value(4, mask);
                    a.data_value(5, &vec![0; mask.len()]);
                }
                // NFTA_META_DREG 1, KEY 2.
                Expr::Meta { key } => {
                    a.u32(2, *key);
                    a.u32(1, REG_1);
                }
                // NFTA_NG_DREG 1, MODULUS 2, TYPE 3 (NFT_NG_RANDOM), OFFSET 4.
                Expr::Numgen { modulus } => {
                    a.u32(1, REG_1);
                    a.u32(2, *modulus);
                    a.u32(3, 1);
                    a.u32(4, 0);
                }
                // NFTA_BYTEORDER_SREG 1, DREG 2, OP 3 (NFT_BYTEORDER_HTON), LEN 4, SIZE 5.
                Expr::Hton32 => {
                    a.u32(1, REG_1);
                    a.u32(2, REG_1);
                    a.u32(3, 1);
                    a.u32(4, 4);
                    a.u32(5, 4);
                }
                // NFTA_LOOKUP_SET 1, SREG 2.
                Expr::Lookup { set } => {
                    a.string(1, set);
                    a.u32(2, REG_1);
                }
                // NFTA_DYNSET_SET_NAME 1, OP 3 (NFT_DYNSET_OP_UPDATE), SREG_KEY 4.
                Expr::DynsetUpdate { set } => {
                    a.string(1, set);
                    a.u32(3, 1);
                    a.u32(4, REG_1);
                }
                // NFTA_FIB_DREG 1, RESULT 2 (NFT_FIB_RESULT_ADDRTYPE), FLAGS 3 (saddr).
                Expr::FibSaddrType => {
                    a.u32(1, REG_1);
                    a.u32(2, 3);
                    a.u32(3, 1);
                }
                // NFTA_IMMEDIATE_DREG 1, DATA 2.
                Expr::Immediate { reg, data } => {
                    a.u32(1, *reg);
                    a.data_value(2, data);
                }
                Expr::Verdict(v) => {
                    a.u32(1, REG_VERDICT);
                    a.verdict(2, v);
                }
                // NFTA_NAT_TYPE 1 (NFT_NAT_DNAT), FAMILY 2, REG_ADDR_MIN 3,
                // REG_PROTO_MIN 5, FLAGS 7 (NF_NAT_RANGE_PROTO_SPECIFIED).
                Expr::Dnat { nfproto } => {
                    a.u32(1, 1);
                    a.u32(2, *nfproto);
                    a.u32(3, REG_1);
                    a.u32(5, REG_2);
                    a.u32(7, 2);
                }
            });
        });
    }
}

/// The address family of a table as the text names it: `ip` or `ip6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn of(word: &str) -> Option<Fam> {
        match word {
            "ip" => Some(Fam::V4),
            "ip6" => Some(Fam::V6),
            _ => None,
        }
    }

    fn nfproto(self) -> u8 {
        match self {
            Fam::V4 => 2,
            Fam::V6 => 10,
        }
    }

    /// Offset of the source and destination address in the network header.
    fn addr_offset(self, daddr: bool) -> u32 {
        match (self, daddr) {
            (Fam::V4, false) => 12,
            (Fam::V4, true) => 16,
            (Fam::V6, false) => 8,
            (Fam::V6, true) => 24,
        }
    }

    fn addr_len(self) -> u32 {
        match self {
            Fam::V4 => 4,
            Fam::V6 => 16,
        }
    }
}

/// Longest name the kernel takes for a table, chain or set (`NFT_NAME_MAXLEN` - 1); a
/// longer one is left to `nft` (whose error names it), and it keeps every attribute's
/// 16-bit length in range.
const NAME_MAX: usize = 255;

fn name(s: &str) -> Option<&str> {
    (!s.is_empty() && s.len() <= NAME_MAX && !s.contains('\0')).then_some(s)
}

fn addr_bytes(fam: Fam, ip: IpAddr) -> Option<Vec<u8>> {
    match (fam, ip) {
        (Fam::V4, IpAddr::V4(a)) => Some(a.octets().to_vec()),
        (Fam::V6, IpAddr::V6(a)) => Some(a.octets().to_vec()),
        _ => None,
    }
}

fn proto_number(word: &str) -> Option<u8> {
    match word {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}

/// Translates the rule statements the renderer writes (see the module docs) into
/// expressions; `None` for anything else.
fn rule_exprs(fam: Fam, words: &[&str]) -> Option<Vec<Expr>> {
    let mut out = Vec::new();
    let mut w = words;
    while let Some((first, rest)) = w.split_first() {
        w = match (*first, rest) {
            // `ip saddr 10.0.0.0/8`, `ip daddr 10.96.0.1`, `ip6 saddr != fd00::/64`,
            // `ip saddr @set`.
            (f, [dir @ ("saddr" | "daddr"), rest @ ..]) if Fam::of(f) == Some(fam) => {
                let daddr = *dir == "daddr";
                let (neq, rest) = match rest {
                    ["!=", rest @ ..] => (true, rest),
                    _ => (false, rest),
                };
                let (value, rest) = rest.split_first()?;
                if let Some(set) = value.strip_prefix('@') {
                    if neq || set.is_empty() {
                        return None;
                    }
                    out.push(Expr::Payload {
                        base: NETWORK,
                        offset: fam.addr_offset(daddr),
                        len: fam.addr_len(),
                    });
                    out.push(Expr::Lookup {
                        set: name(set)?.into(),
                    });
                } else {
                    addr_match(fam, daddr, neq, value, &mut out)?;
                }
                rest
            }
            // `tcp dport 80`: the protocol as a dependency, then the port.
            (p, ["dport", port, rest @ ..]) => {
                let proto = proto_number(p)?;
                let port: u16 = port.parse().ok()?;
                out.push(Expr::Meta { key: META_L4PROTO });
                out.push(Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![proto],
                });
                out.push(Expr::Payload {
                    base: TRANSPORT,
                    offset: 2,
                    len: 2,
                });
                out.push(Expr::Cmp {
                    op: CMP_EQ,
                    data: port.to_be_bytes().to_vec(),
                });
                rest
            }
            ("meta", ["l4proto", p, rest @ ..]) => {
                out.push(Expr::Meta { key: META_L4PROTO });
                out.push(Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![proto_number(p)?],
                });
                rest
            }
            // `numgen random mod R < W`: numgen gives host byte order; `nft` converts to
            // network order before the (memcmp) comparison.
            ("numgen", ["random", "mod", m, "<", v, rest @ ..]) => {
                let modulus: u32 = m.parse().ok()?;
                let value: u32 = v.parse().ok()?;
                out.push(Expr::Numgen { modulus });
                out.push(Expr::Hton32);
                out.push(Expr::Cmp {
                    op: CMP_LT,
                    data: value.to_be_bytes().to_vec(),
                });
                rest
            }
            // `update @set { ip saddr }`.
            ("update", [set, "{", f, "saddr", "}", rest @ ..]) if Fam::of(f) == Some(fam) => {
                let set = name(set.strip_prefix('@')?)?;
                out.push(Expr::Payload {
                    base: NETWORK,
                    offset: fam.addr_offset(false),
                    len: fam.addr_len(),
                });
                out.push(Expr::DynsetUpdate { set: set.into() });
                rest
            }
            ("fib", ["saddr", "type", "local", rest @ ..]) => {
                out.push(Expr::FibSaddrType);
                out.push(Expr::Cmp {
                    op: CMP_EQ,
                    data: RTN_LOCAL.to_ne_bytes().to_vec(),
                });
                rest
            }
            // `dnat ip to 10.0.0.1:80`, `dnat ip6 to [fd00::1]:80`.
            ("dnat", [f, "to", target, rest @ ..]) if Fam::of(f) == Some(fam) => {
                let (addr, port) = target.rsplit_once(':')?;
                let addr = match fam {
                    Fam::V4 => addr,
                    Fam::V6 => addr.strip_prefix('[')?.strip_suffix(']')?,
                };
                let ip: IpAddr = addr.parse().ok()?;
                let port: u16 = port.parse().ok()?;
                out.push(Expr::Immediate {
                    reg: REG_1,
                    data: addr_bytes(fam, ip)?,
                });
                out.push(Expr::Immediate {
                    reg: REG_2,
                    data: port.to_be_bytes().to_vec(),
                });
                out.push(Expr::Dnat {
                    nfproto: u32::from(fam.nfproto()),
                });
                rest
            }
            (v @ ("jump" | "goto"), [chain, rest @ ..]) => {
                out.push(Expr::Verdict(Verdict {
                    code: if v == "jump" { NFT_JUMP } else { NFT_GOTO },
                    chain: Some(name(chain)?.into()),
                }));
                rest
            }
            ("return", rest) => {
                out.push(Expr::Verdict(Verdict {
                    code: NFT_RETURN,
                    chain: None,
                }));
                rest
            }
            ("drop", rest) => {
                out.push(Expr::Verdict(Verdict {
                    code: NF_DROP,
                    chain: None,
                }));
                rest
            }
            ("accept", rest) => {
                out.push(Expr::Verdict(Verdict {
                    code: NF_ACCEPT,
                    chain: None,
                }));
                rest
            }
            _ => return None,
        };
        // Nothing may follow a verdict.
        if matches!(out.last(), Some(Expr::Verdict(_))) && !w.is_empty() {
            return None;
        }
    }
    Some(out)
}

/// An address or prefix match as `nft` writes it: a whole address compared; a prefix on a
/// byte boundary as a shorter load; any other prefix masked first.
fn addr_match(fam: Fam, daddr: bool, neq: bool, value: &str, out: &mut Vec<Expr>) -> Option<()> {
    let op = if neq { CMP_NEQ } else { CMP_EQ };
    let offset = fam.addr_offset(daddr);
    let (addr, prefix) = match value.parse::<IpNet>() {
        Ok(net) if value.contains('/') => (net.network(), net.prefix_len()),
        _ => {
            let ip: IpAddr = value.parse().ok()?;
            (ip, (fam.addr_len() * 8) as u8)
        }
    };
    let bytes = addr_bytes(fam, addr)?;
    // A zero-length prefix matches everything: not a form the renderer writes.
    if prefix == 0 {
        return None;
    }
    if prefix % 8 == 0 {
        let len = u32::from(prefix / 8);
        out.push(Expr::Payload {
            base: NETWORK,
            offset,
            len,
        });
        out.push(Expr::Cmp {
            op,
            data: bytes.get(..len as usize)?.to_vec(),
        });
    } else {
        let mask: Vec<u8> = (0..bytes.len())
            .map(|i| {
                let bits = (usize::from(prefix)).saturating_sub(i * 8).min(8);
                if bits == 0 { 0 } else { 0xffu8 << (8 - bits) }
            })
            .collect();
        out.push(Expr::Payload {
            base: NETWORK,
            offset,
            len: fam.addr_len(),
        });
        out.push(Expr::Mask { mask });
        out.push(Expr::Cmp { op, data: bytes });
    }
    Some(())
}

/// An element key: one field as is, several (`a . b . c`) each padded to 4 bytes.
fn element_key(fam: Fam, key: &str) -> Option<Vec<u8>> {
    let fields: Vec<&str> = key.split(" . ").map(str::trim).collect();
    let mut out = Vec::new();
    for f in &fields {
        let bytes = if let Some(p) = proto_number(f) {
            vec![p]
        } else if let Ok(port) = f.parse::<u16>() {
            port.to_be_bytes().to_vec()
        } else {
            addr_bytes(fam, f.parse().ok()?)?
        };
        out.extend_from_slice(&bytes);
        if fields.len() > 1 {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
    }
    Some(out)
}

fn element_verdict(v: &str) -> Option<Verdict> {
    let words: Vec<&str> = v.split_whitespace().collect();
    match words.as_slice() {
        ["goto", c] => Some(Verdict {
            code: NFT_GOTO,
            chain: Some(name(c)?.into()),
        }),
        ["jump", c] => Some(Verdict {
            code: NFT_JUMP,
            chain: Some(name(c)?.into()),
        }),
        ["drop"] => Some(Verdict {
            code: NF_DROP,
            chain: None,
        }),
        ["accept"] => Some(Verdict {
            code: NF_ACCEPT,
            chain: None,
        }),
        _ => None,
    }
}

/// Translates a transaction text into one batch: `add chain T C` (no base chains), `flush
/// chain`, `delete chain`, `add rule T C ...` with the statements of `service-`, `local-`,
/// `external-` and `firewall-` chains, `add element` / `delete element` (one message per
/// element, so a refusal names the element) with address, protocol and port keys and
/// verdicts, affinity sets (`add set T S { type ipv4_addr; flags dynamic,timeout; timeout
/// Ns; }`) and `delete set`.
pub fn translate(text: &str) -> Result<Batch, Unsupported> {
    let mut batch = Batch::default();
    let mut lines = text.lines();
    let mut set_id: u32 = 0;
    while let Some(line) = lines.next() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let unsupported = || Unsupported {
            command: line.to_string(),
        };
        // An element list: `add element T S {` ... `}` (or on one line).
        if (line.starts_with("add element ") || line.starts_with("delete element "))
            && line.contains('{')
        {
            let mut body = String::new();
            let (head, first) = line.split_once('{').ok_or_else(unsupported)?;
            body.push_str(first);
            while !body.contains('}') {
                let Some(next) = lines.next() else {
                    return Err(unsupported());
                };
                body.push(' ');
                body.push_str(next.trim());
            }
            let (inner, after) = body.split_once('}').ok_or_else(unsupported)?;
            if !after.trim().is_empty() {
                return Err(unsupported());
            }
            let head: Vec<&str> = head.split_whitespace().collect();
            let [verb, "element", fam, table, set] = head.as_slice() else {
                return Err(unsupported());
            };
            let fam = Fam::of(fam).ok_or_else(unsupported)?;
            name(table).and(name(set)).ok_or_else(unsupported)?;
            for e in inner.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let cmd = element_command(verb, fam, table, set, e).ok_or_else(unsupported)?;
                batch.commands.push(cmd);
            }
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let cmd = match words.as_slice() {
            [
                verb @ ("add" | "flush" | "delete"),
                "chain",
                fam,
                table,
                chain,
            ] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).and(name(chain)).ok_or_else(unsupported)?;
                let mut a = Attrs::message(fam.nfproto());
                let (kind, flags) = match *verb {
                    "add" => (MSG_NEWCHAIN, NLM_F_CREATE),
                    // A flush is a rule deletion without a handle.
                    "flush" => (MSG_DELRULE, 0),
                    _ => (MSG_DELCHAIN, 0),
                };
                if kind == MSG_DELRULE {
                    a.string(RULE_TABLE, table);
                    a.string(RULE_CHAIN, chain);
                } else {
                    a.string(CHAIN_TABLE, table);
                    a.string(CHAIN_NAME, chain);
                }
                (kind, flags, a.0)
            }
            ["add", "rule", fam, table, chain, body @ ..] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).and(name(chain)).ok_or_else(unsupported)?;
                let exprs = rule_exprs(fam, body).ok_or_else(unsupported)?;
                let mut a = Attrs::message(fam.nfproto());
                a.string(RULE_TABLE, table);
                a.string(RULE_CHAIN, chain);
                a.nest(RULE_EXPRESSIONS, |a| {
                    for e in &exprs {
                        e.emit(a);
                    }
                });
                // An attribute's length is 16 bits: a rule that long is `nft`'s to refuse.
                if a.0.len() > usize::from(u16::MAX) {
                    return Err(unsupported());
                }
                (MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a.0)
            }
            // An affinity set, as the renderer writes it.
            [
                "add",
                "set",
                fam,
                table,
                set,
                "{",
                "type",
                ty,
                "flags",
                "dynamic,timeout;",
                "timeout",
                timeout,
                "}",
            ] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).and(name(set)).ok_or_else(unsupported)?;
                let (dtype, len) = match (fam, *ty) {
                    (Fam::V4, "ipv4_addr;") => (TYPE_IPADDR, 4),
                    (Fam::V6, "ipv6_addr;") => (TYPE_IP6ADDR, 16),
                    _ => return Err(unsupported()),
                };
                let secs: u64 = timeout
                    .strip_suffix("s;")
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(unsupported)?;
                set_id += 1;
                let mut a = Attrs::message(fam.nfproto());
                a.string(SET_TABLE, table);
                a.string(SET_NAME, set);
                a.u32(SET_FLAGS, SET_F_TIMEOUT | SET_F_EVAL);
                a.u32(SET_KEY_TYPE, dtype);
                a.u32(SET_KEY_LEN, len);
                a.u32(SET_ID, set_id);
                // NFTA_SET_TIMEOUT in milliseconds.
                a.u64(SET_TIMEOUT, secs.saturating_mul(1000));
                (MSG_NEWSET, NLM_F_CREATE, a.0)
            }
            ["delete", "set", fam, table, set] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).and(name(set)).ok_or_else(unsupported)?;
                let mut a = Attrs::message(fam.nfproto());
                a.string(SET_TABLE, table);
                a.string(SET_NAME, set);
                (MSG_DELSET, 0, a.0)
            }
            _ => return Err(unsupported()),
        };
        batch.commands.push(Command {
            text: line.to_string(),
            msg: cmd,
        });
    }
    Ok(batch)
}

fn element_command(verb: &str, fam: Fam, table: &str, set: &str, e: &str) -> Option<Command> {
    let (key, verdict) = match e.split_once(" : ") {
        Some((k, v)) => (k, Some(element_verdict(v)?)),
        None => (e, None),
    };
    let key = element_key(fam, key)?;
    let (kind, flags) = match verb {
        "add" => (MSG_NEWSETELEM, NLM_F_CREATE),
        "delete" => (MSG_DELSETELEM, 0),
        _ => return None,
    };
    let mut a = Attrs::message(fam.nfproto());
    a.string(ELEM_LIST_TABLE, table);
    a.string(ELEM_LIST_SET, set);
    a.nest(ELEM_LIST_ELEMENTS, |a| {
        a.nest(LIST_ELEM, |a| {
            a.data_value(ELEM_KEY, &key);
            // A deletion names the key only.
            if let (Some(v), "add") = (&verdict, verb) {
                a.verdict(ELEM_DATA, v);
            }
        })
    });
    let fam_word = match fam {
        Fam::V4 => "ip",
        Fam::V6 => "ip6",
    };
    Some(Command {
        text: format!("{verb} element {fam_word} {table} {set} {{ {e} }}"),
        msg: (kind, flags, a.0),
    })
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }

    /// The expressions `nft --debug=netlink` (nft 1.0.6) printed for the same rules.
    #[test]
    fn rules_translate_as_nft_lists_them() {
        let e = rule_exprs(
            Fam::V4,
            &words(
                "ip daddr 10.96.19.143 tcp dport 80 ip saddr != 10.32.0.0/12 jump mark-for-masquerade",
            ),
        )
        .unwrap();
        // [ payload load 4b @ network header + 16 => reg 1 ] [ cmp eq reg 1 0x8f13600a ]
        // [ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ]
        // [ payload load 2b @ transport header + 2 => reg 1 ] [ cmp eq reg 1 0x00005000 ]
        // [ payload load 4b @ network header + 12 => reg 1 ]
        // [ bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000 ]
        // [ cmp neq reg 1 0x0000200a ] [ immediate reg 0 jump -> mark-for-masquerade ]
        assert_eq!(
            e,
            vec![
                Expr::Payload {
                    base: NETWORK,
                    offset: 16,
                    len: 4
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![10, 96, 19, 143]
                },
                Expr::Meta { key: META_L4PROTO },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![6]
                },
                Expr::Payload {
                    base: TRANSPORT,
                    offset: 2,
                    len: 2
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![0, 80]
                },
                Expr::Payload {
                    base: NETWORK,
                    offset: 12,
                    len: 4
                },
                Expr::Mask {
                    mask: vec![0xff, 0xf0, 0, 0]
                },
                Expr::Cmp {
                    op: CMP_NEQ,
                    data: vec![10, 32, 0, 0]
                },
                Expr::Verdict(Verdict {
                    code: NFT_JUMP,
                    chain: Some("mark-for-masquerade".into())
                }),
            ]
        );
        // [ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000084 ]
        // [ numgen reg 1 = random mod 3 ] [ byteorder reg 1 = hton(reg 1, 4, 4) ]
        // [ cmp lt reg 1 0x02000000 ] [ payload load 4b @ network header + 12 => reg 1 ]
        // [ dynset update reg_key 1 set aff ] [ immediate reg 1 0x8f13200a ]
        // [ immediate reg 2 0x0000901f ] [ nat dnat ip addr_min reg 1 proto_min reg 2 flags 0x2 ]
        let e = rule_exprs(
            Fam::V4,
            &words(
                "meta l4proto sctp numgen random mod 3 < 2 update @aff { ip saddr } dnat ip to 10.32.19.143:8080",
            ),
        )
        .unwrap();
        assert_eq!(
            e,
            vec![
                Expr::Meta { key: META_L4PROTO },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![132]
                },
                Expr::Numgen { modulus: 3 },
                Expr::Hton32,
                Expr::Cmp {
                    op: CMP_LT,
                    data: vec![0, 0, 0, 2]
                },
                Expr::Payload {
                    base: NETWORK,
                    offset: 12,
                    len: 4
                },
                Expr::DynsetUpdate { set: "aff".into() },
                Expr::Immediate {
                    reg: 1,
                    data: vec![10, 32, 19, 143]
                },
                Expr::Immediate {
                    reg: 2,
                    data: vec![0x1f, 0x90]
                },
                Expr::Dnat { nfproto: 2 },
            ]
        );
        // [ payload load 8b @ network header + 8 => reg 1 ] [ cmp neq reg 1 0x100000fd 0x00000000 ]
        // [ immediate reg 0 jump -> mark-for-masquerade ]
        let e = rule_exprs(
            Fam::V6,
            &words("ip6 saddr != fd00:10::/64 jump mark-for-masquerade"),
        )
        .unwrap();
        assert_eq!(
            e[..2],
            [
                Expr::Payload {
                    base: NETWORK,
                    offset: 8,
                    len: 8
                },
                Expr::Cmp {
                    op: CMP_NEQ,
                    data: vec![0xfd, 0, 0, 0x10, 0, 0, 0, 0]
                },
            ]
        );
        // [ payload load 3b @ network header + 12 => reg 1 ] [ cmp eq reg 1 0x00030201 ]
        // [ immediate reg 0 return ]
        let e = rule_exprs(Fam::V4, &words("ip saddr 1.2.3.0/24 return")).unwrap();
        assert_eq!(
            e,
            vec![
                Expr::Payload {
                    base: NETWORK,
                    offset: 12,
                    len: 3
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![1, 2, 3]
                },
                Expr::Verdict(Verdict {
                    code: NFT_RETURN,
                    chain: None
                }),
            ]
        );
        // [ fib saddr type => reg 1 ] [ cmp eq reg 1 0x00000002 ] [ immediate reg 0 goto -> c1 ]
        let e = rule_exprs(Fam::V4, &words("fib saddr type local goto c1")).unwrap();
        assert_eq!(
            e,
            vec![
                Expr::FibSaddrType,
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![2, 0, 0, 0]
                },
                Expr::Verdict(Verdict {
                    code: NFT_GOTO,
                    chain: Some("c1".into())
                }),
            ]
        );
    }

    #[test]
    fn what_the_renderer_never_writes_is_left_to_nft() {
        for r in [
            "ct state new jump endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "masquerade fully-random",
            "ip6 saddr 10.0.0.1 drop",
            "ip saddr != @aff drop",
            "drop drop",
            "jump",
            "tcp dport 99999 drop",
            "dnat ip to 10.0.0.1",
            "ip saddr 0.0.0.0/0 drop",
        ] {
            assert_eq!(rule_exprs(Fam::V4, &words(r)), None, "{r}");
        }
        assert!(
            translate("add chain ip svcnat nat-output { type nat hook output priority -100; }")
                .is_err()
        );
        assert!(translate("add table ip svcnat").is_err());
        assert!(translate("add element inet svcnat s { 1.2.3.4 }").is_err());
        assert!(translate("add element ip svcnat s {\n\t1.2.3.4\n").is_err());
        let long = "c".repeat(256);
        assert!(translate(&format!("add chain ip svcnat {long}")).is_err());
        assert!(translate(&format!("add rule ip svcnat c goto {long}")).is_err());
        assert!(translate(&format!("add chain ip svcnat {}", &long[1..])).is_ok());
        let huge = "meta l4proto tcp ".repeat(3000);
        assert!(translate(&format!("add rule ip svcnat c {huge}drop")).is_err());
        let big = "meta l4proto tcp ".repeat(100);
        assert!(translate(&format!("add rule ip svcnat c {big}drop")).is_ok());
    }

    /// Elements as `nft --debug=netlink` printed them:
    /// `element 0100600a 00000006 0000bb01 : goto -> c1`, `element 00000006 00008075`,
    /// `element 0302010a 0302010a`.
    #[test]
    fn element_keys_are_padded_concatenations() {
        assert_eq!(
            element_key(Fam::V4, "10.96.0.1 . tcp . 443"),
            Some(vec![10, 96, 0, 1, 6, 0, 0, 0, 1, 0xbb, 0, 0])
        );
        assert_eq!(
            element_key(Fam::V4, "tcp . 30080"),
            Some(vec![6, 0, 0, 0, 0x75, 0x80, 0, 0])
        );
        assert_eq!(
            element_key(Fam::V4, "1.2.3.10 . 1.2.3.10"),
            Some(vec![1, 2, 3, 10, 1, 2, 3, 10])
        );
        assert_eq!(element_key(Fam::V4, "1.2.3.10"), Some(vec![1, 2, 3, 10]));
        assert_eq!(element_key(Fam::V6, "1.2.3.10"), None);
        assert_eq!(element_key(Fam::V6, "fd00::1").map(|k| k.len()), Some(16));
    }

    #[test]
    fn a_transaction_becomes_one_batch_with_a_message_per_command_and_element() {
        let text = "add chain ip svcnat c\nflush chain ip svcnat c\nadd rule ip svcnat c drop\n\
                    delete element ip svcnat hairpin {\n\t1.2.3.4 . 1.2.3.4,\n\t1.2.3.5 . 1.2.3.5\n}\n\
                    add element ip svcnat service-ips { 10.96.0.1 . tcp . 80 : goto c }\n\
                    add set ip svcnat affinity-x { type ipv4_addr; flags dynamic,timeout; timeout 10800s; }\n\
                    delete set ip svcnat affinity-y\ndelete chain ip svcnat d\n";
        let b = translate(text).unwrap();
        let names: Vec<&str> = b.commands().iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "add chain ip svcnat c",
                "flush chain ip svcnat c",
                "add rule ip svcnat c drop",
                "delete element ip svcnat hairpin { 1.2.3.4 . 1.2.3.4 }",
                "delete element ip svcnat hairpin { 1.2.3.5 . 1.2.3.5 }",
                "add element ip svcnat service-ips { 10.96.0.1 . tcp . 80 : goto c }",
                "add set ip svcnat affinity-x { type ipv4_addr; flags dynamic,timeout; timeout 10800s; }",
                "delete set ip svcnat affinity-y",
                "delete chain ip svcnat d",
            ]
        );
        let kinds: Vec<u16> = b.commands().iter().map(|c| c.msg.0).collect();
        assert_eq!(
            kinds,
            vec![
                MSG_NEWCHAIN,
                MSG_DELRULE,
                MSG_NEWRULE,
                MSG_DELSETELEM,
                MSG_DELSETELEM,
                MSG_NEWSETELEM,
                MSG_NEWSET,
                MSG_DELSET,
                MSG_DELCHAIN
            ]
        );
        let bytes = b.encode(100);
        // BATCH_BEGIN: length 20, type 0x10, NLM_F_REQUEST, seq 100, res_id htons(10).
        assert_eq!(
            bytes[..20],
            [
                20, 0, 0, 0, 0x10, 0, 1, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10
            ]
        );
        // The end: BATCH_END with seq 100 + 1 + 9.
        assert_eq!(
            bytes[bytes.len() - 20..],
            [
                20, 0, 0, 0, 0x11, 0, 1, 0, 110, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10
            ]
        );
    }

    /// `add rule ip svcnat c drop` byte for byte.
    #[test]
    fn a_drop_rule_message() {
        let b = translate("add rule ip svcnat c drop").unwrap();
        let bytes = b.encode(0);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // nlmsghdr: length 92, NFT_MSG_NEWRULE, REQUEST|CREATE|APPEND, seq 1
            92, 0, 0, 0,  0x06, 0x0a,  0x01, 0x0c,  1, 0, 0, 0,  0, 0, 0, 0,
            // nfgenmsg: NFPROTO_IPV4
            2, 0, 0, 0,
            // NFTA_RULE_TABLE "svcnat", NFTA_RULE_CHAIN "c"
            11, 0, 1, 0,  b's', b'v', b'c', b'n', b'a', b't', 0, 0,
            6, 0, 2, 0,  b'c', 0, 0, 0,
            // NFTA_RULE_EXPRESSIONS (nested)
            52, 0, 4, 0x80,
              // NFTA_LIST_ELEM
              48, 0, 1, 0x80,
                // NFTA_EXPR_NAME "immediate"
                14, 0, 1, 0,  b'i', b'm', b'm', b'e', b'd', b'i', b'a', b't', b'e', 0, 0, 0,
                // NFTA_EXPR_DATA
                28, 0, 2, 0x80,
                  // NFTA_IMMEDIATE_DREG NFT_REG_VERDICT
                  8, 0, 1, 0,  0, 0, 0, 0,
                  // NFTA_IMMEDIATE_DATA { NFTA_DATA_VERDICT { NFTA_VERDICT_CODE NF_DROP } }
                  16, 0, 2, 0x80,
                    12, 0, 2, 0x80,
                      8, 0, 1, 0,  0, 0, 0, 0,
        ];
        assert_eq!(bytes[20..bytes.len() - 20], want[..]);
    }
}
