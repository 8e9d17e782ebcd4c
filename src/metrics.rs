//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): install any recorder (for Prometheus,
//! `metrics-exporter-prometheus`) and these series appear. Without the
//! feature every call here compiles to nothing.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `tower_lease_lock_acquisitions_total` | counter | `backend`, `mode`, `outcome` |
//! | `tower_lease_lock_wait_seconds` | histogram | `backend`, `mode`, `outcome` |
//! | `tower_lease_lock_hold_seconds` | histogram | `backend`, `mode` |
//! | `tower_lease_lock_held` | gauge | `backend`, `mode` |
//! | `tower_lease_lock_lease_grants_total` | counter | `backend` |
//! | `tower_lease_lock_lease_renewals_total` | counter | `backend`, `outcome` |
//! | `tower_lease_lock_lease_losses_total` | counter | `backend` |
//! | `tower_lease_lock_watch_stream_restarts_total` | counter | `backend` |
//!
//! - `backend`: `etcd`, `memory`, or the name a backend gave its
//!   [`LockInfo`](crate::LockInfo) (`custom` by default).
//! - `mode`: `exclusive`, `shared` or `permits`.
//! - `outcome` of an acquisition: `acquired`, or the
//!   [`LockError::kind`](crate::LockError::kind) of its failure (`locked`,
//!   `timeout`, `unavailable`, `lost`, `mode_conflict`, `invalid_name`).
//!   `wait_seconds` is the whole acquisition, waiting in line included.
//! - `outcome` of a lease renewal round: `ok` or `failed` (a failed round is
//!   retried while the lease's local deadline allows; a lease that runs out
//!   counts as a loss).
//! - `held` counts guards alive right now; `hold_seconds` is observed when a
//!   guard is released or dropped, from when it was acquired.

use std::time::Duration;

use crate::LockMode;

/// Series names, for dashboards and tests.
pub mod names {
    /// Acquisitions by backend, mode and outcome (counter).
    pub const ACQUISITIONS: &str = "tower_lease_lock_acquisitions_total";
    /// Time from asking to the outcome, in seconds (histogram).
    pub const WAIT_SECONDS: &str = "tower_lease_lock_wait_seconds";
    /// Time a lock was held, in seconds (histogram).
    pub const HOLD_SECONDS: &str = "tower_lease_lock_hold_seconds";
    /// Locks held right now (gauge).
    pub const HELD: &str = "tower_lease_lock_held";
    /// Leases granted (counter).
    pub const LEASE_GRANTS: &str = "tower_lease_lock_lease_grants_total";
    /// Lease renewal rounds by outcome (counter).
    pub const LEASE_RENEWALS: &str = "tower_lease_lock_lease_renewals_total";
    /// Leases lost: not renewed in time, or gone at the server (counter).
    pub const LEASE_LOSSES: &str = "tower_lease_lock_lease_losses_total";
    /// Watch streams replaced because they ended, failed or went quiet (counter).
    pub const WATCH_STREAM_RESTARTS: &str = "tower_lease_lock_watch_stream_restarts_total";
}

#[cfg(feature = "metrics")]
mod record {
    use std::sync::Once;

    use ::metrics::{
        counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
    };

    use super::names::*;

    /// Descriptions go to whichever recorder is installed at the first use.
    fn describe() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            describe_counter!(
                ACQUISITIONS,
                "Lock acquisitions by backend, mode and outcome."
            );
            describe_histogram!(
                WAIT_SECONDS,
                Unit::Seconds,
                "Time from asking for a lock to the outcome."
            );
            describe_histogram!(HOLD_SECONDS, Unit::Seconds, "Time a lock was held.");
            describe_gauge!(HELD, "Locks held right now.");
            describe_counter!(LEASE_GRANTS, "Leases granted.");
            describe_counter!(LEASE_RENEWALS, "Lease renewal rounds by outcome.");
            describe_counter!(
                LEASE_LOSSES,
                "Leases lost: not renewed in time, or gone at the server."
            );
            describe_counter!(
                WATCH_STREAM_RESTARTS,
                "Watch streams replaced because they ended, failed or went quiet."
            );
        });
    }

    pub(super) fn acquisition(
        backend: &'static str,
        mode: &'static str,
        outcome: &'static str,
        seconds: f64,
    ) {
        describe();
        let labels = [("backend", backend), ("mode", mode), ("outcome", outcome)];
        counter!(ACQUISITIONS, &labels).increment(1);
        histogram!(WAIT_SECONDS, &labels).record(seconds);
    }

    pub(super) fn held(backend: &'static str, mode: &'static str) {
        describe();
        gauge!(HELD, "backend" => backend, "mode" => mode).increment(1.0);
    }

    pub(super) fn released(backend: &'static str, mode: &'static str, seconds: f64) {
        describe();
        histogram!(HOLD_SECONDS, "backend" => backend, "mode" => mode).record(seconds);
        gauge!(HELD, "backend" => backend, "mode" => mode).decrement(1.0);
    }

    pub(super) fn count(name: &'static str, backend: &'static str) {
        describe();
        counter!(name, "backend" => backend).increment(1);
    }

    pub(super) fn renewal(backend: &'static str, outcome: &'static str) {
        describe();
        counter!(LEASE_RENEWALS, "backend" => backend, "outcome" => outcome).increment(1);
    }
}

/// An acquisition ended: `outcome` is `acquired` or the error's kind.
#[allow(unused_variables)]
pub(crate) fn acquisition(
    backend: &'static str,
    mode: LockMode,
    outcome: &'static str,
    waited: Duration,
) {
    #[cfg(feature = "metrics")]
    record::acquisition(backend, mode.label(), outcome, waited.as_secs_f64());
}

/// A guard was made: one more lock held.
#[allow(unused_variables)]
pub(crate) fn held(backend: &'static str, mode: LockMode) {
    #[cfg(feature = "metrics")]
    record::held(backend, mode.label());
}

/// A guard was released or dropped.
#[allow(unused_variables)]
pub(crate) fn released(backend: &'static str, mode: LockMode, held: Duration) {
    #[cfg(feature = "metrics")]
    record::released(backend, mode.label(), held.as_secs_f64());
}

/// A lease was granted.
#[allow(unused_variables)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))] // lease backends only
pub(crate) fn lease_granted(backend: &'static str) {
    #[cfg(feature = "metrics")]
    record::count(names::LEASE_GRANTS, backend);
}

/// A lease renewal round ended.
#[allow(unused_variables)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))] // lease backends only
pub(crate) fn lease_renewal(backend: &'static str, ok: bool) {
    #[cfg(feature = "metrics")]
    record::renewal(backend, if ok { "ok" } else { "failed" });
}

/// A lease was lost (not revoked on purpose).
#[allow(unused_variables)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))] // lease backends only
pub(crate) fn lease_lost(backend: &'static str) {
    #[cfg(feature = "metrics")]
    record::count(names::LEASE_LOSSES, backend);
}

/// A watch stream was given up and replaced.
#[allow(unused_variables)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))] // lease backends only
pub(crate) fn watch_stream_restarted(backend: &'static str) {
    #[cfg(feature = "metrics")]
    record::count(names::WATCH_STREAM_RESTARTS, backend);
}
