//! KV budget policies on the lean CPU decode path (quantized SmolLM2): a
//! Quest decode step attends there to its chosen pages only (reading just
//! those keys), and the evicting policies decode over their smaller cache.
//! Each against the candle path on the same state and tokens, with the
//! lean-vs-candle difference of the full cache as the yardstick.

mod common;

use scalpel::eval::data::DEFAULT_EVAL_TEXT;
use scalpel::model::kv::{KeptKeys, KvPolicy};
use scalpel::model::{Model, Pass, RunOptions, SeqState};
use scalpel::plan::Plan;

const LEAN: RunOptions = RunOptions::QUANTIZED;
const CANDLE: RunOptions = RunOptions {
    lean: false,
    ..RunOptions::QUANTIZED
};
const PROMPT: usize = 200;
const STEPS: usize = 4;

fn text(model: &Model) -> Vec<u32> {
    let ids = model.codec().unwrap().encode(DEFAULT_EVAL_TEXT).unwrap();
    ids[..PROMPT + STEPS].to_vec()
}

fn prefilled(model: &Model, prompt: &[u32]) -> SeqState {
    let t = &model.transformer;
    let mut state = t.new_state(prompt.len() + STEPS);
    let plan = Plan::base();
    t.forward_hidden(
        &common::batch_of_one(prompt),
        &mut Pass::plan(&plan, CANDLE).with_state(&mut state),
    )
    .unwrap();
    state
}

/// Logits of each teacher-forced decode step after the prompt, under
/// `spec` (compressed to its budget first, as `eval --decode-speed` does),
/// or with the full cache and no probe; the policy at the end, and what
/// it let each step see.
fn decode(
    model: &Model,
    start: &SeqState,
    spec: Option<&str>,
    run: RunOptions,
    tokens: &[u32],
) -> (Vec<Vec<f32>>, Option<KvPolicy>, Vec<String>) {
    let t = &model.transformer;
    let plan = Plan::base();
    let mut state = start.deep_clone().unwrap();
    let mut policy = spec.map(|s| KvPolicy::new(s.parse().unwrap(), model.cfg()).unwrap());
    if let Some(p) = &mut policy {
        p.begin_pass(PROMPT);
        p.end_pass(&mut state).unwrap();
    }
    let mut out = Vec::new();
    let mut picks = Vec::new();
    for &tok in tokens {
        let mut pass = Pass::plan(&plan, run).with_state(&mut state);
        if let Some(p) = &mut policy {
            p.begin_pass(1);
            pass = pass.with_probe(p);
        }
        let h = t
            .forward_hidden(&common::batch_of_one(&[tok]), &mut pass)
            .unwrap();
        let logits = t.logits(&h.squeeze(1).unwrap(), run).unwrap();
        out.push(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        if let Some(p) = &mut policy {
            let kept: Vec<_> = (0..t.n_layers()).map(|l| p.kept(l, &state)).collect();
            picks.push(format!("{kept:?}"));
            p.end_pass(&mut state).unwrap();
        }
    }
    (out, policy, picks)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| common::max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

#[test]
fn kv_policies_decode_on_the_lean_path_as_on_the_candle_path() {
    let model = common::smollm2();
    assert!(model.transformer.lean_ready().unwrap());
    let ids = text(model);
    let (prompt, next) = ids.split_at(PROMPT);
    let start = prefilled(model, prompt);
    let (full_lean, ..) = decode(model, &start, None, LEAN, next);
    let (full_candle, ..) = decode(model, &start, None, CANDLE, next);
    let yardstick = max_diff(&full_lean, &full_candle);
    assert!(
        yardstick > 0.0,
        "the lean path must differ in bits from candle's kernels"
    );
    eprintln!("full cache: lean vs candle {yardstick:.4}");

    // A budget covering the context: the same bits as the full cache.
    let (covering, ..) = decode(model, &start, Some("quest:256"), LEAN, next);
    assert_eq!(
        covering, full_lean,
        "quest:256 over 204 tokens must be the full cache"
    );

    for spec in [
        "quest:64",
        "quest:64:16:0",
        "window:64",
        "streaming:64",
        "snapkv:64",
    ] {
        let (lean, policy, lean_picks) = decode(model, &start, Some(spec), LEAN, next);
        let (candle, _, candle_picks) = decode(model, &start, Some(spec), CANDLE, next);
        let paths = max_diff(&lean, &candle);
        let effect = max_diff(&lean, &full_lean);
        // Quest picks pages from each path's own queries: a near-tie can
        // pick another page on the other path, which moves the logits more
        // than kernel rounding does.
        let flipped = lean_picks
            .iter()
            .zip(&candle_picks)
            .filter(|(a, b)| a != b)
            .count();
        let bound = if flipped == 0 { 2.0 } else { 3.0 } * yardstick;
        eprintln!(
            "{spec}: lean vs candle {paths:.4}, policy vs full cache {effect:.4}, \
             steps whose keys differ {flipped}"
        );
        assert_ne!(lean, candle, "{spec}: the decode must take the lean path");
        assert!(
            paths <= bound,
            "{spec}: lean and candle differ by {paths}, the full cache's paths by {yardstick} \
             ({flipped} steps chose other keys)"
        );
        assert!(
            effect > 2.0 * yardstick,
            "{spec}: a 64-token budget over 200 tokens must change the logits ({effect})"
        );
        if spec.starts_with("quest") {
            let state = start.deep_clone().unwrap();
            match policy.unwrap().kept(5, &state) {
                KeptKeys::Pages { page, picks } => {
                    for head in &picks {
                        let pages = head[0].as_ref().expect("the last query chose pages");
                        assert_eq!(pages.len(), 64 / page, "{pages:?}");
                        assert!(pages.contains(&0), "the sink page is always attended");
                    }
                }
                other => panic!("Quest must report its pages, got {other:?}"),
            }
        }
    }
}
