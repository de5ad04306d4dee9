use std::io::{IsTerminal, Write};

use anyhow::Context;
use herald::config::{Cli, Command, ConfigCommand, LoadError};
use herald::server::{Server, shutdown_signal};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let loaded = match Cli::load() {
        Ok(loaded) => loaded,
        Err(LoadError::Args(error)) => error.exit(),
        Err(LoadError::Config(error)) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| {
            EnvFilter::new("info,socketioxide=warn,engineioxide=warn,fjall=warn,lsm_tree=warn")
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
