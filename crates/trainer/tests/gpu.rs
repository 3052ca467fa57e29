//! `kiln train`, `eval` and `generate` on a wgpu device (`dist.device = "wgpu"`, feature
//! `wgpu`) equal the CPU run: ZeRO-3 + LoRA on 2 thread ranks sharing the adapter, f32.
//!
//! CI runs these on Mesa's lavapipe (`.ci/run`). Without a wgpu adapter they are skipped with
//! the reason printed, unless `KILN_REQUIRE_GPU` is set (CI sets it), where that is a failure.

#[allow(dead_code)]
mod common;

/// Without the feature, asking for the device is an error naming the field and the feature.
#[cfg(not(feature = "wgpu"))]
#[test]
fn wgpu_without_the_feature_is_an_error_naming_the_field() {
    let out = common::kiln(&[
        "train",
        "--set",
        "dist.device=wgpu",
        "--set",
        "train.steps=1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("dist.device") && err.contains("--features wgpu"),
        "{err}"
    );
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use std::path::{Path, PathBuf};

    use super::common::{kiln, metric, ok, tiny};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-gpu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn run(args: &[String]) -> String {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args)
    }

    /// Whether a wgpu adapter exists (see [`kiln_models::testing::wgpu_device_or_skip`]).
    fn has_adapter(test: &str) -> bool {
        kiln_models::testing::wgpu_device_or_skip(test).is_some()
    }

    /// `--set` pairs of the tiny addition job under ZeRO-3 with LoRA on all linear layers, 2
    /// ranks, f32, on `device`.
    fn job(out: &Path, device: &str) -> Vec<String> {
        let device = format!("dist.device={device}");
        tiny(
            out,
            4,
            &[
                "zero.stage=3",
                "dist.world_size=2",
                "precision.compute=f32",
                "lora.enabled=true",
                r#"lora.target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]"#,
                "lora.dropout=0.1",
                "optim.lr=1e-2",
                &device,
            ],
        )
    }

    /// Every tensor of the checkpoint, as f32.
    fn params(ckpt: &Path) -> Vec<(String, Vec<f32>)> {
        let (_, params) = kiln_zero::read_full_checkpoint(ckpt).unwrap();
        let mut out: Vec<(String, Vec<f32>)> = params
            .into_iter()
            .map(|(k, d)| (k, d.convert::<f32>().try_into_vec::<f32>().unwrap()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn zero3_lora_train_eval_and_generate_on_wgpu_equal_the_cpu_run() {
        if !has_adapter("zero3_lora_on_wgpu") {
            return;
        }
        let (cpu, gpu) = (scratch("cpu"), scratch("wgpu"));
        for (out, device) in [(&cpu, "cpu"), (&gpu, "wgpu")] {
            let mut args = vec!["train".to_string()];
            args.extend(job(out, device));
            let text = run(&args);
            assert!(text.contains("exact-match accuracy"), "{device}: {text}");
        }
        // Losses of the 4 steps and the held-out loss: f32 on both, in another order of sums.
        let losses = |out| metric(out, &["loss", "eval_loss"]);
        let (a, b) = (losses(&cpu), losses(&gpu));
        assert_eq!(a.len(), 5, "{a:?}");
        assert_eq!(a.len(), b.len());
        for ((s, x), (t, y)) in a.iter().zip(&b) {
            assert_eq!(s, t);
            eprintln!("step {s}: loss cpu {x} wgpu {y} (diff {:e})", (x - y).abs());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "step {s}: {x} vs {y}"
            );
        }
        // The trained parameters (the frozen base and the adapters), 4 AdamW steps at lr 1e-2.
        let ckpt = |out: &Path| out.join("checkpoints/step-00000004");
        let (p, q) = (params(&ckpt(&cpu)), params(&ckpt(&gpu)));
        assert_eq!(p.len(), q.len());
        let mut worst = 0.0f32;
        for ((k, x), (l, y)) in p.iter().zip(&q) {
            assert_eq!(k, l);
            let d = x
                .iter()
                .zip(y)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-4, "{k}: max diff {d}");
            worst = worst.max(d);
        }
        eprintln!(
            "parameters: max abs diff {worst:e} over {} tensors",
            p.len()
        );

        // `kiln eval` and `kiln generate` of the wgpu run's checkpoint, on wgpu and on the CPU.
        let ckpt = ckpt(&gpu).display().to_string();
        let eval = |device: &str| {
            let text = run(&[
                "eval".into(),
                "--checkpoint".into(),
                ckpt.clone(),
                "--set".into(),
                format!("dist.device={device}"),
            ]);
            let loss = text
                .split("loss ")
                .nth(1)
                .and_then(|s| s.split([' ', ',']).next())
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no loss in {text}"));
            (loss, text)
        };
        let ((x, tx), (y, ty)) = (eval("cpu"), eval("wgpu"));
        eprintln!("eval loss cpu {x} wgpu {y}");
        // Printed to 4 decimals: one unit of the last digit apart at most.
        assert!((x - y).abs() <= 1.5e-4, "{tx}\n{ty}");
        let generate = |device: &str| {
            run(&[
                "generate".into(),
                "--checkpoint".into(),
                ckpt.clone(),
                "--prompt".into(),
                "12+34=".into(),
                "--greedy".into(),
                "--max-new-tokens".into(),
                "4".into(),
                "--set".into(),
                format!("dist.device={device}"),
            ])
        };
        assert_eq!(generate("cpu"), generate("wgpu"));
        let _ = std::fs::remove_dir_all(&cpu);
        let _ = std::fs::remove_dir_all(&gpu);
    }

    /// A dtype the adapter cannot compute in is an error naming `precision.compute`.
    #[test]
    fn a_dtype_the_adapter_lacks_is_an_error_naming_the_field() {
        use burn::tensor::{DType, Device, DeviceType};
        if !has_adapter("dtype_error") {
            return;
        }
        let device = &Device::enumerate(DeviceType::Wgpu).into_vec()[0];
        for (dtype, name) in [(DType::BF16, "bf16"), (DType::F16, "f16")] {
            let supported = device.supports_dtype(dtype);
            eprintln!("{name} on wgpu: supported = {supported}");
            if supported {
                continue;
            }
            let out = kiln(&[
                "train",
                "--set",
                "dist.device=wgpu",
                "--set",
                &format!("precision.compute={name}"),
                "--set",
                "train.steps=1",
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                err.contains("precision.compute") && err.contains(name),
                "{err}"
            );
        }
    }
}
