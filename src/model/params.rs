//! Trainable parameters: a named set of candle `Var`s that a pass reads
//! through `ParamSource`, over the constants of a plan. The fit trains
//! whatever set it is given (Hopscotch's four scalars per layer today; a
//! mode's routers, mixers or low-rank corrections by name), and a set saves
//! to and loads from a v2 plan artifact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::pass::{ParamSource, Residual};
use crate::plan::{LayerScales, PlanFile};

/// Detached copies of a set's values, by name (what an artifact holds).
pub type ParamValues = HashMap<String, Tensor>;

/// Named trainable tensors.
#[derive(Default)]
pub struct TrainableParams {
    vars: BTreeMap<String, Var>,
}

/// The name under which layer `layer`'s residual scales `[b_att, s_att,
/// b_mlp, s_mlp]` are trained.
pub fn residual_name(layer: usize) -> String {
    format!("residual.{layer}")
}

impl TrainableParams {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hopscotch's parameters: one `[4]` tensor of scales per layer.
    pub fn residual_scales(scales: &[LayerScales], device: &Device) -> Result<Self> {
        let mut p = Self::new();
        for (layer, s) in scales.iter().enumerate() {
            p.insert(
                &residual_name(layer),
                &Tensor::new(&s.as_array()[..], device)?,
            )?;
        }
        Ok(p)
    }

    /// Adds a trainable tensor starting at `init` (copied, f32).
    pub fn insert(&mut self, name: &str, init: &Tensor) -> Result<()> {
        if self.vars.contains_key(name) {
            bail!("trainable parameter `{name}` is defined twice");
        }
        let var = Var::from_tensor(&init.to_dtype(DType::F32)?.copy()?)?;
        self.vars.insert(name.to_string(), var);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// The vars in name order (what the optimiser steps).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.values().cloned().collect()
    }

    /// Total number of trained scalars.
    pub fn element_count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Detached copies of the current values.
    pub fn values(&self) -> Result<ParamValues> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Sets every parameter to its value in `values`, which must name each
    /// one with its shape.
    pub fn restore(&self, values: &ParamValues) -> Result<()> {
        for (name, var) in &self.vars {
            let v = values
                .get(name)
                .with_context(|| format!("no saved value for trainable parameter `{name}`"))?;
            if v.dims() != var.dims() {
                bail!(
                    "saved `{name}` has shape {:?}, the parameter {:?}",
                    v.dims(),
                    var.dims()
                );
            }
            var.set(&v.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Whether every value is finite.
    pub fn all_finite(&self) -> Result<bool> {
        for v in self.vars.values() {
            let a: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
            if a.iter().any(|x| !x.is_finite()) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The trained residual scales of layers `0..n_layers`, with `fallback`
    /// for layers whose scales are not trained here.
    pub fn layer_scales(&self, fallback: &[LayerScales]) -> Result<Vec<LayerScales>> {
        fallback
            .iter()
            .enumerate()
            .map(|(layer, &f)| match self.vars.get(&residual_name(layer)) {
                Some(v) => {
                    let a: Vec<f32> = v.as_tensor().to_vec1()?;
                    match a.as_slice() {
                        &[ba, sa, bm, sm] => Ok(LayerScales::from_array([ba, sa, bm, sm])),
                        _ => bail!("`{}` must hold 4 scales", residual_name(layer)),
                    }
                }
                None => Ok(f),
            })
            .collect()
    }

    /// The set read over `base`: trained names win, the rest come from `base`.
    pub fn over<'a>(&'a self, base: &'a dyn ParamSource) -> ParamsOver<'a> {
        ParamsOver {
            trained: self,
            base,
        }
    }

    /// Saves the current values as artifact `name` of a plan that will be
    /// written at `plan_path`.
    pub fn save_artifact(
        &self,
        plan: &mut PlanFile,
        plan_path: &Path,
        name: &str,
        description: &str,
    ) -> Result<()> {
        plan.write_artifact(plan_path, name, &self.values()?, Some(description))?;
        Ok(())
    }

    /// A set starting from the tensors of a plan's artifact (verified by hash).
    pub fn from_artifact(plan: &PlanFile, name: &str, device: &Device) -> Result<Self> {
        let mut p = Self::new();
        let mut tensors: Vec<_> = plan.load_artifact(name, device)?.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, t) in tensors {
            p.insert(&k, &t)?;
        }
        Ok(p)
    }
}

/// A trained set over another source (a plan's constants).
pub struct ParamsOver<'a> {
    trained: &'a TrainableParams,
    base: &'a dyn ParamSource,
}

impl ParamSource for ParamsOver<'_> {
    fn residual(&self, layer: usize) -> candle_core::Result<Residual> {
        match self.trained.var(&residual_name(layer)) {
            Some(v) => Ok(Residual::Tensor(v.as_tensor().clone())),
            None => self.base.residual(layer),
        }
    }

    fn tensor(&self, name: &str) -> Option<Tensor> {
        match self.trained.var(name) {
            Some(v) => Some(v.as_tensor().clone()),
            None => self.base.tensor(name),
        }
    }
}

/// A small deterministic generator (xorshift64*) for starting values, so a
/// seed gives one start on every machine.
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(2).wrapping_add(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(1e-300);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
