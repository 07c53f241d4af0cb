//! What this machine's coordinators have created, on disk: each pool, where each of its
//! provisioning attempts went (written *before* the call that creates anything), and the
//! instances it got. A coordinator that crashes or is killed leaves its record behind, so
//! that `skyward pool list` shows the pool and `skyward down` removes it.
//!
//! SQLite (WAL, a busy timeout) under the user's data dir, so that several `skyward`
//! processes can write at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

/// `SKYWARD_HOME`, else `$XDG_DATA_HOME/skyward`, else `~/.local/share/skyward`.
pub fn skyward_home() -> Result<PathBuf, String> {
    if let Some(home) = std::env::var_os("SKYWARD_HOME") {
        return Ok(PathBuf::from(home));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(data).join("skyward"));
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".local/share/skyward"))
        .ok_or_else(|| "cannot find a data directory: set SKYWARD_HOME".into())
}

/// The store's file under the user's data dir.
pub const FILE: &str = "state.sqlite3";
/// How long a write waits for another process's.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL,
    state TEXT NOT NULL,
    providers TEXT NOT NULL,
    options TEXT NOT NULL,
    dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    pool TEXT NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    region TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (pool, provider, region)
);
CREATE TABLE IF NOT EXISTS tasks (
    pool TEXT NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    task INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    PRIMARY KEY (pool, task, attempt)
);
CREATE TABLE IF NOT EXISTS instances (
    pool TEXT NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    region TEXT NOT NULL,
    node TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    PRIMARY KEY (pool, provider, provider_id)
);
";

/// Where a pool stands, as its coordinator last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    /// Provisioning, waiting for agents, or running work.
    Up,
    /// Its teardown has begun.
    TearingDown,
    /// Its teardown failed: something may be left.
    TeardownFailed,
}

impl PoolState {
    fn as_str(self) -> &'static str {
        match self {
            PoolState::Up => "up",
            PoolState::TearingDown => "tearing_down",
            PoolState::TeardownFailed => "teardown_failed",
        }
    }

    fn parse(text: &str) -> PoolState {
        match text {
            "tearing_down" => PoolState::TearingDown,
            "teardown_failed" => PoolState::TeardownFailed,
            _ => PoolState::Up,
        }
    }
}

/// The process that owns a pool: its pid, and when it started (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`, field 22).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn this_process() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    /// Whether that very process still runs.
    pub fn alive(&self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

/// A running process's start time; `None` once it has exited (a zombie has too).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub provider: String,
    pub region: String,
    pub instance_type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceRecord {
    pub provider: String,
    pub region: String,
    pub node: String,
    pub provider_id: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolRecord {
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    pub owner: Owner,
    pub state: PoolState,
    /// The providers as given (`aws,verda`).
    pub providers: String,
    /// The `--provider-opt` settings it ran with (no secrets: those come from the
    /// environment).
    pub options: Vec<String>,
    /// Its local state (identity, local nodes' work dirs).
    pub dir: PathBuf,
    pub placements: Vec<Placement>,
    pub instances: Vec<InstanceRecord>,
    pub tasks: Vec<TaskRecord>,
}

/// One attempt of one of a pool's tasks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskRecord {
    /// The task's place in its job (input order).
    pub task: u64,
    pub attempt: u32,
    pub node: String,
    /// `running`, `finished` (with its exit code) or `lost` (its node was).
    pub state: String,
    pub exit_code: Option<i32>,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating) the store in `home`.
    pub fn open(home: &Path) -> Result<Store, String> {
        let path = home.join(FILE);
        let fail = |e: &dyn std::fmt::Display| format!("state store {}: {e}", path.display());
        std::fs::create_dir_all(home).map_err(|e| fail(&e))?;
        let conn = Connection::open(&path).map_err(|e| fail(&e))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| fail(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| fail(&e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| fail(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(&e))?;
        // The store says which pools exist and where: only its owner reads it.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        Ok(Store { conn })
    }

    /// Records a pool before anything of it exists.
    pub fn add_pool(
        &self,
        name: &str,
        owner: Owner,
        providers: &str,
        options: &[String],
        dir: &Path,
    ) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT INTO pools (name, created, owner_pid, owner_start, state, providers, options, dir)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    name,
                    now(),
                    owner.pid,
                    owner.start as i64,
                    PoolState::Up.as_str(),
                    providers,
                    serde_json::to_string(options).unwrap_or_else(|_| "[]".into()),
                    dir.to_string_lossy(),
                ],
            )
            .map(drop)
            .map_err(|e| format!("recording pool {name}: {e}"))
    }

    /// Records where a provisioning attempt goes, before the call that creates anything.
    pub fn add_placement(&self, pool: &str, placement: &Placement) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO placements (pool, provider, region, instance_type, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    pool,
                    placement.provider,
                    placement.region,
                    placement.instance_type,
                    now()
                ],
            )
            .map(drop)
            .map_err(|e| format!("recording pool {pool}'s attempt: {e}"))
    }

    pub fn add_instance(&self, pool: &str, instance: &InstanceRecord) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO instances (pool, provider, region, node, provider_id)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    pool,
                    instance.provider,
                    instance.region,
                    instance.node,
                    instance.provider_id
                ],
            )
            .map(drop)
            .map_err(|e| format!("recording pool {pool}'s instance: {e}"))
    }

    /// Records a task attempt as running on `node`.
    pub fn task_started(
        &self,
        pool: &str,
        task: u64,
        attempt: u32,
        node: &str,
    ) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO tasks (pool, task, attempt, node, state, exit_code)
                 VALUES (?1, ?2, ?3, ?4, 'running', NULL)",
                params![pool, task as i64, attempt, node],
            )
            .map(drop)
            .map_err(|e| format!("recording pool {pool}'s task: {e}"))
    }

    /// Records how a task attempt ended: `finished` with its exit code, or `lost`.
    pub fn task_ended(
        &self,
        pool: &str,
        task: u64,
        attempt: u32,
        state: &str,
        exit_code: Option<i32>,
    ) -> Result<(), String> {
        self.conn
            .execute(
                "UPDATE tasks SET state = ?4, exit_code = ?5
                 WHERE pool = ?1 AND task = ?2 AND attempt = ?3",
                params![pool, task as i64, attempt, state, exit_code],
            )
            .map(drop)
            .map_err(|e| format!("recording pool {pool}'s task: {e}"))
    }

    pub fn set_state(&self, pool: &str, state: PoolState) -> Result<(), String> {
        self.conn
            .execute(
                "UPDATE pools SET state = ?2 WHERE name = ?1",
                params![pool, state.as_str()],
            )
            .map(drop)
            .map_err(|e| format!("updating pool {pool}: {e}"))
    }

    /// Forgets a pool whose teardown finished: nothing of it is left.
    pub fn remove_pool(&self, pool: &str) -> Result<(), String> {
        self.conn
            .execute("DELETE FROM pools WHERE name = ?1", params![pool])
            .map(drop)
            .map_err(|e| format!("forgetting pool {pool}: {e}"))
    }

    pub fn pool(&self, name: &str) -> Result<Option<PoolRecord>, String> {
        Ok(self.pools()?.into_iter().find(|p| p.name == name))
    }

    /// Every recorded pool, oldest first.
    pub fn pools(&self) -> Result<Vec<PoolRecord>, String> {
        let fail = |e: rusqlite::Error| format!("reading the state store: {e}");
        let mut statement = self
            .conn
            .prepare(
                "SELECT name, created, owner_pid, owner_start, state, providers, options, dir
                 FROM pools ORDER BY created, name",
            )
            .map_err(fail)?;
        let rows = statement
            .query_map([], |row| {
                Ok(PoolRecord {
                    name: row.get(0)?,
                    created: row.get::<_, i64>(1)? as u64,
                    owner: Owner {
                        pid: row.get(2)?,
                        start: row.get::<_, i64>(3)? as u64,
                    },
                    state: PoolState::parse(&row.get::<_, String>(4)?),
                    providers: row.get(5)?,
                    options: serde_json::from_str(&row.get::<_, String>(6)?).unwrap_or_default(),
                    dir: PathBuf::from(row.get::<_, String>(7)?),
                    placements: Vec::new(),
                    instances: Vec::new(),
                    tasks: Vec::new(),
                })
            })
            .map_err(fail)?;
        let mut pools = rows.collect::<Result<Vec<_>, _>>().map_err(fail)?;
        for pool in &mut pools {
            pool.placements = self
                .conn
                .prepare(
                    "SELECT provider, region, instance_type FROM placements
                     WHERE pool = ?1 ORDER BY at, provider, region",
                )
                .and_then(|mut s| {
                    s.query_map(params![pool.name], |row| {
                        Ok(Placement {
                            provider: row.get(0)?,
                            region: row.get(1)?,
                            instance_type: row.get(2)?,
                        })
                    })?
                    .collect()
                })
                .map_err(fail)?;
            pool.instances = self
                .conn
                .prepare(
                    "SELECT provider, region, node, provider_id FROM instances
                     WHERE pool = ?1 ORDER BY provider, node",
                )
                .and_then(|mut s| {
                    s.query_map(params![pool.name], |row| {
                        Ok(InstanceRecord {
                            provider: row.get(0)?,
                            region: row.get(1)?,
                            node: row.get(2)?,
                            provider_id: row.get(3)?,
                        })
                    })?
                    .collect()
                })
                .map_err(fail)?;
            pool.tasks = self
                .conn
                .prepare(
                    "SELECT task, attempt, node, state, exit_code FROM tasks
                     WHERE pool = ?1 ORDER BY task, attempt",
                )
                .and_then(|mut s| {
                    s.query_map(params![pool.name], |row| {
                        Ok(TaskRecord {
                            task: row.get::<_, i64>(0)? as u64,
                            attempt: row.get(1)?,
                            node: row.get(2)?,
                            state: row.get(3)?,
                            exit_code: row.get(4)?,
                        })
                    })?
                    .collect()
                })
                .map_err(fail)?;
        }
        Ok(pools)
    }

    /// Whether a pool of this name is recorded (a name must not be reused while it is).
    pub fn has_pool(&self, name: &str) -> Result<bool, String> {
        self.conn
            .query_row("SELECT 1 FROM pools WHERE name = ?1", params![name], |_| {
                Ok(())
            })
            .optional()
            .map(|found| found.is_some())
            .map_err(|e| format!("reading the state store: {e}"))
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_recorded_with_its_attempts_and_instances_and_forgotten_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let owner = Owner::this_process();
        assert!(owner.alive());
        store
            .add_pool(
                "sky-1",
                owner,
                "aws,verda",
                &["aws.region=eu-west-1".into()],
                Path::new("/x/pools/sky-1"),
            )
            .unwrap();
        let attempt = Placement {
            provider: "aws".into(),
            region: "eu-west-1".into(),
            instance_type: "g5.xlarge".into(),
        };
        store.add_placement("sky-1", &attempt).unwrap();
        store.add_placement("sky-1", &attempt).unwrap();
        store
            .add_instance(
                "sky-1",
                &InstanceRecord {
                    provider: "aws".into(),
                    region: "eu-west-1".into(),
                    node: "node-1".into(),
                    provider_id: "i-0123".into(),
                },
            )
            .unwrap();
        // Another process's view: a second connection to the same file.
        let other = Store::open(dir.path()).unwrap();
        let pools = other.pools().unwrap();
        assert_eq!(pools.len(), 1);
        let pool = &pools[0];
        assert_eq!(pool.providers, "aws,verda");
        assert_eq!(pool.options, ["aws.region=eu-west-1"]);
        assert_eq!(pool.placements, [attempt]);
        assert_eq!(pool.instances[0].provider_id, "i-0123");
        assert_eq!(pool.state, PoolState::Up);
        store.task_started("sky-1", 0, 0, "node-1").unwrap();
        store.task_ended("sky-1", 0, 0, "lost", None).unwrap();
        store.task_started("sky-1", 0, 1, "node-2").unwrap();
        store
            .task_ended("sky-1", 0, 1, "finished", Some(3))
            .unwrap();
        let tasks = other.pool("sky-1").unwrap().unwrap().tasks;
        assert_eq!(
            tasks
                .iter()
                .map(|t| (t.attempt, t.node.as_str(), t.state.as_str(), t.exit_code))
                .collect::<Vec<_>>(),
            [
                (0, "node-1", "lost", None),
                (1, "node-2", "finished", Some(3))
            ]
        );
        other.set_state("sky-1", PoolState::TeardownFailed).unwrap();
        assert_eq!(
            store.pool("sky-1").unwrap().unwrap().state,
            PoolState::TeardownFailed
        );
        assert!(store
            .add_pool("sky-1", owner, "aws", &[], Path::new("/x"))
            .is_err());
        store.remove_pool("sky-1").unwrap();
        assert!(!other.has_pool("sky-1").unwrap());
        // Its attempts and instances go with it.
        let left: i64 = store
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM placements) + (SELECT COUNT(*) FROM instances)
                    + (SELECT COUNT(*) FROM tasks)",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn an_owner_that_exited_is_not_alive_even_if_its_pid_is_reused() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id();
        let owner = Owner {
            pid,
            start: process_start(pid).expect("a running child has a start time"),
        };
        assert!(owner.alive());
        child.kill().unwrap();
        // Not yet reaped: a zombie, which has exited all the same.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!owner.alive(), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!owner.alive());
        let me = Owner::this_process();
        assert!(
            !Owner {
                pid: me.pid,
                start: me.start + 1
            }
            .alive(),
            "same pid, another start: another process"
        );
    }
}
