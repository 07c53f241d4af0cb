//! Settings from files and the environment: `skyward.toml` (the project's, found in the
//! current directory or the nearest one above it), then the user's
//! (`$XDG_CONFIG_HOME/skyward/config.toml`, else `~/.config/skyward/config.toml`), then
//! `SKYWARD_*` environment variables, then the command line, which wins.
//!
//! A file holds defaults at its top level and named pools under `[pools.NAME]`, which
//! `skyward pool up NAME` and `skyward exec NAME` use over the defaults:
//!
//! ```toml
//! provider = "aws,verda"
//! selection = "cheapest"
//! env = ["WANDB_MODE=offline"]
//!
//! [pools.train]
//! accelerator = "H100:8"
//! nodes = 2
//! ttl = "4h"
//! ```
//!
//! Every key is the long flag of the same name, and takes the same values: the settings are
//! given to the command line parser as flags placed before the user's own, so that every
//! check and message is the flag's. A flag on the command line replaces the key's value; for
//! keys that repeat (`env`, `provider-opt`), the file's values come first and the command
//! line's are added after them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::CommandFactory;

use crate::cli::Cli;

/// The project file's name.
pub const PROJECT_FILE: &str = "skyward.toml";
/// The largest config file read.
const MAX_FILE: u64 = 1024 * 1024;

/// Which commands a key applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// What nodes are and where they come from: `run`, `pool up`, `offers`.
    Spec,
    /// How a pool is made and run: `run`, `pool up`.
    Pool,
    /// What runs and how: `run`, `exec`.
    Job,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One value.
    Value,
    /// Repeatable: an array in a file.
    List,
    /// A switch: `true` sets it.
    Switch,
}

#[derive(Debug)]
pub struct Key {
    /// The key in a file, which is also the long flag's name.
    pub name: &'static str,
    scope: Scope,
    kind: Kind,
}

impl Key {
    /// The environment variable that sets it, where one makes sense (not for lists).
    pub fn env_var(&self) -> Option<String> {
        (self.kind != Kind::List)
            .then(|| format!("SKYWARD_{}", self.name.to_uppercase().replace('-', "_")))
    }

    /// clap's id for the argument: the field's name.
    fn id(&self) -> String {
        self.name.replace('-', "_")
    }
}

const fn key(name: &'static str, scope: Scope, kind: Kind) -> Key {
    Key { name, scope, kind }
}

/// Every setting a file or the environment may give.
pub const KEYS: &[Key] = &[
    key("provider", Scope::Spec, Kind::Value),
    key("selection", Scope::Spec, Kind::Value),
    key("accelerator", Scope::Spec, Kind::Value),
    key("cpu", Scope::Spec, Kind::Value),
    key("memory", Scope::Spec, Kind::Value),
    key("allocation", Scope::Spec, Kind::Value),
    key("region", Scope::Spec, Kind::Value),
    key("max-price", Scope::Spec, Kind::Value),
    key("disk", Scope::Spec, Kind::Value),
    key("image", Scope::Spec, Kind::Value),
    key("provider-opt", Scope::Spec, Kind::List),
    key("nodes", Scope::Pool, Kind::Value),
    key("node-timeout", Scope::Pool, Kind::Value),
    key("connect-timeout", Scope::Pool, Kind::Value),
    key("listen", Scope::Pool, Kind::Value),
    key("advertise", Scope::Pool, Kind::Value),
    key("agent-binary", Scope::Pool, Kind::Value),
    key("agent-url", Scope::Pool, Kind::Value),
    key("reverse", Scope::Pool, Kind::Switch),
    key("public-ip", Scope::Pool, Kind::Value),
    key("mig", Scope::Pool, Kind::Value),
    key("ttl", Scope::Pool, Kind::Value),
    key("on", Scope::Job, Kind::Value),
    key("preflight", Scope::Job, Kind::Value),
    key("per-node", Scope::Job, Kind::Value),
    key("timeout", Scope::Job, Kind::Value),
    key("retries", Scope::Job, Kind::Value),
    key("env", Scope::Job, Kind::List),
];

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Env(String),
    /// A file, and the pool section the value is in, if any.
    File {
        path: PathBuf,
        pool: Option<String>,
    },
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Env(var) => write!(f, "{var}"),
            Source::File { path, pool: None } => write!(f, "{}", path.display()),
            Source::File {
                path,
                pool: Some(pool),
            } => write!(f, "{} [pools.{pool}]", path.display()),
            Source::Default => write!(f, "default"),
        }
    }
}

/// One config file, checked.
#[derive(Debug)]
struct File {
    path: PathBuf,
    table: toml::Table,
}

/// The config files found for this directory and user.
#[derive(Debug, Default)]
pub struct Files {
    project: Option<File>,
    user: Option<File>,
    /// Why a file that is there cannot be used: an error for the commands that read files
    /// only, so that a broken file does not stop `skyward pool list` or `skyward down`.
    pub error: Option<String>,
}

impl Files {
    /// Finds and checks both files.
    pub fn load() -> Files {
        let project = std::env::current_dir()
            .ok()
            .and_then(|dir| project_file(&dir));
        let read = || -> Result<Files, String> {
            Ok(Files {
                project: project.as_deref().map(File::read).transpose()?,
                user: user_file()
                    .filter(|path| path.is_file())
                    .map(|path| File::read(&path))
                    .transpose()?,
                error: None,
            })
        };
        read().unwrap_or_else(|error| Files {
            error: Some(error),
            ..Files::default()
        })
    }

    /// The files' paths, for `skyward config`: the project's (if found) and the user's.
    pub fn paths(&self) -> (Option<&Path>, Option<PathBuf>) {
        (
            self.project.as_ref().map(|f| f.path.as_path()),
            self.user
                .as_ref()
                .map(|f| f.path.clone())
                .or_else(user_file),
        )
    }

    /// The files' value for `key`, the most specific first: the project's pool section, the
    /// project's defaults, the user's pool section, the user's defaults.
    fn lookup(&self, key: &Key, pool: Option<&str>) -> Option<(Vec<String>, Source)> {
        for file in [&self.project, &self.user].into_iter().flatten() {
            if let Some(pool) = pool {
                let section = file
                    .table
                    .get("pools")
                    .and_then(|p| p.get(pool))
                    .and_then(|s| s.get(key.name));
                if let Some(value) = section {
                    let source = Source::File {
                        path: file.path.clone(),
                        pool: Some(pool.to_string()),
                    };
                    return Some((strings(value), source));
                }
            }
            if let Some(value) = file.table.get(key.name) {
                let source = Source::File {
                    path: file.path.clone(),
                    pool: None,
                };
                return Some((strings(value), source));
            }
        }
        None
    }

    /// Whether a file names pool `name`.
    pub fn has_pool(&self, name: &str) -> bool {
        [&self.project, &self.user]
            .into_iter()
            .flatten()
            .any(|f| f.table.get("pools").and_then(|p| p.get(name)).is_some())
    }
}

/// `skyward.toml` in `dir` or the nearest directory above it.
fn project_file(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .map(|d| d.join(PROJECT_FILE))
        .find(|p| p.is_file())
}

/// `$XDG_CONFIG_HOME/skyward/config.toml`, else `~/.config/skyward/config.toml`.
fn user_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("skyward").join("config.toml"))
}

impl File {
    fn read(path: &Path) -> Result<File, String> {
        let fail = |why: String| format!("{}: {why}", path.display());
        let size = std::fs::metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .len();
        if size > MAX_FILE {
            return Err(fail(format!("{size} bytes is too large for a config file")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            fail(e.message().to_string() + &line_of(&text, e.span()))
        })?;
        check_table(&table, None).map_err(fail)?;
        if let Some(pools) = table.get("pools") {
            let pools = pools
                .as_table()
                .ok_or_else(|| fail("`pools` must be a table of [pools.NAME] sections".into()))?;
            for (name, section) in pools {
                crate::persistent::check_pool_name(name).map_err(&fail)?;
                let section = section.as_table().ok_or_else(|| {
                    fail(format!("pools.{name} must be a table ([pools.{name}])"))
                })?;
                check_table(section, Some(name)).map_err(&fail)?;
            }
        }
        Ok(File {
            path: path.to_path_buf(),
            table,
        })
    }
}

/// ` (line N)` for a parse error's position.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

/// Every key known, every value of the right shape.
fn check_table(table: &toml::Table, pool: Option<&str>) -> Result<(), String> {
    let place = |key: &str| match pool {
        Some(pool) => format!("pools.{pool}.{key}"),
        None => key.to_string(),
    };
    for (name, value) in table {
        if name == "pools" && pool.is_none() {
            continue;
        }
        let Some(key) = KEYS.iter().find(|k| k.name == name) else {
            let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
            return Err(format!(
                "unknown key `{}`; the keys are the long flags: {}",
                place(name),
                known.join(", ")
            ));
        };
        let fits = match (key.kind, value) {
            (Kind::Switch, toml::Value::Boolean(_)) => true,
            (Kind::List, toml::Value::Array(items)) => items.iter().all(is_scalar),
            (Kind::Value, value) => is_scalar(value),
            _ => false,
        };
        if !fits {
            let shape = match key.kind {
                Kind::Switch => "true or false",
                Kind::List => "an array of strings, e.g. [\"A=1\", \"B=2\"]",
                Kind::Value => "a string or a number",
            };
            return Err(format!("`{}` must be {shape}", place(name)));
        }
    }
    Ok(())
}

fn is_scalar(value: &toml::Value) -> bool {
    matches!(
        value,
        toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Float(_)
    )
}

/// A checked value as flag values: one for a value, each item of a list, `true` for a switch.
fn strings(value: &toml::Value) -> Vec<String> {
    match value {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(items) => items.iter().flat_map(strings).collect(),
        toml::Value::Boolean(true) => vec!["true".into()],
        toml::Value::Boolean(false) => Vec::new(),
        other => vec![other.to_string()],
    }
}

/// The command line with the settings from files and the environment placed before the
/// user's own arguments, and what was placed there.
#[derive(Debug)]
pub struct Expanded {
    pub argv: Vec<OsString>,
    pub added: Vec<(&'static Key, Source)>,
}

impl Expanded {
    /// Where an argument the parser refused came from, when a file or variable gave it.
    pub fn blame(&self, error: &clap::Error) -> Option<&Source> {
        let arg = match error.get(clap::error::ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(arg)) => arg.clone(),
            _ => return None,
        };
        self.added
            .iter()
            .find(|(key, _)| arg.split_whitespace().next() == Some(&format!("--{}", key.name)))
            .map(|(_, source)| source)
    }
}

/// What a parse refused: the user's own command line, or a config file.
pub enum ExpandError {
    CommandLine(clap::Error),
    Config(String),
}

/// The subcommand a key list applies to, the tokens naming it, and the pool it names.
fn command_scopes(
    matches: &clap::ArgMatches,
) -> Option<(Vec<&'static str>, &[Scope], &clap::ArgMatches)> {
    const RUN: &[Scope] = &[Scope::Spec, Scope::Pool, Scope::Job];
    const UP: &[Scope] = &[Scope::Spec, Scope::Pool];
    match matches.subcommand()? {
        ("run", m) => Some((vec!["run"], RUN, m)),
        ("offers", m) => Some((vec!["offers"], &[Scope::Spec], m)),
        ("exec", m) => Some((vec!["exec"], &[Scope::Job], m)),
        ("pool", m) => match m.subcommand()? {
            ("up", m) => Some((vec!["pool", "up"], UP, m)),
            ("serve", m) => Some((vec!["pool", "serve"], UP, m)),
            _ => None,
        },
        _ => None,
    }
}

/// Adds the settings of `files` and the environment to `argv` for every key of its
/// command that the command line leaves unset (lists: always, before the user's).
pub fn expand(argv: Vec<OsString>, files: &Files) -> Result<Expanded, ExpandError> {
    let matches = Cli::command()
        .try_get_matches_from(&argv)
        .map_err(ExpandError::CommandLine)?;
    let Some((tokens, scopes, sub)) = command_scopes(&matches) else {
        return Ok(Expanded {
            argv,
            added: Vec::new(),
        });
    };
    if let Some(error) = &files.error {
        return Err(ExpandError::Config(error.clone()));
    }
    let pool = sub.try_get_one::<String>("name").ok().flatten().cloned();
    let mut flags: Vec<OsString> = Vec::new();
    let mut added = Vec::new();
    for key in KEYS.iter().filter(|k| scopes.contains(&k.scope)) {
        let on_command_line = sub.value_source(&key.id()) == Some(ValueSource::CommandLine);
        if on_command_line && key.kind != Kind::List {
            continue;
        }
        let Some((values, source)) = setting(key, files, pool.as_deref()) else {
            continue;
        };
        for value in values {
            match key.kind {
                Kind::Switch => flags.push(format!("--{}", key.name).into()),
                _ => flags.push(format!("--{}={value}", key.name).into()),
            }
        }
        added.push((key, source));
    }
    let mut expanded: Vec<OsString> = argv[..1].to_vec();
    expanded.extend(tokens.iter().map(OsString::from));
    expanded.extend(flags);
    expanded.extend(argv[1 + tokens.len()..].iter().cloned());
    Ok(Expanded {
        argv: expanded,
        added,
    })
}

/// The environment's value for `key`, else the files'.
fn setting(key: &Key, files: &Files, pool: Option<&str>) -> Option<(Vec<String>, Source)> {
    if let Some(var) = key.env_var() {
        if let Some(value) = std::env::var_os(&var) {
            let value = value.to_string_lossy().into_owned();
            return match key.kind {
                Kind::Switch if matches!(value.as_str(), "" | "0" | "false") => None,
                _ => Some((vec![value], Source::Env(var))),
            };
        }
    }
    files.lookup(key, pool)
}

/// One line of `skyward config`: a key, its value as the command would see it, and where it
/// came from.
#[derive(Debug, serde::Serialize)]
pub struct Resolved {
    pub key: &'static str,
    pub value: Option<String>,
    pub source: String,
    pub env_var: Option<String>,
}

/// Every key as `skyward run` (or, with `pool`, `skyward pool up POOL`) would see it here,
/// from the environment, the files, or the built-in default.
pub fn resolve(files: &Files, pool: Option<&str>) -> Vec<Resolved> {
    let command = Cli::command();
    let run = command.find_subcommand("run");
    KEYS.iter()
        .map(|key| {
            let (value, source) = match setting(key, files, pool) {
                Some((values, source)) => (Some(values.join(", ")), source.to_string()),
                None => {
                    let default = run
                        .and_then(|run| {
                            run.get_arguments()
                                .find(|a| a.get_id() == key.id().as_str())
                        })
                        .map(|arg| {
                            arg.get_default_values()
                                .iter()
                                .map(|v| v.to_string_lossy().into_owned())
                                .collect::<Vec<_>>()
                        })
                        .filter(|values| !values.is_empty());
                    match default {
                        Some(values) => (Some(values.join(", ")), Source::Default.to_string()),
                        None => (None, "unset".to_string()),
                    }
                }
            };
            Resolved {
                key: key.name,
                value,
                source,
                env_var: key.env_var(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<File, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROJECT_FILE);
        std::fs::write(&path, text).unwrap();
        File::read(&path)
    }

    #[test]
    fn bad_files_name_the_key_and_the_fix() {
        for (text, hint) in [
            ("acelerator = \"A100\"", "unknown key `acelerator`"),
            ("nodes = [1, 2]", "`nodes` must be a string or a number"),
            ("env = \"A=1\"", "`env` must be an array"),
            ("reverse = \"yes\"", "`reverse` must be true or false"),
            ("[pools.Train]\nnodes = 2", "lowercase letters"),
            (
                "[pools.train]\nnodez = 2",
                "unknown key `pools.train.nodez`",
            ),
            ("nodes = ", "(line 1)"),
            ("pools = 3", "[pools.NAME]"),
        ] {
            let err = file(text).unwrap_err();
            assert!(err.contains(hint), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    fn files(project: &str, user: &str) -> Files {
        Files {
            project: Some(File {
                path: "/p/skyward.toml".into(),
                table: project.parse().unwrap(),
            }),
            user: Some(File {
                path: "/u/config.toml".into(),
                table: user.parse().unwrap(),
            }),
            error: None,
        }
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("skyward")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn expanded(files: &Files, args: &[&str]) -> Vec<String> {
        let Ok(expanded) = expand(argv(args), files) else {
            panic!("{args:?} refused");
        };
        expanded
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_most_specific_setting_wins() {
        let files = files(
            "provider = \"verda\"\nenv = [\"A=1\"]\n[pools.train]\nnodes = 4\n",
            "provider = \"aws\"\nnodes = 2\nselection = \"cheapest\"\nreverse = true\n[pools.train]\nttl = \"1h\"\n",
        );
        assert_eq!(
            expanded(&files, &["pool", "up", "train", "--selection", "first"]),
            [
                "skyward",
                "pool",
                "up",
                "--provider=verda",
                "--nodes=4",
                "--reverse",
                "--ttl=1h",
                "train",
                "--selection",
                "first"
            ]
        );
        // Job keys go to run and exec, not to pool up; lists add to the command line's.
        assert_eq!(
            expanded(&files, &["exec", "train", "--env", "B=2", "--", "true"]),
            [
                "skyward",
                "exec",
                "--env=A=1",
                "train",
                "--env",
                "B=2",
                "--",
                "true"
            ]
        );
        // No pool named: the defaults; offers takes only what describes nodes.
        assert_eq!(
            expanded(&files, &["offers", "--json"]),
            [
                "skyward",
                "offers",
                "--provider=verda",
                "--selection=cheapest",
                "--json"
            ]
        );
        // Other commands are left alone.
        assert_eq!(
            expanded(&files, &["pool", "list"]),
            ["skyward", "pool", "list"]
        );
    }

    #[test]
    fn resolve_says_where_each_value_came_from() {
        let files = files("provider = \"verda\"\n", "");
        let resolved = resolve(&files, None);
        let get = |key: &str| resolved.iter().find(|r| r.key == key).unwrap();
        assert_eq!(get("provider").value.as_deref(), Some("verda"));
        assert_eq!(get("provider").source, "/p/skyward.toml");
        assert_eq!(get("nodes").value.as_deref(), Some("1"));
        assert_eq!(get("nodes").source, "default");
        assert_eq!(get("accelerator").value, None);
        assert_eq!(get("nodes").env_var.as_deref(), Some("SKYWARD_NODES"));
        assert_eq!(get("env").env_var, None);
    }
}
