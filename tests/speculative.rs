//! Greedy speculative decoding gives the full model's greedy output, with
//! the plan as the draft (every block skipped, none, some) and with prompt
//! lookup, at draft lengths 1..8, for prompts shorter and longer than one
//! verify block; and it leaves the state as if only the output was fed.

mod common;

use scalpel::eval::generate::{generate, GenOptions};
use scalpel::eval::speculative::{speculate, Drafter, SpecOptions};
use scalpel::model::{Model, RunOptions};
use scalpel::plan::{BlockId, Plan};

fn plain(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = GenOptions {
        max_new_tokens: n,
        temperature: 0.0,
        seed: 0,
        stop_at_eos: false,
        run: RunOptions::FAST,
    };
    generate(model, prompt, &Plan::base(), opts, |_| Ok(()))
        .unwrap()
        .new_tokens
}

fn spec_opts(n: usize, k: usize) -> SpecOptions {
    SpecOptions {
        max_new_tokens: n,
        draft_len: k,
        stop_at_eos: false,
        run: RunOptions::FAST,
    }
}

#[test]
fn speculative_output_is_the_full_models_greedy_output() {
    for name in ["llama", "qwen2", "mistral"] {
        let model = common::load_tiny(name);
        let r = common::read_json(common::tiny_dir(name).join("reference.json"));
        let ids = common::json_ints::<u32>(&r["token_ids"]);
        let every: Vec<BlockId> = (0..model.n_layers())
            .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
            .collect();
        let plans = [
            Plan::base(),
            Plan::with_skips([BlockId::attn(1), BlockId::mlp(2)]),
            Plan::with_skips(every),
        ];
        for prompt in [&ids[..3], &ids[..]] {
            let want = plain(&model, prompt, 20);
            for plan in &plans {
                for k in 1..=8 {
                    let got = speculate(&model, prompt, Drafter::SelfPlan(plan), spec_opts(20, k))
                        .unwrap();
                    assert_eq!(
                        got.new_tokens,
                        want,
                        "{name} plan {} k {k}",
                        plan.describe()
                    );
                    assert!(got.accepted <= got.drafted);
                }
            }
            for k in [1, 4, 8] {
                let got = speculate(
                    &model,
                    prompt,
                    Drafter::PromptLookup { max_ngram: 3 },
                    spec_opts(20, k),
                )
                .unwrap();
                assert_eq!(got.new_tokens, want, "{name} prompt lookup k {k}");
            }
        }
    }
}

#[test]
fn the_full_model_as_its_own_draft_accepts_everything() {
    let model = common::load_tiny("llama");
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let got = speculate(
        &model,
        &ids[..8],
        Drafter::SelfPlan(&Plan::base()),
        spec_opts(16, 4),
    )
    .unwrap();
    assert_eq!(got.acceptance_rate, 1.0);
    // 16 tokens: the prefill's one, then 3 verifies of 4 accepted + 1.
    assert_eq!(got.new_tokens.len(), 16);
    assert_eq!(got.verifies, 3);
    assert_eq!(got.mean_accepted, 5.0);
}

#[test]
fn bad_draft_settings_are_refused() {
    let model = common::load_tiny("llama");
    let err = speculate(
        &model,
        &[1, 2],
        Drafter::SelfPlan(&Plan::base()),
        spec_opts(4, 0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("draft length"), "{err}");
    let long = vec![1u32; model.transformer.max_positions()];
    let err = speculate(
        &model,
        &long,
        Drafter::SelfPlan(&Plan::base()),
        spec_opts(4, 2),
    )
    .unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}
