use std::process::ExitCode;

/// The stock agent: no typed tasks (a custom agent registers its own, see
/// `skyward_agent::Agent`).
fn main() -> ExitCode {
    skyward_agent::Agent::new().main()
}
