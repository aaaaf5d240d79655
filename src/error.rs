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

/// A vector of `n` copies of `fill`, or an error naming `what` and the byte count when the
/// allocation fails (instead of aborting the process).
pub fn try_alloc<T: Clone>(n: usize, fill: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        return Err(TqError::InvalidArgument(format!(
            "{what}: cannot allocate {} bytes",
            n.saturating_mul(std::mem::size_of::<T>())
        )));
    }
    v.resize(n, fill);
    Ok(v)
}
