//! Healing: low-rank corrections W + B·A on a plan's kept projections.
//! The zero start is the plan exactly, factor gradients match finite
//! differences, a heal lowers held-out KL, the factors round-trip as a plan
//! artifact and merge into exports that give the healed plan's logits, and
//! bad factors are refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use scalpel::model::lowrank::factor_names;
use scalpel::model::{LocalModel, Model, Pass, Resolved, RunOptions, TrainableParams};
use scalpel::plan::{BlockId, Plan, PlanFile, HEAL_SECTION};
use scalpel::setup::{load_plan_honouring, PlanSource};
use scalpel::surgery::fit::FitOptions;
use scalpel::surgery::heal::{self, HealOptions, HealSection};
use scalpel::surgery::objective::{measure, sequence_loss, BaseStates, LossKind};

fn logits_with(model: &Model, ids: &[u32], plan: &Plan, run: RunOptions) -> Vec<f32> {
    let t = &model.transformer;
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = t
        .forward_hidden(&input, &mut Pass::plan(plan, run))
        .unwrap();
    t.logits(&h, run)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn tiny_ids(model: &Model) -> Vec<u32> {
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids: Vec<u32> = common::json_ints(&r["token_ids"]);
    assert!(ids.iter().all(|&i| (i as usize) < model.cfg().vocab_size));
    ids
}

/// 13 tokens of the tiny Gemma 3's 40-token vocabulary (past its window of 4).
fn gemma_ids() -> Vec<u32> {
    (0..13u32).map(|i| (i * 7 + 3) % 40).collect()
}

fn options(rank: usize, targets: &str, epochs: usize, lr: f64) -> HealOptions {
    HealOptions {
        rank,
        targets: heal::parse_targets(targets).unwrap(),
        layers: None,
        fit: FitOptions {
            epochs,
            lr,
            loss: LossKind::Kl,
            batch_size: 2,
            init: None,
        },
        seed: 7,
    }
}

/// Factors with both halves random (a trained heal, not the zero start).
fn random_factors(
    model: &Model,
    plan: &Plan,
    rank: usize,
    targets: &str,
    scale: f64,
) -> BTreeMap<String, Tensor> {
    let opts = options(rank, targets, 1, 1e-3);
    let pairs = heal::corrected_projections(plan, model.n_layers(), &opts).unwrap();
    let p = heal::initial_params(model, &pairs, rank, 3, &Device::Cpu).unwrap();
    let mut out = BTreeMap::new();
    for (name, t) in p.values().unwrap() {
        let t = if name.ends_with(".b") {
            // Seeded, so every run tests the same corrections.
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(name.len() as u64 * 7919 + 1);
            let (o, r) = t.dims2().unwrap();
            let v: Vec<f32> = (0..o * r)
                .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * 3f64.sqrt() * scale)
                .map(|x| x as f32)
                .collect();
            Tensor::from_vec(v, (o, r), &Device::Cpu).unwrap()
        } else {
            t
        };
        out.insert(name, t);
    }
    out
}

fn skip_plan() -> Plan {
    Plan::with_skips([BlockId::attn(1), BlockId::mlp(2)])
}

#[test]
fn the_zero_start_is_the_plan_exactly() {
    let model = common::load_tiny("llama");
    zero_start_is_the_plan(&model, &tiny_ids(&model));
}

#[test]
fn gemma_the_zero_start_is_the_plan_exactly() {
    zero_start_is_the_plan(&common::load_tiny("gemma3"), &gemma_ids());
}

fn zero_start_is_the_plan(model: &Model, ids: &[u32]) {
    let plan = skip_plan();
    let opts = options(4, "all", 1, 1e-3);
    let pairs = heal::corrected_projections(&plan, model.n_layers(), &opts).unwrap();
    // No correction lands on the skipped blocks' projections (attn.1, mlp.2).
    let on_skipped = |&(l, p): &(usize, usize)| (l == 1 && p < 4) || (l == 2 && p >= 4);
    assert!(!pairs.iter().any(on_skipped));
    let start = heal::initial_params(model, &pairs, 4, 1, &Device::Cpu).unwrap();
    let healed = heal::with_factors(&plan, start.values().unwrap().into_iter().collect());
    for run in [RunOptions::FAST, RunOptions::DIFFERENTIABLE] {
        let a = logits_with(model, ids, &plan, run);
        let b = logits_with(model, ids, &healed, run);
        assert_eq!(a, b, "B = 0 adds exact zeros ({:?})", run.mode);
    }
    // And nonzero factors do change the logits (the corrections are applied).
    let moved = heal::with_factors(&plan, random_factors(model, &plan, 4, "all", 0.05));
    let diff = common::max_abs_diff(
        &logits_with(model, ids, &plan, RunOptions::FAST),
        &logits_with(model, ids, &moved, RunOptions::FAST),
    );
    assert!(diff > 1e-3, "the corrections changed nothing: {diff}");
}

#[test]
fn fast_and_differentiable_paths_agree_on_a_healed_plan() {
    let model = common::load_tiny("llama");
    let plan = skip_plan();
    let ids = tiny_ids(&model);
    let healed = heal::with_factors(&plan, random_factors(&model, &plan, 4, "all", 0.05));
    let diff = common::max_abs_diff(
        &logits_with(&model, &ids, &healed, RunOptions::FAST),
        &logits_with(&model, &ids, &healed, RunOptions::DIFFERENTIABLE),
    );
    eprintln!("fast vs differentiable, healed: max |Δlogit| = {diff:e}");
    assert!(diff < 5e-5, "{diff}"); // measured 6.7e-6
}

#[test]
fn factor_gradients_match_finite_differences() {
    let resolved = Resolved {
        local: LocalModel::HfDir(common::tiny_dir("llama")),
        origin: "test".into(),
    };
    // f64 activations so central differences are accurate; the factors
    // are f32 Vars (as in training), cast on use.
    let model = Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap();
    let plan = skip_plan();
    let factors = random_factors(&model, &plan, 3, "all", 0.1);
    let mut params = TrainableParams::new();
    for (k, v) in &factors {
        params.insert(k, v).unwrap();
    }
    let seq = common::random_set(&model, 5, 1, 20).sequences.remove(0);
    let loss_at = |params: &TrainableParams| -> Tensor {
        let over = params.over(&plan);
        let run = RunOptions::DIFFERENTIABLE;
        let h = scalpel::surgery::objective::forward_full(&model, &seq, &plan, &over, run).unwrap();
        sequence_loss(&model, &seq, &h, None, LossKind::Ce, run).unwrap()
    };
    let grads = loss_at(&params).backward().unwrap();
    let (mut checked, mut worst) = (0, 0f64);
    // A q (attention) and a down (MLP) correction, both halves, a few entries each.
    for (layer, proj) in [(0usize, 0usize), (3, 6), (2, 3)] {
        let (an, bn) = factor_names(layer, proj);
        for name in [an, bn] {
            let var: &Var = params.var(&name).unwrap();
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for idx in [0usize, base.len() / 2, base.len() - 1] {
                let h = 1e-2f32;
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[idx] += d;
                    var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    let l: f64 = loss_at(&params).to_scalar().unwrap();
                    l
                };
                let fd = (at(h) - at(-h)) / (2.0 * f64::from(h));
                var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let an = f64::from(g[idx]);
                let err = (an - fd).abs() / fd.abs().max(1e-3);
                worst = worst.max(err);
                checked += 1;
                assert!(
                    err < 1e-3,
                    "{name}[{idx}]: analytic {an:e}, finite difference {fd:e}"
                );
            }
        }
    }
    eprintln!("{checked} factor gradients vs central differences: worst relative error {worst:e}");
}

#[test]
fn healing_lowers_the_heldout_kl_of_a_tiny_model() {
    healing_lowers_the_heldout_kl("llama");
}

#[test]
fn healing_lowers_the_heldout_kl_of_the_tiny_gemma() {
    healing_lowers_the_heldout_kl("gemma3");
}

fn healing_lowers_the_heldout_kl(arch: &str) {
    let model = common::load_tiny(arch);
    let plan = skip_plan();
    // Random tokens: enough of them that a correction of the skipped
    // blocks' loss generalises rather than memorises.
    let train = common::random_set(&model, 11, 64, 24);
    let validation = common::random_set(&model, 12, 8, 24);
    let heldout = common::random_set(&model, 13, 8, 24);
    let never = AtomicBool::new(false);
    let opts = options(2, "o_proj,down_proj", 4, 3e-3);
    let r = heal::heal(
        &model,
        &plan,
        &train,
        &validation,
        &opts,
        &never,
        &mut |_| {},
    )
    .unwrap();
    assert!(
        r.train.best_epoch > 0,
        "no epoch improved: {:?}",
        r.train.history
    );
    assert_eq!(r.section.targets, vec!["o_proj", "down_proj"]);
    let healed = heal::with_factors(&plan, r.train.best.clone().into_iter().collect());
    let base = BaseStates::compute(&model, &heldout, &never).unwrap();
    let before = measure(&model, &heldout, &base, &plan, &never).unwrap();
    let after = measure(&model, &heldout, &base, &healed, &never).unwrap();
    eprintln!(
        "tiny {arch} held-out KL {:.5} → {:.5} ({} parameters)",
        before.kl_to_base, after.kl_to_base, r.section.parameters
    );
    assert!(
        // measured 0.777 → 0.736 (llama), 0.279 → 0.250 (gemma3)
        after.kl_to_base < 0.97 * before.kl_to_base,
        "{arch}: {} → {}",
        before.kl_to_base,
        after.kl_to_base
    );
}

/// Writes `factors` as a healed plan at `path`.
fn write_healed(
    model: &Model,
    plan: &Plan,
    factors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> PlanFile {
    let mut pf = PlanFile::new(model.identity.clone(), plan.clone());
    let section = HealSection {
        rank: factors.values().next().unwrap().dims()[0],
        targets: vec!["o_proj".into()],
        layers: vec![],
        artifact: HEAL_SECTION.into(),
        parameters: factors.values().map(|t| t.elem_count()).sum(),
    };
    pf.sections.set(HEAL_SECTION, &section).unwrap();
    let map = factors.clone().into_iter().collect();
    pf.write_artifact(path, HEAL_SECTION, &map, None).unwrap();
    pf.save(path).unwrap();
    pf
}

fn load(model: &Model, path: &Path, honoured: &[&str]) -> anyhow::Result<Plan> {
    let source = PlanSource {
        plan: Some(path.to_path_buf()),
        skip: None,
    };
    load_plan_honouring(&source, model, honoured).map(|(p, _)| p)
}

#[test]
fn a_healed_plan_round_trips_through_its_artifact() {
    let model = common::load_tiny("llama");
    let plan = skip_plan();
    let factors = random_factors(&model, &plan, 2, "o_proj,down_proj", 0.05);
    let work = common::scratch_dir();
    let path = work.path().join("healed.json");
    write_healed(&model, &plan, &factors, &path);
    let back = load(&model, &path, &[HEAL_SECTION]).unwrap();
    let expected = heal::with_factors(&plan, factors);
    assert_eq!(back, expected, "same skips and the same factors");
    let ids = tiny_ids(&model);
    assert_eq!(
        logits_with(&model, &ids, &back, RunOptions::FAST),
        logits_with(&model, &ids, &expected, RunOptions::FAST)
    );
    assert!(back.describe().contains("healed"), "{}", back.describe());
    // A command that does not apply corrections refuses the plan by name.
    let err = load(&model, &path, &[]).unwrap_err().to_string();
    assert!(err.contains("`heal` section"), "{err}");
}

#[test]
fn bad_factors_are_refused_by_name() {
    let model = common::load_tiny("llama");
    let plan = skip_plan();
    let work = common::scratch_dir();
    let good = random_factors(&model, &plan, 2, "o_proj", 0.05);
    let check = |factors: BTreeMap<String, Tensor>, name: &str| -> String {
        let path = work.path().join(format!("{name}.json"));
        write_healed(&model, &plan, &factors, &path);
        format!("{:#}", load(&model, &path, &[HEAL_SECTION]).unwrap_err())
    };
    // Factors of another model's width.
    let mut wrong = good.clone();
    let (an, _) = factor_names(0, 3);
    let (r, i) = wrong[&an].dims2().unwrap();
    wrong.insert(
        an.clone(),
        Tensor::zeros((r, i + 8), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = check(wrong, "shape");
    assert!(err.contains(&an) && err.contains("another model"), "{err}");
    // A layer the model does not have.
    let mut extra = good.clone();
    let (a9, b9) = factor_names(40, 3);
    extra.insert(a9, good[&an].clone());
    extra.insert(b9, good[&factor_names(0, 3).1].clone());
    let err = check(extra, "layer");
    assert!(
        err.contains("layer 40") && err.contains("another model"),
        "{err}"
    );
    // Half a correction.
    let mut half = good.clone();
    half.remove(&factor_names(0, 3).1);
    let err = check(half, "half");
    assert!(err.contains("has no `lora.0.o_proj.b`"), "{err}");
    // A correction on a block the plan skips.
    let mut skipped = good.clone();
    let (a1, b1) = factor_names(1, 3);
    skipped.insert(a1, good[&an].clone());
    skipped.insert(b1, good[&factor_names(0, 3).1].clone());
    let err = check(skipped, "skipped");
    assert!(err.contains("attn.1") && err.contains("skips"), "{err}");
    // A tampered artifact.
    let path = work.path().join("tampered.json");
    write_healed(&model, &plan, &good, &path);
    let art = work.path().join("tampered.heal.safetensors");
    let mut bytes = std::fs::read(&art).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&art, bytes).unwrap();
    let err = format!("{:#}", load(&model, &path, &[HEAL_SECTION]).unwrap_err());
    assert!(err.contains("sha256"), "{err}");
    // Rank 0 and unknown targets.
    let never = AtomicBool::new(false);
    let set = common::random_set(&model, 1, 2, 12);
    let err = heal::heal(
        &model,
        &plan,
        &set,
        &set,
        &options(0, "o_proj", 1, 1e-3),
        &never,
        &mut |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("--rank"), "{err}");
    let err = heal::parse_targets("o_proj,qq_proj")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qq_proj") && err.contains("down_proj"),
        "{err}"
    );
}

// --- merged into exports, on the real SmolLM2 ---

fn smollm2_ids(model: &Model) -> Vec<u32> {
    let text = &scalpel::commands::eval::DEFAULT_EVAL_TEXT[..600];
    model.codec().unwrap().encode(text).unwrap()[..64].to_vec()
}

fn export(plan_path: &Path, format: &str, out: &Path) {
    assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::smollm2_path().to_str().unwrap()])
        .args(["--plan", plan_path.to_str().unwrap()])
        .args(["export", "--format", format, "--no-measure", "--out"])
        .arg(out)
        .assert()
        .success();
}

fn healed_smollm2_plan(dir: &Path, scaled: bool, b_scale: f64) -> (Plan, std::path::PathBuf) {
    let model = common::smollm2();
    let mut plan = Plan::with_skips([6, 7, 25, 28].map(BlockId::attn));
    // Fitted-looking scales, so the merge composes with the fold.
    if scaled {
        plan.scales = Some(
            (0..model.n_layers())
                .map(|l| {
                    scalpel::plan::LayerScales::from_array([1.0, 1.0 + 0.002 * l as f32, 1.0, 0.99])
                })
                .collect(),
        );
    }
    let factors = random_factors(model, &plan, 4, "o_proj,down_proj,q_proj,up_proj", b_scale);
    let path = dir.join("healed.json");
    write_healed(model, &plan, &factors, &path);
    let healed = load(model, &path, &[HEAL_SECTION]).unwrap();
    assert!(healed.tensors.is_some());
    (healed, path)
}

fn load_f64(local: LocalModel) -> Model {
    let resolved = Resolved {
        local,
        origin: "test".into(),
    };
    Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap()
}

#[test]
fn a_decilm_export_merges_the_corrections_exactly() {
    let work = common::scratch_dir();
    // No scales: their fold is exact only up to RMSNorm's eps (tested in
    // export_roundtrip); the merge itself is exact up to f32 rounding.
    let (healed, path) = healed_smollm2_plan(work.path(), false, 0.02);
    let out = work.path().join("healed-decilm");
    export(&path, "decilm", &out);
    // Both sides in f64 (the slow ops), so what is compared is the merge,
    // not 30 layers of f32 rounding.
    let model = load_f64(LocalModel::Gguf(common::smollm2_path()));
    let reloaded = load_f64(LocalModel::HfDir(out));
    let ids = smollm2_ids(&model);
    let run = RunOptions::DIFFERENTIABLE;
    let ours = logits_with(&model, &ids, &healed, run);
    let unhealed = logits_with(
        &model,
        &ids,
        &Plan {
            tensors: None,
            ..healed.clone()
        },
        run,
    );
    let theirs = logits_with(&reloaded, &ids, &reloaded.implied_plan, run);
    let diff = common::max_abs_diff(&ours, &theirs);
    let moved = common::max_abs_diff(&ours, &unhealed);
    eprintln!(
        "decilm export vs healed plan: max |Δlogit| = {diff:e} (the heal moves them by {moved:e})"
    );
    assert!(moved > 0.1, "the corrections should matter: {moved}");
    assert!(diff < 5e-5, "{diff}"); // measured 6.7e-6
}

#[test]
fn a_gguf_export_merges_the_corrections_and_reloads_close() {
    let model = common::smollm2();
    let work = common::scratch_dir();
    // Corrections large enough to stand out of the Q8_0 re-rounding.
    let (healed, path) = healed_smollm2_plan(work.path(), true, 0.1);
    let out = work.path().join("healed.gguf");
    export(&path, "gguf", &out);
    let reloaded = Model::load(
        &Resolved {
            local: LocalModel::Gguf(out),
            origin: "test".into(),
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(reloaded.implied_plan.skip, healed.skip);
    let ids = smollm2_ids(model);
    let ours = logits_with(model, &ids, &healed, RunOptions::FAST);
    let unhealed = logits_with(
        model,
        &ids,
        &Plan {
            tensors: None,
            ..healed.clone()
        },
        RunOptions::FAST,
    );
    let theirs = logits_with(&reloaded, &ids, &reloaded.implied_plan, RunOptions::FAST);
    let rms = |a: &[f32], b: &[f32]| {
        (a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            / a.len() as f64)
            .sqrt()
    };
    let (to_healed, to_unhealed) = (rms(&ours, &theirs), rms(&unhealed, &theirs));
    eprintln!(
        "gguf export: rms Δlogit {to_healed:.4} to the healed plan, {to_unhealed:.4} to the plan without its heal"
    );
    // Re-quantizing the touched tensors costs a little; the heal is kept.
    assert!(
        to_healed < 0.5 * to_unhealed,
        "{to_healed} vs {to_unhealed}"
    );
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    (sum / a.len() as f64).sqrt()
}

#[test]
fn the_lean_decode_path_applies_the_corrections() {
    let model = common::smollm2();
    assert!(model.transformer.lean_ready().unwrap());
    let work = common::scratch_dir();
    // A heal that moves the logits well beyond the 8-bit activations'
    // own noise on the quantized path (~0.26 rms here), so the check can tell.
    let (healed, _) = healed_smollm2_plan(work.path(), true, 0.25);
    let unhealed = Plan {
        tensors: None,
        ..healed.clone()
    };
    // 12 rows: the lean CPU path's size (a decode step or a short verify),
    // on the file's quantized weights; f32 is the reference (the lean path
    // keeps f32 activations, so it tracks f32 closely).
    let ids = &smollm2_ids(model)[..12];
    let lean = |plan: &Plan| logits_with(model, ids, plan, RunOptions::QUANTIZED);
    let f32 = |plan: &Plan| logits_with(model, ids, plan, RunOptions::FAST);
    let (lean_h, lean_u) = (lean(&healed), lean(&unhealed));
    let (f32_h, f32_u) = (f32(&healed), f32(&unhealed));
    // The heal's effect on the logits, on each path: the quantization's own
    // difference mostly cancels, a correction left out would not.
    let effect =
        |h: &[f32], u: &[f32]| -> Vec<f32> { h.iter().zip(u).map(|(a, b)| a - b).collect() };
    let (on_lean, on_f32) = (effect(&lean_h, &lean_u), effect(&f32_h, &f32_u));
    let zeros = vec![0f32; on_f32.len()];
    let (size, miss) = (rms(&on_f32, &zeros), rms(&on_lean, &on_f32));
    eprintln!(
        "the heal moves logits by rms {size:.4} in f32; the lean path's move differs by rms {miss:.4} \
         (lean vs f32 itself, unhealed: {:.4})",
        rms(&lean_u, &f32_u)
    );
    assert!(size > 0.1, "{size}");
    assert!(miss < 0.3 * size, "{miss} vs {size}");
}

#[test]
fn mergekit_refuses_a_healed_plan_by_name() {
    let model = common::load_tiny("llama");
    let plan = Plan::with_skips([BlockId::attn(1)]);
    let work = common::scratch_dir();
    let path = work.path().join("healed.json");
    write_healed(
        &model,
        &plan,
        &random_factors(&model, &plan, 2, "o_proj", 0.05),
        &path,
    );
    let out = assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::tiny_dir("llama").to_str().unwrap()])
        .args(["--plan", path.to_str().unwrap()])
        .args(["export", "--format", "mergekit", "--out"])
        .arg(work.path().join("recipe.yaml"))
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(
        err.contains("plan section `heal`") && err.contains("mergekit"),
        "{err}"
    );
    assert!(!work.path().join("recipe.yaml").exists());
}

/// llama.cpp's perplexity of a GGUF on `ids` (windows of 512), through
/// tests/llamacpp_eval.py (llama-cpp-python).
fn llama_cpp_perplexity(gguf: &Path, ids: &[u32], work: &Path) -> f64 {
    let ids_path = work.join("ids.json");
    std::fs::write(&ids_path, serde_json::json!({ "ids": ids }).to_string()).unwrap();
    let result_path = work.join("llama.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llamacpp_eval.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["--ids", ids_path.to_str().unwrap(), "--window", "512"])
        .args(["--ppl", gguf.to_str().unwrap()])
        .args(["--out", result_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llama.cpp evaluation failed (is llama-cpp-python installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::read_json(result_path)["ppl"].as_f64().unwrap()
}

/// The healed GGUF export in llama.cpp against scalpel's perplexity of the
/// healed plan on the default eval text. `SCALPEL_HEAL_PLAN=plan.json`
/// measures that plan (how the README's number was taken) instead of a
/// plan with random corrections.
#[test]
fn llama_cpp_scores_a_healed_gguf_export_like_scalpel() {
    let model = common::smollm2();
    let work = common::scratch_dir();
    let (healed, path) = match std::env::var_os("SCALPEL_HEAL_PLAN") {
        Some(p) => {
            let p = std::path::PathBuf::from(p);
            (load(model, &p, &[HEAL_SECTION]).unwrap(), p)
        }
        None => healed_smollm2_plan(work.path(), true, 0.02),
    };
    let gguf = work.path().join("healed.gguf");
    export(&path, "gguf", &gguf);
    let ids = model
        .codec()
        .unwrap()
        .encode(scalpel::commands::eval::DEFAULT_EVAL_TEXT)
        .unwrap();
    let opts = scalpel::eval::perplexity::EvalOptions {
        window: 512,
        compare_base: false,
        run: RunOptions::FAST,
        parallel_windows: true,
    };
    let ppl = |plan: &Plan| {
        scalpel::eval::perplexity::evaluate(
            model,
            &ids,
            plan,
            opts,
            &AtomicBool::new(false),
            |_, _| {},
        )
        .unwrap()
        .perplexity
    };
    let ours = ppl(&healed);
    let theirs = llama_cpp_perplexity(&gguf, &ids, work.path());
    let rel = (theirs / ours - 1.0).abs();
    eprintln!(
        "perplexity of the healed plan: scalpel {ours:.4}, llama.cpp on the healed deci GGUF \
         {theirs:.4} ({:.3}% apart)",
        rel * 100.0
    );
    assert!(rel < 0.01, "llama.cpp {theirs} vs scalpel {ours}");
}
