//! `wasm-device-plugin`: parses the command line, sets up logging, runs the
//! subcommand and turns its result into an exit code. Nothing else.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use wasm_device_plugin::config::{Cli, Command, LogFormat};
use wasm_device_plugin::{app, demo, inspect};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    // A check's failure is its one line on stderr, not a log event as well.
    let log_failure = !matches!(cli.command, Command::Validate(_) | Command::Allocate(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(cause = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                app::run(args.host_config(), args.metrics_addr.0, shutdown).await
            }
            Command::Demo(args) => demo::run(&args, &mut std::io::stdout()).await,
            Command::Validate(args) => inspect::validate(&args, &mut std::io::stdout())
                .await
                .map_err(|e| anyhow::anyhow!(e.summary())),
            Command::Allocate(args) => inspect::allocate(&args, &mut std::io::stdout())
                .await
                .map_err(|e| anyhow::anyhow!(e.summary())),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if log_failure {
                tracing::error!("{err:#}");
            }
            // Not `eprintln!`, which panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on SIGTERM (what kubelet sends a DaemonSet pod) or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // Cancel first: nothing (not even a failing log write) may stand between
    // the signal and the shutdown.
    shutdown.cancel();
    tracing::info!(signal = name, "stopping");
}

fn init_tracing(cli: &Cli) {
    // The demo's and the checks' reports go to stdout; keep their log to
    // warnings (errors for the checks, whose own failure is one line) unless asked.
    let default = match cli.command {
        Command::Run(_) => "info",
        Command::Demo(_) => "warn",
        Command::Validate(_) | Command::Allocate(_) => "error",
    };
    let filter = match &cli.log {
        Some(directives) => EnvFilter::new(directives),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    // A log that cannot be written (stderr closed by whatever read it) is lost,
    // never fatal: the default reports it with `eprintln!`, which panics on a
    // closed stderr and took down the task that logged, hanging shutdown.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
