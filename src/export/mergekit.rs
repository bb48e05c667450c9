//! A mergekit `passthrough` recipe for a plan, when one can express it:
//! mergekit drops only whole layers (`layer_range` slices) and scales whole
//! tensors by a scalar, so a plan qualifies when every skipped layer has
//! both blocks skipped. The scales fold into per-layer `o_proj` /
//! `down_proj` factors exactly as for the other formats.

use std::fmt::Write as _;

use anyhow::{bail, Result};

use super::fold::fold_factors;
use crate::plan::Plan;

/// The YAML text, or the reason the plan cannot be written as one.
/// `base_model` is what mergekit should load (a hub id or a local folder).
pub fn recipe(plan: &Plan, n_layers: usize, base_model: &str) -> Result<String> {
    let partial: Vec<String> = (0..n_layers)
        .filter(|&i| plan.skips_attn(i) != plan.skips_mlp(i))
        .map(|i| {
            if plan.skips_attn(i) {
                format!("attn.{i}")
            } else {
                format!("mlp.{i}")
            }
        })
        .collect();
    if !partial.is_empty() {
        bail!(
            "mergekit can only drop whole layers, and this plan skips single blocks ({}); \
             zeroing them with a scale of 0 would keep their full cost. Export it as \
             --format decilm or --format gguf instead",
            partial.join(", ")
        );
    }
    let factors = fold_factors(plan, n_layers)?;
    let kept: Vec<usize> = (0..n_layers).filter(|&i| !plan.skips_attn(i)).collect();
    if kept.is_empty() {
        bail!("the plan skips every layer; there is nothing to export");
    }
    let quoted = serde_json::to_string(base_model)?;
    let mut y = String::new();
    writeln!(
        y,
        "# mergekit passthrough recipe written by scalpel {}",
        env!("CARGO_PKG_VERSION")
    )?;
    writeln!(y, "# plan: {}", plan.describe())?;
    writeln!(y, "# run: mergekit-yaml this.yaml OUT_DIR")?;
    writeln!(y, "merge_method: passthrough")?;
    writeln!(y, "dtype: float32")?;
    writeln!(y, "slices:")?;
    if !plan.has_scales() {
        // Runs of consecutive kept layers become one slice each.
        let mut start = kept[0];
        let mut prev = kept[0];
        for &i in kept.iter().skip(1).chain(std::iter::once(&usize::MAX)) {
            if i != prev + 1 {
                writeln!(y, "  - sources:")?;
                writeln!(y, "      - model: {quoted}")?;
                writeln!(y, "        layer_range: [{start}, {}]", prev + 1)?;
                start = i;
            }
            prev = i;
        }
        return Ok(y);
    }
    // With scales, each layer is its own slice with its own factors.
    for &i in &kept {
        let f = factors[i];
        writeln!(y, "  - sources:")?;
        writeln!(y, "      - model: {quoted}")?;
        writeln!(y, "        layer_range: [{i}, {}]", i + 1)?;
        writeln!(y, "    parameters:")?;
        writeln!(y, "      scale:")?;
        writeln!(y, "        - filter: o_proj")?;
        writeln!(y, "          value: {}", f.o_proj)?;
        writeln!(y, "        - filter: down_proj")?;
        writeln!(y, "          value: {}", f.down_proj)?;
        writeln!(y, "        - value: 1.0")?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BlockId, LayerScales};

    #[test]
    fn whole_layer_skips_become_slices() {
        let plan = Plan::with_skips([
            BlockId::attn(2),
            BlockId::mlp(2),
            BlockId::attn(5),
            BlockId::mlp(5),
        ]);
        let y = recipe(&plan, 8, "org/model").unwrap();
        assert!(y.contains("layer_range: [0, 2]"), "{y}");
        assert!(y.contains("layer_range: [3, 5]"), "{y}");
        assert!(y.contains("layer_range: [6, 8]"), "{y}");
        assert!(y.contains("model: \"org/model\""), "{y}");
    }

    #[test]
    fn single_block_skips_are_refused_with_the_reason() {
        let plan = Plan::with_skips([BlockId::attn(3)]);
        let err = recipe(&plan, 8, "m").unwrap_err().to_string();
        assert!(
            err.contains("whole layers") && err.contains("attn.3"),
            "{err}"
        );
    }

    #[test]
    fn scales_become_per_layer_factors() {
        let mut plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(1)]);
        let mut s = vec![LayerScales::IDENTITY; 3];
        s[0].b_att = 0.5;
        plan.scales = Some(s);
        let y = recipe(&plan, 3, "m").unwrap();
        assert!(
            y.contains("layer_range: [0, 1]") && y.contains("value: 0.5"),
            "{y}"
        );
        assert!(!y.contains("layer_range: [1, 2]"), "{y}");
    }
}
