//! LoRA adapters on any burn module, by parameter path, compatible with Hugging Face PEFT.
//!
//! A target weight `W0` (`[out, in]`, HF layout) runs as `W0 + scaling · B A` with
//! `A: [r, in]` (`lora_A`), `B: [out, r]` (`lora_B`) and `scaling = alpha / r`
//! (`alpha / sqrt(r)` with rsLoRA). Only A and B train; [`LoraModel::merge`] folds `scaling · B A`
//! into `W0` for inference at the base model's cost, [`LoraModel::unmerge`] takes it out again,
//! and [`LoraModel::set_adapter`] switches between named adapters.
//!
//! ```ignore
//! let mut lora = LoraModel::new(model);                      // freezes every base parameter
//! lora.add_adapter("default", LoraConfig::default(), seed)?;  // q_proj, v_proj; r = 8
//! let p = lora.config("default")?.dropout;                     // PEFT's lora_dropout
//! let ctx = ctx.with_adapter_dropout(AdapterDropout::new(p, step, 0)?); // training only
//! let logits = lora.model().forward(ids, &ctx);               // the model's own forward
//! let grads = GradientsParams::from_grads(loss.backward(), lora.model());
//! lora.map_model(|m| optim.step(lr, m, grads));               // optimizer state: A and B only
//! lora.save_adapter("default", "out/adapter")?;               // PEFT adapter folder
//! ```
//!
//! # burn's LoRA reparameterization: what is used, and why
//!
//! burn 0.22.1 can attach a reparameterization to any `Param` (`Module::apply_reparameterization`):
//! the parameter's `val()` then returns `base + scale · (a @ b)` ([`burn::module::LoraAdapter`]),
//! and `a`, `b` become ordinary parameters (paths `<weight>.lora.a` / `.lora.b`) seen by
//! autodiff, optimizers and visitors. That is the only way into an unmodified module's forward, so
//! kiln uses that mechanism and burn's `LoraAdapter` type, with `a = B` and `b = A` for HF
//! `[out, in]` weights (`a = Aᵀ`, `b = Bᵀ` under PEFT's `fan_in_fan_out`).
//!
//! kiln does not use burn's `Lora` reparameterizer (`Module::apply_lora`), which cannot do what
//! PEFT compatibility needs: it targets by `ParamGroup` rather than PEFT's suffix / regex /
//! `all-linear` rules, initialises the other factor (`a ~ N(0, 1/r)` on a `[in, r]` factor of a
//! burn-layout `[in, out]` weight, so for HF weights the *B* side would be random), knows only
//! `alpha / r`, and `materialize` merges without a way back. kiln's own [`Reparameterizer`]
//! (`Attach` in `model.rs`) attaches factors with PEFT's init, scaling and layout; named adapters,
//! switching, disabling, merge and unmerge keep an adapter-free frozen base and re-attach (burn
//! cannot detach a reparameterization, so the base is kept rather than stripped).
//!
//! # Where the adapter runs, and `lora_dropout`
//!
//! A module whose forward reads `weight.val()` (any burn module) gets the weight-space form: the
//! dense `W0 + scaling · B A` per forward, and a dense `[out, in]` gradient projected onto A and B.
//! A module that knows it is a linear layer can do better with the same attached factors:
//! kiln-models' `Linear` finds the `LoraAdapter` on its weight and computes on activations,
//! `x W0ᵀ + scaling · drop(x) Aᵀ Bᵀ`, PEFT's `lora.Linear` formula, at `O(rows · r · (in + out))`.
//! That is also where `lora_dropout` acts, since dropout acts on the layer's input, which a weight
//! reparameterization cannot reach: the training forward passes
//! `Context::with_adapter_dropout(AdapterDropout::new(config.dropout, seed, first_row))` (the
//! `kiln` trainer does, with a seed per step). Evaluation, generation and merged adapters run
//! without dropout, as PEFT in `eval()` mode. A generic burn module keeps `lora_dropout` in its
//! adapter files but trains as with 0.
//!
//! [`Reparameterizer`]: burn::module::Reparameterizer

mod adapter;
pub mod config;
pub mod error;
mod mappers;
pub mod model;
pub mod peft;

pub use adapter::WeightInfo;
pub use config::{LoraConfig, LoraInit, TargetModules};
pub use error::{LoraError, Result};
pub use model::{LoraModel, TrainableParams, burn_factor_path};
pub use peft::{Factor, PeftAdapter, parse_key, peft_key};
