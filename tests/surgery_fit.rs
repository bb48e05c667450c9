//! Scale fitting: lowers the calibration loss, never touches the weights,
//! improves held-out KL on the real model, survives a NaN, and cancels cleanly.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Instant;

use candle_core::{Device, Tensor};
use scalpel::eval::data::TokenSet;
use scalpel::model::{Model, Pass, RunOptions};
use scalpel::plan::{BlockId, LayerScales, Plan};
use scalpel::surgery::fit::{fit_scales, FitOptions};
use scalpel::surgery::objective::{mean_loss, measure, BaseStates, LossKind};
use scalpel::tui::app::{App, ModelInfo};

/// Every weight of the model, flattened (to prove fitting leaves them alone).
fn weights(model: &Model) -> Vec<f32> {
    let t = &model.transformer;
    let mut all: Vec<f32> = t
        .embed_weight()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for l in &t.layers {
        let linears = [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o];
        let linears = linears
            .into_iter()
            .chain([&l.mlp.gate, &l.mlp.up, &l.mlp.down]);
        let dense: Vec<Tensor> = linears
            .map(|lin| lin.dense_weight().unwrap().into_owned())
            .collect();
        for w in dense.iter().chain([&l.attn_norm, &l.mlp_norm]) {
            all.extend(w.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    all
}

#[test]
fn fitting_lowers_calibration_loss_and_never_changes_weights() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 1, 6, 32);
    let plan = Plan::with_skips([BlockId::attn(1), BlockId::attn(2), BlockId::mlp(3)]);
    let before_w = weights(&model);
    let never = AtomicBool::new(false);
    for loss in [LossKind::Kl, LossKind::Ce] {
        let base = BaseStates::compute(&model, &calib, &never).unwrap();
        let before = mean_loss(&model, &calib, Some(&base), &plan, loss, &never).unwrap();
        let opts = FitOptions {
            epochs: 6,
            lr: 3e-2,
            loss,
            batch_size: 2,
            init: None,
        };
        let mut epochs = 0;
        // Epochs picked on the calibration data itself: this checks the optimiser.
        let r = fit_scales(&model, &plan, &calib, &calib, &opts, &never, |_| {
            epochs += 1
        })
        .unwrap();
        assert_eq!(epochs, 7, "epoch 0 plus six epochs are reported");
        let after = mean_loss(&model, &calib, Some(&base), &r.plan, loss, &never).unwrap();
        assert!(
            after < before,
            "{loss}: calibration loss {before} -> {after}"
        );
        let scales = r.plan.scales.as_ref().unwrap();
        // A skipped block's output scale is never used: it stays neutral,
        // while its residual scale is fitted.
        assert_eq!(scales[1].b_att, 1.0, "skipped attention keeps b_att = 1");
        assert_eq!(scales[2].b_att, 1.0);
        assert_eq!(scales[3].b_mlp, 1.0, "skipped MLP keeps b_mlp = 1");
        assert!(
            scales[1].s_att != 1.0 && scales[3].s_mlp != 1.0,
            "{scales:?}"
        );
        assert!(r.plan.has_scales());
        assert_eq!(r.plan.skip, plan.skip);
    }
    assert!(before_w == weights(&model), "model weights changed");
}

#[test]
fn a_nan_lowers_the_learning_rate_and_never_saves_nan() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 3, 4, 24);
    let plan = Plan::with_skips([BlockId::attn(0)]);
    let opts = FitOptions {
        epochs: 2,
        lr: 1e6,
        loss: LossKind::Ce,
        batch_size: 1,
        init: None,
    };
    let r = fit_scales(
        &model,
        &plan,
        &calib,
        &calib,
        &opts,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap();
    assert!(!r.warnings.is_empty(), "lr 1e6 must hit a non-finite loss");
    assert!(r.warnings[0].contains("lr"), "{:?}", r.warnings);
    assert!(r.history.last().unwrap().lr < 1e6);
    let s = r.plan.scales.unwrap();
    assert!(s.iter().all(|l| l.as_array().iter().all(|x| x.is_finite())));
}

#[test]
fn cancelling_a_fit_keeps_the_best_scales_so_far() {
    let model = common::load_tiny("qwen2");
    let calib = common::random_set(&model, 4, 4, 24);
    let plan = Plan::with_skips([BlockId::attn(2)]);
    let opts = FitOptions {
        epochs: 50,
        lr: 1e-2,
        loss: LossKind::Kl,
        batch_size: 2,
        init: None,
    };
    let cancel = AtomicBool::new(false);
    let r = fit_scales(&model, &plan, &calib, &calib, &opts, &cancel, |e| {
        if e.epoch == 2 {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert!(r.cancelled);
    assert_eq!(r.history.len(), 3);
    let best = r
        .history
        .iter()
        .map(|e| e.heldout_loss)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(r.best_heldout_loss, best);
    model.check_plan(&r.plan).unwrap();
}

/// On the real model: fit on prose chunks, pick the epoch on other chunks,
/// and measure KL on chunks used for neither.
#[test]
fn smollm2_fitted_heldout_kl_is_lower_than_unfitted() {
    let model = common::smollm2();
    let text = std::fs::read_to_string(common::shared_dir().join("peers/eval.txt")).unwrap();
    let ids = model.codec().unwrap().encode(&text).unwrap();
    let chunks: Vec<Vec<u32>> = ids.chunks(64).map(<[u32]>::to_vec).collect();
    let set = |r: std::ops::Range<usize>| {
        TokenSet::from_id_sequences("prose", chunks[r].to_vec()).unwrap()
    };
    let (calib, select, measured) = (set(0..6), set(6..9), set(9..15));
    let plan = Plan::with_skips([10, 15, 20, 25].map(BlockId::attn));
    let opts = FitOptions {
        epochs: 2,
        lr: 1e-2,
        loss: LossKind::Kl,
        batch_size: 2,
        init: None,
    };
    let never = AtomicBool::new(false);
    let r = fit_scales(model, &plan, &calib, &select, &opts, &never, |_| {}).unwrap();
    assert!(
        r.best_epoch > 0,
        "no epoch improved the held-out loss: {:?}",
        r.history
    );
    let base = BaseStates::compute(model, &measured, &never).unwrap();
    let unfitted = measure(model, &measured, &base, &plan, &never).unwrap();
    let fitted = measure(model, &measured, &base, &r.plan, &never).unwrap();
    assert!(
        fitted.kl_to_base < unfitted.kl_to_base,
        "held-out KL {} (fitted) vs {} (unfitted)",
        fitted.kl_to_base,
        unfitted.kl_to_base
    );
}

fn tiny_fit(model: &Model, plan: &Plan, init: Option<Vec<LayerScales>>) -> Plan {
    let calib = common::random_set(model, 5, 4, 24);
    let opts = FitOptions {
        epochs: 2,
        lr: 3e-2,
        loss: LossKind::Ce,
        batch_size: 2,
        init,
    };
    let never = AtomicBool::new(false);
    fit_scales(model, plan, &calib, &calib, &opts, &never, |_| {})
        .unwrap()
        .plan
}

fn workbench(model: &Model, plan: Plan) -> App {
    let info = ModelInfo {
        identity: model.identity.clone(),
        n_layers: model.n_layers(),
        attn_params: 1,
        mlp_params: 1,
        head_params: 1,
        heldout: String::new(),
        calibration: String::new(),
        speed: String::new(),
        search_name: "search".into(),
    };
    App::new(info, plan, String::new(), Instant::now())
}

/// The bug: a fit stored b_att = 0 for a skipped block, so restoring it in
/// the workbench computed the block and added exactly nothing.
#[test]
fn a_fitted_skipped_block_restored_in_the_workbench_contributes_its_output() {
    let model = common::load_tiny("llama");
    let plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(2)]);
    // Even from starting scales with meaningless zeros (an old plan's).
    let mut init = vec![LayerScales::IDENTITY; model.n_layers()];
    init[1].b_att = 0.0;
    init[2].b_mlp = 0.0;
    let fitted = tiny_fit(&model, &plan, Some(init));
    let s = fitted.scales.as_ref().unwrap();
    assert_eq!((s[1].b_att, s[2].b_mlp), (1.0, 1.0), "{s:?}");

    let mut app = workbench(&model, fitted.clone());
    for block in [BlockId::attn(1), BlockId::mlp(2)] {
        app.cursor = block;
        app.toggle_cursor();
        assert!(!app.plan().is_skipped(block));
        let b = app.plan().scales_for(block.layer).output_scale(block.kind);
        assert_eq!(b, 1.0, "restored {block} has output scale {b}");
    }
    // The fitted residual scales of the restored blocks are kept.
    assert_eq!(app.plan().scales_for(1).s_att, s[1].s_att);
    assert_eq!(app.plan().scales_for(2).s_mlp, s[2].s_mlp);
}

fn logits(model: &Model, plan: &Plan) -> Vec<f32> {
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 512).collect();
    let input = Tensor::new(&ids[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = &model.transformer;
    let h = t
        .forward_hidden(&input, &mut Pass::plan(plan, RunOptions::FAST))
        .unwrap();
    let l = t.logits(&h.squeeze(0).unwrap(), RunOptions::FAST).unwrap();
    l.flatten_all().unwrap().to_vec1().unwrap()
}

/// Normalising a skipped block's output scale cannot change what the plan
/// computes: the forward pass never reads it.
#[test]
fn neutral_output_scales_of_skipped_blocks_leave_the_forward_output_unchanged() {
    let model = common::load_tiny("llama");
    let mut old = Plan::with_skips([BlockId::attn(1), BlockId::mlp(3)]);
    let mut scales: Vec<LayerScales> = (0..model.n_layers())
        .map(|l| LayerScales::from_array([0.9, 1.1, 0.8 + 0.1 * l as f32, 0.95]))
        .collect();
    scales[1].b_att = 0.0;
    scales[3].b_mlp = 0.37;
    old.scales = Some(scales);
    let mut normalised = old.clone();
    let notes = normalised.neutralise_output_scales();
    assert!(notes.is_empty(), "only skipped blocks changed: {notes:?}");
    assert_eq!(normalised.scales_for(1).b_att, 1.0);
    assert_eq!(normalised.scales_for(3).b_mlp, 1.0);
    assert_ne!(normalised, old);
    let (a, b) = (logits(&model, &old), logits(&model, &normalised));
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}
