//! Which cache slots an evicting policy keeps, as pure functions of slot
//! counts and scores (slots are in position order). Each returns the kept
//! slots, increasing, or every slot when they fit the budget.

/// The most recent `budget` slots of `n`.
pub fn window_keep(n: usize, budget: usize) -> Vec<usize> {
    (n.saturating_sub(budget)..n).collect()
}

/// StreamingLLM: the first `sinks` slots and the most recent
/// `budget - sinks`.
pub fn streaming_keep(n: usize, budget: usize, sinks: usize) -> Vec<usize> {
    if n <= budget {
        return (0..n).collect();
    }
    let recent = budget - sinks.min(budget);
    (0..sinks.min(budget)).chain(n - recent..n).collect()
}

/// H2O: the most recent `round(budget · recent_share)` slots plus the
/// heavy hitters, the slots before them with the largest accumulated
/// attention `scores`, up to `budget` in all.
pub fn h2o_keep(scores: &[f32], budget: usize, recent_share: f64) -> Vec<usize> {
    let n = scores.len();
    if n <= budget {
        return (0..n).collect();
    }
    let recent = ((budget as f64 * recent_share).round() as usize).min(budget);
    let older = n - recent;
    let mut keep = top_k(&scores[..older], budget - recent);
    keep.extend(older..n);
    keep
}

/// SnapKV: the last `observed` slots (the observation window's own keys)
/// plus the `budget - observed` earlier slots whose observed attention,
/// average-pooled over `kernel` neighbours, is largest.
pub fn snapkv_keep(
    observed_attention: &[f32],
    budget: usize,
    observed: usize,
    kernel: usize,
) -> Vec<usize> {
    let n = observed_attention.len();
    if n <= budget {
        return (0..n).collect();
    }
    let observed = observed.min(budget);
    let older = n - observed;
    let pooled = avg_pool(&observed_attention[..older], kernel);
    let mut keep = top_k(&pooled, budget - observed);
    keep.extend(older..n);
    keep
}

/// Average pooling with stride 1 and zero padding of `kernel / 2` on each
/// side, dividing by `kernel` (torch's `avg_pool1d` default, as SnapKV).
pub fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            x[lo..hi].iter().sum::<f32>() / kernel as f32
        })
        .collect()
}

/// Indices of the `k` largest values (ties to the earlier index), increasing.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k < idx.len() {
        let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(k, by_score);
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_prefers_large_then_early() {
        assert_eq!(top_k(&[1.0, 5.0, 5.0, 0.0, 3.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[1.0, 5.0, 5.0, 0.0, 3.0], 3), vec![1, 2, 4]);
        assert_eq!(top_k(&[2.0, 2.0, 2.0], 1), vec![0]);
        assert_eq!(top_k(&[1.0], 4), vec![0]);
    }

    #[test]
    fn pooling_spreads_over_neighbours() {
        assert_eq!(avg_pool(&[0.0, 3.0, 0.0, 0.0], 3), vec![1.0, 1.0, 1.0, 0.0]);
        assert_eq!(avg_pool(&[1.0, 2.0], 1), vec![1.0, 2.0]);
    }
}
