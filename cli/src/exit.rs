//! Exit codes, decided here for every command: the command's own code where it ran one,
//! [`USAGE`] when the command line was wrong, [`FAILURE`] when Skyward itself failed.

/// The value of a `Result<_, String>`, or: say why on stderr and return `$code` from the
/// calling command.
macro_rules! or_exit {
    ($result:expr, $code:expr) => {
        match $result {
            Ok(value) => value,
            Err(message) => {
                eprintln!("skyward: {message}");
                return $code;
            }
        }
    };
}
pub(crate) use or_exit;

/// Exit code for a command line that was wrong (nothing was started).
pub const USAGE: i32 = 2;
/// Exit code when Skyward itself failed (as ssh uses 255).
pub const FAILURE: i32 = 255;

/// The exit code for a pool session that could not start.
pub fn start_error(error: &skyward_coordinator::session::StartError) -> i32 {
    match error {
        skyward_coordinator::session::StartError::Plan(_) => USAGE,
        skyward_coordinator::session::StartError::Failed(_) => FAILURE,
    }
}
