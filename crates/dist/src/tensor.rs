//! Adapters for 1-D burn tensors (float or int, any supported dtype).
//!
//! Each adapter reads the tensor to the host (`into_data`), runs the flat collective and builds
//! a tensor of the same dtype on the same device. The dtype must be f32, f16, bf16, i32 or i64.

use crate::comm::Communicator;
use crate::element::ReduceOp;
use crate::error::{DistError, Result};
use burn::tensor::kind::Basic;
use burn::tensor::{DType, Tensor, TensorData};

/// Runs `$body` with `$v` bound to the tensor data as a `Vec` of its element type, expecting the
/// body to return the resulting `Vec` of the same type.
macro_rules! with_vec {
    ($self:ident, $data:ident, $dtype:ident, |$v:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                #[allow(unused_mut)]
                let mut $v = $self.vec::<f32>($data)?;
                let out: Vec<f32> = $body;
                $self.rebuild(out)
            }
            DType::F16 => {
                #[allow(unused_mut)]
                let mut $v = $self.vec::<half::f16>($data)?;
                let out: Vec<half::f16> = $body;
                $self.rebuild(out)
            }
            DType::BF16 => {
                #[allow(unused_mut)]
                let mut $v = $self.vec::<half::bf16>($data)?;
                let out: Vec<half::bf16> = $body;
                $self.rebuild(out)
            }
            DType::I32 => {
                #[allow(unused_mut)]
                let mut $v = $self.vec::<i32>($data)?;
                let out: Vec<i32> = $body;
                $self.rebuild(out)
            }
            DType::I64 => {
                #[allow(unused_mut)]
                let mut $v = $self.vec::<i64>($data)?;
                let out: Vec<i64> = $body;
                $self.rebuild(out)
            }
            other => {
                return Err($self.tensor_err(format!(
                    "dtype {other:?} is not supported (f32, f16, bf16, i32, i64)"
                )));
            }
        }
    };
}

impl Communicator {
    fn tensor_err(&self, reason: String) -> DistError {
        DistError::Tensor {
            rank: self.rank(),
            reason,
        }
    }

    fn vec<E: burn::tensor::Element>(&self, data: TensorData) -> Result<Vec<E>> {
        data.try_into_vec::<E>()
            .map_err(|e| self.tensor_err(format!("cannot read tensor data: {e}")))
    }

    fn rebuild<E: burn::tensor::Element>(&self, v: Vec<E>) -> TensorData {
        let n = v.len();
        TensorData::new(v, [n])
    }

    fn read<K: Basic>(&self, t: Tensor<1, K>) -> Result<(burn::tensor::Device, DType, TensorData)> {
        let device = t.device();
        let data = t
            .try_into_data()
            .map_err(|e| self.tensor_err(format!("cannot read tensor: {e:?}")))?;
        let dtype = data.dtype();
        Ok((device, dtype, data))
    }

    /// [`all_reduce`](Communicator::all_reduce) of a 1-D tensor.
    pub fn all_reduce_tensor<K: Basic>(
        &self,
        t: Tensor<1, K>,
        op: ReduceOp,
    ) -> Result<Tensor<1, K>> {
        let (device, dtype, data) = self.read(t)?;
        let data = with_vec!(self, data, dtype, |v| {
            self.all_reduce(&mut v, op)?;
            v
        });
        Ok(Tensor::from_data(data, (&device, dtype)))
    }

    /// [`reduce_scatter`](Communicator::reduce_scatter) of a 1-D tensor: returns this rank's
    /// shard (`shard_of(len, rank, world)`).
    pub fn reduce_scatter_tensor<K: Basic>(
        &self,
        t: Tensor<1, K>,
        op: ReduceOp,
    ) -> Result<Tensor<1, K>> {
        let (device, dtype, data) = self.read(t)?;
        let data = with_vec!(self, data, dtype, |v| self.reduce_scatter(&v, op)?);
        Ok(Tensor::from_data(data, (&device, dtype)))
    }

    /// [`all_gather`](Communicator::all_gather) of 1-D shards into a tensor of `len` elements.
    pub fn all_gather_tensor<K: Basic>(
        &self,
        shard: Tensor<1, K>,
        len: usize,
    ) -> Result<Tensor<1, K>> {
        let (device, dtype, data) = self.read(shard)?;
        let data = with_vec!(self, data, dtype, |v| self.all_gather(&v, len)?);
        Ok(Tensor::from_data(data, (&device, dtype)))
    }

    /// [`broadcast`](Communicator::broadcast) of a 1-D tensor from `root`.
    pub fn broadcast_tensor<K: Basic>(&self, t: Tensor<1, K>, root: usize) -> Result<Tensor<1, K>> {
        let (device, dtype, data) = self.read(t)?;
        let data = with_vec!(self, data, dtype, |v| {
            self.broadcast(&mut v, root)?;
            v
        });
        Ok(Tensor::from_data(data, (&device, dtype)))
    }
}
