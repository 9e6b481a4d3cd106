//! Client of the kernel's `nbd` generic netlink family (Linux
//! `include/uapi/linux/nbd-netlink.h` and `drivers/block/nbd.c`).
//!
//! The messages are small and fixed, so they are encoded by hand: a
//! `nlmsghdr`, a `genlmsghdr` and a list of `nlattr` attributes, each padded
//! to 4 bytes (`NLA_ALIGN`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Generic netlink controller family id (`GENL_ID_CTRL`).
const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`: resolve a family name to its id.
const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (u16) and `CTRL_ATTR_FAMILY_NAME` (string).
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// Marks an attribute whose payload is a list of attributes.
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLMSG_HDR_LEN: usize = 16;
const GENL_HDR_LEN: usize = 4;
const NLA_HDR_LEN: usize = 4;

/// Name and version of the kernel NBD family (`NBD_GENL_FAMILY_NAME`, `NBD_GENL_VERSION`).
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

/// Commands of the `nbd` family.
pub mod cmd {
    pub const NBD_CMD_CONNECT: u8 = 1;
    pub const NBD_CMD_DISCONNECT: u8 = 2;
    pub const NBD_CMD_RECONFIGURE: u8 = 3;
    pub const NBD_CMD_STATUS: u8 = 5;
}

/// Top-level attributes of the `nbd` family, with their payload types.
pub mod attr {
    /// u32
    pub const NBD_ATTR_INDEX: u16 = 1;
    /// u64
    pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
    /// u64
    pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    /// u64, seconds
    pub const NBD_ATTR_TIMEOUT: u16 = 4;
    /// u64, `NBD_FLAG_*` transmission flags
    pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
    /// nested list of `NBD_SOCK_ITEM`
    pub const NBD_ATTR_SOCKETS: u16 = 7;
    /// u64, seconds
    pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    /// nested list of `NBD_DEVICE_ITEM`
    pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
    /// NUL-terminated string
    pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;

    pub const NBD_SOCK_ITEM: u16 = 1;
    /// u32 file descriptor of the calling process
    pub const NBD_SOCK_FD: u16 = 1;

    pub const NBD_DEVICE_ITEM: u16 = 1;
    /// u32
    pub const NBD_DEVICE_INDEX: u16 = 1;
    /// u8, 1 when the device has a configuration
    pub const NBD_DEVICE_CONNECTED: u16 = 2;
}

/// A failure talking to the kernel over generic netlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("failed to {step} on the generic netlink socket: {source}")]
    Socket {
        step: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("the generic netlink family {NBD_GENL_FAMILY_NAME:?} is not registered: the nbd kernel module is not loaded (run `modprobe nbd`)")]
    FamilyNotFound,

    #[error("the kernel rejected {command}: {source}")]
    Kernel {
        command: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("malformed netlink reply to {command}: {reason}")]
    Malformed {
        command: &'static str,
        reason: String,
    },
}

impl NetlinkError {
    /// The errno the kernel returned for a rejected command, if that is the failure.
    pub fn kernel_errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// An attribute value to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    U32(u16, u32),
    U64(u16, u64),
    /// Encoded with a terminating NUL.
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

impl Attr {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; NLA_HDR_LEN]);
        let kind = match self {
            Attr::U32(kind, value) => {
                out.extend_from_slice(&value.to_ne_bytes());
                *kind
            }
            Attr::U64(kind, value) => {
                out.extend_from_slice(&value.to_ne_bytes());
                *kind
            }
            Attr::Str(kind, value) => {
                out.extend_from_slice(value.as_bytes());
                out.push(0);
                *kind
            }
            Attr::Nested(kind, children) => {
                for child in children {
                    child.encode(out);
                }
                *kind | NLA_F_NESTED
            }
        };
        // nla_len counts the header and payload but not the trailing padding.
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        out.resize(align4(out.len()), 0);
    }
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Encodes one request message: `nlmsghdr`, `genlmsghdr`, attributes.
pub fn encode_request(family: u16, command: u8, version: u8, seq: u32, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDR_LEN];
    out.extend_from_slice(&[command, version, 0, 0]);
    for attr in attrs {
        attr.encode(&mut out);
    }
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the sender's port id.
    out
}

/// Splits an attribute stream into `(type without flags, payload)` pairs.
pub fn parse_attrs(mut data: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut attrs = Vec::new();
    while data.len() >= NLA_HDR_LEN {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDR_LEN || len > data.len() {
            return Err(format!(
                "attribute of type {kind} claims {len} bytes with {} left",
                data.len()
            ));
        }
        attrs.push((kind, &data[NLA_HDR_LEN..len]));
        data = &data[align4(len).min(data.len())..];
    }
    Ok(attrs)
}

fn payload_u32(command: &'static str, payload: &[u8]) -> Result<u32, NetlinkError> {
    let bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| NetlinkError::Malformed {
            command,
            reason: format!("expected a 4-byte value, got {} bytes", payload.len()),
        })?;
    Ok(u32::from_ne_bytes(bytes))
}

/// One device in an `NBD_CMD_STATUS` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

/// Parses the attributes of an `NBD_CMD_STATUS` reply.
pub fn parse_status(attrs: &[u8]) -> Result<Vec<DeviceStatus>, NetlinkError> {
    let malformed = |reason: String| NetlinkError::Malformed {
        command: "NBD_CMD_STATUS",
        reason,
    };
    let mut devices = Vec::new();
    for (kind, list) in parse_attrs(attrs).map_err(malformed)? {
        if kind != attr::NBD_ATTR_DEVICE_LIST {
            continue;
        }
        for (item_kind, item) in parse_attrs(list).map_err(malformed)? {
            if item_kind != attr::NBD_DEVICE_ITEM {
                continue;
            }
            let mut index = None;
            let mut connected = false;
            for (field, payload) in parse_attrs(item).map_err(malformed)? {
                match field {
                    attr::NBD_DEVICE_INDEX => index = Some(payload_u32("NBD_CMD_STATUS", payload)?),
                    attr::NBD_DEVICE_CONNECTED => {
                        connected = payload.first().is_some_and(|b| *b != 0)
                    }
                    _ => {}
                }
            }
            let index =
                index.ok_or_else(|| malformed("a device item has no NBD_DEVICE_INDEX".into()))?;
            devices.push(DeviceStatus { index, connected });
        }
    }
    Ok(devices)
}

/// A generic netlink socket bound to the `nbd` family.
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens a generic netlink socket and resolves the `nbd` family.
    pub fn open() -> Result<NbdNetlink, NetlinkError> {
        let socket_error = |step| move |source| NetlinkError::Socket { step, source };
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(socket_error("create")(io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: sockaddr_nl is plain data, so all zeroes is a valid value.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: address points to a live sockaddr_nl and the length matches its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(socket_error("bind")(io::Error::last_os_error()));
        }

        let mut socket = NbdNetlink {
            fd,
            family: 0,
            seq: 1,
        };
        socket.family = socket.resolve_family()?;
        Ok(socket)
    }

    fn resolve_family(&mut self) -> Result<u16, NetlinkError> {
        let attrs = [Attr::Str(
            CTRL_ATTR_FAMILY_NAME,
            NBD_GENL_FAMILY_NAME.to_string(),
        )];
        let replies = match self.transact(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            1,
            &attrs,
            "CTRL_CMD_GETFAMILY",
        ) {
            Ok(replies) => replies,
            Err(error) if error.kernel_errno() == Some(libc::ENOENT) => {
                return Err(NetlinkError::FamilyNotFound)
            }
            Err(error) => return Err(error),
        };
        for reply in &replies {
            let attrs = parse_attrs(reply).map_err(|reason| NetlinkError::Malformed {
                command: "CTRL_CMD_GETFAMILY",
                reason,
            })?;
            for (kind, payload) in attrs {
                if kind == CTRL_ATTR_FAMILY_ID && payload.len() >= 2 {
                    return Ok(u16::from_ne_bytes([payload[0], payload[1]]));
                }
            }
        }
        Err(NetlinkError::Malformed {
            command: "CTRL_CMD_GETFAMILY",
            reason: "the reply has no CTRL_ATTR_FAMILY_ID".to_string(),
        })
    }

    /// Sends one `nbd` command and returns the attribute payloads of its replies.
    pub fn request(
        &mut self,
        command: u8,
        name: &'static str,
        attrs: &[Attr],
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.transact(self.family, command, NBD_GENL_VERSION, attrs, name)
    }

    /// Sends a request with `NLM_F_ACK` and reads until the acknowledgement,
    /// collecting the attribute payload of every data message on the way.
    fn transact(
        &mut self,
        family: u16,
        command: u8,
        version: u8,
        attrs: &[Attr],
        name: &'static str,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let message = encode_request(family, command, version, seq, attrs);
        send_all(self.fd.as_raw_fd(), &message).map_err(|source| NetlinkError::Socket {
            step: "send a request",
            source,
        })?;

        let mut replies = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buffer is a live, writable allocation of buffer.len() bytes.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Socket {
                    step: "receive a reply",
                    source: error,
                });
            }
            let mut data = &buffer[..received as usize];
            while data.len() >= NLMSG_HDR_LEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let reply_seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if len < NLMSG_HDR_LEN || len > data.len() {
                    return Err(NetlinkError::Malformed {
                        command: name,
                        reason: format!("message claims {len} bytes with {} left", data.len()),
                    });
                }
                let body = &data[NLMSG_HDR_LEN..len];
                data = &data[align4(len).min(data.len())..];
                if reply_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| NetlinkError::Malformed {
                                command: name,
                                reason: "NLMSG_ERROR shorter than 4 bytes".to_string(),
                            })?;
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Kernel {
                            command: name,
                            source: io::Error::from_raw_os_error(-code),
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ if body.len() >= GENL_HDR_LEN => replies.push(body[GENL_HDR_LEN..].to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// Connects a device: returns the index the kernel used.
    pub fn connect(&mut self, request: &ConnectRequest) -> Result<u32, NetlinkError> {
        let mut attrs = vec![
            Attr::U64(attr::NBD_ATTR_SIZE_BYTES, request.size_bytes),
            Attr::U64(attr::NBD_ATTR_BLOCK_SIZE_BYTES, request.block_size),
            Attr::U64(attr::NBD_ATTR_SERVER_FLAGS, request.server_flags),
            Attr::U64(attr::NBD_ATTR_TIMEOUT, request.timeout_secs),
            Attr::U64(
                attr::NBD_ATTR_DEAD_CONN_TIMEOUT,
                request.dead_conn_timeout_secs,
            ),
            sockets_attr(&request.sockets),
            Attr::Str(attr::NBD_ATTR_BACKEND_IDENTIFIER, request.backend.clone()),
        ];
        if let Some(index) = request.index {
            attrs.insert(0, Attr::U32(attr::NBD_ATTR_INDEX, index));
        }
        let replies = self.request(cmd::NBD_CMD_CONNECT, "NBD_CMD_CONNECT", &attrs)?;
        for reply in &replies {
            let parsed = parse_attrs(reply).map_err(|reason| NetlinkError::Malformed {
                command: "NBD_CMD_CONNECT",
                reason,
            })?;
            for (kind, payload) in parsed {
                if kind == attr::NBD_ATTR_INDEX {
                    return payload_u32("NBD_CMD_CONNECT", payload);
                }
            }
        }
        // Kernels that send no reply leave the requested index in place.
        request.index.ok_or_else(|| NetlinkError::Malformed {
            command: "NBD_CMD_CONNECT",
            reason: "the reply has no NBD_ATTR_INDEX".to_string(),
        })
    }

    /// Hands new sockets to a connected device whose connections died.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        sockets: &[RawFd],
        timeout_secs: u64,
        dead_conn_timeout_secs: u64,
    ) -> Result<(), NetlinkError> {
        let attrs = [
            Attr::U32(attr::NBD_ATTR_INDEX, index),
            Attr::U64(attr::NBD_ATTR_TIMEOUT, timeout_secs),
            Attr::U64(attr::NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_secs),
            sockets_attr(sockets),
            Attr::Str(attr::NBD_ATTR_BACKEND_IDENTIFIER, backend.to_string()),
        ];
        self.request(cmd::NBD_CMD_RECONFIGURE, "NBD_CMD_RECONFIGURE", &attrs)?;
        Ok(())
    }

    /// Asks the kernel to disconnect a device.
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        let attrs = [Attr::U32(attr::NBD_ATTR_INDEX, index)];
        self.request(cmd::NBD_CMD_DISCONNECT, "NBD_CMD_DISCONNECT", &attrs)?;
        Ok(())
    }

    /// Returns the state of one device, or of all devices when `index` is `None`.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, NetlinkError> {
        let attrs: Vec<Attr> = index
            .map(|i| Attr::U32(attr::NBD_ATTR_INDEX, i))
            .into_iter()
            .collect();
        let replies = self.request(cmd::NBD_CMD_STATUS, "NBD_CMD_STATUS", &attrs)?;
        let mut devices = Vec::new();
        for reply in &replies {
            devices.extend(parse_status(reply)?);
        }
        Ok(devices)
    }
}

fn sockets_attr(sockets: &[RawFd]) -> Attr {
    let items = sockets
        .iter()
        .map(|fd| {
            Attr::Nested(
                attr::NBD_SOCK_ITEM,
                vec![Attr::U32(attr::NBD_SOCK_FD, *fd as u32)],
            )
        })
        .collect();
    Attr::Nested(attr::NBD_ATTR_SOCKETS, items)
}

fn send_all(fd: RawFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data, so all zeroes is a valid value.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    loop {
        // SAFETY: message and kernel are live for the call, and the lengths match them.
        let sent = unsafe {
            libc::sendto(
                fd,
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent >= 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Everything `NBD_CMD_CONNECT` sets.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// Device index, or `None` to let the kernel pick a free device.
    pub index: Option<u32>,
    pub size_bytes: u64,
    pub block_size: u64,
    pub server_flags: u64,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub sockets: Vec<RawFd>,
    pub backend: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_and_padding() {
        let message = encode_request(
            0x1d,
            cmd::NBD_CMD_DISCONNECT,
            1,
            7,
            &[Attr::Str(
                attr::NBD_ATTR_BACKEND_IDENTIFIER,
                "ab".to_string(),
            )],
        );
        // 16 header + 4 genl + (4 + 3 -> padded to 8).
        assert_eq!(message.len(), 28);
        assert_eq!(u32::from_ne_bytes(message[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes(message[4..6].try_into().unwrap()), 0x1d);
        assert_eq!(u32::from_ne_bytes(message[8..12].try_into().unwrap()), 7);
        assert_eq!(message[16], cmd::NBD_CMD_DISCONNECT);
        assert_eq!(
            u16::from_ne_bytes(message[20..22].try_into().unwrap()),
            7,
            "nla_len excludes padding"
        );
        assert_eq!(&message[24..28], b"ab\0\0");
    }

    #[test]
    fn nested_sockets_round_trip() {
        let mut out = Vec::new();
        sockets_attr(&[5, 9]).encode(&mut out);
        let top = parse_attrs(&out).unwrap();
        assert_eq!(top.len(), 1);
        assert_eq!(
            top[0].0,
            attr::NBD_ATTR_SOCKETS,
            "nested flag is masked off"
        );
        let items = parse_attrs(top[0].1).unwrap();
        let fds: Vec<u32> = items
            .iter()
            .map(|(kind, item)| {
                assert_eq!(*kind, attr::NBD_SOCK_ITEM);
                let fields = parse_attrs(item).unwrap();
                assert_eq!(fields[0].0, attr::NBD_SOCK_FD);
                payload_u32("test", fields[0].1).unwrap()
            })
            .collect();
        assert_eq!(fds, [5, 9]);
    }

    #[test]
    fn status_reply_parses() {
        let device = |index: u32, connected: u8| {
            let mut item = Vec::new();
            Attr::U32(attr::NBD_DEVICE_INDEX, index).encode(&mut item);
            // A u8 attribute: 4 header bytes, 1 payload byte, 3 padding bytes.
            item.extend_from_slice(&5u16.to_ne_bytes());
            item.extend_from_slice(&attr::NBD_DEVICE_CONNECTED.to_ne_bytes());
            item.extend_from_slice(&[connected, 0, 0, 0]);
            item
        };
        let mut items = Vec::new();
        for (index, connected) in [(0, 1), (3, 0)] {
            let body = device(index, connected);
            items.extend_from_slice(&((body.len() + 4) as u16).to_ne_bytes());
            items.extend_from_slice(&(attr::NBD_DEVICE_ITEM | NLA_F_NESTED).to_ne_bytes());
            items.extend_from_slice(&body);
        }
        let mut reply = Vec::new();
        reply.extend_from_slice(&((items.len() + 4) as u16).to_ne_bytes());
        reply.extend_from_slice(&(attr::NBD_ATTR_DEVICE_LIST | NLA_F_NESTED).to_ne_bytes());
        reply.extend_from_slice(&items);

        let devices = parse_status(&reply).unwrap();
        assert_eq!(
            devices,
            [
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 3,
                    connected: false
                }
            ]
        );
    }

    #[test]
    fn truncated_attribute_is_rejected() {
        let cases: [&[u8]; 3] = [
            &[8, 0, 1, 0, 1, 2], // claims 8 bytes, has 6
            &[2, 0, 1, 0],       // shorter than its own header
            &[255, 255, 1, 0, 0, 0, 0, 0],
        ];
        for case in cases {
            assert!(parse_attrs(case).is_err(), "{case:?}");
        }
    }
}
