//! A stand-in for a cloud machine booting: runs a node's user-data the way cloud-init (or
//! VastAI's onstart) would, in a directory of its own, with `skyward-agent` preinstalled on
//! its PATH. Destroying the node kills every process it started, as a deleted VM would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use crate::netns::TestNet;
use crate::{bin, processes_under};

/// How long a user-data script may take to finish (it starts the agent in the background).
const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// Under a cloud's boot root, the tools every machine of its image has on its PATH.
pub const IMAGE_TOOLS: &str = "image/bin";

/// What a node would power itself off with; each is faked on every node.
const POWER_COMMANDS: [&str; 4] = ["poweroff", "shutdown", "systemctl", "halt"];
/// Under a node's dir, the calls of those fakes, one line each.
const POWER_LOG: &str = "power.log";

pub struct BootedNode {
    dir: PathBuf,
    /// What the user-data script printed, for failure messages.
    pub boot_log: String,
    /// The node's own network, when it has one (removed after its processes are killed).
    net: Option<TestNet>,
}

impl BootedNode {
    /// Runs `user_data` as the node's first boot, in `root/<name>`, on an image with the
    /// agent preinstalled.
    pub fn boot(root: &Path, name: &str, user_data: &str) -> Result<BootedNode, String> {
        Self::boot_image(root, name, user_data, true)
    }

    /// Like [`boot`](Self::boot); `agent_preinstalled: false` is a stock image, where the
    /// bootstrap has to download the agent.
    pub fn boot_image(
        root: &Path,
        name: &str,
        user_data: &str,
        agent_preinstalled: bool,
    ) -> Result<BootedNode, String> {
        Self::boot_on(root, name, user_data, agent_preinstalled, None)
    }

    /// Boots on a host of its own: a network namespace with its own address (see
    /// [`address`](Self::address)), as a cloud machine with a public IP, on an image with the
    /// agent preinstalled. Needs root.
    pub fn boot_isolated(root: &Path, name: &str, user_data: &str) -> Result<BootedNode, String> {
        let net = TestNet::create()?;
        let mut node = Self::boot_on(root, name, user_data, true, Some(&net))?;
        node.net = Some(net);
        Ok(node)
    }

    /// The node's address on its own network, when it boots isolated.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.net.as_ref().map(|net| net.node_ip)
    }

    /// The node's own network, when it boots isolated (to run commands inside it).
    pub fn net(&self) -> Option<&TestNet> {
        self.net.as_ref()
    }

    /// Boots inside `net` (a network namespace of the test's own) when given.
    pub fn boot_on(
        root: &Path,
        name: &str,
        user_data: &str,
        agent_preinstalled: bool,
        net: Option<&crate::netns::TestNet>,
    ) -> Result<BootedNode, String> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let script = dir.join("user-data");
        std::fs::write(&script, user_data).map_err(|e| e.to_string())?;
        let agent_dir = bin("skyward-agent")
            .parent()
            .expect("agent dir")
            .to_path_buf();
        let mut system_path = std::env::var("PATH").unwrap_or_default();
        // The machine image's own tools (a GPU image's nvidia-smi, faked by the test).
        let image_tools = root.join(IMAGE_TOOLS);
        if image_tools.is_dir() {
            system_path = format!("{}:{system_path}", image_tools.display());
        }
        // A node powering itself off must not power off the machine the tests run on: the
        // commands that would are, first on its PATH, ones that only say they were called.
        let guard = dir.join("power-guard");
        std::fs::create_dir_all(&guard).map_err(|e| format!("{}: {e}", guard.display()))?;
        for command in POWER_COMMANDS {
            let fake = guard.join(command);
            std::fs::write(
                &fake,
                format!(
                    "#!/bin/sh\necho \"{command} $*\" >> '{}'\n",
                    dir.join(POWER_LOG).display()
                ),
            )
            .map_err(|e| format!("{}: {e}", fake.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        system_path = format!("{}:{system_path}", guard.display());
        let path = if agent_preinstalled {
            format!("{}:{system_path}", agent_dir.display())
        } else {
            system_path
        };
        let mut argv: Vec<String> = net.map(|n| n.exec_prefix()).unwrap_or_default();
        argv.push("sh".into());
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .arg(&script)
            .current_dir(&dir)
            .env("PATH", path)
            .env("SKYWARD_DIR", dir.join("skyward"))
            // A node watching EC2's metadata service must never reach the real, link-local
            // one: a closed loopback port stands in for it.
            .env("SKYWARD_IMDS", "127.0.0.1:9")
            // Never install a systemd unit on the test machine itself.
            .env("SKYWARD_NO_SYSTEMD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running user-data: {e}"))?;
        let deadline = Instant::now() + BOOT_LIMIT;
        loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(_) => break,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    return Err(format!(
                        "user-data of {name} did not finish in {BOOT_LIMIT:?}"
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let boot_log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!(
                "user-data of {name} failed ({}): {boot_log}",
                out.status
            ));
        }
        Ok(BootedNode {
            dir,
            boot_log,
            net: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The power commands the node ran (`poweroff`, `shutdown -h now`...), one per line.
    pub fn power_calls(&self) -> String {
        std::fs::read_to_string(self.dir.join(POWER_LOG)).unwrap_or_default()
    }

    /// The agent's log, for failure messages.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("skyward/agent.log")).unwrap_or_default()
    }

    /// Kills every process the node started, as deleting the machine would.
    pub fn destroy(&self) {
        for (pid, _) in processes_under(&self.dir) {
            // SAFETY: signalling a process by pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for BootedNode {
    fn drop(&mut self) {
        self.destroy();
        // The namespace goes once nothing runs in it any more.
        if let Some(net) = self.net.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !processes_under(&self.dir).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(net);
        }
    }
}
