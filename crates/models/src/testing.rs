//! What the GPU tests of every crate share (feature `wgpu`): the device they run on, or why they
//! are skipped, under one rule for CI.

use burn::tensor::{Device, DeviceType};

/// Set (to anything) where a skipped GPU test is a failure: CI sets it, on Mesa's lavapipe.
pub const REQUIRE_GPU_VAR: &str = "KILN_REQUIRE_GPU";

/// The first wgpu adapter, for the test named `test`. Without one it prints why the test is
/// skipped and returns `None`.
///
/// # Panics
/// Without an adapter when [`REQUIRE_GPU_VAR`] is set: there a skipped GPU test must not pass.
pub fn wgpu_device_or_skip(test: &str) -> Option<Device> {
    let devices = Device::enumerate(DeviceType::Wgpu).into_vec();
    if let Some(device) = devices.into_iter().next() {
        let name = device.identity().map(|i| i.name).unwrap_or_default();
        eprintln!("{test}: on {name}");
        return Some(device);
    }
    let reason = "no wgpu adapter (no GPU, and no lavapipe: install mesa-vulkan-drivers, set \
                  VK_ICD_FILENAMES to lvp_icd.x86_64.json and XDG_RUNTIME_DIR)";
    assert!(
        std::env::var_os(REQUIRE_GPU_VAR).is_none(),
        "{test}: {REQUIRE_GPU_VAR} is set but there is {reason}"
    );
    eprintln!("{test}: SKIPPED: {reason}");
    None
}
