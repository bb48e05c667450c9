//! Folds a plan's per-layer Hopscotch scalars into the weights, so a plain
//! (scale-free) decoder computes the same function.
//!
//! Layer i computes `x1 = b_att·A(n(x)) + s_att·x` and
//! `out = b_mlp·M(n(x1)) + s_mlp·x1`. Track the residual stream divided by
//! its cumulative scale `C` (the product of all s terms so far): `y = x / C`.
//! Then `y1 = (b_att / (C·s_att))·A(n(y)) + y`, because RMSNorm gives
//! `n(y) = n(x)` for any positive C (up to its eps). So the b terms and the
//! cumulative s terms fold into `o_proj` / `down_proj`, and the final norm
//! removes the last `C`. Negative or zero s would flip or erase the stream,
//! which RMSNorm does not undo, so such plans are refused.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::model::lowrank;
use crate::model::transformer::{Layer, Linear, Transformer};
use crate::plan::Plan;

/// What each layer's output projections are multiplied by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FoldFactors {
    pub o_proj: f64,
    pub down_proj: f64,
}

/// The per-layer factors for `plan` on an `n_layers` model.
pub fn fold_factors(plan: &Plan, n_layers: usize) -> Result<Vec<FoldFactors>> {
    plan.validate(n_layers)?;
    let mut cumulative = 1.0f64;
    let mut out = Vec::with_capacity(n_layers);
    for layer in 0..n_layers {
        let s = plan.scales_for(layer);
        for (name, v) in [("s_att", s.s_att), ("s_mlp", s.s_mlp)] {
            if v <= 0.0 {
                bail!(
                    "layer {layer} has {name} = {v}; only positive residual scales fold exactly into \
                     the weights (RMSNorm undoes a positive factor, not a sign flip or zero)"
                );
            }
        }
        cumulative *= f64::from(s.s_att);
        let o_proj = f64::from(s.b_att) / cumulative;
        cumulative *= f64::from(s.s_mlp);
        let down_proj = f64::from(s.b_mlp) / cumulative;
        if !(o_proj.is_finite() && down_proj.is_finite() && cumulative.is_normal()) {
            bail!("the scales up to layer {layer} overflow when folded; refit the plan");
        }
        out.push(FoldFactors { o_proj, down_proj });
    }
    Ok(out)
}

/// The same plan without scales: what runs on the folded weights.
pub fn unscaled(plan: &Plan) -> Plan {
    Plan {
        skip: plan.skip.clone(),
        replace: plan.replace.clone(),
        ..Plan::default()
    }
}

/// A copy of `t` with `plan`'s scales folded in and its corrections merged
/// (skipped blocks untouched). Run it with `unscaled(plan)`.
pub fn fold_transformer(t: &Transformer, plan: &Plan) -> Result<Transformer> {
    let factors = fold_factors(plan, t.n_layers())?;
    let layers = t
        .layers
        .iter()
        .zip(&factors)
        .enumerate()
        .map(|(i, (layer, f))| fold_layer(&merge_corrections(layer, i, plan)?, f))
        .collect::<Result<Vec<Layer>>>()?;
    Ok(Transformer::with_embeddings(
        t.cfg.clone(),
        t.embed.clone(),
        t.embed_quantized.clone(),
        layers,
        t.norm.clone(),
        t.lm_head.clone(),
    )?)
}

fn fold_layer(layer: &Layer, f: &FoldFactors) -> Result<Layer> {
    let mut out = layer.clone();
    if let Some(g) = out.gemma.as_mut() {
        // Gemma's post-norms would undo a factor on o_proj / down_proj; the
        // norms' own weights carry it instead (their output is linear in them).
        g.post_attn_norm = g.post_attn_norm.affine(f.o_proj, 0.0)?;
        g.post_mlp_norm = g.post_mlp_norm.affine(f.down_proj, 0.0)?;
        return Ok(out);
    }
    out.attn.o = scale_linear(&layer.attn.o, f.o_proj)?;
    out.mlp.down = scale_linear(&layer.mlp.down, f.down_proj)?;
    Ok(out)
}

/// `layer` with a healed plan's corrections merged, `W + B·A` (exact up to
/// f32 rounding); the quantized copies of those projections are dropped.
pub fn merge_corrections(layer: &Layer, i: usize, plan: &Plan) -> Result<Layer> {
    let Some(mut out) = lowrank::corrected_layer(layer, i, plan)? else {
        return Ok(layer.clone());
    };
    let (a, m) = (&mut out.attn, &mut out.mlp);
    for l in [
        &mut a.q,
        &mut a.k,
        &mut a.v,
        &mut a.o,
        &mut m.gate,
        &mut m.up,
        &mut m.down,
    ] {
        if let Some(c) = l.lora.take() {
            let w = l.dense_weight()?;
            let merged = (w.to_dtype(DType::F32)? + c.delta()?)?.to_dtype(w.dtype())?;
            *l = Linear::dense(merged, l.bias.clone());
        }
    }
    Ok(out)
}

/// Scales a linear map; the quantized copy no longer matches, so it is dropped.
fn scale_linear(l: &Linear, factor: f64) -> Result<Linear> {
    if factor == 1.0 {
        return Ok(l.clone());
    }
    let scale = |t: &Tensor| t.affine(factor, 0.0);
    Ok(Linear::dense(
        scale(l.dense_weight()?.as_ref())?,
        l.bias.as_ref().map(scale).transpose()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::LayerScales;

    #[test]
    fn factors_follow_the_cumulative_residual_scale() {
        let mut plan = Plan::base();
        plan.scales = Some(vec![
            LayerScales {
                b_att: 2.0,
                s_att: 0.5,
                b_mlp: 1.0,
                s_mlp: 4.0,
            },
            LayerScales {
                b_att: 1.0,
                s_att: 1.0,
                b_mlp: 3.0,
                s_mlp: 0.5,
            },
        ]);
        let f = fold_factors(&plan, 2).unwrap();
        assert_eq!(f[0].o_proj, 4.0); // 2 / 0.5
        assert_eq!(f[0].down_proj, 0.5); // 1 / (0.5·4)
        assert_eq!(f[1].o_proj, 0.5); // 1 / 2
        assert_eq!(f[1].down_proj, 3.0); // 3 / (2·0.5)
    }

    #[test]
    fn non_positive_residual_scales_are_refused() {
        let mut plan = Plan::base();
        plan.scales = Some(vec![LayerScales {
            s_mlp: -1.0,
            ..Default::default()
        }]);
        let err = fold_factors(&plan, 1).unwrap_err().to_string();
        assert!(
            err.contains("s_mlp = -1") && err.contains("positive"),
            "{err}"
        );
    }
}
