//! Token routing: routers that always execute are the base model, routers
//! that always skip are the static skip plan, gathered-row execution is
//! masked execution, decode equals prefill under routing, the router
//! gradients (linear and MLP routers) match finite differences, the routers
//! round-trip through a plan file, and bad input is refused with a clear
//! message.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel::eval::data::TokenSet;
use scalpel::model::pass::{LayerPolicy, MlpExec};
use scalpel::model::routing::{
    check_section, load_from_plan, router_logits, save_to_plan, KvPolicy, RouteOn, Router,
    RouterKind, RouterPolicy, Routers, RoutingSection, ROUTERS_ARTIFACT,
};
use scalpel::model::{LocalModel, Model, Pass, Resolved, RunOptions};
use scalpel::plan::{BlockId, BlockKind, LayerScales, Plan, PlanFile};
use scalpel::surgery::objective::{forward_full, scored_rows, BaseStates, TrainingData};
use scalpel::surgery::routing::gate::{GateMode, GateProbe};
use scalpel::surgery::routing::measure::{measure_set, Routed};
use scalpel::surgery::routing::{
    params_of, routed_blocks, sequence_objective, train_routers, RouteEvent, RouteOptions,
    RouteResult,
};

fn all_blocks(model: &Model, on: RouteOn) -> Vec<BlockId> {
    routed_blocks(model, &Plan::base(), on)
}

/// Routers with random weights (scale `w`) and bias `b`.
fn random_routers(model: &Model, on: RouteOn, seed: u64, w: f32, b: f32) -> Routers {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = model.cfg().hidden_size;
    let mut r = Routers::default();
    for block in all_blocks(model, on) {
        let v: Vec<f32> = (0..h).map(|_| rng.random_range(-w..=w)).collect();
        r.by_block.insert(
            block,
            Router {
                w: Tensor::new(v.as_slice(), &Device::Cpu).unwrap(),
                b: Tensor::new(&[b], &Device::Cpu).unwrap(),
                hidden: None,
            },
        );
    }
    r
}

fn ids(model: &Model, n: usize) -> Tensor {
    let set = common::random_set(model, 5, 1, n);
    Tensor::new(set.sequences[0].ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn hidden(model: &Model, input: &Tensor, pass: &mut Pass) -> Vec<f32> {
    model
        .transformer
        .forward_hidden(input, pass)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn routed_hidden(
    model: &Model,
    input: &Tensor,
    policy: &RouterPolicy,
    run: RunOptions,
) -> Vec<f32> {
    let plan = policy.base;
    hidden(model, input, &mut Pass::plan(plan, run).with_policy(policy))
}

#[test]
fn routers_that_always_execute_are_the_base_model() {
    for name in ["llama", "gemma3"] {
        let model = common::load_tiny(name);
        let input = ids(&model, 12);
        let base = Plan::base();
        let want = hidden(&model, &input, &mut Pass::plan(&base, RunOptions::FAST));
        for on in [RouteOn::Attn, RouteOn::Mlp, RouteOn::Both] {
            let routers = random_routers(&model, on, 1, 0.01, 100.0);
            let policy = RouterPolicy::new(&base, &routers, KvPolicy::Gap, 0.0, model.n_layers());
            let got = routed_hidden(&model, &input, &policy, RunOptions::FAST);
            assert_eq!(got, want, "{name} {on:?}: bit-identical to the base model");
            assert_eq!(policy.counts.executed_fraction(), 1.0);
        }
    }
}

#[test]
fn routers_that_always_skip_are_the_static_skip_plan() {
    let model = common::load_tiny("llama");
    let n = model.n_layers();
    let input = ids(&model, 12);
    // Scales that are not 1, so the skipped blocks' s_* scaling is visible.
    let mut base = Plan::base();
    base.scales = Some(
        (0..n)
            .map(|l| {
                scalpel::plan::LayerScales::from_array([1.1, 0.9 + 0.02 * l as f32, 0.95, 1.05])
            })
            .collect(),
    );
    for (on, kind) in [
        (RouteOn::Attn, BlockKind::Attn),
        (RouteOn::Mlp, BlockKind::Mlp),
    ] {
        let mut skipped = Plan::with_skips((0..n).map(|l| BlockId { layer: l, kind }));
        skipped.scales = base.scales.clone();
        let want = hidden(&model, &input, &mut Pass::plan(&skipped, RunOptions::FAST));
        let routers = random_routers(&model, on, 2, 0.01, -100.0);
        for kv in [KvPolicy::Write, KvPolicy::Gap] {
            let policy = RouterPolicy::new(&base, &routers, kv, 0.0, n);
            let got = routed_hidden(&model, &input, &policy, RunOptions::FAST);
            assert_eq!(
                got, want,
                "{on:?} {kv:?}: bit-identical to the static skip plan"
            );
            assert_eq!(policy.counts.executed_fraction(), 0.5);
        }
    }
}

#[test]
fn gathered_rows_equal_masked_execution() {
    let model = common::load_tiny("llama");
    let input = ids(&model, 16);
    let base = Plan::base();
    let run = RunOptions::DIFFERENTIABLE;
    // Random routers around 0: a mix of tokens runs each block.
    let routers = random_routers(&model, RouteOn::Both, 3, 0.2, 0.0);
    let policy = RouterPolicy::new(&base, &routers, KvPolicy::Write, 0.0, model.n_layers());
    let gathered = routed_hidden(&model, &input, &policy, run);
    let shares = policy.counts.per_block();
    let mixed = shares.iter().filter(|&&s| s > 0.0 && s < 1.0).count();
    assert!(
        mixed >= shares.len() / 2,
        "most blocks run a strict subset of rows: {shares:?}"
    );
    // Masked: every block computed for every token, its output times the
    // hard 0/1 gate (what training's forward pass does).
    let params = params_of(&routers).unwrap();
    let mut probe = GateProbe::new(&params, GateMode::StraightThrough { tau: 1.0 }, None);
    let masked = hidden(
        &model,
        &input,
        &mut Pass::plan(&base, run).with_probe(&mut probe),
    );
    let d = common::max_abs_diff(&gathered, &masked);
    let scale = masked.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("gathered vs masked: max |Δ| {d:e} (scale {scale})");
    assert!(
        d <= 2e-6 * scale.max(1.0),
        "gathered vs masked differ by {d} (scale {scale})"
    );
    // The gap policy is a different computation (skipping tokens leave no K/V).
    let gap = RouterPolicy::new(&base, &routers, KvPolicy::Gap, 0.0, model.n_layers());
    let g = routed_hidden(&model, &input, &gap, run);
    assert!(common::max_abs_diff(&g, &masked) > 1e-4);
}

#[test]
fn decode_token_by_token_equals_prefill_under_routing() {
    for name in ["llama", "gemma3"] {
        decode_equals_prefill_under_routing(name);
    }
}

fn decode_equals_prefill_under_routing(name: &str) {
    let model = common::load_tiny(name);
    let t = 10;
    let input = ids(&model, t);
    let base = Plan::base();
    let run = RunOptions::FAST;
    let routers = random_routers(&model, RouteOn::Both, 4, 0.2, 0.0);
    for kv in [KvPolicy::Write, KvPolicy::Gap] {
        let prefill_policy = RouterPolicy::new(&base, &routers, kv, 0.0, model.n_layers());
        let whole = routed_hidden(&model, &input, &prefill_policy, run);
        let policy = RouterPolicy::new(&base, &routers, kv, 0.0, model.n_layers());
        let mut state = model.transformer.new_state(t);
        let mut steps = Vec::new();
        for i in 0..t {
            let one = input.narrow(1, i, 1).unwrap();
            let mut pass = Pass::plan(&base, run)
                .with_policy(&policy)
                .with_state(&mut state);
            steps.extend(hidden(&model, &one, &mut pass));
        }
        let d = common::max_abs_diff(&whole, &steps);
        eprintln!("{kv:?}: decode vs prefill max |Δ| {d:e}");
        assert!(d < 1e-4, "{kv:?}: decode vs prefill differ by {d}");
        assert_eq!(
            policy.counts.executed_fraction(),
            prefill_policy.counts.executed_fraction(),
            "{kv:?}: the same decisions"
        );
    }
}

/// The tensor `what` (w, b, w1, b1) of a router.
fn router_tensor<'a>(router: &'a mut Router, what: &str) -> &'a mut Tensor {
    match what {
        "w" => &mut router.w,
        "b" => &mut router.b,
        "w1" => &mut router.hidden.as_mut().unwrap().w,
        "b1" => &mut router.hidden.as_mut().unwrap().b,
        other => panic!("no router tensor `{other}`"),
    }
}

/// The finite-difference step (1e-2 showed 0.6% curvature error on an MLP
/// router's bias; 1e-3 agrees to ~1e-6).
const STEP: f32 = 1e-3;

/// Autograd gradients of the soft-gated routing objective against central
/// differences, on the f64 tiny Llama, at the given (block, tensor, flat
/// index) entries of `routers`.
fn check_router_gradients(routers: &Routers, entries: &[(BlockId, &str, usize)]) {
    let resolved = Resolved {
        local: LocalModel::HfDir(common::tiny_dir("llama")),
        origin: "test".into(),
    };
    // f64 so that central differences are accurate.
    let model = Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap();
    let data = common::random_set(&model, 7, 1, 14);
    let plan = Plan::base();
    // The base states in the differentiable path (the fused ops have no f64).
    let seq = &data.sequences[0];
    let full = forward_full(&model, seq, &plan, &plan, RunOptions::DIFFERENTIABLE).unwrap();
    let base = BaseStates {
        hidden: vec![scored_rows(&full, seq).unwrap()],
    };
    let mode = GateMode::Soft { tau: 1.0 };
    let (capacity, penalty) = (0.7, 0.5);
    let objective = |p: &scalpel::model::TrainableParams| {
        sequence_objective(
            &model,
            &plan,
            p,
            seq,
            &base.hidden[0],
            mode,
            None,
            capacity,
            penalty,
        )
        .unwrap()
        .0
    };
    let loss_at = |r: &Routers| -> f64 {
        let l = objective(&params_of(r).unwrap());
        l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let params = params_of(routers).unwrap();
    let grads = objective(&params).backward().unwrap();
    let mut worst = 0f64;
    for &(block, what, index) in entries {
        let name = format!("router.{block}.{what}");
        let var = params.var(&name).unwrap();
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let at = |delta: f32| -> (f64, f64) {
            let mut r = routers.clone();
            let t = router_tensor(r.by_block.get_mut(&block).unwrap(), what);
            let shape = t.shape().clone();
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let before = v[index];
            v[index] += delta;
            // The step actually taken, in f32.
            let step = f64::from(v[index]) - f64::from(before);
            *t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            (loss_at(&r), step)
        };
        let (up, su) = at(STEP);
        let (down, sd) = at(-STEP);
        let fd = (up - down) / (su - sd);
        let an = f64::from(g[index]);
        let rel = (fd - an).abs() / fd.abs().max(1e-6);
        assert!(
            an.abs() > 1e-6,
            "{name}: the gradient reaches the router ({an})"
        );
        assert!(
            rel < 1e-4,
            "{name}: autograd {an} vs finite differences {fd} (rel {rel})"
        );
        worst = worst.max(rel);
    }
    eprintln!("worst relative error {worst:.2e}");
}

#[test]
fn router_gradients_match_finite_differences() {
    let model = common::load_tiny("llama");
    let routers = random_routers(&model, RouteOn::Both, 5, 0.3, 0.5);
    check_router_gradients(
        &routers,
        &[
            (BlockId::attn(0), "b", 0),
            (BlockId::mlp(1), "b", 0),
            (BlockId::attn(2), "w", 3),
            (BlockId::mlp(0), "w", 7),
        ],
    );
}

/// SkipGPT-style MLP routers from `Routers::initial`, with a random output
/// weight (scale `w`), so every tensor carries a gradient.
fn random_mlp_routers(model: &Model, on: RouteOn, seed: u64, w: f32, b: f32) -> Routers {
    let h = model.cfg().hidden_size;
    let blocks = all_blocks(model, on);
    let mut r = Routers::initial(&blocks, RouterKind::Mlp, h, b, seed, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for router in r.by_block.values_mut() {
        let m = router.w.dim(0).unwrap();
        let v: Vec<f32> = (0..m).map(|_| rng.random_range(-w..=w)).collect();
        router.w = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
    }
    r
}

#[test]
fn mlp_router_gradients_match_finite_differences() {
    let model = common::load_tiny("llama");
    // Bias −0.5: the executed share stays clear of the capacity (0.7), where
    // the |share − capacity| penalty has its kink.
    let routers = random_mlp_routers(&model, RouteOn::Both, 9, 0.5, -0.5);
    let m = RouterKind::Mlp.width(model.cfg().hidden_size).unwrap();
    let r = &routers.by_block[&BlockId::attn(1)];
    assert_eq!(
        r.hidden.as_ref().unwrap().w.dims(),
        [m, model.cfg().hidden_size]
    );
    assert_eq!(r.w.dims(), [m]);
    check_router_gradients(
        &routers,
        &[
            (BlockId::attn(0), "b", 0),
            (BlockId::attn(1), "w", 2),
            (BlockId::mlp(1), "w1", 5),
            (BlockId::attn(2), "b1", 1),
            (BlockId::mlp(0), "w1", m + 3),
        ],
    );
}

/// `plan` with `routers` on both kinds of block (K/V written) saved as a
/// plan file in a scratch folder: (folder, path, the section written).
fn save_routed(
    model: &Model,
    plan: &Plan,
    routers: &Routers,
    capacity: f64,
    threshold: f32,
) -> (tempfile::TempDir, std::path::PathBuf, RoutingSection) {
    let dir = common::scratch_dir();
    let path = dir.path().join("routed.json");
    let mut file = PlanFile::new(model.identity.clone(), plan.clone());
    let section = RoutingSection {
        artifact: ROUTERS_ARTIFACT.into(),
        on: RouteOn::Both,
        capacity,
        kv: KvPolicy::Write,
        threshold,
    };
    save_to_plan(&mut file, &path, routers, &section).unwrap();
    file.save(&path).unwrap();
    (dir, path, section)
}

#[test]
fn mlp_routers_decide_as_their_logits_and_round_trip_through_a_plan_file() {
    let model = common::load_tiny("llama");
    let routers = random_mlp_routers(&model, RouteOn::Both, 4, 1.0, 0.0);
    let h = model.cfg().hidden_size;
    // The decode path's plain loops decide as the candle logits do.
    let x = Tensor::randn(0f32, 3.0, (1, 9, h), &Device::Cpu).unwrap();
    let plan = Plan::base();
    let threshold = 0.05;
    let policy = RouterPolicy::new(
        &plan,
        &routers,
        KvPolicy::Write,
        threshold,
        model.n_layers(),
    );
    let block = BlockId::mlp(1);
    let logits: Vec<f32> = router_logits(&x, routers.by_block[&block].weights())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let expected: Vec<u32> = (0..9u32)
        .filter(|&i| logits[i as usize] > threshold)
        .collect();
    assert!(
        !expected.is_empty() && expected.len() < 9,
        "the threshold splits the tokens: {logits:?}"
    );
    match policy.mlp(1, &x).unwrap() {
        MlpExec::Rows(rows) => assert_eq!(rows, expected),
        _ => panic!("a row subset was expected"),
    }

    let (_dir, path, _) = save_routed(&model, &plan, &routers, 0.5, threshold);
    let (_, loaded) = load_from_plan(&PlanFile::load(&path).unwrap(), &model)
        .unwrap()
        .unwrap();
    for (b, x) in &routers.by_block {
        let y = &loaded.by_block[b];
        assert_eq!(y.kind(), RouterKind::Mlp);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (hx, hy) = (x.hidden.as_ref().unwrap(), y.hidden.as_ref().unwrap());
        assert_eq!(flat(&hx.w), flat(&hy.w));
        assert_eq!(flat(&hx.b), flat(&hy.b));
        assert_eq!(flat(&x.w), flat(&y.w));
    }

    // A hidden layer that does not match the output weight is refused.
    let mut values = routers.values().unwrap();
    values.insert(
        "router.attn.0.b1".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Routers::from_values(&values, h, model.n_layers())
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden layer"), "{e}");
}

/// Routers trained on the tiny Llama over `plan`: random training
/// (seed `seed`, `n` sequences) and validation sets of 16 tokens; returns
/// the training set, its base states, the result and the epochs reported.
fn train_tiny(
    model: &Model,
    plan: &Plan,
    seed: u64,
    n: usize,
    opts: &RouteOptions,
) -> (TokenSet, BaseStates, RouteResult, usize) {
    let train = common::random_set(model, seed, n, 16);
    let validation = common::random_set(model, seed + 1, 2, 16);
    let never = AtomicBool::new(false);
    let tb = BaseStates::compute(model, &train, &never).unwrap();
    let vb = BaseStates::compute(model, &validation, &never).unwrap();
    let data = TrainingData {
        train: &train,
        train_base: &tb,
        validation: &validation,
        validation_base: &vb,
    };
    let mut epochs = 0;
    let r = train_routers(model, plan, &data, opts, &never, &mut |e| {
        if let RouteEvent::Epoch(_) = e {
            epochs += 1;
        }
    })
    .unwrap();
    (train, tb, r, epochs)
}

#[test]
fn mlp_routers_train_to_the_capacity() {
    let model = common::load_tiny("llama");
    let opts = RouteOptions {
        capacity: 0.6,
        on: RouteOn::Attn,
        router: RouterKind::Mlp,
        epochs: 2,
        lr: 1e-2,
        batch_size: 2,
        ..RouteOptions::default()
    };
    let (_, _, r, _) = train_tiny(&model, &Plan::base(), 21, 4, &opts);
    assert!(r
        .routers
        .by_block
        .values()
        .all(|x| x.kind() == RouterKind::Mlp));
    // The hidden layers trained (they start at the seed's weights).
    let h = model.cfg().hidden_size;
    let start = Routers::initial(
        &all_blocks(&model, RouteOn::Attn),
        RouterKind::Mlp,
        h,
        0.0,
        opts.seed,
        &Device::Cpu,
    )
    .unwrap();
    let flat = |r: &Router| {
        let w = &r.hidden.as_ref().unwrap().w;
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let moved = r
        .routers
        .by_block
        .iter()
        .filter(|(b, x)| flat(x) != flat(&start.by_block[b]))
        .count();
    assert_eq!(
        moved,
        r.routers.by_block.len(),
        "every hidden layer trained"
    );
    let share = r.calibrated.unwrap().routed_share;
    assert!((share - 0.6).abs() < 0.05, "calibrated share {share}");
}

#[test]
fn straight_through_gates_are_hard_forward_and_carry_gradients() {
    let model = common::load_tiny("llama");
    let data = common::random_set(&model, 8, 1, 14);
    let never = AtomicBool::new(false);
    let base = BaseStates::compute(&model, &data, &never).unwrap();
    let routers = random_routers(&model, RouteOn::Both, 6, 0.3, 0.0);
    let params = params_of(&routers).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let (loss, _, share) = sequence_objective(
        &model,
        &Plan::base(),
        &params,
        &data.sequences[0],
        &base.hidden[0],
        GateMode::StraightThrough { tau: 1.0 },
        Some(&mut rng),
        0.5,
        1.0,
    )
    .unwrap();
    // The share is a mean of 0/1 gates over whole token-blocks.
    let count = (2 * model.n_layers() * 14) as f64;
    let k = share * count;
    assert!(
        (k - k.round()).abs() < 1e-3,
        "share {share} is a mean of hard gates"
    );
    let grads = loss.backward().unwrap();
    let nonzero = params
        .vars()
        .iter()
        .filter(|v| {
            grads.get(v.as_tensor()).is_some_and(|g| {
                let a: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                a.iter().any(|x| *x != 0.0)
            })
        })
        .count();
    assert_eq!(nonzero, params.len(), "every router gets a gradient");
}

#[test]
fn training_holds_the_capacity_and_round_trips_through_a_plan_file() {
    let model = common::load_tiny("llama");
    let never = AtomicBool::new(false);
    let opts = RouteOptions {
        capacity: 0.75,
        on: RouteOn::Both,
        epochs: 2,
        lr: 2e-2,
        batch_size: 2,
        ..RouteOptions::default()
    };
    let plan = Plan::with_skips([BlockId::attn(1)]);
    let (train, tb, r, epochs) = train_tiny(&model, &plan, 11, 6, &opts);
    assert_eq!(epochs, 3, "epoch 0 and two epochs reported");
    assert!(
        !r.routers.by_block.contains_key(&BlockId::attn(1)),
        "a static skip gets no router"
    );
    let calibrated = r.calibrated.clone().unwrap();
    assert!(
        (calibrated.routed_share - 0.75).abs() < 0.05,
        "calibrated share {} on the training data",
        calibrated.routed_share
    );

    // Save, load, and measure the same numbers.
    let (_dir, path, section) = save_routed(&model, &plan, &r.routers, 0.75, r.threshold);
    let loaded = PlanFile::load(&path).unwrap();
    let (s, routers) = load_from_plan(&loaded, &model).unwrap().unwrap();
    assert_eq!(s, section);
    assert_eq!(routers.by_block.len(), r.routers.by_block.len());
    for (b, x) in &r.routers.by_block {
        let y = &routers.by_block[b];
        assert_eq!(x.w.to_vec1::<f32>().unwrap(), y.w.to_vec1::<f32>().unwrap());
        assert_eq!(x.b.to_vec1::<f32>().unwrap(), y.b.to_vec1::<f32>().unwrap());
    }
    let measure = |routers: &Routers, plan: &Plan| {
        let routed = Routed {
            plan,
            routers,
            kv: KvPolicy::Write,
            threshold: r.threshold,
        };
        measure_set(&model, &train, &tb, &routed, &never).unwrap()
    };
    let a = measure(&r.routers, &plan);
    let b = measure(&routers, &loaded.plan);
    assert_eq!(a.kl_to_base, b.kl_to_base);
    assert_eq!(a.executed_fraction, b.executed_fraction);
    assert_eq!(a.routed_share, calibrated.routed_share);
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let model = common::load_tiny("llama");
    let set = common::random_set(&model, 13, 2, 10);
    let never = AtomicBool::new(false);
    let base = BaseStates::compute(&model, &set, &never).unwrap();
    let data = TrainingData {
        train: &set,
        train_base: &base,
        validation: &set,
        validation_base: &base,
    };
    for c in [0.0, -0.5, 1.5, f64::NAN] {
        let opts = RouteOptions {
            capacity: c,
            ..RouteOptions::default()
        };
        let e = train_routers(&model, &Plan::base(), &data, &opts, &never, &mut |_| {})
            .err()
            .expect("refused");
        assert!(format!("{e:#}").contains("outside (0, 1]"), "{e:#}");
    }
    // A plan section with a bad capacity.
    let v = serde_json::json!({"artifact": "routers", "on": "attn", "capacity": 0.0, "kv": "write", "threshold": 0.0});
    assert!(format!("{:#}", check_section(&v).unwrap_err()).contains("outside (0, 1]"));
    let v = serde_json::json!({"artifact": "routers", "on": "sideways", "capacity": 0.5, "kv": "write", "threshold": 0.0});
    assert!(check_section(&v).is_err());

    // Router tensors for another model: wrong width, or a layer it lacks.
    let h = model.cfg().hidden_size;
    let n = model.n_layers();
    let good = random_routers(&model, RouteOn::Attn, 9, 0.1, 0.0)
        .values()
        .unwrap();
    let mut wide = good.clone();
    wide.insert(
        "router.attn.0.w".into(),
        Tensor::zeros(h + 8, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Routers::from_values(&wide, h, n).unwrap_err().to_string();
    assert!(e.contains("another model") && e.contains("attn.0"), "{e}");
    let mut deep = good.clone();
    deep.insert(
        "router.attn.99.w".into(),
        Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap(),
    );
    deep.insert(
        "router.attn.99.b".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Routers::from_values(&deep, h, n).unwrap_err().to_string();
    assert!(e.contains("layer 99") && e.contains("another model"), "{e}");
    let mut odd = good.clone();
    odd.insert(
        "lora.attn.0.a".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Routers::from_values(&odd, h, n).unwrap_err().to_string();
    assert!(e.contains("not a router tensor"), "{e}");
    let mut half = good.clone();
    half.remove("router.attn.0.b");
    let e = Routers::from_values(&half, h, n).unwrap_err().to_string();
    assert!(e.contains("attn.0") && e.contains("no bias"), "{e}");
    assert!(Routers::from_values(&good, h, n).is_ok());

    // A batch of two sequences is refused, not silently mis-routed.
    let routers = random_routers(&model, RouteOn::Attn, 10, 0.1, 0.0);
    let plan = Plan::base();
    let policy = RouterPolicy::new(&plan, &routers, KvPolicy::Write, 0.0, n);
    let two = Tensor::zeros((2, 4), DType::U32, &Device::Cpu).unwrap();
    let e = model
        .transformer
        .forward_hidden(
            &two,
            &mut Pass::plan(&plan, RunOptions::FAST).with_policy(&policy),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("one sequence at a time"), "{e}");
}

/// Greedy continuation of `prompt` recomputed from scratch for every new
/// token (no cache) under the routers: what a cached routed decode must give.
fn greedy_without_cache(
    model: &Model,
    prompt: &[u32],
    n: usize,
    policy: &RouterPolicy,
) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut pass = Pass::plan(policy.base, RunOptions::FAST).with_policy(policy);
        let h = model.transformer.forward_hidden(&input, &mut pass).unwrap();
        let last = h.narrow(1, ids.len() - 1, 1).unwrap();
        let logits = model.transformer.logits(&last, RunOptions::FAST).unwrap();
        let next = logits.flatten_all().unwrap().argmax(0).unwrap();
        ids.push(next.to_scalar::<u32>().unwrap());
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn generate_with_a_routed_plan_runs_the_routers_per_token() {
    // The real model: the command needs a tokenizer, which the tiny ones lack.
    let model = common::smollm2();
    let dir = common::scratch_dir();
    let plan = Plan::with_skips([BlockId::mlp(0)]);
    let mut routers = random_routers(model, RouteOn::Both, 11, 0.05, 0.0);
    routers.by_block.remove(&BlockId::mlp(0));
    let path = dir.path().join("routed.json");
    let mut file = PlanFile::new(model.identity.clone(), plan.clone());
    let section = RoutingSection {
        artifact: ROUTERS_ARTIFACT.into(),
        on: RouteOn::Both,
        capacity: 0.5,
        kv: KvPolicy::Write,
        threshold: 0.0,
    };
    save_to_plan(&mut file, &path, &routers, &section).unwrap();
    file.save(&path).unwrap();
    let gguf = common::smollm2_path();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--offline", "--model", gguf.to_str().unwrap()])
        .args(["generate", "--prompt", "hello there", "-n", "8"])
        .args(["--ignore-eos", "--weights", "f32", "--json"])
        .args(["--plan", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<u32> = common::json_ints(&v["new_tokens"]);
    let prompt = model.prompt_ids("hello there", false).unwrap();
    let policy = RouterPolicy::new(&plan, &routers, KvPolicy::Write, 0.0, model.n_layers());
    assert_eq!(got, greedy_without_cache(model, &prompt, 8, &policy));
    // The routers did route: some blocks ran for some tokens, not all.
    let executed = v["executed_fraction"].as_f64().unwrap();
    assert!(executed > 0.05 && executed < 0.95, "executed {executed}");
    assert_eq!(v["routing"]["capacity"], 0.5);
    // And the routed text differs from the static plan's alone.
    let plain = scalpel::eval::generate::generate(
        model,
        &prompt,
        &plan,
        scalpel::eval::generate::GenOptions {
            max_new_tokens: 8,
            temperature: 0.0,
            seed: 0,
            stop_at_eos: false,
            run: RunOptions::FAST,
        },
        |_| Ok(()),
    )
    .unwrap();
    assert_ne!(plain.new_tokens, got, "routing changed nothing");
}

/// A routed plan as the draft of self-speculative decoding: the routers
/// decide per drafted token which blocks run, the full model verifies, and
/// the output is the full model's greedy output, with either K/V policy
/// for the tokens that skip an attention block (the verify rewrites them).
#[test]
fn a_routed_draft_speculates_the_full_models_greedy_output() {
    use scalpel::eval::generate::{generate, GenOptions};
    use scalpel::eval::speculative::{speculate, Drafter, SpecOptions};
    for name in ["llama", "gemma3"] {
        let model = common::load_tiny(name);
        let prompt = common::random_set(&model, 9, 1, 6).sequences[0].ids.clone();
        let plain = GenOptions {
            max_new_tokens: 16,
            temperature: 0.0,
            seed: 0,
            stop_at_eos: false,
            run: RunOptions::FAST,
        };
        let want = generate(&model, &prompt, &Plan::base(), plain, |_| Ok(()))
            .unwrap()
            .new_tokens;
        let plan = Plan::with_skips([BlockId::mlp(0)]);
        let mut routers = random_routers(&model, RouteOn::Both, 3, 0.5, 0.0);
        routers.by_block.remove(&BlockId::mlp(0));
        for kv in [KvPolicy::Write, KvPolicy::Gap] {
            let policy = RouterPolicy::new(&plan, &routers, kv, 0.0, model.n_layers());
            for k in [1, 3, 6] {
                let drafter = Drafter::Policy {
                    plan: &plan,
                    policy: &policy,
                };
                let got = speculate(
                    &model,
                    &prompt,
                    drafter,
                    SpecOptions::greedy(16, k, RunOptions::FAST),
                )
                .unwrap();
                assert_eq!(got.new_tokens, want, "{name} {kv:?} k {k}");
                assert!(got.drafted > 0 && got.accepted <= got.drafted);
            }
            // The routers decided during drafting: some blocks ran, not all.
            let executed = policy.counts.executed_fraction();
            assert!(
                executed > 0.05 && executed < 0.95,
                "{name} {kv:?}: the draft executed {executed} of the blocks"
            );
        }
    }
}

#[test]
fn compare_puts_a_routed_plan_beside_the_static_plan_of_equal_compute() {
    use scalpel::surgery::compare::{compare, CompareInputs, EvalSet, ROUTING_METHODS};
    use scalpel::surgery::hopscotch::SearchStep;
    use scalpel::surgery::importance::compute_importance;
    use scalpel::surgery::routing::compare::{
        at_equal_compute, bracketing_ks, measure_routed, static_executed,
    };

    let model = common::load_tiny("llama");
    let n = model.n_layers();
    let data = common::random_set(&model, 21, 3, 16);
    let never = AtomicBool::new(false);
    let evals = vec![EvalSet {
        name: "heldout".into(),
        base: BaseStates::compute(&model, &data, &never).unwrap(),
        data: &data,
    }];
    // Routers on every attention block: the last one skipped by every
    // token, the others run by every token. That is the compute, and the
    // output, of the static plan that skips the last attention block.
    let chosen = BlockId::attn(n - 1);
    let h = model.cfg().hidden_size;
    let mut routers =
        Routers::constant(&all_blocks(&model, RouteOn::Attn), h, 100.0, &Device::Cpu).unwrap();
    routers.by_block.insert(
        chosen,
        Router {
            w: Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap(),
            b: Tensor::new(&[-100f32], &Device::Cpu).unwrap(),
            hidden: None,
        },
    );
    let base = Plan::base();
    let routed = Routed {
        plan: &base,
        routers: &routers,
        kv: KvPolicy::Write,
        threshold: 0.0,
    };
    let row = measure_routed(&model, "routed.json", &routed, &evals, &never).unwrap();
    let rep = &row.reports["heldout"];
    assert_eq!(rep.executed_fraction, static_executed(1, n));
    assert_eq!(bracketing_ks(rep.executed_fraction, n), vec![1]);
    assert!(rep.kl_to_base > 0.0, "skipping a block changes the output");

    // The static side: a one-step search trace that chose the same block.
    let steps = vec![SearchStep {
        step: 1,
        chosen,
        loss: 0.0,
        scales: vec![LayerScales::default(); n],
        candidates: vec![],
        seconds: 0.0,
        screen_seconds: 0.0,
        refit_seconds: 0.0,
    }];
    let importance = compute_importance(&model, &data, &never, |_, _| {}).unwrap();
    let inputs = CompareInputs {
        importance: &importance,
        steps: &steps,
        ks: vec![1],
        methods: &ROUTING_METHODS,
        fit: scalpel::surgery::fit::FitOptions {
            epochs: 1,
            ..Default::default()
        },
        seed: 3,
    };
    let rows = compare(&model, &data, &data, &evals, &inputs, &never, |_, _| {}).unwrap();
    assert_eq!(rows.len(), ROUTING_METHODS.len(), "every method at k = 1");
    let unfitted = at_equal_compute(std::slice::from_ref(&row), &rows, "hopscotch", None, n);
    assert_eq!(unfitted.len(), 1);
    let e = &unfitted[0];
    assert_eq!(e.between_k, vec![1]);
    assert_eq!(
        e.static_kl, rep.kl_to_base,
        "the same plan, routed and static, measures the same"
    );
    assert_eq!(e.kl_change, 0.0);
    // The fitted row is another plan (scales fitted), compared alike.
    let fitted = at_equal_compute(
        std::slice::from_ref(&row),
        &rows,
        "hopscotch",
        Some(scalpel::surgery::objective::LossKind::Kl),
        n,
    );
    assert_eq!(fitted.len(), 1);
    assert_ne!(fitted[0].static_kl, rep.kl_to_base);
}
