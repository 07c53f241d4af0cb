//! What a cloud node runs first: the user-data script (template in `deploy/bootstrap.sh`)
//! that installs and starts the agent with its pool's coordinator address, CA and token.

use std::io::Write;
use std::time::Duration;

use base64::Engine;

use crate::provider::NodeBootstrap;

const TEMPLATE: &str = include_str!("../../deploy/bootstrap.sh");

/// What every node of a pool is told in order to join it.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `host:port` agents dial over QUIC.
    pub coordinator: String,
    /// Hex SHA-256 of the pool CA.
    pub ca_pin: String,
    /// The pool CA certificate, PEM: nodes check the agent download against it.
    pub ca_pem: String,
    /// HTTPS URL of the agent binary (`{arch}` becomes the node's `uname -m`), for images
    /// without the agent preinstalled.
    pub agent_url: Option<String>,
    /// The agent exits when its coordinator is unreachable this long.
    pub lease: Duration,
    /// The coordinator dials the agents (which listen) instead of the other way round.
    pub reverse: bool,
}

impl Bootstrap {
    /// The user-data script for one node.
    pub fn user_data(&self, pool: &str, node: &NodeBootstrap) -> String {
        let fields = [
            ("@@POOL@@", shell_quote(pool)),
            ("@@NODE_ID@@", shell_quote(&node.node_id)),
            ("@@COORDINATOR@@", shell_quote(&self.coordinator)),
            ("@@CA_PIN@@", shell_quote(&self.ca_pin)),
            (
                "@@AGENT_URL@@",
                shell_quote(self.agent_url.as_deref().unwrap_or("")),
            ),
            ("@@LEASE@@", format!("{}s", self.lease.as_secs())),
            ("@@TOKEN@@", shell_quote(&node.token)),
            ("@@CA_PEM@@", self.ca_pem.trim_end().to_string()),
        ];
        fields
            .iter()
            .fold(TEMPLATE.to_string(), |script, (field, value)| {
                script.replace(field, value)
            })
    }
}

/// The same script gzipped and base64-encoded inside a two-line loader, for providers with
/// tight limits on startup scripts (VastAI: 4 KiB).
pub fn compress(script: &str) -> String {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(script.as_bytes()).expect("writing to memory");
    let packed =
        base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("writing to memory"));
    format!("#!/bin/sh\necho '{packed}' | base64 -d | gunzip -c | sh\n")
}

/// Quotes a value for POSIX sh: single quotes, with embedded ones spelled '\''.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap() -> Bootstrap {
        Bootstrap {
            coordinator: "203.0.113.7:7443".into(),
            ca_pin: "ab".repeat(32),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            agent_url: Some("https://203.0.113.7:7443/agent/linux-{arch}".into()),
            lease: Duration::from_secs(600),
            reverse: false,
        }
    }

    fn node() -> NodeBootstrap {
        NodeBootstrap {
            node_id: "node-2".into(),
            token: "tok'en".into(),
        }
    }

    #[test]
    fn every_field_is_filled_and_quoted() {
        let script = bootstrap().user_data("sky-1", &node());
        assert!(!script.contains("@@"), "unfilled field in:\n{script}");
        assert!(script.contains("node_id='node-2'"));
        assert!(script.contains(r"token='tok'\''en'"));
        assert!(script.contains("lease=600s"));
        assert!(script
            .contains("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\nSKYWARD_CA"));
    }

    #[test]
    fn the_script_is_valid_sh() {
        let script = bootstrap().user_data("sky-1", &node());
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .expect("sh");
        assert!(status.success());
    }

    #[test]
    fn compressed_scripts_fit_vastai_and_unpack_to_the_original() {
        let script = bootstrap().user_data("sky-1", &node());
        let packed = compress(&script);
        assert!(packed.len() < 4096, "{} bytes", packed.len());
        let out = std::process::Command::new("sh")
            .args(["-c", &packed.replace("| sh\n", "\n")])
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), script);
    }
}
