//! The trainer is generic over a plan's trainable parameters: any named set
//! read over the plan's constants trains, the Hopscotch fit is one such set,
//! and a set round-trips through a v2 plan artifact.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use scalpel::model::params::residual_name;
use scalpel::model::{ParamSource, Residual, TrainableParams};
use scalpel::plan::{BlockId, LayerScales, Plan, PlanFile};
use scalpel::surgery::fit::{fit_params, fit_scales, FitOptions};
use scalpel::surgery::objective::{mean_loss, LossKind};

fn opts(epochs: usize) -> FitOptions {
    FitOptions {
        epochs,
        lr: 3e-2,
        loss: LossKind::Ce,
        batch_size: 2,
        init: None,
    }
}

fn scales_of(r: &Residual) -> [f32; 4] {
    match r {
        Residual::Const(s) => s.as_array(),
        Residual::Tensor(t) => {
            let v: Vec<f32> = t.to_vec1().unwrap();
            [v[0], v[1], v[2], v[3]]
        }
    }
}

#[test]
fn training_some_layers_leaves_the_others_at_the_plans_constants() {
    let model = common::load_tiny("llama");
    let n = model.n_layers();
    let calib = common::random_set(&model, 11, 6, 24);
    let mut plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(2)]);
    // Constants that are not the identity, so "falls back to the plan" is visible.
    let constants: Vec<_> = (0..n)
        .map(|l| LayerScales::from_array([1.0, 0.9 + 0.01 * l as f32, 1.0, 1.0]))
        .collect();
    plan.scales = Some(constants.clone());
    let trained_layers = [1usize, 2];
    let mut params = TrainableParams::new();
    for &l in &trained_layers {
        let init = Tensor::new(&constants[l].as_array()[..], &Device::Cpu).unwrap();
        params.insert(&residual_name(l), &init).unwrap();
    }
    assert_eq!(params.element_count(), 8);
    let never = AtomicBool::new(false);
    let mut seen = Vec::new();
    let r = fit_params(
        &model,
        &plan,
        params,
        &calib,
        &calib,
        &opts(4),
        &never,
        &mut |e| seen.push(e.heldout_loss),
    )
    .unwrap();
    assert_eq!(seen.len(), 5, "epoch 0 and four epochs");
    assert!(
        r.best_heldout_loss < seen[0] - 1e-3,
        "training lowered the loss: {seen:?}"
    );
    // Only the trained names come back, and they moved.
    let mut names: Vec<_> = r.best.keys().cloned().collect();
    names.sort();
    assert_eq!(names, vec![residual_name(1), residual_name(2)]);
    let trained = TrainableParams::new();
    let over = trained.over(&plan);
    for (l, c) in constants.iter().enumerate() {
        assert_eq!(scales_of(&over.residual(l).unwrap()), c.as_array());
    }
    let moved: Vec<f32> = r.best[&residual_name(2)].to_vec1().unwrap();
    assert!(
        moved
            .iter()
            .zip(constants[2].as_array())
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "layer 2's scales were trained: {moved:?}"
    );
    // The best values, run as the plan's constants, give the reported loss.
    let mut as_plan = plan.clone();
    let mut s = constants.clone();
    for &l in &trained_layers {
        let v: Vec<f32> = r.best[&residual_name(l)].to_vec1().unwrap();
        s[l] = LayerScales::from_array([v[0], v[1], v[2], v[3]]);
    }
    as_plan.scales = Some(s);
    let again = mean_loss(&model, &calib, None, &as_plan, LossKind::Ce, &never).unwrap();
    assert!(
        (again - r.best_heldout_loss).abs() < 1e-5 * again.abs(),
        "constants {again} vs trained tensors {}",
        r.best_heldout_loss
    );
}

#[test]
fn the_generic_trainer_over_all_residual_scales_is_the_hopscotch_fit() {
    let model = common::load_tiny("llama");
    let n = model.n_layers();
    let calib = common::random_set(&model, 12, 4, 24);
    let plan = Plan::with_skips([BlockId::attn(2)]);
    let never = AtomicBool::new(false);
    let hop = fit_scales(&model, &plan, &calib, &calib, &opts(3), &never, |_| {}).unwrap();
    let params =
        TrainableParams::residual_scales(&vec![LayerScales::IDENTITY; n], &Device::Cpu).unwrap();
    let generic = fit_params(
        &model,
        &plan,
        params,
        &calib,
        &calib,
        &opts(3),
        &never,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(hop.best_epoch, generic.best_epoch);
    let hop_scales = hop.plan.scales.unwrap();
    for (l, hs) in hop_scales.iter().enumerate() {
        let g: Vec<f32> = generic.best[&residual_name(l)].to_vec1().unwrap();
        let h = hs.as_array();
        // Layer 2's skipped attention keeps b_att neutral in the Hopscotch
        // fit (it starts at 1 and gets no gradient), as here.
        for (a, b) in g.iter().zip(h) {
            assert!((a - b).abs() < 1e-6, "layer {l}: {g:?} vs {h:?}");
        }
    }
}

#[test]
fn a_parameter_set_round_trips_through_a_plan_artifact() {
    let model = common::load_tiny("llama");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    let mut params = TrainableParams::new();
    let router = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap();
    params.insert("router.mlp.3", &router).unwrap();
    params
        .insert(
            &residual_name(0),
            &Tensor::new(&[1f32, 0.5, 1.0, 0.75], &Device::Cpu).unwrap(),
        )
        .unwrap();
    let err = params.insert("router.mlp.3", &router).unwrap_err();
    assert!(err.to_string().contains("defined twice"), "{err}");
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    params
        .save_artifact(&mut pf, &path, "routers", "test routers")
        .unwrap();
    pf.save(&path).unwrap();

    let back = PlanFile::load(&path).unwrap();
    let loaded = TrainableParams::from_artifact(&back, "routers", &Device::Cpu).unwrap();
    let names: Vec<_> = loaded.names().collect();
    assert_eq!(names, vec!["residual.0", "router.mlp.3"]);
    let plan = Plan::base();
    let over = loaded.over(&plan);
    let got: Vec<Vec<f32>> = over.tensor("router.mlp.3").unwrap().to_vec2().unwrap();
    assert_eq!(got, vec![vec![0.5, -1.0], vec![2.0, 0.25]]);
    assert_eq!(scales_of(&over.residual(0).unwrap()), [1.0, 0.5, 1.0, 0.75]);
    assert_eq!(
        scales_of(&over.residual(1).unwrap()),
        LayerScales::IDENTITY.as_array()
    );
    assert!(over.tensor("router.attn.0").is_none());

    // Restoring values of another shape is refused by name.
    let mut wrong = loaded.values().unwrap();
    wrong.insert(
        "router.mlp.3".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = format!("{:#}", loaded.restore(&wrong).unwrap_err());
    assert!(
        err.contains("router.mlp.3") && err.contains("shape"),
        "{err}"
    );
}

#[test]
fn an_empty_parameter_set_is_refused() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 13, 2, 16);
    let never = AtomicBool::new(false);
    let r = fit_params(
        &model,
        &Plan::base(),
        TrainableParams::new(),
        &calib,
        &calib,
        &opts(1),
        &never,
        &mut |_| {},
    );
    let err = format!("{:#}", r.err().expect("refused"));
    assert!(err.contains("nothing to train"), "{err}");
}
