fn main() {
    let cli = match skyward_coordinator::cli::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(code) => std::process::exit(code),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
    let code = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(skyward_coordinator::cli::main(cli)),
        Err(e) => {
            eprintln!("skyward: cannot start the async runtime: {e}");
            255
        }
    };
    // Exit without waiting on a stdin reader blocked in a background thread.
    std::process::exit(code);
}
