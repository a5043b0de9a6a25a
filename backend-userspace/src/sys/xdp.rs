//! An `AF_XDP` transmit socket in copy mode, for measuring what `AF_XDP` would cost a
//! worker against the `AF_PACKET` transmit ring ([`crate::inject::Injector::open_xdp`]).
//!
//! Transmit only, so no XDP program is needed (one is only needed to steer received frames
//! into a socket). veth has no zero-copy `AF_XDP`: in copy mode the kernel builds a socket
//! buffer per descriptor and copies the frame into it (`xsk_generic_xmit`), then transmits
//! it straight to the device, as the `AF_PACKET` ring does.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::setsockopt;

/// Bytes per frame buffer in the shared memory (UMEM).
const CHUNK: u32 = 2048;

/// A mapped region, unmapped on drop.
#[derive(Debug)]
struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    /// Anonymous memory (`fd` `None`) or a ring of `fd` at `offset`.
    fn new(len: usize, fd: Option<&OwnedFd>, offset: libc::off_t) -> io::Result<Map> {
        let (flags, raw) = match fd {
            Some(fd) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
            ),
        };
        // Safety: a fresh mapping of `len` bytes; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap: NULL"))?;
        Ok(Map { ptr, len })
    }

    /// The 4-byte aligned `u32` at `offset`, shared with the kernel.
    fn word(&self, offset: u64) -> &AtomicU32 {
        assert!(offset as usize + 4 <= self.len && offset.is_multiple_of(4));
        // Safety: in bounds and aligned (checked); lives as long as the mapping.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset as usize).cast()) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // Safety: unmaps exactly what `new` mapped; nothing borrows it past `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// An `AF_XDP` socket bound in copy mode to queue 0 of one interface, transmitting only.
#[derive(Debug)]
pub(crate) struct XdpTx {
    // Field order is drop order: the rings and the UMEM are unmapped before the socket
    // closes.
    tx: Map,
    tx_off: libc::xdp_ring_offset,
    cq: Map,
    cq_off: libc::xdp_ring_offset,
    umem: Map,
    fd: OwnedFd,
    /// Descriptors (and UMEM chunks) in the rings.
    size: u32,
    /// Our transmit producer index and completion consumer index.
    produced: u32,
    completed: u32,
}

// Safety: the mappings belong to this socket alone and are only reached through `&mut self`.
unsafe impl Send for XdpTx {}

impl XdpTx {
    /// The largest frame a UMEM chunk takes.
    pub(crate) const MAX_FRAME: usize = CHUNK as usize;

    /// Opens a socket with `size` (a power of two) descriptors and UMEM chunks, bound in
    /// copy mode to queue 0 of interface `ifindex` in the calling thread's namespace.
    pub(crate) fn open(ifindex: u32, size: u32) -> io::Result<XdpTx> {
        if !size.is_power_of_two() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "ring size"));
        }
        // Safety: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem = Map::new(size as usize * CHUNK as usize, None, 0)?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem.len as u64,
            chunk_size: CHUNK,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(&fd, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)?;
        // A UMEM needs both of its rings, even for a socket that never receives.
        setsockopt(&fd, libc::SOL_XDP, libc::XDP_UMEM_FILL_RING, &size)?;
        setsockopt(&fd, libc::SOL_XDP, libc::XDP_UMEM_COMPLETION_RING, &size)?;
        setsockopt(&fd, libc::SOL_XDP, libc::XDP_TX_RING, &size)?;
        // Safety: all-zero offsets are valid; the kernel fills them.
        let mut off: libc::xdp_mmap_offsets = unsafe { zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // Safety: `off` is a writable buffer of `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut off as *mut libc::xdp_mmap_offsets).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let tx_len = off.tx.desc as usize + size as usize * size_of::<libc::xdp_desc>();
        let tx = Map::new(tx_len, Some(&fd), libc::XDP_PGOFF_TX_RING)?;
        let cq_len = off.cr.desc as usize + size as usize * size_of::<u64>();
        let cq = Map::new(
            cq_len,
            Some(&fd),
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
        )?;
        // Safety: an all-zero sockaddr_xdp is valid.
        let mut sxdp: libc::sockaddr_xdp = unsafe { zeroed() };
        sxdp.sxdp_family = libc::AF_XDP as u16;
        sxdp.sxdp_flags = libc::XDP_COPY;
        sxdp.sxdp_ifindex = ifindex;
        sxdp.sxdp_queue_id = 0;
        // Safety: `sxdp` is a valid sockaddr_xdp of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sxdp as *const libc::sockaddr_xdp).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(XdpTx {
            tx,
            tx_off: off.tx,
            cq,
            cq_off: off.cr,
            umem,
            fd,
            size,
            produced: 0,
            completed: 0,
        })
    }

    /// Takes back the chunks whose frames the kernel has sent.
    fn reap(&mut self) {
        // Acquire: the kernel's completion entries before we reuse their chunks.
        let prod = self.cq.word(self.cq_off.producer).load(Ordering::Acquire);
        // Completions come in order here (one socket, copy mode), so the count is enough.
        self.completed = prod;
        self.cq
            .word(self.cq_off.consumer)
            .store(prod, Ordering::Release);
    }

    /// Sends `frames` (Ethernet frames, no `virtio_net_hdr`) in order; returns how many
    /// the kernel took. Stops at a frame that does not fit a chunk.
    pub(crate) fn send(&mut self, frames: &[&[u8]]) -> io::Result<usize> {
        let mut sent = 0;
        for f in frames {
            if f.len() > Self::MAX_FRAME || f.is_empty() {
                break;
            }
            self.reap();
            if self.produced.wrapping_sub(self.completed) == self.size {
                self.kick()?;
                self.reap();
                if self.produced.wrapping_sub(self.completed) == self.size {
                    break;
                }
            }
            let slot = self.produced & (self.size - 1);
            let addr = u64::from(slot) * u64::from(CHUNK);
            // Safety: the chunk at `addr` is ours (not yet produced, or completed) and
            // holds CHUNK >= f.len() bytes; the descriptor lies inside the ring mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    f.as_ptr(),
                    self.umem.ptr.as_ptr().add(addr as usize),
                    f.len(),
                );
                let desc = self
                    .tx
                    .ptr
                    .as_ptr()
                    .add(self.tx_off.desc as usize + slot as usize * size_of::<libc::xdp_desc>())
                    .cast::<libc::xdp_desc>();
                desc.write(libc::xdp_desc {
                    addr,
                    len: f.len() as u32,
                    options: 0,
                });
            }
            self.produced = self.produced.wrapping_add(1);
            // Release: the chunk and descriptor before the kernel sees the new producer.
            self.tx
                .word(self.tx_off.producer)
                .store(self.produced, Ordering::Release);
            sent += 1;
        }
        self.kick()?;
        Ok(sent)
    }

    /// Asks the kernel to transmit what the ring holds; in copy mode it sends at most a
    /// small batch per call, so call until the ring is drained.
    fn kick(&mut self) -> io::Result<()> {
        loop {
            let consumer = self.tx.word(self.tx_off.consumer).load(Ordering::Acquire);
            if consumer == self.produced {
                return Ok(());
            }
            // Safety: no buffer is passed; a kick of a bound AF_XDP socket.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS) => self.reap(),
                    _ => return Err(e),
                }
            }
        }
    }
}
