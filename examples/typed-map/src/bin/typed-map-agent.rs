//! The custom agent: the stock `skyward-agent` (same flags and environment) that also runs
//! `Sum` tasks.

fn main() -> std::process::ExitCode {
    skyward_agent::Agent::new()
        .register::<typed_map::Sum>()
        .main()
}
