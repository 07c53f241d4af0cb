//! What a user asks a pool to run, in one form for `skyward run` and for `skyward exec` on a
//! pool that outlives a command (sent to its background coordinator): checked against the
//! pool's nodes and turned into a [`Job`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pool::Pool;
use crate::preflight::Preflight;
use crate::run::{Job, TaskPlan, TaskReport};
use skyward_core::slots::{self, GpuRequest};

/// Where a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum On {
    /// One node: the least loaded.
    One,
    /// Every node (broadcast), each told its rank.
    All,
}

impl std::str::FromStr for On {
    type Err = String;

    fn from_str(s: &str) -> Result<On, String> {
        match s {
            "one" => Ok(On::One),
            "all" => Ok(On::All),
            _ => Err(format!("`{s}` is not a place to run: use one or all")),
        }
    }
}

/// A job as asked for, before it meets the pool's nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub on: On,
    pub preflight: Preflight,
    /// argv per task for a map, or the one argv otherwise.
    pub argvs: Vec<Vec<String>>,
    pub env: Vec<(String, String)>,
    /// With several tasks: tasks at once per node.
    pub per_node: usize,
    /// GPU slots each task needs.
    pub gpus: GpuRequest,
    pub timeout: Option<Duration>,
    pub retries: u32,
    /// Whether the caller feeds the (single) task's stdin.
    pub stdin: bool,
    /// A directory (absolute) synced to every node before the tasks, which run inside it.
    pub workdir: Option<PathBuf>,
    /// Paths (relative to the tasks' directory) brought back from every node that ran a
    /// task, into `download_to/NODE_ID/`, at most `download_limit` bytes a node.
    pub downloads: Vec<String>,
    pub download_to: PathBuf,
    pub download_limit: u64,
}

impl JobRequest {
    /// Whether output from several nodes interleaves (and so is prefixed by node).
    pub fn spans_nodes(&self, nodes: usize) -> bool {
        nodes > 1 && (self.on == On::All || self.argvs.len() > 1)
    }

    /// Each task's command line, as the user would type it, for messages.
    pub fn labels(&self) -> Vec<String> {
        self.argvs
            .iter()
            .map(|argv| {
                shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| argv.join(" "))
            })
            .collect()
    }

    /// How many tasks the job has on a pool of `nodes`.
    pub fn task_count(&self, nodes: usize) -> usize {
        match self.on {
            On::All => nodes,
            On::One => self.argvs.len(),
        }
    }
}

/// The job `request` asks for on `pool`, its tasks running in `cwd` (relative to each
/// agent's work dir): refused when no node could ever take its tasks, and, for a broadcast,
/// only once the preflight has checked the network it will use.
pub async fn build_job(
    pool: &Pool,
    request: &JobRequest,
    stdin: Option<crate::run::TaskInput>,
    cwd: Option<String>,
) -> Result<Job, String> {
    let node_slots: Vec<_> = pool
        .nodes()
        .iter()
        .map(|n| slots::node_slots(&n.inventory))
        .collect();
    let pins: Vec<Option<usize>> = match request.on {
        On::All => (0..node_slots.len()).map(Some).collect(),
        On::One => vec![None],
    };
    if let Some(message) = pins
        .into_iter()
        .find_map(|pin| slots::fits_nodes(&request.gpus, pin, &node_slots).err())
    {
        return Err(message);
    }
    let mut tasks = match request.on {
        On::All => Job::broadcast(
            pool,
            request.argvs[0].clone(),
            request.env.clone(),
            request.preflight,
        )
        .await
        .map_err(|e| e.to_string())?,
        On::One => request
            .argvs
            .iter()
            .map(|argv| TaskPlan {
                argv: argv.clone(),
                env: request.env.clone(),
                node: None,
                gpus: GpuRequest::None,
                cwd: None,
            })
            .collect(),
    };
    for task in &mut tasks {
        task.gpus = request.gpus.clone();
        task.cwd.clone_from(&cwd);
    }
    Ok(Job {
        tasks,
        retries: request.retries,
        per_node: if request.argvs.len() == 1 {
            usize::MAX
        } else {
            request.per_node
        },
        timeout: request.timeout,
        stdin: stdin.filter(|_| request.stdin),
    })
}

/// The task's own code for one task; for many, 0 only if all succeeded, else the first
/// failing task's code (in input order).
pub fn exit_code(reports: &[TaskReport]) -> i32 {
    match reports {
        [one] => one.exit_code(),
        many => many
            .iter()
            .find(|r| !r.success())
            .map(|r| match r.exit_code() {
                0 => 1,
                code => code,
            })
            .unwrap_or(0),
    }
}
