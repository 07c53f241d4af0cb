//! Shared ground between the Skyward coordinator and agent: the wire protocol
//! ([`protocol`], framed by [`frame`], encoded by [`codec`], bounded by [`limits`]),
//! identities and TLS configuration ([`identity`], [`transport`]) and the
//! inventory model ([`inventory`], with the MIG layout a pool asks for in [`mig`]), and the
//! [`typed`] task trait that a coordinator program and its custom agent share.

pub mod codec;
pub mod frame;
pub mod identity;
pub mod inventory;
pub mod limits;
pub mod mig;
pub mod protocol;
pub mod transport;
pub mod typed;
pub mod workdir;

/// The version every Skyward binary reports; agents and coordinators compare it on connect.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Installs ring as the process-wide rustls crypto provider.
///
/// rustls refuses to pick one by itself when more than one provider is linked (the cloud SDKs
/// bring aws-lc-rs), so every binary calls this first. Calling it twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
