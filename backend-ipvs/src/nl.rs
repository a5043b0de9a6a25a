//! Netlink request/response plumbing over `netlink-sys` sockets: one request, its
//! replies (a dump or an acknowledgement), errors as the kernel's errno. Also the one place
//! that enters a named network namespace (`setns` through `nix`, which wraps the system call
//! safely).

use std::fmt::Debug;
use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::GenlCtrl;
use netlink_packet_generic::ctrl::GenlCtrlCmd;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_sys::Socket;

/// A failed netlink exchange.
#[derive(Debug)]
pub(crate) enum NlError {
    /// The kernel answered with this errno (positive).
    Errno(i32),
    /// The socket failed.
    Io(io::Error),
    /// A reply could not be decoded.
    Decode(String),
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NlError::Errno(e) => write!(f, "{}", io::Error::from_raw_os_error(*e)),
            NlError::Io(e) => write!(f, "netlink socket: {e}"),
            NlError::Decode(e) => write!(f, "undecodable netlink reply: {e}"),
        }
    }
}

pub(crate) use svcnat_iptables::conntrack::in_netns;

/// A netlink socket of one protocol with a sequence counter.
#[derive(Debug)]
pub(crate) struct NlSocket {
    sock: Socket,
    seq: u32,
}

impl NlSocket {
    /// Opens and binds a socket of `protocol` (`NETLINK_GENERIC`, `NETLINK_ROUTE`).
    pub(crate) fn open(protocol: isize) -> io::Result<NlSocket> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        // Extended acks carry the kernel's message; we only need errno, but they cost
        // nothing and a later version may print them.
        let _ = sock.set_ext_ack(true);
        Ok(NlSocket { sock, seq: 0 })
    }

    /// Sends `payload` with `flags` (plus `NLM_F_REQUEST`, and `NLM_F_ACK` unless it is a
    /// dump) and collects the reply messages until the acknowledgement or `NLMSG_DONE`.
    pub(crate) fn request<T>(&mut self, payload: T, flags: u16) -> Result<Vec<T>, NlError>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
        <T as NetlinkDeserializable>::Error: std::fmt::Display,
    {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(NlError::Io)?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(NlError::Io)?;
            let mut at = 0;
            while at < data.len() {
                let msg = NetlinkMessage::<T>::deserialize(&data[at..])
                    .map_err(|e| NlError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(NlError::Decode("zero-length netlink message".into()));
                }
                at += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => return Err(NlError::Errno(-code.get())),
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Overrun(_) => {
                        return Err(NlError::Decode("netlink overrun".into()));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Looks up the id of a generic-netlink family by name (`CTRL_CMD_GETFAMILY`).
pub(crate) fn resolve_family(sock: &mut NlSocket, name: &str) -> Result<u16, NlError> {
    let req = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
    });
    for reply in sock.request(req, 0)? {
        for nla in reply.payload.nlas {
            if let GenlCtrlAttrs::FamilyId(id) = nla {
                return Ok(id);
            }
        }
    }
    Err(NlError::Decode(format!(
        "the controller's reply for {name} carries no family id"
    )))
}
