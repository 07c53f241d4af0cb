//! `skyward shell`: an interactive terminal on a node, driven as a person would through a
//! pseudo-terminal of the test's own.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skyward_tests::{run, Sandbox};

const LIMIT: Duration = Duration::from_secs(60);

/// The user's side of a terminal: what the program printed so far, and the keys to type.
struct Screen {
    keys: File,
    seen: Arc<Mutex<String>>,
}

impl Screen {
    fn type_line(&mut self, line: &str) {
        self.keys.write_all(line.as_bytes()).unwrap();
        self.keys.write_all(b"\r").unwrap();
    }

    /// Waits until `needle` shows up after `from` bytes of output; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if let Some(at) = seen.get(from..).and_then(|rest| rest.find(needle)) {
                return from + at + needle.len();
            }
            assert!(Instant::now() < deadline, "no {needle:?} in {seen:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn set_size(fd: i32, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) }, 0);
}

/// A pseudo-terminal pair: (master, slave).
fn terminal() -> (File, File) {
    // SAFETY: plain libc calls on a descriptor owned here; ptsname_r writes within `name`.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0);
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_str()
            .unwrap()
            .to_string();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        (File::from_raw_fd(master), slave)
    }
}

#[test]
fn a_shell_on_a_node_types_reads_resizes_and_exits() {
    let sandbox = Sandbox::new();
    let up = run(
        sandbox
            .skyward()
            .args(["pool", "up", "term", "--nodes", "2"]),
        LIMIT,
    );
    assert_eq!(up.code, Some(0), "{up:?}");

    let (master, slave) = terminal();
    set_size(master.as_raw_fd(), 33, 101);
    let mut child = sandbox
        .skyward()
        .args(["shell", "term", "node-2"])
        .env("TERM", "xterm-test")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn shell");
    let seen = Arc::new(Mutex::new(String::new()));
    let mut reader = master.try_clone().unwrap();
    let collected = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            collected
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut screen = Screen { keys: master, seen };

    screen.type_line("echo node=$SKYWARD_NODE_ID answer=$((6*7)) term=$TERM");
    let at = screen.wait_for("node=node-2 answer=42 term=xterm-test", 0);
    screen.type_line("tty; stty size");
    let at = screen.wait_for("/dev/pts/", at);
    let at = screen.wait_for("33 101", at);
    // The window changes: the remote terminal follows.
    set_size(screen.keys.as_raw_fd(), 40, 120);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGWINCH);
    }
    std::thread::sleep(Duration::from_millis(300));
    screen.type_line("stty size");
    let at = screen.wait_for("40 120", at);
    // Ctrl-C reaches the remote foreground program, not this CLI.
    screen.type_line("sleep 30");
    std::thread::sleep(Duration::from_millis(300));
    screen.keys.write_all(b"\x03").unwrap();
    screen.type_line("echo after-interrupt");
    screen.wait_for("after-interrupt\r\n", at);
    screen.type_line("exit 3");

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the shell did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(3), "{}", screen.seen.lock().unwrap());

    let unknown = run(sandbox.skyward().args(["shell", "term", "node-9"]), LIMIT);
    assert_eq!(unknown.code, Some(2), "{unknown:?}");
    assert!(unknown.stderr.contains("node-1, node-2"), "{unknown:?}");

    let down = run(sandbox.skyward().args(["pool", "down", "term"]), LIMIT);
    assert_eq!(down.code, Some(0), "{down:?}");
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}
