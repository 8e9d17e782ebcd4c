#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms)]

#[cfg(feature = "azure")]
#[cfg_attr(docsrs, doc(cfg(feature = "azure")))]
pub mod azure;
mod error;
mod guard;
mod locker;
mod lost;
mod memory;
pub mod metrics;
mod mode;
mod name;
pub mod store;
mod trace;

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub mod dynamodb;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod layer;

#[cfg(feature = "test-util")]
pub mod testing;

/// The etcd client this crate is built on, re-exported: its types are part of
/// this crate's API ([`Client`](etcd_client::Client) builds an
/// [`EtcdLocker`](etcd::EtcdLocker); [`Compare`](etcd_client::Compare),
/// [`TxnOp`](etcd_client::TxnOp) and [`TxnResponse`](etcd_client::TxnResponse)
/// make fenced writes). Use it rather than a direct dependency on
/// `etcd-client`, so that the versions always match.
#[cfg(feature = "etcd")]
pub use etcd_client;

pub use error::{BoxError, Holder, LockError};
pub use guard::{BoxFuture, LockGuard, LockInfo, Release};
pub use layer::{Key, LockLayer};
pub use locker::{Locker, Wait};
pub use lost::{LostSignal, LostTrigger};
pub use memory::MemoryLocker;
pub use mode::LockMode;
pub use name::{InvalidName, LockName, MAX_NAME_LEN};
