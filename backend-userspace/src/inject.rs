//! A frame injector for tests and load generators: writes raw Ethernet frames onto an
//! interface of a network namespace as fast as `sendmmsg(2)` allows, whatever they hold
//! (malformed frames included). It bypasses the sender's IP stack entirely, so it can send
//! what no socket API would (spoofed sources, truncated headers, bad checksums).

use std::io;

use crate::sys::{self, TxSocket, VNET_HDR_LEN};

/// An open injector on one interface.
#[derive(Debug)]
pub struct Injector {
    tx: TxSocket,
    ifindex: u32,
}

impl Injector {
    /// Opens an injector on `interface` in the network namespace `netns` (`None`: the
    /// current one).
    pub fn open(netns: Option<&str>, interface: &str) -> io::Result<Injector> {
        let netns = netns.map(str::to_string);
        let interface = interface.to_string();
        std::thread::scope(|s| {
            s.spawn(move || {
                if let Some(ns) = &netns {
                    sys::enter_netns(ns)?;
                }
                let ifindex = sys::if_index(&interface)?;
                Ok(Injector {
                    tx: TxSocket::open()?,
                    ifindex,
                })
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("injector thread panicked")))
        })
    }

    /// Sends every frame of `frames` once, in batches; returns how many the kernel took
    /// (a full device queue drops the rest of a batch, as a NIC would).
    pub fn send(&self, frames: &[Vec<u8>]) -> io::Result<usize> {
        let bufs: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut b = vec![0u8; VNET_HDR_LEN];
                b.extend_from_slice(f);
                b
            })
            .collect();
        let mut sent = 0;
        for chunk in bufs.chunks(256) {
            let batch: Vec<(u32, &[u8])> =
                chunk.iter().map(|b| (self.ifindex, b.as_slice())).collect();
            sent += self.tx.send_batch(&batch)?;
        }
        Ok(sent)
    }
}
