//! Low-rank corrections of a layer's projections: `W x + B (A x)`, with `A`
//! (rank, in) and `B` (out, rank), read by name from the pass's
//! `ParamSource` (`lora.{layer}.{proj}.a` / `.b`). Healing trains them (the
//! weights stay frozen); every plan that carries them applies them; an
//! export merges them, `W + B·A`, into the weights.

use std::sync::OnceLock;

use candle_core::{Result, Tensor};

use super::pass::ParamSource;
use super::transformer::Layer;

/// The projections a correction can sit on, in layer order (Hugging Face names).
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A correction `B·A` of one projection.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank)
    pub b: Tensor,
}

impl LowRank {
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    /// `B (A x)` for x (..., in), in x's dtype; gradients reach A and B.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)
    }

    /// The dense update `B·A` (out, in), f32.
    pub fn delta(&self) -> Result<Tensor> {
        let f = candle_core::DType::F32;
        self.b.to_dtype(f)?.matmul(&self.a.to_dtype(f)?)
    }

    /// Only output features `rows` (a head or neuron subset of the projection).
    pub fn rows(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self {
            a: self.a.clone(),
            b: self.b.index_select(rows, 0)?,
        })
    }

    /// Only input features `cols`.
    pub fn cols(&self, cols: &Tensor) -> Result<Self> {
        Ok(Self {
            a: self.a.index_select(cols, 1)?.contiguous()?,
            b: self.b.clone(),
        })
    }
}

/// Layers whose factor names are built once (larger ones format them per call).
const NAMED_LAYERS: usize = 256;

/// The names of `layer`'s factors for projection `proj` (an index into
/// `PROJECTIONS`): `lora.{layer}.{proj}.a`, `.b`.
pub fn factor_names(layer: usize, proj: usize) -> (String, String) {
    let p = PROJECTIONS[proj];
    (format!("lora.{layer}.{p}.a"), format!("lora.{layer}.{p}.b"))
}

type Names = Vec<[(String, String); 7]>;

fn cached_names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| {
        (0..NAMED_LAYERS)
            .map(|l| std::array::from_fn(|p| factor_names(l, p)))
            .collect()
    })
}

/// `layer`'s correction of projection `proj` from `params`, checked against
/// the projection's (out, in); `None` when it has none.
pub fn lookup(
    params: &dyn ParamSource,
    layer: usize,
    proj: usize,
    out_in: (usize, usize),
) -> Result<Option<LowRank>> {
    let owned;
    let (an, bn) = match cached_names().get(layer) {
        Some(names) => (&names[proj].0, &names[proj].1),
        None => {
            owned = factor_names(layer, proj);
            (&owned.0, &owned.1)
        }
    };
    let (a, b) = match (params.tensor(an), params.tensor(bn)) {
        (None, None) => return Ok(None),
        (Some(a), Some(b)) => (a, b),
        (Some(_), None) => candle_core::bail!("correction `{an}` has no `{bn}`"),
        (None, Some(_)) => candle_core::bail!("correction `{bn}` has no `{an}`"),
    };
    check_shapes(an, bn, &a, &b, out_in)?;
    Ok(Some(LowRank { a, b }))
}

/// Refuses factors whose shapes do not fit a projection of (out, in).
pub fn check_shapes(
    an: &str,
    bn: &str,
    a: &Tensor,
    b: &Tensor,
    (out, inp): (usize, usize),
) -> Result<()> {
    let (ad, bd) = (a.dims(), b.dims());
    let ok = ad.len() == 2 && bd.len() == 2 && ad[1] == inp && bd[0] == out && ad[0] == bd[1];
    if !ok {
        candle_core::bail!(
            "correction factors `{an}` {ad:?} and `{bn}` {bd:?} do not fit this projection \
             ({out} outputs, {inp} inputs): expected (rank, {inp}) and ({out}, rank); the \
             correction was made for another model"
        );
    }
    Ok(())
}

/// (out, in) of each projection of `layer`, in `PROJECTIONS` order.
pub fn projection_shapes(layer: &Layer) -> [(usize, usize); 7] {
    let lin = [
        &layer.attn.q,
        &layer.attn.k,
        &layer.attn.v,
        &layer.attn.o,
        &layer.mlp.gate,
        &layer.mlp.up,
        &layer.mlp.down,
    ];
    lin.map(|l| (l.out_dim(), l.in_dim()))
}

/// `layer` (index `i`) with the corrections `params` holds for it set on its
/// projections, or `None` when it has none (the common case: no copy).
pub fn corrected_layer(layer: &Layer, i: usize, params: &dyn ParamSource) -> Result<Option<Layer>> {
    let shapes = projection_shapes(layer);
    let mut found: [Option<LowRank>; 7] = Default::default();
    let mut any = false;
    for (p, slot) in found.iter_mut().enumerate() {
        *slot = lookup(params, i, p, shapes[p])?;
        any |= slot.is_some();
    }
    if !any {
        return Ok(None);
    }
    let mut out = layer.clone();
    let [q, k, v, o, gate, up, down] = found;
    out.attn.q.lora = q;
    out.attn.k.lora = k;
    out.attn.v.lora = v;
    out.attn.o.lora = o;
    out.mlp.gate.lora = gate;
    out.mlp.up.lora = up;
    out.mlp.down.lora = down;
    Ok(Some(out))
}
