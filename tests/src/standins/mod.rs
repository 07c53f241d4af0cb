//! Stand-ins for cloud APIs: local servers answering in each vendor's real shapes.

pub mod digitalocean;
pub mod vastai;
pub mod verda;
