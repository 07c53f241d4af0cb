//! Small pieces every HTTP-based provider (DigitalOcean, Verda, VastAI) needs the same way.

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};

use super::{ErrorKind, ProviderError};

/// Parses a provider's API base URL: http(s) with a host, or a one-line reason naming `what`.
pub fn http_base(url: &str, what: &str) -> Result<Url, String> {
    match Url::parse(url.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        _ => Err(format!("{what} {url:?} is not an http(s) URL")),
    }
}

/// A URL as shown in messages: no credentials, no query, no trailing slash.
pub fn base_display(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.to_string().trim_end_matches('/').to_string()
}

/// A provider's API, as far as sending one authenticated request goes.
pub struct Api<'a> {
    pub provider: &'a str,
    pub http: &'a reqwest::Client,
    pub base: &'a Url,
    pub token: &'a str,
    /// The variable that overrides the base URL, named when the API cannot be reached.
    pub url_variable: &'a str,
}

impl Api<'_> {
    /// Sends one request (bearer token, optional JSON body) and reads the whole answer. Only
    /// failing to reach the API or to read its answer is an error here; statuses are the
    /// caller's to judge, with the headers for rate limits.
    pub async fn send(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), ProviderError> {
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            ProviderError::new(
                self.provider,
                ErrorKind::Api,
                format!(
                    "{what}: cannot reach {}: {}",
                    base_display(self.base),
                    error_chain(&e)
                ),
            )
            .hint(format!(
                "check the network, or {} if it is set",
                self.url_variable
            ))
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| {
            ProviderError::new(
                self.provider,
                ErrorKind::Api,
                format!("{what}: reading the answer: {}", error_chain(&e)),
            )
            .hint("try again")
        })?;
        Ok((status, headers, bytes))
    }
}

/// An error and its causes on one line, each cause once (reqwest nests the useful part).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    for _ in 0..8 {
        let Some(cause) = source else { break };
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A provider's free text (an error body) as one bounded line.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.chars().count() > max_chars {
        format!("{}...", joined.chars().take(max_chars).collect::<String>())
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_secrets() {
        assert!(http_base("ftp://x", "VAST_URL")
            .unwrap_err()
            .contains("VAST_URL \"ftp://x\""));
        let url = http_base("https://user:pw@api.example/v1/?token=s", "x").unwrap();
        assert_eq!(base_display(&url), "https://api.example/v1");
    }

    #[test]
    fn one_line_joins_and_bounds() {
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc...");
    }
}
