#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms)]

mod error;
mod guard;
mod locker;
mod memory;
mod mode;
mod name;
mod trace;

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod layer;

#[cfg(feature = "test-util")]
pub mod testing;

pub use error::{BoxError, Holder, LockError};
pub use guard::{BoxFuture, LockGuard, LockInfo, LostSignal, LostTrigger, Release};
pub use layer::{Key, LockLayer};
pub use locker::{Locker, Wait};
pub use memory::MemoryLocker;
pub use mode::LockMode;
pub use name::{InvalidName, LockName, MAX_NAME_LEN};
