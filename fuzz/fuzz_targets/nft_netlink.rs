//! What the nftables dialect reads back from the kernel and from `nft`: netlink replies to
//! its table, rule, chain and set requests (`nftables::kernel::parse_replies`), and `nft`'s
//! error text (`nftables::driver::failing_line`), the acknowledgements of a netlink batch
//! (`nftables::kernel::parse_acks`), and the transaction text the batch translation reads
//! (`nftables::batch::translate`: any text gives a batch or `Unsupported`). Anyone on the node can create tables and
//! chains with any names, so any bytes must be read without a panic, every name returned
//! must come from the bytes, and a failing line only when the text names one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svcnat_iptables::nftables::batch::translate;
use svcnat_iptables::nftables::driver::failing_line;
use svcnat_iptables::nftables::kernel::{Reply, parse_acks, parse_replies};

fuzz_target!(|data: &[u8]| {
    let seq = data
        .get(8..12)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    if let Ok(replies) = parse_replies(data, seq) {
        // At most one reply per 16-byte header.
        assert!(replies.len() <= data.len() / 16, "{replies:?}");
        for r in replies {
            match r {
                Reply::Chain { table, name } | Reply::Set { table, name } => {
                    for s in [table, name] {
                        // Names are NUL-terminated strings of the bytes (lossy UTF-8).
                        assert!(!s.contains('\0'));
                        assert!(s.len() <= data.len() * 3);
                    }
                }
                Reply::Table { name, .. } => assert!(!name.contains('\0')),
                // A positive errno, whatever code the bytes carry.
                Reply::Error(e) => assert!(e > 0, "{e}"),
                Reply::Done | Reply::Rule | Reply::Other(_) => {}
            }
        }
    }
    if let Ok(acks) = parse_acks(data) {
        // At most one acknowledgement per 20-byte error message, errno never negative.
        assert!(acks.len() <= data.len() / 20, "{acks:?}");
        assert!(acks.iter().all(|(_, e)| *e >= 0));
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(batch) = translate(&text) {
        // Every command comes from a line of the text, and encodes within its length.
        for c in batch.commands() {
            assert!(!c.text.is_empty());
        }
        assert_eq!(batch.encode(7).len(), batch.encoded_len());
    }
    if let Some(n) = failing_line(&text) {
        assert!(text.contains(": Error"), "line {n} from nowhere");
    }
});
