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
    /// `path` under the base URL (after the base's own path and `prefix`), with `query`.
    pub fn url(&self, prefix: &str, path: &str, query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}{prefix}{path}",
            self.base.path().trim_end_matches('/')
        ));
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().copied());
        }
        url
    }

    /// Sends a call as `retry` says: again while it may be (a rate limit or an undelivered
    /// call; a gateway error or a lost answer when `idempotent`), after the wait the API asks
    /// for (`asked` reads it from an answer's headers) or a backoff. Returns the last answer,
    /// whatever its status, or the error that ended it.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&serde_json::Value>,
        idempotent: bool,
        retry: &Retry,
        asked: impl Fn(&HeaderMap) -> Option<std::time::Duration>,
    ) -> Result<(StatusCode, bytes::Bytes), ProviderError> {
        let mut sends = 0;
        loop {
            sends += 1;
            let answer = self.send(what, method.clone(), url, body).await;
            let (sent, wait) = match &answer {
                Ok((status, headers, _)) => (Sent::Answered(*status), asked(headers)),
                Err((sent, _)) => (*sent, None),
            };
            let Some(wait) = retry.wait_before_next(sends, sent, idempotent, wait) else {
                return answer
                    .map(|(status, _, bytes)| (status, bytes))
                    .map_err(|(_, e)| e);
            };
            tracing::warn!(
                "{what}: {}; retrying in {} ms ({sends}/{})",
                match &answer {
                    Ok((status, ..)) => format!("{} answered {status}", self.provider),
                    Err((_, e)) => e.to_string(),
                },
                wait.as_millis(),
                retry.tries - 1
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends one request (bearer token, optional JSON body) and reads the whole answer. Only
    /// failing to reach the API or to read its answer is an error here, with how far the call
    /// got; statuses are the caller's to judge, with the headers for rate limits.
    pub async fn send(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), (Sent, ProviderError)> {
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            let error = ProviderError::new(
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
            ));
            (Sent::of(&e), error)
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| {
            let error = ProviderError::new(
                self.provider,
                ErrorKind::Api,
                format!("{what}: reading the answer: {}", error_chain(&e)),
            )
            .hint("try again");
            (Sent::AnswerLost, error)
        })?;
        Ok((status, headers, bytes))
    }
}

/// What came of sending a call once, as far as sending it again goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The API answered with this status.
    Answered(StatusCode),
    /// The call never reached the API (no connection): nothing can have happened.
    NotDelivered,
    /// The call went out but no answer came back (a timeout, a dropped connection): it may
    /// have taken effect.
    AnswerLost,
}

impl Sent {
    /// How a transport error left the call.
    pub fn of(error: &reqwest::Error) -> Sent {
        match error.is_connect() {
            true => Sent::NotDelivered,
            false => Sent::AnswerLost,
        }
    }
}

/// Whether sending `method` twice has the effect of sending it once (GET, HEAD, PUT, DELETE,
/// OPTIONS), so that a call whose answer was lost may be sent again.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// Whether an answer may be different if the call is sent again: a rate limit or a gateway
/// error (429, 502, 503, 504).
pub fn transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502..=504)
}

/// When every HTTP provider sends a call again. A 429, or a call that never reached the API,
/// is always sent again: nothing happened. A gateway error (502, 503, 504) or a lost answer
/// only when the call is idempotent: a create sent twice could make two machines. At most
/// `tries` sends in all, and never after a wait longer than `max_wait` (a limit that resets
/// in an hour is an error now, not a hang).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub tries: u32,
    /// The wait before the second send when the API asks for none; each later one is
    /// `factor` times longer, up to `max_backoff`.
    pub first_backoff: std::time::Duration,
    pub factor: f64,
    pub max_backoff: std::time::Duration,
    pub max_wait: std::time::Duration,
}

impl Retry {
    /// How long to wait before sending the call again, after `sends` sends so far the last
    /// of which came to `sent`, the API asking for `asked` (its `Retry-After`); `None`: give
    /// up and report what the last send came to.
    pub fn wait_before_next(
        &self,
        sends: u32,
        sent: Sent,
        idempotent: bool,
        asked: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        let again = match sent {
            Sent::Answered(StatusCode::TOO_MANY_REQUESTS) | Sent::NotDelivered => true,
            Sent::Answered(status) => transient(status) && idempotent,
            Sent::AnswerLost => idempotent,
        };
        if !again || sends >= self.tries {
            return None;
        }
        let backoff = self
            .first_backoff
            .mul_f64(self.factor.powi(sends.saturating_sub(1).min(30) as i32))
            .min(self.max_backoff);
        let wait = asked.unwrap_or(backoff);
        (wait <= self.max_wait).then_some(wait)
    }
}

/// `Retry-After` in seconds (fractions allowed), if the answer has one.
pub fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    let seconds: f64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| std::time::Duration::from_secs_f64(seconds.min(86_400.0)))
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
    fn only_calls_that_cannot_have_taken_effect_or_are_safe_to_repeat_are_sent_again() {
        use std::time::Duration;
        let retry = Retry {
            tries: 3,
            first_backoff: Duration::from_millis(100),
            factor: 2.0,
            max_backoff: Duration::from_millis(150),
            max_wait: Duration::from_secs(30),
        };
        let status = |code: u16| Sent::Answered(StatusCode::from_u16(code).unwrap());
        // A rate limit or an undelivered call: whatever the method.
        assert_eq!(
            retry.wait_before_next(1, status(429), false, None),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            retry.wait_before_next(2, Sent::NotDelivered, false, None),
            Some(Duration::from_millis(150)),
            "backoff doubles up to its bound"
        );
        // A gateway error or a lost answer: only what is safe to repeat.
        assert_eq!(retry.wait_before_next(1, status(502), false, None), None);
        assert!(retry.wait_before_next(1, status(503), true, None).is_some());
        assert_eq!(
            retry.wait_before_next(1, Sent::AnswerLost, false, None),
            None
        );
        assert!(retry
            .wait_before_next(1, Sent::AnswerLost, true, None)
            .is_some());
        // Never a refusal, never past the tries or the longest wait.
        assert_eq!(retry.wait_before_next(1, status(500), true, None), None);
        assert_eq!(retry.wait_before_next(1, status(400), true, None), None);
        assert_eq!(retry.wait_before_next(3, status(429), true, None), None);
        assert_eq!(
            retry.wait_before_next(1, status(429), true, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2)),
            "the API's own wait wins"
        );
        assert_eq!(
            retry.wait_before_next(1, status(429), true, Some(Duration::from_secs(3600))),
            None
        );
        assert!(idempotent(&Method::DELETE) && !idempotent(&Method::POST));
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(
            retry_after(&headers),
            Some(std::time::Duration::from_secs(2))
        );
        headers.insert(reqwest::header::RETRY_AFTER, "0.5".parse().unwrap());
        assert_eq!(
            retry_after(&headers),
            Some(std::time::Duration::from_millis(500))
        );
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn one_line_joins_and_bounds() {
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc...");
    }
}
