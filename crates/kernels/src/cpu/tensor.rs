//! Reading flex tensors as typed slices and making new ones from vectors.

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{Bytes, DType, Shape};

use super::elem::Elem;

/// `t` with a contiguous row-major layout starting at its buffer's first element (a copy only
/// when it is a strided view).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `t` contiguous, starting at its buffer's first element, with a buffer of its own: written in
/// place without a copy when nothing else holds it (a copy otherwise).
pub(crate) fn exclusive(t: FlexTensor) -> FlexTensor {
    let exact = t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.layout().num_elements() * t.dtype().size();
    if exact && t.is_unique() {
        t
    } else {
        let dims = t.layout().shape().clone();
        with_elem!(t.dtype(), E => {
            let c = contiguous(t);
            tensor(dims, slice::<E>(&c).to_vec())
        })
    }
}

/// The elements of a contiguous tensor, in row-major order.
pub(crate) fn slice<E: Elem>(t: &FlexTensor) -> &[E] {
    t.as_slice::<E>()
        .expect("kiln-kernels: a tensor made contiguous has a slice view")
}

/// A contiguous tensor of `shape` over `data` (no copy).
pub(crate) fn tensor<E: Elem>(shape: impl Into<Shape>, data: Vec<E>) -> FlexTensor {
    let shape = shape.into();
    debug_assert_eq!(shape.num_elements(), data.len());
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(shape), E::DTYPE)
}

/// The dims of `t`.
pub(crate) fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

/// Calls `$body` with `$E` bound to the Rust type of float dtype `$dtype`.
macro_rules! with_elem {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            burn::tensor::DType::F32 => {
                type $E = f32;
                $body
            }
            burn::tensor::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            burn::tensor::DType::F16 => {
                type $E = half::f16;
                $body
            }
            other => panic!("kiln-kernels: unsupported float dtype {other:?}"),
        }
    };
}
pub(crate) use with_elem;

/// Whether `dtype` is one the kernels run on.
pub(crate) fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// An integer tensor's values as i64 (flex stores ids as i64 or i32).
pub(crate) fn ints(t: &FlexTensor) -> Vec<i64> {
    let t = contiguous(t.clone());
    match t.dtype() {
        DType::I64 => t.as_slice::<i64>().expect("contiguous").to_vec(),
        DType::I32 => t
            .as_slice::<i32>()
            .expect("contiguous")
            .iter()
            .map(|&v| i64::from(v))
            .collect(),
        other => panic!("kiln-kernels: unsupported integer dtype {other:?}"),
    }
}

/// Values of a float tensor of any supported dtype as f32 (small tensors: rotary tables).
pub(crate) fn floats(t: &FlexTensor) -> Vec<f32> {
    let t = contiguous(t.clone());
    with_elem!(t.dtype(), E => slice::<E>(&t).iter().map(|v| v.to_f32()).collect())
}
