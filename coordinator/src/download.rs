//! Serves the agent binary to booting nodes over HTTPS, so nodes need no internet access
//! beyond reaching the coordinator. Nodes check the server against the pool CA they got in
//! their user-data (`curl --cacert`), the certificate naming the coordinator's address.
//!
//! Deliberately tiny: one `GET /agent/linux-<arch>` route, bounded request size, bounded
//! time, bounded concurrency (the TCP port's, [`crate::tcp`]); anything else gets a one-line
//! error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest request head accepted.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time for the request head, once the TLS handshake is done.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the whole transfer (a 10 MB agent over a slow link).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// An agent binary and the `uname -m` name of the machines it runs on.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub arch: &'static str,
    /// Hex SHA-256 of the file as it was when the coordinator started: nodes run what they
    /// download only if it matches (the digest travels in their user-data).
    pub sha256: String,
}

impl AgentBinary {
    /// Reads the architecture from the file's ELF header, and the file's digest.
    pub fn new(path: PathBuf) -> Result<Self, String> {
        let arch = elf_arch(&path)?;
        let sha256 = sha256_of(&path)?;
        Ok(AgentBinary { path, arch, sha256 })
    }
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_of(path: &Path) -> Result<String, String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// `uname -m` of the machines an ELF executable is for.
pub fn elf_arch(path: &Path) -> Result<&'static str, String> {
    let mut header = [0u8; 20];
    let read =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header));
    read.map_err(|e| format!("{}: {e}", path.display()))?;
    if &header[..4] != b"\x7fELF" {
        return Err(format!(
            "{} is not a Linux executable: nodes need a Linux build of skyward-agent (pass --agent-binary or --agent-url)",
            path.display()
        ));
    }
    let machine = if header[5] == 1 {
        u16::from_le_bytes([header[18], header[19]])
    } else {
        u16::from_be_bytes([header[18], header[19]])
    };
    match machine {
        62 => Ok("x86_64"),
        183 => Ok("aarch64"),
        other => Err(format!(
            "{}: unsupported ELF machine {other}",
            path.display()
        )),
    }
}

/// Answers one HTTPS request on a connection the TCP port has taken through its TLS
/// handshake (see [`crate::tcp`]).
pub async fn handle(
    mut stream: crate::tcp::TlsStream,
    binaries: &[AgentBinary],
) -> Result<(), String> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| "request not received in time".to_string())??;
    let response = route(&head, binaries);
    let result = match response {
        Ok(binary) => {
            let mut file = tokio::fs::File::open(&binary.path)
                .await
                .map_err(|e| format!("{}: {e}", binary.path.display()))?;
            let len = file.metadata().await.map_err(|e| e.to_string())?.len();
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            );
            tokio::time::timeout(TRANSFER_TIMEOUT, async {
                stream.write_all(header.as_bytes()).await?;
                tokio::io::copy(&mut file, &mut stream).await?;
                stream.flush().await
            })
            .await
            .map_err(|_| "transfer took too long".to_string())?
            .map_err(|e| e.to_string())
        }
        Err((status, message)) => {
            let body = format!("{message}\n");
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream
                .write_all(reply.as_bytes())
                .await
                .map_err(|e| e.to_string())
        }
    };
    let _ = stream.shutdown().await;
    result
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<String, String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return Err("request head too large".into());
        }
        match stream.read(&mut buf).await {
            Ok(0) => return Err("connection closed before the request ended".into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Which binary a request asks for, or the status and message to answer with.
fn route<'a>(
    head: &str,
    binaries: &'a [AgentBinary],
) -> Result<&'a AgentBinary, (&'static str, String)> {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    if method != "GET" {
        return Err(("405 Method Not Allowed", "only GET is served here".into()));
    }
    let Some(arch) = path.strip_prefix("/agent/linux-") else {
        return Err((
            "404 Not Found",
            "the agent is at /agent/linux-<arch>".into(),
        ));
    };
    binaries.iter().find(|b| b.arch == arch).ok_or_else(|| {
        let have: Vec<&str> = binaries.iter().map(|b| b.arch).collect();
        (
            "404 Not Found",
            format!(
                "no agent for linux-{arch} here (this coordinator serves: {}); start the pool with --agent-binary for that architecture or --agent-url",
                have.join(", ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binaries() -> Vec<AgentBinary> {
        vec![AgentBinary {
            path: "/bin/true".into(),
            arch: "x86_64",
            sha256: String::new(),
        }]
    }

    #[test]
    fn routes_by_architecture_and_refuses_the_rest() {
        let b = binaries();
        assert_eq!(
            route("GET /agent/linux-x86_64 HTTP/1.1\r\n\r\n", &b)
                .unwrap()
                .arch,
            "x86_64"
        );
        let (status, message) = route("GET /agent/linux-aarch64 HTTP/1.1\r\n\r\n", &b).unwrap_err();
        assert!(
            status.starts_with("404") && message.contains("--agent-binary"),
            "{message}"
        );
        assert!(route("POST /agent/linux-x86_64 HTTP/1.1\r\n\r\n", &b)
            .unwrap_err()
            .0
            .starts_with("405"));
        assert!(route("GET /etc/passwd HTTP/1.1\r\n\r\n", &b)
            .unwrap_err()
            .0
            .starts_with("404"));
        assert!(route("", &b).is_err());
    }

    #[test]
    fn reads_elf_architecture() {
        let this = std::env::current_exe().unwrap();
        assert_eq!(elf_arch(&this).unwrap(), std::env::consts::ARCH);
        let err = elf_arch(Path::new("/etc/hostname")).unwrap_err();
        assert!(
            err.contains("not a Linux executable") || err.contains("failed to fill"),
            "{err}"
        );
    }
}
