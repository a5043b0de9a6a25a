//! IPv6 neighbour discovery (RFC 4861), the IPv6 side of what ARP does for IPv4: Neighbor
//! Solicitations for the addresses the engine answers for are answered, neighbours are
//! learnt from solicitations and advertisements into the one neighbour table, and unknown
//! next hops are resolved with a multicast solicitation to their solicited-node address.
//!
//! The ICMPv6 and NDP wire formats (options, flags, checksum) are smoltcp's `wire` views
//! and representations; the engine only decides what to answer and whom to learn.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Packet, Icmpv6Repr,
    IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
};

use super::wire::{ETH_LEN, Frag, PROTO_ICMPV6, parse_ip, rd8};
use super::{DropReason, Engine, PortConfig, Snapshot, TxFrame, Verdict};

/// ICMPv6 type of a Neighbor Solicitation.
const NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 type of a Neighbor Advertisement.
const NEIGHBOR_ADVERT: u8 = 136;
/// RFC 4861 7.1: NDP messages are sent with hop limit 255, and a received one with any
/// other value may have crossed a router: it is discarded.
const NDP_HOP_LIMIT: u8 = 255;
/// All-nodes multicast (ff02::1), where a solicitation from the unspecified address is
/// answered.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The solicited-node multicast address of `a` (RFC 4291 2.7.1): ff02::1:ff00:0/104 and
/// the address's low 24 bits.
pub(crate) fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet multicast address of an IPv6 multicast address (RFC 2464 7): 33:33 and
/// the low 32 bits.
pub(crate) fn multicast_mac(a: Ipv6Addr) -> [u8; 6] {
    let o = a.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// A 6-byte link-layer address from an NDP option, if it is one.
fn ethernet(ll: Option<RawHardwareAddress>) -> Option<[u8; 6]> {
    ll.and_then(|a| <[u8; 6]>::try_from(a.as_bytes()).ok())
}

/// An Ethernet frame carrying one ICMPv6 message, emitted with smoltcp (checksum filled).
fn icmpv6_frame(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    msg: &Icmpv6Repr<'_>,
) -> Vec<u8> {
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: msg.buffer_len(),
        hop_limit: NDP_HOP_LIMIT,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(eth_src),
        dst_addr: EthernetAddress(eth_dst),
        ethertype: EthernetProtocol::Ipv6,
    };
    let l3 = eth.buffer_len();
    let l4 = l3 + ip.buffer_len();
    let mut buf = vec![0u8; l4 + msg.buffer_len()];
    let (head, icmp) = buf.split_at_mut(l4);
    msg.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(icmp),
        &ChecksumCapabilities::default(),
    );
    let (eth_hdr, ip_hdr) = head.split_at_mut(l3);
    ip.emit(&mut Ipv6Packet::new_unchecked(ip_hdr));
    eth.emit(&mut EthernetFrame::new_unchecked(eth_hdr));
    buf
}

/// What a valid NS or NA says.
enum Ndp {
    Solicit {
        target: Ipv6Addr,
        lladdr: Option<[u8; 6]>,
    },
    Advert {
        flags: NdiscNeighborFlags,
        target: Ipv6Addr,
        lladdr: Option<[u8; 6]>,
    },
}

/// Parses and validates a Neighbor Solicitation or Advertisement (RFC 4861 7.1.1, 7.1.2).
/// `None` when the frame is no NS/NA (left to the rest of the engine), `Some(Err)` when it
/// is one that must be discarded.
fn parse(frame: &[u8]) -> Option<Result<(Ipv6Addr, Ndp), DropReason>> {
    let ip = parse_ip(frame, ETH_LEN, true, false).ok()?;
    if ip.proto != PROTO_ICMPV6 || ip.frag != Frag::No || ip.l4_len() < 4 {
        return None;
    }
    let ty = rd8(frame, ip.l4);
    if ty != NEIGHBOR_SOLICIT && ty != NEIGHBOR_ADVERT {
        return None;
    }
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (ip.src, ip.dst) else {
        return None;
    };
    Some(validate(frame, &ip, src, dst).map(|m| (src, m)))
}

fn validate(
    frame: &[u8],
    ip: &super::wire::Ip,
    src: Ipv6Addr,
    dst: Ipv6Addr,
) -> Result<Ndp, DropReason> {
    if ip.ttl != NDP_HOP_LIMIT {
        return Err(DropReason::InvalidNdp);
    }
    let seg = frame.get(ip.l4..ip.end).ok_or(DropReason::Truncated)?;
    let pkt = Icmpv6Packet::new_checked(seg).map_err(|_| DropReason::InvalidNdp)?;
    // "The ICMP Checksum is valid."
    if !pkt.verify_checksum(&src, &dst) {
        return Err(DropReason::BadL4Checksum);
    }
    // smoltcp checks the code (0), the length (24 octets or more) and every option's
    // length (not 0, inside the message).
    let repr = Icmpv6Repr::parse(&src, &dst, &pkt, &ChecksumCapabilities::ignored())
        .map_err(|_| DropReason::InvalidNdp)?;
    let msg = match repr {
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr,
            lladdr,
        }) => {
            // "If the IP source address is the unspecified address, the IP destination
            // address is a solicited-node multicast address" and "there is no source
            // link-layer address option".
            if src.is_unspecified() && (dst != solicited_node(target_addr) || lladdr.is_some()) {
                return Err(DropReason::InvalidNdp);
            }
            Ndp::Solicit {
                target: target_addr,
                lladdr: ethernet(lladdr),
            }
        }
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr,
            lladdr,
        }) => {
            // "If the IP Destination Address is a multicast address the Solicited flag is
            // zero."
            if dst.is_multicast() && flags.contains(NdiscNeighborFlags::SOLICITED) {
                return Err(DropReason::InvalidNdp);
            }
            Ndp::Advert {
                flags,
                target: target_addr,
                lladdr: ethernet(lladdr),
            }
        }
        _ => return Err(DropReason::InvalidNdp),
    };
    let (Ndp::Solicit { target, .. } | Ndp::Advert { target, .. }) = &msg;
    // "The Target Address is not a multicast address."
    if target.is_multicast() {
        return Err(DropReason::InvalidNdp);
    }
    Ok(msg)
}

impl Engine {
    /// Handles a Neighbor Solicitation or Advertisement received on `port`; `None` when
    /// the frame is neither (the caller goes on with it).
    pub(super) fn handle_ndp(
        &self,
        now: Duration,
        port: &PortConfig,
        frame: &[u8],
        tx: &mut Vec<TxFrame>,
    ) -> Option<Verdict> {
        let (src, msg) = match parse(frame)? {
            Ok(m) => m,
            Err(r) => return Some(Verdict::Drop(r)),
        };
        Some(match msg {
            Ndp::Solicit { target, lladdr } => {
                self.handle_solicit(now, port, frame, src, target, lladdr, tx)
            }
            Ndp::Advert {
                flags,
                target,
                lladdr,
            } => {
                let Some(mac) = lladdr else {
                    // Without the target's link-layer address there is nothing to learn
                    // on Ethernet.
                    return Some(Verdict::Kernel);
                };
                // RFC 4861 7.2.5: without the Override flag, a different address does
                // not replace a known one.
                let key = (port.id, IpAddr::V6(target));
                if !flags.contains(NdiscNeighborFlags::OVERRIDE)
                    && self
                        .neigh
                        .read()
                        .get(&key)
                        .and_then(|n| n.mac)
                        .is_some_and(|m| m != mac)
                {
                    return Some(Verdict::Kernel);
                }
                if self.learn(now, port.id, IpAddr::V6(target), mac, true, tx) {
                    Verdict::Consumed
                } else {
                    Verdict::Kernel
                }
            }
        })
    }

    /// A Neighbor Solicitation: learn the solicitor when the target is ours, answer when
    /// the engine answers for the target, leave the kernel's own addresses to the kernel.
    #[allow(clippy::too_many_arguments)]
    fn handle_solicit(
        &self,
        now: Duration,
        port: &PortConfig,
        frame: &[u8],
        src: Ipv6Addr,
        target: Ipv6Addr,
        lladdr: Option<[u8; 6]>,
        tx: &mut Vec<TxFrame>,
    ) -> Verdict {
        let proxied = port.proxy_ndp.contains(&target);
        let kernel_own = port.addrs.iter().any(|n| n.addr() == IpAddr::V6(target));
        if !proxied && !kernel_own {
            return Verdict::Kernel;
        }
        // RFC 4861 7.2.3: a solicitation with a source link-layer address option creates
        // or updates the solicitor's entry.
        if let Some(mac) = lladdr
            && !src.is_unspecified()
        {
            self.learn(now, port.id, IpAddr::V6(src), mac, false, tx);
        }
        if kernel_own {
            return Verdict::Kernel;
        }
        // RFC 4861 7.2.4: answer to the solicitor, or to all nodes when it has no address
        // yet (duplicate address detection), then without the Solicited flag. The engine
        // routes for the pods behind this port: Router flag; it is the only owner of the
        // address: Override flag.
        let mut flags = NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::OVERRIDE;
        let (dst, eth_dst) = if src.is_unspecified() {
            (ALL_NODES, multicast_mac(ALL_NODES))
        } else {
            flags |= NdiscNeighborFlags::SOLICITED;
            let eth_src = frame
                .get(6..12)
                .and_then(|s| <[u8; 6]>::try_from(s).ok())
                .unwrap_or([0; 6]);
            (src, lladdr.unwrap_or(eth_src))
        };
        let msg = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr: target,
            lladdr: Some(RawHardwareAddress::from_bytes(&port.mac)),
        });
        tx.push(TxFrame {
            port: port.id,
            data: icmpv6_frame(port.mac, eth_dst, target, dst, &msg),
        });
        Verdict::Consumed
    }

    /// A multicast Neighbor Solicitation for `target` out of `port`, from the port's
    /// address that best fits the target (RFC 4861 7.2.2).
    pub(super) fn ndp_solicit(
        &self,
        snap: &Snapshot,
        port: &PortConfig,
        target: Ipv6Addr,
    ) -> TxFrame {
        let plan = &snap.plan;
        let v6 = |a: IpAddr| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        };
        let link_local = port
            .addrs
            .iter()
            .filter_map(|n| v6(n.addr()))
            .chain(port.proxy_ndp.iter().copied())
            .find(Ipv6Addr::is_unicast_link_local);
        let global = snap.ports.addr_of(port.id, true).and_then(v6);
        let src = if target.is_unicast_link_local() {
            link_local.or(global)
        } else {
            global.or(link_local)
        }
        .or_else(|| plan.node_ips.iter().copied().find_map(v6))
        .unwrap_or(Ipv6Addr::UNSPECIFIED);
        let dst = solicited_node(target);
        let msg = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            // Not from the unspecified address (that is a duplicate address probe).
            lladdr: (!src.is_unspecified()).then(|| RawHardwareAddress::from_bytes(&port.mac)),
        });
        TxFrame {
            port: port.id,
            data: icmpv6_frame(port.mac, multicast_mac(dst), src, dst, &msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solicited_node_addresses() {
        let a: Ipv6Addr = "fd00:10:244::1:2:abcd"
            .parse()
            .unwrap_or(Ipv6Addr::LOCALHOST);
        assert_eq!(
            solicited_node(a),
            "ff02::1:ff02:abcd".parse().unwrap_or(Ipv6Addr::LOCALHOST)
        );
        assert_eq!(
            multicast_mac(solicited_node(a)),
            [0x33, 0x33, 0xff, 2, 0xab, 0xcd]
        );
    }
}
