//! Timeouts given as seconds by a binding: one reading of them for Python and Lua.

use std::time::Duration;

/// Timeouts at least this long (about 31 years), infinity included, mean "no limit": the core
/// adds timeouts to `Instant::now()`, which must not overflow, and 1e300 seconds is a wish for
/// no limit rather than a mistake.
pub const FOREVER_SECONDS: f64 = 1e9;

/// `seconds` as a timeout: `None` for no limit, an error message for a negative number or NaN.
pub fn timeout_from_seconds(seconds: f64) -> Result<Option<Duration>, String> {
    if seconds >= FOREVER_SECONDS {
        return Ok(None);
    }
    Duration::try_from_secs_f64(seconds)
        .map(Some)
        .map_err(|_| format!("must be a non-negative number of seconds, got {seconds}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_as_timeouts() {
        assert_eq!(timeout_from_seconds(0.0), Ok(Some(Duration::ZERO)));
        assert_eq!(timeout_from_seconds(1.5), Ok(Some(Duration::from_millis(1500))));
        assert_eq!(timeout_from_seconds(1e300), Ok(None));
        assert_eq!(timeout_from_seconds(f64::INFINITY), Ok(None));
        assert!(timeout_from_seconds(-1.0).unwrap_err().contains("non-negative"));
        assert!(timeout_from_seconds(f64::NAN).unwrap_err().contains("NaN"));
        assert!(timeout_from_seconds(f64::NEG_INFINITY).is_err());
    }
}
