//! The one error type of tqkv.

/// Every fallible operation of tqkv returns this error.
#[derive(Debug, thiserror::Error)]
pub enum TqError {
    /// An argument failed validation; the message names the operation and the values.
    #[error("{0}")]
    InvalidArgument(String),
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{0}")]
    Format(String),
    /// The CUDA driver, NVRTC or a kernel launch failed; the message carries the compiler log.
    #[error("cuda: {0}")]
    Cuda(String),
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, TqError>;

/// Returns `Err(TqError::InvalidArgument(..))` built from a format string.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::TqError::InvalidArgument(format!($($arg)*)))
    };
}
pub(crate) use invalid;
