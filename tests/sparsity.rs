//! Contextual sparsity: a head/neuron mask executed with sliced weights
//! equals the masked forward, plainact scores are the gradients they claim
//! to be, level 0 is the base model exactly, and bad input is refused.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use scalpel::eval::data::Sequence;
use scalpel::model::source::{LocalModel, Resolved};
use scalpel::model::{Model, Pass, Probe, Projection, RunOptions};
use scalpel::plan::Plan;
use scalpel::surgery::objective::{sequence_loss, LossKind};
use scalpel::surgery::sparsity::activation::{thresholds, ActivationSamples, ChannelProbe};
use scalpel::surgery::sparsity::evaluate::{evaluate, HeldOut};
use scalpel::surgery::sparsity::scores::sequence_scores;
use scalpel::surgery::sparsity::{
    check_level, check_section, Criterion, MaskPolicy, Method, Shape, Sparsifier, SparsitySection,
    UnitMask, UnitScores,
};

const FAST: RunOptions = RunOptions::FAST;

/// The first `n` of a tiny model's reference ids (each tiny model has its
/// own vocabulary).
fn ids_of(name: &str, n: usize) -> Vec<u32> {
    let r = common::read_json(common::tiny_dir(name).join("reference.json"));
    common::json_ints::<u32>(&r["token_ids"])[..n].to_vec()
}

fn tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Zeroes the dropped heads' context and the dropped neurons' activations:
/// the masked computation a sliced-weight forward must equal.
struct Masking<'a> {
    mask: &'a UnitMask,
    n_heads: usize,
    n_neurons: usize,
}

fn keep_vector(kept: &[u32], n: usize, dtype: DType) -> Tensor {
    let v: Vec<f32> = (0..n as u32)
        .map(|i| f32::from(u8::from(kept.contains(&i))))
        .collect();
    Tensor::new(v.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

impl Probe for Masking<'_> {
    fn wants_head_context(&self, _layer: usize) -> bool {
        true
    }
    fn head_context(
        &mut self,
        layer: usize,
        _heads: &[u32],
        ctx: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let keep = keep_vector(&self.mask.heads[layer], self.n_heads, ctx.dtype()).reshape((
            1,
            1,
            self.n_heads,
            1,
        ))?;
        ctx.broadcast_mul(&keep).map(Some)
    }
    fn wants_projection_inputs(&self, _layer: usize) -> bool {
        true
    }
    fn projection_input(
        &mut self,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if proj != Projection::Down {
            return Ok(None);
        }
        let keep = keep_vector(&self.mask.neurons[layer], self.n_neurons, x.dtype());
        x.broadcast_mul(&keep).map(Some)
    }
}

/// A mask dropping heads and neurons in every layer (different per layer).
fn some_mask(model: &Model, level: f64) -> UnitMask {
    UnitMask::from_scores(&UnitScores::random(model, 3), level).unwrap()
}

/// Logits of `ids` under the mask: sliced weights, and masked full weights.
fn sliced_and_masked(
    model: &Model,
    ids: &[u32],
    mask: &UnitMask,
    run: RunOptions,
) -> (Vec<f32>, Vec<f32>) {
    let t = &model.transformer;
    let plan = Plan::base();
    let cfg = model.cfg();
    let policy = MaskPolicy::new(&plan, mask, cfg).unwrap();
    let sliced = t
        .forward_hidden(
            &tensor(ids),
            &mut Pass::plan(&plan, run).with_policy(&policy),
        )
        .unwrap();
    let mut probe = Masking {
        mask,
        n_heads: cfg.n_heads,
        n_neurons: cfg.intermediate_size,
    };
    let masked = t
        .forward_hidden(
            &tensor(ids),
            &mut Pass::plan(&plan, run).with_probe(&mut probe),
        )
        .unwrap();
    (
        to_vec(&t.logits(&sliced, run).unwrap()),
        to_vec(&t.logits(&masked, run).unwrap()),
    )
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    common::max_abs_diff(a, b)
}

#[test]
fn a_sliced_mask_equals_the_masked_forward_on_the_tiny_models() {
    for name in ["llama", "mistral", "gemma3"] {
        let model = common::load_tiny(name);
        let mask = some_mask(&model, 0.5);
        let (h, n) = mask.dropped_fractions(model.cfg());
        assert!(h > 0.4 && n > 0.4, "{name}: the mask must drop units");
        let ids = ids_of(name, 12);
        let (sliced, masked) = sliced_and_masked(&model, &ids, &mask, FAST);
        let d = max_diff(&sliced, &masked);
        eprintln!("{name}: sliced vs masked logits, max |Δ| {d:e}");
        assert!(d < 1e-5, "{name}: {d}");
        // The second run reads the cached slices: the same numbers.
        let (again, _) = sliced_and_masked(&model, &ids, &mask, FAST);
        assert_eq!(sliced, again, "{name}: cached slices differ");
        // And the mask changes the output (it is not a no-op).
        let base = to_vec(
            &model
                .transformer
                .logits(
                    &model
                        .transformer
                        .forward_hidden(&tensor(&ids), &mut Pass::plan(&Plan::base(), FAST))
                        .unwrap(),
                    FAST,
                )
                .unwrap(),
        );
        assert!(
            max_diff(&base, &sliced) > 1e-3,
            "{name}: mask had no effect"
        );
    }
}

#[test]
fn a_sliced_mask_equals_the_masked_forward_on_smollm2() {
    // In f64 the two computations agree to rounding; in f32 thirty layers
    // of differently ordered sums leave a relative 1e-4 on the logits.
    let f32_model = common::smollm2();
    let ids = f32_model
        .codec()
        .unwrap()
        .encode("The quick brown fox jumps over the lazy dog, and then it runs away.")
        .unwrap();
    let mask = some_mask(f32_model, 0.4);
    let (sliced, masked) = sliced_and_masked(f32_model, &ids, &mask, FAST);
    let scale = masked.iter().fold(0f32, |m, x| m.max(x.abs()));
    let rel = max_diff(&sliced, &masked) / scale;
    eprintln!("SmolLM2 f32: sliced vs masked logits, max |Δ| / max |logit| {rel:e}");
    assert!(rel < 3e-4, "{rel}");
    let resolved = Resolved {
        local: LocalModel::Gguf(common::smollm2_path()),
        origin: "test".into(),
    };
    let model = Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap();
    let run = RunOptions::DIFFERENTIABLE;
    let (sliced, masked) = sliced_and_masked(&model, &ids, &mask, run);
    let d = max_diff(&sliced, &masked);
    eprintln!("SmolLM2 f64: sliced vs masked logits, max |Δ| {d:e}");
    assert!(d < 1e-5, "{d}");
}

/// Scales head `head` of layer `layer` (or neuron `neuron`) by `1 + delta`.
struct Nudge {
    layer: usize,
    head: Option<usize>,
    neuron: Option<usize>,
    delta: f64,
}

fn nudge_vector(n: usize, at: usize, delta: f64) -> Tensor {
    let mut v = vec![1f64; n];
    v[at] += delta;
    Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
}

impl Probe for Nudge {
    fn wants_head_context(&self, layer: usize) -> bool {
        layer == self.layer && self.head.is_some()
    }
    fn head_context(
        &mut self,
        _layer: usize,
        _heads: &[u32],
        ctx: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = ctx.dim(2)?;
        let g = nudge_vector(n, self.head.unwrap(), self.delta).reshape((1, 1, n, 1))?;
        ctx.broadcast_mul(&g).map(Some)
    }
    fn wants_projection_inputs(&self, layer: usize) -> bool {
        layer == self.layer && self.neuron.is_some()
    }
    fn projection_input(
        &mut self,
        _layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if proj != Projection::Down {
            return Ok(None);
        }
        let g = nudge_vector(x.dim(2)?, self.neuron.unwrap(), self.delta);
        x.broadcast_mul(&g).map(Some)
    }
}

#[test]
fn plainact_scores_equal_finite_differences_on_a_tiny_model() {
    let resolved = Resolved {
        local: LocalModel::HfDir(common::tiny_dir("llama")),
        origin: "test".into(),
    };
    let model = Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap();
    let seq = Sequence {
        ids: ids_of("llama", 12),
        scored_from: 1,
    };
    let plan = Plan::base();
    let (plainact, magnitude) = sequence_scores(&model, &seq, &plan).unwrap();
    let loss = |probe: &mut Nudge| -> f64 {
        let run = RunOptions::DIFFERENTIABLE;
        let mut pass = Pass::plan(&plan, run).with_probe(probe);
        let h = model
            .transformer
            .forward_hidden(&tensor(&seq.ids), &mut pass)
            .unwrap()
            .squeeze(0)
            .unwrap();
        sequence_loss(&model, &seq, &h, None, LossKind::Ce, run)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    let fd = |layer: usize, head: Option<usize>, neuron: Option<usize>| {
        let at = |delta| {
            loss(&mut Nudge {
                layer,
                head,
                neuron,
                delta,
            })
        };
        ((at(eps) - at(-eps)) / (2.0 * eps)).abs()
    };
    for layer in [0, 3] {
        for head in 0..model.cfg().n_heads {
            let want = fd(layer, Some(head), None);
            let got = plainact.heads[layer][head];
            assert!(
                want > 1e-6,
                "layer {layer} head {head}: the head must matter"
            );
            worst = worst.max((got - want).abs() / want);
            assert!(
                (got - want).abs() < 1e-5 * want + 1e-9,
                "layer {layer} head {head}: plainact {got} vs finite difference {want}"
            );
        }
        for neuron in [0, 17, 127] {
            let want = fd(layer, None, Some(neuron));
            let got = plainact.neurons[layer][neuron];
            worst = worst.max((got - want).abs() / want.max(1e-12));
            assert!(
                (got - want).abs() < 1e-5 * want + 1e-9,
                "layer {layer} neuron {neuron}: plainact {got} vs finite difference {want}"
            );
        }
    }
    eprintln!("plainact vs finite difference: max relative error {worst:e}");
    assert!(magnitude.heads.iter().flatten().all(|&m| m > 0.0));
}

#[test]
fn level_zero_is_the_base_model_exactly() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 1, 4, 24);
    let cancel = AtomicBool::new(false);
    let text = &common::random_set(&model, 9, 1, 48).sequences[0].ids;
    let held = HeldOut::new(&model, text, 16, 3).unwrap();
    assert_eq!(held.windows.len(), 3);
    let plan = Plan::base();
    let dense = evaluate(
        &model,
        &plan,
        &Sparsifier::Dense,
        &held,
        FAST,
        false,
        &cancel,
    )
    .unwrap();
    assert_eq!(dense.kl_to_base, 0.0);
    let mask = UnitMask::from_scores(&UnitScores::random(&model, 1), 0.0).unwrap();
    assert_eq!(mask.dropped_fractions(model.cfg()), (0.0, 0.0));
    let masked = evaluate(
        &model,
        &plan,
        &Sparsifier::Mask(mask),
        &held,
        FAST,
        false,
        &cancel,
    )
    .unwrap();
    let samples = ActivationSamples::collect(&model, &calib, &cancel).unwrap();
    let teal = thresholds(&samples, None, Criterion::Teal, &[0.0])
        .unwrap()
        .remove(0);
    let channels = Sparsifier::Channels {
        thresholds: teal,
        norms: None,
    };
    let teal = evaluate(&model, &plan, &channels, &held, FAST, false, &cancel).unwrap();
    for (what, q) in [("mask", &masked), ("teal", &teal)] {
        assert_eq!(q.perplexity, dense.perplexity, "{what}");
        assert_eq!(q.kl_to_base, 0.0, "{what}");
        assert_eq!(q.top1_agreement, 1.0, "{what}");
    }
    assert_eq!(teal.channels_zeroed, Some(0.0));
    // A level-0 section runs the plan itself.
    let section = SparsitySection {
        method: Method::Static,
        level: 0.0,
        split: "per-layer".into(),
        shape: Shape::of(model.cfg()),
        mask: Some(UnitMask::from_scores(&UnitScores::random(&model, 1), 0.0).unwrap()),
        thresholds: None,
        artifact: None,
    };
    assert!(matches!(
        section.sparsifier(&model).unwrap(),
        Sparsifier::Dense
    ));
}

#[test]
fn teal_and_wina_thresholds_zero_about_the_level_on_their_calibration_data() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 2, 4, 32);
    let cancel = AtomicBool::new(false);
    let samples = ActivationSamples::collect(&model, &calib, &cancel).unwrap();
    let norms = scalpel::surgery::sparsity::ColumnNorms::of(&model).unwrap();
    let plan = Plan::base();
    for crit in [Criterion::Teal, Criterion::Wina] {
        let th = thresholds(&samples, Some(&norms), crit, &[0.4])
            .unwrap()
            .remove(0);
        let mut probe = ChannelProbe::new(&model, &th, Some(&norms)).unwrap();
        for seq in &calib.sequences {
            model
                .transformer
                .forward_hidden(
                    &tensor(&seq.ids),
                    &mut Pass::plan(&plan, FAST).with_probe(&mut probe),
                )
                .unwrap();
        }
        // Layers after the first see already-sparsified inputs, so the
        // fraction drifts a little from the calibrated level.
        let z = probe.zeroed_fraction();
        eprintln!("{crit:?} at 0.4 on its calibration data: {z:.3} zeroed");
        assert!((z - 0.4).abs() < 0.05, "{crit:?}: {z}");
    }
}

#[test]
fn bad_levels_and_other_models_sections_are_refused() {
    for bad in [1.0, 1.5, -0.1, f64::NAN] {
        let e = check_level(bad).unwrap_err().to_string();
        assert!(e.contains("outside [0, 1)"), "{bad}: {e}");
    }
    let model = common::load_tiny("llama");
    let mut section = SparsitySection {
        method: Method::Random,
        level: 0.25,
        split: "per-layer".into(),
        shape: Shape::of(model.cfg()),
        mask: Some(UnitMask::from_scores(&UnitScores::random(&model, 1), 0.25).unwrap()),
        thresholds: None,
        artifact: None,
    };
    assert!(section.sparsifier(&model).is_ok());
    section.shape.n_heads += 1;
    let e = section.sparsifier(&model).err().unwrap().to_string();
    assert!(
        e.contains("made for a model of") && e.contains("scalpel sparsify"),
        "{e}"
    );
    // A mask naming a head this model lacks (another model's mask).
    let mut mask = UnitMask::from_scores(&UnitScores::random(&model, 1), 0.25).unwrap();
    mask.heads[0] = vec![0, 99];
    let section = SparsitySection {
        shape: Shape::of(model.cfg()),
        mask: Some(mask),
        ..section
    };
    let e = section.sparsifier(&model).err().unwrap().to_string();
    assert!(e.contains("does not fit this model"), "{e}");
    // The section's JSON check: teal needs thresholds, a level in range.
    let v = serde_json::json!({"method": "teal", "level": 0.4, "split": "per-projection",
        "shape": {"n_layers": 4, "n_heads": 4, "intermediate_size": 128, "hidden_size": 64}});
    let e = format!("{:#}", check_section(&v).unwrap_err());
    assert!(e.contains("needs thresholds"), "{e}");
    let v = serde_json::json!({"method": "oracle", "level": 1.2, "split": "per-layer",
        "shape": {"n_layers": 4, "n_heads": 4, "intermediate_size": 128, "hidden_size": 64}});
    let e = format!("{:#}", check_section(&v).unwrap_err());
    assert!(e.contains("outside [0, 1)"), "{e}");
    let e = "shadowllm".parse::<Method>().unwrap_err().to_string();
    assert!(e.contains("expected one of") && e.contains("shadow"), "{e}");
}

#[test]
fn a_sparsity_section_round_trips_through_a_plan_file() {
    use scalpel::plan::PlanFile;
    use scalpel::surgery::sparsity::SPARSITY_SECTION;
    let model = common::load_tiny("llama");
    let mask = UnitMask::from_scores(&UnitScores::random(&model, 5), 0.5).unwrap();
    let section = SparsitySection {
        method: Method::Random,
        level: 0.5,
        split: "per-layer".into(),
        shape: Shape::of(model.cfg()),
        mask: Some(mask.clone()),
        thresholds: None,
        artifact: None,
    };
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    pf.sections.set(SPARSITY_SECTION, &section).unwrap();
    let dir = common::scratch_dir();
    let path = dir.path().join("sparse.json");
    pf.save(&path).unwrap();
    let back = model.load_plan(&path).unwrap();
    let read: SparsitySection = back.sections.get(SPARSITY_SECTION).unwrap().unwrap();
    assert_eq!(read, section);
    match read.sparsifier(&model).unwrap() {
        Sparsifier::Mask(m) => assert_eq!(m, mask),
        _ => panic!("a random section runs its mask"),
    }
}

#[test]
fn the_cli_refuses_a_level_outside_zero_to_one() {
    let out = assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args([
            "sparsify", "--method", "static", "--level", "1.5", "--out", "x.json",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside [0, 1)"), "{err}");
}

#[test]
fn a_global_split_drops_the_lowest_units_across_layers() {
    use scalpel::surgery::sparsity::Split;
    // Layer 0's heads score lowest: a global split takes them first but
    // keeps one; a per-layer split drops the same count everywhere.
    let scores = UnitScores {
        heads: vec![vec![0.1, 0.2, 0.3, 0.4], vec![5.0, 6.0, 7.0, 8.0]],
        neurons: vec![vec![1.0, 0.5, 3.0], vec![0.7, 2.0, 0.1]],
    };
    let g = UnitMask::with_split(&scores, 0.5, Split::Global).unwrap();
    assert_eq!(g.heads, vec![vec![3], vec![1, 2, 3]]);
    assert_eq!(g.neurons, vec![vec![0, 2], vec![1]]);
    let p = UnitMask::with_split(&scores, 0.5, Split::PerLayer).unwrap();
    assert_eq!(p.heads, vec![vec![2, 3], vec![2, 3]]);
    assert_eq!(p.neurons, vec![vec![2], vec![1]]);
    assert!("model-wide".parse::<Split>().is_err());
}

/// Attention 0's output before its residual add, from a full base pass.
struct FirstAttention(Option<Tensor>);

impl Probe for FirstAttention {
    fn block_output(
        &mut self,
        block: scalpel::plan::BlockId,
        _input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if block == scalpel::plan::BlockId::attn(0) {
            self.0 = Some(output.clone());
        }
        Ok(None)
    }
}

#[test]
fn the_shadow_predictor_reads_attention_0_and_predicts_per_prompt_scores() {
    use scalpel::surgery::sparsity::predictor::{
        features, rank_agreement, LinearFit, Predictor, NEURON_GROUP,
    };
    let model = common::load_tiny("llama");
    let ids = ids_of("llama", 12);
    // The cheap pass (every later block skipped, the prefix only) reads
    // what a full pass computes at that position.
    let mut probe = FirstAttention(None);
    model
        .transformer
        .forward_hidden(
            &tensor(&ids),
            &mut Pass::plan(&Plan::base(), FAST).with_probe(&mut probe),
        )
        .unwrap();
    let full = probe.0.unwrap();
    for position in [0, 5, 11] {
        let want = to_vec(&full.narrow(1, position, 1).unwrap());
        let got = features(&model, &ids, position).unwrap();
        assert!(
            common::max_abs_diff(&got, &want) < 1e-5,
            "position {position}"
        );
    }

    // Trained on per-sequence scores of prompt/answer sequences.
    let set = common::random_set(&model, 41, 12, 20);
    let mut calib = set.clone();
    for s in &mut calib.sequences {
        s.scored_from = 8;
    }
    let never = AtomicBool::new(false);
    let statics = sequence_scores(&model, &calib.sequences[0], &Plan::base())
        .unwrap()
        .0;
    let (predictor, fit) =
        Predictor::train(&model, &calib, &statics, &[LinearFit::default()], &never).unwrap();
    assert!(fit.validation_mse <= fit.validation_mse_of_mean);
    assert!(fit.train_mse.is_finite());
    let cfg = model.cfg();
    let groups = cfg.intermediate_size.div_ceil(NEURON_GROUP);
    assert_eq!(
        predictor.map.parameters(),
        (cfg.hidden_size + 1) * cfg.n_layers * (cfg.n_heads + groups)
    );
    let seq = &calib.sequences[3];
    let predicted = predictor.scores(&model, &seq.ids, 7).unwrap();
    assert_eq!(predicted.heads.len(), cfg.n_layers);
    assert!(predicted.heads.iter().all(|l| l.len() == cfg.n_heads));
    assert!(predicted
        .neurons
        .iter()
        .all(|l| l.len() == cfg.intermediate_size));
    assert!(predicted
        .heads
        .iter()
        .chain(&predicted.neurons)
        .flatten()
        .all(|s| s.is_finite() && *s > 0.0));
    // A mask from the predicted scores drops what the level asks.
    let mask = UnitMask::from_scores(&predicted, 0.5).unwrap();
    let (h, n) = mask.dropped_fractions(cfg);
    assert!((h - 0.5).abs() < 0.1 && (n - 0.5).abs() < 0.1, "{h} {n}");
    // A perfect prediction agrees with itself.
    let (rh, rn) = rank_agreement(&predicted, &predicted);
    assert!((rh - 1.0).abs() < 1e-12 && (rn - 1.0).abs() < 1e-12);
}

#[test]
fn a_shadow_plan_round_trips_its_predictor_and_eval_runs_it() {
    use scalpel::model::TrainableParams;
    use scalpel::plan::PlanFile;
    use scalpel::surgery::sparsity::predictor::{LinearFit, Predictor, PREDICTOR_ARTIFACT};
    let model = common::load_tiny("llama");
    let never = AtomicBool::new(false);
    let mut calib = common::random_set(&model, 43, 8, 20);
    for s in &mut calib.sequences {
        s.scored_from = 8;
    }
    let statics = sequence_scores(&model, &calib.sequences[0], &Plan::base())
        .unwrap()
        .0;
    let opts = LinearFit {
        l2: 0.0,
        ..LinearFit::default()
    };
    let (predictor, _) = Predictor::train(&model, &calib, &statics, &[opts], &never).unwrap();

    let dir = common::scratch_dir();
    let path = dir.path().join("shadow.json");
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    let mut params = TrainableParams::new();
    for (name, t) in predictor.tensors().unwrap() {
        params.insert(&name, &t).unwrap();
    }
    params
        .save_artifact(&mut pf, &path, PREDICTOR_ARTIFACT, "test predictor")
        .unwrap();
    let section = SparsitySection {
        method: Method::Shadow,
        level: 0.5,
        split: "per-layer".into(),
        shape: Shape::of(model.cfg()),
        mask: None,
        thresholds: None,
        artifact: Some(PREDICTOR_ARTIFACT.into()),
    };
    pf.sections.set("sparsity", &section).unwrap();
    pf.save(&path).unwrap();

    let back = PlanFile::load(&path).unwrap();
    let read: SparsitySection = back.sections.get("sparsity").unwrap().unwrap();
    let loaded = read.sparsifier_in(&back, &model).unwrap();
    let Sparsifier::Predicted {
        predictor: reloaded,
        ..
    } = &loaded
    else {
        panic!("a shadow section runs the predictor");
    };
    let ids = &calib.sequences[2].ids;
    assert_eq!(
        reloaded.scores(&model, ids, 9).unwrap(),
        predictor.scores(&model, ids, 9).unwrap(),
        "the reloaded predictor predicts the same scores"
    );
    // Evaluated per window: the same numbers as the in-memory predictor,
    // and not the dense model's.
    let text = &common::random_set(&model, 44, 1, 40).sequences[0].ids;
    let held = HeldOut::new(&model, text, 20, 2).unwrap();
    let eval =
        |sp: &Sparsifier| evaluate(&model, &Plan::base(), sp, &held, FAST, false, &never).unwrap();
    let in_memory = Sparsifier::Predicted {
        predictor: std::sync::Arc::new(predictor),
        level: 0.5,
        split: "per-layer".parse().unwrap(),
    };
    assert_eq!(eval(&loaded).kl_to_base, eval(&in_memory).kl_to_base);
    assert!(eval(&loaded).kl_to_base > 0.0);
    // Without its plan file the section cannot run, and says where it can.
    let e = read.sparsifier(&model).err().unwrap().to_string();
    assert!(e.contains("with its plan file"), "{e}");

    // A predictor trained for another model is refused naming the tensor.
    let other = common::load_tiny("gemma3");
    let e = format!(
        "{:#}",
        SparsitySection {
            shape: Shape::of(other.cfg()),
            ..read.clone()
        }
        .sparsifier_in(&back, &other)
        .err()
        .unwrap()
    );
    assert!(e.contains("shadow.") && e.contains("another model"), "{e}");
    // The section's check: shadow needs its artifact, the others none.
    let mut v = serde_json::to_value(&read).unwrap();
    v.as_object_mut().unwrap().remove("artifact");
    let e = check_section(&v).unwrap_err().to_string();
    assert!(e.contains("predictor artifact"), "{e}");
}

/// Greedy tokens after `prompt`, each from a full pass over the sequence so
/// far (no cache) with `policy` and a fresh probe from `probe` (if any).
fn greedy_full_passes(
    model: &Model,
    prompt: &[u32],
    n: usize,
    policy: &dyn scalpel::model::LayerPolicy,
    mut probe: impl FnMut() -> Option<ChannelProbe<'static>>,
) -> Vec<u32> {
    let t = &model.transformer;
    let plan = Plan::base();
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let mut p = probe();
        let mut pass = Pass::plan(&plan, FAST).with_policy(policy);
        if let Some(p) = p.as_mut() {
            pass = pass.with_probe(p);
        }
        let h = t.forward_hidden(&tensor(&ids), &mut pass).unwrap();
        let last = h.narrow(1, ids.len() - 1, 1).unwrap();
        let logits = t.logits(&last, FAST).unwrap();
        ids.push(
            logits
                .flatten_all()
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap(),
        );
    }
    ids[prompt.len()..].to_vec()
}

fn greedy(n: usize) -> scalpel::eval::generate::GenOptions {
    scalpel::eval::generate::GenOptions {
        max_new_tokens: n,
        temperature: 0.0,
        seed: 0,
        stop_at_eos: false,
        run: FAST,
    }
}

/// Generation under a sparse plan decodes through the cache what full
/// passes compute: a head/neuron mask (sliced weights) and TEAL's channel
/// thresholds (a probe on every pass), each against the dense output.
#[test]
fn generation_under_a_mask_or_channel_thresholds_equals_full_passes() {
    use scalpel::eval::generate::{generate, generate_with, Hooks};
    let model = common::load_tiny("llama");
    let prompt = ids_of("llama", 6);
    let plan = Plan::base();
    let n = 10;
    let dense = generate(&model, &prompt, &plan, greedy(n), |_| Ok(())).unwrap();

    let mask = some_mask(&model, 0.5);
    let policy = MaskPolicy::new(&plan, &mask, model.cfg()).unwrap();
    let hooks = Hooks {
        policy: Some(&policy),
        probe: None,
    };
    let masked = generate_with(&model, &prompt, &plan, hooks, greedy(n), |_| Ok(())).unwrap();
    assert_eq!(
        masked.new_tokens,
        greedy_full_passes(&model, &prompt, n, &policy, || None)
    );
    assert_ne!(
        masked.new_tokens, dense.new_tokens,
        "the mask changed nothing"
    );

    // TEAL at 0.5, thresholds calibrated on other text.
    let calib = common::random_set(&model, 2, 4, 32);
    let samples = ActivationSamples::collect(&model, &calib, &AtomicBool::new(false)).unwrap();
    let th: &'static _ = Box::leak(Box::new(
        thresholds(&samples, None, Criterion::Teal, &[0.5])
            .unwrap()
            .remove(0),
    ));
    let mut probe = ChannelProbe::new(&model, th, None).unwrap();
    let hooks = Hooks {
        policy: None,
        probe: Some(&mut probe),
    };
    let teal = generate_with(&model, &prompt, &plan, hooks, greedy(n), |_| Ok(())).unwrap();
    let z = probe.zeroed_fraction();
    assert!((z - 0.5).abs() < 0.15, "zeroed {z}");
    let full = greedy_full_passes(&model, &prompt, n, &plan, || {
        Some(ChannelProbe::new(&model, th, None).unwrap())
    });
    assert_eq!(teal.new_tokens, full);
    assert_ne!(teal.new_tokens, dense.new_tokens, "TEAL changed nothing");
}

/// Writes a random-mask or a TEAL plan for SmolLM2 and returns its path.
fn smollm2_sparse_plan(dir: &std::path::Path, method: Method, level: f64) -> std::path::PathBuf {
    use scalpel::plan::PlanFile;
    let model = common::smollm2();
    let (mask, thresholds) = match method {
        Method::Random => (
            Some(UnitMask::from_scores(&UnitScores::random(model, 5), level).unwrap()),
            None,
        ),
        Method::Teal => {
            let calib = common::random_set(model, 3, 2, 48);
            let samples =
                ActivationSamples::collect(model, &calib, &AtomicBool::new(false)).unwrap();
            let th = thresholds(&samples, None, Criterion::Teal, &[level]).unwrap();
            (None, th.into_iter().next())
        }
        m => panic!("no test plan for {m}"),
    };
    let section = SparsitySection {
        method,
        level,
        split: if method == Method::Teal {
            "per-projection".into()
        } else {
            "per-layer".into()
        },
        shape: Shape::of(model.cfg()),
        mask,
        thresholds,
        artifact: None,
    };
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    pf.sections.set("sparsity", &section).unwrap();
    let path = dir.join(format!("{method}.json"));
    pf.save(&path).unwrap();
    path
}

fn scalpel_on_smollm2(args: &[&str]) -> std::process::Output {
    let gguf = common::smollm2_path();
    std::process::Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--offline", "--model", gguf.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `generate`, `speculate` and `bench` take a sparse plan: a mask and
/// TEAL (at decode) are executed, and both draft losslessly.
#[test]
fn the_decoding_commands_run_a_sparse_plan_and_say_how() {
    let dir = common::scratch_dir();
    let random = smollm2_sparse_plan(dir.path(), Method::Random, 0.25);
    let teal = smollm2_sparse_plan(dir.path(), Method::Teal, 0.4);
    let plan = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    let gen = |p: &std::path::PathBuf| {
        json_of(&scalpel_on_smollm2(&[
            "generate",
            "--prompt",
            "The capital of France is",
            "-n",
            "6",
            "--ignore-eos",
            "--weights",
            "f32",
            "--json",
            "--plan",
            &plan(p),
        ]))
    };
    let v = gen(&random);
    let note = v["sparsity"].as_str().unwrap();
    assert!(
        note.starts_with("random sparsity at level 0.25 (executed"),
        "{note}"
    );
    // The command's tokens are the library's decode under the same mask.
    let model = common::smollm2();
    let pf = model.load_plan(&random).unwrap();
    let section: SparsitySection = pf.sections.get("sparsity").unwrap().unwrap();
    let base = Plan::base();
    let policy = MaskPolicy::new(&base, section.mask.as_ref().unwrap(), model.cfg()).unwrap();
    let prompt = model.prompt_ids("The capital of France is", false).unwrap();
    let got: Vec<u32> = common::json_ints(&v["new_tokens"]);
    assert_eq!(got, greedy_full_passes(model, &prompt, 6, &policy, || None));

    let v = gen(&teal);
    let note = v["sparsity"].as_str().unwrap();
    assert!(note.contains("(executed at decode"), "{note}");
    let z = v["channels_zeroed"].as_f64().unwrap();
    assert!(z > 0.2 && z < 0.6, "zeroed {z}");

    // The mask drafts for the full model: the output is the full model's.
    let speculate = |p: &std::path::PathBuf| {
        json_of(&scalpel_on_smollm2(&[
            "speculate",
            "--prompt",
            "The capital of France is",
            "-n",
            "12",
            "--runs",
            "1",
            "--weights",
            "f32",
            "--json",
            "--plan",
            &plan(p),
        ]))
    };
    let v = speculate(&random);
    assert_eq!(v["mismatches"], 0, "{v}");
    assert!(v["draft_sparsity"][0]
        .as_str()
        .unwrap()
        .contains("executed"));
    // So does TEAL, its channel probe executed in every draft pass.
    let v = speculate(&teal);
    assert_eq!(v["mismatches"], 0, "{v}");
    let note = v["draft_sparsity"][0].as_str().unwrap();
    assert!(
        note.contains("teal sparsity at level 0.4 (executed at decode"),
        "{note}"
    );
    // TEAL at 0.4 keeps most of the model's choices: most drafts accepted.
    let alpha = v["acceptance_rate"].as_f64().unwrap();
    assert!(alpha > 0.3, "acceptance {alpha}");

    // bench times it against the unmodified model and labels it.
    let v = json_of(&scalpel_on_smollm2(&[
        "bench",
        "--runs",
        "1",
        "--prefill",
        "8",
        "--decode",
        "4",
        "--json",
        "--plan",
        &plan(&random),
    ]));
    assert_eq!(v["execution"], "executed");
    assert!(v["decode_speedup"]["median"].as_f64().unwrap() > 0.0);
    let v = json_of(&scalpel_on_smollm2(&[
        "bench",
        "--runs",
        "1",
        "--context",
        "8",
        "--decode",
        "4",
        "--json",
        "--plan",
        &plan(&teal),
    ]));
    assert_eq!(v["execution"], "executed");
}

/// TEAL and WINA executed by the sparse-input kernel at one-row decode
/// steps equal the masked decode: the same channels kept at every
/// projection, the logits within f32 rounding (the kernel sums in another
/// order), and the kept columns really the only ones read.
#[test]
fn executed_channel_sparsity_equals_the_masked_decode() {
    use scalpel::surgery::sparsity::activation::ColumnWeights;
    let model = common::load_tiny("llama");
    let t = &model.transformer;
    let plan = Plan::base();
    let calib = common::random_set(&model, 2, 4, 32);
    let samples = ActivationSamples::collect(&model, &calib, &AtomicBool::new(false)).unwrap();
    let norms = scalpel::surgery::sparsity::ColumnNorms::of(&model).unwrap();
    let columns = ColumnWeights::of(&model, Some(&norms)).unwrap();
    let prompt = ids_of("llama", 6);
    let steps = 8;
    for crit in [Criterion::Teal, Criterion::Wina] {
        let th = thresholds(&samples, Some(&norms), crit, &[0.5])
            .unwrap()
            .remove(0);
        let mut masked = ChannelProbe::new(&model, &th, Some(&norms)).unwrap();
        let mut executed = ChannelProbe::executed(&model, &th, Some(&norms), &columns).unwrap();
        let mut states = [t.new_state(32), t.new_state(32)];
        let mut input = prompt.clone();
        let mut worst = 0f32;
        for _ in 0..=steps {
            let mut logits = Vec::new();
            for (probe, state) in [
                &mut masked as &mut dyn Probe,
                &mut executed as &mut dyn Probe,
            ]
            .into_iter()
            .zip(states.iter_mut())
            {
                let mut pass = Pass::plan(&plan, FAST).with_state(state).with_probe(probe);
                let h = t.forward_hidden(&tensor(&input), &mut pass).unwrap();
                let last = h.narrow(1, input.len() - 1, 1).unwrap();
                logits.push(to_vec(&t.logits(&last, FAST).unwrap()));
            }
            worst = worst.max(max_diff(&logits[0], &logits[1]));
            let next = logits[0]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            input = vec![next];
        }
        eprintln!("{crit:?}: executed vs masked decode, max logit difference {worst:e}");
        assert!(worst < 2e-5, "{crit:?}: {worst}");
        assert_eq!(masked.seen, executed.seen);
        assert_eq!(masked.kept, executed.kept, "{crit:?}: other channels kept");
        let z = executed.zeroed_fraction();
        assert!(z > 0.3 && z < 0.7, "{crit:?}: zeroed {z}");
    }
}

/// `sparsify --compare --bench` times the static masks and TEAL (executed,
/// the sparse-input kernel) against dense in the same rounds, one row each.
#[test]
fn the_compare_bench_times_static_masks_and_teal_beside_dense() {
    use scalpel::surgery::sparsity::speed::{decode_speed, SpeedOptions};
    let model = common::smollm2();
    let calib = common::random_set(model, 3, 2, 48);
    let samples = ActivationSamples::collect(model, &calib, &AtomicBool::new(false)).unwrap();
    let teal = thresholds(&samples, None, Criterion::Teal, &[0.5]).unwrap();
    let opts = SpeedOptions {
        prompt_tokens: 8,
        decode_tokens: 2,
        runs: 1,
    };
    let scores = UnitScores::random(model, 1);
    let rows = decode_speed(model, &scores, &[0.5], &teal, &opts).unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["dense", "static p=0.50", "teal p=0.50"]);
    assert_eq!(rows[0].execution, "baseline");
    assert!(rows[1..].iter().all(|r| r.execution == "executed"));
    assert_eq!(rows[0].speedup, 1.0);
    assert!(rows.iter().all(|r| r.decode_tokens_per_sec.median > 0.0));
}

/// No pass runs routing and sparsity together: a plan with both sections is
/// refused by the loader every decoding command and `eval` use, rather than
/// run with one of them dropped.
#[test]
fn a_plan_with_both_routing_and_sparsity_is_refused() {
    use scalpel::model::routing::{KvPolicy, RouteOn, RoutingSection, ROUTING_SECTION};
    use scalpel::plan::PlanFile;
    let model = common::load_tiny("llama");
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    let section = SparsitySection {
        method: Method::Random,
        level: 0.25,
        split: "per-layer".into(),
        shape: Shape::of(model.cfg()),
        mask: Some(some_mask(&model, 0.25)),
        thresholds: None,
        artifact: None,
    };
    pf.sections.set("sparsity", &section).unwrap();
    assert!(
        scalpel::surgery::sparsity::load_from_given(Some(&pf), &model)
            .unwrap()
            .is_some()
    );
    let routing = RoutingSection {
        artifact: "routers".into(),
        on: RouteOn::Attn,
        capacity: 0.8,
        kv: KvPolicy::Write,
        threshold: 0.0,
    };
    pf.sections.set(ROUTING_SECTION, &routing).unwrap();
    let e = scalpel::surgery::sparsity::load_from_given(Some(&pf), &model)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("both routing and sparsity"), "{e}");
}
