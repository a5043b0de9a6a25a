//! Byte-vector tests. The vectors follow the kernel's attribute layout
//! (`include/uapi/linux/ip_vs.h`, policies and fill functions in `ip_vs_ctl.c`) and the
//! order in which ipvsadm's libipvs (`ipvs_nl_fill_service_attr`) writes a service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::captured::*;
use super::*;

/// `ipvsadm -A -t 10.96.0.10:80 -s rr` as libipvs sends it (after `nlmsghdr`).
#[rustfmt::skip]
const NEW_SERVICE_RR: &[u8] = &[
    // genlmsghdr: cmd IPVS_CMD_NEW_SERVICE (1), version 1, reserved 0
    0x01, 0x01, 0x00, 0x00,
    // IPVS_CMD_ATTR_SERVICE (1), nested, length 84
    0x54, 0x00, 0x01, 0x00,
        // IPVS_SVC_ATTR_AF (1): u16 AF_INET (2), 2 bytes padding
        0x06, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00,
        // IPVS_SVC_ATTR_PROTOCOL (2): u16 IPPROTO_TCP (6)
        0x06, 0x00, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00,
        // IPVS_SVC_ATTR_ADDR (3): union nf_inet_addr, 16 bytes, 10.96.0.10 first
        0x14, 0x00, 0x03, 0x00, 0x0a, 0x60, 0x00, 0x0a,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // IPVS_SVC_ATTR_PORT (4): be16 80
        0x06, 0x00, 0x04, 0x00, 0x00, 0x50, 0x00, 0x00,
        // IPVS_SVC_ATTR_SCHED_NAME (6): "rr\0", 1 byte padding
        0x07, 0x00, 0x06, 0x00, b'r', b'r', 0x00, 0x00,
        // IPVS_SVC_ATTR_FLAGS (7): struct ip_vs_flags { flags 0, mask 0xffffffff }
        0x0c, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff,
        // IPVS_SVC_ATTR_TIMEOUT (8): u32 0
        0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00,
        // IPVS_SVC_ATTR_NETMASK (9): be32 255.255.255.255
        0x08, 0x00, 0x09, 0x00, 0xff, 0xff, 0xff, 0xff,
];

fn rr_service() -> Service {
    Service {
        key: ServiceKey {
            addr: "10.96.0.10".parse().unwrap(),
            protocol: IPPROTO_TCP,
            port: 80,
        },
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
        netmask: 0xffff_ffff,
    }
}

#[test]
fn parse_new_service() {
    let msg = IpvsMessage::parse_genl(NEW_SERVICE_RR).unwrap();
    assert_eq!(msg.header.cmd, 1);
    assert_eq!(msg.header.version, IPVS_GENL_VERSION);
    assert_eq!(msg.payload.cmd, IpvsCmd::NewService);
    let svcs: Vec<_> = msg.payload.services().collect();
    assert_eq!(svcs.len(), 1);
    assert_eq!(Service::from_attrs(svcs[0]), Some(rr_service()));
}

#[test]
fn emit_new_service() {
    let msg = IpvsMessage::new(
        IpvsCmd::NewService,
        vec![IpvsAttr::Service(rr_service().attrs())],
    );
    assert_eq!(msg.to_genl_bytes(), NEW_SERVICE_RR);
}

/// `ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 3` (libipvs `ipvs_nl_fill_dest_attr`
/// order: ADDR, PORT, FWD_METHOD, WEIGHT, U_THRESH, L_THRESH; newer ipvsadm also sends
/// ADDR_FAMILY, which this backend puts first).
#[rustfmt::skip]
const NEW_DEST: &[u8] = &[
    // genlmsghdr: cmd IPVS_CMD_NEW_DEST (5), version 1
    0x05, 0x01, 0x00, 0x00,
    // IPVS_CMD_ATTR_SERVICE (1), length 48: the key only
    0x30, 0x00, 0x01, 0x00,
        0x06, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, // AF u16 2
        0x06, 0x00, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, // PROTOCOL u16 6
        0x14, 0x00, 0x03, 0x00, 0x0a, 0x60, 0x00, 0x0a, // ADDR 10.96.0.10 ...
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x06, 0x00, 0x04, 0x00, 0x00, 0x50, 0x00, 0x00, // PORT be16 80
    // IPVS_CMD_ATTR_DEST (2), length 72
    0x48, 0x00, 0x02, 0x00,
        // IPVS_DEST_ATTR_ADDR_FAMILY (11): u16 AF_INET
        0x06, 0x00, 0x0b, 0x00, 0x02, 0x00, 0x00, 0x00,
        // IPVS_DEST_ATTR_ADDR (1): 10.244.1.5 in a 16-byte union
        0x14, 0x00, 0x01, 0x00, 0x0a, 0xf4, 0x01, 0x05,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // IPVS_DEST_ATTR_PORT (2): be16 8080 (0x1f90)
        0x06, 0x00, 0x02, 0x00, 0x1f, 0x90, 0x00, 0x00,
        // IPVS_DEST_ATTR_FWD_METHOD (3): u32 IP_VS_CONN_F_MASQ (0)
        0x08, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00,
        // IPVS_DEST_ATTR_WEIGHT (4): u32 3
        0x08, 0x00, 0x04, 0x00, 0x03, 0x00, 0x00, 0x00,
        // IPVS_DEST_ATTR_U_THRESH (5), IPVS_DEST_ATTR_L_THRESH (6): u32 0
        0x08, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x08, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00,
];

#[test]
fn dest_round_trip() {
    let d = Destination {
        addr: "10.244.1.5".parse().unwrap(),
        port: 8080,
        fwd_method: IP_VS_CONN_F_MASQ,
        weight: 3,
        active_conns: 0,
        inactive_conns: 0,
    };
    let msg = IpvsMessage::new(
        IpvsCmd::NewDest,
        vec![
            IpvsAttr::Service(rr_service().key.attrs()),
            IpvsAttr::Dest(d.attrs()),
        ],
    );
    assert_eq!(msg.to_genl_bytes(), NEW_DEST);
    let back = IpvsMessage::parse_genl(NEW_DEST).unwrap().payload;
    assert_eq!(back, msg);
    let dests: Vec<_> = back.dests().collect();
    assert_eq!(Destination::from_attrs(dests[0], AF_INET), Some(d));
}

/// A kernel dump reply for one IPv6 UDP service with persistence (`ip_vs_genl_fill_service`:
/// AF, PROTOCOL, ADDR, PORT, SCHED_NAME, FLAGS, TIMEOUT, NETMASK, STATS, STATS64), nested
/// attributes carrying `NLA_F_NESTED` as newer senders set it, one unknown attribute (99).
#[rustfmt::skip]
const DUMP_SERVICE_V6: &[u8] = &[
    // genlmsghdr: the kernel answers dumps with IPVS_CMD_NEW_SERVICE (1)
    0x01, 0x01, 0x00, 0x00,
    // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED (0x8001), length 4+8+8+20+8+8+12+8+8+24+28+8 = 144
    0x90, 0x00, 0x01, 0x80,
        0x06, 0x00, 0x01, 0x00, 0x0a, 0x00, 0x00, 0x00, // AF u16 AF_INET6 (10)
        0x06, 0x00, 0x02, 0x00, 0x11, 0x00, 0x00, 0x00, // PROTOCOL u16 UDP (17)
        // ADDR fd00::53
        0x14, 0x00, 0x03, 0x00,
        0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x53,
        0x06, 0x00, 0x04, 0x00, 0x00, 0x35, 0x00, 0x00, // PORT be16 53
        0x07, 0x00, 0x06, 0x00, b's', b'h', 0x00, 0x00, // SCHED_NAME "sh"
        // FLAGS: PERSISTENT|HASHED (3), mask ~0
        0x0c, 0x00, 0x07, 0x00, 0x03, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff,
        0x08, 0x00, 0x08, 0x00, 0x30, 0x2a, 0x00, 0x00, // TIMEOUT u32 10800
        0x08, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x80, // NETMASK be32 128 (v6 prefix length)
        // STATS | NLA_F_NESTED, length 24: CONNS u32 7, INBYTES u64 1000
        0x18, 0x00, 0x0a, 0x80,
            0x08, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00,
            0x0c, 0x00, 0x04, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // STATS64 | NLA_F_NESTED, length 28: CONNS u64 7, OUTBYTES u64 2^32
        0x1c, 0x00, 0x0c, 0x80,
            0x0c, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x0c, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        // unknown attribute 99, 4 bytes: kept
        0x08, 0x00, 0x63, 0x00, 0xde, 0xad, 0xbe, 0xef,
];

#[test]
fn parse_dump_reply_keeps_unknown_and_nested_flag() {
    let msg = IpvsMessage::parse_genl(DUMP_SERVICE_V6).unwrap().payload;
    let svc = msg.services().next().unwrap();
    assert!(svc.contains(&ServiceAttr::Other(DefaultNla::new(
        99,
        vec![0xde, 0xad, 0xbe, 0xef]
    ))));
    assert!(svc.contains(&ServiceAttr::Stats(vec![
        StatsAttr::Conns(Counter::U32(7)),
        StatsAttr::InBytes(Counter::U64(1000)),
    ])));
    assert!(svc.contains(&ServiceAttr::Stats64(vec![
        StatsAttr::Conns(Counter::U64(7)),
        StatsAttr::OutBytes(Counter::U64(1 << 32)),
    ])));
    let s = Service::from_attrs(svc).unwrap();
    assert_eq!(
        s,
        Service {
            key: ServiceKey {
                addr: "fd00::53".parse().unwrap(),
                protocol: IPPROTO_UDP,
                port: 53,
            },
            scheduler: "sh".into(),
            flags: IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_HASHED,
            timeout: 10800,
            netmask: 128,
        }
    );
    // Re-emitting gives the same bytes except for the NLA_F_NESTED bits, which this crate
    // does not set (the kernel's IPVS policy accepts both).
    let mut expected = DUMP_SERVICE_V6.to_vec();
    for at in [7, 91, 115] {
        assert_eq!(expected[at], 0x80, "offset {at}");
        expected[at] = 0;
    }
    assert_eq!(msg.to_genl_bytes(), expected);
}

#[test]
fn get_info_reply() {
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        // genlmsghdr: IPVS_CMD_SET_INFO (14), the reply to GET_INFO
        0x0e, 0x01, 0x00, 0x00,
        // IPVS_INFO_ATTR_VERSION (1): u32 0x010201 (1.2.1)
        0x08, 0x00, 0x01, 0x00, 0x01, 0x02, 0x01, 0x00,
        // IPVS_INFO_ATTR_CONN_TAB_SIZE (2): u32 4096
        0x08, 0x00, 0x02, 0x00, 0x00, 0x10, 0x00, 0x00,
    ];
    let msg = IpvsMessage::parse_genl(bytes).unwrap().payload;
    assert_eq!(
        msg,
        IpvsMessage::new(
            IpvsCmd::SetInfo,
            vec![
                IpvsAttr::InfoVersion(0x010201),
                IpvsAttr::InfoConnTabSize(4096)
            ]
        )
    );
    assert_eq!(msg.to_genl_bytes(), bytes);
}

#[test]
fn flush_and_unknown_command() {
    let flush = IpvsMessage::new(IpvsCmd::Flush, vec![]);
    assert_eq!(flush.to_genl_bytes(), [17, 1, 0, 0]);
    let other = IpvsMessage::parse_genl(&[200, 1, 0, 0]).unwrap().payload;
    assert_eq!(other.cmd, IpvsCmd::Other(200));
    assert_eq!(other.to_genl_bytes(), [200, 1, 0, 0]);
}

#[test]
fn malformed_input_is_an_error_naming_the_attribute() {
    // Truncated genl header.
    assert!(IpvsMessage::parse_genl(&[1, 1]).is_err());
    // Attribute length beyond the buffer.
    assert!(IpvsMessage::parse_genl(&[1, 1, 0, 0, 0x20, 0x00, 0x01, 0x00]).is_err());
    // A 3-byte service address.
    #[rustfmt::skip]
    let bad_addr: &[u8] = &[
        0x01, 0x01, 0x00, 0x00,
        0x0c, 0x00, 0x01, 0x00,
            0x07, 0x00, 0x03, 0x00, 0x0a, 0x00, 0x00, 0x00,
    ];
    let err = IpvsMessage::parse_genl(bad_addr).unwrap_err().to_string();
    assert!(err.contains("IPVS_SVC_ATTR_ADDR"), "{err}");
    // A 2-byte weight.
    #[rustfmt::skip]
    let bad_weight: &[u8] = &[
        0x05, 0x01, 0x00, 0x00,
        0x0c, 0x00, 0x02, 0x00,
            0x06, 0x00, 0x04, 0x00, 0x01, 0x00, 0x00, 0x00,
    ];
    let err = IpvsMessage::parse_genl(bad_weight).unwrap_err().to_string();
    assert!(err.contains("IPVS_DEST_ATTR_WEIGHT"), "{err}");
}

#[test]
fn arbitrary_bytes_never_panic_and_reparse_equal() {
    // A small deterministic generator walks mutations of the vectors above.
    let seeds = [
        NEW_SERVICE_RR,
        NEW_DEST,
        DUMP_SERVICE_V6,
        CAPTURED_NEW_DEST,
        CAPTURED_DUMP_SERVICE,
        CAPTURED_DUMP_DEST,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut parsed = 0;
    for round in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut buf = seeds[round % seeds.len()].to_vec();
        let at = (x as usize) % buf.len();
        buf[at] = (x >> 32) as u8;
        if round % 7 == 0 {
            buf.truncate((x >> 40) as usize % (buf.len() + 1));
        }
        if let Ok(m) = IpvsMessage::parse_genl(&buf) {
            parsed += 1;
            // emit(parse(x)) is a fixed point of parse-then-emit. (Plain equality of the
            // parsed values fails only for an unknown attribute with both NLA_F_NESTED and
            // NLA_F_NET_BYTEORDER set: netlink-packet-core's emitter keeps only the first.)
            let once = m.payload.to_genl_bytes();
            let again = IpvsMessage::parse_genl(&once)
                .unwrap_or_else(|e| panic!("re-parse of {buf:02x?} failed: {e}"));
            assert_eq!(again.payload.to_genl_bytes(), once, "{buf:02x?}");
        }
    }
    assert!(parsed > 1000, "only {parsed} mutations parsed");
}

/// Clears `NLA_F_NESTED` on the top-level attributes (libnl sets it, this crate does not).
fn without_nested_flag(genl: &[u8]) -> Vec<u8> {
    let mut b = genl.to_vec();
    let mut at = 4;
    while at + 4 <= b.len() {
        let len = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
        b[at + 3] &= 0x7f;
        at += (len + 3) & !3;
    }
    b
}

#[test]
fn captured_ipvsadm_new_service_equals_ours() {
    // Byte for byte what this crate emits, apart from libnl's NLA_F_NESTED.
    assert_eq!(without_nested_flag(CAPTURED_NEW_SERVICE), NEW_SERVICE_RR);
    let msg = IpvsMessage::parse_genl(CAPTURED_NEW_SERVICE)
        .unwrap()
        .payload;
    assert_eq!(
        Service::from_attrs(msg.services().next().unwrap()),
        Some(rr_service())
    );
}

#[test]
fn captured_ipvsadm_new_dest() {
    let msg = IpvsMessage::parse_genl(CAPTURED_NEW_DEST).unwrap().payload;
    assert_eq!(msg.cmd, IpvsCmd::NewDest);
    let dest = msg.dests().next().unwrap();
    assert_eq!(
        Destination::from_attrs(dest, AF_INET),
        Some(Destination {
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            fwd_method: IP_VS_CONN_F_MASQ,
            weight: 3,
            active_conns: 0,
            inactive_conns: 0,
        })
    );
    assert!(dest.contains(&DestAttr::TunType(0)));
    assert!(dest.contains(&DestAttr::TunPort(0)));
    assert_eq!(msg.to_genl_bytes(), without_nested_flag(CAPTURED_NEW_DEST));
}

#[test]
fn captured_kernel_dump_replies_round_trip_exactly() {
    for (name, bytes) in [
        ("service dump", CAPTURED_DUMP_SERVICE),
        ("dest dump", CAPTURED_DUMP_DEST),
        ("get dest", &without_nested_flag(CAPTURED_GET_DEST)[..]),
    ] {
        let msg = IpvsMessage::parse_genl(bytes).unwrap().payload;
        assert_eq!(msg.to_genl_bytes(), bytes, "{name}");
        // Nothing fell through to `Other`: every attribute the kernel sent is typed.
        let text = format!("{msg:?}");
        assert!(!text.contains("Other"), "{name}: {text}");
    }
    let svc = IpvsMessage::parse_genl(CAPTURED_DUMP_SERVICE)
        .unwrap()
        .payload;
    let attrs = svc.services().next().unwrap();
    let s = Service::from_attrs(attrs).unwrap();
    assert_eq!(s.key, rr_service().key);
    assert_eq!(s.scheduler, "rr");
    assert_eq!(s.flags, IP_VS_SVC_F_HASHED);
    assert!(
        attrs
            .iter()
            .any(|a| matches!(a, ServiceAttr::Stats64(v) if v.len() == 10))
    );
    let dest = IpvsMessage::parse_genl(CAPTURED_DUMP_DEST).unwrap().payload;
    let d = Destination::from_attrs(dest.dests().next().unwrap(), AF_INET).unwrap();
    assert_eq!(
        (d.addr, d.port, d.weight),
        ("10.244.1.5".parse().unwrap(), 8080, 3)
    );
}
