//! The training-time gate: a probe that multiplies each routed block's
//! output by its router's per-token gate, so the KL gradient reaches the
//! routers. The block is still computed for every token here (training
//! needs the soft path); inference skips rows for real (`RouterPolicy`).

use candle_core::{Result, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;

use crate::model::routing::{
    bias_name, hidden_bias_name, hidden_weight_name, router_logits, weight_name, RouterWeights,
};
use crate::model::{Probe, TrainableParams};
use crate::plan::BlockId;

/// How the gate is formed from a router logit `z` (noise added when given).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GateMode {
    /// Straight-through Gumbel: the forward pass uses the hard 0/1 decision
    /// (`z > 0`), the backward pass the gradient of `sigmoid(z / tau)`.
    StraightThrough { tau: f64 },
    /// `sigmoid(z / tau)` both ways (smooth: what finite differences check).
    Soft { tau: f64 },
}

/// Multiplies routed blocks' outputs by their gates and keeps every gate
/// (batch, tokens) for the capacity penalty.
pub struct GateProbe<'a> {
    params: &'a TrainableParams,
    mode: GateMode,
    /// Two-class Gumbel noise (a logistic sample per token) when training.
    noise: Option<&'a mut StdRng>,
    pub gates: Vec<Tensor>,
}

impl<'a> GateProbe<'a> {
    pub fn new(params: &'a TrainableParams, mode: GateMode, noise: Option<&'a mut StdRng>) -> Self {
        Self {
            params,
            mode,
            noise,
            gates: Vec::new(),
        }
    }

    /// Mean gate over every routed block and token of the pass (a scalar
    /// tensor that carries the soft gradient); `None` when nothing is routed.
    pub fn executed_share(&self) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        let mut count = 0usize;
        for g in &self.gates {
            count += g.elem_count();
            let s = g.sum_all()?;
            sum = Some(match sum {
                Some(prev) => (prev + s)?,
                None => s,
            });
        }
        sum.map(|s| s / count as f64).transpose()
    }

    fn logistic_noise(&mut self, shape: (usize, usize), like: &Tensor) -> Result<Option<Tensor>> {
        let Some(rng) = self.noise.as_deref_mut() else {
            return Ok(None);
        };
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let u: f32 = rng.random_range(1e-6..1.0 - 1e-6);
                (u / (1.0 - u)).ln()
            })
            .collect();
        Tensor::from_vec(v, shape, like.device())?
            .to_dtype(like.dtype())
            .map(Some)
    }
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    // 1 / (1 + e^-x), from ops that all carry gradients.
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl Probe for GateProbe<'_> {
    fn block_output(
        &mut self,
        block: BlockId,
        input: &Tensor,
        output: &Tensor,
    ) -> Result<Option<Tensor>> {
        let params = self.params;
        let (Some(w), Some(b)) = (
            params.var(&weight_name(block)),
            params.var(&bias_name(block)),
        ) else {
            return Ok(None);
        };
        let hidden = match (
            params.var(&hidden_weight_name(block)),
            params.var(&hidden_bias_name(block)),
        ) {
            (Some(w1), Some(b1)) => Some((w1.as_tensor(), b1.as_tensor())),
            _ => None,
        };
        let weights = RouterWeights {
            w: w.as_tensor(),
            b: b.as_tensor(),
            hidden,
        };
        let logits = router_logits(input, weights)?;
        let z = match self.logistic_noise(logits.dims2()?, &logits)? {
            Some(n) => (logits + n)?,
            None => logits,
        };
        let gate = match self.mode {
            GateMode::Soft { tau } => sigmoid(&(&z / tau)?)?,
            GateMode::StraightThrough { tau } => {
                let soft = sigmoid(&(&z / tau)?)?;
                let hard = z.gt(&z.zeros_like()?)?.to_dtype(z.dtype())?;
                // Exactly `hard` forward (soft − soft = 0), soft's gradient backward.
                (hard + (&soft - soft.detach())?)?
            }
        };
        self.gates.push(gate.clone());
        let g = gate.unsqueeze(D::Minus1)?.to_dtype(output.dtype())?;
        Ok(Some(output.broadcast_mul(&g)?))
    }
}
