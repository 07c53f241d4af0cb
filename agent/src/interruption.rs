//! Spot interruption notices: on AWS, the instance metadata service says two minutes ahead
//! that a spot instance will be reclaimed (`spot/instance-action`, through an IMDSv2 session
//! token). The agent asks every few seconds and hands a notice to its session, which tells
//! the coordinator at once.
//!
//! The metadata service is plain HTTP on a link-local address, so a small bounded HTTP/1.1
//! exchange over a TCP stream does, without an HTTP client in the agent.

use std::time::Duration;

use skyward_common::protocol::Interruption;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Where EC2's instance metadata service answers.
pub const AWS_IMDS: &str = "169.254.169.254:80";
/// How often the notice is asked for (AWS posts it two minutes ahead).
const POLL: Duration = Duration::from_secs(5);
/// How long one metadata request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest metadata answer read.
const MAX_ANSWER: usize = 16 * 1024;
/// IMDSv2 session tokens are asked for this long (seconds), and renewed well before.
const TOKEN_TTL_SECS: u64 = 21_600;

/// Which interruption notices an agent watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// AWS's instance metadata service at this `host:port`.
    Aws { imds: String },
}

impl Watch {
    /// `aws` (the metadata service's own address, or `SKYWARD_IMDS` when set) or
    /// `aws=HOST:PORT`.
    pub fn parse(text: &str) -> Result<Watch, String> {
        match text.split_once('=') {
            None if text == "aws" => Ok(Watch::Aws {
                imds: std::env::var("SKYWARD_IMDS").unwrap_or_else(|_| AWS_IMDS.into()),
            }),
            Some(("aws", address)) if !address.is_empty() => Ok(Watch::Aws {
                imds: address.into(),
            }),
            _ => Err(format!(
                "{text:?}: use aws (EC2's instance metadata service) or aws=HOST:PORT"
            )),
        }
    }
}

/// Watches for a notice until one comes; the latest is in the returned channel.
pub fn spawn(watch: Watch) -> watch::Receiver<Option<Interruption>> {
    let (notice_tx, notice_rx) = watch::channel(None);
    tokio::spawn(async move {
        let Watch::Aws { imds } = watch;
        let mut token: Option<(String, tokio::time::Instant)> = None;
        loop {
            match aws_notice(&imds, &mut token).await {
                Ok(Some(notice)) => {
                    tracing::warn!(
                        "spot interruption notice: {} at {}",
                        notice.action,
                        notice.at
                    );
                    let _ = notice_tx.send(Some(notice));
                    return;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("instance metadata: {e}"),
            }
            tokio::time::sleep(POLL).await;
        }
    });
    notice_rx
}

/// Asks for the spot instance action once; `None` while there is none (404).
async fn aws_notice(
    imds: &str,
    token: &mut Option<(String, tokio::time::Instant)>,
) -> Result<Option<Interruption>, String> {
    let fresh = token
        .as_ref()
        .is_some_and(|(_, at)| at.elapsed() < Duration::from_secs(TOKEN_TTL_SECS / 2));
    if !fresh {
        let ttl = TOKEN_TTL_SECS.to_string();
        let (status, body) = request(
            imds,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)],
        )
        .await?;
        if status != 200 {
            return Err(format!("session token: HTTP {status}"));
        }
        *token = Some((body.trim().to_string(), tokio::time::Instant::now()));
    }
    let session = token.as_ref().map(|(t, _)| t.as_str()).unwrap_or_default();
    let (status, body) = request(
        imds,
        "GET",
        "/latest/meta-data/spot/instance-action",
        &[("X-aws-ec2-metadata-token", session)],
    )
    .await?;
    match status {
        200 => parse_instance_action(&body).map(Some),
        404 => Ok(None),
        401 => {
            // The token expired or was refused: get another next time.
            *token = None;
            Err("session token refused".into())
        }
        other => Err(format!("spot/instance-action: HTTP {other}")),
    }
}

/// `{"action": "terminate", "time": "2026-11-27T14:05:00Z"}`.
pub fn parse_instance_action(body: &str) -> Result<Interruption, String> {
    #[derive(serde::Deserialize)]
    struct Action {
        action: String,
        time: String,
    }
    let action: Action = serde_json::from_str(body)
        .map_err(|e| format!("spot/instance-action is not the expected JSON: {e}"))?;
    let bounded = |s: String| s.chars().take(64).collect::<String>();
    Ok(Interruption {
        source: "aws spot".into(),
        action: bounded(action.action),
        at: bounded(action.time),
    })
}

/// One HTTP/1.1 request with `Connection: close`; the status and body, bounded in size and
/// time.
async fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: 0\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer.len() > MAX_ANSWER {
            return Err(format!("answer larger than {MAX_ANSWER} bytes"));
        }
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{address}: no answer within {REQUEST_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_is_aws_at_its_own_address_or_a_given_one() {
        if std::env::var_os("SKYWARD_IMDS").is_none() {
            assert_eq!(
                Watch::parse("aws"),
                Ok(Watch::Aws {
                    imds: AWS_IMDS.into()
                })
            );
        }
        assert_eq!(
            Watch::parse("aws=127.0.0.1:9"),
            Ok(Watch::Aws {
                imds: "127.0.0.1:9".into()
            })
        );
        for bad in ["gcp", "aws=", ""] {
            assert!(Watch::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_instance_action_is_read_and_bounded() {
        let notice =
            parse_instance_action(r#"{"action": "terminate", "time": "2026-11-27T14:05:00Z"}"#)
                .unwrap();
        assert_eq!(
            (notice.action.as_str(), notice.at.as_str()),
            ("terminate", "2026-11-27T14:05:00Z")
        );
        let long = format!(r#"{{"action": "{}", "time": "t"}}"#, "x".repeat(10_000));
        assert_eq!(parse_instance_action(&long).unwrap().action.len(), 64);
        assert!(parse_instance_action("<html>").is_err());
    }
}
