//! The Skyward coordinator, the async shell around the pure core (`skyward-core`): the QUIC
//! endpoint agents dial ([`server`], with [`tcp`] and [`download`] on its TCP port), pools
//! brought up, kept at their size and torn down through providers ([`pool`], [`keeper`],
//! [`plan`]), jobs run and streamed
//! ([`job`], [`run`], [`preflight`]), workdir syncs and downloads ([`workdir`]), one pool from
//! its record to its teardown ([`session`]) and the on-disk record of pools ([`store`]).
//! The `skyward` library crate and the `skyward` command line are both built on it.

pub mod download;
pub mod job;
pub mod keeper;
pub mod plan;
pub mod pool;
pub mod preflight;
pub mod run;
pub mod server;
pub mod session;
pub mod store;
pub mod tcp;
pub mod workdir;

pub use pool::Pool;
pub use server::{
    Advertise, Coordinator, CoordinatorConfig, CoordinatorEvent, NodeHandle, Rejection,
};
