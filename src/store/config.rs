//! The timing of a lease-store locker, checked when it is built.

use std::time::Duration;

/// How long a lease lasts and how it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a lease lasts unless renewed; `None` for a lease that never
    /// expires (Azure's infinite lease: a crashed holder keeps the name until
    /// its lease is broken).
    pub duration: Option<Duration>,
    /// How often a hold is renewed.
    pub cadence: Duration,
    /// The bound on every store request.
    pub request_timeout: Duration,
}

/// The random pause between two polls of a busy name: it starts at
/// `min`, grows toward `max`, and starts over when the name changes hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyWait {
    /// The shortest pause (default 250 ms).
    pub min: Duration,
    /// The longest pause (default 1 s).
    pub max: Duration,
}

impl Default for BusyWait {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(250),
            max: Duration::from_secs(1),
        }
    }
}

/// A lease timing or busy-wait range that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreConfigError {
    /// The renewal cadence must be above zero and leave room, before the
    /// local deadline, for a renewal to time out and be retried.
    #[error("renewal cadence {cadence:?} with request timeout {request_timeout:?} leaves no room to retry a renewal within the lease of {duration:?} (safety margin {margin:?}): cadence + 2 x request timeout must not exceed the lease minus the margin")]
    NoRoomToRenew {
        /// The cadence asked for.
        cadence: Duration,
        /// The request timeout.
        request_timeout: Duration,
        /// The lease duration.
        duration: Duration,
        /// The safety margin.
        margin: Duration,
    },
    /// The cadence or the request timeout is zero.
    #[error("renewal cadence and request timeout must be above zero")]
    Zero,
    /// The busy-wait range is empty or inverted.
    #[error("busy-wait range {min:?}..{max:?} must be non-zero and min <= max")]
    BadBusyWait {
        /// The shortest pause asked for.
        min: Duration,
        /// The longest pause asked for.
        max: Duration,
    },
}

/// How far short of a lease's expiry its local deadline is kept: a fifth of
/// the lease, at most one second, but at least 1/500 of it (clock rate
/// drift, which NTP keeps within 500 ppm, grows with the lease).
pub(crate) fn safety_margin(duration: Duration) -> Duration {
    (duration / 5).min(Duration::from_secs(1).max(duration / 500))
}

impl LeaseTiming {
    /// Checks the timing.
    pub fn check(&self) -> Result<(), StoreConfigError> {
        if self.cadence.is_zero() || self.request_timeout.is_zero() {
            return Err(StoreConfigError::Zero);
        }
        if let Some(duration) = self.duration {
            let margin = safety_margin(duration);
            let room = duration.saturating_sub(margin);
            if self.cadence + self.request_timeout * 2 > room {
                return Err(StoreConfigError::NoRoomToRenew {
                    cadence: self.cadence,
                    request_timeout: self.request_timeout,
                    duration,
                    margin,
                });
            }
        }
        Ok(())
    }

    /// The margin kept before the lease's expiry.
    pub(crate) fn margin(&self) -> Duration {
        self.duration.map_or(Duration::ZERO, safety_margin)
    }
}

impl BusyWait {
    /// Checks the range.
    pub fn check(&self) -> Result<(), StoreConfigError> {
        if self.min.is_zero() || self.min > self.max {
            return Err(StoreConfigError::BadBusyWait {
                min: self.min,
                max: self.max,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(duration: Option<u64>, cadence_ms: u64, timeout_ms: u64) -> LeaseTiming {
        LeaseTiming {
            duration: duration.map(Duration::from_secs),
            cadence: Duration::from_millis(cadence_ms),
            request_timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn a_renewal_must_be_able_to_fail_once() {
        // 15 s lease, 1 s margin: 5 s cadence + 2 x 4.5 s = 14 s fits.
        assert!(timing(Some(15), 5000, 4500).check().is_ok());
        assert!(matches!(
            timing(Some(15), 5000, 5000).check(),
            Err(StoreConfigError::NoRoomToRenew { .. })
        ));
        assert!(timing(None, 20_000, 5000).check().is_ok());
        assert_eq!(timing(Some(15), 0, 1).check(), Err(StoreConfigError::Zero));
    }

    #[test]
    fn busy_wait_ranges() {
        assert!(BusyWait::default().check().is_ok());
        let bad = BusyWait {
            min: Duration::from_secs(2),
            max: Duration::from_secs(1),
        };
        assert!(bad.check().is_err());
    }
}
