//! What one forward pass does, as the engine asks it: the boundary every
//! mode plugs into.
//!
//! - a [`LayerPolicy`] says, per layer and per batch of tokens, what each
//!   block executes (skip, full, a subset of rows, heads or neurons, K/V
//!   only); it may look at the activations it is given (a router, a
//!   predictor). A static [`Plan`] is one policy.
//! - a [`ParamSource`] supplies the residual scales (constants, or tensors
//!   that carry gradients) and any named parameter a mode trains.
//! - the optional [`SeqState`] holds each layer's keys and their positions.
//! - an optional [`Probe`] sees block inputs and outputs, per-head attention
//!   context, attention probabilities and the decisions taken.

use candle_core::{Result, Tensor};

use super::state::SeqState;
use super::transformer::{KeyRuns, RunOptions, StoredKeys};
use crate::plan::{BlockId, LayerScales, Plan};

/// What an attention block executes for the tokens of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttnExec {
    /// Not computed; writes no K/V.
    Skip,
    Full,
    /// Computes K/V for every token and writes them, but no queries or
    /// output: later tokens can attend to these.
    KvOnly,
    /// Only these rows (indices into the pass's tokens, increasing) run the
    /// block; the others contribute nothing here. `others_write_kv`: the
    /// other rows still write their K/V (a cheap projection) so later
    /// tokens see them; otherwise they leave a gap.
    Rows {
        rows: Vec<u32>,
        others_write_kv: bool,
    },
    /// Only these query heads (increasing) are computed; K/V are written for
    /// every KV head so the cache stays complete.
    Heads(Vec<u32>),
    /// The attention is replaced by a trained mixer (`model::mixer`) with a
    /// constant-size recurrent state; its weights come from the pass's
    /// parameters (`mixer.{layer}.*`). Writes no K/V.
    Mixer,
}

/// What an MLP block executes for the tokens of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MlpExec {
    Skip,
    Full,
    /// Only these rows (increasing) run the block.
    Rows(Vec<u32>),
    /// Only these intermediate neurons (increasing) are computed.
    Neurons(Vec<u32>),
}

/// The seven projections of a decoder layer, by the input they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Position in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Decides what each block executes. `x` is the residual stream entering
/// the block, (batch, tokens, hidden).
pub trait LayerPolicy {
    fn attn(&self, layer: usize, x: &Tensor) -> Result<AttnExec>;
    fn mlp(&self, layer: usize, x: &Tensor) -> Result<MlpExec>;
}

impl LayerPolicy for Plan {
    fn attn(&self, layer: usize, _x: &Tensor) -> Result<AttnExec> {
        Ok(if self.skips_attn(layer) {
            AttnExec::Skip
        } else if self.replaces_attn(layer) {
            AttnExec::Mixer
        } else {
            AttnExec::Full
        })
    }

    fn mlp(&self, layer: usize, _x: &Tensor) -> Result<MlpExec> {
        Ok(if self.skips_mlp(layer) {
            MlpExec::Skip
        } else {
            MlpExec::Full
        })
    }
}

/// One layer's residual scales, as numbers or as tensors of shape `[4]`
/// (b_att, s_att, b_mlp, s_mlp) that gradients reach.
#[derive(Debug, Clone)]
pub enum Residual {
    Const(LayerScales),
    Tensor(Tensor),
}

/// The parameters a pass reads beyond the frozen weights.
pub trait ParamSource {
    /// Hopscotch's four scalars of `layer`.
    fn residual(&self, layer: usize) -> Result<Residual>;
    /// A named tensor a mode trains (router, mixer, low-rank correction).
    fn tensor(&self, _name: &str) -> Option<Tensor> {
        None
    }
}

impl ParamSource for Plan {
    fn residual(&self, layer: usize) -> Result<Residual> {
        Ok(Residual::Const(self.scales_for(layer)))
    }

    /// The replacing mixers' weights and a healed plan's corrections
    /// (`Plan::tensors`), when the plan carries them.
    fn tensor(&self, name: &str) -> Option<Tensor> {
        let mixer = self
            .replace
            .as_ref()
            .and_then(|r| r.weights.get(name).cloned());
        mixer.or_else(|| self.tensors.as_ref()?.get(name).cloned())
    }
}

/// Residual scales as tensors, one `[4]` tensor per layer (candle `Var`s
/// when fitting), so `backward()` reaches them.
pub struct TensorScales<'a>(pub &'a [Tensor]);

impl ParamSource for TensorScales<'_> {
    fn residual(&self, layer: usize) -> Result<Residual> {
        match self.0.get(layer) {
            Some(t) => Ok(Residual::Tensor(t.clone())),
            None => candle_core::bail!("no scales for layer {layer}"),
        }
    }
}

/// Makes a fresh probe for each pass that wants one (a draft's per-token
/// channel thresholds, run at every drafted token).
pub trait ProbeSource: Sync {
    fn fresh(&self) -> Result<Box<dyn Probe + '_>>;
}

/// Sees what a pass computes. Every method has a default that ignores it.
pub trait Probe {
    /// A computed block's input and output residual streams.
    fn block(&mut self, _block: BlockId, _input: &Tensor, _output: &Tensor) -> Result<()> {
        Ok(())
    }
    /// A computed block's output before its residual add (b_att / b_mlp
    /// scaling), (batch, tokens, hidden), with the residual stream `input`
    /// that entered the block. A probe may return a tensor of the same shape
    /// to use instead: the output times a per-token gate computed from
    /// `input` by trained routers, so gradients reach them (token routing's
    /// training; inference skips rows for real through the policy).
    fn block_output(
        &mut self,
        _block: BlockId,
        _input: &Tensor,
        _output: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether to hand `layer`'s per-head context to `head_context`.
    fn wants_head_context(&self, _layer: usize) -> bool {
        false
    }
    /// Attention output per head before `o_proj`, (batch, tokens, heads,
    /// head dim), for the query heads `heads` that were computed. A probe
    /// may return a tensor of the same shape to use instead: `ctx` times a
    /// per-head gate `Var` of ones makes the gate's gradient Σ ∂L/∂ctx·ctx
    /// per head (candle keeps gradients only for variables).
    fn head_context(
        &mut self,
        _layer: usize,
        _heads: &[u32],
        _ctx: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether to hand `layer`'s projection inputs to `project` and
    /// `projection_input`.
    fn wants_projection_inputs(&self, _layer: usize) -> bool {
        false
    }
    /// The input (batch, tokens, in features) a projection of `layer` is
    /// about to read. A probe may return a tensor of the same shape to use
    /// instead: activation sparsity zeroes channels here (simulated: the
    /// matmul still reads every weight), a gate `Var` here gets Σ ∂L/∂x·x.
    /// Under a head or neuron subset, `O` and `Down` see only the kept
    /// channels.
    fn projection_input(
        &mut self,
        _layer: usize,
        _proj: Projection,
        _x: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Computes `proj`'s product W·x for its input `x` itself (the caller
    /// adds the bias), instead of `projection_input` and the matmul, or
    /// `None` to leave both to them; `dims` is the weight's (out, in), which
    /// a head or neuron subset narrows. TEAL/WINA's executed kernel reads
    /// here only the weight columns of the channels it keeps.
    fn project(
        &mut self,
        _layer: usize,
        _proj: Projection,
        _dims: (usize, usize),
        _x: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether `layer` should report its attention probabilities (this runs
    /// the dense attention path).
    fn wants_attention(&self, _layer: usize) -> bool {
        false
    }
    /// Attention probabilities (batch, heads, queries, keys) over keys at
    /// `key_positions`.
    fn attention(&mut self, _layer: usize, _probs: &Tensor, _key_positions: &[u32]) -> Result<()> {
        Ok(())
    }
    /// Attention computed here instead of by the engine: a KV budget policy
    /// that attends to a subset of the stored keys per query (Quest). Given
    /// the rotated queries (batch, heads, queries, head dim), the stored
    /// keys and values (batch, kv heads, keys, head dim) at `key_positions`
    /// and the queries' positions, returns (batch, queries, heads · head
    /// dim), or `None` to attend to every key. Asked only when every query
    /// head is computed.
    fn attend(
        &mut self,
        _layer: usize,
        _q: &Tensor,
        _kv: (&Tensor, &Tensor),
        _key_positions: &[u32],
        _query_positions: &[u32],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether a lean pass (`model/lean`: the quantized CPU path of a few
    /// rows) may carry this probe. Such a probe needs none of the hooks
    /// above (the lean path calls none of them), only `select_keys`.
    fn rides_lean(&self) -> bool {
        false
    }
    /// On the lean path, the keys of `layer`'s store each query attends to:
    /// per query row and KV head, runs of key indices (`None`: all it sees).
    /// `q` holds the pass's rotated queries, rows × heads · head dim.
    fn select_keys(
        &mut self,
        _layer: usize,
        _q: &[f32],
        _keys: &StoredKeys,
        _query_positions: &[u32],
    ) -> Result<Option<KeyRuns>> {
        Ok(None)
    }
    /// The policy's decision for a block.
    fn attn_decision(&mut self, _layer: usize, _exec: &AttnExec) -> Result<()> {
        Ok(())
    }
    fn mlp_decision(&mut self, _layer: usize, _exec: &MlpExec) -> Result<()> {
        Ok(())
    }
}

/// One forward pass: how to run, what to execute, with which parameters,
/// over which state, observed by whom.
pub struct Pass<'a> {
    pub run: RunOptions,
    pub policy: &'a dyn LayerPolicy,
    pub params: &'a dyn ParamSource,
    pub state: Option<&'a mut SeqState>,
    pub probe: Option<&'a mut dyn Probe>,
}

impl<'a> Pass<'a> {
    /// A pass under a static plan: its skips and its constant scales.
    pub fn plan(plan: &'a Plan, run: RunOptions) -> Self {
        Self {
            run,
            policy: plan,
            params: plan,
            state: None,
            probe: None,
        }
    }

    pub fn with_state(mut self, state: &'a mut SeqState) -> Self {
        self.state = Some(state);
        self
    }

    pub fn with_probe(mut self, probe: &'a mut dyn Probe) -> Self {
        self.probe = Some(probe);
        self
    }

    pub fn with_params(mut self, params: &'a dyn ParamSource) -> Self {
        self.params = params;
        self
    }

    pub fn with_policy(mut self, policy: &'a dyn LayerPolicy) -> Self {
        self.policy = policy;
        self
    }
}
