use std::io::{IsTerminal, Write};

use anyhow::Context;
use herald::config::{Cli, Command, ConfigCommand, LoadError, LogFormat};
use herald::server::{Server, shutdown_signal};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Until the settings are read there is no logger: a bad command line or configuration
    // file is reported on stderr as plain text, whatever the log format (exit code 2).
    let loaded = match Cli::load() {
        Ok(loaded) => loaded,
        Err(LoadError::Args(error)) => error.exit(),
        Err(LoadError::Config(error)) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    let format = match &loaded.cli.command {
        Command::Serve(config) => config.log_format,
        Command::Config(ConfigCommand::Check(check)) => check.config.log_format,
        Command::Token(_) | Command::Demo(_) => LogFormat::Text,
    };
    init_logging(format);
    match loaded.cli.command {
        Command::Serve(config) => serve(*config).await,
        Command::Token(args) => {
            println!(
                "{}",
                herald::auth::mint(&args).context("signing the token")?
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Check(_)) => {
            let effective = loaded.effective.context("`config check` has settings")?;
            let mut stdout = std::io::stdout();
            write!(stdout, "{effective}")?;
            stdout.flush()?;
            Ok(())
        }
        Command::Demo(args) => {
            let finished = herald::demo::run(args, &mut std::io::stdout()).await?;
            println!(
                "done: {} events in session {}",
                finished.events, finished.session_id
            );
            Ok(())
        }
    }
}

/// Logs go to stderr, filtered by `HERALD_LOG`, as `--log-format` says.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,socketioxide=warn,engineioxide=warn,fjall=warn,lsm_tree=warn")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // The event's fields beside `timestamp`, `level` and `target`, not nested under
        // `fields`: what log shippers index without a mapping.
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
}

async fn serve(config: herald::Config) -> anyhow::Result<()> {
    if let Some(file) = &config.config_file {
        tracing::info!(file = %file.display(), "configuration file read");
    }
    if config.dev {
        tracing::warn!("development mode: CORS allows every origin");
    }
    let server = Server::bind(config).await.context("starting herald")?;
    let addr = server.local_addr();
    // The one line on stdout: scripts and tests read the port from it.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "herald listening on http://{addr}")?;
    stdout.flush()?;
    tracing::info!(%addr, "ready");
    server.serve(shutdown_signal()).await.context("serving")?;
    tracing::info!("stopped");
    Ok(())
}
