//! `atelier-sampler`: the txt2img service as its own process (one replica of many).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-sampler",
    version,
    about = "atelier sampler service (txt2img)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    config: atelier_sampler::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config;
    atelier_kit::service::run_main("sampler", args.kit, |launch| {
        atelier_sampler::serve(config, launch)
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
