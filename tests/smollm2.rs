//! The engine on the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to
//! f32) against the PyTorch reference in shared/.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor, D};
use scalpel::eval::generate::argmax_per_position;
use scalpel::eval::perplexity::{evaluate, EvalOptions, EvalReport};
use scalpel::model::{Pass, RunOptions};
use scalpel::plan::{BlockId, Plan};

fn skip4() -> Plan {
    Plan::with_skips([10, 15, 20, 25].map(BlockId::attn))
}

fn eval_ids() -> Vec<u32> {
    let r = common::read_json(common::shared_dir().join("peers/results/eval_tokens_smollm2.json"));
    common::json_ints::<u32>(&r["ids"])
}

#[test]
fn tokenizer_reproduces_the_reference_ids() {
    let model = common::smollm2();
    let text = std::fs::read_to_string(common::shared_dir().join("peers/eval.txt")).unwrap();
    let ids = model.codec().unwrap().encode(&text).unwrap();
    let expected = eval_ids();
    assert_eq!(ids.len(), expected.len());
    assert_eq!(ids, expected);
    let r = common::read_json(common::shared_dir().join("reference/smollm2.json"));
    let prompt: Vec<u32> = common::json_ints::<u32>(&r["prompt_ids"]);
    let decoded = model.codec().unwrap().decode(&prompt).unwrap();
    assert_eq!(decoded, r["prompt_decoded"].as_str().unwrap());
}

#[test]
fn last_position_top5_and_argmax_match_pytorch() {
    let model = common::smollm2();
    let r = common::read_json(common::shared_dir().join("reference/smollm2.json"));
    let prompt: Vec<u32> = common::json_ints::<u32>(&r["prompt_ids"]);
    for run in r["runs"].as_array().unwrap() {
        let skips: Vec<usize> = common::json_ints::<usize>(&run["skip_attn_layers"]);
        let plan = Plan::with_skips(skips.iter().map(|&l| BlockId::attn(l)));
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let t = &model.transformer;
        let h = t
            .forward_hidden(&input, &mut Pass::plan(&plan, RunOptions::FAST))
            .unwrap();
        let last = h.squeeze(0).unwrap().get(prompt.len() - 1).unwrap();
        let logits: Vec<f32> = t
            .logits(&last.unsqueeze(0).unwrap(), RunOptions::FAST)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        for entry in run["last_top5"].as_array().unwrap() {
            let id = entry["id"].as_u64().unwrap() as usize;
            let want = entry["logit"].as_f64().unwrap() as f32;
            eprintln!(
                "skip {skips:?}: logit[{id}] |Δ| = {:e}",
                (logits[id] - want).abs()
            );
            // Measured: at most 9.5e-6 (skip attn 10,15,20,25).
            assert!(
                (logits[id] - want).abs() < 3e-5,
                "skip {skips:?}: logit[{id}] = {} vs {want}",
                logits[id]
            );
        }
        let argmax = argmax_per_position(model, &prompt, &plan, RunOptions::FAST).unwrap();
        let want: Vec<u32> = common::json_ints::<u32>(&run["argmax_per_position"]);
        assert_eq!(argmax, want, "skip {skips:?}");
    }
}

fn perplexity(plan: &Plan) -> f64 {
    evaluate_ids(&eval_ids(), plan, false, true).perplexity
}

fn evaluate_ids(
    ids: &[u32],
    plan: &Plan,
    compare_base: bool,
    parallel_windows: bool,
) -> EvalReport {
    let opts = EvalOptions {
        window: 512,
        compare_base,
        run: RunOptions::FAST,
        parallel_windows,
    };
    let model = common::smollm2();
    evaluate(model, ids, plan, opts, &AtomicBool::new(false), |_, _| {}).unwrap()
}

#[test]
fn windows_scored_in_parallel_give_the_sequential_result_exactly() {
    let ids = &eval_ids()[..3 * 512];
    let one = evaluate_ids(ids, &skip4(), true, false);
    let par = evaluate_ids(ids, &skip4(), true, true);
    assert_eq!(one.windows, 3);
    assert_eq!(one.mean_nll.to_bits(), par.mean_nll.to_bits());
    assert_eq!(one.kl_to_base.to_bits(), par.kl_to_base.to_bits());
    assert_eq!(one.top1_agreement, par.top1_agreement);
    assert!(one.kl_to_base > 0.0);
}

#[test]
fn perplexity_matches_pytorch_within_3e_5() {
    for (plan, want) in [(Plan::base(), 22.3452), (skip4(), 32.7714)] {
        let got = perplexity(&plan);
        let rel = (got - want).abs() / want;
        eprintln!(
            "{}: perplexity {got:.6} vs PyTorch {want}: relative {rel:e}",
            plan.describe()
        );
        // Measured: 8.6e-6 (base, 22.345391) and 9.9e-6 (skips, 32.771725).
        assert!(
            rel < 3e-5,
            "{}: perplexity {got:.4} vs PyTorch {want} ({:.3}%)",
            plan.describe(),
            rel * 100.0
        );
    }
}

#[test]
fn differentiable_mode_equals_fast_mode() {
    let model = common::smollm2();
    let ids = &eval_ids()[..96];
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = &model.transformer;
    let mut plan = skip4();
    plan.scales = Some(
        (0..30)
            .map(|i| scalpel::plan::LayerScales {
                b_att: 0.9,
                s_att: 1.0 + 0.001 * i as f32,
                b_mlp: 1.05,
                s_mlp: 0.99,
            })
            .collect(),
    );
    let run = |r: RunOptions| -> Vec<f32> {
        let h = t.forward_hidden(&input, &mut Pass::plan(&plan, r)).unwrap();
        t.logits(&h, r)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let diff = common::max_abs_diff(&run(RunOptions::FAST), &run(RunOptions::DIFFERENTIABLE));
    eprintln!("fast vs differentiable: max |Δlogit| = {diff:e}");
    // Measured: 1.5e-4.
    assert!(diff < 5e-4, "fast vs differentiable: max |Δlogit| = {diff}");
}

#[test]
fn quantized_decode_agrees_with_f32() {
    // The quantized path (Q4_1 weights, 8-bit activations) drifts a little
    // from f32, as llama.cpp does; the greedy choice stays the same.
    let model = common::smollm2();
    let r = common::read_json(common::shared_dir().join("reference/smollm2.json"));
    let prompt: Vec<u32> = common::json_ints::<u32>(&r["prompt_ids"]);
    let f32_argmax = argmax_per_position(model, &prompt, &Plan::base(), RunOptions::FAST).unwrap();
    let t = &model.transformer;
    let mut cache = t.new_state(0);
    let mut q_argmax = vec![];
    let base = Plan::base();
    for id in &prompt {
        let x = Tensor::new(&[*id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = t
            .forward_hidden(
                &x,
                &mut Pass::plan(&base, RunOptions::QUANTIZED).with_state(&mut cache),
            )
            .unwrap();
        q_argmax.push(
            t.logits(&h, RunOptions::QUANTIZED)
                .unwrap()
                .flatten_all()
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap(),
        );
    }
    let agree = f32_argmax
        .iter()
        .zip(&q_argmax)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        agree >= 15,
        "quantized argmax agrees at {agree}/16 positions"
    );
}
