//! SCTP for the testbed's pod server and probe: one-to-one style sockets
//! (`socket(AF_INET/AF_INET6, SOCK_STREAM, IPPROTO_SCTP)`, RFC 6458 section 4).
//!
//! After `accept` or `connect` such a socket reads and writes a byte stream as TCP does
//! (each `write` is one DATA chunk, and the peer's `read` returns bytes in order), so the
//! pod server's line protocol works over it unchanged. The sockets are handed out as std's
//! [`TcpListener`] and [`TcpStream`]: their methods are plain `read`, `write`, `accept`,
//! `shutdown`, `getpeername` and `SO_RCVTIMEO` calls, which SCTP implements the same way.
//! Nothing here is TCP-specific (std's `set_nodelay` would be; it is never called).
//!
//! A kernel without SCTP (no `sctp` module, or it is blacklisted) refuses the socket
//! with `EPROTONOSUPPORT`; [`available`] tells.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd as _, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, connect, getsockopt,
    listen, setsockopt, socket, sockopt,
};

/// Whether this kernel opens SCTP sockets; the reason when it does not.
pub fn available() -> Result<(), String> {
    match open(AddressFamily::Inet) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "this kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e})"
        )),
    }
}

fn open(family: AddressFamily) -> io::Result<OwnedFd> {
    socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Sctp,
    )
    .map_err(io::Error::from)
}

fn family_of(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// A listening one-to-one SCTP socket on `addr` (an IPv6 wildcard also takes IPv4, as
/// `bindv6only` says).
pub fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = open(family_of(&addr))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, nix::sys::socket::Backlog::new(128)?)?;
    Ok(TcpListener::from(fd))
}

/// Binds `[::]:port` (dual stack) and, when that does not cover IPv4 or IPv6 is missing,
/// `0.0.0.0:port` as well.
pub fn listen_all(port: u16) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let v6 = listen_on(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    let v6_ok = v6.is_ok();
    if let Ok(l) = v6 {
        listeners.push(l);
    }
    match listen_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
        Ok(l) => listeners.push(l),
        Err(e) if v6_ok && e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("sctp bind 0.0.0.0:{port}: {e}"),
            ));
        }
    }
    Ok(listeners)
}

/// Opens an association to `target` within `timeout`.
///
/// `IP_RECVERR` (`IPV6_RECVERR`) is set first: without it Linux SCTP keeps an ICMP port
/// unreachable answering its INIT as a "soft" error and retransmits the INIT until its
/// retries run out; with it the error ends the attempt (`ECONNREFUSED`), as a REJECT does
/// for TCP. The kernel still checks that the ICMP quotes this association's INIT (RFC 4960
/// appendix C), so a forged error cannot refuse it.
pub fn connect_timeout(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let fd = open(family_of(&target))?;
    match target {
        SocketAddr::V4(_) => setsockopt(&fd, sockopt::Ipv4RecvErr, &true)?,
        SocketAddr::V6(_) => setsockopt(&fd, sockopt::Ipv6RecvErr, &true)?,
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&stream);
    match connect(raw, &SockaddrStorage::from(target)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => wait_connected(&stream, timeout)?,
        Err(e) => return Err(e.into()),
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Waits until a non-blocking connect completes (or fails, or `timeout` passes).
fn wait_connected(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no SCTP association in time",
            ));
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let error = getsockopt(stream, sockopt::SocketError)?;
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error));
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "SCTP association failed",
            ));
        }
        if revents.contains(PollFlags::POLLOUT) {
            return Ok(());
        }
    }
}
