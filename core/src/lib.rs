//! Skyward's pure core: every rule that decides something, with no I/O and no async runtime.
//! What a pool asks for ([`spec`], [`catalog`]: user names and every vendor's naming for
//! accelerators), what providers offer and in which order to try it ([`offer`],
//! [`selection`]), GPU slots and placement ([`slots`], [`schedule`]), a broadcast's training
//! environment ([`training`]), which node holds each of a pool's places and when a lost one is replaced ([`membership`]), output sequence checking ([`task`]), bootstrap tokens
//! ([`tokens`]), pre-authentication admission ([`admission`]) and the pool's lifecycle
//! ([`lifecycle`]).

pub mod admission;
pub mod catalog;
pub mod jobs;
pub mod lifecycle;
pub mod membership;
pub mod offer;
pub mod pool_state;
pub mod roster;
pub mod schedule;
pub mod selection;
pub mod slots;
pub mod spec;
pub mod task;
pub mod tokens;
pub mod training;
