//! `skyward.toml`, the user's config file and `SKYWARD_*` variables, as the real CLI reads
//! them; shell completions and man pages.

use std::time::Duration;

use skyward_tests::{run, Finished, Sandbox};

const LIMIT: Duration = Duration::from_secs(60);

/// A project directory with `skyward.toml`, and a directory below it to run from.
fn project(sandbox: &Sandbox, text: &str) -> std::path::PathBuf {
    let root = sandbox.path().join("project");
    std::fs::create_dir_all(root.join("src/deep")).unwrap();
    std::fs::write(root.join("skyward.toml"), text).unwrap();
    root.join("src/deep")
}

fn user_config(sandbox: &Sandbox, text: &str) {
    let dir = sandbox.path().join("user-home/.config/skyward");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.toml"), text).unwrap();
}

fn sky_in(
    sandbox: &Sandbox,
    cwd: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Finished {
    let mut command = sandbox.skyward();
    command.current_dir(cwd).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    run(&mut command, LIMIT)
}

fn greeting_lines(out: &Finished) -> usize {
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .filter(|l| l.ends_with("hello from the file"))
        .count()
}

#[test]
fn files_then_variables_then_flags() {
    let sandbox = Sandbox::new();
    let cwd = project(
        &sandbox,
        "nodes = 2\nenv = [\"GREETING=hello from the file\"]\n\n[pools.train]\nnodes = 3\n",
    );
    // The user's file gives what the project's does not, and loses where both do.
    user_config(&sandbox, "nodes = 5\nnode-timeout = \"20s\"\n");
    let broadcast = ["run", "--on", "all", "--", "sh", "-c", "echo $GREETING"];
    assert_eq!(greeting_lines(&sky_in(&sandbox, &cwd, &broadcast, &[])), 2);
    assert_eq!(
        greeting_lines(&sky_in(
            &sandbox,
            &cwd,
            &broadcast,
            &[("SKYWARD_NODES", "1")]
        )),
        1
    );
    let mut flagged = broadcast.to_vec();
    flagged.splice(1..1, ["--nodes", "3"]);
    assert_eq!(greeting_lines(&sky_in(&sandbox, &cwd, &flagged, &[])), 3);

    let config = sky_in(&sandbox, &cwd, &["config", "--json"], &[]);
    assert_eq!(config.code, Some(0), "{config:?}");
    let settings: serde_json::Value = serde_json::from_str(&config.stdout).unwrap();
    let setting = |key: &str| {
        settings
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key}"))
    };
    let project_file = sandbox.path().join("project/skyward.toml");
    assert_eq!(setting("nodes")["value"], "2");
    assert_eq!(
        setting("nodes")["source"],
        project_file.display().to_string()
    );
    assert_eq!(setting("node-timeout")["value"], "20s");
    assert!(setting("node-timeout")["source"]
        .as_str()
        .unwrap()
        .ends_with("skyward/config.toml"));
    assert_eq!(setting("provider")["source"], "default");
    assert_eq!(setting("nodes")["env_var"], "SKYWARD_NODES");
    let table = sky_in(&sandbox, &cwd, &["config", "--pool", "train"], &[]);
    assert!(
        table
            .stdout
            .contains(&format!("{} [pools.train]", project_file.display())),
        "{table:?}"
    );

    // A named pool's section applies to `pool up NAME`; the defaults' env to `exec`.
    let up = sky_in(&sandbox, &cwd, &["pool", "up", "train"], &[]);
    assert_eq!(up.code, Some(0), "{up:?}");
    assert!(up.stderr.contains("(3 nodes)"), "{up:?}");
    let exec = sky_in(
        &sandbox,
        &cwd,
        &[
            "exec",
            "train",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "echo $GREETING",
        ],
        &[],
    );
    assert_eq!(greeting_lines(&exec), 3);
    let down = sky_in(&sandbox, &cwd, &["pool", "down", "train"], &[]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

#[test]
fn a_bad_file_is_named_and_changes_nothing() {
    let sandbox = Sandbox::new();
    for (text, hint) in [
        ("nodez = 2\n", "unknown key `nodez`"),
        ("nodes = \"two\"\n", "--nodes"),
        (
            "[pools.train]\nnodes = [1]\n",
            "`pools.train.nodes` must be a string or a number",
        ),
    ] {
        let cwd = project(&sandbox, text);
        let out = sky_in(&sandbox, &cwd, &["run", "--", "true"], &[]);
        assert_eq!(out.code, Some(2), "{text:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert!(out.stderr.contains(hint), "{text:?}: {out:?}");
        assert!(out.stderr.contains("skyward.toml"), "{out:?}");
        // Commands that read no settings still work.
        let list = sky_in(&sandbox, &cwd, &["pool", "list"], &[]);
        assert_eq!(list.stdout.trim(), "no pools", "{list:?}");
    }
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    let sandbox = Sandbox::new();
    let out = run(sandbox.skyward().args(["completions", "bash"]), LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("exec") && out.stdout.contains("--provider"));
    let script = sandbox.path().join("skyward.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let syntax = run(
        std::process::Command::new("bash").arg("-n").arg(&script),
        LIMIT,
    );
    assert_eq!(syntax.code, Some(0), "{syntax:?}");
    for shell in ["zsh", "fish"] {
        let out = run(sandbox.skyward().args(["completions", shell]), LIMIT);
        assert_eq!(out.code, Some(0), "{shell}: {out:?}");
        assert!(out.stdout.contains("pool"), "{shell}");
    }

    let pages = sandbox.path().join("man");
    let out = run(sandbox.skyward().args(["man", "--out"]).arg(&pages), LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    for page in [
        "skyward.1",
        "skyward-run.1",
        "skyward-exec.1",
        "skyward-pool-up.1",
    ] {
        let text =
            std::fs::read_to_string(pages.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let run_page = std::fs::read_to_string(pages.join("skyward-run.1")).unwrap();
    assert!(run_page.contains("accelerator"), "{run_page}");
    assert!(
        !pages.join("skyward-pool-serve.1").exists(),
        "hidden commands get no page"
    );
}
