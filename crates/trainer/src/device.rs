//! The device a rank computes on: `dist.device` (and `dist.share_device`).
//!
//! - `cpu`: burn-flex, where kiln's fused kernels run;
//! - `wgpu`, `vulkan` (features of the same names): burn's wgpu runtime, WGSL on any Vulkan,
//!   Metal or DX12 adapter, or pinned to Vulkan (cubecl's SPIR-V where the adapter allows);
//!   the model runs burn's composed ops there (`kiln_kernels::composed`);
//! - `cuda` (feature `cuda`): burn's CUDA backend;
//! - `auto`: CUDA under NCCL when built with `cuda`, the CPU otherwise.
//!
//! Local rank `i` takes the machine's adapter `i` (modulo the adapters there are), or adapter 0
//! with `dist.share_device`. Collectives stage through host memory on every device (the
//! threads and MPI communicators read tensors to the host; NCCL copies host buffers to its
//! GPU), so any communicator runs with any device.

use burn::tensor::{DType, Device};

use crate::config::{DeviceChoice, DistBackend, DistConfig};
use crate::{Result, TrainerError};

/// The device (without autodiff) of local rank `local_rank` under `dist`; `launched` is the
/// communicator the ranks run on.
pub fn rank_device(dist: &DistConfig, launched: DistBackend, local_rank: usize) -> Result<Device> {
    let index = if dist.share_device { 0 } else { local_rank };
    match dist.device {
        DeviceChoice::Cpu => Ok(Device::flex()),
        DeviceChoice::Auto if launched == DistBackend::Nccl && cfg!(feature = "cuda") => {
            cuda(index)
        }
        DeviceChoice::Auto => Ok(Device::flex()),
        DeviceChoice::Cuda => cuda(index),
        DeviceChoice::Wgpu => wgpu(index),
        DeviceChoice::Vulkan => vulkan(index),
    }
}

/// `DType`'s name in the config (`precision.compute`).
fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "this dtype",
    }
}

/// Checks that `device` computes in `dtype` (wgpu has no bf16; f16 needs the adapter's
/// `shader-f16`), with an error naming the field and the dtypes the device has.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.supports_dtype(dtype) {
        return Ok(());
    }
    let others: Vec<&str> = [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .filter(|d| device.supports_dtype(*d))
        .map(dtype_name)
        .collect();
    Err(TrainerError::invalid(
        "precision.compute",
        format!(
            "\"{}\" is not supported by the device of dist.device ({}), which computes in {} \
             (--set precision.compute={}, or another dist.device)",
            dtype_name(dtype),
            describe(device),
            others.join(", "),
            others.first().copied().unwrap_or("f32"),
        ),
    ))
}

/// The device as it names itself (`llvmpipe (LLVM 15.0.6, 256 bits)`), or its id.
pub fn describe(device: &Device) -> String {
    #[cfg(feature = "wgpu")]
    if let Some(identity) = device.identity() {
        return identity.name;
    }
    format!("{device:?}")
}

fn not_built(feature: &str) -> TrainerError {
    TrainerError::invalid(
        "dist.device",
        format!(
            "this kiln was built without the `{feature}` feature (cargo build --features \
             {feature})"
        ),
    )
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Device> {
    Err(not_built("cuda"))
}

/// Adapter `index` (modulo the count) of those `devices` lists, the GPUs only where there are
/// any (a machine with a GPU and lavapipe lists both), or an error naming the field.
#[cfg(feature = "wgpu")]
fn pick(devices: Vec<Device>, index: usize, what: &str) -> Result<Device> {
    // A software adapter (lavapipe) is no card: its identity has no physical device.
    let is_card = |d: &Device| d.identity().is_some_and(|i| i.physical.is_some());
    let devices = if devices.iter().any(is_card) {
        devices.into_iter().filter(is_card).collect()
    } else {
        devices
    };
    if devices.is_empty() {
        return Err(TrainerError::invalid(
            "dist.device",
            format!(
                "\"{what}\": no adapter found (without a GPU, Mesa's lavapipe is one: Debian's \
                 mesa-vulkan-drivers, with VK_ICD_FILENAMES naming lvp_icd.x86_64.json and \
                 XDG_RUNTIME_DIR set)"
            ),
        ));
    }
    let n = devices.len();
    Ok(devices.into_iter().nth(index % n).expect("index < n"))
}

#[cfg(feature = "wgpu")]
fn wgpu(index: usize) -> Result<Device> {
    let devices = Device::enumerate(burn::tensor::DeviceType::Wgpu).into_vec();
    pick(devices, index, "wgpu")
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_: usize) -> Result<Device> {
    Err(not_built("wgpu"))
}

#[cfg(feature = "vulkan")]
fn vulkan(index: usize) -> Result<Device> {
    let devices = Device::enumerate(burn::tensor::DeviceType::Vulkan).into_vec();
    pick(devices, index, "vulkan")
}

#[cfg(not(feature = "vulkan"))]
fn vulkan(_: usize) -> Result<Device> {
    Err(not_built("vulkan"))
}
