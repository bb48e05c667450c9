use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use clap::Parser;

use scalpel::cli::{self, BenchArgs, Cli, Command, EvalArgs, GenerateArgs};
use scalpel::eval::{bench, generate, perplexity};
use scalpel::model::{synthetic, Model};
use scalpel::progress;

/// The held-out text used when `eval` gets no `--text` (Debian's GPL-3, as in shared/peers).
const DEFAULT_EVAL_TEXT: &str = include_str!("../assets/gpl-3.txt");

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

fn run(cli: Cli) -> Result<()> {
    cli::init_threads(cli.model.threads)?;
    match cli.command {
        Some(Command::Eval(args)) => cmd_eval(&cli.model, &cli.plan, args),
        Some(Command::Generate(args)) => cmd_generate(&cli.model, &cli.plan, args),
        Some(Command::Bench(args)) => cmd_bench(&cli.model, &cli.plan, args),
        Some(Command::Info) => cmd_info(&cli.model),
        Some(Command::Fetch) => {
            let resolved = scalpel::model::source::resolve(cli.model.model.as_deref(), cli.model.offline)?;
            eprintln!("scalpel: {}", resolved.origin);
            println!("{}", resolved.local.path().display());
            Ok(())
        }
        None => bail!("the interactive workbench is not built yet; see `scalpel --help` for the commands"),
    }
}

fn cmd_info(margs: &cli::ModelArgs) -> Result<()> {
    let model = cli::load_model(margs)?;
    let cfg = model.cfg();
    let (attn, mlp) = cfg.block_params();
    println!("model        {}", model.identity.name);
    println!("origin       {}", model.origin);
    println!("architecture {}", cfg.arch.name());
    println!("layers       {}", cfg.n_layers);
    println!("hidden       {} (heads {}, kv heads {}, head dim {})", cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    println!("mlp          {}", cfg.intermediate_size);
    println!("vocab        {}", cfg.vocab_size);
    println!("params/block attention {attn}, mlp {mlp}");
    println!("quantized    {}", if model.has_quantized { "yes (kept for fast decode)" } else { "no" });
    println!("hash         {}", model.identity.content_hash);
    Ok(())
}

fn cmd_eval(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: EvalArgs) -> Result<()> {
    let text = match &args.text {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read --text {}", p.display()))?,
        None => DEFAULT_EVAL_TEXT.to_string(),
    };
    if text.trim().is_empty() {
        bail!("the evaluation text is empty");
    }
    let model = cli::load_model(margs)?;
    let (plan, _) = cli::load_plan(pargs, &model)?;
    let ids = model.codec()?.encode(&text)?;
    let run = args.weights.run_options(&model, false)?;
    let opts = perplexity::EvalOptions { window: args.window, compare_base: !args.no_base, run };
    let pb = progress::bar(ids.len().div_ceil(args.window), "windows");
    let report = perplexity::evaluate(&model, &ids, &plan, opts, &AtomicBool::new(false), |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let report = report?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["plan"] = plan.describe().into();
        v["model"] = serde_json::to_value(&model.identity)?;
        v["window"] = args.window.into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("plan            {}", plan.describe());
        println!("perplexity      {:.4}", report.perplexity);
        if plan.skip.is_empty() && !plan.has_scales() {
            println!("kl to base      0 (this is the base model)");
        } else if args.no_base {
            println!("kl to base      (not measured: --no-base)");
        } else {
            println!("kl to base      {:.5} nats/token", report.kl_to_base);
            println!("top-1 agreement {:.2}%", report.top1_agreement * 100.0);
        }
        println!("tokens          {} in {} windows of {} ({} scored)", report.tokens, report.windows, args.window, report.scored_tokens);
        println!(
            "speed           {:.1} tok/s through the plan ({:.2}s forward, {:.2}s wall, {} threads)",
            report.tokens_per_sec,
            report.plan_forward_seconds,
            report.seconds,
            candle_core::utils::get_num_threads()
        );
    }
    Ok(())
}

fn cmd_generate(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: GenerateArgs) -> Result<()> {
    let model = cli::load_model(margs)?;
    let (plan, _) = cli::load_plan(pargs, &model)?;
    let codec = model.codec()?;
    let prompt_text = if args.chat { codec.chat_prompt(&args.prompt)? } else { args.prompt.clone() };
    let mut prompt = codec.encode_with_specials(&prompt_text)?;
    if model.cfg().add_bos && !args.chat {
        if let Some(bos) = model.cfg().bos_token_id {
            prompt.insert(0, bos);
        }
    }
    let run = args.weights.run_options(&model, true)?;
    let opts = generate::GenOptions {
        max_new_tokens: args.max_tokens,
        temperature: args.temp,
        seed: args.seed,
        stop_at_eos: !args.ignore_eos,
        run,
    };
    // Stream: decode the growing sequence and print what is new, so
    // multi-byte characters split across tokens come out whole.
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut out = std::io::stdout();
    if !args.json {
        print!("{}", args.prompt);
        out.flush()?;
    }
    let report = generate::generate(&model, &prompt, &plan, opts, |tok| {
        ids.push(tok);
        if !args.json {
            let text = codec.decode(&ids)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                print!("{}", &text[printed..]);
                out.flush()?;
                printed = text.len();
            }
        }
        Ok(())
    })?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = codec.decode(&report.new_tokens)?.into();
        v["plan"] = plan.describe().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), weights {}, plan {}",
            report.prefill_tokens_per_sec,
            report.prompt_tokens,
            report.decode_tokens_per_sec,
            report.new_tokens.len(),
            if run.quantized { "quantized" } else { "f32" },
            plan.describe()
        );
    }
    Ok(())
}

fn cmd_bench(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: BenchArgs) -> Result<()> {
    if args.runs == 0 || args.prefill < 1 || args.decode < 1 {
        bail!("--runs, --prefill and --decode must be at least 1");
    }
    let model: Model = match &args.synthetic {
        Some(shape) => {
            let device = cli::device(&margs.device)?;
            let pb = progress::spinner(&format!("building synthetic {shape}"));
            let m = synthetic::build(shape, &device);
            pb.finish_and_clear();
            m?
        }
        None => cli::load_model(margs)?,
    };
    let (plan, _) = cli::load_plan(pargs, &model)?;
    let run = args.weights.run_options(&model, true)?;
    let opts = bench::BenchOptions { prefill_tokens: args.prefill, decode_tokens: args.decode, runs: args.runs, run };
    let pb = progress::bar(args.runs, "runs");
    let report = bench::bench(&model, &plan, opts, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let r = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("model {} | device {} | weights {} | {} threads | {} runs (median [min–max])", model.identity.name, r.device, r.weights, r.threads, r.runs);
    println!("plan  {}", r.plan);
    println!("| | prefill {} tok/s | decode {} tok/s |", r.prefill_tokens, r.decode_tokens);
    println!("|---|---|---|");
    let row = |name: &str, s: &bench::SpeedReport| {
        let p = &s.prefill_tokens_per_sec;
        let d = &s.decode_tokens_per_sec;
        println!("| {name} | {:.1} [{:.1}–{:.1}] | {:.1} [{:.1}–{:.1}] |", p.median, p.min, p.max, d.median, d.min, d.max);
    };
    row("base", &r.base);
    row("plan", &r.pruned);
    println!("| plan / base | {:.3}× | {:.3}× |", r.prefill_speedup, r.decode_speedup);
    Ok(())
}
