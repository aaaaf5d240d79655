//! The `tqkv` command line.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tqkv",
    version,
    about = "TurboQuant KV-cache compression: evaluate, round-trip, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure what the codec does to KV activations (not yet implemented).
    Eval,
    /// Benchmark the codec (CUDA when present, else the CPU).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Eval => {
            eprintln!("tqkv eval: not yet implemented (the codec library is ready; see README.md)");
        }
    }
}
