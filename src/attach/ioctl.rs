//! The older ioctl interface of the kernel NBD client (Linux `include/uapi/linux/nbd.h`),
//! used where the `nbd` generic netlink family is unavailable.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `_IO(0xab, nr)` request numbers of `linux/nbd.h`.
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// A failed NBD ioctl.
#[derive(Debug, thiserror::Error)]
#[error("ioctl {request} on {device} failed: {source}")]
pub struct IoctlError {
    pub request: &'static str,
    pub device: String,
    #[source]
    pub source: io::Error,
}

impl IoctlError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn nbd_ioctl(device: &File, request: libc::c_ulong, argument: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every NBD ioctl used here takes an integer argument, never a pointer,
    // and device is an open descriptor for the duration of the call.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), request as _, argument) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The configuration the ioctls set before `NBD_DO_IT`.
#[derive(Clone, Debug)]
pub struct IoctlConfig {
    pub block_size: u64,
    pub size_bytes: u64,
    pub server_flags: u64,
    pub timeout_secs: u64,
}

/// Configures `device` and hands it `sockets`. The caller then runs
/// [`do_it`] in a thread of its own: it blocks until the device is disconnected.
pub fn configure(
    device: &File,
    path: &str,
    config: &IoctlConfig,
    sockets: &[RawFd],
) -> Result<(), IoctlError> {
    let fail = |request: &'static str| {
        let device = path.to_string();
        move |source| IoctlError {
            request,
            device,
            source,
        }
    };
    for socket in sockets {
        nbd_ioctl(device, NBD_SET_SOCK, *socket as libc::c_ulong).map_err(fail("NBD_SET_SOCK"))?;
    }
    let blocks = config.size_bytes / config.block_size;
    let steps: [(&'static str, libc::c_ulong, u64); 4] = [
        ("NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, config.block_size),
        ("NBD_SET_SIZE_BLOCKS", NBD_SET_SIZE_BLOCKS, blocks),
        ("NBD_SET_FLAGS", NBD_SET_FLAGS, config.server_flags),
        ("NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, config.timeout_secs),
    ];
    for (name, request, value) in steps {
        let value = libc::c_ulong::try_from(value).map_err(|_| IoctlError {
            request: name,
            device: path.to_string(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("value {value} does not fit an unsigned long"),
            ),
        })?;
        if let Err(source) = nbd_ioctl(device, request, value) {
            let _ = nbd_ioctl(device, NBD_CLEAR_SOCK, 0);
            return Err(fail(name)(source));
        }
    }
    Ok(())
}

/// Runs the device until it is disconnected (`NBD_DO_IT`), then clears its
/// queue and sockets so that the device can be used again.
pub fn do_it(device: &File, path: &str) -> Result<(), IoctlError> {
    let result = nbd_ioctl(device, NBD_DO_IT, 0);
    let _ = nbd_ioctl(device, NBD_CLEAR_QUE, 0);
    let _ = nbd_ioctl(device, NBD_CLEAR_SOCK, 0);
    match result {
        Ok(()) => Ok(()),
        // Older kernels end NBD_DO_IT with EPIPE after a requested disconnect.
        Err(source) if source.raw_os_error() == Some(libc::EPIPE) => Ok(()),
        Err(source) => Err(IoctlError {
            request: "NBD_DO_IT",
            device: path.to_string(),
            source,
        }),
    }
}

/// Asks the kernel to disconnect `device` (`NBD_DISCONNECT`).
pub fn disconnect(device: &File, path: &str) -> Result<(), IoctlError> {
    nbd_ioctl(device, NBD_DISCONNECT, 0).map_err(|source| IoctlError {
        request: "NBD_DISCONNECT",
        device: path.to_string(),
        source,
    })
}
