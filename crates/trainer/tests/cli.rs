//! The `kiln` binary end to end on the tiny synthetic task: every ZeRO stage, bf16 and f16,
//! LoRA, 1 and 2 ranks; resume; export and load the export; eval and generate on the fixture
//! Llama; invalid configs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, kiln, metric, ok, tiny};

fn fails(args: &[&str]) -> String {
    let out = kiln(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "kiln {args:?} should fail");
    err
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train(out: &Path, steps: u64, extra: &[&str]) -> String {
    let mut args = vec!["train".to_string()];
    args.extend(tiny(out, steps, extra));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `kiln export --peft` of checkpoint `ckpt` into `out`; returns its `adapter_config.json`.
fn export_peft(ckpt: &Path, out: &Path) -> serde_json::Value {
    ok(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--peft",
    ]);
    json(&out.join("adapter_config.json"))
}

/// (step, loss) of every training record in `metrics.jsonl`.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    metric(out, &["loss"])
}

#[test]
fn every_stage_and_precision_trains_on_one_and_two_ranks() {
    for (stage, compute, reduce, world) in [
        ("0", "bf16", "f32", "2"),
        ("1", "bf16", "bf16", "2"),
        ("2", "f16", "f32", "2"),
        ("3", "bf16", "f32", "2"),
        ("3", "bf16", "bf16", "2"),
        ("3", "f16", "f16", "1"),
        ("3", "f32", "f32", "2"),
    ] {
        let out = scratch(&format!("stage{stage}-{compute}-{reduce}-{world}"));
        let text = train(
            &out,
            3,
            &[
                &format!("zero.stage={stage}"),
                &format!("precision.compute={compute}"),
                &format!("precision.reduce={reduce}"),
                &format!("dist.world_size={world}"),
            ],
        );
        assert!(text.contains("exact-match accuracy"), "{text}");
        let l = losses(&out);
        assert_eq!(l.len(), 3, "stage {stage} {compute}: {l:?}");
        assert!(l.iter().all(|(_, x)| x.is_finite()));
        assert!(out.join("loss.svg").is_file());
        assert!(out.join("checkpoints/latest").is_file());
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn the_same_run_on_one_and_two_ranks_has_the_same_losses() {
    let full: &[&str] = &["zero.stage=3", "precision.compute=f32"];
    // LoRA dropout masks are keyed by row of the global batch: 1 rank with 2 micro-batches and
    // 2 ranks with 1 each drop the same elements.
    let lora_dropout: &[&str] = &[
        "zero.stage=3",
        "precision.compute=f32",
        "lora.enabled=true",
        "lora.target_modules=[\"q_proj\", \"v_proj\", \"down_proj\"]",
        "lora.dropout=0.2",
        "optim.lr=1e-2",
    ];
    let mut runs = vec![];
    for (name, common) in [("full", full), ("lora-dropout", lora_dropout)] {
        let (a, b) = (scratch(&format!("{name}-1")), scratch(&format!("{name}-2")));
        train(&a, 4, &[common, &["dist.world_size=1"]].concat());
        train(&b, 4, &[common, &["dist.world_size=2"]].concat());
        for ((s, x), (_, y)) in losses(&a).iter().zip(losses(&b)) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "{name} step {s}: {x} vs {y}"
            );
        }
        runs.push(losses(&a));
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }
    // Dropout is on: the same LoRA run without it takes another path after step 1 (B = 0 at
    // step 1, so the first loss is the same).
    let plain = scratch("lora-no-dropout");
    let no_dropout: Vec<&str> = lora_dropout
        .iter()
        .map(|s| {
            if s.starts_with("lora.dropout") {
                "lora.dropout=0"
            } else {
                s
            }
        })
        .chain(["dist.world_size=1"])
        .collect();
    train(&plain, 4, &no_dropout);
    let (dropped, plain_losses) = (&runs[1], losses(&plain));
    assert_eq!(dropped[0], plain_losses[0]);
    assert!(
        dropped[1..]
            .iter()
            .zip(&plain_losses[1..])
            .any(|(x, y)| x.1 != y.1),
        "{dropped:?} vs {plain_losses:?}"
    );
    let _ = std::fs::remove_dir_all(&plain);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_continues_bit_identically() {
    let (straight, resumed) = (scratch("straight"), scratch("resumed"));
    let common = [
        "zero.stage=3",
        "precision.compute=bf16",
        "dist.world_size=2",
    ];
    let steps = 12;
    train(&straight, steps, &common);
    let mut args = vec!["train".to_string()];
    args.extend(tiny(&resumed, steps, &common));
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = resumed.join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(
            start.elapsed().as_secs() < 300,
            "the run never reached step 3"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // A run that did not finish never exits 0 (`kiln train && kiln export` must stop): 130,
    // as for any program ended by SIGINT, after its checkpoint, saying how to go on.
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(text.contains("kiln train --resume"), "{text}");
    let stopped = losses(&resumed).len() as u64;
    assert!(
        stopped < steps,
        "interrupted after {stopped} of {steps} steps"
    );
    assert!(resumed.join("checkpoints/latest").is_file());
    args.push("--resume".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = ok(&args);
    assert!(text.contains("resumed from"), "{text}");
    assert_eq!(
        losses(&straight),
        losses(&resumed),
        "stopped after step {stopped}"
    );
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&resumed);
}

#[test]
fn lora_trains_exports_peft_and_merges() {
    let out = scratch("lora");
    let text = train(
        &out,
        3,
        &[
            "lora.enabled=true",
            "lora.r=4",
            "lora.dropout=0.05",
            "zero.stage=3",
            "dist.world_size=2",
        ],
    );
    assert!(text.contains("parameters trained"), "{text}");
    let ckpt = out.join("checkpoints/step-00000003");
    let peft = out.join("peft");
    // PEFT's names, shapes and config fields, as in the fixture adapter.
    let ours = export_peft(&ckpt, &peft);
    let theirs = json(&fixtures().join("lora/adapter/adapter_config.json"));
    for key in [
        "r",
        "lora_alpha",
        "target_modules",
        "peft_type",
        "task_type",
        "fan_in_fan_out",
    ] {
        assert!(ours.get(key).is_some(), "adapter_config.json lacks {key}");
        assert!(theirs.get(key).is_some());
    }
    assert_eq!(ours["r"], 4);
    assert_eq!(ours["lora_dropout"], 0.05);
    let bytes = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    assert!(
        names.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        ),
        "{names:?}"
    );
    assert_eq!(names.len(), 2 * 2 * 2, "2 layers x q,v x A,B: {names:?}");
    // The adapter loads back onto the base with kiln-lora.
    let merged = out.join("merged");
    ok(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--merge",
    ]);
    let text = ok(&[
        "generate",
        "--pretrained",
        merged.to_str().unwrap(),
        "--prompt",
        "12+34=",
        "--greedy",
        "--max-new-tokens",
        "4",
    ]);
    assert!(text.contains("12+34="), "{text}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn export_then_load_the_export_gives_the_same_eval() {
    let out = scratch("export");
    train(
        &out,
        3,
        &["zero.stage=2", "dist.world_size=2", "precision.compute=f32"],
    );
    let ckpt = out.join("checkpoints/step-00000003");
    let hf = out.join("hf");
    ok(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(hf.join("model.safetensors").is_file() && hf.join("config.json").is_file());
    let set = [
        "--set",
        "precision.compute=f32",
        "--set",
        "data.digits=2",
        "--set",
        "data.seq_len=16",
        "--set",
        "data.eval_examples=8",
    ];
    let mut a = vec!["eval", "--checkpoint", ckpt.to_str().unwrap()];
    a.extend(set);
    let from_ckpt = ok(&a);
    let mut b = vec!["eval", "--pretrained", hf.to_str().unwrap()];
    b.extend(set);
    let from_hf = ok(&b);
    let loss = |t: &str| {
        t.split("held-out loss ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .map(str::to_string)
    };
    assert_eq!(loss(&from_ckpt), loss(&from_hf), "{from_ckpt}\n{from_hf}");
    assert!(loss(&from_ckpt).is_some());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn eval_and_generate_on_the_fixture_llama() {
    let model = fixtures().join("llama/model");
    let dir = scratch("fixture-eval");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let out = ok(&[
        "eval",
        "--pretrained",
        model.to_str().unwrap(),
        "--set",
        "precision.compute=f32",
        "--set",
        "data.seq_len=32",
        "--data",
        text.to_str().unwrap(),
    ]);
    assert!(out.contains("perplexity"), "{out}");
    let sample = |seed: &str| {
        ok(&[
            "generate",
            "--pretrained",
            model.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "8",
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ])
    };
    assert_eq!(sample("1"), sample("1"), "same seed, same sample");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn estimate_prints_the_seed_table() {
    let out = ok(&["estimate", "--psi", "7.5e9", "-n", "64"]);
    for total in ["| 120.0 |", "| 31.4 |", "| 16.6 |", "| 1.9 |"] {
        assert!(out.contains(total), "{total} missing:\n{out}");
    }
    let model = fixtures().join("llama/model/config.json");
    let out = ok(&[
        "estimate",
        "--model",
        model.to_str().unwrap(),
        "-n",
        "4",
        "--batch",
        "2",
        "--seq",
        "64",
    ]);
    assert!(out.contains("activations"), "{out}");
}

#[test]
fn invalid_configs_name_the_field() {
    let e = fails(&["train", "--set", "optim.lrr=1"]);
    assert!(e.contains("optim.lrr"), "{e}");
    let e = fails(&["train", "--set", "zero.stage=7"]);
    assert!(e.contains("zero.stage"), "{e}");
    let e = fails(&["train", "--set", "optim.lr=-1"]);
    assert!(e.contains("optim.lr"), "{e}");
    let e = fails(&["train", "--set", "precision.reduce=f8"]);
    assert!(e.contains("precision.reduce"), "{e}");
    let dir = scratch("badcfg");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[optim]\nlr = \"fast\"\n").unwrap();
    let e = fails(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("bad.toml") && e.contains("lr"), "{e}");
    // The byte tokenizer's ids (259) do not fit a model of 100: an error, not an index panic.
    let small = dir.join("small.json");
    std::fs::write(
        &small,
        r#"{"vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}"#,
    )
    .unwrap();
    let e = fails(&[
        "train",
        "--set",
        &format!("model.config={}", small.display()),
    ]);
    assert!(e.contains("data.tokenizer") && e.contains("100"), "{e}");
    let e = fails(&[
        "export",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--out",
        "x",
    ]);
    assert!(e.contains("manifest.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_from_a_peft_adapter_keeps_its_config_through_checkpoint_export_and_eval() {
    // The rsLoRA fixture adapter (r 4, rsLoRA, q/v) on the fixture Llama: the adapter's own
    // adapter_config.json rules, not the [lora] defaults (r 8, alpha 16, no rsLoRA).
    let adapter = fixtures().join("lora/adapter_rslora");
    let theirs = json(&adapter.join("adapter_config.json"));
    let out = scratch("from-peft");
    train(
        &out,
        2,
        &[
            &format!(
                "model.pretrained={}",
                fixtures().join("llama/model").display()
            ),
            &format!("lora.adapter={}", adapter.display()),
            "lora.enabled=true",
            "precision.compute=f32",
            "dist.world_size=2",
        ],
    );
    let ckpt = out.join("checkpoints/step-00000002");
    let ours = export_peft(&ckpt, &out.join("peft"));
    for key in ["r", "lora_alpha", "use_rslora", "lora_dropout"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    // `eval --checkpoint` rebuilds the adapted model from the checkpoint's own LoRA config.
    let text = ok(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--set",
        "data.eval_examples=8",
    ]);
    assert!(text.contains("held-out loss"), "{text}");
    let _ = std::fs::remove_dir_all(&out);
}
