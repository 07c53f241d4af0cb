//! A test host of its own: a network namespace joined to this one by a veth pair, with a
//! /30 of its own, created by the test and removed when dropped. Nodes booted in it reach the
//! coordinator only through the link, as a cloud machine would through its network.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TestNet {
    name: String,
    host_if: String,
    pub host_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestNet {
    /// Creates the namespace and its link. Needs root (the test suite runs as root in CI;
    /// elsewhere this fails saying so).
    pub fn create() -> Result<TestNet, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network-namespace tests need root: run scripts/test.sh as root".into());
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}{n}", std::process::id() & 0xffff);
        // 10.251.x.y/30 per net: pid-derived third octet, counter-derived fourth.
        let third = (std::process::id() % 250) as u8;
        let base = ((n % 63) * 4) as u8;
        let net = TestNet {
            name: format!("skyt{id}"),
            host_if: format!("skyh{id}"),
            host_ip: Ipv4Addr::new(10, 251, third, base + 1),
            node_ip: Ipv4Addr::new(10, 251, third, base + 2),
        };
        let node_if = format!("skyn{id}");
        ip(&["netns", "add", &net.name])?;
        let setup = (|| {
            ip(&[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &node_if,
            ])?;
            ip(&["link", "set", &node_if, "netns", &net.name])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", net.host_ip),
                "dev",
                &net.host_if,
            ])?;
            ip(&["link", "set", &net.host_if, "up"])?;
            let inside = ["netns", "exec", &net.name, "ip"];
            let run_inside = |rest: &[&str]| {
                let mut args: Vec<&str> = inside.to_vec();
                args.extend_from_slice(rest);
                ip(&args)
            };
            run_inside(&[
                "addr",
                "add",
                &format!("{}/30", net.node_ip),
                "dev",
                &node_if,
            ])?;
            run_inside(&["link", "set", &node_if, "up"])?;
            run_inside(&["link", "set", "lo", "up"])
        })();
        // Drop removes whatever part was made.
        setup.map(|()| net)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's end.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
