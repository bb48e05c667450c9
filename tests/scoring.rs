//! One scoring path: every number the surgery code reports for a plan
//! (held-out measurements, the fit's held-out loss, importance Δloss, the
//! search's screening and step losses) equals what `eval` reports for the
//! same plan on the same sequences, to the last bit.

mod common;

use std::sync::atomic::AtomicBool;

use scalpel::eval::data::TokenSet;
use scalpel::eval::perplexity::{evaluate, windows, EvalOptions, EvalReport};
use scalpel::model::{Model, RunOptions};
use scalpel::plan::{BlockId, LayerScales, Plan};
use scalpel::surgery::fit::{fit_scales, FitOptions};
use scalpel::surgery::hopscotch::{search, SearchOptions};
use scalpel::surgery::importance::compute_importance;
use scalpel::surgery::objective::{mean_loss, measure, BaseStates, LossKind};

/// `ids` cut as `eval` cuts them, as a token set (every token after the first scored).
fn eval_windows(model: &Model, ids: &[u32], window: usize) -> TokenSet {
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    TokenSet::from_id_sequences("eval windows", windows(ids, window, bos)).unwrap()
}

fn eval(model: &Model, ids: &[u32], plan: &Plan, window: usize) -> EvalReport {
    let opts = EvalOptions {
        window,
        compare_base: true,
        run: RunOptions::FAST,
        parallel_windows: false,
    };
    evaluate(model, ids, plan, opts, &AtomicBool::new(false), |_, _| {}).unwrap()
}

fn random_ids(model: &Model, seed: u64, n: usize) -> Vec<u32> {
    common::random_set(model, seed, 1, n).sequences[0]
        .ids
        .clone()
}

#[test]
fn held_out_measurements_and_fit_losses_equal_eval_on_smollm2() {
    let model = common::smollm2();
    let text = &scalpel::eval::data::DEFAULT_EVAL_TEXT[..3000];
    let ids = model.codec().unwrap().encode(text).unwrap();
    // Windows of 160: two logits chunks each (128 + 31 rows), the last one shorter.
    let window = 160;
    let ids = &ids[..window + 40];
    let set = eval_windows(model, ids, window);
    assert_eq!(set.sequences.len(), 2);
    let never = AtomicBool::new(false);
    let base = BaseStates::compute(model, &set, &never).unwrap();
    let mut plan = Plan::with_skips([BlockId::attn(10), BlockId::attn(15)]);
    let mut scales = vec![LayerScales::IDENTITY; model.n_layers()];
    scales[12].s_mlp = 0.97;
    plan.scales = Some(scales);

    let want = eval(model, ids, &plan, window);
    let got = measure(model, &set, &base, &plan, &never).unwrap();
    assert_eq!(got.scored_tokens, want.scored_tokens);
    assert_eq!(got.perplexity, want.perplexity, "perplexity");
    assert_eq!(got.kl_to_base, want.kl_to_base, "KL(base ‖ plan)");
    assert_eq!(got.top1_agreement, want.top1_agreement, "top-1 agreement");
    assert!(
        want.kl_to_base > 0.01 && want.top1_agreement < 1.0,
        "{want:?}"
    );

    let ce = mean_loss(model, &set, None, &plan, LossKind::Ce, &never).unwrap();
    let kl = mean_loss(model, &set, Some(&base), &plan, LossKind::Kl, &never).unwrap();
    assert_eq!(ce, want.mean_nll, "mean cross-entropy");
    assert_eq!(kl, want.kl_to_base, "mean KL");

    // The fit's held-out loss (epoch 0: the plan as given, scales included).
    let opts = FitOptions {
        epochs: 0,
        init: plan.scales.clone(),
        ..FitOptions::default()
    };
    let r = fit_scales(model, &plan, &set, &set, &opts, &never, |_| {}).unwrap();
    assert_eq!(
        r.history[0].heldout_loss, want.kl_to_base,
        "fit held-out KL"
    );
}

#[test]
fn importance_delta_loss_equals_eval() {
    let model = common::load_tiny("llama");
    let window = 48;
    let ids = random_ids(&model, 5, 2 * window);
    let set = eval_windows(&model, &ids, window);
    let imp = compute_importance(&model, &set, &AtomicBool::new(false), |_, _| {}).unwrap();
    let base = eval(&model, &ids, &Plan::base(), window);
    assert_eq!(imp.base_loss, base.mean_nll, "base loss");
    assert_eq!(imp.tokens, base.scored_tokens);
    for b in &imp.blocks {
        let skipped = eval(&model, &ids, &Plan::with_skips([b.block]), window);
        assert_eq!(
            b.delta_loss,
            skipped.mean_nll - base.mean_nll,
            "Δloss of {}",
            b.block
        );
    }
}

#[test]
fn search_screening_and_step_losses_equal_eval() {
    let model = common::load_tiny("qwen2");
    let window = 40;
    let ids = random_ids(&model, 7, 3 * window);
    let set = eval_windows(&model, &ids, window);
    let mut opts = SearchOptions::new(1, LossKind::Kl);
    opts.shortlist = 2;
    opts.screen_samples = 0;
    opts.final_fit.epochs = 0;
    let r = search(&model, &set, &set, &opts, &AtomicBool::new(false), |_| {}).unwrap();
    let step = &r.steps[0];
    let identity = vec![LayerScales::IDENTITY; model.n_layers()];
    for c in &step.candidates {
        let mut plan = Plan::with_skips([c.block]);
        plan.scales = Some(identity.clone());
        let want = eval(&model, &ids, &plan, window).kl_to_base;
        assert_eq!(c.screen_loss, Some(want), "screen loss of {}", c.block);
    }
    let mut chosen = Plan::with_skips([step.chosen]);
    chosen.scales = Some(step.scales.clone());
    let want = eval(&model, &ids, &chosen, window).kl_to_base;
    assert_eq!(step.loss, want, "step loss of {}", step.chosen);
}
