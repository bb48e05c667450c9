//! Plans shared by the export tests (built directly, with hand-set scales).
#![allow(dead_code)]

use scalpel::plan::{BlockId, LayerScales, Plan};

/// A 4-block plan (attention-only, MLP-only and a whole layer) with
/// hand-set, non-trivial scales on every layer.
pub fn plan_with_scales(n_layers: usize) -> Plan {
    let mut plan = Plan::with_skips([
        BlockId::attn(15),
        BlockId::mlp(20),
        BlockId::attn(25),
        BlockId::mlp(25),
    ]);
    plan.scales = Some(
        (0..n_layers)
            .map(|i| {
                let x = i as f32;
                LayerScales {
                    b_att: 1.0 + 0.05 * (x * 0.7).sin(),
                    s_att: 1.0 + 0.03 * (x * 1.3).cos(),
                    b_mlp: 0.95 + 0.04 * (x * 0.4).cos(),
                    s_mlp: 1.0 - 0.02 * (x * 0.9).sin(),
                }
            })
            .collect(),
    );
    plan
}

/// The same plan with the residual (s) scales at 1: only b terms, which
/// fold with no RMSNorm-eps effect at all.
pub fn plan_with_b_scales(n_layers: usize) -> Plan {
    let mut plan = plan_with_scales(n_layers);
    for s in plan.scales.iter_mut().flatten() {
        s.s_att = 1.0;
        s.s_mlp = 1.0;
    }
    plan
}
