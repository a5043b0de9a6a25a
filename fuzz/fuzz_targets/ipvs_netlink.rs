//! Generic-netlink payloads (as the kernel answers IPVS commands and dumps) into the IPVS
//! message parser: never a panic, and what parses re-emits to bytes that parse again and
//! re-emit identically (emit is a fixed point after one parse; unknown attributes are kept).
//! Services and destinations found in a parsed message convert to typed views or are
//! refused, never half-built.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svcnat_ipvs::message::{Destination, IpvsMessage, Service};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = IpvsMessage::parse_genl(data) else {
        return;
    };
    let once = msg.payload.to_genl_bytes();
    let again = match IpvsMessage::parse_genl(&once) {
        Ok(m) => m,
        Err(e) => panic!("re-emitted message does not parse: {e}"),
    };
    assert_eq!(once, again.payload.to_genl_bytes(), "emit is not stable");
    for attrs in msg.payload.services() {
        if let Some(svc) = Service::from_attrs(attrs) {
            let _ = svc.attrs();
        }
    }
    for attrs in msg.payload.dests() {
        let _ = Destination::from_attrs(attrs, 2);
    }
});
