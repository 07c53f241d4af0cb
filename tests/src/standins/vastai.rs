//! A VastAI API stand-in on loopback, answering in the real API's shapes, status codes and
//! quirks (see `docs/cloud-apis.md` and the `vastai` CLI):
//! - offer search (`POST /api/v0/bundles/`) honours every filter it is sent, with the ops
//!   eq, neq, gt, gte, lt, lte, in, notin, numbers given as numbers or strings, `gpu_ram` and
//!   `cpu_ram` in MB, `geolocation` matched on the country code; an unknown field is refused;
//! - renting (`PUT /api/v0/asks/{id}/`) checks `client_id`, the disk (>= 8 GB), the label
//!   (<= 256), the env (<= 32 KiB), the bid (0.001..128, not under `min_bid`) and `onstart`
//!   with `args` (<= 4096 characters, else `invalid_args`); a gone offer answers 404
//!   `no_such_ask`, or (the quirk) 400 `invalid_args` with `no_such_ask` only in `msg`;
//! - instances go `actual_status` null -> `loading` -> `running`, one step per read, or
//!   `exited` for those a test dooms; destroying one kills its node;
//! - overlays: create on a cluster, join, list, delete (which destroys its instances);
//! - auth: no key 403 "This action requires login."; a wrong key 404 on search and 401
//!   elsewhere, `{"success":false,"error":"auth_error","msg":"Invalid user key"}`; each
//!   instance's own `CONTAINER_API_KEY` may destroy or stop that instance only;
//! - 429 `{"detail": ...}` with `Retry-After`, on demand.
//!
//! Each rule that accepts or refuses a request names its source beside it:
//! `docs/cloud-apis.md#vastai`, VastAI's own OpenAPI pages (github.com/vast-ai/docs,
//! `api-reference/openapi/yaml/*.yaml`, cited as "VastAI OpenAPI `<page>`"), or the `vastai`
//! CLI/SDK (github.com/vast-ai/vast-cli); the few with none say so.
//!
//! An instance that reaches `running` boots: its `onstart` runs as a [`BootedNode`] with the
//! container's environment (`CONTAINER_ID`, `CONTAINER_API_KEY`, the `env` it was created
//! with) exported before it; the compressed loader is run as it is, so the system's
//! `base64` and `gunzip` unpack it.
//!
//! With [`VastAiStandIn::set_boot_isolated`], each instance boots in a network namespace of
//! its own ([`BootedNode::boot_isolated`]), and the ports its `env` publishes (`-p
//! 7444:7444/udp`) are mapped for real, as a VastAI host does: host port `40000 + ...` of the
//! namespace's address is redirected to the container's port, and the container's port
//! itself is closed to anything not redirected. Only then are `public_ipaddr` (the
//! namespace's address) and `ports` reported, so that no test can dial an address the
//! stand-in made up. Without it, `public_ipaddr` is loopback and no port is mapped.

use super::server::StandinServer;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use skyward_providers::vastai::VastAiConfig;

use crate::node::BootedNode;

/// The API key the stand-in accepts.
pub const KEY: &str = "vast-standin-0123456789abcdef0123456789abcdef";
/// VastAI's limit on `onstart` + `args` + `args_str`.
pub const ONSTART_LIMIT: usize = 4096;
/// VastAI's limit on an image name, in characters.
const IMAGE_LIMIT: usize = 1024;
/// VastAI's limit on one `env` entry's key or value, and on the whole `env`, in characters.
const ENV_ENTRY_LIMIT: usize = 256;
const ENV_LIMIT: usize = 32 * 1024;

/// Who a request came as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No key.
    Nobody,
    /// The account's key.
    User,
    /// The per-instance key of this instance.
    Container(u64),
    /// A key that is neither.
    Wrong,
}

/// One request as it came, and the status it was answered with.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
    pub caller: Caller,
    pub status: u16,
}

/// How renting a gone offer is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// 404 `{"error": "no_such_ask"}`.
    NoSuchAsk,
    /// 400 `{"error": "invalid_args", "msg": "... no_such_ask ..."}`.
    InvalidArgs,
}

/// An instance as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub id: u64,
    pub offer_id: u64,
    pub cluster_id: Option<u64>,
    pub label: String,
    pub image: String,
    pub env: Map<String, Value>,
    pub disk: f64,
    /// The bid, for interruptible instances.
    pub price: Option<f64>,
    pub onstart: String,
    pub actual_status: Option<String>,
    pub doomed: bool,
    /// Container ports its `env` publishes, as `7444/udp`, with the host port each is mapped
    /// to (reported once it booted isolated).
    pub ports: BTreeMap<String, u16>,
    /// Its namespace's address, once it booted isolated: its `public_ipaddr`.
    pub public_ip: Option<Ipv4Addr>,
    /// Its network namespace, once it booted isolated.
    pub namespace: Option<String>,
}

/// An overlay network as the stand-in holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayInfo {
    pub id: u64,
    pub name: String,
    pub cluster_id: u64,
    pub instances: Vec<u64>,
}

struct Inst {
    info: InstanceInfo,
    machine_id: u64,
    /// It boots in a namespace of its own, with its ports mapped.
    isolated: bool,
    container_key: String,
    status_msg: Option<String>,
    created: f64,
}

struct Inner {
    offers: Vec<Value>,
    gone: HashMap<u64, Gone>,
    instances: BTreeMap<u64, Inst>,
    overlays: Vec<OverlayInfo>,
    next_instance: u64,
    next_overlay: u64,
    doom_next: usize,
    rate_limited: usize,
    retry_after: Option<String>,
    /// (method, path prefix, how many): calls carried out whose answer becomes a 502.
    lost_answers: Vec<(String, String, usize)>,
    requests: Vec<Recorded>,
    booted: HashMap<u64, BootedNode>,
    boot_errors: Vec<String>,
    boots: usize,
    boot_isolated: bool,
}

struct Shared {
    state: Mutex<Inner>,
    boot_root: PathBuf,
}

pub struct VastAiStandIn {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    /// Taken (stopped) first when dropped, before the nodes go.
    server: Option<StandinServer>,
}

/// What a request answered, and what must happen once the state lock is released.
struct Answer {
    status: StatusCode,
    body: Value,
    retry_after: Option<String>,
    destroy: Vec<(PathBuf, Option<BootedNode>)>,
    boot: Vec<Boot>,
}

/// An instance to boot, once the state lock is released.
struct Boot {
    id: u64,
    dir: String,
    script: String,
    /// In a namespace of its own, with these ports mapped: (`7444/udp`, host port).
    isolated: Option<Vec<(String, u16)>>,
}

impl Answer {
    fn ok(body: Value) -> Answer {
        Answer {
            status: StatusCode::OK,
            body,
            retry_after: None,
            destroy: Vec::new(),
            boot: Vec::new(),
        }
    }

    fn error(status: StatusCode, error: &str, msg: &str) -> Answer {
        Answer {
            status,
            ..Answer::ok(json!({"success": false, "error": error, "msg": msg}))
        }
    }

    /// This answer in place of `done`'s, with what `done` still has to do (boots, destroys).
    fn carrying(self, done: Answer) -> Answer {
        Answer {
            destroy: done.destroy,
            boot: done.boot,
            ..self
        }
    }
}

impl VastAiStandIn {
    /// Serves on 127.0.0.1 (a free port) with no offers; instances boot under
    /// `boot_root/vast-<id>`.
    pub async fn start(boot_root: &Path) -> VastAiStandIn {
        // Bound first: the stand-in names its own address in its answers.
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(Shared {
            state: Mutex::new(Inner {
                offers: Vec::new(),
                gone: HashMap::new(),
                instances: BTreeMap::new(),
                overlays: Vec::new(),
                next_instance: 9_000_001,
                next_overlay: 301,
                doom_next: 0,
                rate_limited: 0,
                retry_after: None,
                lost_answers: Vec::new(),
                requests: Vec::new(),
                booted: HashMap::new(),
                boot_errors: Vec::new(),
                boots: 0,
                boot_isolated: false,
            }),
            boot_root: boot_root.to_path_buf(),
        });
        let server = StandinServer::serve_handler("vastai", listener, handle, shared.clone());
        VastAiStandIn {
            addr,
            shared,
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A provider configuration pointed here, with the key accepted and short polls.
    pub fn config(&self) -> VastAiConfig {
        VastAiConfig {
            api_url: Some(self.url()),
            api_key: Some(KEY.into()),
            poll_interval: Duration::from_millis(100),
            running_timeout: Duration::from_secs(30),
            teardown_timeout: Duration::from_secs(20),
            ..VastAiConfig::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.state.lock().expect("stand-in state")
    }

    /// Adds an offer: `fields` over a verified, rentable 1x RTX 4090 host in Texas. `id` is
    /// required.
    pub fn add_offer(&self, fields: Value) -> u64 {
        let id = fields["id"].as_u64().expect("an offer needs an id");
        let mut offer = offer_template(id);
        let fields = fields.as_object().expect("offer fields are an object");
        for (key, value) in fields {
            offer[key.as_str()] = value.clone();
        }
        if !fields.contains_key("gpu_total_ram") {
            let total = offer["gpu_ram"].as_f64().unwrap_or(0.0)
                * offer["num_gpus"].as_f64().unwrap_or(0.0);
            offer["gpu_total_ram"] = json!(total);
        }
        if !fields.contains_key("reliability2") {
            offer["reliability2"] = offer["reliability"].clone();
        }
        self.state().offers.push(offer);
        id
    }

    /// Renting `offer` fails from now on, as if someone else had just rented it (it stays
    /// listed, as a stale search result would).
    pub fn make_gone(&self, offer: u64, how: Gone) {
        self.state().gone.insert(offer, how);
    }

    /// Boots each instance from now on in a network namespace of its own, with its published
    /// ports mapped to host ports of the namespace's address (needs root and iptables).
    pub fn set_boot_isolated(&self, isolated: bool) {
        self.state().boot_isolated = isolated;
    }

    /// The next `count` instances created go `exited` instead of `running`.
    pub fn exit_next(&self, count: usize) {
        self.state().doom_next = count;
    }

    /// The next `count` requests are answered 429, with `Retry-After` when given.
    pub fn rate_limit(&self, count: usize, retry_after: Option<&str>) {
        let mut state = self.state();
        state.rate_limited = count;
        state.retry_after = retry_after.map(str::to_string);
    }

    /// The next `count` calls of `method` to a path starting with `path_prefix` (`/api/v0`
    /// included) are carried out, but answered with a gateway's 502.
    pub fn lose_answers(&self, method: &str, path_prefix: &str, count: usize) {
        self.state()
            .lost_answers
            .push((method.into(), path_prefix.into(), count));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// The bodies of every offer search, in order.
    pub fn searches(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/api/v0/bundles/")
            .filter_map(|r| r.body)
            .collect()
    }

    /// Every rental asked for: the offer id, the body and the status answered.
    pub fn rentals(&self) -> Vec<(u64, Value, u16)> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PUT")
            .filter_map(|r| {
                let id = r
                    .path
                    .strip_prefix("/api/v0/asks/")?
                    .trim_end_matches('/')
                    .parse()
                    .ok()?;
                Some((id, r.body.unwrap_or(Value::Null), r.status))
            })
            .collect()
    }

    /// Instances destroyed, with who asked.
    pub fn deletes(&self) -> Vec<(u64, Caller)> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "DELETE" && r.status == 200)
            .filter_map(|r| {
                let id = r
                    .path
                    .strip_prefix("/api/v0/instances/")?
                    .trim_end_matches('/')
                    .parse()
                    .ok()?;
                Some((id, r.caller))
            })
            .collect()
    }

    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.state()
            .instances
            .values()
            .map(|i| i.info.clone())
            .collect()
    }

    pub fn overlays(&self) -> Vec<OverlayInfo> {
        self.state().overlays.clone()
    }

    /// Ids of the instances whose node booted and is still up.
    pub fn booted(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.state().booted.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// How many instances started booting so far.
    pub fn boots(&self) -> usize {
        self.state().boots
    }

    pub fn boot_errors(&self) -> Vec<String> {
        self.state().boot_errors.clone()
    }

    /// Every booted node's boot and agent logs, for failure messages.
    pub fn node_logs(&self) -> String {
        let state = self.state();
        let mut text = String::new();
        for (id, node) in &state.booted {
            text.push_str(&format!(
                "--- instance {id} boot:\n{}\n--- agent:\n{}\n",
                node.boot_log,
                node.agent_log()
            ));
        }
        for error in &state.boot_errors {
            text.push_str(&format!("--- boot error: {error}\n"));
        }
        text
    }
}

impl Drop for VastAiStandIn {
    fn drop(&mut self) {
        drop(self.server.take());
        let (booted, dirs): (Vec<BootedNode>, Vec<PathBuf>) = {
            let mut state = self.state();
            let dirs = state
                .instances
                .keys()
                .map(|id| self.shared.boot_root.join(dir_name(*id)))
                .collect();
            state.instances.clear();
            (state.booted.drain().map(|(_, n)| n).collect(), dirs)
        };
        drop(booted);
        for dir in dirs {
            kill_under(&dir);
        }
    }
}

/// A verified, rentable host with one RTX 4090, in the shape search returns.
fn offer_template(id: u64) -> Value {
    json!({
        "id": id,
        "ask_contract_id": id,
        "bundle_id": id,
        "machine_id": 40_000 + id,
        "host_id": 1_700 + id % 50,
        "num_gpus": 1,
        "gpu_name": "RTX 4090",
        "gpu_ram": 24564,
        "gpu_total_ram": 24564,
        "gpu_arch": "nvidia",
        "compute_cap": 890,
        "cpu_name": "AMD EPYC 7543 32-Core Processor",
        "cpu_cores": 64,
        "cpu_cores_effective": 16.0,
        "cpu_ram": 64318,
        "disk_space": 200.0,
        "disk_bw": 2400.0,
        "dph_base": 0.38,
        "dph_total": 0.4,
        "min_bid": 0.2,
        "storage_cost": 0.1,
        "reliability": 0.995,
        "reliability2": 0.995,
        "geolocation": "Texas, US",
        "cluster_id": null,
        "verified": true,
        "external": false,
        "rentable": true,
        "rented": false,
        "static_ip": false,
        "cuda_max_good": 12.4,
        "driver_version": "550.54.14",
        "inet_up": 812.5,
        "inet_down": 904.1,
        "direct_port_count": 100,
        "hosting_type": 0,
        "score": 241.3,
        "dlperf": 60.1,
        "total_flops": 82.6,
        "is_bid": false
    })
}

fn dir_name(id: u64) -> String {
    format!("vast-{id}")
}

fn kill_under(dir: &Path) {
    for (pid, _) in crate::processes_under(dir) {
        // SAFETY: signalling a process by pid.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let caller = {
        let state = shared.state.lock().expect("state");
        caller_of(&headers, &state)
    };
    let parsed: Result<Option<Value>, String> = if body.is_empty() {
        Ok(None)
    } else {
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    let answer = {
        let mut state = shared.state.lock().expect("state");
        let answer = match &parsed {
            // Source: VastAI OpenAPI search_offers (400 "Invalid json body") and show_instance
            // (400 "Invalid args: invalid json").
            Err(e) => Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_args",
                &format!("malformed JSON: {e}"),
            ),
            Ok(body) => route(
                &shared,
                &mut state,
                &method,
                &path,
                &query,
                &caller,
                body.as_ref(),
            ),
        };
        state.requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            query,
            body: parsed.ok().flatten(),
            caller,
            status: answer.status.as_u16(),
        });
        answer
    };
    let Answer {
        status,
        body,
        retry_after,
        destroy,
        boot: boots,
    } = answer;
    for (dir, node) in destroy {
        drop(node);
        kill_under(&dir);
    }
    for one in boots {
        boot(shared.clone(), one);
    }
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

fn caller_of(headers: &HeaderMap, state: &Inner) -> Caller {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return Caller::Nobody;
    };
    let key = value.strip_prefix("Bearer ").unwrap_or(value).trim();
    if key.is_empty() {
        return Caller::Nobody;
    }
    if key == KEY {
        return Caller::User;
    }
    state
        .instances
        .values()
        .find(|i| i.container_key == key)
        .map(|i| Caller::Container(i.info.id))
        .unwrap_or(Caller::Wrong)
}

/// The account's key, or the answer VastAI gives without it: 403 with no key, `wrong` (404
/// on search, 401 elsewhere) with a wrong one.
///
/// Source: docs/cloud-apis.md#vastai ("no key -> 403 \"This action requires login.\"; a wrong
/// key -> 404 on search but 401 on `instances/{id}`", body `auth_error` "Invalid user key");
/// VastAI OpenAPI search_offers (404 "Invalid user key") and show_instance (401 `auth_error`).
fn require_user(caller: &Caller, wrong: StatusCode) -> Result<(), Answer> {
    match caller {
        Caller::User => Ok(()),
        Caller::Nobody => Err(Answer::error(
            StatusCode::FORBIDDEN,
            "auth_error",
            "This action requires login.",
        )),
        Caller::Wrong | Caller::Container(_) => {
            Err(Answer::error(wrong, "auth_error", "Invalid user key"))
        }
    }
}

fn route(
    shared: &Shared,
    state: &mut Inner,
    method: &Method,
    path: &str,
    query: &str,
    caller: &Caller,
    body: Option<&Value>,
) -> Answer {
    // Test hook (`rate_limit`), in the shape of docs/cloud-apis.md#vastai (429 `{"detail": ...}`)
    // and VastAI OpenAPI create_instance's 429.
    if state.rate_limited > 0 {
        state.rate_limited -= 1;
        return Answer {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: state.retry_after.clone(),
            ..Answer::ok(json!({
                "detail": "API requests too frequent endpoint threshold=4.0 (per 1 seconds)"
            }))
        };
    }
    let result =
        match (method.as_str(), path) {
            ("POST", "/api/v0/bundles/") => {
                require_user(caller, StatusCode::NOT_FOUND).and_then(|()| {
                    search(state, body.unwrap_or(&Value::Null))
                        .map(|offers| Answer::ok(json!({"offers": offers})))
                })
            }
            ("GET", "/api/v0/instances/") => require_user(caller, StatusCode::UNAUTHORIZED)
                .and_then(|()| {
                    // docs/cloud-apis.md#vastai names the listing `?owner=me`, as the CLI
                    // sends it; no vendor source says the API refuses a listing without it,
                    // so this may refuse more than VastAI does (Skyward always sends it).
                    if !query.split('&').any(|p| p == "owner=me") {
                        return Err(Answer::error(
                            StatusCode::BAD_REQUEST,
                            "invalid_args",
                            "owner must be me",
                        ));
                    }
                    Ok(list_instances(state))
                }),
            ("GET" | "POST" | "PUT" | "DELETE", "/api/v0/overlay/") => {
                require_user(caller, StatusCode::UNAUTHORIZED)
                    .and_then(|()| overlay(shared, state, method, body))
            }
            ("GET", "/api/v0/users/current/") => require_user(caller, StatusCode::UNAUTHORIZED)
                .map(|()| {
                    Answer::ok(json!({
                        "id": 77_001, "username": "standin", "email": "standin@example.invalid",
                        "credit": 25.0, "balance": 0.0, "has_billing": true
                    }))
                }),
            // Anything else: 404 `{"detail": "Not Found"}`, as the API answers an unknown path.
            _ => {
                if let Some(id) = id_in(path, "/api/v0/asks/") {
                    if method == Method::PUT {
                        require_user(caller, StatusCode::UNAUTHORIZED)
                            .and_then(|()| rent(state, id, body.unwrap_or(&Value::Null)))
                    } else {
                        Err(not_found())
                    }
                } else if let Some(id) = id_in(path, "/api/v0/instances/") {
                    instance(shared, state, method, id, caller, body)
                } else {
                    Err(not_found())
                }
            }
        };
    let answer = result.unwrap_or_else(|answer| answer);
    // Test hook (`lose_answers`): the call was carried out, but a gateway in front answered
    // 502 in its place, as a load balancer does when the backend's answer is lost.
    match state.lost_answers.iter_mut().find(|(m, prefix, left)| {
        *left > 0 && m == method.as_str() && path.starts_with(prefix.as_str())
    }) {
        Some((_, _, left)) => {
            *left -= 1;
            Answer {
                status: StatusCode::BAD_GATEWAY,
                ..Answer::ok(json!({"detail": "502 Bad Gateway"}))
            }
            .carrying(answer)
        }
        None => answer,
    }
}

fn not_found() -> Answer {
    Answer {
        status: StatusCode::NOT_FOUND,
        ..Answer::ok(json!({"detail": "Not Found"}))
    }
}

/// `123` from `/api/v0/asks/123/`.
fn id_in(path: &str, prefix: &str) -> Option<u64> {
    path.strip_prefix(prefix)?.strip_suffix('/')?.parse().ok()
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Whether the offer's `have` equals the query's `want` (for `field`).
fn equals(field: &str, have: &Value, want: &Value) -> bool {
    match have {
        Value::Null => want.is_null(),
        Value::Bool(b) => boolean(want) == Some(*b),
        Value::Number(_) => match (number(have), number(want)) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-9,
            _ => false,
        },
        Value::String(s) => {
            let Some(w) = want.as_str() else {
                return false;
            };
            if field == "geolocation" {
                // "Texas, US" is in "US".
                let country = s.rsplit(',').next().unwrap_or(s).trim();
                country.eq_ignore_ascii_case(w.trim()) || s.eq_ignore_ascii_case(w.trim())
            } else {
                s == w
            }
        }
        _ => false,
    }
}

fn compare(field: &str, have: &Value, op: &str, want: &Value) -> Result<bool, String> {
    let ordered = |test: fn(f64, f64) -> bool| -> Result<bool, String> {
        let w = number(want).ok_or_else(|| format!("{field}: {op} needs a number, not {want}"))?;
        Ok(number(have).is_some_and(|h| test(h, w)))
    };
    match op {
        "eq" => Ok(equals(field, have, want)),
        "neq" => Ok(!equals(field, have, want)),
        "gt" => ordered(|h, w| h > w),
        "gte" => ordered(|h, w| h >= w),
        "lt" => ordered(|h, w| h < w),
        "lte" => ordered(|h, w| h <= w),
        "in" | "notin" => {
            let list = want
                .as_array()
                .ok_or_else(|| format!("{field}: {op} needs a list"))?;
            let found = list.iter().any(|w| equals(field, have, w));
            Ok(if op == "in" { found } else { !found })
        }
        other => Err(format!("unknown operator {other:?} for {field}")),
    }
}

/// The offers a search body selects, as the API filters, orders and limits them.
fn search(state: &Inner, query: &Value) -> Result<Vec<Value>, Answer> {
    let bad = |msg: String| Answer::error(StatusCode::BAD_REQUEST, "invalid_args", &msg);
    // Source: VastAI OpenAPI search_offers (the body is an object; 400 otherwise).
    let query = query
        .as_object()
        .ok_or_else(|| bad("the search query must be a JSON object".into()))?;
    // Source: the vastai CLI/SDK (vastai/api/offers.py sends "on-demand", "bid" or
    // "reserved"). VastAI OpenAPI search_offers makes `type` optional (default on-demand):
    // refusing a search without it refuses more than the API does; Skyward always sends it.
    let kind = query.get("type").and_then(Value::as_str).unwrap_or("");
    if !matches!(kind, "on-demand" | "bid" | "reserved") {
        return Err(bad(format!(
            "type must be on-demand, bid or reserved, not {kind:?}"
        )));
    }
    let fields: std::collections::HashSet<String> = offer_template(0)
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut rows: Vec<&Value> = state.offers.iter().collect();
    for (field, condition) in query {
        if matches!(
            field.as_str(),
            "type" | "order" | "limit" | "allocated_storage" | "disable_bundling" | "select_cols"
        ) {
            continue;
        }
        // No vendor source for refusing an unknown field (VastAI OpenAPI show_instances refuses
        // an invalid filter column with 400; search_offers does not say). The known fields
        // are this stand-in's offer shape, fewer than VastAI OpenAPI search_offers lists
        // (`datacenter`, `duration`, `cpu_arch`, ...): those are refused here though valid.
        if !fields.contains(field) {
            return Err(bad(format!("Unknown search field: {field}")));
        }
        // Source: VastAI OpenAPI search_offers ("Each filter parameter ... should be an object
        // specifying the operator and value"; ops eq, neq, gt, lt, gte, lte, in, notin);
        // docs/cloud-apis.md#vastai.
        let condition = condition
            .as_object()
            .ok_or_else(|| bad(format!("{field}: expected {{op: value}}")))?;
        for (op, want) in condition {
            let mut kept = Vec::new();
            for offer in rows {
                if compare(field, &offer[field.as_str()], op, want).map_err(bad)? {
                    kept.push(offer);
                }
            }
            rows = kept;
        }
    }
    if kind == "bid" {
        rows.retain(|o| !o["min_bid"].is_null());
    }
    if let Some(order) = query.get("order").and_then(Value::as_array) {
        for key in order.iter().rev() {
            // Source: VastAI OpenAPI search_offers (`order`: entries of exactly two strings,
            // minItems 2, maxItems 2: the field, then "asc" or "desc").
            let (Some(field), Some(direction)) = (
                key.get(0).and_then(Value::as_str),
                key.get(1).and_then(Value::as_str),
            ) else {
                return Err(bad("order entries are [field, direction]".into()));
            };
            if key.as_array().map_or(0, Vec::len) != 2 {
                return Err(bad("order entries are [field, direction]".into()));
            }
            rows.sort_by(|a, b| {
                let (a, b) = (
                    number(&a[field]).unwrap_or(f64::INFINITY),
                    number(&b[field]).unwrap_or(f64::INFINITY),
                );
                if direction == "desc" {
                    b.total_cmp(&a)
                } else {
                    a.total_cmp(&b)
                }
            });
        }
    }
    let limit = query.get("limit").and_then(number).unwrap_or(64.0).max(0.0) as usize;
    rows.truncate(limit);
    Ok(rows.into_iter().cloned().collect())
}

/// `PUT /api/v0/asks/{id}/`: checks the body as VastAI does, creates the instance.
fn rent(state: &mut Inner, offer_id: u64, body: &Value) -> Result<Answer, Answer> {
    let bad = |msg: &str| Answer::error(StatusCode::BAD_REQUEST, "invalid_args", msg);
    // Source: VastAI OpenAPI create_instance (the body is an object; 400 `invalid_args`).
    let body = body
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    // Source: the vastai CLI/SDK (vastai/api/instances.py create_instance always sends
    // `"client_id": "me"`); docs/cloud-apis.md#vastai. VastAI OpenAPI create_instance does
    // not list `client_id`: refusing a body without it may refuse more than the API does
    // (Skyward always sends it).
    if body.get("client_id").and_then(Value::as_str) != Some("me") {
        return Err(bad("client_id must be \"me\""));
    }
    // Source: VastAI OpenAPI create_instance (`image` required, a string;
    // x-input-validation image max_length 1024).
    let image = body
        .get("image")
        .and_then(Value::as_str)
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| bad("an image is required"))?
        .to_string();
    if image.chars().count() > IMAGE_LIMIT {
        return Err(bad("image is limited to 1024 characters"));
    }
    // Source: VastAI OpenAPI create_instance (`disk` a number; x-input-validation disk min
    // 8.0); docs/cloud-apis.md#vastai (disk >= 8 GB). Left out, the CLI's default (10).
    let disk = match body.get("disk") {
        None | Some(Value::Null) => 10.0,
        Some(d) => number(d).ok_or_else(|| bad("disk must be a number"))?,
    };
    if disk < 8.0 {
        return Err(bad("disk must be at least 8 GB"));
    }
    // Source: VastAI OpenAPI create_instance (`label` a string; x-input-validation label
    // max_length 256); docs/cloud-apis.md#vastai (label 256).
    let label = match body.get("label") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(l)) => l.clone(),
        Some(_) => return Err(bad("label must be a string")),
    };
    if label.chars().count() > 256 {
        return Err(bad("label is limited to 256 characters"));
    }
    // Source: VastAI OpenAPI create_instance (`onstart` and `args_str` strings, `args` an
    // array of strings).
    for key in ["onstart", "args_str"] {
        if !matches!(
            body.get(key),
            None | Some(Value::Null) | Some(Value::String(_))
        ) {
            return Err(bad(&format!("{key} must be a string")));
        }
    }
    match body.get("args") {
        None | Some(Value::Null) => {}
        Some(Value::Array(args)) if args.iter().all(Value::is_string) => {}
        Some(_) => return Err(bad("args must be an array of strings")),
    }
    let text_len = |key: &str| match body.get(key) {
        Some(Value::String(s)) => s.chars().count(),
        Some(Value::Array(a)) => a.iter().map(|v| v.to_string().len()).sum(),
        _ => 0,
    };
    // Source: VastAI OpenAPI create_instance (x-input-validation args max_length 4096,
    // "Combined length of args, args_str and onstart"); docs/cloud-apis.md#vastai.
    if text_len("onstart") + text_len("args") + text_len("args_str") > ONSTART_LIMIT {
        return Err(bad(
            "onstart, args and args_str together are limited to 4096 characters: gzip and base64 longer scripts",
        ));
    }
    // Source: the vastai CLI/SDK (create_instance sends `env` as an object of docker options
    // and variables, `parse_env`). VastAI OpenAPI create_instance documents `env` as a string
    // of docker flags too: refusing that form refuses more than the API does (Skyward sends
    // an object).
    let env = match body.get("env") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(env)) => env.clone(),
        Some(_) => return Err(bad("env must be an object")),
    };
    // Source: VastAI OpenAPI create_instance (x-input-validation env max_length 256,
    // max_total_length 32768); docs/cloud-apis.md#vastai (env 32 KiB). The 256 is read as
    // the limit of one entry's key and of its value.
    let too_long = |text: &str| text.chars().count() > ENV_ENTRY_LIMIT;
    for (key, value) in &env {
        let value_too_long = match value {
            Value::String(text) => too_long(text),
            other => too_long(&other.to_string()),
        };
        if too_long(key) || value_too_long {
            return Err(bad(&format!(
                "env entry {key:?} is over {ENV_ENTRY_LIMIT} characters"
            )));
        }
    }
    if Value::Object(env.clone()).to_string().len() > ENV_LIMIT {
        return Err(bad("env is limited to 32 KiB"));
    }
    // Source: the vastai CLI's `-p HOST:CONTAINER[/tcp|/udp]` port options as `env` keys
    // (docs/cloud-apis.md#vastai); a malformed one is refused here without a vendor source.
    let published = published_ports(&env).map_err(|e| bad(&e))?;
    // Source: VastAI OpenAPI create_instance (`price` a number, minimum 0.001, maximum 128;
    // 400 `invalid_price`); docs/cloud-apis.md#vastai. Left out: on-demand.
    let price = match body.get("price") {
        None | Some(Value::Null) => None,
        Some(p) => {
            let p = number(p).ok_or_else(|| {
                Answer::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_price",
                    "price is not a number",
                )
            })?;
            if !(0.001..=128.0).contains(&p) {
                return Err(Answer::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_price",
                    "price must be between 0.001 and 128 $/hour",
                ));
            }
            Some(p)
        }
    };
    // Source: VastAI OpenAPI create_instance (404 "no_such_ask Instance type by id N is not
    // available.", 410 "no longer available"; an offer can be rented once: vastai CLI "Each
    // offer ID can only be used to create one instance") and search_offers (`rentable`:
    // whether the machine is rentable); docs/cloud-apis.md#vastai (a gone offer may come as
    // `invalid_args` with `no_such_ask` only in `msg`). `gone` is a test hook (`make_gone`).
    let offer = state
        .offers
        .iter_mut()
        .find(|o| o["id"].as_u64() == Some(offer_id))
        .filter(|o| o["rented"] != json!(true) && o["rentable"] != json!(false));
    let gone = state.gone.get(&offer_id).copied();
    let (Some(offer), None) = (offer, gone) else {
        let msg = format!("Instance type by id {offer_id} is not available.");
        return Err(match gone.unwrap_or(Gone::NoSuchAsk) {
            Gone::NoSuchAsk => Answer::error(StatusCode::NOT_FOUND, "no_such_ask", &msg),
            Gone::InvalidArgs => Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_args",
                &format!("error 404/3603: no_such_ask  {msg}"),
            ),
        });
    };
    // Source: VastAI OpenAPI search_offers (`min_bid`: "Minimum bid price ($/hour)") and
    // create_instance (400 `invalid_price`).
    if let Some(p) = price {
        if number(&offer["min_bid"]).is_some_and(|min| p + 1e-9 < min) {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_price",
                "Your bid is below the minimum bid for this machine.",
            ));
        }
    }
    offer["rented"] = json!(true);
    let machine_id = offer["machine_id"].as_u64().unwrap_or(0);
    let cluster_id = offer["cluster_id"].as_u64();
    let id = state.next_instance;
    state.next_instance += 1;
    let doomed = state.doom_next > 0;
    if doomed {
        state.doom_next -= 1;
    }
    let onstart = body
        .get("onstart")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let ports = published
        .into_iter()
        .enumerate()
        .map(|(k, key)| (key, host_port(id, k)))
        .collect();
    state.instances.insert(
        id,
        Inst {
            info: InstanceInfo {
                id,
                offer_id,
                cluster_id,
                label,
                image,
                env,
                disk,
                price,
                onstart,
                actual_status: None,
                doomed,
                ports,
                public_ip: None,
                namespace: None,
            },
            machine_id,
            isolated: state.boot_isolated,
            container_key: format!("{:016x}{:016x}", rand_u64(id), rand_u64(id ^ 0x5eed)),
            status_msg: None,
            created: now(),
        },
    );
    Ok(Answer::ok(json!({"success": true, "new_contract": id})))
}

/// The container ports an `env` publishes, as the CLI's `-p` options make them (`{"-p
/// 7444:7444/udp": "1"}`), each as `7444/udp`.
fn published_ports(env: &Map<String, Value>) -> Result<Vec<String>, String> {
    let mut ports = Vec::new();
    for key in env.keys() {
        let Some(option) = key.strip_prefix("-p ") else {
            continue;
        };
        let (mapping, protocol) = option.trim().split_once('/').unwrap_or((option, "tcp"));
        let container = mapping.rsplit(':').next().unwrap_or(mapping);
        match (container.parse::<u16>(), protocol) {
            (Ok(port), "tcp" | "udp") if port > 0 => ports.push(format!("{port}/{protocol}")),
            _ => {
                return Err(format!(
                    "bad port option {key:?}: -p HOST:CONTAINER[/tcp|/udp]"
                ))
            }
        }
    }
    Ok(ports)
}

/// The host port the `k`-th published port of instance `id` gets: never the container's.
fn host_port(id: u64, k: usize) -> u16 {
    40_000 + (id % 1_000) as u16 * 10 + k as u16
}

/// Not cryptographic: distinct per-instance keys for a stand-in.
fn rand_u64(seed: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut x = seed ^ nanos.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// The instance as VastAI lists it.
fn render(inst: &Inst, offers: &[Value]) -> Value {
    let info = &inst.info;
    let offer = offers
        .iter()
        .find(|o| o["id"].as_u64() == Some(info.offer_id))
        .cloned()
        .unwrap_or(Value::Null);
    let cur_state = match info.actual_status.as_deref() {
        Some("exited") => "stopped",
        _ => "running",
    };
    json!({
        "id": info.id,
        "machine_id": inst.machine_id,
        "host_id": offer["host_id"],
        "actual_status": info.actual_status,
        "intended_status": if cur_state == "stopped" { "stopped" } else { "running" },
        "cur_state": cur_state,
        "next_state": cur_state,
        "status_msg": inst.status_msg,
        "label": if info.label.is_empty() { Value::Null } else { json!(info.label) },
        "image_uuid": info.image,
        "image_runtype": "ssh",
        "num_gpus": offer["num_gpus"],
        "gpu_name": offer["gpu_name"],
        "gpu_ram": offer["gpu_ram"],
        "cpu_cores_effective": offer["cpu_cores_effective"],
        "cpu_ram": offer["cpu_ram"],
        "disk_space": info.disk,
        "dph_total": offer["dph_total"],
        "min_bid": offer["min_bid"],
        "is_bid": info.price.is_some(),
        "geolocation": offer["geolocation"],
        "cluster_id": info.cluster_id,
        "start_date": inst.created,
        "extra_env": info.env.iter().map(|(k, v)| json!([k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())])).collect::<Vec<_>>(),
        "public_ipaddr": public_ipaddr(inst),
        "ports": ports_json(info),
        "ssh_host": "ssh4.vast.ai",
        "ssh_port": 20_000 + info.id % 10_000,
        "reliability2": offer["reliability2"],
    })
}

/// Loopback for a plain boot; for an isolated one, its namespace's address once booted and
/// nothing before, never an address the stand-in invented.
fn public_ipaddr(inst: &Inst) -> Value {
    match (inst.isolated, inst.info.public_ip) {
        (false, _) => json!("127.0.0.1"),
        (true, Some(ip)) => json!(ip.to_string()),
        (true, None) => Value::Null,
    }
}

/// The port mappings, as docker reports them, once they are real (booted isolated).
fn ports_json(info: &InstanceInfo) -> Value {
    if info.public_ip.is_none() {
        return Value::Null;
    }
    let mut ports = Map::new();
    for (key, host) in &info.ports {
        let host = host.to_string();
        ports.insert(
            key.clone(),
            json!([{"HostIp": "0.0.0.0", "HostPort": host}, {"HostIp": "::", "HostPort": host}]),
        );
    }
    Value::Object(ports)
}

/// Moves an instance one step on (null -> loading -> running, or exited when doomed);
/// returns what to boot when it starts running.
fn advance(inst: &mut Inst) -> Option<Boot> {
    let info = &mut inst.info;
    match info.actual_status.as_deref() {
        None => {
            info.actual_status = Some("loading".into());
            inst.status_msg = Some(format!("Pulling image {}", info.image));
            None
        }
        Some("loading") if info.doomed => {
            info.actual_status = Some("exited".into());
            inst.status_msg = Some(
                "Error response from daemon: failed to create task for container: OCI runtime create failed"
                    .into(),
            );
            None
        }
        Some("loading") => {
            info.actual_status = Some("running".into());
            inst.status_msg = Some("success, running".into());
            let id = info.id;
            let isolated = inst.isolated.then(|| {
                inst.info
                    .ports
                    .iter()
                    .map(|(key, host)| (key.clone(), *host))
                    .collect()
            });
            Some(Boot {
                id,
                dir: dir_name(id),
                script: container_script(inst),
                isolated,
            })
        }
        _ => None,
    }
}

/// The onstart, behind the environment the container gives it.
fn container_script(inst: &Inst) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\'', r"'\''"));
    let mut script = String::new();
    let mut export = |k: &str, v: &str| script.push_str(&format!("export {k}={}\n", quote(v)));
    export("CONTAINER_ID", &inst.info.id.to_string());
    export("CONTAINER_API_KEY", &inst.container_key);
    export("VAST_CONTAINERLABEL", &format!("C.{}", inst.info.id));
    export("PUBLIC_IPADDR", "127.0.0.1");
    for (key, value) in &inst.info.env {
        let valid = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if valid {
            export(key, value.as_str().unwrap_or(&value.to_string()));
        }
    }
    script.push_str(&inst.info.onstart);
    script
}

fn list_instances(state: &mut Inner) -> Answer {
    let rendered: Vec<Value> = state
        .instances
        .values()
        .map(|i| render(i, &state.offers))
        .collect();
    let mut answer = Answer::ok(json!({"instances": rendered}));
    for inst in state.instances.values_mut() {
        if let Some(boot) = advance(inst) {
            answer.boot.push(boot);
        }
    }
    answer
}

/// Removes an instance: its node is destroyed, its offer listed again, its overlay left.
fn remove_instance(
    shared: &Shared,
    state: &mut Inner,
    id: u64,
) -> Option<(PathBuf, Option<BootedNode>)> {
    let inst = state.instances.remove(&id)?;
    if let Some(offer) = state
        .offers
        .iter_mut()
        .find(|o| o["id"].as_u64() == Some(inst.info.offer_id))
    {
        offer["rented"] = json!(false);
    }
    for overlay in &mut state.overlays {
        overlay.instances.retain(|i| *i != id);
    }
    Some((
        shared.boot_root.join(dir_name(id)),
        state.booted.remove(&id),
    ))
}

fn instance(
    shared: &Shared,
    state: &mut Inner,
    method: &Method,
    id: u64,
    caller: &Caller,
    body: Option<&Value>,
) -> Result<Answer, Answer> {
    // An instance's own key may destroy or stop it; reading needs the account's key.
    // Source: VastAI docs api-reference/hello-world.mdx (`CONTAINER_API_KEY` "can only start,
    // stop, or destroy that specific instance"). Their guides/instances/docker-environment.mdx
    // also shows `vastai show instance $CONTAINER_ID --api-key $CONTAINER_API_KEY`: refusing
    // a read with it may refuse more than VastAI does.
    let own = *caller == Caller::Container(id) && *method != Method::GET;
    if !own {
        require_user(caller, StatusCode::UNAUTHORIZED)?;
    }
    // Source: VastAI OpenAPI destroy_instance and manage_instance (404 for an instance that
    // does not exist).
    if !state.instances.contains_key(&id) {
        return Err(Answer::error(
            StatusCode::NOT_FOUND,
            "no_such_instance",
            &format!("Instance {id} not found."),
        ));
    }
    match method.as_str() {
        "GET" => {
            let inst = state.instances.get_mut(&id).expect("checked");
            let rendered = render(inst, &state.offers);
            let mut answer = Answer::ok(json!({"instances": rendered}));
            if let Some(boot) = advance(inst) {
                answer.boot.push(boot);
            }
            Ok(answer)
        }
        "DELETE" => {
            let removed = remove_instance(shared, state, id);
            let mut answer =
                Answer::ok(json!({"success": true, "msg": format!("destroying instance {id}.")}));
            answer.destroy.extend(removed);
            Ok(answer)
        }
        // Source: VastAI OpenAPI stop_instance (`state: "stopped"`, 400 otherwise).
        // manage_instance also allows `state: "running"` and a `label` alone, which are
        // refused here: more than VastAI refuses (Skyward only ever stops).
        "PUT" => match body.and_then(|b| b.get("state")).and_then(Value::as_str) {
            Some("stopped") => {
                let inst = state.instances.get_mut(&id).expect("checked");
                inst.info.actual_status = Some("exited".into());
                inst.status_msg = Some("stopped by request".into());
                let mut answer = Answer::ok(json!({"success": true}));
                answer.destroy.push((
                    shared.boot_root.join(dir_name(id)),
                    state.booted.remove(&id),
                ));
                Ok(answer)
            }
            _ => Err(Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_args",
                "state must be stopped or running",
            )),
        },
        _ => Err(not_found()),
    }
}

fn overlay(
    shared: &Shared,
    state: &mut Inner,
    method: &Method,
    body: Option<&Value>,
) -> Result<Answer, Answer> {
    let bad = |msg: &str| Answer::error(StatusCode::BAD_REQUEST, "invalid_args", msg);
    let field = |key: &str| {
        body.and_then(|b| b.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    match method.as_str() {
        "GET" => Ok(Answer::ok(Value::Array(
            state
                .overlays
                .iter()
                .map(|o| {
                    json!({
                        "overlay_id": o.id,
                        "name": o.name,
                        "internal_subnet": format!("10.{}.0.0/24", o.id % 250),
                        "cluster_id": o.cluster_id,
                        "instances": o.instances,
                    })
                })
                .collect(),
        ))),
        // Source: the vastai CLI/SDK (vastai/api/clusters.py create_overlay sends `cluster_id`
        // and `name`); docs/cloud-apis.md#vastai (overlays are made on a physical cluster,
        // names `[a-z0-9-]`). docs/cloud-apis.md says the CLI drops other characters: the 400
        // for them is this stand-in's, and may refuse more than VastAI does. Unique names: no
        // vendor source, but joining and deleting address an overlay by its name.
        "POST" => {
            let cluster_id = number(&field("cluster_id"))
                .map(|c| c as u64)
                .ok_or_else(|| bad("cluster_id is required"))?;
            let name = field("name").as_str().unwrap_or("").to_string();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(bad(
                    "overlay names may only hold lowercase letters, digits and dashes",
                ));
            }
            if !state
                .offers
                .iter()
                .any(|o| o["cluster_id"].as_u64() == Some(cluster_id))
            {
                return Err(bad(&format!("no cluster {cluster_id}")));
            }
            if state.overlays.iter().any(|o| o.name == name) {
                return Err(bad(&format!("an overlay named {name} already exists")));
            }
            let id = state.next_overlay;
            state.next_overlay += 1;
            state.overlays.push(OverlayInfo {
                id,
                name,
                cluster_id,
                instances: Vec::new(),
            });
            Ok(Answer::ok(json!({
                "success": true,
                "msg": "Overlay network created successfully.",
                "overlay_id": id
            })))
        }
        // Source: the vastai CLI/SDK (join_overlay sends `name` and `instance_id`);
        // docs/cloud-apis.md#vastai (overlays join instances of the same physical cluster).
        "PUT" => {
            let name = field("name").as_str().unwrap_or("").to_string();
            let instance_id = number(&field("instance_id"))
                .map(|i| i as u64)
                .ok_or_else(|| bad("instance_id is required"))?;
            let inst_cluster = state
                .instances
                .get(&instance_id)
                .map(|i| i.info.cluster_id)
                .ok_or_else(|| bad(&format!("no instance {instance_id}")))?;
            let overlay = state
                .overlays
                .iter_mut()
                .find(|o| o.name == name)
                .ok_or_else(|| bad(&format!("no overlay named {name:?}")))?;
            if inst_cluster != Some(overlay.cluster_id) {
                return Err(bad(&format!(
                    "instance {instance_id} is not on cluster {}",
                    overlay.cluster_id
                )));
            }
            if !overlay.instances.contains(&instance_id) {
                overlay.instances.push(instance_id);
            }
            Ok(Answer::ok(
                json!({"success": true, "msg": "Instance added to overlay."}),
            ))
        }
        // Source: the vastai CLI/SDK (delete_overlay sends `overlay_id` or `overlay_name`);
        // docs/cloud-apis.md#vastai (deleting an overlay also removes its instances).
        "DELETE" => {
            let by_id = number(&field("overlay_id")).map(|i| i as u64);
            let by_name = field("overlay_name").as_str().map(str::to_string);
            let index = state
                .overlays
                .iter()
                .position(|o| Some(o.id) == by_id || Some(&o.name) == by_name.as_ref())
                .ok_or_else(|| {
                    Answer::error(
                        StatusCode::NOT_FOUND,
                        "no_such_overlay",
                        "No overlay with that id or name.",
                    )
                })?;
            let removed = state.overlays.remove(index);
            // Deleting an overlay also removes its instances.
            let mut answer =
                Answer::ok(json!({"success": true, "msg": "Overlay deleted successfully."}));
            for id in removed.instances {
                answer.destroy.extend(remove_instance(shared, state, id));
            }
            Ok(answer)
        }
        _ => Err(not_found()),
    }
}

/// Runs an instance's onstart as its node's first boot, off the async threads. A node whose
/// instance was destroyed meanwhile is destroyed as soon as its boot returns. An isolated
/// node whose ports cannot be mapped goes `exited`, saying why.
fn boot(shared: Arc<Shared>, one: Boot) {
    let root = shared.boot_root.clone();
    shared.state.lock().expect("state").boots += 1;
    let Boot {
        id,
        dir,
        script,
        isolated,
    } = one;
    let is_isolated = isolated.is_some();
    tokio::spawn(async move {
        let booted = tokio::task::spawn_blocking(move || match isolated {
            None => BootedNode::boot(&root, &dir, &script),
            Some(ports) => {
                let node = BootedNode::boot_isolated(&root, &dir, &script)?;
                map_ports(&node, &ports).map(|()| node)
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("boot panicked: {e}")));
        let leftover = {
            let mut guard = shared.state.lock().expect("state");
            let state = &mut *guard;
            let inst = state
                .instances
                .get_mut(&id)
                .filter(|i| i.info.actual_status.as_deref() == Some("running"));
            match (booted, inst) {
                (Ok(node), Some(inst)) => {
                    // Reported only now that the mapping is real.
                    inst.info.public_ip = node.address();
                    inst.info.namespace = node.net().map(|n| n.namespace().to_string());
                    state.booted.insert(id, node);
                    None
                }
                (Ok(node), None) => Some(node),
                // A node destroyed while it booted fails its boot: that is no error.
                (Err(e), Some(inst)) => {
                    if is_isolated {
                        inst.info.actual_status = Some("exited".into());
                        inst.status_msg = Some(e.clone());
                    }
                    state.boot_errors.push(format!("instance {id}: {e}"));
                    None
                }
                (Err(_), None) => None,
            }
        };
        drop(leftover);
    });
}

/// Maps each published container port (`7444/udp`) to its host port on the node's address,
/// as the host's docker does, and closes the container port to whatever was not mapped (a
/// container's own port is not reachable from outside its host).
fn map_ports(node: &BootedNode, ports: &[(String, u16)]) -> Result<(), String> {
    let net = node
        .net()
        .ok_or("an isolated node has no network of its own")?;
    for (key, host) in ports {
        let (container, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
        let host = host.to_string();
        iptables(
            net,
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                protocol,
                "--dport",
                &host,
                "-j",
                "REDIRECT",
                "--to-ports",
                container,
            ],
        )?;
        iptables(
            net,
            &[
                "-A",
                "INPUT",
                "-p",
                protocol,
                "--dport",
                container,
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "DNAT",
                "-j",
                "DROP",
            ],
        )?;
    }
    Ok(())
}

fn iptables(net: &crate::netns::TestNet, args: &[&str]) -> Result<(), String> {
    let argv: Vec<&str> = std::iter::once("iptables")
        .chain(args.iter().copied())
        .collect();
    net.exec(&argv)
        .map_err(|e| format!("cannot map a port (install iptables; scripts/test.sh does): {e}"))
}
