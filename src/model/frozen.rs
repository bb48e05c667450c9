//! Matmuls with frozen weights for the differentiable path.
//!
//! candle's `Matmul` backward always computes the gradient of both operands,
//! so `x · Wᵀ` with a frozen `W` pays for a weight gradient (an extra matmul
//! and a weight-sized zeroed buffer per use) that nothing reads. Here the
//! product is split into a detached matmul that carries no gradient and a
//! zero-valued custom op whose backward is the input gradient `dy · W` only.
//! Forward values are the plain matmul's; gradients to `x` are unchanged
//! (held by the finite-difference test in `tests/gradients.rs`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `x · Wᵀ` for `x` of shape (..., in) and `weight` (out, in), with
/// gradients to `x` and none computed for `weight`.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out, _) = weight.dims2()?;
    let flat = x.flatten_to(x.rank().saturating_sub(2))?;
    let value = flat.detach().matmul(&weight.t()?)?;
    let grad_path = flat.apply_op1(InputGradient {
        weight: weight.clone(),
    })?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    (value + grad_path)?.reshape(dims)
}

/// Zero in the forward pass; `dy · W` in the backward pass.
struct InputGradient {
    weight: Tensor,
}

impl InputGradient {
    fn out_shape(&self, input: &Shape) -> Result<Shape> {
        let mut dims = input.dims().to_vec();
        let out = self.weight.dim(0)?;
        match dims.last_mut() {
            Some(last) => *last = out,
            None => candle_core::bail!("frozen matmul of a scalar"),
        }
        Ok(Shape::from(dims))
    }
}

impl CustomOp1 for InputGradient {
    fn name(&self) -> &'static str {
        "frozen-matmul-input-gradient"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = self.out_shape(layout.shape())?;
        let n = shape.elem_count();
        let zeros = match storage.dtype() {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::F64 => CpuStorage::F64(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::ZERO; n]),
            DType::F16 => CpuStorage::F16(vec![half::f16::ZERO; n]),
            d => candle_core::bail!("frozen matmul: unsupported dtype {d:?}"),
        };
        Ok((zeros, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let shape = self.out_shape(layout.shape())?;
        let zeros = storage.device().zeros_impl(&shape, storage.dtype())?;
        Ok((zeros, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_match_matmul_and_weight_gets_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 3), &dev)?)?;
        let y = frozen_matmul(x.as_tensor(), &w)?;
        let plain = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let diff = (&y - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "values differ by {diff}");

        let up = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev)?;
        let g = (y * &up)?.sum_all()?.backward()?;
        let g_plain = (plain * &up)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("gradient to x");
        let gx_plain = g_plain.get(x.as_tensor()).expect("plain gradient to x");
        let diff = (gx - gx_plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradients differ by {diff}");
        assert!(g.get(&w).is_none(), "the frozen weight got a gradient");
        Ok(())
    }
}
