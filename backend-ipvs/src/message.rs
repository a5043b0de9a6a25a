//! IPVS generic-netlink messages: commands and attributes as typed values with
//! `emit`/`parse`, in the style of the `netlink-packet-*` crates. No sockets here.
//!
//! The layout is the kernel's `include/uapi/linux/ip_vs.h` ("IPVS Generic Netlink interface
//! definitions") and the attribute policies of `net/netfilter/ipvs/ip_vs_ctl.c`:
//!
//! ```text
//! genlmsghdr { cmd: IPVS_CMD_*, version: 1, reserved: 0 }
//! IPVS_CMD_ATTR_SERVICE (nested) { AF u16, PROTOCOL u16, ADDR 4|16 bytes, PORT be16,
//!     FWMARK u32, SCHED_NAME string, FLAGS {flags u32, mask u32}, TIMEOUT u32,
//!     NETMASK be32, STATS/STATS64 (nested), PE_NAME string }
//! IPVS_CMD_ATTR_DEST (nested) { ADDR, PORT be16, FWD_METHOD u32, WEIGHT u32, U_THRESH u32,
//!     L_THRESH u32, ACTIVE/INACT/PERSIST_CONNS u32, STATS/STATS64, ADDR_FAMILY u16,
//!     TUN_TYPE u8, TUN_PORT be16, TUN_FLAGS u16 }
//! ```
//!
//! Integers are host byte order unless marked `be`. Attributes this module does not know are
//! kept as [`DefaultNla`] (`Other`) and emitted back unchanged, so a message parsed from a
//! newer kernel survives a round trip. [`IpvsMessage::parse_genl`] takes arbitrary bytes and
//! never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, emit_u16, emit_u16_be, emit_u32, emit_u32_be, emit_u64, parse_string,
    parse_u8, parse_u16, parse_u16_be, parse_u32, parse_u32_be, parse_u64,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

/// The generic-netlink family name (`IPVS_GENL_NAME`).
pub const IPVS_GENL_NAME: &str = "IPVS";
/// The family's protocol version (`IPVS_GENL_VERSION`).
pub const IPVS_GENL_VERSION: u8 = 1;

/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u16 = 17;
/// `IPPROTO_SCTP`.
pub const IPPROTO_SCTP: u16 = 132;

/// `IP_VS_SVC_F_PERSISTENT`: persistent port (client affinity).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service in its table.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`: one-packet scheduling (UDP).
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1`: scheduler flag 1 (`sh`: fallback; `mh`: fallback).
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2`: scheduler flag 2 (`sh`/`mh`: hash the port too).
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;

/// `IP_VS_CONN_F_MASQ`: forwarding by NAT (the only method kube-proxy uses).
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
/// `IP_VS_CONN_F_LOCALNODE`.
pub const IP_VS_CONN_F_LOCALNODE: u32 = 0x0001;
/// `IP_VS_CONN_F_TUNNEL`.
pub const IP_VS_CONN_F_TUNNEL: u32 = 0x0002;
/// `IP_VS_CONN_F_DROUTE`: direct routing.
pub const IP_VS_CONN_F_DROUTE: u32 = 0x0003;
/// `IP_VS_CONN_F_FWD_MASK`: the forwarding-method bits of a destination's flags.
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x0007;

/// `IP_VS_SCHEDNAME_MAXLEN`, including the terminating NUL.
pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;

/// A command of the IPVS family (`IPVS_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpvsCmd {
    /// `IPVS_CMD_NEW_SERVICE` (1): add a virtual service.
    NewService,
    /// `IPVS_CMD_SET_SERVICE` (2): modify a virtual service.
    SetService,
    /// `IPVS_CMD_DEL_SERVICE` (3): delete a virtual service.
    DelService,
    /// `IPVS_CMD_GET_SERVICE` (4): get one service, or dump all with `NLM_F_DUMP`.
    GetService,
    /// `IPVS_CMD_NEW_DEST` (5): add a destination (real server).
    NewDest,
    /// `IPVS_CMD_SET_DEST` (6): modify a destination.
    SetDest,
    /// `IPVS_CMD_DEL_DEST` (7): delete a destination.
    DelDest,
    /// `IPVS_CMD_GET_DEST` (8): dump a service's destinations.
    GetDest,
    /// `IPVS_CMD_NEW_DAEMON` (9): start the sync daemon.
    NewDaemon,
    /// `IPVS_CMD_DEL_DAEMON` (10): stop the sync daemon.
    DelDaemon,
    /// `IPVS_CMD_GET_DAEMON` (11): sync daemon status.
    GetDaemon,
    /// `IPVS_CMD_SET_CONFIG` (12): set timeouts (also the reply to `GET_CONFIG`).
    SetConfig,
    /// `IPVS_CMD_GET_CONFIG` (13): get timeouts.
    GetConfig,
    /// `IPVS_CMD_SET_INFO` (14): only used in the reply to `GET_INFO`.
    SetInfo,
    /// `IPVS_CMD_GET_INFO` (15): version and connection table size.
    GetInfo,
    /// `IPVS_CMD_ZERO` (16): zero all counters.
    Zero,
    /// `IPVS_CMD_FLUSH` (17): delete every service and destination.
    Flush,
    /// A command this module does not know (kept as its number).
    Other(u8),
}

impl From<IpvsCmd> for u8 {
    fn from(cmd: IpvsCmd) -> u8 {
        match cmd {
            IpvsCmd::NewService => 1,
            IpvsCmd::SetService => 2,
            IpvsCmd::DelService => 3,
            IpvsCmd::GetService => 4,
            IpvsCmd::NewDest => 5,
            IpvsCmd::SetDest => 6,
            IpvsCmd::DelDest => 7,
            IpvsCmd::GetDest => 8,
            IpvsCmd::NewDaemon => 9,
            IpvsCmd::DelDaemon => 10,
            IpvsCmd::GetDaemon => 11,
            IpvsCmd::SetConfig => 12,
            IpvsCmd::GetConfig => 13,
            IpvsCmd::SetInfo => 14,
            IpvsCmd::GetInfo => 15,
            IpvsCmd::Zero => 16,
            IpvsCmd::Flush => 17,
            IpvsCmd::Other(n) => n,
        }
    }
}

impl From<u8> for IpvsCmd {
    fn from(n: u8) -> IpvsCmd {
        match n {
            1 => IpvsCmd::NewService,
            2 => IpvsCmd::SetService,
            3 => IpvsCmd::DelService,
            4 => IpvsCmd::GetService,
            5 => IpvsCmd::NewDest,
            6 => IpvsCmd::SetDest,
            7 => IpvsCmd::DelDest,
            8 => IpvsCmd::GetDest,
            9 => IpvsCmd::NewDaemon,
            10 => IpvsCmd::DelDaemon,
            11 => IpvsCmd::GetDaemon,
            12 => IpvsCmd::SetConfig,
            13 => IpvsCmd::GetConfig,
            14 => IpvsCmd::SetInfo,
            15 => IpvsCmd::GetInfo,
            16 => IpvsCmd::Zero,
            17 => IpvsCmd::Flush,
            n => IpvsCmd::Other(n),
        }
    }
}

impl IpvsCmd {
    /// Whether the top-level attributes are `IPVS_INFO_ATTR_*` rather than `IPVS_CMD_ATTR_*`.
    fn carries_info(self) -> bool {
        matches!(self, IpvsCmd::SetInfo | IpvsCmd::GetInfo)
    }
}

// Attribute numbers (enums in ip_vs.h).
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_DAEMON: u16 = 3;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const SVC_ATTR_STATS: u16 = 10;
const SVC_ATTR_PE_NAME: u16 = 11;
const SVC_ATTR_STATS64: u16 = 12;

const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_STATS: u16 = 10;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;
const DEST_ATTR_STATS64: u16 = 12;
const DEST_ATTR_TUN_TYPE: u16 = 13;
const DEST_ATTR_TUN_PORT: u16 = 14;
const DEST_ATTR_TUN_FLAGS: u16 = 15;

const STATS_ATTR_CONNS: u16 = 1;
const STATS_ATTR_INPKTS: u16 = 2;
const STATS_ATTR_OUTPKTS: u16 = 3;
const STATS_ATTR_INBYTES: u16 = 4;
const STATS_ATTR_OUTBYTES: u16 = 5;
const STATS_ATTR_CPS: u16 = 6;
const STATS_ATTR_INPPS: u16 = 7;
const STATS_ATTR_OUTPPS: u16 = 8;
const STATS_ATTR_INBPS: u16 = 9;
const STATS_ATTR_OUTBPS: u16 = 10;

fn nested_len(attrs: &[impl Nla]) -> usize {
    attrs.iter().map(Emitable::buffer_len).sum()
}

fn emit_nested(attrs: &[impl Nla], buffer: &mut [u8]) {
    let mut at = 0;
    for a in attrs {
        let len = a.buffer_len();
        a.emit(&mut buffer[at..at + len]);
        at += len;
    }
}

fn parse_nested<T>(value: &[u8], what: &str) -> Result<Vec<T>, DecodeError>
where
    T: for<'b> Parseable<NlaBuffer<&'b [u8]>>,
{
    let mut out = Vec::new();
    for nla in NlasIterator::new(value) {
        let nla = nla.with_context(|| format!("invalid attribute in {what}"))?;
        out.push(T::parse(&nla).with_context(|| format!("in {what}"))?);
    }
    Ok(out)
}

fn parse_cstring(value: &[u8], what: &str) -> Result<String, DecodeError> {
    // NLA_NUL_STRING: the kernel sends a NUL terminator; accept its absence too.
    parse_string(value).with_context(|| format!("{what} is not UTF-8"))
}

fn exact<const N: usize>(value: &[u8], what: &str) -> Result<[u8; N], DecodeError> {
    value
        .try_into()
        .map_err(|_| DecodeError::from(format!("{what}: expected {N} bytes, got {}", value.len())))
}

/// A counter in a statistics attribute: 32-bit in `*_ATTR_STATS`, 64-bit in `*_ATTR_STATS64`
/// (and for the byte counters of `*_ATTR_STATS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A 32-bit value.
    U32(u32),
    /// A 64-bit value.
    U64(u64),
}

impl Counter {
    /// The value, widened.
    pub fn get(self) -> u64 {
        match self {
            Counter::U32(v) => u64::from(v),
            Counter::U64(v) => v,
        }
    }

    fn len(self) -> usize {
        match self {
            Counter::U32(_) => 4,
            Counter::U64(_) => 8,
        }
    }

    fn emit(self, buf: &mut [u8]) {
        // The buffers are sized by `len`, so the emitters cannot fail.
        let _ = match self {
            Counter::U32(v) => emit_u32(buf, v),
            Counter::U64(v) => emit_u64(buf, v),
        };
    }

    fn parse(value: &[u8], what: &str) -> Result<Counter, DecodeError> {
        match value.len() {
            4 => Ok(Counter::U32(parse_u32(value)?)),
            8 => Ok(Counter::U64(parse_u64(value)?)),
            n => Err(DecodeError::from(format!(
                "{what}: expected 4 or 8 bytes, got {n}"
            ))),
        }
    }
}

/// A statistics attribute (`IPVS_STATS_ATTR_*`), nested in a service's or destination's
/// `STATS` / `STATS64`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatsAttr {
    /// Connections scheduled.
    Conns(Counter),
    /// Incoming packets.
    InPkts(Counter),
    /// Outgoing packets.
    OutPkts(Counter),
    /// Incoming bytes.
    InBytes(Counter),
    /// Outgoing bytes.
    OutBytes(Counter),
    /// Current connection rate.
    Cps(Counter),
    /// Current incoming packet rate.
    InPps(Counter),
    /// Current outgoing packet rate.
    OutPps(Counter),
    /// Current incoming byte rate.
    InBps(Counter),
    /// Current outgoing byte rate.
    OutBps(Counter),
    /// Anything else (including `IPVS_STATS_ATTR_PAD`), kept as it came.
    Other(DefaultNla),
}

impl StatsAttr {
    fn counter(&self) -> Option<(u16, Counter)> {
        Some(match self {
            StatsAttr::Conns(c) => (STATS_ATTR_CONNS, *c),
            StatsAttr::InPkts(c) => (STATS_ATTR_INPKTS, *c),
            StatsAttr::OutPkts(c) => (STATS_ATTR_OUTPKTS, *c),
            StatsAttr::InBytes(c) => (STATS_ATTR_INBYTES, *c),
            StatsAttr::OutBytes(c) => (STATS_ATTR_OUTBYTES, *c),
            StatsAttr::Cps(c) => (STATS_ATTR_CPS, *c),
            StatsAttr::InPps(c) => (STATS_ATTR_INPPS, *c),
            StatsAttr::OutPps(c) => (STATS_ATTR_OUTPPS, *c),
            StatsAttr::InBps(c) => (STATS_ATTR_INBPS, *c),
            StatsAttr::OutBps(c) => (STATS_ATTR_OUTBPS, *c),
            StatsAttr::Other(_) => return None,
        })
    }
}

impl Nla for StatsAttr {
    fn value_len(&self) -> usize {
        match self {
            StatsAttr::Other(o) => o.value_len(),
            s => s.counter().map_or(0, |(_, c)| c.len()),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            StatsAttr::Other(o) => o.kind(),
            s => s.counter().map_or(0, |(k, _)| k),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            StatsAttr::Other(o) => o.emit_value(buffer),
            s => {
                if let Some((_, c)) = s.counter() {
                    c.emit(buffer);
                }
            }
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for StatsAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        let c = |what| Counter::parse(v, what);
        Ok(match buf.kind() {
            STATS_ATTR_CONNS => StatsAttr::Conns(c("IPVS_STATS_ATTR_CONNS")?),
            STATS_ATTR_INPKTS => StatsAttr::InPkts(c("IPVS_STATS_ATTR_INPKTS")?),
            STATS_ATTR_OUTPKTS => StatsAttr::OutPkts(c("IPVS_STATS_ATTR_OUTPKTS")?),
            STATS_ATTR_INBYTES => StatsAttr::InBytes(c("IPVS_STATS_ATTR_INBYTES")?),
            STATS_ATTR_OUTBYTES => StatsAttr::OutBytes(c("IPVS_STATS_ATTR_OUTBYTES")?),
            STATS_ATTR_CPS => StatsAttr::Cps(c("IPVS_STATS_ATTR_CPS")?),
            STATS_ATTR_INPPS => StatsAttr::InPps(c("IPVS_STATS_ATTR_INPPS")?),
            STATS_ATTR_OUTPPS => StatsAttr::OutPps(c("IPVS_STATS_ATTR_OUTPPS")?),
            STATS_ATTR_INBPS => StatsAttr::InBps(c("IPVS_STATS_ATTR_INBPS")?),
            STATS_ATTR_OUTBPS => StatsAttr::OutBps(c("IPVS_STATS_ATTR_OUTBPS")?),
            _ => StatsAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// `struct ip_vs_flags`: the flag bits to set and which bits the request touches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcFlags {
    /// Flag values (`IP_VS_SVC_F_*`).
    pub flags: u32,
    /// Which bits of `flags` apply.
    pub mask: u32,
}

/// An attribute of a virtual service (`IPVS_SVC_ATTR_*`), nested in `IPVS_CMD_ATTR_SERVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceAttr {
    /// Address family (`AF_INET` / `AF_INET6`).
    AddressFamily(u16),
    /// IP protocol number (TCP 6, UDP 17, SCTP 132).
    Protocol(u16),
    /// Virtual address: 4 bytes, or 16 (`union nf_inet_addr`, an IPv4 address in the first 4,
    /// as the kernel and ipvsadm send it). Read it with [`ServiceAttr::ip`].
    Address(Vec<u8>),
    /// Virtual port (sent in network byte order).
    Port(u16),
    /// Firewall mark (a service is keyed by it instead of address/port when non-zero).
    FwMark(u32),
    /// Scheduler name (`rr`, `wrr`, `lc`, `sh`, `mh`, ...).
    SchedName(String),
    /// Service flags and the mask of the bits to change.
    Flags(SvcFlags),
    /// Persistence timeout in seconds.
    Timeout(u32),
    /// Persistence netmask (big-endian mask for IPv4, prefix length for IPv6).
    Netmask(u32),
    /// 32-bit statistics (kernel replies only).
    Stats(Vec<StatsAttr>),
    /// Persistence engine name.
    PeName(String),
    /// 64-bit statistics (kernel replies only).
    Stats64(Vec<StatsAttr>),
    /// Anything else, kept as it came.
    Other(DefaultNla),
}

impl ServiceAttr {
    /// The address in `Address`, read according to `family` (`None` for another variant or a
    /// malformed length).
    pub fn ip(bytes: &[u8], family: u16) -> Option<IpAddr> {
        inet_addr(bytes, family)
    }
}

fn inet_addr(bytes: &[u8], family: u16) -> Option<IpAddr> {
    match family {
        AF_INET if bytes.len() >= 4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        AF_INET6 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The attribute bytes for an address, as `union nf_inet_addr` (16 bytes, IPv4 first).
pub fn inet_addr_bytes(ip: IpAddr) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    match ip {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b.copy_from_slice(&a.octets()),
    }
    b
}

/// The address family number of an address.
pub fn family_of(ip: IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn cstring_len(s: &str) -> usize {
    s.len() + 1
}

fn emit_cstring(s: &str, buf: &mut [u8]) {
    buf[..s.len()].copy_from_slice(s.as_bytes());
    buf[s.len()] = 0;
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            ServiceAttr::AddressFamily(_) | ServiceAttr::Protocol(_) | ServiceAttr::Port(_) => 2,
            ServiceAttr::FwMark(_) | ServiceAttr::Timeout(_) | ServiceAttr::Netmask(_) => 4,
            ServiceAttr::Address(a) => a.len(),
            ServiceAttr::SchedName(s) | ServiceAttr::PeName(s) => cstring_len(s),
            ServiceAttr::Flags(_) => 8,
            ServiceAttr::Stats(s) | ServiceAttr::Stats64(s) => nested_len(s),
            ServiceAttr::Other(o) => o.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            ServiceAttr::AddressFamily(_) => SVC_ATTR_AF,
            ServiceAttr::Protocol(_) => SVC_ATTR_PROTOCOL,
            ServiceAttr::Address(_) => SVC_ATTR_ADDR,
            ServiceAttr::Port(_) => SVC_ATTR_PORT,
            ServiceAttr::FwMark(_) => SVC_ATTR_FWMARK,
            ServiceAttr::SchedName(_) => SVC_ATTR_SCHED_NAME,
            ServiceAttr::Flags(_) => SVC_ATTR_FLAGS,
            ServiceAttr::Timeout(_) => SVC_ATTR_TIMEOUT,
            ServiceAttr::Netmask(_) => SVC_ATTR_NETMASK,
            ServiceAttr::Stats(_) => SVC_ATTR_STATS,
            ServiceAttr::PeName(_) => SVC_ATTR_PE_NAME,
            ServiceAttr::Stats64(_) => SVC_ATTR_STATS64,
            ServiceAttr::Other(o) => o.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // Every buffer here is exactly `value_len` long, so the emitters cannot fail.
        let _ = match self {
            ServiceAttr::AddressFamily(v) | ServiceAttr::Protocol(v) => emit_u16(buffer, *v),
            ServiceAttr::Port(v) => emit_u16_be(buffer, *v),
            ServiceAttr::FwMark(v) | ServiceAttr::Timeout(v) => emit_u32(buffer, *v),
            ServiceAttr::Netmask(v) => emit_u32_be(buffer, *v),
            ServiceAttr::Address(a) => {
                buffer.copy_from_slice(a);
                Ok(())
            }
            ServiceAttr::SchedName(s) | ServiceAttr::PeName(s) => {
                emit_cstring(s, buffer);
                Ok(())
            }
            ServiceAttr::Flags(f) => emit_u32(&mut buffer[..4], f.flags)
                .and_then(|()| emit_u32(&mut buffer[4..], f.mask)),
            ServiceAttr::Stats(s) | ServiceAttr::Stats64(s) => {
                emit_nested(s, buffer);
                Ok(())
            }
            ServiceAttr::Other(o) => {
                o.emit_value(buffer);
                Ok(())
            }
        };
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            SVC_ATTR_AF => {
                ServiceAttr::AddressFamily(parse_u16(v).context("invalid IPVS_SVC_ATTR_AF")?)
            }
            SVC_ATTR_PROTOCOL => {
                ServiceAttr::Protocol(parse_u16(v).context("invalid IPVS_SVC_ATTR_PROTOCOL")?)
            }
            SVC_ATTR_ADDR => {
                if v.len() != 4 && v.len() != 16 {
                    return Err(DecodeError::from(format!(
                        "IPVS_SVC_ATTR_ADDR: expected 4 or 16 bytes, got {}",
                        v.len()
                    )));
                }
                ServiceAttr::Address(v.to_vec())
            }
            SVC_ATTR_PORT => {
                ServiceAttr::Port(parse_u16_be(v).context("invalid IPVS_SVC_ATTR_PORT")?)
            }
            SVC_ATTR_FWMARK => {
                ServiceAttr::FwMark(parse_u32(v).context("invalid IPVS_SVC_ATTR_FWMARK")?)
            }
            SVC_ATTR_SCHED_NAME => {
                ServiceAttr::SchedName(parse_cstring(v, "IPVS_SVC_ATTR_SCHED_NAME")?)
            }
            SVC_ATTR_FLAGS => {
                let b: [u8; 8] = exact(v, "IPVS_SVC_ATTR_FLAGS")?;
                ServiceAttr::Flags(SvcFlags {
                    flags: parse_u32(&b[..4])?,
                    mask: parse_u32(&b[4..])?,
                })
            }
            SVC_ATTR_TIMEOUT => {
                ServiceAttr::Timeout(parse_u32(v).context("invalid IPVS_SVC_ATTR_TIMEOUT")?)
            }
            SVC_ATTR_NETMASK => {
                ServiceAttr::Netmask(parse_u32_be(v).context("invalid IPVS_SVC_ATTR_NETMASK")?)
            }
            SVC_ATTR_STATS => ServiceAttr::Stats(parse_nested(v, "IPVS_SVC_ATTR_STATS")?),
            SVC_ATTR_PE_NAME => ServiceAttr::PeName(parse_cstring(v, "IPVS_SVC_ATTR_PE_NAME")?),
            SVC_ATTR_STATS64 => ServiceAttr::Stats64(parse_nested(v, "IPVS_SVC_ATTR_STATS64")?),
            _ => ServiceAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// An attribute of a destination (`IPVS_DEST_ATTR_*`), nested in `IPVS_CMD_ATTR_DEST`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestAttr {
    /// Real server address (4 or 16 bytes; see [`ServiceAttr::Address`]).
    Address(Vec<u8>),
    /// Real server port (network byte order on the wire).
    Port(u16),
    /// Forwarding method (`IP_VS_CONN_F_MASQ`, ...), the `IP_VS_CONN_F_FWD_MASK` bits.
    FwdMethod(u32),
    /// Weight; 0 takes no new connections (drained).
    Weight(u32),
    /// Upper connection threshold (0: none).
    UpperThreshold(u32),
    /// Lower connection threshold.
    LowerThreshold(u32),
    /// Active connections (kernel replies).
    ActiveConns(u32),
    /// Inactive connections (kernel replies).
    InactiveConns(u32),
    /// Persistent connection templates (kernel replies).
    PersistConns(u32),
    /// 32-bit statistics (kernel replies).
    Stats(Vec<StatsAttr>),
    /// Address family of the destination (may differ from the service's for tunnels).
    AddressFamily(u16),
    /// 64-bit statistics (kernel replies).
    Stats64(Vec<StatsAttr>),
    /// Tunnel type (IPIP, GUE, GRE).
    TunType(u8),
    /// Tunnel port (network byte order on the wire).
    TunPort(u16),
    /// Tunnel encapsulation flags.
    TunFlags(u16),
    /// Anything else, kept as it came.
    Other(DefaultNla),
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            DestAttr::Address(a) => a.len(),
            DestAttr::Port(_)
            | DestAttr::AddressFamily(_)
            | DestAttr::TunPort(_)
            | DestAttr::TunFlags(_) => 2,
            DestAttr::TunType(_) => 1,
            DestAttr::FwdMethod(_)
            | DestAttr::Weight(_)
            | DestAttr::UpperThreshold(_)
            | DestAttr::LowerThreshold(_)
            | DestAttr::ActiveConns(_)
            | DestAttr::InactiveConns(_)
            | DestAttr::PersistConns(_) => 4,
            DestAttr::Stats(s) | DestAttr::Stats64(s) => nested_len(s),
            DestAttr::Other(o) => o.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DestAttr::Address(_) => DEST_ATTR_ADDR,
            DestAttr::Port(_) => DEST_ATTR_PORT,
            DestAttr::FwdMethod(_) => DEST_ATTR_FWD_METHOD,
            DestAttr::Weight(_) => DEST_ATTR_WEIGHT,
            DestAttr::UpperThreshold(_) => DEST_ATTR_U_THRESH,
            DestAttr::LowerThreshold(_) => DEST_ATTR_L_THRESH,
            DestAttr::ActiveConns(_) => DEST_ATTR_ACTIVE_CONNS,
            DestAttr::InactiveConns(_) => DEST_ATTR_INACT_CONNS,
            DestAttr::PersistConns(_) => DEST_ATTR_PERSIST_CONNS,
            DestAttr::Stats(_) => DEST_ATTR_STATS,
            DestAttr::AddressFamily(_) => DEST_ATTR_ADDR_FAMILY,
            DestAttr::Stats64(_) => DEST_ATTR_STATS64,
            DestAttr::TunType(_) => DEST_ATTR_TUN_TYPE,
            DestAttr::TunPort(_) => DEST_ATTR_TUN_PORT,
            DestAttr::TunFlags(_) => DEST_ATTR_TUN_FLAGS,
            DestAttr::Other(o) => o.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // Every buffer here is exactly `value_len` long, so the emitters cannot fail.
        let _ = match self {
            DestAttr::Address(a) => {
                buffer.copy_from_slice(a);
                Ok(())
            }
            DestAttr::Port(v) | DestAttr::TunPort(v) => emit_u16_be(buffer, *v),
            DestAttr::AddressFamily(v) | DestAttr::TunFlags(v) => emit_u16(buffer, *v),
            DestAttr::TunType(v) => {
                buffer[0] = *v;
                Ok(())
            }
            DestAttr::FwdMethod(v)
            | DestAttr::Weight(v)
            | DestAttr::UpperThreshold(v)
            | DestAttr::LowerThreshold(v)
            | DestAttr::ActiveConns(v)
            | DestAttr::InactiveConns(v)
            | DestAttr::PersistConns(v) => emit_u32(buffer, *v),
            DestAttr::Stats(s) | DestAttr::Stats64(s) => {
                emit_nested(s, buffer);
                Ok(())
            }
            DestAttr::Other(o) => {
                o.emit_value(buffer);
                Ok(())
            }
        };
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        let u32_of = |what: &str| parse_u32(v).with_context(|| format!("invalid {what}"));
        Ok(match buf.kind() {
            DEST_ATTR_ADDR => {
                if v.len() != 4 && v.len() != 16 {
                    return Err(DecodeError::from(format!(
                        "IPVS_DEST_ATTR_ADDR: expected 4 or 16 bytes, got {}",
                        v.len()
                    )));
                }
                DestAttr::Address(v.to_vec())
            }
            DEST_ATTR_PORT => {
                DestAttr::Port(parse_u16_be(v).context("invalid IPVS_DEST_ATTR_PORT")?)
            }
            DEST_ATTR_FWD_METHOD => DestAttr::FwdMethod(u32_of("IPVS_DEST_ATTR_FWD_METHOD")?),
            DEST_ATTR_WEIGHT => DestAttr::Weight(u32_of("IPVS_DEST_ATTR_WEIGHT")?),
            DEST_ATTR_U_THRESH => DestAttr::UpperThreshold(u32_of("IPVS_DEST_ATTR_U_THRESH")?),
            DEST_ATTR_L_THRESH => DestAttr::LowerThreshold(u32_of("IPVS_DEST_ATTR_L_THRESH")?),
            DEST_ATTR_ACTIVE_CONNS => DestAttr::ActiveConns(u32_of("IPVS_DEST_ATTR_ACTIVE_CONNS")?),
            DEST_ATTR_INACT_CONNS => DestAttr::InactiveConns(u32_of("IPVS_DEST_ATTR_INACT_CONNS")?),
            DEST_ATTR_PERSIST_CONNS => {
                DestAttr::PersistConns(u32_of("IPVS_DEST_ATTR_PERSIST_CONNS")?)
            }
            DEST_ATTR_STATS => DestAttr::Stats(parse_nested(v, "IPVS_DEST_ATTR_STATS")?),
            DEST_ATTR_ADDR_FAMILY => {
                DestAttr::AddressFamily(parse_u16(v).context("invalid IPVS_DEST_ATTR_ADDR_FAMILY")?)
            }
            DEST_ATTR_STATS64 => DestAttr::Stats64(parse_nested(v, "IPVS_DEST_ATTR_STATS64")?),
            DEST_ATTR_TUN_TYPE => {
                DestAttr::TunType(parse_u8(v).context("invalid IPVS_DEST_ATTR_TUN_TYPE")?)
            }
            DEST_ATTR_TUN_PORT => {
                DestAttr::TunPort(parse_u16_be(v).context("invalid IPVS_DEST_ATTR_TUN_PORT")?)
            }
            DEST_ATTR_TUN_FLAGS => {
                DestAttr::TunFlags(parse_u16(v).context("invalid IPVS_DEST_ATTR_TUN_FLAGS")?)
            }
            _ => DestAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// A top-level attribute of an IPVS message: `IPVS_CMD_ATTR_*`, or `IPVS_INFO_ATTR_*` in
/// `GET_INFO`/`SET_INFO` messages.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IpvsAttr {
    /// `IPVS_CMD_ATTR_SERVICE`: a nested service.
    Service(Vec<ServiceAttr>),
    /// `IPVS_CMD_ATTR_DEST`: a nested destination.
    Dest(Vec<DestAttr>),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP` in seconds.
    TimeoutTcp(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN` in seconds.
    TimeoutTcpFin(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_UDP` in seconds.
    TimeoutUdp(u32),
    /// `IPVS_INFO_ATTR_VERSION`: IPVS version, `0x010201` for 1.2.1.
    InfoVersion(u32),
    /// `IPVS_INFO_ATTR_CONN_TAB_SIZE`: connection hash table size.
    InfoConnTabSize(u32),
    /// Anything else (including `IPVS_CMD_ATTR_DAEMON`), kept as it came.
    Other(DefaultNla),
}

impl Nla for IpvsAttr {
    fn value_len(&self) -> usize {
        match self {
            IpvsAttr::Service(s) => nested_len(s),
            IpvsAttr::Dest(d) => nested_len(d),
            IpvsAttr::TimeoutTcp(_)
            | IpvsAttr::TimeoutTcpFin(_)
            | IpvsAttr::TimeoutUdp(_)
            | IpvsAttr::InfoVersion(_)
            | IpvsAttr::InfoConnTabSize(_) => 4,
            IpvsAttr::Other(o) => o.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            IpvsAttr::Service(_) => CMD_ATTR_SERVICE,
            IpvsAttr::Dest(_) => CMD_ATTR_DEST,
            IpvsAttr::TimeoutTcp(_) => CMD_ATTR_TIMEOUT_TCP,
            IpvsAttr::TimeoutTcpFin(_) => CMD_ATTR_TIMEOUT_TCP_FIN,
            IpvsAttr::TimeoutUdp(_) => CMD_ATTR_TIMEOUT_UDP,
            IpvsAttr::InfoVersion(_) => INFO_ATTR_VERSION,
            IpvsAttr::InfoConnTabSize(_) => INFO_ATTR_CONN_TAB_SIZE,
            IpvsAttr::Other(o) => o.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            IpvsAttr::Service(s) => emit_nested(s, buffer),
            IpvsAttr::Dest(d) => emit_nested(d, buffer),
            IpvsAttr::TimeoutTcp(v)
            | IpvsAttr::TimeoutTcpFin(v)
            | IpvsAttr::TimeoutUdp(v)
            | IpvsAttr::InfoVersion(v)
            | IpvsAttr::InfoConnTabSize(v) => {
                // The buffer is exactly 4 bytes.
                let _ = emit_u32(buffer, *v);
            }
            IpvsAttr::Other(o) => o.emit_value(buffer),
        }
    }
}

impl IpvsAttr {
    fn parse_for(nla: &NlaBuffer<&[u8]>, cmd: IpvsCmd) -> Result<IpvsAttr, DecodeError> {
        let v = nla.value();
        if cmd.carries_info() {
            return Ok(match nla.kind() {
                INFO_ATTR_VERSION => {
                    IpvsAttr::InfoVersion(parse_u32(v).context("invalid IPVS_INFO_ATTR_VERSION")?)
                }
                INFO_ATTR_CONN_TAB_SIZE => IpvsAttr::InfoConnTabSize(
                    parse_u32(v).context("invalid IPVS_INFO_ATTR_CONN_TAB_SIZE")?,
                ),
                _ => IpvsAttr::Other(DefaultNla::parse(nla)?),
            });
        }
        Ok(match nla.kind() {
            CMD_ATTR_SERVICE => IpvsAttr::Service(parse_nested(v, "IPVS_CMD_ATTR_SERVICE")?),
            CMD_ATTR_DEST => IpvsAttr::Dest(parse_nested(v, "IPVS_CMD_ATTR_DEST")?),
            CMD_ATTR_TIMEOUT_TCP => {
                IpvsAttr::TimeoutTcp(parse_u32(v).context("invalid IPVS_CMD_ATTR_TIMEOUT_TCP")?)
            }
            CMD_ATTR_TIMEOUT_TCP_FIN => IpvsAttr::TimeoutTcpFin(
                parse_u32(v).context("invalid IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")?,
            ),
            CMD_ATTR_TIMEOUT_UDP => {
                IpvsAttr::TimeoutUdp(parse_u32(v).context("invalid IPVS_CMD_ATTR_TIMEOUT_UDP")?)
            }
            // IPVS_CMD_ATTR_DAEMON (sync daemon) is not used by this backend: kept raw.
            CMD_ATTR_DAEMON => IpvsAttr::Other(DefaultNla::parse(nla)?),
            _ => IpvsAttr::Other(DefaultNla::parse(nla)?),
        })
    }
}

/// One IPVS generic-netlink message: the command and its top-level attributes. It is the
/// payload type of [`GenlMessage`] (`GenlMessage<IpvsMessage>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    /// The command (`genlmsghdr.cmd`).
    pub cmd: IpvsCmd,
    /// The attributes, in wire order.
    pub attrs: Vec<IpvsAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd.into()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        nested_len(&self.attrs)
    }

    fn emit(&self, buffer: &mut [u8]) {
        emit_nested(&self.attrs, buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let cmd = IpvsCmd::from(header.cmd);
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla = nla.context("invalid IPVS attribute")?;
            attrs.push(IpvsAttr::parse_for(&nla, cmd)?);
        }
        Ok(IpvsMessage { cmd, attrs })
    }
}

impl IpvsMessage {
    /// A message with a command and attributes.
    pub fn new(cmd: IpvsCmd, attrs: Vec<IpvsAttr>) -> IpvsMessage {
        IpvsMessage { cmd, attrs }
    }

    /// Parses a generic-netlink payload (the bytes after `nlmsghdr`: `genlmsghdr` and the
    /// attributes). Never panics; any malformed input is an error naming the attribute.
    pub fn parse_genl(buf: &[u8]) -> Result<GenlMessage<IpvsMessage>, DecodeError> {
        GenlMessage::<IpvsMessage>::parse_with_param(buf, 0)
    }

    /// Emits the generic-netlink payload (`genlmsghdr` and attributes), the inverse of
    /// [`IpvsMessage::parse_genl`].
    pub fn to_genl_bytes(&self) -> Vec<u8> {
        let msg = GenlMessage::from_payload(self.clone());
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        buf
    }

    /// The nested services in the message.
    pub fn services(&self) -> impl Iterator<Item = &[ServiceAttr]> {
        self.attrs.iter().filter_map(|a| match a {
            IpvsAttr::Service(s) => Some(s.as_slice()),
            _ => None,
        })
    }

    /// The nested destinations in the message.
    pub fn dests(&self) -> impl Iterator<Item = &[DestAttr]> {
        self.attrs.iter().filter_map(|a| match a {
            IpvsAttr::Dest(d) => Some(d.as_slice()),
            _ => None,
        })
    }
}

/// What identifies a virtual service: address family, protocol, address and port (the
/// firewall-mark form is not used by this backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Virtual address (its family is the service's).
    pub addr: IpAddr,
    /// IP protocol number.
    pub protocol: u16,
    /// Virtual port.
    pub port: u16,
}

impl ServiceKey {
    /// The identifying attributes, as `IPVS_CMD_ATTR_SERVICE` needs them for DEL/GET/DEST
    /// commands.
    pub fn attrs(&self) -> Vec<ServiceAttr> {
        vec![
            ServiceAttr::AddressFamily(family_of(self.addr)),
            ServiceAttr::Protocol(self.protocol),
            ServiceAttr::Address(inet_addr_bytes(self.addr)),
            ServiceAttr::Port(self.port),
        ]
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            IPPROTO_TCP => "TCP",
            IPPROTO_UDP => "UDP",
            IPPROTO_SCTP => "SCTP",
            _ => "proto",
        };
        write!(
            f,
            "{proto} {}",
            std::net::SocketAddr::new(self.addr, self.port)
        )
    }
}

/// A virtual service as the kernel holds it (typed view of `IPVS_CMD_ATTR_SERVICE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Identity.
    pub key: ServiceKey,
    /// Scheduler name.
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` flags.
    pub flags: u32,
    /// Persistence timeout in seconds (meaningful with `IP_VS_SVC_F_PERSISTENT`).
    pub timeout: u32,
    /// Persistence netmask (big-endian mask for IPv4, prefix length for IPv6).
    pub netmask: u32,
}

impl Service {
    /// The attributes for `NEW_SERVICE` / `SET_SERVICE`.
    pub fn attrs(&self) -> Vec<ServiceAttr> {
        let mut a = self.key.attrs();
        a.push(ServiceAttr::SchedName(self.scheduler.clone()));
        a.push(ServiceAttr::Flags(SvcFlags {
            flags: self.flags,
            mask: u32::MAX,
        }));
        a.push(ServiceAttr::Timeout(self.timeout));
        a.push(ServiceAttr::Netmask(self.netmask));
        a
    }

    /// Reads a service from its attributes (a `GET_SERVICE` reply); `None` for a
    /// firewall-mark service or one missing its address, protocol or port.
    pub fn from_attrs(attrs: &[ServiceAttr]) -> Option<Service> {
        let mut family = None;
        let mut protocol = None;
        let mut addr: Option<&[u8]> = None;
        let mut port = None;
        let mut svc = Service {
            key: ServiceKey {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                protocol: 0,
                port: 0,
            },
            scheduler: String::new(),
            flags: 0,
            timeout: 0,
            netmask: 0,
        };
        for a in attrs {
            match a {
                ServiceAttr::AddressFamily(f) => family = Some(*f),
                ServiceAttr::Protocol(p) => protocol = Some(*p),
                ServiceAttr::Address(b) => addr = Some(b),
                ServiceAttr::Port(p) => port = Some(*p),
                ServiceAttr::FwMark(m) if *m != 0 => return None,
                ServiceAttr::SchedName(s) => svc.scheduler = s.clone(),
                ServiceAttr::Flags(f) => svc.flags = f.flags,
                ServiceAttr::Timeout(t) => svc.timeout = *t,
                ServiceAttr::Netmask(m) => svc.netmask = *m,
                _ => {}
            }
        }
        svc.key = ServiceKey {
            addr: inet_addr(addr?, family?)?,
            protocol: protocol?,
            port: port?,
        };
        Some(svc)
    }
}

/// A destination (real server) of a service (typed view of `IPVS_CMD_ATTR_DEST`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// Forwarding method (`IP_VS_CONN_F_MASQ` for NAT).
    pub fwd_method: u32,
    /// Weight; 0 is drained.
    pub weight: u32,
    /// Active connections (from the kernel; ignored when emitting).
    pub active_conns: u32,
    /// Inactive connections (from the kernel; ignored when emitting).
    pub inactive_conns: u32,
}

impl Destination {
    /// The attributes for `NEW_DEST` / `SET_DEST` (`DEL_DEST` needs only address and port).
    pub fn attrs(&self) -> Vec<DestAttr> {
        vec![
            DestAttr::AddressFamily(family_of(self.addr)),
            DestAttr::Address(inet_addr_bytes(self.addr)),
            DestAttr::Port(self.port),
            DestAttr::FwdMethod(self.fwd_method),
            DestAttr::Weight(self.weight),
            DestAttr::UpperThreshold(0),
            DestAttr::LowerThreshold(0),
        ]
    }

    /// The identifying attributes, for `DEL_DEST`.
    pub fn key_attrs(&self) -> Vec<DestAttr> {
        vec![
            DestAttr::AddressFamily(family_of(self.addr)),
            DestAttr::Address(inet_addr_bytes(self.addr)),
            DestAttr::Port(self.port),
        ]
    }

    /// Reads a destination from its attributes; `service_family` is used when the kernel
    /// sends no `ADDR_FAMILY` (kernels before 4.14). `None` when address or port is missing.
    pub fn from_attrs(attrs: &[DestAttr], service_family: u16) -> Option<Destination> {
        let mut family = service_family;
        let mut addr: Option<&[u8]> = None;
        let mut port = None;
        let mut d = Destination {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
            fwd_method: 0,
            weight: 0,
            active_conns: 0,
            inactive_conns: 0,
        };
        for a in attrs {
            match a {
                DestAttr::Address(b) => addr = Some(b),
                DestAttr::Port(p) => port = Some(*p),
                DestAttr::AddressFamily(f) => family = *f,
                DestAttr::FwdMethod(m) => d.fwd_method = *m & IP_VS_CONN_F_FWD_MASK,
                DestAttr::Weight(w) => d.weight = *w,
                DestAttr::ActiveConns(c) => d.active_conns = *c,
                DestAttr::InactiveConns(c) => d.inactive_conns = *c,
                _ => {}
            }
        }
        d.addr = inet_addr(addr?, family)?;
        d.port = port?;
        Some(d)
    }
}

#[cfg(test)]
mod captured;
#[cfg(test)]
mod tests;
