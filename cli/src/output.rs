//! How a job's events reach the user: raw bytes for one node, `[node-N] ` prefixed lines for
//! several, or one JSON object per event for scripts.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use skyward_common::inventory::Inventory;
use skyward_common::protocol::OutputStream;

use skyward_coordinator::run::{RunEvent, TaskReport};
use skyward_coordinator::server::NodeHandle;

/// A partial line longer than this is written out rather than buffered further.
const MAX_PENDING_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Bytes exactly as the task wrote them.
    Raw,
    /// Each line prefixed with its node.
    Prefixed,
    Json,
}

pub struct Renderer<O: Write, E: Write> {
    mode: OutputMode,
    stdout: O,
    stderr: E,
    pending: HashMap<(usize, OutputStream), (String, Vec<u8>)>,
}

impl Renderer<std::io::Stdout, std::io::Stderr> {
    pub fn terminal(mode: OutputMode) -> Self {
        Renderer::new(mode, std::io::stdout(), std::io::stderr())
    }
}

impl<O: Write, E: Write> Renderer<O, E> {
    pub fn new(mode: OutputMode, stdout: O, stderr: E) -> Self {
        Renderer {
            mode,
            stdout,
            stderr,
            pending: HashMap::new(),
        }
    }

    pub fn node_ready(&mut self, node: &NodeHandle) {
        if self.mode == OutputMode::Json {
            let event = serde_json::json!({
                "event": "node_ready",
                "node": node.node_id,
                "address": node.address.to_string(),
                "inventory": &*node.inventory,
            });
            self.json(event);
        } else {
            for line in accelerator_lines(&node.node_id, &node.inventory) {
                let _ = writeln!(self.stderr, "{line}");
            }
        }
    }

    /// One provisioning attempt failed; the next offer is tried.
    pub fn attempt_failed(
        &mut self,
        attempt: &skyward_core::selection::Attempt,
        error: &skyward_providers::ProviderError,
    ) {
        let offer = &attempt.offer;
        if self.mode == OutputMode::Json {
            self.json(serde_json::json!({
                "event": "attempt_failed",
                "provider": offer.provider,
                "region": offer.region,
                "instance_type": offer.instance_type,
                "market": attempt.market,
                "error": error.to_string(),
            }));
        } else {
            let _ = writeln!(
                self.stderr,
                "skyward: {} {} in {} ({}) failed: {error}; trying the next offer",
                offer.provider, offer.instance_type, offer.region, attempt.market
            );
        }
    }

    pub fn pool_down(&mut self, pool: &str) {
        if self.mode == OutputMode::Json {
            self.json(serde_json::json!({"event": "pool_down", "pool": pool}));
        }
    }

    pub fn event(&mut self, event: &RunEvent) {
        match (self.mode, event) {
            (OutputMode::Json, RunEvent::Started { task, node }) => {
                self.json(serde_json::json!({"event": "task_started", "task": task, "node": node}))
            }
            (
                OutputMode::Json,
                RunEvent::Output {
                    task,
                    node,
                    stream,
                    data,
                },
            ) => self.json(serde_json::json!({
                "event": "output",
                "task": task,
                "node": node,
                "stream": stream_name(*stream),
                "data": String::from_utf8_lossy(data),
            })),
            (OutputMode::Json, RunEvent::Finished { task, report }) => {
                let mut event = serde_json::json!({
                    "event": "task_exit",
                    "task": task,
                    "node": report.node,
                    "exit_code": report.exit_code(),
                });
                match &report.outcome {
                    Ok(outcome) => event["outcome"] = outcome.to_string().into(),
                    Err(error) => event["error"] = error.to_string().into(),
                }
                self.json(event)
            }
            (OutputMode::Raw, RunEvent::Output { stream, data, .. }) => {
                let _ = self.writer(*stream).write_all(data);
                let _ = self.writer(*stream).flush();
            }
            (
                OutputMode::Prefixed,
                RunEvent::Output {
                    task,
                    node,
                    stream,
                    data,
                },
            ) => self.prefixed(*task, node, *stream, data),
            (OutputMode::Prefixed, RunEvent::Finished { task, .. }) => {
                for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                    self.flush_pending(*task, stream);
                }
            }
            (
                OutputMode::Json,
                RunEvent::Retrying {
                    task,
                    from,
                    to,
                    attempt,
                    reason,
                },
            ) => self.json(serde_json::json!({
                "event": "task_retrying",
                "task": task,
                "from": from,
                "to": to,
                "attempt": attempt,
                "reason": reason,
            })),
            (
                _,
                RunEvent::Retrying {
                    task,
                    from,
                    to,
                    attempt,
                    reason,
                },
            ) => {
                let _ = writeln!(
                    self.stderr,
                    "skyward: task {task} lost {from} ({reason}); running it again on {to} (attempt {attempt})"
                );
            }
            (
                _,
                RunEvent::NodeUnreachable {
                    node,
                    reason,
                    tasks,
                    wait_ms,
                },
            ) => {
                let wait = humantime::format_duration(Duration::from_millis(*wait_ms));
                let them = match tasks {
                    1 => "its task runs on there, its output held",
                    _ => "its tasks run on there, their output held",
                };
                let line = format!("{node}: connection lost ({reason}); {them} on the node until it is back (waiting up to {wait})");
                self.line_or_json(
                    &line,
                    serde_json::json!({
                        "event": "node_unreachable",
                        "node": node,
                        "reason": reason,
                        "tasks": tasks,
                        "wait_ms": wait_ms,
                    }),
                );
            }
            (
                _,
                RunEvent::Resumed {
                    task,
                    node,
                    outage_ms,
                    held_bytes,
                    waited_for_room,
                },
            ) => {
                let outage = Duration::from_millis(*outage_ms / 100 * 100);
                let paused = match waited_for_room {
                    true => "; the task paused while the node's room for it was full",
                    false => "",
                };
                let line = format!(
                    "task {task}: {node} back after {}; resumed with {} of output it held{paused}",
                    humantime::format_duration(outage),
                    skyward_coordinator::workdir::human_bytes(*held_bytes),
                );
                self.line_or_json(
                    &line,
                    serde_json::json!({
                        "event": "task_resumed",
                        "task": task,
                        "node": node,
                        "outage_ms": outage_ms,
                        "held_bytes": held_bytes,
                        "waited_for_room": waited_for_room,
                    }),
                );
            }
            (OutputMode::Json, RunEvent::NodeInterrupted { node, notice }) => {
                self.json(serde_json::json!({
                    "event": "node_interrupted",
                    "node": node,
                    "source": notice.source,
                    "action": notice.action,
                    "at": notice.at,
                }))
            }
            (_, RunEvent::NodeInterrupted { node, notice }) => {
                let _ = writeln!(
                    self.stderr,
                    "skyward: {node}: {} interruption notice: {} at {}; its tasks may be cut short",
                    notice.source, notice.action, notice.at
                );
            }
            (_, RunEvent::Transfer { line, json }) => {
                let json = serde_json::from_str(json).unwrap_or(serde_json::Value::Null);
                self.line_or_json(line, json);
            }
            (OutputMode::Raw | OutputMode::Prefixed, _) => {}
        }
    }

    /// A note about the run (a transfer's outcome, a node out of reach, a task resumed):
    /// `line` to stderr, or `event` as JSON in JSON mode.
    pub fn line_or_json(&mut self, line: &str, event: serde_json::Value) {
        if self.mode == OutputMode::Json {
            self.json(event);
        } else {
            let _ = writeln!(self.stderr, "skyward: {line}");
        }
    }

    /// One line to stderr about the run itself (not task output); silent in JSON mode.
    pub fn note(&mut self, message: &str) {
        if self.mode != OutputMode::Json {
            let _ = writeln!(self.stderr, "skyward: {message}");
        }
    }

    /// Says how failed tasks ended, in input order.
    pub fn summary(&mut self, reports: &[TaskReport], labels: &[String]) {
        let failed: Vec<usize> = (0..reports.len())
            .filter(|&i| !reports[i].success())
            .collect();
        if failed.is_empty() || self.mode == OutputMode::Json {
            return;
        }
        if let [report] = reports {
            // A plain non-zero exit speaks for itself through the exit code, as with ssh.
            match &report.outcome {
                Ok(skyward_common::protocol::TaskOutcome::Exited { .. }) => {}
                Ok(outcome) => {
                    let _ = writeln!(self.stderr, "skyward: {}: {outcome}", report.node);
                }
                Err(error) => {
                    let _ = writeln!(self.stderr, "skyward: {}: {error}", report.node);
                }
            }
            return;
        }
        let _ = writeln!(
            self.stderr,
            "skyward: {} of {} tasks failed:",
            failed.len(),
            reports.len()
        );
        for i in failed {
            let report = &reports[i];
            let how = match &report.outcome {
                Ok(outcome) => outcome.to_string(),
                Err(error) => error.to_string(),
            };
            let _ = writeln!(
                self.stderr,
                "  task {i} on {} ({}): {how}",
                report.node,
                labels.get(i).map(String::as_str).unwrap_or("")
            );
        }
    }

    fn prefixed(&mut self, task: usize, node: &str, stream: OutputStream, data: &[u8]) {
        let (_, pending) = self
            .pending
            .entry((task, stream))
            .or_insert_with(|| (node.to_string(), Vec::new()));
        pending.extend_from_slice(data);
        let Some(last_newline) = pending.iter().rposition(|&b| b == b'\n') else {
            if pending.len() > MAX_PENDING_LINE {
                self.flush_pending(task, stream);
            }
            return;
        };
        let complete: Vec<u8> = pending.drain(..=last_newline).collect();
        let mut out = Vec::with_capacity(complete.len() + 16);
        for line in complete.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(format!("[{node}] ").as_bytes());
            out.extend_from_slice(line);
        }
        let w = self.writer(stream);
        let _ = w.write_all(&out);
        let _ = w.flush();
    }

    fn flush_pending(&mut self, task: usize, stream: OutputStream) {
        if let Some((node, rest)) = self.pending.remove(&(task, stream)) {
            if !rest.is_empty() {
                let mut out = format!("[{node}] ").into_bytes();
                out.extend_from_slice(&rest);
                out.push(b'\n');
                let w = self.writer(stream);
                let _ = w.write_all(&out);
                let _ = w.flush();
            }
        }
    }

    fn writer(&mut self, stream: OutputStream) -> &mut dyn Write {
        match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        }
    }

    fn json(&mut self, value: serde_json::Value) {
        let _ = writeln!(self.stdout, "{value}");
        let _ = self.stdout.flush();
    }
}

/// One line per GPU, MIG device and Neuron device of a node, as the terminal shows them when
/// the node comes up; none for a node without accelerators.
pub fn accelerator_lines(node: &str, inventory: &Inventory) -> Vec<String> {
    let mut lines = Vec::new();
    for gpu in &inventory.gpus {
        let mut about = vec![gpu.name.clone()];
        if gpu.memory_total_bytes > 0 {
            about.push(format!("{} MiB", gpu.memory_total_bytes / (1024 * 1024)));
        }
        let on_off = |on: bool| if on { "enabled" } else { "disabled" };
        match (gpu.mig_mode_current, gpu.mig_mode_pending) {
            (Some(now), Some(next)) if next != now => about.push(format!(
                "MIG {} ({} after reset)",
                on_off(now),
                on_off(next)
            )),
            (Some(now), _) => about.push(format!("MIG {}", on_off(now))),
            (None, _) => {}
        }
        lines.push(format!("[{node}] gpu {}: {}", gpu.index, about.join(", ")));
        for mig in &gpu.mig_devices {
            lines.push(format!(
                "[{node}] gpu {} mig {} {}",
                mig.parent_gpu_index, mig.profile, mig.uuid
            ));
        }
    }
    for device in &inventory.neuron_devices {
        let mut about = Vec::new();
        if device.core_count > 0 {
            about.push(format!("{} cores", device.core_count));
        }
        if device.memory_bytes > 0 {
            about.push(format!("{} MiB", device.memory_bytes / (1024 * 1024)));
        }
        lines.push(
            format!("[{node}] neuron {}: {}", device.index, about.join(", "))
                .trim_end_matches([':', ' '])
                .to_string(),
        );
    }
    lines
}

fn stream_name(stream: OutputStream) -> &'static str {
    match stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn output(task: usize, node: &str, data: &'static [u8]) -> RunEvent {
        RunEvent::Output {
            task,
            node: node.into(),
            stream: OutputStream::Stdout,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn prefixes_whole_lines_and_flushes_the_tail_at_exit() {
        let mut out = Vec::new();
        {
            let mut r = Renderer::new(OutputMode::Prefixed, &mut out, Vec::new());
            r.event(&output(0, "node-1", b"hel"));
            r.event(&output(1, "node-2", b"a\nb\n"));
            r.event(&output(0, "node-1", b"lo\nwor"));
            r.event(&RunEvent::Finished {
                task: 0,
                report: TaskReport {
                    node: "node-1".into(),
                    outcome: Ok(skyward_common::protocol::TaskOutcome::Exited { code: 0 }),
                },
            });
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[node-2] a\n[node-2] b\n[node-1] hello\n[node-1] wor\n"
        );
    }

    #[test]
    fn one_line_per_gpu_mig_device_and_neuron_device() {
        use skyward_common::inventory::{Gpu, MigDevice, NeuronDevice};
        let mib = 1024 * 1024;
        let mut inventory = Inventory::default();
        assert!(accelerator_lines("node-1", &inventory).is_empty());
        inventory.gpus = vec![
            Gpu {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 81559 * mib,
                mig_mode_current: Some(true),
                mig_mode_pending: Some(true),
                mig_devices: vec![MigDevice {
                    uuid: "MIG-0c4d".into(),
                    profile: "1g.10gb".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            Gpu {
                index: 1,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 81559 * mib,
                mig_mode_current: Some(false),
                mig_mode_pending: Some(true),
                ..Default::default()
            },
            Gpu {
                index: 2,
                name: "NVIDIA GeForce RTX 4090".into(),
                memory_total_bytes: 24564 * mib,
                ..Default::default()
            },
        ];
        inventory.neuron_devices = vec![
            NeuronDevice {
                index: 0,
                core_count: 2,
                memory_bytes: 32768 * mib,
                ..Default::default()
            },
            NeuronDevice {
                index: 1,
                ..Default::default()
            },
        ];
        assert_eq!(
            accelerator_lines("node-1", &inventory),
            vec![
                "[node-1] gpu 0: NVIDIA H100 80GB HBM3, 81559 MiB, MIG enabled",
                "[node-1] gpu 0 mig 1g.10gb MIG-0c4d",
                "[node-1] gpu 1: NVIDIA H100 80GB HBM3, 81559 MiB, MIG disabled (enabled after reset)",
                "[node-1] gpu 2: NVIDIA GeForce RTX 4090, 24564 MiB",
                "[node-1] neuron 0: 2 cores, 32768 MiB",
                "[node-1] neuron 1",
            ]
        );
    }

    #[test]
    fn raw_mode_passes_bytes_through() {
        let mut out = Vec::new();
        Renderer::new(OutputMode::Raw, &mut out, Vec::new()).event(&output(
            0,
            "node-1",
            b"\x00\xffno newline",
        ));
        assert_eq!(out, b"\x00\xffno newline");
    }
}
