//! Every system call of the userspace backend, and its only `unsafe` code.
//!
//! - [`PacketSocket`]: an `AF_PACKET`/`SOCK_RAW` receive socket with a `TPACKET_V2` ring
//!   mapped into memory (frames too big for a slot read with `recv`), `PACKET_VNET_HDR` (so GSO super-frames and partial checksums pass
//!   through intact and the kernel segments and checksums on transmit), `PACKET_IGNORE_OUTGOING`
//!   (it never reads back what it sends), `PACKET_QDISC_BYPASS`, an optional `PACKET_FANOUT`
//!   group and a classic-BPF filter on the receiving interface index.
//! - [`TxSocket`]: a transmit-only packet socket, batched with `sendmmsg(2)`.
//! - [`TxRing`]: a transmit-only packet socket with a mapped `TPACKET_V2` ring, one
//!   `sendto(2)` per batch to one interface.
//! - [`xdp::XdpTx`]: a transmit-only `AF_XDP` socket in copy mode, for the benchmark's
//!   comparison of transmit paths (the datapath does not use it).
//! - [`RxBlock`] / [`RxFrame`]: a batch of ring slots handed to user space and its frames,
//!   as safe mutable slices; dropping the batch returns its slots to the kernel.
//! - [`enter_netns`]: `setns(2)` for the calling thread.
//!
//! Each `unsafe` block says why it is sound in a `// Safety:` comment.

#![allow(unsafe_code)]

pub(crate) mod xdp;

use std::io;
use std::marker::PhantomData;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Size of `struct virtio_net_hdr`, which precedes every frame with `PACKET_VNET_HDR`.
pub(crate) const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum holds only the pseudo-header sum.
pub(crate) const VNET_NEEDS_CSUM: u8 = 1;

/// `ETH_P_ALL` in network byte order, as `socket(2)` and `sockaddr_ll` want it.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// Shape of a receive ring (`TPACKET_V2`: one slot per frame, each handed to user space as
/// soon as the kernel has written it, so a frame waits for nothing but the worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per slot: a power of two from 2,048 (a 1,500-byte MTU frame with the ring's
    /// headers) to 65,536. A frame that does not fit (a GSO aggregate, a jumbo frame) is
    /// queued whole on the socket and read with `recvmsg` in its turn.
    pub frame_size: u32,
    /// Slots in the ring.
    pub frames: u32,
    /// Receive buffer for the frames that do not fit a slot, in bytes (`SO_RCVBUFFORCE`);
    /// when it is full such a frame is dropped and counted as truncated.
    pub overflow_bytes: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            frame_size: 2048,
            frames: 4096,
            overflow_bytes: 16 << 20,
        }
    }
}

/// Enters the network namespace `/run/netns/<name>` on the calling thread only.
pub(crate) fn enter_netns(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad network namespace name {name:?}"),
        ));
    }
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // Safety: `file` is an open namespace file descriptor for the duration of the call;
    // setns(2) only changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interface index of `name` in the calling thread's network namespace.
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // Safety: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // Safety: `value` points to a live `T` of the size passed, and `fd` is an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps the ring (receive or transmit) the kernel has just allocated for `fd`, `len`
/// bytes, populated; locked in memory when `RLIMIT_MEMLOCK` allows.
fn map_ring(fd: &OwnedFd, len: usize) -> io::Result<NonNull<u8>> {
    let map = |flags: libc::c_int| {
        // Safety: maps exactly the ring the kernel allocated for this socket (`len` is its
        // size); the result is checked before use.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE | flags,
                fd.as_raw_fd(),
                0,
            )
        }
    };
    let mut p = map(libc::MAP_LOCKED);
    if p == libc::MAP_FAILED {
        // MAP_LOCKED fails under a low RLIMIT_MEMLOCK; the ring works unlocked too.
        p = map(0);
    }
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

/// `TPACKET_ALIGN(sizeof(struct tpacket2_hdr))`: where a receive slot's `sockaddr_ll`
/// starts.
const RX_SLL_OFF: usize = 32;
/// Most slots handed to the worker in one batch.
const RX_BATCH: u32 = 64;
/// Buffer for a frame read with `recvmsg`: a 64 KiB GSO aggregate, its Ethernet header
/// (and a tag), the `virtio_net_hdr`. A bigger one (BIG TCP) is truncated and dropped.
const RX_COPY_MAX: usize = 65_536 + 18 + VNET_HDR_LEN;
/// Read buffers kept for reuse.
const RX_SPARE: usize = 64;

/// A packet socket with a mapped `TPACKET_V2` receive ring: every frame has its own slot,
/// which the kernel hands over as soon as it is written (`TPACKET_V3` hands over whole
/// blocks, when full or after at least a millisecond, which a frame at light load waited
/// for). A frame too big for its slot is queued whole on the socket (`PACKET_COPY_THRESH`)
/// and its slot, marked `TP_STATUS_COPY`, says where it comes in the order; both are
/// written under one lock in the kernel, so the queue's order is the slots'.
#[derive(Debug)]
pub(crate) struct PacketSocket {
    fd: OwnedFd,
    map: NonNull<u8>,
    map_len: usize,
    frame_size: usize,
    slots: u32,
    head: u32,
    /// Buffers of frames read with `recvmsg`, kept for reuse.
    spare: Vec<Vec<u8>>,
}

// Safety: the mapping belongs to this socket alone; slots are only reached through
// `&mut self`, so moving the socket to another thread moves exclusive access with it.
unsafe impl Send for PacketSocket {}

impl PacketSocket {
    /// Opens a socket that receives every interface's frames (narrow it with
    /// [`SocketControl::filter_interfaces`]) into a ring shaped by `ring`.
    pub(crate) fn open(ring: RingConfig) -> io::Result<PacketSocket> {
        if !ring.frame_size.is_power_of_two()
            || !(2048..=65_536).contains(&ring.frame_size)
            || ring.frames == 0
            || ring.frames > 1 << 20
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad ring shape {ring:?}"),
            ));
        }
        // Safety: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL_BE),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Until the ring exists and the socket is bound, receive nothing: bind below with
        // the ring ready.
        let version = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        let one: libc::c_int = 1;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one)?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_COPY_THRESH, &one)?;
        let rcvbuf = ring.overflow_bytes.min(i32::MAX as u32 / 2) as libc::c_int;
        if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf).is_err() {
            // Without CAP_NET_ADMIN: as much as `net.core.rmem_max` allows.
            setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf)?;
        }
        // Blocks of at least 64 KiB, each a whole number of slots (both are powers of
        // two), so slot `i` is at `i * frame_size`.
        let block_size = ring.frame_size.max(1 << 16);
        let per_block = block_size / ring.frame_size;
        let blocks = ring.frames.div_ceil(per_block);
        let slots = blocks * per_block;
        let req = libc::tpacket_req {
            tp_block_size: block_size,
            tp_block_nr: blocks,
            tp_frame_size: ring.frame_size,
            tp_frame_nr: slots,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        let map_len = slots as usize * ring.frame_size as usize;
        let map = map_ring(&fd, map_len)?;
        let sock = PacketSocket {
            fd,
            map,
            map_len,
            frame_size: ring.frame_size as usize,
            slots,
            head: 0,
            spare: Vec::new(),
        };
        // Safety: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL_BE;
        sll.sll_ifindex = 0;
        // Safety: `sll` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// A second handle on the socket for the control thread: filters, fanout, statistics.
    pub(crate) fn control(&self) -> io::Result<SocketControl> {
        Ok(SocketControl {
            fd: self.fd.try_clone()?,
        })
    }

    /// Waits until a frame may be ready or `timeout` passes; `Ok(false)` on timeout.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLERR,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // Safety: `pfd` is one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(rc > 0)
    }

    fn slot(&self, index: u32) -> *mut u8 {
        // Safety: `index < slots`, so the slot lies inside the mapping.
        unsafe { self.map.as_ptr().add(index as usize * self.frame_size) }
    }

    fn status(&self, index: u32) -> &AtomicU32 {
        // Safety: `tp_status` is the first, 4-byte aligned u32 of the slot's
        // `tpacket2_hdr`, living as long as the mapping (and so `&self`). The kernel hands a
        // slot over by storing TP_STATUS_USER after writing it (with a barrier), so an
        // Acquire load orders our reads of the slot after its writes.
        unsafe { AtomicU32::from_ptr(self.slot(index).cast::<u32>()) }
    }

    /// Whether the kernel has handed over a frame (without taking it).
    pub(crate) fn ready(&self) -> bool {
        self.status(self.head).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// Reads the next frame queued on the socket (one that did not fit its slot) into a
    /// buffer; an empty buffer if there is none or it was too big.
    fn read_queued(&mut self) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(RX_COPY_MAX, 0);
        // Safety: `buf` is writable for its length; MSG_TRUNC makes the result the frame's
        // real length, which may exceed what was written.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 || n as usize > buf.len() {
            buf.clear();
        } else {
            buf.truncate(n as usize);
        }
        buf
    }

    /// The frames the kernel has handed over since the last call, at most a batch, if any.
    pub(crate) fn next_block(&mut self) -> Option<RxBlock<'_>> {
        let start = self.head;
        let mut count = 0u32;
        let mut copies = Vec::new();
        while count < RX_BATCH.min(self.slots) {
            let index = (start + count) % self.slots;
            let status = self.status(index).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 {
                break;
            }
            if status & libc::TP_STATUS_COPY != 0 {
                let buf = self.read_queued();
                copies.push(buf);
            }
            count += 1;
        }
        if count == 0 {
            return None;
        }
        self.head = (start + count) % self.slots;
        Some(RxBlock {
            sock: self,
            start,
            count,
            copies,
        })
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // Safety: unmaps exactly the region mapped in `open`; no `RxBlock` can be alive
        // because they borrow `self`.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// A duplicate descriptor of a [`PacketSocket`]: changes its filter and fanout and reads its
/// statistics while a worker owns the ring.
#[derive(Debug)]
pub(crate) struct SocketControl {
    fd: OwnedFd,
}

impl SocketControl {
    /// Receives only frames that arrive on one of `ifindexes` (a classic BPF program on
    /// `SKF_AD_IFINDEX`), and those of `lo` that [`LoopbackFilter`] admits; an empty list
    /// receives nothing.
    pub(crate) fn filter_interfaces(
        &self,
        ifindexes: &[u32],
        lo: Option<LoopbackFilter>,
    ) -> io::Result<()> {
        let prog = ifindex_filter(ifindexes, lo);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr().cast_mut(),
        };
        // The kernel copies the program during the call.
        setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
    }

    /// Joins fanout group `group` (hash mode: both directions of a flow reach one socket).
    pub(crate) fn join_fanout(&self, group: u16) -> io::Result<()> {
        let arg: u32 = u32::from(group) | (libc::PACKET_FANOUT_HASH << 16);
        setsockopt(&self.fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
    }

    /// Frames received and frames the kernel dropped because the ring was full, since the
    /// previous call (`PACKET_STATISTICS` resets on read).
    pub(crate) fn stats(&self) -> io::Result<(u64, u64)> {
        // Safety: an all-zero tpacket_stats is valid.
        let mut st: libc::tpacket_stats = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // Safety: `st` and `len` describe a writable buffer of the right size.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((u64::from(st.tp_packets), u64::from(st.tp_drops)))
    }
}

/// A packet socket that only transmits (protocol 0: it receives nothing). Workers send on
/// their own, so a receive block can stay borrowed while its frames go out.
#[derive(Debug)]
pub(crate) struct TxSocket {
    fd: OwnedFd,
}

impl TxSocket {
    /// Opens a transmit socket; buffers sent on it start with a `virtio_net_hdr`.
    pub(crate) fn open() -> io::Result<TxSocket> {
        // Safety: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one)?;
        Ok(TxSocket { fd })
    }

    /// Sends each `(ifindex, buffer)`; every buffer starts with a `virtio_net_hdr`. Returns
    /// how many were sent; a full device queue stops the batch early.
    pub(crate) fn send_batch(&self, batch: &[(u32, &[u8])]) -> io::Result<usize> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut addrs: Vec<libc::sockaddr_ll> = Vec::with_capacity(batch.len());
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(batch.len());
        for (ifindex, buf) in batch {
            // Safety: an all-zero sockaddr_ll is valid.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL_BE;
            sll.sll_ifindex = *ifindex as i32;
            addrs.push(sll);
            iovs.push(libc::iovec {
                iov_base: buf.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            });
        }
        let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            // Safety: an all-zero msghdr is valid; the pointers set below outlive the call.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_ll).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            msgs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        let mut sent = 0usize;
        while sent < msgs.len() {
            let n = (msgs.len() - sent).min(1024) as libc::c_uint;
            // Safety: `msgs[sent..]` are valid mmsghdrs whose names and iovecs point into
            // `addrs`, `iovs` and the caller's buffers, all alive for the call; the kernel
            // only reads the buffers (it writes `msg_len`).
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    n,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if sent > 0 || e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(sent);
                }
                return Err(e);
            }
            if rc == 0 {
                break;
            }
            sent += rc as usize;
        }
        Ok(sent)
    }
}

/// Shape of a transmit ring: `frames` slots of [`TxRing::SLOT`] bytes.
const TX_SLOT: u32 = 2048;
/// Slots per block (a block must hold whole slots; 32 slots make a 64 KiB block).
const TX_SLOTS_PER_BLOCK: u32 = 32;
/// `TPACKET_ALIGN(sizeof(struct tpacket2_hdr))`: where a slot's frame starts.
const TX_DATA_OFF: usize = 32;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;

/// A transmit ring (`PACKET_TX_RING`, `TPACKET_V2`): frames are written into mapped slots
/// and one `sendto(2)` hands the kernel every queued slot, without the per-message copying
/// of headers and addresses that `sendmmsg(2)` does.
///
/// Every frame is copied into the socket buffer whole. `tpacket_snd` copies only the
/// first `virtio_net_hdr.hdr_len` bytes and attaches the rest of the slot's page as a
/// fragment, and marks the slot free when the buffer's owner is dropped, which the
/// receiving stack of a veth peer does on entry (`ip_rcv`), possibly long before a socket
/// has read the data: a reused slot could then rewrite a datagram still queued in a pod.
/// So each slot's header says "the whole frame" (`hdr_len` = its length) and no page of
/// the ring is ever handed out. (On 6.18 the rewrite did not show in our test even
/// without this, something on the veth path copying; nothing promises that.) Frames that
/// need segmentation (GSO) or do not fit a slot are the caller's to send otherwise.
#[derive(Debug)]
pub(crate) struct TxRing {
    fd: OwnedFd,
    map: NonNull<u8>,
    map_len: usize,
    slots: u32,
    head: u32,
}

// Safety: the mapping belongs to this ring alone and is only reached through `&mut self`.
unsafe impl Send for TxRing {}

impl TxRing {
    /// The largest frame a slot takes, `virtio_net_hdr` included.
    pub(crate) const MAX_FRAME: usize = TX_SLOT as usize - TX_DATA_OFF;

    /// Opens a transmit socket with a ring of at least `slots` slots (rounded up to whole
    /// blocks); buffers start with a `virtio_net_hdr`.
    pub(crate) fn open(slots: u32) -> io::Result<TxRing> {
        // Safety: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        let version = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one)?;
        // A malformed slot is skipped (and freed) instead of stopping the ring.
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_LOSS, &one)?;
        let blocks = slots.div_ceil(TX_SLOTS_PER_BLOCK).max(1);
        let req = libc::tpacket_req {
            tp_block_size: TX_SLOT * TX_SLOTS_PER_BLOCK,
            tp_block_nr: blocks,
            tp_frame_size: TX_SLOT,
            tp_frame_nr: blocks * TX_SLOTS_PER_BLOCK,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_TX_RING, &req)?;
        let slots = blocks * TX_SLOTS_PER_BLOCK;
        let map_len = slots as usize * TX_SLOT as usize;
        let map = map_ring(&fd, map_len)?;
        Ok(TxRing {
            fd,
            map,
            map_len,
            slots,
            head: 0,
        })
    }

    fn slot(&self, index: u32) -> *mut u8 {
        // Safety: `index < slots`, so the slot lies inside the mapping.
        unsafe { self.map.as_ptr().add(index as usize * TX_SLOT as usize) }
    }

    fn status(&self, index: u32) -> &AtomicU32 {
        // Safety: `tp_status` is the first, 4-byte aligned u32 of the slot's
        // `tpacket2_hdr`, living as long as the mapping (and so `&self`). The kernel marks a
        // slot free with a store after it is done with it; Acquire orders our writes to the
        // slot after that.
        unsafe { AtomicU32::from_ptr(self.slot(index).cast::<u32>()) }
    }

    /// Whether a buffer (`virtio_net_hdr` and frame) goes through the ring: no GSO, and
    /// it fits a slot.
    pub(crate) fn fits(buf: &[u8]) -> bool {
        (VNET_HDR_LEN + 14..=Self::MAX_FRAME).contains(&buf.len())
            && buf.get(1).is_some_and(|gso| *gso == 0)
    }

    /// Sends the leading frames of `frames` that [fit](TxRing::fits) out of interface
    /// `ifindex` (the frames' own interface numbers are not read), in order. Returns how
    /// many the kernel took; the rest (one that does not fit and those after it, a full
    /// ring, a full socket buffer, an interface gone) are the caller's to send otherwise.
    pub(crate) fn send(&mut self, ifindex: u32, frames: &[(u32, &[u8])]) -> io::Result<usize> {
        let start = self.head;
        let mut queued = 0u32;
        for (_, f) in frames {
            let idx = (start + queued) % self.slots;
            if queued == self.slots
                || !Self::fits(f)
                || self.status(idx).load(Ordering::Acquire) != TP_STATUS_AVAILABLE
            {
                break;
            }
            let whole = (f.len() - VNET_HDR_LEN) as u16;
            // Safety: the slot is free (the kernel set AVAILABLE, read with Acquire) and
            // holds TX_SLOT bytes: the header's length field at offset 4 and the frame at
            // TX_DATA_OFF, `f.len() <= MAX_FRAME` bytes, stay inside it.
            unsafe {
                let p = self.slot(idx);
                std::ptr::write_unaligned(p.add(4).cast::<u32>(), f.len() as u32);
                let data = p.add(TX_DATA_OFF);
                std::ptr::copy_nonoverlapping(f.as_ptr(), data, f.len());
                // virtio_net_hdr.hdr_len (little endian): copy the whole frame.
                std::ptr::write_unaligned(data.add(2).cast::<u16>(), whole.to_le());
            }
            // Release: the slot's contents before the kernel may read them.
            self.status(idx)
                .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
            queued += 1;
        }
        if queued == 0 {
            return Ok(0);
        }
        // Safety: an all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL_BE;
        sll.sll_ifindex = ifindex as i32;
        // Safety: no buffer is passed; `sll` is a valid sockaddr_ll of the size given. The
        // kernel reads the slots marked SEND_REQUEST, which stay untouched by us until it
        // marks them free.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        // The kernel takes slots in order from its head, which was ours at `start`, and
        // stops at the first it cannot send. Those still requested were not taken: free
        // them and move our head to the first, where the kernel's stays, so that a later
        // call for another interface never sends them there.
        let mut sent = 0u32;
        while sent < queued
            && self
                .status((start + sent) % self.slots)
                .load(Ordering::Acquire)
                != TP_STATUS_SEND_REQUEST
        {
            sent += 1;
        }
        for i in sent..queued {
            self.status((start + i) % self.slots)
                .store(TP_STATUS_AVAILABLE, Ordering::Release);
        }
        self.head = (start + sent) % self.slots;
        match err {
            Some(e) if sent == 0 && e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(sent as usize),
        }
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        // Safety: unmaps exactly the region mapped in `open`; nothing borrows it.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// What the rings take from `lo`: IPv4 (unfragmented) or IPv6 TCP, UDP and SCTP to a
/// destination port in `ports` (inclusive; `lo > hi` takes none), and IPv6 whose first
/// next header is another (an extension header: the engine decides). The node's loopback
/// traffic (databases, sidecars) never reaches the rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoopbackFilter {
    /// The interface index of `lo`.
    pub(crate) ifindex: u32,
    /// Lowest and highest destination port taken.
    pub(crate) ports: (u16, u16),
}

/// A classic BPF program accepting frames whose receiving interface is in `ifindexes`, and
/// from `lo` what `lo` (when given) admits.
fn ifindex_filter(ifindexes: &[u32], lo: Option<LoopbackFilter>) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // Jump offsets are one byte: past 250 interfaces accept everything and let the engine
    // sort frames out by interface (it ignores ports it does not own).
    if ifindexes.len() > 250 {
        return vec![ins(RET_K, 0, 0, u32::MAX)];
    }
    let n = ifindexes.len();
    let mut prog = Vec::with_capacity(n + 25);
    prog.push(ins(
        LD_W_ABS,
        0,
        0,
        (libc::SKF_AD_OFF + libc::SKF_AD_IFINDEX) as u32,
    ));
    if let Some(lo) = lo {
        // Over the comparisons and both returns to the loopback block.
        prog.push(ins(JEQ_K, (n + 2) as u8, 0, lo.ifindex));
    }
    for (j, &ifindex) in ifindexes.iter().enumerate() {
        // On a match jump over the remaining comparisons and the reject to the accept.
        prog.push(ins(JEQ_K, (n - j) as u8, 0, ifindex));
    }
    prog.push(ins(RET_K, 0, 0, 0));
    prog.push(ins(RET_K, 0, 0, u32::MAX));
    if let Some(lo) = lo {
        prog.extend(loopback_filter(lo.ports));
    }
    prog
}

/// The `lo` block of [`ifindex_filter`] (offsets from the Ethernet header; a load past the
/// frame's end rejects it).
fn loopback_filter((lo, hi): (u16, u16)) -> [libc::sock_filter; 21] {
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
    const LDX_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // Offsets are to the next instruction: `jt: 2` at 3 goes to 6. ACCEPT is 19, REJECT 20.
    [
        /* 0 */ ins(LD_H_ABS, 0, 0, 12), // EtherType
        /* 1 */ ins(JEQ_K, 0, 9, 0x0800), // IPv4, else to 11
        /* 2 */ ins(LD_B_ABS, 0, 0, 14 + 9), // protocol
        /* 3 */ ins(JEQ_K, 2, 0, 6),
        /* 4 */ ins(JEQ_K, 1, 0, 17),
        /* 5 */ ins(JEQ_K, 0, 14, 132),
        /* 6 */ ins(LD_H_ABS, 0, 0, 14 + 6), // flags and fragment offset
        /* 7 */ ins(JSET_K, 12, 0, 0x1fff), // a later fragment: no ports
        /* 8 */ ins(LDX_MSH, 0, 0, 14), // X = the IPv4 header's length
        /* 9 */ ins(LD_H_IND, 0, 0, 14 + 2), // destination port
        /* 10 */ ins(JA, 0, 0, 6), // to 17
        /* 11 */ ins(JEQ_K, 0, 8, 0x86dd), // IPv6, else reject
        /* 12 */ ins(LD_B_ABS, 0, 0, 14 + 6), // next header
        /* 13 */ ins(JEQ_K, 2, 0, 6),
        /* 14 */ ins(JEQ_K, 1, 0, 17),
        /* 15 */ ins(JEQ_K, 0, 3, 132), // an extension header: accept
        /* 16 */ ins(LD_H_ABS, 0, 0, 14 + 40 + 2), // destination port
        /* 17 */ ins(JGE_K, 0, 2, u32::from(lo)),
        /* 18 */ ins(JGT_K, 1, 0, u32::from(hi)),
        /* 19 */ ins(RET_K, 0, 0, u32::MAX),
        /* 20 */ ins(RET_K, 0, 0, 0),
    ]
}

/// A batch of received frames: ring slots handed over by the kernel, and the frames read
/// from the socket for those marked `TP_STATUS_COPY`. The slots go back to the kernel
/// when the batch is dropped.
#[derive(Debug)]
pub(crate) struct RxBlock<'a> {
    sock: &'a mut PacketSocket,
    start: u32,
    count: u32,
    copies: Vec<Vec<u8>>,
}

impl RxBlock<'_> {
    /// The batch's frames. They borrow the batch, so no slot can be returned to the kernel
    /// while a frame is in use.
    pub(crate) fn frames(&mut self) -> Frames<'_> {
        Frames {
            base: self.sock.map.as_ptr(),
            frame_size: self.sock.frame_size,
            slots: self.sock.slots,
            next: self.start,
            remaining: self.count,
            copies: self.copies.iter_mut(),
            _block: PhantomData,
        }
    }
}

impl Drop for RxBlock<'_> {
    fn drop(&mut self) {
        for i in 0..self.count {
            // Release orders our reads and writes of the slot before the kernel may
            // reuse it.
            self.sock
                .status((self.start + i) % self.sock.slots)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        }
        let room = RX_SPARE.saturating_sub(self.sock.spare.len());
        self.sock.spare.extend(
            self.copies
                .drain(..)
                .filter(|b| b.capacity() > 0)
                .take(room),
        );
    }
}

/// Iterator over the frames of one batch.
#[derive(Debug)]
pub(crate) struct Frames<'b> {
    base: *mut u8,
    frame_size: usize,
    slots: u32,
    next: u32,
    remaining: u32,
    copies: std::slice::IterMut<'b, Vec<u8>>,
    _block: PhantomData<&'b mut [u8]>,
}

/// One received frame.
#[derive(Debug)]
pub(crate) struct RxFrame<'b> {
    /// Interface it arrived on.
    pub(crate) ifindex: u32,
    /// `PACKET_HOST`, `PACKET_BROADCAST`, `PACKET_OTHERHOST`...
    pub(crate) pkttype: u8,
    /// Whether the whole frame was received (in its slot, or read from the socket).
    pub(crate) complete: bool,
    /// Whether it was too big for its slot and read from the socket.
    pub(crate) queued: bool,
    /// Whether it carried an 802.1Q/802.1ad tag with a VLAN id, which the kernel moved
    /// into the ring's header (`TP_STATUS_VLAN_VALID`; VLAN 0, priority tagging, is
    /// untagged).
    pub(crate) vlan: bool,
    /// The `virtio_net_hdr` followed by the Ethernet frame.
    pub(crate) buf: &'b mut [u8],
}

impl<'b> Iterator for Frames<'b> {
    type Item = RxFrame<'b>;

    fn next(&mut self) -> Option<RxFrame<'b>> {
        while self.remaining > 0 {
            self.remaining -= 1;
            let index = self.next;
            self.next = (self.next + 1) % self.slots;
            // Safety: `index < slots`, so the slot lies in the mapping; the kernel wrote a
            // tpacket2_hdr and a sockaddr_ll at its start before handing it over, and both
            // are plain integers (read unaligned to be safe).
            let (p, h, sll) = unsafe {
                let p = self.base.add(index as usize * self.frame_size);
                (
                    p,
                    std::ptr::read_unaligned(p.cast::<libc::tpacket2_hdr>()),
                    std::ptr::read_unaligned(p.add(RX_SLL_OFF).cast::<libc::sockaddr_ll>()),
                )
            };
            let vlan = h.tp_status & libc::TP_STATUS_VLAN_VALID != 0 && h.tp_vlan_tci & 0x0fff != 0;
            if h.tp_status & libc::TP_STATUS_COPY != 0 {
                // One read per such slot, in order (`PacketSocket::next_block`).
                let buf = self.copies.next()?;
                let complete = buf.len() == VNET_HDR_LEN + h.tp_len as usize;
                return Some(RxFrame {
                    ifindex: sll.sll_ifindex as u32,
                    pkttype: sll.sll_pkttype,
                    complete,
                    queued: true,
                    vlan,
                    buf: buf.as_mut_slice(),
                });
            }
            let mac = h.tp_mac as usize;
            let Some(start) = mac.checked_sub(VNET_HDR_LEN) else {
                continue;
            };
            let end = mac + h.tp_snaplen as usize;
            if start < RX_SLL_OFF + size_of::<libc::sockaddr_ll>() || end > self.frame_size {
                continue;
            }
            // Safety: `[start, end)` lies in this slot, after its headers; slots do not
            // overlap and each is visited once, so the slices handed out are disjoint; the
            // slots stay ours for 'b because `Frames<'b>` borrows the `RxBlock` mutably.
            let buf = unsafe { std::slice::from_raw_parts_mut(p.add(start), end - start) };
            return Some(RxFrame {
                ifindex: sll.sll_ifindex as u32,
                pkttype: sll.sll_pkttype,
                complete: h.tp_snaplen == h.tp_len,
                queued: false,
                vlan,
                buf,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_accepts_listed_interfaces_only() {
        let prog = ifindex_filter(&[3, 7], None);
        assert_eq!(prog.len(), 5);
        // jeq 3 jumps over "jeq 7" and "ret 0" to the accept.
        assert_eq!((prog[1].k, prog[1].jt), (3, 2));
        assert_eq!((prog[2].k, prog[2].jt), (7, 1));
        assert_eq!(prog[3].k, 0);
        assert_eq!(prog[4].k, u32::MAX);
        assert_eq!(ifindex_filter(&[], None).len(), 3);
        // `lo` (1) jumps over "jeq 3", "jeq 7" and both returns to its own block.
        let lo = LoopbackFilter {
            ifindex: 1,
            ports: (30000, 32767),
        };
        let prog = ifindex_filter(&[3, 7], Some(lo));
        assert_eq!(prog.len(), 6 + 21);
        assert_eq!((prog[1].k, prog[1].jt, prog[1].jf), (1, 4, 0));
        assert_eq!(
            prog[2 + 4].code,
            (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16
        );
        // Every jump of the block lands inside it.
        for (i, f) in prog.iter().enumerate().skip(6) {
            let class = u32::from(f.code) & 0x07;
            if class == libc::BPF_JMP && u32::from(f.code) & 0xf0 != libc::BPF_JA {
                assert!(i + 1 + usize::from(f.jt.max(f.jf)) < prog.len(), "{i}");
            }
        }
    }
}

/// The transmit ring on a real kernel (root; namespaces of its own, removed on drop).
#[cfg(test)]
mod ring_tests {
    use super::*;
    use std::process::Command;

    /// Two namespaces joined by a veth pair `t0` / `t1`; deleted on drop, also on panic.
    struct Pair {
        a: String,
        b: String,
    }

    impl Pair {
        fn new() -> Option<Pair> {
            let id = std::process::id();
            let pair = Pair {
                a: format!("svtx{id}a"),
                b: format!("svtx{id}b"),
            };
            let ip = |args: &[&str]| {
                Command::new("ip")
                    .args(args)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            let ok = ip(&["netns", "add", &pair.a])
                && ip(&["netns", "add", &pair.b])
                && ip(&[
                    "-n", &pair.a, "link", "add", "t0", "type", "veth", "peer", "name", "t1",
                    "netns", &pair.b,
                ])
                // No IPv6 link-local addresses: no neighbour discovery on the link.
                && ip(&["-n", &pair.a, "link", "set", "t0", "addrgenmode", "none", "up"])
                && ip(&["-n", &pair.b, "link", "set", "t1", "addrgenmode", "none", "up"]);
            ok.then_some(pair)
        }

        fn rx_packets_b(&self) -> u64 {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.b, "cat"])
                .arg("/sys/class/net/t1/statistics/rx_packets")
                .output()
                .expect("read t1's counter");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Frames the kernel did not take (an interface that is gone) are freed and the ring's
    /// head stays where the kernel's is: they never leave later by another interface, and
    /// the ring keeps working across several wraps.
    #[test]
    fn frames_refused_by_one_interface_never_leave_by_another() {
        // Safety: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root under CI"
            );
            println!("SKIP: the transmit ring test needs root");
            return;
        }
        let pair = Pair::new().expect("namespaces and a veth pair");
        let before = pair.rx_packets_b();
        let a = pair.a.clone();
        let sent = std::thread::spawn(move || {
            enter_netns(&a).expect("enter the namespace");
            let t0 = if_index("t0").expect("t0");
            let mut ring = TxRing::open(64).expect("a transmit ring");
            // A local experimental EtherType to the broadcast address, 60 bytes.
            let mut frame = vec![0u8; VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            frame.extend_from_slice(&[0x88, 0xb5]);
            frame.resize(VNET_HDR_LEN + 60, 0x5a);
            let batch: Vec<(u32, &[u8])> = (0..10).map(|_| (0, frame.as_slice())).collect();
            let gone = ring.send(999_999, &batch);
            assert!(matches!(gone, Ok(0) | Err(_)), "{gone:?}");
            let mut taken = 0;
            for _ in 0..50 {
                taken += ring.send(t0, &batch).expect("send on t0");
            }
            taken
        })
        .join()
        .expect("the sending thread");
        assert_eq!(sent, 500, "the kernel takes every frame for t0");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            pair.rx_packets_b() - before,
            500,
            "exactly the frames sent to t0 arrive, none of those t0 never had"
        );
    }
}
