//! The differentiable path carries gradients to the Hopscotch scalars, and
//! they agree with finite differences (candle's fused ops drop gradients
//! silently, so this is what proves the fit path is sound).

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use scalpel::model::{LocalModel, Model, Pass, Probe, Resolved, RunOptions, TensorScales};
use scalpel::plan::{BlockId, Plan};

fn loss(model: &Model, ids: &[u32], plan: &Plan, scales: &[Tensor]) -> Tensor {
    let params = TensorScales(scales);
    let mut pass = Pass::plan(plan, RunOptions::DIFFERENTIABLE).with_params(&params);
    loss_of(model, ids, &mut pass)
}

/// Mean next-token cross-entropy of `ids` through `pass` (differentiable).
fn loss_of(model: &Model, ids: &[u32], pass: &mut Pass) -> Tensor {
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    let t = &model.transformer;
    let h = t.forward_hidden(&input, pass).unwrap();
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

/// Multiplies layer 1's per-head attention context by a gate of ones.
struct HeadGate {
    gate: Tensor,
}

impl Probe for HeadGate {
    fn wants_head_context(&self, layer: usize) -> bool {
        layer == 1
    }
    fn head_context(
        &mut self,
        _layer: usize,
        _heads: &[u32],
        ctx: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = ctx.dim(2)?;
        ctx.broadcast_mul(&self.gate.reshape((1, 1, n, 1))?)
            .map(Some)
    }
}

#[test]
fn a_head_gate_on_the_probed_context_gets_finite_difference_gradients() {
    // The gradient of the loss w.r.t. a per-head gate of ones is
    // Σ ∂L/∂ctx·ctx over that head: ShadowLLM's plainact score.
    let dir = common::tiny_dir("llama");
    let resolved = Resolved {
        local: LocalModel::HfDir(dir),
        origin: "test".into(),
    };
    let model = Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap();
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids: Vec<u32> = common::json_ints::<u32>(&r["token_ids"]);
    let plan = Plan::base();
    let n_heads = model.cfg().n_heads;
    let gate_loss = |gate: &Tensor| -> Tensor {
        let mut probe = HeadGate { gate: gate.clone() };
        let mut pass = Pass::plan(&plan, RunOptions::DIFFERENTIABLE).with_probe(&mut probe);
        loss_of(&model, &ids, &mut pass)
    };
    let gate = Var::new(vec![1f64; n_heads].as_slice(), &Device::Cpu).unwrap();
    let grads = gate_loss(gate.as_tensor()).backward().unwrap();
    let g: Vec<f64> = grads.get(gate.as_tensor()).unwrap().to_vec1().unwrap();
    let h = 1e-5;
    for (head, &gh) in g.iter().enumerate() {
        let at = |delta: f64| {
            let mut v = vec![1f64; n_heads];
            v[head] += delta;
            let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
            gate_loss(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(fd.abs() > 1e-6, "head {head}: the gate must matter");
        assert!(
            (gh - fd).abs() < 1e-4 * fd.abs() + 1e-9,
            "head {head}: autograd {gh} vs finite difference {fd}"
        );
    }
}
