//! The Skyward coordinator: pools, providers, the QUIC endpoint agents dial, scheduling,
//! and the `skyward` CLI built on them.
//!
//! The pure parts ([`lifecycle`], [`schedule`], [`slots`], [`task`], [`tokens`],
//! [`training`]) hold every rule and do no I/O; [`server`], [`pool`], [`run`] and
//! [`preflight`] are the async shell that moves bytes and timers. [`api`] is the library
//! API for programs: `ComputePool::builder()...build()`, commands and typed tasks.

pub mod admission;
pub mod api;
pub mod bootstrap;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod download;
pub mod envfile;
pub mod job;
pub mod lifecycle;
pub mod offer;
pub mod output;
pub mod persistent;
pub mod plan;
pub mod pool;
pub mod preflight;
pub mod provider;
pub mod run;
pub mod schedule;
pub mod selection;
pub mod server;
pub mod session;
pub mod slots;
pub mod spec;
pub mod store;
pub mod task;
pub mod tcp;
pub mod tokens;
pub mod training;
pub mod workdir;

pub use pool::Pool;
pub use selection::Selection;
pub use server::{
    Advertise, Coordinator, CoordinatorConfig, CoordinatorEvent, NodeHandle, Rejection,
};
pub use spec::{Allocation, PoolSpec};
