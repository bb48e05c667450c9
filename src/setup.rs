//! The setup every front end shares (the commands and the workbench), from
//! plain values: threads, device, model, plan. `cli` maps its flags onto
//! these, so nothing below the front ends depends on the argument parser.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::model::{self, Model};
use crate::plan::{parse_block_list, Plan, PlanFile};

/// Which model to open, and on what.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// GGUF file, Hugging Face model folder or hub id; `None`: the default model.
    pub model: Option<String>,
    /// Use only cached files.
    pub offline: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Which weight copies to keep, and the context the memory check allows for.
    pub load: model::LoadOptions,
}

/// The plan to start from: a saved plan file and/or a list of blocks to skip.
#[derive(Debug, Clone, Default)]
pub struct PlanSource {
    pub plan: Option<PathBuf>,
    /// e.g. `attn.10,attn.15,mlp.3`; adds to `plan`.
    pub skip: Option<String>,
}

impl PlanSource {
    /// Whether a plan was asked for at all (else the model's own plan is used).
    pub fn is_given(&self) -> bool {
        self.plan.is_some() || self.skip.is_some()
    }
}

/// How a command spreads its work over the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadUse {
    /// Every op is split over all threads (generation, fitting, the
    /// workbench): one sequence at a time.
    WithinOps,
    /// Independent sequences run side by side, one per thread, and each op
    /// runs on its calling thread: no barrier or hand-off between ops, which
    /// on small models costs more than the ops themselves (`eval`).
    AcrossSequences,
}

/// Sets the thread count before the first tensor op (candle reads it once).
pub fn init_threads(threads: Option<usize>, using: ThreadUse) -> Result<()> {
    if threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let per_op = match (using, threads) {
        (ThreadUse::WithinOps, Some(n)) => n,
        // candle's own default: one thread per physical core.
        (ThreadUse::WithinOps, None) => return Ok(()),
        // gemm runs unsplit and candle's pool inline; the rayon pool below
        // still has a thread per sequence.
        (ThreadUse::AcrossSequences, _) => 1,
    };
    let pool = threads.unwrap_or_else(num_cpus::get_physical);
    // candle sizes its two pools from these: rayon (f32 matmul, softmax,
    // norms) and its barrier pool (elementwise ops, quantized kernels).
    std::env::set_var("RAYON_NUM_THREADS", per_op.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", per_op.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(pool)
        .build_global();
    Ok(())
}

pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .context("--device cuda:N needs a number")?;
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this scalpel was built without CUDA; rebuild with `cargo build --release --features cuda`");
            }
            Ok(Device::new_cuda(ordinal.unwrap_or(0))?)
        }
        other => bail!("unknown device `{other}`; use cpu, cuda or cuda:N"),
    }
}

/// Resolves and loads the model with a spinner, reporting where it came from.
pub fn load_model(source: &ModelSource) -> Result<Model> {
    let device = device(&source.device)?;
    let resolved = model::source::resolve(source.model.as_deref(), source.offline)?;
    let pb = crate::progress::spinner(&format!("loading {}", resolved.local.path().display()));
    let m = Model::load_for(&resolved, &device, &source.load);
    pb.finish_and_clear();
    let m = m?;
    eprintln!("scalpel: model {} — {}", m.identity, m.origin);
    Ok(m)
}

/// The plan from the plan file and the skip list together, checked against the model.
pub fn load_plan(source: &PlanSource, model: &Model) -> Result<(Plan, Option<PlanFile>)> {
    load_plan_honouring(source, model, &[])
}

/// `load_plan` for a command that carries out the plan sections named in
/// `honoured`; a plan with any other section is refused.
pub fn load_plan_honouring(
    source: &PlanSource,
    model: &Model,
    honoured: &[&str],
) -> Result<(Plan, Option<PlanFile>)> {
    // A pruned export (Nemotron-NAS / deci) runs with its no-op blocks skipped.
    let (mut plan, file) = match &source.plan {
        Some(path) => {
            let pf = model.load_plan(path)?;
            refuse_sections(&pf, path, "this command", honoured)?;
            let mut plan = model.with_implied(&pf.plan);
            if honoured.contains(&crate::surgery::replace::REPLACE_SECTION) {
                crate::surgery::replace::apply_section(&pf, &mut plan, model)?;
            }
            if honoured.contains(&crate::plan::HEAL_SECTION) {
                crate::surgery::heal::attach(&mut plan, &pf, model)?;
            }
            (plan, Some(pf))
        }
        None => (model.implied_plan.clone(), None),
    };
    if let Some(list) = &source.skip {
        plan.skip.extend(parse_block_list(list).context("--skip")?);
    }
    model.check_plan(&plan)?;
    Ok((plan, file))
}

/// A section (a KV budget, a draft, sparsity) changes what a plan computes:
/// a command that does not carry it out would run, and report numbers for,
/// another plan. Refuses the first section of `pf` not in `honoured`.
pub fn refuse_sections(
    pf: &PlanFile,
    path: &std::path::Path,
    command: &str,
    honoured: &[&str],
) -> Result<()> {
    if let Some(name) = pf.sections.names().find(|n| !honoured.contains(n)) {
        bail!(
            "plan {} has a `{name}` section, which {command} does not measure yet (it would run \
             the plan without it); measure it with the command of its mode (e.g. `scalpel eval \
             --plan {}`), or remove the section to use the skips alone",
            path.display(),
            path.display()
        );
    }
    Ok(())
}
