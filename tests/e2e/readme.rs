//! The README's cloud commands, as a user types them, against every stand-in at once: EC2
//! (moto), Verda, VastAI and DigitalOcean, each reached through its base-URL variable. The
//! machines they create boot from their user-data with a fake `nvidia-smi` in their image.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use skyward_tests::moto::{Hypervisor, Moto};
use skyward_tests::node::IMAGE_TOOLS;
use skyward_tests::standins::digitalocean::{self, DigitalOceanStandIn};
use skyward_tests::standins::vastai::{self, VastAiStandIn};
use skyward_tests::standins::verda::{self, VerdaStandin};
use skyward_tests::{run, Finished, Sandbox};

const LIMIT: Duration = Duration::from_secs(240);

/// A GPU image's `nvidia-smi`: eight A100s, answering what the agent asks and, bare, a line
/// naming the machine.
const FAKE_NVIDIA_SMI: &str = r#"#!/bin/sh
case "$*" in
--query-gpu=*)
    for i in 0 1 2 3 4 5 6 7; do
        echo "$i, GPU-00000000-0000-4000-8000-00000000000$i, NVIDIA A100-SXM4-40GB, 40960, 0, 0, 550.54.15, Disabled, Disabled"
    done ;;
-L)
    for i in 0 1 2 3 4 5 6 7; do
        echo "GPU $i: NVIDIA A100-SXM4-40GB (UUID: GPU-00000000-0000-4000-8000-00000000000$i)"
    done ;;
"")
    echo "nvidia-smi on $SKYWARD_NODE_ID: 8 x NVIDIA A100-SXM4-40GB" ;;
*)
    echo "fake nvidia-smi: unexpected arguments: $*" >&2
    exit 2 ;;
esac
"#;

fn install_image_tools(boot_root: &Path) {
    let tools = boot_root.join(IMAGE_TOOLS);
    std::fs::create_dir_all(&tools).unwrap();
    let path = tools.join("nvidia-smi");
    std::fs::write(&path, FAKE_NVIDIA_SMI).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Clouds {
    sandbox: Sandbox,
    moto: Moto,
    _hypervisor: Hypervisor,
    verda: VerdaStandin,
    vast: VastAiStandIn,
    ocean: DigitalOceanStandIn,
}

impl Clouds {
    async fn start() -> Clouds {
        let sandbox = Sandbox::new();
        let moto = Moto::start();
        let ec2_root = sandbox.path().join("ec2");
        install_image_tools(&ec2_root);
        let hypervisor = Hypervisor::start(&moto.url, ec2_root);
        let verda = VerdaStandin::start(&sandbox.path().join("verda"));
        let vast = VastAiStandIn::start(&sandbox.path().join("vast")).await;
        // VastAI's market: an A100 and an H100 host (its stand-in starts with none).
        vast.add_offer(
            json!({"id": 1, "gpu_name": "A100 SXM4", "gpu_ram": 40960, "dph_total": 0.79}),
        );
        vast.add_offer(
            json!({"id": 2, "gpu_name": "H100 SXM", "gpu_ram": 81559, "dph_total": 1.65}),
        );
        let ocean = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
        Clouds {
            sandbox,
            moto,
            _hypervisor: hypervisor,
            verda,
            vast,
            ocean,
        }
    }

    /// `skyward ARGS`, with every provider's credentials and base URL pointing at its
    /// stand-in, and nothing else of the test machine's environment that could reach a cloud.
    async fn skyward(&self, args: &[&str]) -> Finished {
        let mut cmd = self.sandbox.skyward();
        cmd.env_remove("XDG_CONFIG_HOME")
            .env("HOME", self.sandbox.path().join("user"))
            .env("AWS_ENDPOINT_URL", &self.moto.url)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("VERDA_BASE_URL", self.verda.url())
            .env("VERDA_CLIENT_ID", verda::CLIENT_ID)
            .env("VERDA_CLIENT_SECRET", verda::CLIENT_SECRET)
            .env("VAST_URL", self.vast.url())
            .env("VAST_API_KEY", vastai::KEY)
            .env("DIGITALOCEAN_API_URL", self.ocean.url())
            .env("DIGITALOCEAN_TOKEN", digitalocean::TOKEN)
            .args(args);
        tokio::task::spawn_blocking(move || run(&mut cmd, LIMIT))
            .await
            .unwrap()
    }

    /// Every cloud's machines are gone, and every process they ran.
    async fn assert_nothing_left(&self) {
        let ec2 = skyward_tests::moto::client(&self.moto.url).await;
        let described = ec2.describe_instances().send().await.unwrap();
        let live: Vec<_> = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
            .filter_map(|i| i.instance_id())
            .collect();
        assert!(live.is_empty(), "EC2 instances left: {live:?}");
        assert!(
            self.verda.live_instances().is_empty(),
            "Verda instances left"
        );
        assert!(
            self.vast.instances().iter().all(|i| i.doomed),
            "VastAI instances left: {:?}",
            self.vast.instances()
        );
        assert!(self.ocean.droplets().is_empty(), "droplets left");
        let left = self.sandbox.wait_for_no_processes(Duration::from_secs(10));
        assert!(left.is_empty(), "processes left: {left:?}");
    }

    /// How many machines each provider was asked to create so far (destroyed ones too).
    async fn created(&self) -> [(&'static str, usize); 3] {
        let ec2 = skyward_tests::moto::client(&self.moto.url).await;
        let described = ec2.describe_instances().send().await.unwrap();
        let aws = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .count();
        [
            ("aws", aws),
            ("verda", self.verda.instances().len()),
            ("vastai", self.vast.rentals().len()),
        ]
    }
}

fn json(out: &Finished) -> Vec<Value> {
    assert_eq!(out.code, Some(0), "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_cloud_commands_work_against_the_stand_ins() {
    let clouds = Clouds::start().await;

    // skyward offers --accelerator A100 --provider aws,verda,vastai
    let out = clouds
        .skyward(&[
            "offers",
            "--accelerator",
            "A100",
            "--provider",
            "aws,verda,vastai",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // The table's first line is its border; the second names the columns.
    let header = out.stdout.lines().nth(1).unwrap_or_default().to_lowercase();
    for column in [
        "provider",
        "region",
        "instance",
        "accelerator",
        "vcpu",
        "ram",
        "on-demand",
        "spot",
    ] {
        assert!(header.contains(column), "{column} in {header:?}");
    }
    let offers = json(
        &clouds
            .skyward(&[
                "offers",
                "--accelerator",
                "A100",
                "--provider",
                "aws,verda,vastai",
                "--json",
            ])
            .await,
    );
    for provider in ["aws", "verda", "vastai"] {
        assert!(
            offers.iter().any(|o| o["provider"] == provider
                && o["accelerator"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("A100"))),
            "{provider} offers an A100: {offers:#?}"
        );
    }

    // skyward run --provider aws --accelerator A100 --nodes 2 --allocation spot-if-available -- nvidia-smi
    let out = clouds
        .skyward(&[
            "run",
            "--provider",
            "aws",
            "--accelerator",
            "A100",
            "--nodes",
            "2",
            "--allocation",
            "spot-if-available",
            "--on",
            "all",
            "--",
            "nvidia-smi",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for node in ["node-1", "node-2"] {
        assert!(
            out.stdout
                .contains(&format!("nvidia-smi on {node}: 8 x NVIDIA A100-SXM4-40GB")),
            "{}",
            out.stdout
        );
    }
    let ec2 = skyward_tests::moto::client(&clouds.moto.url).await;
    let described = ec2.describe_instances().send().await.unwrap();
    let lifecycles: Vec<String> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            i.instance_lifecycle()
                .map(|l| l.as_str().to_string())
                .unwrap_or_else(|| "on-demand".into())
        })
        .collect();
    assert_eq!(lifecycles, ["spot", "spot"], "spot first");
    clouds.assert_nothing_left().await;

    // skyward run --provider aws,verda,vastai --selection cheapest --accelerator H100 -- python3 train.py
    let offers = json(
        &clouds
            .skyward(&[
                "offers",
                "--accelerator",
                "H100",
                "--provider",
                "aws,verda,vastai",
                "--json",
            ])
            .await,
    );
    let cheapest = offers
        .iter()
        .filter(|o| o["available"] == true && o["on_demand_per_hour"].is_f64())
        .min_by(|a, b| {
            a["on_demand_per_hour"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["on_demand_per_hour"].as_f64().unwrap())
        })
        .expect("H100 offers");
    let provider = cheapest["provider"].as_str().unwrap().to_string();
    let before = clouds.created().await;
    let out = clouds
        .skyward(&[
            "run",
            "--provider",
            "aws,verda,vastai",
            "--selection",
            "cheapest",
            "--accelerator",
            "H100",
            "--",
            "python3",
            "-c",
            "print('trained on', 6 * 7)",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "trained on 42");
    let after = clouds.created().await;
    let grew: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.1 > b.1)
        .map(|(_, a)| a.0)
        .collect();
    assert_eq!(
        grew,
        [provider.as_str()],
        "the cheapest ({cheapest}) was used"
    );
    clouds.assert_nothing_left().await;

    // skyward run --provider digitalocean --cpu 4 --memory 8GB -- make test
    let out = clouds
        .skyward(&[
            "run",
            "--provider",
            "digitalocean",
            "--cpu",
            "4",
            "--memory",
            "8GB",
            "--",
            "sh",
            "-c",
            "echo tested on $SKYWARD_NODE_ID",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "tested on node-1");
    clouds.assert_nothing_left().await;

    // skyward providers
    let providers = json(&clouds.skyward(&["providers", "--json"]).await);
    for provider in ["aws", "digitalocean", "verda", "vastai"] {
        let entry = providers
            .iter()
            .find(|p| p["provider"] == provider)
            .unwrap_or_else(|| panic!("{provider} listed: {providers:#?}"));
        assert_eq!(entry["configured"], true, "{entry}");
        assert_eq!(entry["working"], true, "{entry}");
    }
}
