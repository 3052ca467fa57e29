//! The parameterised layers of a Llama, with weights in Hugging Face layout: one file each.

mod dropout;
mod embedding;
mod linear;
mod mlp;
mod norm;

pub use crate::source::Init;
pub use dropout::AdapterDropout;
pub use embedding::Embedding;
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::RmsNorm;
