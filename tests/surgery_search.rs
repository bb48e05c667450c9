//! The greedy search on a tiny model: step 1 agrees with a brute-force refit
//! of every candidate; an interrupted, resumed search equals an uninterrupted
//! one; a cancelled search leaves a valid plan file.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use scalpel::eval::data::TokenSet;
use scalpel::model::Model;
use scalpel::plan::{BlockId, LayerScales, Plan, PlanFile};
use scalpel::surgery::hopscotch::{
    load_checkpoint, refit_candidate, search, SearchEvent, SearchOptions,
};
use scalpel::surgery::objective::{mean_loss, BaseStates, LayerInputs, LossKind, Start};

/// Every step-1 candidate refitted on its own, scored as the search scores
/// it: exact mode, the refit's mean training loss; default mode, the lower
/// of the loss before and after a refit of the layers from the candidate on.
fn brute_force_step1(model: &Model, calib: &TokenSet, opts: &SearchOptions) -> Vec<f64> {
    let never = AtomicBool::new(false);
    let base = BaseStates::compute(model, calib, &never).unwrap();
    let inputs = LayerInputs::compute(model, calib, &Plan::base(), &never).unwrap();
    (0..model.n_layers())
        .map(|l| {
            let plan = Plan::with_skips([BlockId::attn(l)]);
            let mut fo = opts.refit.clone();
            fo.loss = opts.loss;
            let start = if opts.exact {
                Start::Embeddings
            } else {
                fo.init = Some(vec![LayerScales::IDENTITY; model.n_layers()]);
                Start::Layer(l, &inputs)
            };
            let refit = refit_candidate(
                model,
                &plan,
                calib,
                Some(&base),
                &fo,
                opts.exact,
                start,
                &never,
            )
            .unwrap()
            .unwrap()
            .0;
            if opts.exact {
                refit
            } else {
                let before =
                    mean_loss(model, calib, Some(&base), &plan, opts.loss, &never).unwrap();
                refit.min(before)
            }
        })
        .collect()
}

#[test]
fn step_one_picks_the_block_with_the_lowest_refitted_loss() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 11, 6, 24);
    let heldout = common::random_set(&model, 12, 3, 24);
    let never = AtomicBool::new(false);
    for exact in [true, false] {
        let mut opts = if exact {
            SearchOptions::exact(1, LossKind::Kl, 2)
        } else {
            let mut o = SearchOptions::new(1, LossKind::Kl);
            o.shortlist = model.n_layers(); // every candidate refitted
            o
        };
        opts.final_fit.epochs = 0;
        let r = search(&model, &calib, &heldout, &opts, &never, |_| {}).unwrap();
        let losses = brute_force_step1(&model, &calib, &opts);
        let best = (0..losses.len())
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .unwrap();
        assert_eq!(
            r.steps[0].chosen,
            BlockId::attn(best),
            "exact={exact}: losses {losses:?}"
        );
        for c in &r.steps[0].candidates {
            let want = losses[c.block.layer];
            let refit = c.refit_loss.unwrap();
            let got = c.full_loss.map_or(refit, |s| s.min(refit));
            eprintln!(
                "exact={exact} {}: search vs brute force relative Δloss {:e}",
                c.block,
                (got - want).abs() / want.abs().max(1.0)
            );
            // Measured: identical (0); this allows f64 rounding only.
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{}: {got} vs {want}",
                c.block
            );
        }
        // The losses must actually differ, or the check above proves nothing.
        let spread = losses.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - losses.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(spread > 0.0);
    }
}

#[test]
fn resumed_search_equals_uninterrupted_and_cancel_leaves_a_valid_plan() {
    let model = common::load_tiny("qwen2");
    let calib = common::random_set(&model, 21, 4, 24);
    let heldout = common::random_set(&model, 22, 3, 24);
    let dir = common::scratch_dir();
    let never = AtomicBool::new(false);
    let mut opts = SearchOptions::new(3, LossKind::Kl);
    opts.shortlist = 2;
    opts.final_fit.epochs = 2;

    let full_path = dir.path().join("full.json");
    opts.checkpoint = Some(full_path.clone());
    let full = search(&model, &calib, &heldout, &opts, &never, |_| {}).unwrap();
    assert_eq!(full.steps.len(), 3);
    assert!(!full.cancelled);

    // Interrupted after the first step.
    let path = dir.path().join("part.json");
    opts.checkpoint = Some(path.clone());
    let cancel = AtomicBool::new(false);
    let part = search(&model, &calib, &heldout, &opts, &cancel, |e| {
        if matches!(e, SearchEvent::StepDone { step: 1, .. }) {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert!(part.cancelled);
    assert_eq!(part.steps.len(), 1);
    let pf = PlanFile::load(&path).unwrap();
    pf.check_model(&model.identity).unwrap();
    assert_eq!(pf.plan.skip.len(), 1);
    assert_eq!(pf.provenance["search"]["complete"], false);

    // Resumed.
    opts.resume_from = load_checkpoint(&model, &opts, &path).unwrap();
    let resumed = search(&model, &calib, &heldout, &opts, &never, |_| {}).unwrap();
    assert_eq!(resumed.plan.skip, full.plan.skip);
    let (a, b) = (resumed.plan.scales.unwrap(), full.plan.scales.unwrap());
    let worst = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| x.as_array().into_iter().zip(y.as_array()))
        .map(|(u, v)| (u - v).abs())
        .fold(0f32, f32::max);
    eprintln!("resumed vs uninterrupted: max |Δscale| = {worst:e}");
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x.as_array().iter().zip(y.as_array()) {
            // Measured: identical (0); this allows a few f32 ulps near 1.
            assert!((u - v).abs() < 5e-7, "{a:?} vs {b:?}");
        }
    }
    let done = PlanFile::load(&path).unwrap();
    assert_eq!(done.provenance["search"]["complete"], true);

    // Different settings refuse to resume.
    let mut other = opts.clone();
    other.shortlist = 3;
    assert!(load_checkpoint(&model, &other, &path).is_err());
}

#[test]
fn resume_with_other_data_is_refused_naming_what_differs() {
    let model = common::load_tiny("qwen2");
    let calib = common::random_set(&model, 41, 4, 16);
    let heldout = common::random_set(&model, 42, 2, 16);
    let dir = common::scratch_dir();
    let path = dir.path().join("part.json");
    let mut opts = SearchOptions::new(2, LossKind::Kl);
    opts.shortlist = 1;
    opts.checkpoint = Some(path.clone());
    let cancel = AtomicBool::new(false);
    let part = search(&model, &calib, &heldout, &opts, &cancel, |e| {
        if matches!(e, SearchEvent::StepDone { step: 1, .. }) {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(part.steps.len(), 1);
    opts.resume_from = load_checkpoint(&model, &opts, &path).unwrap();
    let never = AtomicBool::new(false);
    let resume = |train: &TokenSet, validation: &TokenSet| {
        search(&model, train, validation, &opts, &never, |_| {})
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    // Other calibration tokens of the same size (another generation seed).
    let other = common::random_set(&model, 43, 4, 16);
    let err = resume(&other, &heldout);
    assert!(err.contains("other data"), "{err}");
    assert!(err.contains("calibration sha256"), "{err}");
    assert!(!err.contains("calibration sequences"), "{err}");
    // Fewer, longer sequences; and a different validation split.
    let err = resume(&common::random_set(&model, 41, 3, 20), &heldout);
    assert!(
        err.contains("calibration sequences: checkpoint 4, now 3"),
        "{err}"
    );
    let err = resume(&calib, &common::random_set(&model, 42, 3, 16));
    assert!(
        err.contains("validation sequences: checkpoint 2, now 3"),
        "{err}"
    );
    assert!(!err.contains("calibration"), "{err}");
    // The same data resumes.
    search(&model, &calib, &heldout, &opts, &never, |_| {}).unwrap();
}

#[test]
fn more_blocks_than_layers_is_refused() {
    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 31, 2, 16);
    let opts = SearchOptions::new(5, LossKind::Ce);
    let err = search(
        &model,
        &calib,
        &calib,
        &opts,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("more than the model's 4"), "{err}");
}

#[test]
fn cached_layer_inputs_reproduce_the_full_forward_pass() {
    use scalpel::model::RunOptions;
    use scalpel::surgery::objective::forward_full;
    let model = common::load_tiny("llama");
    let data = common::random_set(&model, 31, 2, 24);
    let never = AtomicBool::new(false);
    let mut plan = Plan::with_skips([BlockId::attn(0)]);
    let mut scales = vec![LayerScales::IDENTITY; model.n_layers()];
    scales[1].s_mlp = 0.9;
    plan.scales = Some(scales);
    let inputs = LayerInputs::compute(&model, &data, &plan, &never).unwrap();
    for (i, seq) in data.sequences.iter().enumerate() {
        let full = forward_full(&model, seq, &plan, &plan, RunOptions::FAST).unwrap();
        for layer in 0..model.n_layers() {
            let from = Start::Layer(layer, &inputs)
                .forward(&model, seq, i, &plan, &plan, RunOptions::FAST)
                .unwrap();
            let flat = |t: &candle_core::Tensor| -> Vec<f32> {
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            let diff = common::max_abs_diff(&flat(&full), &flat(&from));
            eprintln!("sequence {i}, from layer {layer}: max |Δ| = {diff:e}");
            // Measured: identical (0); this allows a few f32 ulps of the stream.
            assert!(diff < 1e-6, "sequence {i}, from layer {layer}: {diff}");
        }
    }
}
