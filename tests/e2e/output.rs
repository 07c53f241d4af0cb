//! Output integrity: every byte arrives, in order, while the task is still running.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use skyward_tests::Sandbox;

const SIZE: usize = 100 * 1000 * 1000;

#[test]
fn hundred_megabytes_arrive_byte_identical_while_the_task_runs() {
    let sandbox = Sandbox::new();
    // Incompressible, reproducible data: a xorshift stream.
    let data_path = sandbox.path().join("data.bin");
    let mut data = vec![0u8; SIZE];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&data_path, &data).unwrap();
    let expected = Sha256::digest(&data);
    drop(data);

    // The task writes everything, then waits for a file that the test creates only once it
    // has read all the bytes: so the bytes must have streamed before the task could exit.
    let go = sandbox.path().join("go");
    let script = format!(
        "cat {}; i=0; while [ ! -e {} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; echo >&2 waited",
        data_path.display(),
        go.display()
    );
    let mut child = sandbox
        .skyward()
        .args(["run", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while received < SIZE {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "stdout ended after {received} bytes");
        hasher.update(&buf[..n]);
        received += n;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the CLI exited before the task was released: output was not streamed"
    );
    std::fs::write(&go, b"").unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes too many", rest.len());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "waited\n");
    assert_eq!(hasher.finalize(), expected, "output differs from the input");
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}
