//! `vdit`: the command-line front door. Each subcommand is a module with an `Args` struct and a
//! `run` function; `main` only parses, installs logging and maps errors to an exit code.

use clap::{Parser, Subcommand};

mod bench;
mod eval_model;
mod eval_modes;
mod generate;
mod serve;
mod train_cmd;
mod world_cmd;

#[derive(Parser)]
#[command(
    name = "vdit",
    version,
    about = "Open video generation: CogVideoX-family models in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a video from a prompt.
    Generate(generate::GenerateArgs),
    /// Benchmark the transformer and VAE at the real widths against diffusers.
    Bench(bench::BenchArgs),
    /// Train a model (see the config file format in crates/train).
    Train(train_cmd::TrainArgs),
    /// Shapes World: sample captioned clips.
    World(world_cmd::WorldArgs),
    /// Evaluate generated videos.
    Eval(world_cmd::EvalArgs),
    /// Serve video generation over HTTP: a job API, progress over SSE, and a web page.
    Serve(serve::ServeArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VDIT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Train(a) => train_cmd::run(a),
        Command::World(a) => world_cmd::run_world(a),
        Command::Eval(a) => world_cmd::run_eval(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
