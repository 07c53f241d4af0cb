//! What a cloud node runs first: the user-data script (template in `deploy/bootstrap.sh`)
//! that installs and starts the agent with its pool's coordinator address, CA and token.

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;

use crate::NodeBootstrap;

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
    /// The agent URL is the coordinator's own, trusted through the pool CA alone; a URL of
    /// the user's is trusted through the node's system CAs.
    pub agent_url_pinned: bool,
    /// The agent binary's SHA-256 (hex) per `uname -m` (`*`: any): the bootstrap runs a
    /// downloaded agent only if its digest is listed here.
    pub agent_sha256: Vec<(String, String)>,
    /// The agent exits when its coordinator is unreachable this long.
    pub lease: Duration,
    /// Set when the coordinator dials the agents (which listen) instead of the other way round.
    pub reverse: Option<Reverse>,
    /// The MIG layout the agent gives every GPU before it reports its inventory.
    pub mig: Option<String>,
    /// When the pool ends whatever happens (its TTL), in Unix seconds.
    pub deadline: Option<u64>,
    /// Which interruption notices the agent watches (`aws`: EC2's spot instance action).
    pub spot_watch: Option<String>,
}

/// UDP port cloud agents listen on when the coordinator dials them (`--reverse`).
pub const AGENT_PORT: u16 = 7444;

/// How a coordinator that nodes cannot reach (behind NAT) reaches listening agents instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reverse {
    /// The UDP port agents listen on.
    pub agent_port: u16,
    /// The one address the agent port is opened to: where the coordinator's traffic comes
    /// from. `None` only for local nodes, which need no firewall.
    pub allow_from: Option<IpAddr>,
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
            (
                "@@AGENT_CA@@",
                (if self.agent_url_pinned {
                    "pool"
                } else {
                    "system"
                })
                .to_string(),
            ),
            (
                "@@LISTEN@@",
                shell_quote(
                    &self
                        .reverse
                        .as_ref()
                        .map(|r| format!("0.0.0.0:{}", r.agent_port))
                        .unwrap_or_default(),
                ),
            ),
            (
                "@@AGENT_SHA256@@",
                shell_quote(
                    &self
                        .agent_sha256
                        .iter()
                        .map(|(arch, digest)| format!("{arch}={digest}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
            ),
            ("@@MIG@@", shell_quote(self.mig.as_deref().unwrap_or(""))),
            ("@@LEASE@@", format!("{}s", self.lease.as_secs())),
            (
                "@@SPOT_WATCH@@",
                shell_quote(self.spot_watch.as_deref().unwrap_or("")),
            ),
            (
                "@@DEADLINE@@",
                self.deadline.map(|d| d.to_string()).unwrap_or_default(),
            ),
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
            agent_url_pinned: true,
            agent_sha256: vec![("x86_64".into(), "cd".repeat(32))],
            lease: Duration::from_secs(600),
            reverse: None,
            mig: None,
            deadline: None,
            spot_watch: None,
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

    /// A node whose token is as the coordinator makes them (no shell metacharacters): the
    /// agent's env file is sourced by sh and read by systemd alike.
    fn plain_node() -> NodeBootstrap {
        NodeBootstrap {
            node_id: "node-2".into(),
            token: "t0ken".into(),
        }
    }

    /// Runs `script` as a node's first boot, in a fresh directory with a fake agent on PATH
    /// that records its environment, and returns that environment.
    fn boot_with_fake_agent(script: &str) -> String {
        let dir = std::env::temp_dir().join(format!(
            "skyward-bootstrap-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let env_file = dir.join("agent-env");
        let fake = dir.join("bin/skyward-agent");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nenv > {}.part && mv {0}.part {0}\n",
                env_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!(
            "{}:{}",
            dir.join("bin").display(),
            std::env::var("PATH").unwrap()
        );
        let boot = std::process::Command::new("sh")
            .args(["-c", script])
            .env("PATH", path)
            .env("SKYWARD_DIR", dir.join("skyward"))
            .env("SKYWARD_NO_SYSTEMD", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh");
        assert!(
            boot.status.success(),
            "{}",
            String::from_utf8_lossy(&boot.stderr)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let env = loop {
            if let Ok(env) = std::fs::read_to_string(&env_file) {
                break env;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_dir_all(&dir);
        env
    }

    #[test]
    fn by_default_the_agent_dials_the_coordinator() {
        let env = boot_with_fake_agent(&bootstrap().user_data("sky-1", &plain_node()));
        assert!(
            env.contains("SKYWARD_COORDINATOR=203.0.113.7:7443\n"),
            "{env}"
        );
        assert!(!env.contains("SKYWARD_LISTEN"), "{env}");
        assert!(env.contains("SKYWARD_NODE_ID=node-2\n"), "{env}");
    }

    #[test]
    fn reversed_the_agent_listens_on_the_agent_port_and_dials_nothing() {
        let mut reversed = bootstrap();
        reversed.reverse = Some(Reverse {
            agent_port: AGENT_PORT,
            allow_from: Some("198.51.100.4".parse().unwrap()),
        });
        let env = boot_with_fake_agent(&reversed.user_data("sky-1", &plain_node()));
        assert!(env.contains("SKYWARD_LISTEN=0.0.0.0:7444\n"), "{env}");
        assert!(!env.contains("SKYWARD_COORDINATOR"), "{env}");
        assert!(!env.contains("SKYWARD_MIG"), "{env}");
    }

    #[test]
    fn a_mig_layout_reaches_the_agent() {
        let mut partitioned = bootstrap();
        partitioned.mig = Some("3g.40gb,2g.20gb,1g.10gb".into());
        let env = boot_with_fake_agent(&partitioned.user_data("sky-1", &plain_node()));
        assert!(
            env.contains("SKYWARD_MIG=3g.40gb,2g.20gb,1g.10gb\n"),
            "{env}"
        );
    }

    #[test]
    fn cloud_agents_power_off_when_the_pool_ends_and_know_its_deadline() {
        let env = boot_with_fake_agent(&bootstrap().user_data("sky-1", &plain_node()));
        assert!(env.contains("SKYWARD_ON_POOL_END=poweroff\n"), "{env}");
        assert!(
            !env.contains("SKYWARD_DEADLINE"),
            "no TTL, no deadline: {env}"
        );
        let mut bounded = bootstrap();
        bounded.deadline = Some(1_900_000_000);
        let env = boot_with_fake_agent(&bounded.user_data("sky-1", &plain_node()));
        assert!(env.contains("SKYWARD_DEADLINE=1900000000\n"), "{env}");
        assert!(!env.contains("SKYWARD_SPOT_WATCH"), "{env}");
        let mut on_aws = bootstrap();
        on_aws.spot_watch = Some("aws".into());
        let env = boot_with_fake_agent(&on_aws.user_data("sky-1", &plain_node()));
        assert!(env.contains("SKYWARD_SPOT_WATCH=aws\n"), "{env}");
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
