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
    /// The namespace's end of the link.
    node_if: String,
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
            node_if: format!("skyn{id}"),
            host_ip: Ipv4Addr::new(10, 251, third, base + 1),
            node_ip: Ipv4Addr::new(10, 251, third, base + 2),
        };
        let node_if = net.node_if.clone();
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

impl TestNet {
    /// Takes the link between this host and the namespace down (a partition) or up again.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }

    /// Slows what the namespace sends to `rate` (`tc`'s units: `80mbit`), so that a transfer
    /// lasts long enough to be cut off partway.
    pub fn limit_rate(&self, rate: &str) -> Result<(), String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "tc", "qdisc", "add", "dev"])
            .args([&self.node_if, "root", "tbf", "rate", rate])
            .args(["burst", "32kbit", "latency", "400ms"])
            .output()
            .map_err(|e| format!("tc: {e} (install iproute2)"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "tc qdisc add ... tbf rate {rate}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// This machine's end of the link (what [`TestNet::set_link`] takes down and up).
    pub fn host_interface(&self) -> &str {
        &self.host_if
    }

    /// The namespace's name, for `ip -n` and `ip netns exec`.
    pub fn namespace(&self) -> &str {
        &self.name
    }

    /// Runs `argv` inside the namespace; its failure says what ran and what it printed.
    pub fn exec(&self, argv: &[&str]) -> Result<(), String> {
        let prefix = self.exec_prefix();
        let out = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(argv)
            .output()
            .map_err(|e| format!("running {} in {}: {e}", argv.join(" "), self.name))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} in {}: {}",
                argv.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// Several test hosts that share a private network, as a cloud's machines share a VPC (or
/// VastAI's an overlay): each host is a [`TestNet`] (its own namespace, whose /30 link to this
/// machine carries its traffic to the coordinator) with an `eth0` on a switch, a bridge in a
/// namespace of its own, addressed in [`PRIVATE_NET`]/24. This machine has no address on the
/// switch and no route to it, and the hosts have no route through this machine to each
/// other: they meet on the switch or not at all. Everything is removed when dropped.
pub struct TestCluster {
    pub hosts: Vec<TestNet>,
    switch: String,
}

/// The first three octets of the hosts' private network. It exists only inside the test's
/// namespaces, so concurrent test processes may each have one.
pub const PRIVATE_NET: [u8; 3] = [10, 251, 250];

impl TestCluster {
    /// Creates `hosts` hosts on one switch. Needs root, like [`TestNet::create`].
    pub fn create(hosts: usize) -> Result<TestCluster, String> {
        assert!((1..=200).contains(&hosts), "1 to 200 hosts");
        let mut cluster = TestCluster {
            hosts: Vec::new(),
            switch: String::new(),
        };
        for _ in 0..hosts {
            cluster.hosts.push(TestNet::create()?);
        }
        // Named after the first host's namespace, unique per test process and host.
        cluster.switch = format!("{}s", cluster.hosts[0].name);
        ip(&["netns", "add", &cluster.switch])?;
        let sw = cluster.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let coordinator = cluster.coordinator_ip().to_string();
        for (index, host) in cluster.hosts.iter().enumerate() {
            let port = format!("port{index}");
            // Made inside the namespaces: no name is ever taken on this machine.
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &host.name,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            let address = format!("{}/24", cluster.private_ip(index));
            ip(&["-n", &host.name, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", &host.name, "link", "set", "eth0", "up"])?;
            // The coordinator listens on the first host's link; the others reach it through
            // their own, as local delivery on this machine (nothing is forwarded).
            if index > 0 {
                let via = host.host_ip.to_string();
                ip(&[
                    "-n",
                    &host.name,
                    "route",
                    "add",
                    &format!("{coordinator}/32"),
                    "via",
                    &via,
                ])?;
            }
        }
        Ok(cluster)
    }

    /// Where a coordinator for the hosts listens: this machine's end of the first host's link.
    pub fn coordinator_ip(&self) -> Ipv4Addr {
        self.hosts[0].host_ip
    }

    /// Host `index`'s address on the private network (`eth0`).
    pub fn private_ip(&self, index: usize) -> Ipv4Addr {
        let [a, b, c] = PRIVATE_NET;
        Ipv4Addr::new(a, b, c, index as u8 + 1)
    }

    /// Cuts host `index` off the private network at the switch, as a pulled cable would; its
    /// link to the coordinator stays.
    pub fn cut(&self, index: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("port{index}"),
            "down",
        ])
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The switch's ends go with its namespace, the hosts' `eth0` with them; the hosts
        // remove themselves.
        if !self.switch.is_empty() {
            let _ = ip(&["netns", "del", &self.switch]);
        }
    }
}
