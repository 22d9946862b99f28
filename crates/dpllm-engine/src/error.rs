//! The engine's one error type. [`EngineError::kind`] tells a bad request from a
//! bad model file, a lack of resources, or a fault of ours: front ends map it to
//! exit codes and HTTP status codes.

use dpllm_format::FormatError;

/// Who has to act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (bad tokens, bits, sampling settings, too long, a plan
    /// that does not fit this model): fix the request (HTTP 400).
    User,
    /// The model's files are wrong or unsupported: fix or replace them (HTTP 500).
    Model,
    /// Memory or another resource ran out (HTTP 503).
    Resource,
    /// The request was cancelled by its caller.
    Cancelled,
    /// The numbers went wrong inside the engine (HTTP 500).
    Internal,
}

/// Everything that can go wrong when loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No tokens given.
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    /// A token id is not in the vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A bit-width was requested from a model that is not any-precision.
    #[error("this model is not a dpllm any-precision model; quantize it with `dpllm quantize` to choose bits")]
    NotAnyPrecision,
    /// A bit-width outside what the model holds.
    #[error("bad bit-width: {0}")]
    Bits(String),
    /// A plan that does not fit this model, or a target with no plan.
    #[error("plan: {0}")]
    Plan(String),
    /// Sampling settings out of range.
    #[error("{0}")]
    Sampling(String),
    /// Text that cannot be tokenized or ids that cannot be decoded.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The chat template refused the messages (its `raise_exception`) or failed on them.
    #[error("chat template: {0}")]
    Template(String),
    /// The context window is full.
    #[error("context full: {have} positions cached + {add} new > capacity {capacity}")]
    ContextFull {
        /// Positions already cached.
        have: usize,
        /// Positions requested.
        add: usize,
        /// Cache capacity.
        capacity: usize,
    },
    /// The caller cancelled the request.
    #[error("cancelled")]
    Cancelled,
    /// A model file (weights, config, plan) is unreadable, corrupt or unsupported.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The tokenizer or chat template files of the model are unusable.
    #[error("{0}")]
    ModelFiles(String),
    /// Memory for a buffer that grows with the request could not be had.
    #[error("out of memory: cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// Bytes requested.
        bytes: usize,
    },
    /// A NaN or infinity appeared in the activations (never silently passed on).
    #[error("non-finite activation (NaN or infinity) first appeared in {stage} at token {token} of the call; the weights or the input drive the model out of the f32 range")]
    NonFinite {
        /// Where: "layer 3 attention output", "the logits", ...
        stage: String,
        /// Index of the first affected token within the call.
        token: usize,
    },
    /// A backend (device) failed or is not available in this build.
    #[error("device: {0}")]
    Device(String),
}

impl EngineError {
    /// Who has to act on this error.
    pub fn kind(&self) -> ErrorKind {
        use EngineError::*;
        match self {
            EmptyInput
            | TokenOutOfRange { .. }
            | NotAnyPrecision
            | Bits(_)
            | Plan(_)
            | Sampling(_)
            | Tokenize(_)
            | Template(_)
            | ContextFull { .. } => ErrorKind::User,
            Cancelled => ErrorKind::Cancelled,
            Format(_) | ModelFiles(_) => ErrorKind::Model,
            OutOfMemory { .. } => ErrorKind::Resource,
            NonFinite { .. } | Device(_) => ErrorKind::Internal,
        }
    }
}

/// Result of engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_separate_requests_from_files_and_faults() {
        assert_eq!(EngineError::Bits("9 bits".into()).kind(), ErrorKind::User);
        assert_eq!(
            EngineError::ContextFull {
                have: 1,
                add: 2,
                capacity: 2
            }
            .kind(),
            ErrorKind::User
        );
        let f = FormatError::invalid(std::path::Path::new("m/config.json"), "bad");
        let e: EngineError = f.into();
        assert_eq!(e.kind(), ErrorKind::Model);
        assert!(e.to_string().contains("m/config.json"), "{e}");
        assert_eq!(
            EngineError::OutOfMemory {
                what: "x",
                bytes: 1
            }
            .kind(),
            ErrorKind::Resource
        );
        assert_eq!(
            EngineError::NonFinite {
                stage: "logits".into(),
                token: 0
            }
            .kind(),
            ErrorKind::Internal
        );
        assert_eq!(EngineError::Cancelled.kind(), ErrorKind::Cancelled);
    }
}
