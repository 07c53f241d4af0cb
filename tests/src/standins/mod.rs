//! Stand-ins for cloud APIs: local servers answering in each vendor's real shapes, each its
//! own routes and state on the one harness ([`server::StandinServer`]).

pub mod digitalocean;
pub mod server;
pub mod vastai;
pub mod verda;
