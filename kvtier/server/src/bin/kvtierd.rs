//! kvtierd: the kvtier daemon. See `deploy/kvtierd.toml` for every setting.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "kvtierd",
    version,
    about = "kvtier daemon: SSD-only KV-cache offload by default"
)]
struct Args {
    /// TOML configuration file (also KVTIER_CONFIG); without one, the
    /// embedded default: SSD-only under ./kvtierd-data, 127.0.0.1:50051.
    #[arg(long, env = "KVTIER_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log as JSON lines (also KVTIER_LOG_FORMAT=json).
    #[arg(long)]
    log_json: bool,
}

fn main() {
    kvtier_server::keep_large_buffers();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVTIER_LOG").unwrap_or_else(|_| "info".into());
    let json = args.log_json || std::env::var("KVTIER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        sub.json().init();
    } else {
        sub.init();
    }
    let cfg = match kvtier_server::config::DaemonConfig::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvtierd: {}", e.message());
            std::process::exit(2);
        }
    };
    if args.print_config {
        print!("{}", toml::to_string_pretty(&cfg).expect("config serializes"));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    // Before serving: a SIGTERM right after the addresses are printed must
    // drain, not kill.
    let stop = {
        let _rt = rt.enter();
        kvtier_server::daemon::signal()
    };
    let r = rt.block_on(kvtier_server::daemon::run(cfg, stop, |b| {
        // Scripts and tests read these lines to find the ports.
        let mut out = std::io::stdout().lock();
        // Before the gRPC line, which readers wait for.
        if let Some(a) = b.s3 {
            let _ = writeln!(out, "kvtierd s3 listening on {a}");
        }
        let _ = writeln!(out, "kvtierd listening on {}", b.grpc);
        if let Some(m) = b.metrics {
            let _ = writeln!(out, "kvtierd metrics on {m}");
        }
        let _ = out.flush();
    }));
    if let Err(e) = r {
        // The message names the step that failed and the cause's kind.
        eprintln!("kvtierd: {}", e.message());
        std::process::exit(1);
    }
}
