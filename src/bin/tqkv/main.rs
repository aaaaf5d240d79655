//! The `tqkv` command line: a thin dispatcher, one subcommand per file.

mod bench;
mod causal;
mod data;
mod eval;
mod kvio;
mod reference;
mod roundtrip;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};

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
    /// Measure the codec on KV activations: reconstruction error and attention fidelity.
    Eval(eval::EvalArgs),
    /// Quantize and dequantize the K/V tensors of a safetensors file (other tensors copied).
    Roundtrip(roundtrip::RoundtripArgs),
    /// Benchmark the codec (CUDA when present, else the CPU).
    Bench(bench::BenchArgs),
}

/// Exit status of every error: bad arguments, bad input, failed output.
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    let result = match cli.command {
        Command::Eval(args) => eval::run(args),
        Command::Roundtrip(args) => roundtrip::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Help and version go to stdout with status 0; every other clap error becomes one
/// `error: ...` line (clap's message and tips, without the usage) and status 2.
fn clap_exit(e: clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        eprintln!(
            "error: a subcommand is required: {} (see --help)",
            names.join(", ")
        );
        return ExitCode::from(EXIT_ERROR);
    }
    let rendered = e.render().to_string();
    let mut message = String::new();
    for line in rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        if !message.is_empty() {
            message.push_str(if message.ends_with(':') { " " } else { "; " });
        }
        message.push_str(line);
    }
    eprintln!("{message} (see --help)");
    ExitCode::from(EXIT_ERROR)
}

/// Joins a multi-line message into one line.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}
