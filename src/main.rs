//! The `chime` binary: parses the command line and runs one command.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use chime::config::{LogFormat, ServeArgs, redact_url};

#[derive(Parser)]
#[command(
    name = "chime",
    version,
    about = "A distributed timer: cron rules over REST, fired as HTTP or gRPC callbacks",
    after_help = "Environment: every `serve` flag is also read from CHIME_<FLAG> (see `chime serve --help`); \
                  CHIME_LOG sets the log filter, e.g. CHIME_LOG=info or CHIME_LOG=chime=debug."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node
    Serve(Box<ServeArgs>),
    /// Apply the database schema (serve also does this on start)
    Migrate {
        #[arg(long, env = "CHIME_DATABASE_URL", default_value = chime::config::DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Print the next fire times of a schedule, one RFC3339 UTC time a line
    Schedule {
        /// e.g. "0 */5 * * * *", "@every 30s", "@at 2026-12-01T08:00:00Z"
        expr: String,
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Start from this time instead of now (RFC3339)
        #[arg(long)]
        from: Option<String>,
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chime: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve(args) => {
            let config = args.resolve().map_err(|e| e.to_string())?;
            init_tracing(config.log_format);
            warn_unknown_env();
            runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.http_addr)
                    .await
                    .map_err(|e| format!("cannot listen on {}: {e}", config.http_addr))?;
                chime::serve(config, listener, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string())
            })
        }
        Command::Migrate { database_url } => runtime()?.block_on(async move {
            chime::config::check_database_url(&database_url)
                .map_err(|m| format!("database_url: {m}"))?;
            let store = chime::store::Store::connect(&database_url)
                .await
                .map_err(|e| format!("cannot open database {}: {e}", redact_url(&database_url)))?;
            store.migrate().await.map_err(|e| e.to_string())?;
            println!("schema is up to date in {}", redact_url(&database_url));
            Ok(())
        }),
        Command::Schedule {
            expr,
            timezone,
            from,
            count,
        } => {
            let from_ms = match from {
                None => chime::clock::now_ms(),
                Some(s) => chime::clock::parse_rfc3339_ms(&s)
                    .ok_or_else(|| format!("--from {s:?} is not an RFC3339 time"))?,
            };
            if count == 0 || count > chime::api::MAX_PREVIEW {
                return Err(format!("--count must be 1 to {}", chime::api::MAX_PREVIEW));
            }
            let times = chime::api::preview_times(&expr, &timezone, from_ms, count)
                .map_err(|e| e.to_string())?;
            for t in times {
                println!("{}", chime::clock::fmt_ms(t));
            }
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn init_tracing(format: LogFormat) {
    // consulrs and rustify log every request at info; their failures reach chime's own logs.
    let filter = EnvFilter::try_from_env("CHIME_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,consulrs=warn,rustify=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A mistyped `CHIME_*` variable would otherwise be ignored without a word, and the node
/// would start with the default instead.
fn warn_unknown_env() {
    let mut known: Vec<String> = vec!["CHIME_LOG".into(), "CHIME_FAULTS".into()];
    for sub in Cli::command().get_subcommands() {
        for arg in sub.get_arguments() {
            if let Some(env) = arg.get_env() {
                known.push(env.to_string_lossy().into_owned());
            }
        }
    }
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if !key.starts_with("CHIME_") || known.iter().any(|k| *k == key) {
            continue;
        }
        match chime::config::closest_name(&key, known.iter().map(String::as_str)) {
            Some(near) => tracing::warn!(
                "unknown environment variable {key} is ignored; did you mean {near}?"
            ),
            None => tracing::warn!("unknown environment variable {key} is ignored"),
        }
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
