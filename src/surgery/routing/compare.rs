//! Routing next to static skips at the same *realised* compute: a routed
//! plan's executed fraction is measured on each evaluation set, the static
//! plans with the two nearest numbers of skipped attention blocks are
//! measured on the same sets, and each static method's metrics are
//! interpolated (linearly in executed fraction) to the routed plan's.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use serde::Serialize;

use super::measure::{measure_set, Routed, RoutedReport};
use crate::model::Model;
use crate::surgery::compare::{per_set, CompareRow, EvalSet};
use crate::surgery::objective::LossKind;

/// A routed plan measured on every evaluation set, by set name.
#[derive(Debug, Clone, Serialize)]
pub struct RoutedRow {
    pub plan: String,
    pub reports: BTreeMap<String, RoutedReport>,
}

pub fn measure_routed(
    model: &Model,
    name: &str,
    routed: &Routed,
    evals: &[EvalSet],
    cancel: &AtomicBool,
) -> Result<RoutedRow> {
    let reports = per_set(evals, |e| {
        measure_set(model, e.data, &e.base, routed, cancel)
    })?;
    Ok(RoutedRow {
        plan: name.into(),
        reports,
    })
}

/// Executed fraction of a static plan that skips `k` attention blocks of
/// `n_layers` layers (blocks run per token over all 2·layers blocks).
pub fn static_executed(k: usize, n_layers: usize) -> f64 {
    1.0 - k as f64 / (2 * n_layers) as f64
}

/// Skipped attention blocks equivalent to an executed fraction.
fn skipped_blocks(executed: f64, n_layers: usize) -> f64 {
    (1.0 - executed) * (2 * n_layers) as f64
}

/// The static block counts whose executed fractions bracket `executed`,
/// clamped to 1..=n_layers (static Hopscotch skips attention blocks only).
/// One count when `executed` falls on a static plan's.
pub fn bracketing_ks(executed: f64, n_layers: usize) -> Vec<usize> {
    let s = skipped_blocks(executed, n_layers).clamp(1.0, n_layers as f64);
    // Measured fractions are ratios of counts: snap what rounding moved.
    let s = if (s - s.round()).abs() < 1e-9 {
        s.round()
    } else {
        s
    };
    let (lo, hi) = (s.floor() as usize, s.ceil() as usize);
    if lo == hi {
        vec![lo]
    } else {
        vec![lo, hi]
    }
}

/// One static method's metrics at a routed plan's executed fraction.
#[derive(Debug, Clone, Serialize)]
pub struct AtEqualCompute {
    pub plan: String,
    pub set: String,
    pub method: String,
    pub fit: Option<LossKind>,
    /// The routed plan's measured executed fraction on this set.
    pub executed: f64,
    /// The static block counts the value is interpolated between (one: exact).
    pub between_k: Vec<usize>,
    /// False when the executed fraction lies outside the static plans'
    /// range and the nearest one stands in.
    pub interpolated_within_range: bool,
    pub static_kl: f64,
    pub static_perplexity: f64,
    pub static_top1: f64,
    pub routed_kl: f64,
    /// routed KL / static KL − 1 (−0.2 = 20% lower).
    pub kl_change: f64,
}

/// Interpolates `method` (with `fit`) from `rows` to each routed plan's
/// executed fraction on each set. Pairs without rows at the bracketing
/// block counts are left out.
pub fn at_equal_compute(
    routed: &[RoutedRow],
    rows: &[CompareRow],
    method: &str,
    fit: Option<LossKind>,
    n_layers: usize,
) -> Vec<AtEqualCompute> {
    let find = |k: usize| {
        rows.iter()
            .find(|r| r.k == k && r.method == method && r.fit == fit)
    };
    let mut out = Vec::new();
    for r in routed {
        for (set, rep) in &r.reports {
            let executed = rep.executed_fraction;
            let ks = bracketing_ks(executed, n_layers);
            let Some(found) = ks.iter().map(|&k| find(k)).collect::<Option<Vec<_>>>() else {
                continue;
            };
            let Some(reports) = found
                .iter()
                .map(|row| row.reports.get(set))
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let s = skipped_blocks(executed, n_layers);
            let t = if ks.len() == 2 { s - ks[0] as f64 } else { 0.0 };
            let lerp = |f: fn(&crate::surgery::objective::SetReport) -> f64| {
                let a = f(reports[0]);
                let b = f(reports.last().unwrap());
                a + t * (b - a)
            };
            let static_kl = lerp(|r| r.kl_to_base);
            out.push(AtEqualCompute {
                plan: r.plan.clone(),
                set: set.clone(),
                method: method.into(),
                fit,
                executed,
                between_k: ks,
                interpolated_within_range: (1.0..=n_layers as f64).contains(&s),
                static_kl,
                static_perplexity: lerp(|r| r.perplexity),
                static_top1: lerp(|r| r.top1_agreement),
                routed_kl: rep.kl_to_base,
                kl_change: rep.kl_to_base / static_kl - 1.0,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BlockId;
    use crate::surgery::objective::SetReport;

    #[test]
    fn bracketing_block_counts() {
        // 30 layers: 60 blocks. 0.9 executed = 6 blocks skipped exactly.
        assert_eq!(bracketing_ks(0.9, 30), vec![6]);
        assert_eq!(bracketing_ks(0.926, 30), vec![4, 5]);
        assert_eq!(bracketing_ks(1.0, 30), vec![1], "clamped to one block");
        assert_eq!(
            bracketing_ks(0.2, 30),
            vec![30],
            "at most every attention block"
        );
        assert_eq!(bracketing_ks(static_executed(7, 30), 30), vec![7]);
    }

    fn row(k: usize, kl: f64) -> CompareRow {
        let rep = SetReport {
            perplexity: 10.0 + kl,
            kl_to_base: kl,
            top1_agreement: 1.0 - kl,
            scored_tokens: 100,
        };
        CompareRow {
            k,
            method: "hopscotch".into(),
            fit: Some(LossKind::Kl),
            blocks: (0..k).map(BlockId::attn).collect(),
            reports: BTreeMap::from([("heldout".to_string(), rep)]),
        }
    }

    fn routed(executed: f64, kl: f64) -> RoutedRow {
        let rep = RoutedReport {
            perplexity: 0.0,
            mean_nll: 0.0,
            kl_to_base: kl,
            top1_agreement: 0.0,
            scored_tokens: 100,
            executed_fraction: executed,
            routed_share: 0.0,
            per_block: vec![],
            seconds: 0.0,
        };
        RoutedRow {
            plan: "r.json".into(),
            reports: BTreeMap::from([("heldout".to_string(), rep)]),
        }
    }

    #[test]
    fn interpolates_linearly_in_executed_fraction() {
        let rows = [row(2, 0.1), row(3, 0.3)];
        // 10 layers: 2.25 blocks skipped = executed 0.8875.
        let eq = at_equal_compute(
            &[routed(0.8875, 0.12)],
            &rows,
            "hopscotch",
            Some(LossKind::Kl),
            10,
        );
        assert_eq!(eq.len(), 1);
        let e = &eq[0];
        assert_eq!(e.between_k, vec![2, 3]);
        assert!((e.static_kl - 0.15).abs() < 1e-12, "{}", e.static_kl);
        assert!((e.static_perplexity - 10.15).abs() < 1e-12);
        assert!((e.kl_change - (0.12 / 0.15 - 1.0)).abs() < 1e-12);
        assert!(e.interpolated_within_range);
        // The unfitted method has no rows: nothing to compare with.
        assert!(at_equal_compute(&[routed(0.8875, 0.12)], &rows, "hopscotch", None, 10).is_empty());
        // Executing more than any static plan: the one-block plan stands in.
        let eq = at_equal_compute(
            &[routed(0.99, 0.01)],
            &[row(1, 0.05)],
            "hopscotch",
            Some(LossKind::Kl),
            10,
        );
        assert_eq!(eq[0].between_k, vec![1]);
        assert!(!eq[0].interpolated_within_range);
        assert_eq!(eq[0].static_kl, 0.05);
    }
}
