//! A frame injector for tests and load generators: writes raw Ethernet frames onto an
//! interface of a network namespace as fast as `sendmmsg(2)` allows, whatever they hold
//! (malformed frames included). It bypasses the sender's IP stack entirely, so it can send
//! what no socket API would (spoofed sources, truncated headers, bad checksums).

use std::io;

use parking_lot::Mutex;

use crate::sys::xdp::XdpTx;
use crate::sys::{self, TxRing, TxSocket, VNET_HDR_LEN};

/// An open injector on one interface.
#[derive(Debug)]
pub struct Injector {
    tx: TxSocket,
    /// With [`Injector::open_ring`]: the transmit ring the datapath's workers use.
    ring: Option<Mutex<TxRing>>,
    /// With [`Injector::open_xdp`]: an `AF_XDP` socket in copy mode.
    xdp: Option<Mutex<XdpTx>>,
    ifindex: u32,
}

impl Injector {
    /// Opens an injector on `interface` in the network namespace `netns` (`None`: the
    /// current one).
    pub fn open(netns: Option<&str>, interface: &str) -> io::Result<Injector> {
        Self::open_with(netns, interface, Mode::Plain)
    }

    /// Like [`Injector::open`], but frames that fit go through a transmit ring
    /// (`PACKET_TX_RING`, as the datapath's workers send), one `sendto` per batch; the
    /// others with `sendmmsg`. Malformed frames are dropped by the kernel without an
    /// error, so tests of hostile input use [`Injector::open`].
    pub fn open_ring(netns: Option<&str>, interface: &str) -> io::Result<Injector> {
        Self::open_with(netns, interface, Mode::Ring)
    }

    /// Like [`Injector::open`], but every frame goes through an `AF_XDP` socket in copy
    /// mode (transmit only, no XDP program; a frame must fit a 2 KiB buffer): for
    /// measuring `AF_XDP`'s transmit against the ring's on the same interface.
    pub fn open_xdp(netns: Option<&str>, interface: &str) -> io::Result<Injector> {
        Self::open_with(netns, interface, Mode::Xdp)
    }

    fn open_with(netns: Option<&str>, interface: &str, mode: Mode) -> io::Result<Injector> {
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
                    ring: if mode == Mode::Ring {
                        Some(Mutex::new(TxRing::open(512)?))
                    } else {
                        None
                    },
                    xdp: if mode == Mode::Xdp {
                        Some(Mutex::new(XdpTx::open(ifindex, 512)?))
                    } else {
                        None
                    },
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
        if let Some(xdp) = &self.xdp {
            return self.send_xdp(&mut xdp.lock(), frames);
        }
        let mut sent = 0;
        let mut buf = Vec::new();
        let mut ends = Vec::with_capacity(256);
        for chunk in frames.chunks(256) {
            // One buffer per batch: each frame behind its (all-zero) virtio_net_hdr.
            buf.clear();
            ends.clear();
            for f in chunk {
                buf.resize(buf.len() + VNET_HDR_LEN, 0);
                buf.extend_from_slice(f);
                ends.push(buf.len());
            }
            let mut start = 0;
            let batch: Vec<(u32, &[u8])> = ends
                .iter()
                .map(|&end| {
                    let b = (self.ifindex, &buf[start..end]);
                    start = end;
                    b
                })
                .collect();
            let mut done = 0;
            if let Some(ring) = &self.ring {
                let mut ring = ring.lock();
                while done < batch.len() {
                    let n = ring.send(self.ifindex, &batch[done..])?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
            }
            sent += done;
            if done < batch.len() {
                sent += self.tx.send_batch(&batch[done..])?;
            }
        }
        Ok(sent)
    }

    fn send_xdp(&self, xdp: &mut XdpTx, frames: &[Vec<u8>]) -> io::Result<usize> {
        let mut sent = 0;
        let mut batch: Vec<&[u8]> = Vec::with_capacity(256);
        for chunk in frames.chunks(256) {
            batch.clear();
            batch.extend(chunk.iter().map(Vec::as_slice));
            let n = xdp.send(&batch)?;
            sent += n;
            if let Some(f) = batch
                .get(n)
                .filter(|f| f.is_empty() || f.len() > XdpTx::MAX_FRAME)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {}-byte frame does not fit an AF_XDP buffer", f.len()),
                ));
            }
        }
        Ok(sent)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Ring,
    Xdp,
}
