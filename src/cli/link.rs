//! `zest link`: the benchmark's network link emulator in the foreground — a loopback
//! proxy in front of a registry adding round-trip latency and a shared bandwidth
//! limit (see `zest_bench::link`). Counters are printed when it stops (Ctrl-C).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use zest_bench::link::{
    parse_bandwidth, parse_idle_timeout, parse_rtt, LinkConfig, LinkEmulator, LinkProfile,
};

/// Arguments of `zest link`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("link").required(true).multiple(true).args(["profile", "rtt", "bandwidth"])))]
pub struct LinkArgs {
    /// Address to listen on, e.g. 127.0.0.1:5001.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,

    /// The registry to forward to, as host:port (plain HTTP).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: String,

    /// A named link: lan (1ms, 1gbit), region (20ms, 200mbit), wan (80ms, 50mbit).
    #[arg(long, value_parser = |s: &str| s.parse::<LinkProfile>())]
    pub profile: Option<LinkProfile>,

    /// Round-trip time (e.g. 20ms, 0.1s); overrides the profile's.
    #[arg(long, value_parser = parse_rtt)]
    pub rtt: Option<Duration>,

    /// Bandwidth in each direction, shared by all connections (e.g. 200mbit, 1gbit,
    /// 500kbit); overrides the profile's. Unlimited when neither is given.
    #[arg(long, value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,

    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,

    /// Close a connection after this long without traffic (e.g. 120s).
    #[arg(long, default_value = "120s", value_parser = |s: &str| parse_idle_timeout(s))]
    pub idle_timeout: Duration,
}

/// Runs `zest link` until Ctrl-C.
pub async fn run(args: LinkArgs) -> anyhow::Result<()> {
    let base = args.profile.unwrap_or(LinkProfile {
        rtt: Duration::ZERO,
        bandwidth_bps: None,
    });
    let profile = LinkProfile {
        rtt: args.rtt.unwrap_or(base.rtt),
        bandwidth_bps: args.bandwidth.or(base.bandwidth_bps),
    };
    let mut config = LinkConfig::new(args.listen, args.upstream.clone(), profile);
    config.max_connections = args.max_connections.max(1);
    config.idle_timeout = args.idle_timeout;
    let link = LinkEmulator::bind(config)
        .await
        .context("starting the link emulator")?;
    eprintln!(
        "zest link: {} -> {} ({profile}); Ctrl-C to stop",
        link.local_addr(),
        args.upstream
    );
    let counters = link
        .run(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot wait for Ctrl-C; stopping");
            }
        })
        .await
        .context("running the link emulator")?;
    println!("{counters}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        link: LinkArgs,
    }

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from([
            "zest-link",
            "--listen",
            "127.0.0.1:5001",
            "--upstream",
            "127.0.0.1:5000",
            "--profile",
            "region",
        ])
        .expect("the defaults of `zest link` are valid");
        assert_eq!(cli.link.idle_timeout, Duration::from_secs(120));
        assert!(Cli::try_parse_from([
            "zest-link",
            "--listen",
            "127.0.0.1:5001",
            "--upstream",
            "127.0.0.1:5000",
            "--rtt",
            "20ms",
            "--idle-timeout",
            "0s",
        ])
        .is_err());
    }
}
