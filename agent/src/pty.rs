//! Pseudo-terminals for terminal tasks (`skyward shell`): the program gets the slave side as
//! its controlling terminal, the agent reads and writes the master side.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Both sides of a fresh pseudo-terminal.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: File,
}

fn check(result: libc::c_int) -> io::Result<()> {
    match result {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Opens a pseudo-terminal of `rows` x `cols`.
pub fn open(rows: u16, cols: u16) -> io::Result<Pty> {
    // SAFETY: posix_openpt returns a new descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the calls read the descriptor; ptsname_r writes at most `name.len()` bytes.
    unsafe {
        check(libc::grantpt(fd))?;
        check(libc::unlockpt(fd))?;
        check(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()))?;
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .map_err(|_| io::Error::other("pseudo-terminal name is not UTF-8"))?
        .to_string();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    resize(master.as_raw_fd(), rows, cols)?;
    Ok(Pty { master, slave })
}

/// Gives the terminal behind `fd` a new size (its program gets SIGWINCH).
pub fn resize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) })
}

/// In the child, before exec: a session of its own with the terminal on its stdin as its
/// controlling terminal. Only async-signal-safe calls.
pub fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of the parent.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        check(libc::ioctl(0, libc::TIOCSCTTY, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn what_the_slave_writes_the_master_reads_and_sizes_apply() {
        let pty = open(30, 100).unwrap();
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize into `size`.
        assert_eq!(
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) },
            0
        );
        assert_eq!((size.ws_row, size.ws_col), (30, 100));
        resize(pty.master.as_raw_fd(), 40, 120).unwrap();
        assert_eq!(
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) },
            0
        );
        assert_eq!((size.ws_row, size.ws_col), (40, 120));
        let mut slave = pty.slave;
        slave.write_all(b"hello\n").unwrap();
        let mut master = File::from(pty.master);
        let mut buf = [0u8; 64];
        let n = master.read(&mut buf).unwrap();
        // The line discipline turns \n into \r\n.
        assert_eq!(&buf[..n], b"hello\r\n");
    }
}
