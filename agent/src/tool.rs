//! Runs a system tool (`nvidia-smi`, `neuron-ls`) with a deadline and a cap on what it may
//! print: a hung or chatty tool costs the agent a bounded wait, never a hang.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one run of a tool may take (callers also share an overall deadline).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much one run may print on each of stdout and stderr.
pub const MAX_TOOL_OUTPUT: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0} is not installed")]
    NotFound(String),
    #[error("{0} did not finish within {1:?}")]
    TimedOut(String, Duration),
    #[error("{0} printed more than {MAX_TOOL_OUTPUT} bytes")]
    TooLarge(String),
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: String,
        /// What it printed, stdout then stderr, trimmed and cut short.
        output: String,
    },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

impl ToolError {
    /// Whether trying the same tool again (with other arguments) is pointless: it is missing,
    /// or it hangs and every try would cost another timeout.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ToolError::NotFound(_) | ToolError::TimedOut(..) | ToolError::Io(..)
        )
    }

    /// What a failed run printed, for callers that read error messages (empty otherwise).
    pub fn output(&self) -> &str {
        match self {
            ToolError::Failed { output, .. } => output,
            _ => "",
        }
    }
}

/// Runs `program` (looked up on PATH) with `args`, stdin closed, in a process group of its
/// own so that a timeout kills whatever it started too. Returns stdout on exit status 0.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, ToolError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ToolError::NotFound(program.to_string()),
            _ => ToolError::Io(program.to_string(), e),
        })?;
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    let readers = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    for (which, pipe) in readers.into_iter().enumerate() {
        let Some(pipe) = pipe else { continue };
        let tx = tx.clone();
        // Detached: a grandchild that escaped the process group could hold the pipe open;
        // then only this thread waits, not the agent.
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let result = pipe
                .take(MAX_TOOL_OUTPUT as u64 + 1)
                .read_to_end(&mut buf)
                .map(|_| buf);
            let _ = tx.send((which, result));
        });
    }
    drop(tx);

    let kill = |child: &mut std::process::Child| {
        // SAFETY: signalling the process group we created for this child.
        unsafe {
            libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let mut out = [Vec::new(), Vec::new()];
    let mut open = 2;
    while open > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((which, Ok(buf))) => {
                if buf.len() > MAX_TOOL_OUTPUT {
                    kill(&mut child);
                    return Err(ToolError::TooLarge(program.to_string()));
                }
                out[which] = buf;
                open -= 1;
            }
            Ok((_, Err(e))) => {
                kill(&mut child);
                return Err(ToolError::Io(program.to_string(), e));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill(&mut child);
                return Err(ToolError::TimedOut(program.to_string(), timeout));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Both pipes are closed; the exit follows at once, but still within the deadline.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                kill(&mut child);
                return Err(ToolError::TimedOut(program.to_string(), timeout));
            }
            Err(e) => {
                kill(&mut child);
                return Err(ToolError::Io(program.to_string(), e));
            }
        }
    };
    let [stdout, stderr] = out;
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    if status.success() {
        return Ok(stdout);
    }
    let mut output = stdout;
    output.push_str(&String::from_utf8_lossy(&stderr));
    let output = output.trim();
    Err(ToolError::Failed {
        program: program.to_string(),
        status: status.to_string(),
        output: output.chars().take(2000).collect(),
    })
}

/// [`run`] with what is left until `deadline` (at most [`TOOL_TIMEOUT`]); past the deadline,
/// times out without starting anything.
pub fn run_until(program: &str, args: &[&str], deadline: Instant) -> Result<String, ToolError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ToolError::TimedOut(program.to_string(), Duration::ZERO));
    }
    run(program, args, left.min(TOOL_TIMEOUT))
}

/// Whether `program` is an executable file in one of PATH's directories.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout_of_a_successful_run() {
        let out = run("sh", &["-c", "echo hello; echo noise >&2"], TOOL_TIMEOUT).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn a_failure_carries_what_the_tool_said() {
        let err = run("sh", &["-c", "echo 'bad field'; exit 2"], TOOL_TIMEOUT).unwrap_err();
        assert!(matches!(err, ToolError::Failed { .. }), "{err}");
        assert_eq!(err.output(), "bad field");
        assert!(!err.is_fatal());
    }

    #[test]
    fn a_missing_tool_is_not_found() {
        let err = run("skyward-no-such-tool", &[], TOOL_TIMEOUT).unwrap_err();
        assert!(matches!(err, ToolError::NotFound(_)), "{err}");
        assert!(err.is_fatal());
        assert!(!on_path("skyward-no-such-tool"));
        assert!(on_path("sh"));
    }

    #[test]
    fn a_hung_tool_and_its_children_are_killed_at_the_deadline() {
        let started = Instant::now();
        // The background sleep holds the pipes open: only killing the group ends it.
        let err = run(
            "sh",
            &["-c", "sleep 600 & sleep 600"],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, ToolError::TimedOut(..)), "{err}");
        assert!(err.is_fatal());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn nothing_starts_past_the_deadline() {
        let err = run_until("sh", &["-c", "exit 0"], Instant::now()).unwrap_err();
        assert!(matches!(err, ToolError::TimedOut(..)), "{err}");
        let soon = Instant::now() + Duration::from_millis(200);
        let err = run_until("sleep", &["5"], soon).unwrap_err();
        assert!(matches!(err, ToolError::TimedOut(..)), "{err}");
        assert!(Instant::now() < soon + Duration::from_secs(2));
    }

    #[test]
    fn endless_output_is_cut_off() {
        let err = run("sh", &["-c", "yes"], TOOL_TIMEOUT).unwrap_err();
        assert!(matches!(err, ToolError::TooLarge(_)), "{err}");
    }
}
