//! Speculative sampling draws from the full model's distribution: many
//! seeded runs of a few tokens, binned over the token tree, against the
//! full model's exact probabilities (a chi-square test). Plain sampling
//! passes the same test (the control), and a wrong acceptance rule (keep
//! every drafted token) fails it, so the test can fail.

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use scalpel::eval::generate::{generate, GenOptions, Sampler};
use scalpel::eval::speculative::{
    speculate, AcceptRule, DraftLen, Drafter, SpecOptions, SpecReport,
};
use scalpel::model::{Model, Pass, RunOptions};
use scalpel::plan::{BlockId, Plan};

const TEMPERATURE: f64 = 0.5;
const DRAWS: u64 = 10_000;
/// Bins whose expected count is below this are merged into one.
const MIN_EXPECTED: f64 = 5.0;
/// Upper 0.1% point of the standard normal: the test's significance level
/// is 0.001 (a correct sampler fails it once in a thousand seeds' sets).
const Z_999: f64 = 3.090;

/// The full model's sampling distribution after `ids`.
fn full_probs(model: &Model, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::new(ids, model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let base = Plan::base();
    let h = model
        .transformer
        .forward_hidden(&input, &mut Pass::plan(&base, RunOptions::FAST))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let last = h.narrow(0, ids.len() - 1, 1).unwrap();
    let logits = model.transformer.logits(&last, RunOptions::FAST).unwrap();
    Sampler::new(0, TEMPERATURE)
        .probs(&logits)
        .unwrap()
        .remove(0)
}

/// Bins over sequences of `len` tokens: a leaf per sequence likely enough,
/// an "other" bin per expanded prefix for its rare continuations, and one
/// shared bin for every bin expected fewer than MIN_EXPECTED times.
struct Bins {
    expanded: HashMap<Vec<u32>, ()>,
    index: HashMap<Vec<u32>, usize>,
    /// Index of the "other" bin under each expanded prefix.
    other: HashMap<Vec<u32>, usize>,
    expected: Vec<f64>,
}

impl Bins {
    fn build(model: &Model, prompt: &[u32], len: usize, n: f64) -> Self {
        let mut bins = Bins {
            expanded: HashMap::new(),
            index: HashMap::new(),
            other: HashMap::new(),
            expected: vec![0.0], // bin 0: the merged small bins
        };
        bins.expand(model, prompt, &[], 1.0, len, n);
        bins
    }

    fn add(&mut self, expected: f64) -> usize {
        if expected < MIN_EXPECTED {
            self.expected[0] += expected;
            0
        } else {
            self.expected.push(expected);
            self.expected.len() - 1
        }
    }

    fn expand(
        &mut self,
        model: &Model,
        prompt: &[u32],
        prefix: &[u32],
        mass: f64,
        len: usize,
        n: f64,
    ) {
        if prefix.len() == len {
            let i = self.add(mass * n);
            self.index.insert(prefix.to_vec(), i);
            return;
        }
        self.expanded.insert(prefix.to_vec(), ());
        let ids: Vec<u32> = prompt.iter().chain(prefix).copied().collect();
        let p = full_probs(model, &ids);
        let mut rest = 0.0;
        for (tok, &pt) in p.iter().enumerate() {
            let m = mass * pt as f64;
            if m * n >= MIN_EXPECTED {
                let mut child = prefix.to_vec();
                child.push(tok as u32);
                self.expand(model, prompt, &child, m, len, n);
            } else {
                rest += m;
            }
        }
        let i = self.add(rest * n);
        self.other.insert(prefix.to_vec(), i);
    }

    fn bin_of(&self, seq: &[u32]) -> usize {
        for l in 0..seq.len() {
            if !self.expanded.contains_key(&seq[..l + 1]) && !self.index.contains_key(&seq[..l + 1])
            {
                return self.other[&seq[..l]];
            }
        }
        self.index[seq]
    }

    /// The chi-square statistic of `samples` and the critical value at
    /// the 0.001 level (Wilson–Hilferty approximation).
    fn chi_square(&self, samples: &[Vec<u32>]) -> (f64, f64, usize) {
        let mut observed = vec![0.0; self.expected.len()];
        for s in samples {
            observed[self.bin_of(s)] += 1.0;
        }
        // Bin 0 may be empty in expectation (every bin large enough).
        let used: Vec<usize> = (0..self.expected.len())
            .filter(|&i| self.expected[i] > 0.0)
            .collect();
        let stat: f64 = used
            .iter()
            .map(|&i| (observed[i] - self.expected[i]).powi(2) / self.expected[i])
            .sum();
        let df = (used.len() - 1) as f64;
        let a = 2.0 / (9.0 * df);
        let critical = df * (1.0 - a + Z_999 * a.sqrt()).powi(3);
        (stat, critical, used.len() - 1)
    }
}

fn spec_opts(n: usize, k: usize, seed: u64, accept: AcceptRule) -> SpecOptions {
    SpecOptions {
        max_new_tokens: n,
        draft_len: DraftLen::Fixed(k),
        stop_at_eos: false,
        run: RunOptions::FAST,
        temperature: TEMPERATURE,
        seed,
        accept,
    }
}

#[test]
fn speculative_sampling_has_the_full_models_distribution() {
    let model = common::load_tiny("llama");
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let prompt = &ids[..4];
    // A draft far from the full model: three of four attention blocks and
    // two MLP blocks skipped.
    let draft = Plan::with_skips([
        BlockId::attn(0),
        BlockId::attn(1),
        BlockId::attn(3),
        BlockId::mlp(1),
        BlockId::mlp(2),
    ]);
    // 3 tokens: the prefill's, then the first verify's. k = 1 covers the
    // bonus token (both tokens after the first from one verify), k = 2 a
    // second drafted position (accepted after an accepted one, or the
    // residual draw there).
    let len = 3;
    let bins = Bins::build(&model, prompt, len, DRAWS as f64);

    let plain: Vec<Vec<u32>> = (0..DRAWS)
        .map(|seed| {
            let opts = GenOptions {
                max_new_tokens: len,
                temperature: TEMPERATURE,
                seed,
                stop_at_eos: false,
                run: RunOptions::FAST,
            };
            generate(&model, prompt, &Plan::base(), opts, |_| Ok(()))
                .unwrap()
                .new_tokens
        })
        .collect();
    let run = |k: usize, accept: AcceptRule| -> (Vec<Vec<u32>>, f64) {
        let reports: Vec<SpecReport> = (0..DRAWS)
            .map(|seed| {
                speculate(
                    &model,
                    prompt,
                    Drafter::SelfPlan(&draft),
                    spec_opts(len, k, seed, accept),
                )
                .unwrap()
            })
            .collect();
        let (acc, dra) = reports
            .iter()
            .fold((0, 0), |(a, d), r| (a + r.accepted, d + r.drafted));
        (
            reports.into_iter().map(|r| r.new_tokens).collect(),
            acc as f64 / dra as f64,
        )
    };

    let (stat, crit, df) = bins.chi_square(&plain);
    eprintln!("plain sampling: chi2 {stat:.1}, df {df}, critical (p=0.001) {crit:.1}");
    assert!(df >= 20, "too few bins ({df}) for a meaningful test");
    assert!(
        stat < crit,
        "plain sampling fails: chi2 {stat:.1} ≥ {crit:.1}"
    );

    for k in [1, 2] {
        let (samples, alpha) = run(k, AcceptRule::SpeculativeSampling);
        let (stat, crit, df) = bins.chi_square(&samples);
        eprintln!("speculative k {k}: α {alpha:.3}, chi2 {stat:.1}, df {df}, critical {crit:.1}");
        // Some drafts rejected and some kept (measured α: 0.057 at k 1, 0.039 at
        // k 2), so both branches ran.
        assert!(alpha > 0.02 && alpha < 0.98, "α {alpha}");
        assert!(stat < crit, "speculative k {k}: chi2 {stat:.1} ≥ {crit:.1}");
    }

    let (samples, _) = run(2, AcceptRule::AcceptAll);
    let (stat, crit, df) = bins.chi_square(&samples);
    eprintln!("accept-all (wrong): chi2 {stat:.1}, df {df}, critical {crit:.1}");
    assert!(
        stat > crit,
        "the wrong rule passed: chi2 {stat:.1} < {crit:.1}"
    );
}
