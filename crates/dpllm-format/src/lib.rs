//! Model configs and checkpoint files in the Hugging Face layout.
//!
//! This crate knows how models are stored, not how they run: it parses
//! `config.json` into a [`ModelConfig`], finds and memory-maps the safetensors
//! shards of a checkpoint directory ([`Checkpoint`]) and hands out tensors as
//! owned, typed buffers ([`TensorData`]). Every failure names the file and what
//! is wrong with it ([`FormatError`]).

pub mod anyprec;
pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fingerprint;
pub mod gguf;
pub mod layout;
pub mod output;
pub mod plan;
pub mod q8;
pub mod st_writer;
pub mod tensor;

pub use atomic::{write_atomic, write_atomic_with, write_output_file, StagingDir};
pub use checkpoint::{Checkpoint, TensorInfo};
pub use config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
pub use error::FormatError;
pub use layout::{LinearKind, LinearSpec};
pub use output::{check_output, OutputKind};
pub use q8::Q8Matrix;
pub use tensor::{DType, TensorData};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, FormatError>;
