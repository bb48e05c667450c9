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
        prescreen: 0,
        patience: 0,
    };
    // Without the screen the calibration text is never read.
    let no_text = scalpel::eval::data::TokenSet {
        source: "none".into(),
        sequences: vec![],
    };
    // The weights a step reads: the head always, the kept blocks.
    let (attn, mlp) = model.cfg().block_params();
    let head = model.cfg().vocab_size * model.cfg().hidden_size;
    let all = (head + 4 * (attn + mlp)) as f64;
    let one = Plan::with_skips([BlockId::mlp(2)]);
    assert!((weight_fraction(&model, &one) - (all - mlp as f64) / all).abs() < 1e-12);

    let cancel = AtomicBool::new(false);
    let result = search_draft(&model, &prompts, &no_text, &opts, vec![], &cancel, |_| {
        Ok(())
    })
    .unwrap();
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
    save_draft_search(&model, &result.start, &result.steps, &settings, true, &path).unwrap();
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
            &no_text,
            &opts,
            result.steps[..1].to_vec(),
            &cancel,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(resumed.plan.skip, result.plan.skip);
    }
}

/// The tiny llama with attention 3 writing nothing (its output projection
/// zeroed) and MLP 2 writing a tenth: a random model has no redundant block,
/// so without these no removal pays and the search chooses nothing.
fn tiny_llama_with_quiet_blocks() -> (tempfile::TempDir, Model) {
    use candle_core::{Device, Tensor};
    let from = common::tiny_dir("llama");
    let dir = common::scratch_dir();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(from.join(f), dir.path().join(f)).unwrap();
    }
    let mut weights =
        candle_core::safetensors::load(from.join("model.safetensors"), &Device::Cpu).unwrap();
    let scale = |w: &mut std::collections::HashMap<String, Tensor>, name: &str, by: f64| {
        let t = w[name].affine(by, 0.0).unwrap();
        w.insert(name.into(), t);
    };
    scale(&mut weights, "model.layers.3.self_attn.o_proj.weight", 0.0);
    scale(&mut weights, "model.layers.2.mlp.down_proj.weight", 0.1);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let resolved = scalpel::model::Resolved {
        local: scalpel::model::LocalModel::HfDir(dir.path().to_path_buf()),
        origin: "test".into(),
    };
    let model = Model::load(&resolved, &Device::Cpu).unwrap();
    (dir, model)
}

/// The tiny llama with quiet blocks, two calibration prompts and search
/// options for the matchness and fit tests.
fn tiny_search_setup(
    prescreen: usize,
) -> (tempfile::TempDir, Model, Vec<Vec<u32>>, SpecSearchOptions) {
    let (dir, model) = tiny_llama_with_quiet_blocks();
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let prompts = vec![ids[..5].to_vec(), ids[5..12].to_vec()];
    let opts = SpecSearchOptions {
        max_blocks: 3,
        include_mlp: true,
        draft_len: DraftLen::Fixed(3),
        max_new_tokens: 12,
        verify_cost: 1.0,
        run: RunOptions::FAST,
        prescreen,
        patience: 0,
    };
    (dir, model, prompts, opts)
}

use scalpel::surgery::speculative_search::{SpecSearchEvent, SpecSearchOptions};

/// Positions where `plan`'s argmax equals the full model's, and positions
/// scored, by a plain forward of each whole sequence (not the screen's code).
fn direct_matches(
    model: &Model,
    data: &scalpel::eval::data::TokenSet,
    plan: &Plan,
) -> (usize, usize) {
    let argmax = |ids: &[u32], plan: &Plan| -> Vec<u32> {
        let t = &model.transformer;
        let input = candle_core::Tensor::new(ids, model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut pass = scalpel::model::Pass::plan(plan, RunOptions::FAST);
        let h = t
            .forward_hidden(&input, &mut pass)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logits = t.logits(&h, RunOptions::FAST).unwrap();
        logits
            .argmax(candle_core::D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (mut same, mut scored) = (0, 0);
    for seq in &data.sequences {
        let full = argmax(&seq.ids, &Plan::base());
        let under = argmax(&seq.ids, plan);
        // Row j - 1 predicts token j; tokens from `scored_from` are scored.
        for j in seq.scored_from..seq.ids.len() {
            same += usize::from(full[j - 1] == under[j - 1]);
            scored += 1;
        }
    }
    (same, scored)
}

#[test]
fn matchness_is_one_for_the_full_model_and_the_direct_share_for_a_skip() {
    use scalpel::surgery::objective::{LayerInputs, Start};
    use scalpel::surgery::speculative_search::MatchReference;
    use std::sync::atomic::AtomicBool;

    let model = common::load_tiny("llama");
    let calib = common::random_set(&model, 11, 3, 20);
    let reference = MatchReference::compute(&model, &calib).unwrap();
    assert_eq!(reference.matchness(&model, &Plan::base()).unwrap(), 1.0);
    // The single skip that changes the most argmaxes.
    let (block, (same, scored)) = (0..model.n_layers())
        .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
        .map(|b| (b, direct_matches(&model, &calib, &Plan::with_skips([b]))))
        .min_by_key(|(_, (same, _))| *same)
        .unwrap();
    assert_eq!(scored, calib.scored_tokens());
    assert!(same < scored, "no skip changed an argmax");
    let plan = Plan::with_skips([block]);
    let m = reference.matchness(&model, &plan).unwrap();
    assert_eq!(m, same as f64 / scored as f64, "{block}");
    assert!(m < 1.0);
    // The search's cheap path (cached inputs to the skipped layer) agrees.
    let never = AtomicBool::new(false);
    let inputs = LayerInputs::compute(&model, &calib, &Plan::base(), &never).unwrap();
    let cheap = reference
        .matchness_from(&model, &plan, Start::Layer(block.layer, &inputs))
        .unwrap();
    assert_eq!(cheap, m);
    // Over two skips too, against the direct count.
    let two = Plan::with_skips([BlockId::attn(0), BlockId::mlp(3)]);
    let (same, scored) = direct_matches(&model, &calib, &two);
    assert_eq!(
        reference.matchness(&model, &two).unwrap(),
        same as f64 / scored as f64
    );
}

/// Runs the search, counting the drafted and screened candidates per step.
fn counted_search(
    model: &Model,
    prompts: &[Vec<u32>],
    calib: &scalpel::eval::data::TokenSet,
    opts: &SpecSearchOptions,
) -> (
    scalpel::surgery::speculative_search::SpecSearchResult,
    std::collections::BTreeMap<usize, (usize, usize)>,
) {
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut counts = std::collections::BTreeMap::<usize, (usize, usize)>::new();
    let result = scalpel::surgery::speculative_search::search_draft(
        model,
        prompts,
        calib,
        opts,
        vec![],
        &cancel,
        |e| {
            match e {
                SpecSearchEvent::Matchness { step, .. } => counts.entry(*step).or_default().0 += 1,
                SpecSearchEvent::Candidate { step, .. } => counts.entry(*step).or_default().1 += 1,
                _ => {}
            }
            Ok(())
        },
    )
    .unwrap();
    (result, counts)
}

#[test]
fn the_prescreen_drafts_only_the_top_candidates_by_predicted_proxy() {
    use scalpel::surgery::speculative_search::{
        load_draft_search, predicted_proxy, save_draft_search, weight_fraction, MatchReference,
    };

    let (_dir, model, prompts, opts) = tiny_search_setup(2);
    let calib = common::random_set(&model, 11, 3, 20);
    let (result, counts) = counted_search(&model, &prompts, &calib, &opts);
    assert!(!result.steps.is_empty(), "the search chose nothing");
    let reference = MatchReference::compute(&model, &calib).unwrap();
    let mut plan = Plan::base();
    for s in &result.steps {
        let remaining = 2 * model.n_layers() - plan.skip.len();
        // Every candidate screened, two drafted.
        assert_eq!(counts[&s.step], (remaining, 2), "step {}", s.step);
        assert_eq!(s.candidates.len(), 2);
        assert_eq!(s.screened_out.len(), remaining - 2);
        let chosen = s.candidates.iter().find(|c| c.block == s.chosen).unwrap();
        let chosen_m = chosen.matchness.unwrap();
        // Ranked by the proxy the matchness predicts with the block's weights.
        let predicted = |block: BlockId, m: f64| {
            let mut trial = plan.clone();
            trial.skip.insert(block);
            predicted_proxy(m, 3, weight_fraction(&model, &trial), 1.0)
        };
        for out in &s.screened_out {
            for c in &s.candidates {
                assert!(
                    predicted(c.block, c.matchness.unwrap()) >= predicted(out.block, out.matchness),
                    "step {}",
                    s.step
                );
            }
        }
        // The recorded matchness is the plan's, computed from scratch.
        let mut trial = plan.clone();
        trial.skip.insert(s.chosen);
        assert_eq!(reference.matchness(&model, &trial).unwrap(), chosen_m);
        plan = trial;
    }
    // A last screened step that found no gain drafted two as well.
    if let Some((_, &(_, drafted))) = counts.range(result.steps.len() + 1..).next() {
        assert_eq!(drafted, 2);
    }
    // Saved and loaded, the steps keep their matchness.
    let dir = common::scratch_dir();
    let path = dir.path().join("screened.json");
    let settings = serde_json::json!({"prescreen": 2});
    save_draft_search(&model, &result.start, &result.steps, &settings, true, &path).unwrap();
    let steps = load_draft_search(&model, &settings, &path).unwrap();
    assert_eq!(
        steps[0].candidates[0].matchness,
        result.steps[0].candidates[0].matchness
    );
    assert_eq!(
        steps[0].screened_out.len(),
        result.steps[0].screened_out.len()
    );
    // A file from before the screen (no matchness, no prescreen setting)
    // loads, as a search that drafted every candidate.
    let mut old = serde_json::to_value(&result.steps).unwrap();
    for step in old.as_array_mut().unwrap() {
        step.as_object_mut().unwrap().remove("screened_out");
        for c in step["candidates"].as_array_mut().unwrap() {
            c.as_object_mut().unwrap().remove("matchness");
        }
    }
    let mut pf = model.load_plan(&path).unwrap();
    pf.metrics.insert("speculative_search_steps".into(), old);
    pf.provenance.insert(
        "speculative_search".into(),
        serde_json::json!({"settings": {"k": 3}, "complete": true}),
    );
    pf.save(&path).unwrap();
    let steps =
        load_draft_search(&model, &serde_json::json!({"k": 3, "prescreen": 0}), &path).unwrap();
    assert_eq!(steps.len(), result.steps.len());
    assert!(steps[0].candidates[0].matchness.is_none());
}

#[test]
fn the_screen_predicts_the_proxy_from_matchness_and_weights_read() {
    use scalpel::surgery::speculative_search::predicted_proxy;
    // Matchness 1: every drafted token kept, τ = k + 1.
    assert!((predicted_proxy(1.0, 4, 0.5, 1.0) - 5.0 / 3.0).abs() < 1e-12);
    // Matchness 0: only the verifier's token, τ = 1.
    assert!((predicted_proxy(0.0, 4, 0.5, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    // α = 0.5, k = 2: τ = 1 + 0.5 + 0.25.
    assert!((predicted_proxy(0.5, 2, 1.0, 1.0) - 1.75 / 3.0).abs() < 1e-12);
    // A block that saves more weights outranks one with slightly higher matchness.
    assert!(predicted_proxy(0.90, 4, 0.80, 1.0) > predicted_proxy(0.92, 4, 0.99, 1.0));
}

#[test]
fn patience_walks_past_a_step_without_gain_and_keeps_the_best_prefix() {
    use scalpel::surgery::speculative_search::{
        best_prefix, save_draft_search, search_draft, SpecSearchOptions,
    };
    use std::sync::atomic::AtomicBool;

    let (_dir, model, prompts, opts) = tiny_search_setup(0);
    let no_text = scalpel::eval::data::TokenSet {
        source: "none".into(),
        sequences: vec![],
    };
    let cancel = AtomicBool::new(false);
    let run = |o: &SpecSearchOptions| {
        search_draft(&model, &prompts, &no_text, o, vec![], &cancel, |_| Ok(())).unwrap()
    };
    let greedy = run(&opts);
    let patient = run(&SpecSearchOptions {
        max_blocks: 6,
        patience: 6,
        ..opts.clone()
    });
    // Patience walks to the block limit; the path starts as the greedy one.
    assert_eq!(patient.steps.len(), 6);
    for (a, b) in greedy.steps.iter().zip(&patient.steps) {
        assert_eq!(a.chosen, b.chosen);
    }
    let proxies: Vec<f64> = patient
        .steps
        .iter()
        .map(|s| s.score.proxy_speedup)
        .collect();
    let top = proxies.iter().copied().fold(f64::MIN, f64::max);
    let first_top = proxies.iter().position(|&p| p == top).unwrap() + 1;
    // The kept prefix ends at the path's first best step, if it beats the
    // full model as its own draft; otherwise the plan keeps nothing.
    let start = patient.start.proxy_speedup;
    let kept = best_prefix(start, &patient.steps);
    assert_eq!(kept, if top > start { first_top } else { 0 });
    assert_eq!(best_prefix(top, &patient.steps), 0);
    assert_eq!(best_prefix(f64::MIN, &patient.steps), first_top);
    assert_eq!(patient.plan.skip.len(), kept);
    assert!(kept >= greedy.steps.len());
    if let Some(last) = greedy.steps.last() {
        assert!(top >= last.score.proxy_speedup);
    }
    // The saved plan is the best prefix, every step recorded.
    let path = _dir.path().join("patient.json");
    let settings = serde_json::json!({"k": 3});
    save_draft_search(
        &model,
        &patient.start,
        &patient.steps,
        &settings,
        true,
        &path,
    )
    .unwrap();
    let pf = model.load_plan(&path).unwrap();
    assert_eq!(pf.plan.skip, patient.plan.skip);
    assert_eq!(
        pf.metrics["speculative_search_steps"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn a_prescreen_wider_than_the_candidates_drafts_them_all() {
    let (_dir, model, prompts, opts) = tiny_search_setup(100);
    let calib = common::random_set(&model, 11, 3, 20);
    let (wide, counts) = counted_search(&model, &prompts, &calib, &opts);
    let unscreened = SpecSearchOptions {
        prescreen: 0,
        ..opts
    };
    let (plain, plain_counts) = counted_search(&model, &prompts, &calib, &unscreened);
    assert_eq!(wide.plan.skip, plain.plan.skip);
    assert!(
        wide.steps.len() >= 2,
        "the search chose {:?}",
        wide.plan.skip
    );
    for (&step, &(screened, drafted)) in &counts {
        // Step s runs after s - 1 blocks are skipped.
        let remaining = 2 * model.n_layers() - (step - 1);
        assert_eq!((screened, drafted), (remaining, remaining), "step {step}");
        assert_eq!(plain_counts[&step], (0, remaining), "step {step}");
    }
    for s in &wide.steps {
        assert!(s.screened_out.is_empty());
        assert!(s.candidates.iter().all(|c| c.matchness.is_some()));
    }
}

#[test]
fn fitted_draft_scores_are_recorded_and_reproduced_from_the_saved_plan() {
    use scalpel::surgery::fit::FitOptions;
    use scalpel::surgery::speculative_search::{
        fit_draft, load_draft_search, save_fitted_draft, score_draft, DraftScore,
    };
    use std::sync::atomic::AtomicBool;

    let (_dir, model, prompts, opts) = tiny_search_setup(2);
    let calib = common::random_set(&model, 11, 3, 20);
    let (result, _) = counted_search(&model, &prompts, &calib, &opts);
    assert!(!result.plan.skip.is_empty());
    // Judged on its training text: this checks what is recorded, not how
    // well a fit generalises.
    let train = common::random_set(&model, 21, 6, 24);
    let fit_opts = FitOptions {
        lr: 1e-3,
        batch_size: 6,
        ..FitOptions::default()
    };
    let never = AtomicBool::new(false);
    let fitted = fit_draft(
        &model,
        &result.plan,
        &prompts,
        &opts,
        &train,
        &train,
        &fit_opts,
        &never,
        |_| {},
    )
    .unwrap()
    .expect("not cancelled");
    assert_eq!(fitted.plan.skip, result.plan.skip);
    assert!(
        fitted.best_epoch > 0,
        "the fit never improved: {:?}",
        fitted.history
    );
    let last = result.steps.last().unwrap().score;
    assert_eq!(fitted.unfitted.mean_accepted, last.mean_accepted);
    let dir = common::scratch_dir();
    let path = dir.path().join("fitted.json");
    let settings = serde_json::json!({"prescreen": 2});
    save_fitted_draft(
        &model,
        &result.start,
        &result.steps,
        &settings,
        &fitted,
        &path,
    )
    .unwrap();
    // Loaded back: scales (not all 1) in the plan, and drafting with it
    // gives the recorded fitted score.
    let pf = model.load_plan(&path).unwrap();
    assert_eq!(pf.plan.skip, result.plan.skip);
    let scales = pf.plan.scales.clone().expect("the fitted plan has scales");
    assert!(scales.iter().any(|s| !s.is_identity()), "{scales:?}");
    let recorded = &pf.metrics["speculative_fit"];
    let fitted_rec: DraftScore = serde_json::from_value(recorded["fitted"].clone()).unwrap();
    let unfitted_rec: DraftScore = serde_json::from_value(recorded["unfitted"].clone()).unwrap();
    let again = score_draft(&model, &pf.plan, &prompts, &opts).unwrap();
    assert_eq!(again.acceptance_rate, fitted_rec.acceptance_rate);
    assert_eq!(again.mean_accepted, fitted_rec.mean_accepted);
    assert_eq!(again.proxy_speedup, fitted_rec.proxy_speedup);
    let bare = score_draft(
        &model,
        &Plan::with_skips(pf.plan.skip.clone()),
        &prompts,
        &opts,
    )
    .unwrap();
    assert_eq!(bare.mean_accepted, unfitted_rec.mean_accepted);
    // The search steps are still there to resume from.
    assert_eq!(
        load_draft_search(&model, &settings, &path).unwrap().len(),
        result.steps.len()
    );
}

#[test]
fn the_draft_reads_the_plans_scales() {
    use scalpel::plan::LayerScales;
    use scalpel::surgery::speculative_search::score_draft;

    let (_dir, model, prompts, opts) = tiny_search_setup(0);
    let skip = Plan::with_skips([BlockId::attn(1)]);
    let mut scaled = skip.clone();
    let halved = LayerScales {
        b_att: 0.3,
        s_att: 1.0,
        b_mlp: 0.3,
        s_mlp: 1.0,
    };
    scaled.scales = Some(vec![halved; model.n_layers()]);
    let plain = score_draft(&model, &skip, &prompts, &opts).unwrap();
    let with_scales = score_draft(&model, &scaled, &prompts, &opts).unwrap();
    assert_ne!(plain.mean_accepted, with_scales.mean_accepted);
    // Scales are no skip: the full model with scales 1 drafts perfectly.
    let mut ones = Plan::base();
    ones.scales = Some(vec![LayerScales::IDENTITY; model.n_layers()]);
    assert_eq!(
        score_draft(&model, &ones, &prompts, &opts)
            .unwrap()
            .acceptance_rate,
        1.0
    );
}
