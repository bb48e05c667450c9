//! Greedy speculative decoding gives the full model's greedy output, with
//! the plan as the draft (every block skipped, none, some) and with prompt
//! lookup, at draft lengths 1..8, for prompts shorter and longer than one
//! verify block; and it leaves the state as if only the output was fed.

mod common;

use scalpel::eval::generate::{generate, GenOptions};
use scalpel::eval::speculative::{speculate, DraftLen, Drafter, SpecOptions};
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
    SpecOptions::greedy(n, k, RunOptions::FAST)
}

#[test]
fn speculative_output_is_the_full_models_greedy_output() {
    for name in ["llama", "qwen2", "mistral", "gemma3"] {
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
            // The adaptive draft length is lossless too, and drafts 1..=8 per verify.
            for plan in &plans {
                let opts = SpecOptions {
                    draft_len: DraftLen::Auto { max: 8 },
                    ..spec_opts(20, 1)
                };
                let got = speculate(&model, prompt, Drafter::SelfPlan(plan), opts).unwrap();
                assert_eq!(got.new_tokens, want, "{name} plan {} auto", plan.describe());
                assert!(
                    (1.0..=8.0).contains(&got.mean_draft_len),
                    "mean k {}",
                    got.mean_draft_len
                );
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

fn scalpel(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .arg("--offline")
        .args(args)
        .output()
        .unwrap()
}

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "scalpel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_through_speculation_gives_the_plain_greedy_text() {
    let gguf = common::smollm2_path();
    let gguf = gguf.to_str().unwrap();
    let dir = common::scratch_dir();
    let draft = dir.path().join("draft.json");
    let blocks = [6, 7, 25, 28].map(BlockId::attn);
    scalpel::plan::PlanFile::new(common::smollm2().identity.clone(), Plan::with_skips(blocks))
        .save(&draft)
        .unwrap();
    let draft = draft.to_str().unwrap();
    let base = [
        "--model",
        gguf,
        "generate",
        "--prompt",
        "The old lighthouse keeper",
        "-n",
        "24",
        "--ignore-eos",
        "--weights",
        "f32",
        "--json",
    ];
    let plain = stdout_json(&scalpel(&base));
    for k in ["3", "auto"] {
        let mut args = base.to_vec();
        args.extend(["--speculative", draft, "--draft-len", k]);
        let spec = stdout_json(&scalpel(&args));
        assert_eq!(spec["new_tokens"], plain["new_tokens"], "draft length {k}");
        assert_eq!(spec["text"], plain["text"]);
        let alpha = spec["acceptance_rate"].as_f64().unwrap();
        assert!(alpha > 0.0 && alpha <= 1.0, "α {alpha}");
        assert!(spec["mean_accepted"].as_f64().unwrap() >= 1.0);
        assert_eq!(spec["draft_plan"], "attn.6 attn.7 attn.25 attn.28");
    }
    // Sampled: runs, and reports its acceptance.
    let mut args = base.to_vec();
    args.extend(["--speculative", draft, "--temp", "0.8", "--seed", "3"]);
    let spec = stdout_json(&scalpel(&args));
    assert_eq!(spec["new_tokens"].as_array().unwrap().len(), 24);
    // Not with a plan for the generation itself.
    let mut args = base.to_vec();
    args.extend(["--speculative", draft, "--skip", "attn.3"]);
    let out = scalpel(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be combined with --plan or --skip"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_draft_search_raises_the_proxy_at_every_step_and_saves_a_usable_plan() {
    use scalpel::surgery::speculative_search::{
        load_draft_search, save_draft_search, score_draft, search_draft, weight_fraction,
        SpecSearchOptions,
    };
    use std::sync::atomic::AtomicBool;

    let model = common::load_tiny("llama");
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let prompts = vec![ids[..5].to_vec(), ids[5..12].to_vec()];
    let opts = SpecSearchOptions {
        max_blocks: 4,
        include_mlp: true,
        draft_len: DraftLen::Fixed(3),
        max_new_tokens: 12,
        verify_cost: 1.0,
        run: RunOptions::FAST,
    };
    // The weights a step reads: the head always, the kept blocks.
    let (attn, mlp) = model.cfg().block_params();
    let head = model.cfg().vocab_size * model.cfg().hidden_size;
    let all = (head + 4 * (attn + mlp)) as f64;
    let one = Plan::with_skips([BlockId::mlp(2)]);
    assert!((weight_fraction(&model, &one) - (all - mlp as f64) / all).abs() < 1e-12);

    let cancel = AtomicBool::new(false);
    let result = search_draft(&model, &prompts, &opts, vec![], &cancel, |_| Ok(())).unwrap();
    // The full model drafts itself perfectly: τ = k + 1, proxy (k+1)/(k+1).
    assert_eq!(result.start.acceptance_rate, 1.0);
    assert!((result.start.proxy_speedup - 1.0).abs() < 1e-12);
    let mut best = result.start.proxy_speedup;
    for s in &result.steps {
        assert!(
            s.score.proxy_speedup > best,
            "step {} did not improve",
            s.step
        );
        best = s.score.proxy_speedup;
        let top = s
            .candidates
            .iter()
            .map(|c| c.score.proxy_speedup)
            .fold(f64::MIN, f64::max);
        assert_eq!(s.score.proxy_speedup, top, "step {} chose the best", s.step);
    }
    // A re-score of the final plan is what the last step measured (real drafting).
    if let Some(last) = result.steps.last() {
        let again = score_draft(&model, &result.plan, &prompts, &opts).unwrap();
        assert_eq!(again.mean_accepted, last.score.mean_accepted);
    }
    // Saved, it is a plan file that loads, and resumes only with the same settings.
    let dir = common::scratch_dir();
    let path = dir.path().join("draft.json");
    let settings = serde_json::json!({"k": 3});
    save_draft_search(&model, &result.steps, &settings, true, &path).unwrap();
    let pf = model.load_plan(&path).unwrap();
    assert_eq!(pf.plan.skip, result.plan.skip);
    let steps = load_draft_search(&model, &settings, &path).unwrap();
    assert_eq!(steps.len(), result.steps.len());
    let err = load_draft_search(&model, &serde_json::json!({"k": 4}), &path).unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
    // Resuming after the first step reproduces the rest of the search.
    if !result.steps.is_empty() {
        let resumed = search_draft(
            &model,
            &prompts,
            &opts,
            result.steps[..1].to_vec(),
            &cancel,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(resumed.plan.skip, result.plan.skip);
    }
}
