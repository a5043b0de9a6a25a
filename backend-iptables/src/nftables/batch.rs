//! `nft -f` transactions as nf_tables netlink batches, without the `nft` program.
//!
//! Before it evaluates any command, `nft` fetches the table's chains and sets (and for
//! `add rule`, more) into its cache: at 10,000 Services that is about 1 MB of netlink and
//! 70-100 ms, whatever the transaction holds (only a lone `flush chain` skips it), and it
//! then parses and evaluates the whole text. Every transaction the renderer makes (whole
//! tables, full syncs, cold-start blocks, partial syncs) is therefore written here
//! directly: the transaction text (which stays the debuggable form: golden files, `nft -c`,
//! `svcnat-ctl`) is translated command by command into the messages `nft` would send
//! (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_NEWTABLE`, `NEWCHAIN` with a base chain's hook,
//! `NEWSET` for sets and verdict maps with their user data (key byte order, comment), `NEWRULE`,
//! `DELRULE` for a flush of a chain or table, `NEWSETELEM`, `DELSETELEM` (a map or set
//! flush too), `DELCHAIN`, `DELSET`, `DELTABLE`, `NFNL_MSG_BATCH_END`), the expressions
//! exactly as `nft --debug=netlink` prints them for the same rule and the objects as
//! `nft --debug=mnl` shows their messages.
//!
//! The translation covers exactly the commands and rule statements the renderer writes
//! (see [`translate`]); anything else is [`Unsupported`] and the caller sends the text
//! through `nft -f` instead. The batch is one kernel transaction: a refused message
//! aborts all of it, and the kernel's reply names the message, hence the command (see
//! `Kernel::apply_batch`).
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
const MSG_NEWTABLE: u16 = 0;
const MSG_DELTABLE: u16 = 2;
/// `NFT_MSG_GETGEN`: a request after the batch, whose reply says all of the batch's
/// replies were read.
pub(crate) const MSG_GETGEN: u16 = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

/// `NFTA_CHAIN_*`, `NFTA_RULE_*`, `NFTA_SET_*`, `NFTA_SET_ELEM_LIST_*`, `NFTA_SET_ELEM_*`.
const TABLE_NAME: u16 = 1;
const TABLE_FLAGS: u16 = 2;
const TABLE_USERDATA: u16 = 6;
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
/// `NFTA_HOOK_HOOKNUM`, `NFTA_HOOK_PRIORITY`.
const HOOK_HOOKNUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_DATA_TYPE: u16 = 6;
const SET_DATA_LEN: u16 = 7;
const SET_TIMEOUT: u16 = 11;
const SET_ID: u16 = 10;
const SET_USERDATA: u16 = 13;
/// `NFT_DATA_VERDICT`: a verdict map's data type.
const DATA_TYPE_VERDICT: u32 = 0xffff_ff00;
/// User data types (`libnftnl`'s `NFTNL_UDATA_TABLE_COMMENT`, `NFTNL_UDATA_SET_*`).
const UDATA_TABLE_COMMENT: u8 = 0;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_COMMENT: u8 = 7;
const UDATA_SET_TYPEOF_EXPR: u8 = 0;
const UDATA_SET_TYPEOF_DATA: u8 = 1;
/// nft's `EXPR_CONCAT`.
const EXPR_CONCAT: u32 = 13;
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
/// `NFT_SET_MAP`.
const SET_F_MAP: u32 = 0x8;
/// `NFT_SET_TIMEOUT`, `NFT_SET_EVAL` (`flags dynamic,timeout`).
const SET_F_TIMEOUT: u32 = 0x10;
const SET_F_EVAL: u32 = 0x20;
/// nft's datatype numbers for set keys: `ipaddr` 7, `ip6addr` 8.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
/// `inet_proto` 12, `inet_service` 13.
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

/// Registers: `NFT_REG_VERDICT`, `NFT_REG_1`, `NFT_REG_2` (what `nft` allocates).
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// One nf_tables expression of a rule, as `nft --debug=netlink` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    /// `[ payload load LENb @ BASE header + OFFSET => reg DREG ]`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `[ cmp OP reg 1 DATA ]`.
    Cmp { op: u32, data: Vec<u8> },
    /// `[ bitwise reg 1 = ( reg 1 & MASK ) ^ XOR ]`.
    Bitwise { mask: Vec<u8>, xor: Vec<u8> },
    /// `[ meta load KEY => reg DREG ]`.
    Meta { key: u32, dreg: u32 },
    /// `[ meta set KEY with reg 1 ]`.
    MetaSet { key: u32 },
    /// `[ ct load KEY => reg 1 ]`.
    Ct { key: u32 },
    /// `[ numgen reg 1 = random mod M ]`.
    Numgen { modulus: u32 },
    /// `[ byteorder reg 1 = hton(reg 1, 4, 4) ]`.
    Hton32,
    /// `[ lookup reg 1 set NAME ]`, or with `dreg 0` (a verdict map).
    Lookup { set: String, dreg: Option<u32> },
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
    /// `[ reject type 0 code CODE ]` (ICMP or ICMPv6 port unreachable).
    Reject { code: u8 },
    /// `[ masq flags FLAGS ]` (no flags attribute when 0).
    Masq { flags: u32 },
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
/// `NFT_META_MARK`.
const META_MARK: u32 = 3;
/// `NFT_CT_STATE`, `NFT_CT_STATUS`.
const CT_STATE: u32 = 0;
const CT_STATUS: u32 = 2;
/// `NFT_REG32_00`: the first 32-bit register.
const REG32_00: u32 = 8;
/// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`.
const NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
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
        // Room for a typical rule or element: one allocation, not a growth per attribute.
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(&[nfproto, 0, 0, 0]);
        Attrs(v)
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
            Expr::Bitwise { .. } => "bitwise",
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Ct { .. } => "ct",
            Expr::Numgen { .. } => "numgen",
            Expr::Hton32 => "byteorder",
            Expr::Lookup { .. } => "lookup",
            Expr::DynsetUpdate { .. } => "dynset",
            Expr::FibSaddrType => "fib",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Dnat { .. } => "nat",
            Expr::Reject { .. } => "reject",
            Expr::Masq { .. } => "masq",
        };
        a.nest(LIST_ELEM, |a| {
            a.string(EXPR_NAME, name);
            a.nest(EXPR_DATA, |a| match self {
                // NFTA_PAYLOAD_DREG 1, BASE 2, OFFSET 3, LEN 4.
                Expr::Payload {
                    base,
                    offset,
                    len,
                    dreg,
                } => {
                    a.u32(1, *dreg);
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
                Expr::Bitwise { mask, xor } => {
                    a.u32(1, REG_1);
                    a.u32(2, REG_1);
                    a.u32(3, mask.len() as u32);
                    a.data_value(4, mask);
                    a.data_value(5, xor);
                }
                // NFTA_META_DREG 1, KEY 2, SREG 3.
                Expr::Meta { key, dreg } => {
                    a.u32(2, *key);
                    a.u32(1, *dreg);
                }
                Expr::MetaSet { key } => {
                    a.u32(2, *key);
                    a.u32(3, REG_1);
                }
                // NFTA_CT_DREG 1, KEY 2.
                Expr::Ct { key } => {
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
                // NFTA_LOOKUP_SET 1, SREG 2, DREG 3.
                Expr::Lookup { set, dreg } => {
                    a.string(1, set);
                    a.u32(2, REG_1);
                    if let Some(d) = dreg {
                        a.u32(3, *d);
                    }
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
                // NFTA_REJECT_TYPE 1 (NFT_REJECT_ICMP_UNREACH), ICMP_CODE 2 (one byte).
                Expr::Reject { code } => {
                    a.u32(1, 0);
                    a.put(2, &[*code]);
                }
                // NFTA_MASQ_FLAGS 1.
                Expr::Masq { flags } => {
                    if *flags != 0 {
                        a.u32(1, *flags);
                    }
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
        // `ip daddr . meta l4proto . th dport vmap @map`, `ip saddr . ip daddr @set`.
        if let Some((exprs, rest)) = concat_lookup(fam, w) {
            out.extend(exprs);
            w = rest;
            continue;
        }
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
                        dreg: REG_1,
                    });
                    out.push(Expr::Lookup {
                        set: name(set)?.into(),
                        dreg: None,
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
                out.push(Expr::Meta {
                    key: META_L4PROTO,
                    dreg: REG_1,
                });
                out.push(Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![proto],
                });
                out.push(Expr::Payload {
                    base: TRANSPORT,
                    offset: 2,
                    len: 2,
                    dreg: REG_1,
                });
                out.push(Expr::Cmp {
                    op: CMP_EQ,
                    data: port.to_be_bytes().to_vec(),
                });
                rest
            }
            ("meta", ["l4proto", p, rest @ ..]) => {
                out.push(Expr::Meta {
                    key: META_L4PROTO,
                    dreg: REG_1,
                });
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
                    dreg: REG_1,
                });
                out.push(Expr::DynsetUpdate { set: set.into() });
                rest
            }
            // `ct state new`, `ct state invalid`: a bit of the state, tested.
            ("ct", [key @ ("state" | "status"), value, rest @ ..]) => {
                let (ct_key, bits) = if *key == "state" {
                    (CT_STATE, ct_bits(value, CT_STATES)?)
                } else {
                    (CT_STATUS, ct_bits(value, CT_STATUSES)?)
                };
                out.push(Expr::Ct { key: ct_key });
                out.push(Expr::Bitwise {
                    mask: bits.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Expr::Cmp {
                    op: CMP_NEQ,
                    data: vec![0; 4],
                });
                rest
            }
            // `meta mark set meta mark or 0x4000` (`xor`, `and`): the mark, host byte order.
            ("meta", ["mark", "set", "meta", "mark", op, v, rest @ ..]) => {
                let v = number(v)?;
                let (mask, xor) = match *op {
                    "or" => (!v, v),
                    "xor" => (u32::MAX, v),
                    "and" => (v, 0),
                    _ => return None,
                };
                out.push(Expr::Meta {
                    key: META_MARK,
                    dreg: REG_1,
                });
                out.push(Expr::Bitwise {
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: xor.to_ne_bytes().to_vec(),
                });
                out.push(Expr::MetaSet { key: META_MARK });
                rest
            }
            // `meta mark & 0x4000 == 0`.
            ("meta", ["mark", "&", m, op @ ("==" | "!="), v, rest @ ..]) => {
                out.push(Expr::Meta {
                    key: META_MARK,
                    dreg: REG_1,
                });
                out.push(Expr::Bitwise {
                    mask: number(m)?.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Expr::Cmp {
                    op: if *op == "==" { CMP_EQ } else { CMP_NEQ },
                    data: number(v)?.to_ne_bytes().to_vec(),
                });
                rest
            }
            // `reject`: ICMP port unreachable, or ICMPv6's (admin-prohibited is `with`).
            ("reject", []) => {
                out.push(Expr::Reject {
                    code: match fam {
                        Fam::V4 => 3,
                        Fam::V6 => 4,
                    },
                });
                &[]
            }
            ("masquerade", []) => {
                out.push(Expr::Masq { flags: 0 });
                &[]
            }
            ("masquerade", ["fully-random"]) => {
                out.push(Expr::Masq {
                    flags: NAT_RANGE_PROTO_RANDOM_FULLY,
                });
                &[]
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

/// The register `nft` names for the 32-bit word `units` after register 1: a whole
/// 16-byte register when aligned (`reg 2` after an IPv6 address), else a 32-bit one
/// (`reg 9` after an IPv4 address), as its `netlink_put_register` converts them.
fn reg_after(units: u32) -> u32 {
    if units.is_multiple_of(4) {
        REG_1 + units / 4
    } else {
        REG32_00 + units
    }
}

/// One field of a concatenation: its load into register `dreg`, and its length.
fn concat_field<'w>(fam: Fam, w: &'w [&'w str], dreg: u32) -> Option<(Expr, u32, &'w [&'w str])> {
    match w {
        [f, dir @ ("saddr" | "daddr"), rest @ ..] if Fam::of(f) == Some(fam) => Some((
            Expr::Payload {
                base: NETWORK,
                offset: fam.addr_offset(*dir == "daddr"),
                len: fam.addr_len(),
                dreg,
            },
            fam.addr_len(),
            rest,
        )),
        ["meta", "l4proto", rest @ ..] => Some((
            Expr::Meta {
                key: META_L4PROTO,
                dreg,
            },
            1,
            rest,
        )),
        ["th", "dport", rest @ ..] => Some((
            Expr::Payload {
                base: TRANSPORT,
                offset: 2,
                len: 2,
                dreg,
            },
            2,
            rest,
        )),
        _ => None,
    }
}

/// A concatenation of at least two fields looked up in a set (`a . b @set`) or a verdict
/// map (`a . b vmap @map`, which ends the rule); `None` when `w` does not start with one.
fn concat_lookup<'w>(fam: Fam, w: &'w [&'w str]) -> Option<(Vec<Expr>, &'w [&'w str])> {
    let mut out = Vec::new();
    let mut units = 0u32;
    let mut w = w;
    loop {
        let (e, len, rest) = concat_field(fam, w, reg_after(units))?;
        out.push(e);
        units += len.div_ceil(4);
        match rest {
            [".", more @ ..] => w = more,
            _ => {
                w = rest;
                break;
            }
        }
    }
    if out.len() < 2 {
        return None;
    }
    let (vmap, set, rest) = match w {
        ["vmap", set, rest @ ..] => (true, set, rest),
        [set, rest @ ..] => (false, set, rest),
        [] => return None,
    };
    let set = name(set.strip_prefix('@')?)?;
    if vmap && !rest.is_empty() {
        return None;
    }
    out.push(Expr::Lookup {
        set: set.into(),
        dreg: vmap.then_some(REG_VERDICT),
    });
    Some((out, rest))
}

/// `ct state` and `ct status` bits by name (host byte order).
const CT_STATES: &[(&str, u32)] = &[
    ("invalid", 1),
    ("established", 2),
    ("related", 4),
    ("new", 8),
    ("untracked", 64),
];
const CT_STATUSES: &[(&str, u32)] = &[
    ("expected", 1),
    ("seen-reply", 2),
    ("assured", 4),
    ("confirmed", 8),
    ("snat", 0x10),
    ("dnat", 0x20),
];

/// `new` or `established,related`: the bits named.
fn ct_bits(value: &str, names: &[(&str, u32)]) -> Option<u32> {
    value.split(',').try_fold(0u32, |acc, v| {
        let (_, bit) = names.iter().find(|(n, _)| *n == v)?;
        Some(acc | bit)
    })
}

/// A number as the text writes it: `0x4000` or `16384`.
fn number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
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
            dreg: REG_1,
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
            dreg: REG_1,
        });
        let xor = vec![0; mask.len()];
        out.push(Expr::Bitwise { mask, xor });
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

/// Translates a transaction text into one batch: `add table T` (with a comment), `add
/// chain T C` (a base chain with its type, hook, numeric priority and policy), `add set`
/// and `add map` (keys of addresses, `inet_proto` and `inet_service` and their
/// concatenations, verdict data, `flags dynamic,timeout`, a timeout, a comment), `flush
/// table`, `flush chain`, `flush map`, `flush set`, `delete chain`, `delete set`, `delete
/// table`, `add rule T C ...` with the statements of the fixed chains (`ct state`, `ct
/// status`, concatenations looked up in sets and verdict maps, `meta mark`, `reject`,
/// `masquerade`) and of the `service-`, `local-`, `external-` and `firewall-` chains, and
/// `add element` / `delete element` (one message per element, so a refusal names the
/// element) with address, protocol and port keys and verdicts.
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
            // Only the line just read is searched for the end (the list is hundreds of
            // lines long).
            let mut closed = first.contains('}');
            while !closed {
                let Some(next) = lines.next() else {
                    return Err(unsupported());
                };
                closed = next.contains('}');
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
            ["flush", "table", fam, table] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).ok_or_else(unsupported)?;
                // Every rule of the table: a rule deletion naming the table only.
                let mut a = Attrs::message(fam.nfproto());
                a.string(RULE_TABLE, table);
                (MSG_DELRULE, 0, a.0)
            }
            ["flush", "map" | "set", fam, table, set] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).and(name(set)).ok_or_else(unsupported)?;
                // An element deletion without elements.
                let mut a = Attrs::message(fam.nfproto());
                a.string(ELEM_LIST_SET, set);
                a.string(ELEM_LIST_TABLE, table);
                (MSG_DELSETELEM, 0, a.0)
            }
            ["delete", "table", fam, table] => {
                let fam = Fam::of(fam).ok_or_else(unsupported)?;
                name(table).ok_or_else(unsupported)?;
                let mut a = Attrs::message(fam.nfproto());
                a.string(TABLE_NAME, table);
                (MSG_DELTABLE, 0, a.0)
            }
            ["add", "table" | "chain" | "set" | "map", ..] => {
                set_id += 1;
                object(line, set_id).ok_or_else(unsupported)?
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

/// The statements of a `{ ...; ... }` body (`body` follows the `{`): split at `;` outside
/// quotes, trimmed, empty ones dropped; `None` when a quote is left open or anything
/// follows the `}`.
fn body_statements(body: &str) -> Option<Vec<&str>> {
    let inner = body.trim().strip_suffix('}')?;
    let mut out = Vec::new();
    let mut quoted = false;
    let mut from = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(inner[from..i].trim());
                from = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    out.push(inner[from..].trim());
    out.retain(|s| !s.is_empty());
    Some(out)
}

/// A `comment "..."` statement's text, as nft stores it in the object's user data (with
/// its NUL); longer than nft takes (`NFTNL_UDATA_COMMENT_MAXLEN`, 128), it is `nft`'s to
/// refuse.
fn comment(stmt: &str) -> Option<&str> {
    let text = stmt
        .strip_prefix("comment")?
        .trim()
        .strip_prefix('"')?
        .strip_suffix('"')?;
    (!text.contains('"') && !text.contains('\0') && text.len() <= 128).then_some(text)
}

/// A user data TLV (`nftnl_udata`: one byte type, one byte length, the value).
fn udata(out: &mut Vec<u8>, kind: u8, value: &[u8]) -> Option<()> {
    out.push(kind);
    out.push(u8::try_from(value.len()).ok()?);
    out.extend_from_slice(value);
    Some(())
}

fn strz(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A set key's data type as nft numbers it, its length, and its byte order (nft's
/// `BYTEORDER_BIG_ENDIAN` 2, `BYTEORDER_HOST_ENDIAN` 1).
fn data_type(fam: Fam, word: &str) -> Option<(u32, u32, u32)> {
    match (fam, word) {
        (Fam::V4, "ipv4_addr") => Some((TYPE_IPADDR, 4, 2)),
        (Fam::V6, "ipv6_addr") => Some((TYPE_IP6ADDR, 16, 2)),
        (_, "inet_proto") => Some((TYPE_INET_PROTO, 1, 1)),
        (_, "inet_service") => Some((TYPE_INET_SERVICE, 2, 2)),
        _ => None,
    }
}

/// `add table`, `add chain` (a base chain too), `add set` and `add map` as the renderer
/// writes them, the messages as `nft --debug=mnl` shows them for the same command.
fn object(line: &str, set_id: u32) -> Option<(u16, u16, Vec<u8>)> {
    let (head, body) = match line.split_once('{') {
        Some((h, b)) => (h, Some(body_statements(b)?)),
        None => (line, None),
    };
    let head: Vec<&str> = head.split_whitespace().collect();
    let statements = body.unwrap_or_default();
    match head.as_slice() {
        ["add", "table", fam, table] => {
            let fam = Fam::of(fam)?;
            let mut a = Attrs::message(fam.nfproto());
            a.string(TABLE_NAME, name(table)?);
            a.u32(TABLE_FLAGS, 0);
            match statements.as_slice() {
                [] => {}
                [c] => {
                    let mut u = Vec::new();
                    udata(&mut u, UDATA_TABLE_COMMENT, &strz(comment(c)?))?;
                    a.put(TABLE_USERDATA, &u);
                }
                _ => return None,
            }
            Some((MSG_NEWTABLE, NLM_F_CREATE, a.0))
        }
        ["add", "chain", fam, table, chain] => {
            let fam = Fam::of(fam)?;
            let mut a = Attrs::message(fam.nfproto());
            a.string(CHAIN_TABLE, name(table)?);
            a.string(CHAIN_NAME, name(chain)?);
            match statements.as_slice() {
                [] => {}
                [base, rest @ ..] => {
                    let words: Vec<&str> = base.split_whitespace().collect();
                    let [
                        "type",
                        kind @ ("filter" | "nat"),
                        "hook",
                        hook,
                        "priority",
                        prio,
                    ] = words.as_slice()
                    else {
                        return None;
                    };
                    let hook: u32 = match *hook {
                        "prerouting" => 0,
                        "input" => 1,
                        "forward" => 2,
                        "output" => 3,
                        "postrouting" => 4,
                        _ => return None,
                    };
                    let prio: i32 = prio.parse().ok()?;
                    a.string(CHAIN_TYPE, kind);
                    a.nest(CHAIN_HOOK, |a| {
                        a.u32(HOOK_HOOKNUM, hook);
                        a.put(HOOK_PRIORITY, &prio.to_be_bytes());
                    });
                    match rest {
                        [] => {}
                        [p] => {
                            let verdict = match p.split_whitespace().collect::<Vec<_>>()[..] {
                                ["policy", "accept"] => NF_ACCEPT,
                                ["policy", "drop"] => NF_DROP,
                                _ => return None,
                            };
                            a.put(CHAIN_POLICY, &verdict.to_be_bytes());
                        }
                        _ => return None,
                    }
                }
            }
            Some((MSG_NEWCHAIN, NLM_F_CREATE, a.0))
        }
        ["add", kind @ ("set" | "map"), fam, table, set] => {
            let fam = Fam::of(fam)?;
            let map = *kind == "map";
            let mut key = None;
            let mut flags = 0u32;
            let mut timeout = None;
            let mut note = None;
            for st in &statements {
                if let Some(ty) = st.strip_prefix("type ") {
                    let ty = match (map, ty.rsplit_once(':')) {
                        (true, Some((k, "verdict"))) | (true, Some((k, " verdict"))) => k,
                        (false, None) => ty,
                        _ => return None,
                    };
                    let fields = ty
                        .split('.')
                        .map(|f| data_type(fam, f.trim()))
                        .collect::<Option<Vec<_>>>()?;
                    key = Some(fields);
                } else if let Some(f) = st.strip_prefix("flags ") {
                    for f in f.split(',') {
                        flags |= match f.trim() {
                            "dynamic" => SET_F_EVAL,
                            "timeout" => SET_F_TIMEOUT,
                            _ => return None,
                        };
                    }
                } else if let Some(t) = st.strip_prefix("timeout ") {
                    let secs: u64 = t.trim().strip_suffix('s')?.parse().ok()?;
                    timeout = Some(secs.checked_mul(1000)?);
                } else {
                    note = Some(comment(st)?);
                }
            }
            let key = key?;
            if map {
                flags |= SET_F_MAP;
            }
            // A concatenation's type: each field's type shifted in (`TYPE_BITS` 6); its
            // length: each field padded to 4 bytes.
            let (dtype, len) = match key.as_slice() {
                [(t, l, _)] => (*t, *l),
                many => many.iter().try_fold((0u32, 0u32), |(t, l), (ft, fl, _)| {
                    Some((t.checked_shl(6)? | ft, l + fl.next_multiple_of(4)))
                })?,
            };
            let mut a = Attrs::message(fam.nfproto());
            a.string(SET_TABLE, name(table)?);
            a.string(SET_NAME, name(set)?);
            a.u32(SET_FLAGS, flags);
            a.u32(SET_KEY_TYPE, dtype);
            a.u32(SET_KEY_LEN, len);
            if map {
                a.u32(SET_DATA_TYPE, DATA_TYPE_VERDICT);
                a.u32(SET_DATA_LEN, 0);
            }
            a.u32(SET_ID, set_id);
            if let Some(t) = timeout {
                a.u64(SET_TIMEOUT, t);
            }
            // User data: the key's byte order (none for a concatenation), a map's data's
            // (none for verdicts), a concatenation's expression type (`EXPR_CONCAT`, no
            // typeof data), the comment.
            let mut u = Vec::new();
            let order = match key.as_slice() {
                [(_, _, o)] => *o,
                _ => 0,
            };
            udata(&mut u, UDATA_SET_KEYBYTEORDER, &order.to_ne_bytes())?;
            if map {
                udata(&mut u, UDATA_SET_DATABYTEORDER, &0u32.to_ne_bytes())?;
            }
            if key.len() > 1 {
                let mut nest = Vec::new();
                udata(&mut nest, UDATA_SET_TYPEOF_EXPR, &EXPR_CONCAT.to_ne_bytes())?;
                udata(&mut nest, UDATA_SET_TYPEOF_DATA, &[])?;
                udata(&mut u, UDATA_SET_KEY_TYPEOF, &nest)?;
            }
            if let Some(c) = note {
                udata(&mut u, UDATA_SET_COMMENT, &strz(c))?;
            }
            a.put(SET_USERDATA, &u);
            Some((MSG_NEWSET, NLM_F_CREATE, a.0))
        }
        _ => None,
    }
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
    use std::collections::BTreeMap;

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
                    len: 4,
                    dreg: REG_1
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![10, 96, 19, 143]
                },
                Expr::Meta {
                    key: META_L4PROTO,
                    dreg: REG_1
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![6]
                },
                Expr::Payload {
                    base: TRANSPORT,
                    offset: 2,
                    len: 2,
                    dreg: REG_1
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![0, 80]
                },
                Expr::Payload {
                    base: NETWORK,
                    offset: 12,
                    len: 4,
                    dreg: REG_1
                },
                Expr::Bitwise {
                    mask: vec![0xff, 0xf0, 0, 0],
                    xor: vec![0; 4]
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
                Expr::Meta {
                    key: META_L4PROTO,
                    dreg: REG_1
                },
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
                    len: 4,
                    dreg: REG_1
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
                    len: 8,
                    dreg: REG_1
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
                    len: 3,
                    dreg: REG_1
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
            "ct state bogus jump endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @service-ips drop",
            "ip daddr . meta l4proto vmap service-ips",
            "ip daddr . vmap @service-ips",
            "masquerade random",
            "reject with tcp reset",
            "meta mark set meta mark nand 0x4000",
            "meta mark & 0x4000 < 0 return",
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
        for t in [
            "add chain ip svcnat nat-output { type nat hook outbound priority -100; }",
            "add chain ip svcnat nat-output { type route hook output priority -100; }",
            "add chain ip svcnat nat-output { type nat hook output priority dstnat; }",
            "add chain ip svcnat nat-output { type nat hook output priority -100; policy x; }",
            "add table ip svcnat { comment \"open; }",
            "add table ip svcnat { flags dormant; }",
            "add table inet svcnat",
            "add set ip svcnat s { type ipv4_addr; } x",
            "add set ip svcnat s { type ipv6_addr; }",
            "add set ip svcnat s { type ipv4_addr : verdict; }",
            "add map ip svcnat s { type ipv4_addr; }",
            "add map ip svcnat s { type ipv4_addr : ipv4_addr; }",
            "add set ip svcnat s { type ipv4_addr; flags interval; }",
            "add set ip svcnat s { comment \"no type\"; }",
            "flush ruleset",
        ] {
            assert!(translate(t).is_err(), "{t}");
        }
        let long = format!("add table ip svcnat {{ comment \"{}\"; }}", "x".repeat(129));
        assert!(translate(&long).is_err());
        assert!(translate(&long.replacen("xx", "", 1)).is_ok());
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
    /// The fixed rules of both families, as `nft --debug=netlink` (nft 1.0.6) printed them.
    #[test]
    fn fixed_rules_translate_as_nft_lists_them() {
        let ct_new = |target: &str| {
            // [ ct load state => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0x00000008 ) ^ 0x00000000 ]
            // [ cmp neq reg 1 0x00000000 ] [ immediate reg 0 jump -> TARGET ]
            vec![
                Expr::Ct { key: CT_STATE },
                Expr::Bitwise {
                    mask: vec![8, 0, 0, 0],
                    xor: vec![0; 4],
                },
                Expr::Cmp {
                    op: CMP_NEQ,
                    data: vec![0; 4],
                },
                Expr::Verdict(Verdict {
                    code: NFT_JUMP,
                    chain: Some(target.into()),
                }),
            ]
        };
        for fam in [Fam::V4, Fam::V6] {
            assert_eq!(
                rule_exprs(fam, &words("ct state new jump firewall-check")).unwrap(),
                ct_new("firewall-check")
            );
            let mut invalid = ct_new("x");
            invalid[1] = Expr::Bitwise {
                mask: vec![1, 0, 0, 0],
                xor: vec![0; 4],
            };
            invalid[3] = Expr::Verdict(Verdict {
                code: NF_DROP,
                chain: None,
            });
            assert_eq!(
                rule_exprs(fam, &words("ct state invalid drop")).unwrap(),
                invalid
            );
        }
        // [ payload load 4b @ network header + 16 => reg 1 ] [ meta load l4proto => reg 9 ]
        // [ payload load 2b @ transport header + 2 => reg 10 ]
        // [ lookup reg 1 set service-ips dreg 0 ]
        // ip6: [ payload load 16b @ network header + 24 => reg 1 ]
        // [ meta load l4proto => reg 2 ] [ payload load 2b @ transport header + 2 => reg 13 ]
        for (fam, text, len, regs) in [(Fam::V4, "ip", 4, [9, 10]), (Fam::V6, "ip6", 16, [2, 13])] {
            let e = rule_exprs(
                fam,
                &words(&format!(
                    "{text} daddr . meta l4proto . th dport vmap @service-ips"
                )),
            )
            .unwrap();
            assert_eq!(
                e,
                vec![
                    Expr::Payload {
                        base: NETWORK,
                        offset: fam.addr_offset(true),
                        len,
                        dreg: REG_1
                    },
                    Expr::Meta {
                        key: META_L4PROTO,
                        dreg: regs[0]
                    },
                    Expr::Payload {
                        base: TRANSPORT,
                        offset: 2,
                        len: 2,
                        dreg: regs[1]
                    },
                    Expr::Lookup {
                        set: "service-ips".into(),
                        dreg: Some(0)
                    },
                ]
            );
            // [ payload load 4b @ network header + 16 => reg 1 ] [ lookup reg 1 set nodeport-ips ]
            // [ meta load l4proto => reg 1 ] [ payload load 2b @ transport header + 2 => reg 9 ]
            // [ lookup reg 1 set service-nodeports dreg 0 ] (the same registers for ip6)
            let e = rule_exprs(
                fam,
                &words(&format!(
                    "{text} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
                )),
            )
            .unwrap();
            assert_eq!(
                e[1..],
                [
                    Expr::Lookup {
                        set: "nodeport-ips".into(),
                        dreg: None
                    },
                    Expr::Meta {
                        key: META_L4PROTO,
                        dreg: REG_1
                    },
                    Expr::Payload {
                        base: TRANSPORT,
                        offset: 2,
                        len: 2,
                        dreg: 9
                    },
                    Expr::Lookup {
                        set: "service-nodeports".into(),
                        dreg: Some(0)
                    },
                ]
            );
            // [ ct load status => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0x00000020 ) ^ 0x00000000 ]
            // [ cmp neq reg 1 0x00000000 ] [ payload load 4b @ network header + 12 => reg 1 ]
            // [ payload load 4b @ network header + 16 => reg 9 ] [ lookup reg 1 set hairpin ]
            // [ meta load mark => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000 ]
            // [ meta set mark with reg 1 ]; ip6: 16b @ + 8 => reg 1, 16b @ + 24 => reg 2.
            let e = rule_exprs(
                fam,
                &words(&format!(
                    "ct status dnat {text} saddr . {text} daddr @hairpin meta mark set meta mark or 0x4000"
                )),
            )
            .unwrap();
            assert_eq!(
                e,
                vec![
                    Expr::Ct { key: CT_STATUS },
                    Expr::Bitwise {
                        mask: vec![0x20, 0, 0, 0],
                        xor: vec![0; 4]
                    },
                    Expr::Cmp {
                        op: CMP_NEQ,
                        data: vec![0; 4]
                    },
                    Expr::Payload {
                        base: NETWORK,
                        offset: fam.addr_offset(false),
                        len,
                        dreg: REG_1
                    },
                    Expr::Payload {
                        base: NETWORK,
                        offset: fam.addr_offset(true),
                        len,
                        dreg: regs[0]
                    },
                    Expr::Lookup {
                        set: "hairpin".into(),
                        dreg: None
                    },
                    Expr::Meta {
                        key: META_MARK,
                        dreg: REG_1
                    },
                    Expr::Bitwise {
                        mask: vec![0xff, 0xbf, 0xff, 0xff],
                        xor: vec![0, 0x40, 0, 0]
                    },
                    Expr::MetaSet { key: META_MARK },
                ]
            );
        }
        // [ meta load mark => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]
        // [ cmp eq reg 1 0x00000000 ] [ immediate reg 0 return ]
        assert_eq!(
            rule_exprs(Fam::V4, &words("meta mark & 0x4000 == 0 return")).unwrap(),
            vec![
                Expr::Meta {
                    key: META_MARK,
                    dreg: REG_1
                },
                Expr::Bitwise {
                    mask: vec![0, 0x40, 0, 0],
                    xor: vec![0; 4]
                },
                Expr::Cmp {
                    op: CMP_EQ,
                    data: vec![0; 4]
                },
                Expr::Verdict(Verdict {
                    code: NFT_RETURN,
                    chain: None
                }),
            ]
        );
        // [ meta load mark => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0xffffffff ) ^ 0x00004000 ]
        // [ meta set mark with reg 1 ]
        assert_eq!(
            rule_exprs(Fam::V6, &words("meta mark set meta mark xor 0x4000")).unwrap()[1],
            Expr::Bitwise {
                mask: vec![0xff; 4],
                xor: vec![0, 0x40, 0, 0]
            }
        );
        // [ reject type 0 code 3 ], ip6: [ reject type 0 code 4 ]; [ masq flags 0x10 ].
        assert_eq!(
            rule_exprs(Fam::V4, &words("reject")).unwrap(),
            vec![Expr::Reject { code: 3 }]
        );
        assert_eq!(
            rule_exprs(Fam::V6, &words("reject")).unwrap(),
            vec![Expr::Reject { code: 4 }]
        );
        assert_eq!(
            rule_exprs(Fam::V4, &words("masquerade fully-random")).unwrap(),
            vec![Expr::Masq { flags: 0x10 }]
        );
        // [ immediate reg 0 jump -> services ]
        assert_eq!(
            rule_exprs(Fam::V4, &words("jump services")).unwrap(),
            vec![Expr::Verdict(Verdict {
                code: NFT_JUMP,
                chain: Some("services".into())
            })]
        );
    }

    /// The body of a command's message, without its netlink header.
    fn body(text: &str) -> Vec<u8> {
        let b = translate(text).unwrap();
        assert_eq!(b.commands().len(), 1, "{text}");
        b.commands()[0].msg.2.clone()
    }

    /// Attribute bytes: length, type, value, padding.
    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ((4 + value.len()) as u16).to_le_bytes().to_vec();
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(value);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn z(s: &str) -> Vec<u8> {
        strz(s)
    }

    /// Objects byte for byte as `nft --debug=mnl` (nft 1.0.6) showed their messages.
    #[test]
    fn fixed_objects_as_nft_sends_them() {
        // NFTA_TABLE_NAME, NFTA_TABLE_FLAGS 0, NFTA_TABLE_USERDATA: comment (0) of 47 bytes.
        let comment = "rules for svcnat, kube-proxy's nftables layout";
        let mut udata = vec![0, 47];
        udata.extend_from_slice(&z(comment));
        let want: Vec<u8> = [
            vec![2, 0, 0, 0],
            attr(1, &z("svcnat")),
            attr(2, &[0; 4]),
            attr(6, &udata),
        ]
        .concat();
        let text = format!("add table ip svcnat {{ comment \"{comment}\"; }}");
        assert_eq!(body(&text), want);
        let b = translate(&text).unwrap();
        assert_eq!(
            (b.commands()[0].msg.0, b.commands()[0].msg.1),
            (MSG_NEWTABLE, NLM_F_CREATE)
        );
        // A base chain: table, name, type "filter", hook { hooknum 0, priority -110 }.
        let mut hook = attr(1, &0u32.to_be_bytes());
        hook.extend(attr(2, &(-110i32).to_be_bytes()));
        let want: Vec<u8> = [
            vec![2, 0, 0, 0],
            attr(1, &z("svcnat")),
            attr(3, &z("filter-prerouting")),
            attr(7, &z("filter")),
            {
                let mut n = attr(4, &hook);
                n[3] |= 0x80;
                n
            },
        ]
        .concat();
        assert_eq!(
            body(
                "add chain ip svcnat filter-prerouting { type filter hook prerouting priority -110; }"
            ),
            want
        );
        // A set: flags 0, key type 7, length 4, id, user data: key byte order 2, comment.
        let mut udata = vec![0, 4, 2, 0, 0, 0, 7, 33];
        udata.extend_from_slice(&z("IPs that accept NodePort traffic"));
        let want: Vec<u8> = [
            vec![2, 0, 0, 0],
            attr(1, &z("svcnat")),
            attr(2, &z("nodeport-ips")),
            attr(3, &0u32.to_be_bytes()),
            attr(4, &7u32.to_be_bytes()),
            attr(5, &4u32.to_be_bytes()),
            attr(10, &1u32.to_be_bytes()),
            attr(13, &udata),
        ]
        .concat();
        assert_eq!(
            body(
                "add set ip svcnat nodeport-ips { type ipv4_addr; comment \"IPs that accept NodePort traffic\"; }"
            ),
            want
        );
        // A verdict map keyed by a concatenation: flags NFT_SET_MAP, key type 0x730d,
        // length 12, data NFT_DATA_VERDICT of length 0, user data: key and data byte
        // order 0, typeof { EXPR_CONCAT, no data }, comment.
        let mut udata = vec![
            0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0,
        ];
        udata.extend_from_slice(&[7, 17]);
        udata.extend_from_slice(&z("NodePort traffic"));
        let want: Vec<u8> = [
            vec![2, 0, 0, 0],
            attr(1, &z("svcnat")),
            attr(2, &z("service-ips")),
            attr(3, &8u32.to_be_bytes()),
            attr(4, &0x730du32.to_be_bytes()),
            attr(5, &12u32.to_be_bytes()),
            attr(6, &0xffff_ff00u32.to_be_bytes()),
            attr(7, &0u32.to_be_bytes()),
            attr(10, &1u32.to_be_bytes()),
            attr(13, &udata),
        ]
        .concat();
        assert_eq!(
            body(
                "add map ip svcnat service-ips { type ipv4_addr . inet_proto . inet_service : verdict; comment \"NodePort traffic\"; }"
            ),
            want
        );
        // `type ipv4_addr . ipv4_addr`: 0x1c7, 8 bytes; `inet_proto . inet_service`: 0x30d.
        let key = |text: &str| {
            let b = body(text);
            let mut at = 4;
            let mut found = BTreeMap::new();
            while at + 4 <= b.len() {
                let len = usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
                let kind = u16::from_le_bytes([b[at + 2], b[at + 3]]);
                found.insert(kind, b[at + 4..at + len].to_vec());
                at += len.next_multiple_of(4);
            }
            (found[&SET_KEY_TYPE].clone(), found[&SET_KEY_LEN].clone())
        };
        assert_eq!(
            key("add set ip svcnat hairpin { type ipv4_addr . ipv4_addr; }"),
            (0x1c7u32.to_be_bytes().to_vec(), 8u32.to_be_bytes().to_vec())
        );
        assert_eq!(
            key("add map ip svcnat snp { type inet_proto . inet_service : verdict; }"),
            (0x30du32.to_be_bytes().to_vec(), 8u32.to_be_bytes().to_vec())
        );
        // An affinity set: flags 0x30, timeout in ms after the id, key byte order 2.
        let want: Vec<u8> = [
            vec![2, 0, 0, 0],
            attr(1, &z("svcnat")),
            attr(2, &z("affinity-x")),
            attr(3, &0x30u32.to_be_bytes()),
            attr(4, &7u32.to_be_bytes()),
            attr(5, &4u32.to_be_bytes()),
            attr(10, &1u32.to_be_bytes()),
            attr(11, &10_800_000u64.to_be_bytes()),
            attr(13, &[0, 4, 2, 0, 0, 0]),
        ]
        .concat();
        assert_eq!(
            body(
                "add set ip svcnat affinity-x { type ipv4_addr; flags dynamic,timeout; timeout 10800s; }"
            ),
            want
        );
        // `flush table`: a rule deletion naming the table; `flush map`: an element
        // deletion naming the set and the table.
        let b = translate("flush table ip svcnat\nflush map ip svcnat service-ips").unwrap();
        let m: Vec<_> = b.commands().iter().map(|c| c.msg.clone()).collect();
        assert_eq!(
            m,
            vec![
                (
                    MSG_DELRULE,
                    0,
                    [vec![2, 0, 0, 0], attr(1, &z("svcnat"))].concat()
                ),
                (
                    MSG_DELSETELEM,
                    0,
                    [
                        vec![2, 0, 0, 0],
                        attr(2, &z("service-ips")),
                        attr(1, &z("svcnat"))
                    ]
                    .concat()
                ),
            ]
        );
    }
}
