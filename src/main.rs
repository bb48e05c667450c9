use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use scalpel::cli::{Cli, Command};
use scalpel::commands;
use scalpel::setup::{self, ThreadUse};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scalpel: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that take no global --plan / --skip (each has its own way
/// to name plans, or none), by name.
fn ignores_plan(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Info => "info",
        Command::Fetch(_) => "fetch",
        Command::Report(_) => "report",
        Command::Search(_) => "search",
        Command::Compare(_) => "compare",
        Command::Route(_) => "route",
        _ => return None,
    })
}

fn run(cli: Cli) -> Result<()> {
    let using = match cli.command {
        Some(Command::Eval(_)) => ThreadUse::AcrossSequences,
        _ => ThreadUse::WithinOps,
    };
    setup::init_threads(cli.model.threads, using)?;
    if let Some(command) = cli.command.as_ref().and_then(ignores_plan) {
        if cli.plan.source().is_given() {
            anyhow::bail!(
                "`{command}` does not run under --plan / --skip (it would report numbers for the \
                 model without them); {}",
                match command {
                    "route" => "give the static plan to route on as --base-plan",
                    "report" => "list the plans to report with --plans",
                    "compare" => "give routed or replaced plans with --routing / --replace",
                    _ => "drop --plan / --skip",
                }
            );
        }
    }
    match cli.command {
        Some(Command::Eval(args)) => commands::eval::run(&cli.model, &cli.plan, args),
        Some(Command::Generate(args)) => commands::generate::run(&cli.model, &cli.plan, args),
        Some(Command::Bench(args)) => commands::bench::run(&cli.model, &cli.plan, args),
        Some(Command::Info) => commands::info::run(&cli.model),
        Some(Command::Fetch(args)) => commands::fetch::run(&cli.model, &args),
        Some(Command::Export(args)) => commands::export::run(&cli.model, &cli.plan, args),
        Some(Command::Report(args)) => commands::report::run(&cli.model, args),
        Some(Command::Importance(args)) => commands::importance::run(&cli.model, &cli.plan, args),
        Some(Command::Fit(args)) => commands::fit::run(&cli.model, &cli.plan, args),
        Some(Command::Replace(args)) => commands::replace::run(&cli.model, &cli.plan, args),
        Some(Command::Search(args)) => commands::search::run(&cli.model, args),
        Some(Command::Compare(args)) => commands::compare::run(&cli.model, args),
        Some(Command::Speculate(args)) => commands::speculate::run(&cli.model, &cli.plan, args),
        Some(Command::Needle(args)) => commands::needle::run(&cli.model, &cli.plan, args),
        Some(Command::Sparsify(args)) => commands::sparsify::run(&cli.model, &cli.plan, args),
        Some(Command::Route(args)) => commands::route::run(&cli.model, args),
        Some(Command::Heal(args)) => commands::heal::run(&cli.model, &cli.plan, args),
        None => {
            let mut source = cli.model.source();
            source.load.keep = cli.weights.keep();
            scalpel::tui::run(&source, &cli.plan.source())
        }
    }
}
