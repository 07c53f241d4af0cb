//! AWS Neuron devices (Inferentia, Trainium): `/dev/neuronN` files, and what `neuron-ls`
//! says about each when it is installed (on PATH, or where the Neuron packages put it).

use std::path::Path;
use std::time::Instant;

use skyward_common::inventory::NeuronDevice;

use crate::tool::{self, ToolError};

/// Where the aws-neuronx-tools package installs `neuron-ls`, not always on PATH.
const NEURON_LS_INSTALLED: &str = "/opt/aws/neuron/bin/neuron-ls";

/// The Neuron devices of this machine; empty when it has none. `neuron-ls` runs only until
/// `deadline`; past it, the device files alone are reported.
pub fn detect(deadline: Instant) -> Vec<NeuronDevice> {
    let files = device_files(Path::new("/dev"));
    let tool = if tool::on_path("neuron-ls") {
        Some("neuron-ls")
    } else if Path::new(NEURON_LS_INSTALLED).is_file() {
        Some(NEURON_LS_INSTALLED)
    } else {
        None
    };
    if let Some(tool) = tool {
        match neuron_ls(tool, deadline) {
            Ok(devices) if !devices.is_empty() => return devices,
            Ok(_) => {}
            Err(e) if files.is_empty() => tracing::debug!("neuron-ls: {e}"),
            Err(e) => tracing::warn!("Neuron inventory: {e}; reporting the device files only"),
        }
    }
    files
        .into_iter()
        .map(|index| NeuronDevice {
            index,
            ..Default::default()
        })
        .collect()
}

/// `neuron-ls --json-output`; Neuron 2.34 replaced that flag with `--output-format json`.
fn neuron_ls(tool: &str, deadline: Instant) -> Result<Vec<NeuronDevice>, String> {
    let text = match tool::run_until(tool, &["--json-output"], deadline) {
        Ok(text) => text,
        Err(e @ ToolError::Failed { .. }) => {
            tracing::debug!("{e}; trying --output-format json");
            tool::run_until(tool, &["--output-format", "json"], deadline)
                .map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    parse_neuron_ls(&text)
}

/// The indices of `neuron0`, `neuron1`, ... in `dir`, in order.
pub fn device_files(dir: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name();
                    let digits = name.to_str()?.strip_prefix("neuron")?;
                    digits
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| digits.parse().ok())
                        .flatten()
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_unstable();
    found
}

/// `neuron-ls` JSON: an array with one object per device (`neuron_device`, `bdf`,
/// `connected_to`, `nc_count`, `memory_size` in bytes, `neuron_processes`), or an object
/// holding such an array beside instance-wide fields (the newer format). Unknown fields are
/// ignored and missing ones stay empty.
pub fn parse_neuron_ls(text: &str) -> Result<Vec<NeuronDevice>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("neuron-ls printed no JSON: {e}"))?;
    let is_device = |v: &serde_json::Value| v.get("neuron_device").is_some();
    let list = match &value {
        serde_json::Value::Array(list) => list,
        serde_json::Value::Object(map) => map
            .values()
            .find_map(|v| {
                v.as_array()
                    .filter(|list| list.first().is_some_and(is_device))
            })
            .ok_or("neuron-ls JSON holds no list of devices")?,
        _ => return Err("neuron-ls JSON is neither a list nor an object".into()),
    };
    let number = |v: &serde_json::Value, key: &str| v.get(key).and_then(serde_json::Value::as_u64);
    let devices = list
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_object())
        .map(|(i, v)| NeuronDevice {
            index: number(v, "neuron_device").map_or(i as u32, |n| n as u32),
            core_count: number(v, "nc_count").unwrap_or(0) as u32,
            memory_bytes: number(v, "memory_size").unwrap_or(0),
            pci_bdf: v
                .get("bdf")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_string(),
            connected_to: match v.get("connected_to") {
                Some(serde_json::Value::Array(peers)) => peers
                    .iter()
                    .filter_map(|p| p.as_u64().map(|n| n as u32))
                    .collect(),
                // Some versions print the table's "1, 3" as a string.
                Some(serde_json::Value::String(peers)) => peers
                    .split(',')
                    .filter_map(|p| p.trim().parse().ok())
                    .collect(),
                _ => Vec::new(),
            },
        })
        .collect();
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NOT a capture: written by hand in the shape the Neuron documentation gives for
    /// `neuron-ls --json-output` (one object per device), with values of a trn1.32xlarge-like
    /// machine cut to two devices.
    const NEURON_LS_SAMPLE: &str = r#"[
    {
        "neuron_device": 0,
        "bdf": "10:1c.0",
        "connected_to": [1, 3],
        "nc_count": 2,
        "memory_size": 34359738368,
        "neuron_processes": [
            {
                "pid": 113985,
                "command": "neuron-app01 infer --input-data-direc...",
                "neuron_runtime_version": "2.0.0"
            }
        ]
    },
    {
        "neuron_device": 1,
        "bdf": "10:1d.0",
        "connected_to": [0, 2],
        "nc_count": 2,
        "memory_size": 34359738368,
        "neuron_processes": []
    }
]"#;

    #[test]
    fn parses_the_documented_json_shape() {
        let devices = parse_neuron_ls(NEURON_LS_SAMPLE).unwrap();
        assert_eq!(
            devices,
            vec![
                NeuronDevice {
                    index: 0,
                    core_count: 2,
                    memory_bytes: 32 << 30,
                    pci_bdf: "10:1c.0".into(),
                    connected_to: vec![1, 3],
                },
                NeuronDevice {
                    index: 1,
                    core_count: 2,
                    memory_bytes: 32 << 30,
                    pci_bdf: "10:1d.0".into(),
                    connected_to: vec![0, 2],
                },
            ]
        );
    }

    #[test]
    fn finds_the_device_list_inside_an_object_and_tolerates_gaps() {
        // Also hand-written: instance-wide fields beside the devices, a null link list, a
        // missing memory size.
        let text = r#"{"instance_type": "inf2.xlarge", "neuron_devices": [
            {"neuron_device": 0, "bdf": "00:1f.0", "connected_to": null, "nc_count": 2}
        ]}"#;
        let devices = parse_neuron_ls(text).unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].core_count, 2);
        assert_eq!(devices[0].memory_bytes, 0);
        assert!(devices[0].connected_to.is_empty());
        assert_eq!(
            parse_neuron_ls(r#"[{"neuron_device": 4, "connected_to": "5, 7"}]"#).unwrap()[0]
                .connected_to,
            vec![5, 7]
        );
    }

    #[test]
    fn no_devices_and_garbage() {
        assert_eq!(parse_neuron_ls("[]").unwrap(), Vec::new());
        assert!(parse_neuron_ls("neuron-ls: command failed").is_err());
        assert!(parse_neuron_ls(r#"{"instance_type": "x"}"#).is_err());
    }

    #[test]
    fn device_files_are_neuron_and_a_number() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "neuron1", "neuron0", "neuron10", "neuron", "neuronx", "nvidia0",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(device_files(dir.path()), vec![0, 1, 10]);
        assert!(device_files(&dir.path().join("missing")).is_empty());
    }
}
