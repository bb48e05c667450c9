//! Command-line interface: argument definitions, mapped onto the plain values
//! of `setup` (the only place clap is used, with `commands`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::eval::speculative::DraftLen;
use crate::model::{KeepWeights, LoadOptions, Model, RunOptions};
use crate::plan::{Plan, PlanFile};
use crate::setup::{self, ModelSource, PlanSource};
use crate::surgery::objective::LossKind;

#[derive(Parser, Debug)]
#[command(
    name = "scalpel",
    version,
    about = "A terminal workbench for LLM block surgery: skip attention/MLP blocks, measure, fit scales.",
    long_about = "A terminal workbench for LLM block surgery. With no subcommand it opens the workbench \
                  on the model (the default is SmolLM2-135M-Instruct, fetched and cached on first use)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// The workbench's weights: `quantized` loads no f32 copy (its
    /// measurements then run the quantized matmuls).
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Perplexity, KL to the base model and top-1 agreement over a text.
    Eval(EvalArgs),
    /// Generate text under a plan, streaming it, then report tokens/sec.
    Generate(GenerateArgs),
    /// Prefill and decode tokens/sec for the base model and the plan, same run.
    Bench(BenchArgs),
    /// Print the model's configuration, identity and block sizes.
    Info,
    /// Download the model (default, `gemma3-270m`, or a --model hub id) into the cache and print where it is.
    Fetch(FetchArgs),
    /// Write the model under a plan as a Nemotron-NAS folder, a llama.cpp GGUF or a mergekit recipe.
    Export(ExportArgs),
    /// A self-contained HTML trade-off report (charts + table) comparing plans.
    Report(ReportArgs),
    /// Per-block importance: Δloss when skipped alone, and block influence (1 − cos).
    Importance(ImportanceArgs),
    /// Fit the Hopscotch scales (4 per layer) of a plan, weights frozen.
    Fit(FitArgs),
    /// Greedy Hopscotch search for the attention blocks to skip, then the final fit.
    Search(SearchArgs),
    /// Hopscotch against training-free selections at k = 1..K, on held-out data.
    Compare(CompareArgs),
    /// Lossless speed from a plan: the model under --plan drafts, the full model verifies (greedy).
    Speculate(SpeculateArgs),
    /// Passkey retrieval under KV budget policies (and --plan): a key hidden at chosen depths of long filler text.
    Needle(NeedleArgs),
    /// Replace attention layers with distilled gated linear mixers (constant-size state, no KV).
    Replace(ReplaceArgs),
    /// Contextual sparsity: a head/neuron mask or TEAL/WINA thresholds as a plan, or --compare every method over levels.
    Sparsify(crate::commands::sparsify::SparsifyArgs),
    /// Train per-token routers (frozen model) that decide which blocks each token runs.
    Route(crate::commands::route::RouteArgs),
    /// Heal a skip plan: low-rank corrections of the kept projections, distilled from the base model.
    Heal(crate::commands::heal::HealArgs),
}

/// Export targets.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Hugging Face folder, `DeciLMForCausalLM` with `block_configs` (vLLM, SGLang, TensorRT-LLM).
    Decilm,
    /// llama.cpp GGUF, architecture `deci` (per-layer head counts).
    Gguf,
    /// mergekit passthrough YAML (whole-layer plans only).
    Mergekit,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output: a folder (decilm) or a file (gguf, mergekit).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// GGUF weight type (e.g. q4_1, q8_0, f16); default: as in the source.
    #[arg(long)]
    pub quant: Option<String>,
    /// mergekit: the hub id or folder of the original weights (needed for a GGUF source).
    #[arg(long)]
    pub base_model: Option<String>,
    /// Do not measure perplexity for the model card / metadata.
    #[arg(long)]
    pub no_measure: bool,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Plan files to compare (the base model is always included).
    #[arg(long, num_args = 1.., required = true)]
    pub plans: Vec<PathBuf>,
    /// The HTML file to write (SVG charts are written beside it too).
    #[arg(long)]
    pub out: PathBuf,
    /// Text to measure perplexity on (default: the built-in held-out text).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Evaluate at most this many 512-token windows per plan (default: all).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Timed runs per plan for the speed columns (interleaved across plans;
    /// the median and the spread are shown).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The largest perplexity increase (percent) the recommendation accepts.
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
    pub budget: f64,
    /// Also print the page to a PDF beside it (needs headless Chromium).
    #[arg(long)]
    pub pdf: bool,
    /// Also measure every skip plan as the draft of lossless self-speculative
    /// decoding (α, τ and the speed-up against plain decoding, interleaved).
    #[arg(long)]
    pub speculative: bool,
    /// Replace an existing report.
    #[arg(long)]
    pub force: bool,
}

/// Calibration and held-out data, shared by the surgery commands.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Calibration text file (default: the built-in prompts answered by the base model).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Held-out text file (default: the built-in held-out prompts answered by the base model).
    #[arg(long, value_name = "FILE")]
    pub eval_text: Option<PathBuf>,
    /// Calibration prompts answered (self-generated data).
    #[arg(long, default_value_t = 32)]
    pub calib_samples: usize,
    /// Held-out prompts answered (self-generated data).
    #[arg(long, default_value_t = 32)]
    pub heldout_samples: usize,
    /// Longest answer generated per prompt, in tokens.
    #[arg(long, default_value_t = 96)]
    pub max_answer_tokens: usize,
}

/// Scale-fitting settings, shared by fit, search (its final fit) and compare.
#[derive(Args, Debug, Clone)]
pub struct FitSettings {
    /// Epochs over the calibration data (the best held-out epoch is kept).
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Loss: kl = distillation from the base model's distribution; ce = cross-entropy on the data (reference).
    #[arg(long, value_enum, default_value = "kl")]
    pub loss: LossArg,
    /// Sequences per Adam step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
}

/// `--loss`, the command-line face of `LossKind`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossArg {
    /// Cross-entropy on the data's tokens (the reference: the base model's greedy answers).
    Ce,
    /// KL(base ‖ plan) over the full next-token distribution (distillation).
    Kl,
}

impl From<LossArg> for LossKind {
    fn from(arg: LossArg) -> Self {
        match arg {
            LossArg::Ce => LossKind::Ce,
            LossArg::Kl => LossKind::Kl,
        }
    }
}

#[derive(Args, Debug)]
pub struct ImportanceArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Plan file to write the importance table into (default: the --plan file, if any).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReplaceArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Attention layers to replace, e.g. 6,7,25,28 (layers from 0), over --plan / --skip if given.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    pub layers: Option<Vec<usize>>,
    /// Replace the attention layers this plan skips; its other skips and scales are kept.
    #[arg(long, value_name = "PLAN")]
    pub from_plan: Option<PathBuf>,
    /// Layer-local epochs (each mixer matches its attention's output on cached inputs).
    #[arg(long, default_value_t = 4)]
    pub local_epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub local_lr: f64,
    /// Sequences per Adam step of the layer-local stage.
    #[arg(long, default_value_t = 1)]
    pub local_batch_size: usize,
    /// End-to-end epochs (KL to the base model, only the mixers trained).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Sequences per Adam step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Also train every layer's Hopscotch scales end to end.
    #[arg(long)]
    pub train_scales: bool,
    /// The plan to write (the mixers go beside it as an artifact).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FitArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub fit: FitSettings,
    /// Where to write the fitted plan (default: overwrite the --plan file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// What `search` optimises.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchObjective {
    /// Hopscotch: the lowest calibration loss with refitted scales.
    Hopscotch,
    /// The best self-speculative draft: measured acceptance over weights read (see the README).
    Speculative,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Attention blocks to skip (speculative: the most blocks removed).
    #[arg(long)]
    pub blocks: usize,
    #[arg(long, value_enum, default_value = "hopscotch")]
    pub objective: SearchObjective,
    /// Speculative: calibration prompts drafted per candidate (the built-in calibration prompts).
    #[arg(long, default_value_t = 3)]
    pub spec_prompts: usize,
    /// Speculative: new tokens per calibration prompt.
    #[arg(long, default_value_t = 24)]
    pub spec_tokens: usize,
    /// Speculative: tokens drafted per verify (1..=16 or auto).
    #[arg(long, default_value = "4")]
    pub draft_len: DraftLen,
    /// Speculative: assumed cost of one verify pass in decode steps (1: k + 1 rows cost one step).
    #[arg(long, default_value_t = 1.0)]
    pub verify_cost: f64,
    /// Speculative: weights used while drafting (auto: quantized when the file is).
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
    /// Speculative: candidates drafted per step, the best by the proxy their matchness on the calibration text predicts (0: draft all).
    #[arg(long, default_value_t = 4)]
    pub prescreen: usize,
    /// Speculative: steps in a row without a new best proxy before stopping (0: stop at the first); the plan is the best prefix of the path.
    #[arg(long, default_value_t = 0)]
    pub patience: usize,
    /// Speculative: fit Hopscotch scales for the chosen draft (the --epochs/--lr/--loss fit settings) and draft with and without them.
    #[arg(long = "fit")]
    pub fit_draft: bool,
    #[arg(long, default_value = "hopscotch-plan.json")]
    pub out: PathBuf,
    /// Continue the search saved in --out.
    #[arg(long)]
    pub resume: bool,
    /// Also consider MLP blocks (an extension beyond the paper).
    #[arg(long)]
    pub include_mlp: bool,
    /// Follow the reference literally: every candidate refitted from 1 (1 epoch, lr 1e-2), final fit 10 epochs at lr 3e-3.
    #[arg(long)]
    pub exact: bool,
    /// Default mode: candidates refitted per step after the cheap screen.
    #[arg(long, default_value_t = 3)]
    pub shortlist: usize,
    /// Default mode: calibration sequences the screen runs on (0: all); speculative: the matchness screen's.
    #[arg(long, default_value_t = 8)]
    pub screen_samples: usize,
    /// Adam steps' batch size in the per-candidate refits.
    #[arg(long, default_value_t = 4)]
    pub refit_batch_size: usize,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub fit: FitSettings,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Block counts to compare: `1..8` or `8` (the same).
    #[arg(long, required_unless_present_any = ["routing", "replace"])]
    pub blocks: Option<String>,
    /// Routed plans (`scalpel route`) to put next to Hopscotch and the
    /// training-free selections at the same realised compute: each plan's
    /// executed fraction is measured on every set, and the static plans
    /// with the nearest numbers of skipped blocks are measured beside it.
    #[arg(long, num_args = 1.., conflicts_with = "blocks", value_name = "PLAN")]
    pub routing: Vec<PathBuf>,
    /// Replaced plans (`scalpel replace`): for each one's layers, keep vs
    /// skip vs skip with fitted scales vs heal (the --heal plans removing
    /// the same layers) vs replace, on the same held-out sets.
    #[arg(long, num_args = 1.., conflicts_with_all = ["blocks", "routing"], value_name = "PLAN")]
    pub replace: Vec<PathBuf>,
    /// Healed plans (`scalpel heal`) to put beside the --replace plan of the same layers.
    #[arg(long, num_args = 1.., requires = "replace", value_name = "PLAN")]
    pub heal: Vec<PathBuf>,
    /// A search plan from `scalpel search --blocks K` (K at least the largest k) to reuse instead of searching.
    #[arg(long)]
    pub search_plan: Option<PathBuf>,
    /// Also measure on this prose text (default: the built-in GPL-3 text, first --prose-tokens tokens).
    #[arg(long)]
    pub prose: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub prose_tokens: usize,
    /// Seed of the random selection.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub fit: FitSettings,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file, Hugging Face model folder, or hub id (org/name). Default: SmolLM2-135M-Instruct.
    #[arg(long, global = true, env = "SCALPEL_MODEL")]
    pub model: Option<String>,
    /// Use only cached files; never touch the network (also HF_HUB_OFFLINE=1).
    #[arg(long, global = true, env = "SCALPEL_OFFLINE", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,
    /// cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: physical cores). `eval` scores one window per
    /// thread; other commands split each op over all threads.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct FetchArgs {
    /// A model scalpel knows by name (`gemma3-270m`); else --model or the default.
    pub name: Option<String>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct PlanArgs {
    /// A saved plan (JSON) to apply.
    #[arg(long, global = true)]
    pub plan: Option<PathBuf>,
    /// Blocks to skip, e.g. attn.10,attn.15,mlp.3 (layers from 0); adds to --plan.
    #[arg(long, global = true, value_name = "BLOCKS")]
    pub skip: Option<String>,
}

/// Which weights the matmuls use.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Quantized for generate/bench when the file is quantized, f32 for eval.
    Auto,
    /// Dequantized f32 (bf16 on GPU): exact, matches the PyTorch reference.
    F32,
    /// The file's quantized weights (GGUF only): faster decode, ~0.3% PPL drift.
    /// Loads no f32 copy of them (models that do not fit in memory as f32).
    Quantized,
}

impl Weights {
    /// Which copies a load for this choice keeps.
    pub fn keep(self) -> KeepWeights {
        match self {
            Weights::Quantized => KeepWeights::QuantizedOnly,
            Weights::Auto | Weights::F32 => KeepWeights::Both,
        }
    }

    /// The load options for this choice and a run of `context_tokens`
    /// tokens in each of `sequences` sequences.
    pub fn load_options(self, context_tokens: usize, sequences: usize) -> LoadOptions {
        LoadOptions {
            keep: self.keep(),
            context_tokens,
            sequences,
        }
    }

    /// `prefer_quantized`: what `auto` means for this command.
    pub fn run_options(self, model: &Model, prefer_quantized: bool) -> Result<RunOptions> {
        let quantized = match self {
            Weights::Auto => prefer_quantized && model.has_quantized && model.device().is_cpu(),
            Weights::F32 => false,
            Weights::Quantized => {
                if !model.has_quantized {
                    bail!("--weights quantized needs a quantized GGUF model");
                }
                true
            }
        };
        Ok(RunOptions {
            quantized,
            ..RunOptions::FAST
        })
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Text file to evaluate (default: the built-in held-out text, GPL-3).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per window (non-overlapping, each from an empty cache).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Skip the base-model passes (no KL / agreement; twice as fast).
    #[arg(long)]
    pub no_base: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// KV budget policies to evaluate at long context, comma-separated:
    /// full, window:B, streaming:B[:SINKS], h2o:B[:RECENT_SHARE],
    /// snapkv:B[:WINDOW[:KERNEL]], quest:B[:PAGE[:DENSE]] (budgets in tokens).
    /// Default: the plan's `kv` section, if any.
    #[arg(long)]
    pub kv: Option<String>,
    /// Tokens per window for --kv (default: the model's positions, at most 8192).
    #[arg(long)]
    pub context: Option<usize>,
    /// Prefill chunk for --kv: the policy acts after every chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// With --kv: skip attention recall (the full model then runs its fast attention path).
    #[arg(long)]
    pub no_recall: bool,
    /// With --kv: instead of quality, time this many decode steps per policy (and the full
    /// cache) after a --context prefill.
    #[arg(long, default_value_t = 0)]
    pub decode_speed: usize,
    /// For a routed plan: the K/V policy of tokens that skip attention (default: the plan's).
    #[arg(long, value_enum)]
    pub routing_kv: Option<crate::commands::route::KvArg>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub prompt: String,
    /// New tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f64,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Keep going after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
    /// Generate through self-speculative decoding with this plan file as the
    /// draft: the output is the full model's (greedy: the same tokens;
    /// sampled: the same distribution). Not with --plan/--skip.
    #[arg(long, value_name = "PLAN")]
    pub speculative: Option<PathBuf>,
    /// With --speculative: tokens drafted per verify, 1..=16 or `auto`.
    #[arg(long, default_value = "4", requires = "speculative")]
    pub draft_len: DraftLen,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SpeculateArgs {
    /// One prompt (or use --prompts / --prompt-set).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A prompt file: JSON lines `{"kind": …, "prompt": …}` (.jsonl), or one prompt per line.
    #[arg(long)]
    pub prompts: Option<std::path::PathBuf>,
    /// A built-in prompt set (assets/prompts/), run through the chat template: all,
    /// conversation, instructions, summarisation, qa, reasoning or code.
    #[arg(long, value_name = "NAME")]
    pub prompt_set: Option<String>,
    /// At most this many prompts of each kind (default: all ten).
    #[arg(long)]
    pub per_kind: Option<usize>,
    /// New tokens per prompt.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Tokens drafted per verify pass: 1..=16, or `auto` (up to 8, stopping
    /// when the draft is unsure; see the README).
    #[arg(long, default_value = "4")]
    pub draft_len: DraftLen,
    /// Sampling temperature (0 = greedy); > 0 uses speculative sampling.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f64,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Longest n-gram the prompt-lookup baseline matches.
    #[arg(long, default_value_t = 3)]
    pub ngram: usize,
    /// Timed runs of each method per prompt, interleaved (median reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Wrap each prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Keep going after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NeedleArgs {
    /// KV budget policies to compare with the full cache (always run first),
    /// comma-separated, as `eval --kv`: window:B, streaming:B, h2o:B, snapkv:B, quest:B.
    /// With --plan (skips, scales, replaced or healed layers) every column runs
    /// under the plan, after the unpruned model's own full-cache column (`base`).
    #[arg(long, default_value = "")]
    pub kv: String,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub context: Vec<usize>,
    /// Where the key sits in the filler (0 = start, 1 = end), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    pub depths: Vec<f64>,
    /// Keys (prompts) per context and depth.
    #[arg(long, default_value_t = 3)]
    pub trials: usize,
    /// Prefill chunk: the policy acts after every chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Seed of the random keys.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Tokens in the sequence before the timed decode steps (a prompt,
    /// prefilled untimed): decode speed at this context length.
    #[arg(long, default_value_t = 16)]
    pub context: usize,
    /// Timed runs of each (median and spread are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Random weights of a known shape instead of --model: llama-8b, llama-1b, smollm2-135m.
    #[arg(long)]
    pub synthetic: Option<String>,
    /// Another plan timed in the same run, interleaved with the base model and --plan (e.g. the skip plan a replaced or routed plan competes with).
    #[arg(long, value_name = "PLAN")]
    pub against: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: Weights,
    #[arg(long)]
    pub json: bool,
}

impl ModelArgs {
    /// The plain values the setup takes.
    pub fn source(&self) -> ModelSource {
        ModelSource {
            model: self.model.clone(),
            offline: self.offline,
            device: self.device.clone(),
            load: LoadOptions::default(),
        }
    }
}

impl PlanArgs {
    pub fn source(&self) -> PlanSource {
        PlanSource {
            plan: self.plan.clone(),
            skip: self.skip.clone(),
        }
    }
}

/// Resolves and loads the model `--model`, `--offline` and `--device` name.
pub fn load_model(args: &ModelArgs) -> Result<Model> {
    setup::load_model(&args.source())
}

/// As `load_model`, keeping the copies and checking the memory `load` says.
pub fn load_model_for(args: &ModelArgs, load: LoadOptions) -> Result<Model> {
    let mut source = args.source();
    source.load = load;
    setup::load_model(&source)
}

/// The plan from `--plan` and `--skip` together, checked against the model.
pub fn load_plan(args: &PlanArgs, model: &Model) -> Result<(Plan, Option<PlanFile>)> {
    setup::load_plan(&args.source(), model)
}

/// `load_plan` for a command that carries out the sections named in `honoured`.
pub fn load_plan_honouring(
    args: &PlanArgs,
    model: &Model,
    honoured: &[&str],
) -> Result<(Plan, Option<PlanFile>)> {
    setup::load_plan_honouring(&args.source(), model, honoured)
}
