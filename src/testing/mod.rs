//! Throwaway servers and network faults for tests (feature `test-util`).
//!
//! - [`EtcdServer::start`] runs the `etcd` binary (or `$ETCD_BIN`) on free
//!   loopback ports with a temporary data dir, waits until it answers, and
//!   kills it when dropped. [`EtcdCluster::start`] does the same for three
//!   members, for fault tests that kill, pause or restart one.
//! - [`EtcdServer::builder`] starts one as production etcd runs: with TLS
//!   (feature `tls`; a CA and certificates made at start, client
//!   certificates optional) and auth (a root user, then users with a role of
//!   their own, [`EtcdServer::add_user`]), and
//!   [`EtcdServer::connect_options`] matches a client to it.
//! - [`TcpProxy`] sits between a client and one server on loopback, in
//!   process: it passes traffic, blackholes it (accepts and holds, never
//!   answers, never resets), or cuts its connections, to test partitions
//!   without root or new processes.
//! - [`Azurite`] (feature `azure` too) runs Azurite's blob service and
//!   [`Dynalite`] (feature `dynamodb` too) runs dynalite, the emulators of
//!   the Azure blob lease and DynamoDB backends, on free loopback ports with
//!   in-memory storage, killed when dropped; they hand out SDK clients set
//!   up for them. Install them with `scripts/ensure-emulators.sh` (npm), or
//!   name the programs with `$TLL_AZURITE_BIN` and `$TLL_DYNALITE_BIN`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_lease_lock::etcd::EtcdLocker;
//! use tower_lease_lock::testing::{EtcdServer, TcpProxy};
//!
//! let etcd = EtcdServer::start().await?;
//! let proxy = TcpProxy::start(&etcd.endpoints()[0]).await?;
//! let locker = EtcdLocker::connect([proxy.endpoint()], None).await?.build()?;
//! proxy.blackhole(); // the locker is now cut off from etcd, silently
//! # Ok(()) }
//! ```

mod auth;
#[cfg(feature = "azure")]
mod azurite;
mod builder;
#[cfg(feature = "dynamodb")]
mod dynalite;
#[cfg(any(feature = "azure", feature = "dynamodb"))]
mod emulator;
mod etcd;
mod proxy;
#[cfg(feature = "tls")]
mod tls;

pub use auth::Credentials;
#[cfg(feature = "azure")]
#[cfg_attr(docsrs, doc(cfg(feature = "azure")))]
pub use azurite::Azurite;
pub use builder::EtcdServerBuilder;
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use dynalite::Dynalite;
pub use etcd::{free_port, EtcdCluster, EtcdMember, EtcdServer, DATA_DIR_PREFIX};
pub use proxy::{ProxyMode, TcpProxy};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tls::{TestCertificates, CLIENT_CERT_NAME};

/// Sends `sig` (`STOP`, `CONT`, ...) to a process this module started, by
/// pid, through the `kill` command.
fn signal(pid: u32, sig: &str) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{sig} {pid}: {status}"
        )))
    }
}
