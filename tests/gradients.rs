//! The differentiable path carries gradients to the Hopscotch scalars, and
//! they agree with finite differences (candle's fused ops drop gradients
//! silently, so this is what proves the fit path is sound).

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use scalpel::model::{LocalModel, Model, Resolved, RunOptions, Scales};
use scalpel::plan::{BlockId, Plan};

fn loss(model: &Model, ids: &[u32], plan: &Plan, scales: &[Tensor]) -> Tensor {
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    let t = &model.transformer;
    let h = t
        .forward_hidden(
            &input,
            0,
            None,
            plan,
            Scales::Tensors(scales),
            RunOptions::DIFFERENTIABLE,
        )
        .unwrap();
    let logits = t
        .logits(&h.squeeze(0).unwrap(), RunOptions::DIFFERENTIABLE)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    logp.gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

#[test]
fn scale_gradients_match_finite_differences() {
    for name in ["llama", "qwen2"] {
        let dir = common::tiny_dir(name);
        let resolved = Resolved {
            local: LocalModel::HfDir(dir),
            origin: "test".into(),
        };
        // f64 so that central differences are accurate to ~1e-9.
        let model = Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap();
        let r = common::read_json(common::tiny_dir(name).join("reference.json"));
        let ids: Vec<u32> = common::json_ints::<u32>(&r["token_ids"]);
        let plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(3)]);
        let n = model.n_layers();
        // Non-trivial starting point so every path matters.
        let init: Vec<[f64; 4]> = (0..n)
            .map(|i| [0.9 + 0.05 * i as f64, 1.1, 0.8, 1.0 - 0.03 * i as f64])
            .collect();
        let vars: Vec<Var> = init
            .iter()
            .map(|s| Var::new(&s[..], &Device::Cpu).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss(&model, &ids, &plan, &tensors).backward().unwrap();

        let h = 1e-5;
        let mut nonzero = 0;
        let (mut worst_rel, mut worst_abs) = (0f64, 0f64);
        #[allow(clippy::needless_range_loop)] // `layer` also selects the perturbed scale
        for layer in 0..n {
            let g: Vec<f64> = grads
                .get(&tensors[layer])
                .expect("a gradient for every layer")
                .to_vec1()
                .unwrap();
            for k in 0..4 {
                let at = |delta: f64| {
                    let ts: Vec<Tensor> = (0..n)
                        .map(|l| {
                            let mut s = init[l];
                            if l == layer {
                                s[k] += delta;
                            }
                            Tensor::new(&s[..], &Device::Cpu).unwrap()
                        })
                        .collect();
                    loss(&model, &ids, &plan, &ts).to_scalar::<f64>().unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let skipped =
                    (k == 0 && plan.skips_attn(layer)) || (k == 2 && plan.skips_mlp(layer));
                if skipped {
                    // A skipped block's output scale has nothing to scale.
                    assert_eq!(g[k], 0.0, "{name} layer {layer} scale {k}");
                    assert!(fd.abs() < 1e-9);
                    continue;
                }
                // The final RMSNorm is scale-invariant, so the last layer's
                // s_mlp has a tiny true gradient; compare absolutely there.
                if fd.abs() > 1e-4 {
                    worst_rel = worst_rel.max((g[k] - fd).abs() / fd.abs());
                } else {
                    worst_abs = worst_abs.max((g[k] - fd).abs());
                }
                // Measured: relative error at most 2.3e-8 (llama), absolute
                // error at most 4.5e-11 where |fd| <= 1e-4.
                let tol = 1e-7 * fd.abs() + 2e-10;
                assert!(
                    (g[k] - fd).abs() < tol,
                    "{name} layer {layer} scale {k}: autograd {} vs finite difference {fd}",
                    g[k]
                );
                if fd.abs() > 1e-4 {
                    nonzero += 1;
                }
            }
        }
        eprintln!(
            "{name}: autograd vs finite difference: max relative error {worst_rel:e} \
             (|fd| > 1e-4), max absolute error {worst_abs:e} (smaller gradients)"
        );
        // Most scalars must matter: a silently dropped gradient reads as 0.
        assert!(
            nonzero >= 4 * n - 4,
            "{name}: only {nonzero} non-trivial gradients"
        );
    }
}
