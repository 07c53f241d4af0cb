//! `skyward`, the command line: its arguments (`cli.rs`), settings files and variables
//! (`config.rs`), output (`output.rs`), exit codes (`exit.rs`), and the pools that outlive a
//! command (`persistent.rs`, the client side; `daemon.rs`, the background coordinator and its
//! control socket). Everything else is in the library crates it drives.

mod cli;
mod config;
mod daemon;
mod envfile;
mod exit;
mod output;
mod persistent;
mod pool_session;

fn main() {
    let cli = match cli::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(code) => std::process::exit(code),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A background coordinator's log is a file: plain text there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYWARD_LOG")
                // The AWS credential chain warns about every source it tried when none has
                // credentials; `skyward providers` says that in one line with the fix.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,aws_config::meta::credentials=error")
                }),
        )
        .init();
    skyward_common::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("skyward: cannot start the async runtime: {e}");
            std::process::exit(255);
        }
    };
    let code = runtime.block_on(cli::main(cli));
    // Exit without dropping the runtime: that would wait for a stdin reader blocked in a
    // background thread (a terminal's, for `skyward shell`).
    std::process::exit(code);
}
