//! A stand-in for Verda's public API (`/v1`), answering in its real shapes and with its
//! quirks: OAuth2 client credentials with expiring tokens and refresh, prices as strings (and
//! numbers), location codes as data, `is_spot` or `isSpot`, availability answered as `true` or
//! `"true"`, startup scripts created with a plain-text id and read back as a one-element
//! array, instances created with a plain-text id whose status moves ordered -> provisioning ->
//! running over polls (`ip` null until then), delete actions answered 202 or 207, and errors
//! as `{code, message}` (503 "Not enough resources..." for capacity).
//!
//! Every instance created is booted for real: its startup script runs as a
//! [`BootedNode`] under the stand-in's root, so its agent joins whatever coordinator the
//! script names; deleting the instance kills the node. The stand-in's own methods inspect
//! its state and inject faults.
//!
//! An instance's `ip` is the address of the network namespace it booted in
//! ([`VerdaStandin::set_boot_isolated`]), and stays null for any other: the stand-in never
//! reports an address it made up, so nothing a test dials leaves the test's own networks.

use super::server::StandinServer;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::node::BootedNode;

/// The client id the stand-in accepts.
pub const CLIENT_ID: &str = "sky-test-client-7f3a";
/// The client secret the stand-in accepts.
pub const CLIENT_SECRET: &str = "sky-test-secret-c0ffee-41b9";
/// Images instances may be created from.
pub const IMAGES: &[&str] = &[
    "ubuntu-24.04-cuda-12.8-open-docker",
    "ubuntu-22.04-cuda-12.0-docker",
    "ubuntu-24.04",
];
/// How many polls of `GET /instances` a deleted instance stays listed as `deleting`.
const DELETE_LINGER_POLLS: u32 = 1;

/// How `POST /instances` answers with the new id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdFormat {
    /// `1b2c...` as text/plain (what the API does).
    PlainText,
    /// `"1b2c..."`, a JSON string.
    JsonString,
    /// `{"id": "1b2c..."}`.
    JsonObject,
}

/// One instance as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct InstanceView {
    pub id: String,
    pub hostname: String,
    pub instance_type: String,
    pub location: String,
    pub image: String,
    pub status: String,
    pub is_spot: bool,
    pub startup_script_id: String,
    pub ssh_key_ids: Vec<String>,
    pub tags: Vec<(String, String)>,
    /// Its startup script ran and its node is up.
    pub booted: bool,
    /// Why booting failed, if it did.
    pub boot_error: Option<String>,
    /// The address of its own network namespace when it booted isolated: its public `ip`.
    pub address: Option<Ipv4Addr>,
    /// Deleted (gone from listings).
    pub deleted: bool,
}

/// A startup script or an SSH key registered on the account.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub name: String,
    /// The script, or the OpenSSH public key line, as sent.
    pub text: String,
}

struct StoredInstance {
    view: InstanceView,
    description: String,
    os_volume: Value,
    created_at: String,
    /// Listings left before a deleting instance disappears.
    linger: u32,
    node: Option<BootedNode>,
}

struct Fault {
    method: Method,
    path: String,
    status: StatusCode,
    code: String,
    message: String,
    remaining: u32,
}

struct Inner {
    token_lifetime: Duration,
    access_tokens: HashMap<String, Instant>,
    refresh_tokens: HashSet<String>,
    grants: Vec<(String, bool)>,
    issued: Vec<String>,
    counter: u64,
    instance_types: Vec<Value>,
    locations: Vec<Value>,
    availability: HashMap<(String, bool), Vec<String>>,
    capacity_failures: HashSet<(String, String)>,
    unavailable_regions: HashSet<String>,
    faults: Vec<Fault>,
    partial_delete_failures: u32,
    id_format: IdFormat,
    availability_as_strings: bool,
    omit_tags: bool,
    boot_outcome: Option<String>,
    boot_isolated: bool,
    scripts: Vec<Registration>,
    ssh_keys: Vec<Registration>,
    instances: Vec<StoredInstance>,
    create_bodies: Vec<Value>,
    action_bodies: Vec<Value>,
    requests: Vec<String>,
}

struct Shared {
    root: PathBuf,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running stand-in. Dropping it stops the server and destroys every node it booted.
pub struct VerdaStandin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Taken (stopped) first when dropped, before the nodes go.
    server: Option<StandinServer>,
}

impl VerdaStandin {
    /// Starts the stand-in on 127.0.0.1 (a port of its own), on a thread of its own, so sync
    /// and async tests alike can use it. Nodes boot under `root/<hostname>`.
    pub fn start(root: &Path) -> VerdaStandin {
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            inner: Mutex::new(Inner::with_fixtures()),
        });
        let routes = router(shared.clone());
        let server = StandinServer::start("verda", routes);
        VerdaStandin {
            addr: server.addr,
            shared,
            server: Some(server),
        }
    }

    /// The API root, `/v1` included (what `VERDA_BASE_URL` holds).
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// How long new access tokens live (`expires_in`, whole seconds, at least 1).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.lock().token_lifetime = lifetime.max(Duration::from_secs(1));
    }

    /// Every access token stops working at once (refresh tokens still do).
    pub fn expire_access_tokens(&self) {
        self.lock().access_tokens.clear();
    }

    /// Access and refresh tokens alike stop working.
    pub fn revoke_all_tokens(&self) {
        let mut inner = self.lock();
        inner.access_tokens.clear();
        inner.refresh_tokens.clear();
    }

    /// Every token grant asked for: (grant_type, granted).
    pub fn grants(&self) -> Vec<(String, bool)> {
        self.lock().grants.clone()
    }

    /// Every access and refresh token issued so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    /// Every request, as `METHOD /v1/path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// The instance types with capacity in `location` for spot (`true`) or on-demand.
    pub fn set_availability(&self, location: &str, spot: bool, types: &[&str]) {
        self.lock().availability.insert(
            (location.to_string(), spot),
            types.iter().map(|t| t.to_string()).collect(),
        );
    }

    /// Creating `instance_type` in `location` answers 503 "Not enough resources", although
    /// availability still lists it (capacity gone between the two calls).
    pub fn fail_capacity(&self, instance_type: &str, location: &str) {
        self.lock()
            .capacity_failures
            .insert((instance_type.to_string(), location.to_string()));
    }

    /// Creating anything in `location` answers 400 invalid_request "Region not available".
    pub fn make_region_unavailable(&self, location: &str) {
        self.lock().unavailable_regions.insert(location.to_string());
    }

    /// The next `times` requests to `method path` (path with `/v1`) answer `status` with
    /// `{code, message}`.
    pub fn inject(
        &self,
        method: Method,
        path: &str,
        status: StatusCode,
        code: &str,
        message: &str,
        times: u32,
    ) {
        self.lock().faults.push(Fault {
            method,
            path: path.to_string(),
            status,
            code: code.to_string(),
            message: message.to_string(),
            remaining: times,
        });
    }

    /// The next `n` delete actions fail for their first instance (207 with per-instance results).
    pub fn fail_next_deletes(&self, n: u32) {
        self.lock().partial_delete_failures = n;
    }

    pub fn set_id_format(&self, format: IdFormat) {
        self.lock().id_format = format;
    }

    /// `/instance-availability/{type}` answers `"true"`/`"false"` (strings) instead of booleans.
    pub fn set_availability_as_strings(&self, strings: bool) {
        self.lock().availability_as_strings = strings;
    }

    /// Instances are listed without their tags.
    pub fn omit_tags(&self, omit: bool) {
        self.lock().omit_tags = omit;
    }

    /// New instances end in `status` (e.g. "error") instead of running, without booting.
    pub fn set_boot_outcome(&self, status: Option<&str>) {
        self.lock().boot_outcome = status.map(str::to_string);
    }

    /// New instances boot in a network namespace of their own (needs root), as machines with
    /// a public IP of their own: the namespace's address becomes their `ip`.
    pub fn set_boot_isolated(&self, isolated: bool) {
        self.lock().boot_isolated = isolated;
    }

    /// Sets an instance's status, as the platform would (e.g. "offline", "discontinued").
    pub fn set_status(&self, id: &str, status: &str) {
        if let Some(i) = self.lock().instances.iter_mut().find(|i| i.view.id == id) {
            i.view.status = status.to_string();
        }
    }

    /// Replaces the instance types (`GET /instance-types` answers them as given).
    pub fn set_instance_types(&self, types: Vec<Value>) {
        self.lock().instance_types = types;
    }

    /// Every instance ever created, deleted ones included.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.lock()
            .instances
            .iter()
            .map(|i| i.view.clone())
            .collect()
    }

    /// Instances not deleted.
    pub fn live_instances(&self) -> Vec<InstanceView> {
        self.instances()
            .into_iter()
            .filter(|i| !i.deleted)
            .collect()
    }

    pub fn scripts(&self) -> Vec<Registration> {
        self.lock().scripts.clone()
    }

    /// The bodies of every `POST /instances`, accepted or not.
    /// The SSH keys registered on the account now.
    pub fn ssh_keys(&self) -> Vec<Registration> {
        self.lock().ssh_keys.clone()
    }

    pub fn create_requests(&self) -> Vec<Value> {
        self.lock().create_bodies.clone()
    }

    /// The bodies of every `PUT /instances`.
    pub fn action_requests(&self) -> Vec<Value> {
        self.lock().action_bodies.clone()
    }

    /// Agent logs of the booted nodes, for failure messages.
    pub fn node_logs(&self) -> String {
        self.lock()
            .instances
            .iter()
            .filter_map(|i| {
                i.node
                    .as_ref()
                    .map(|n| format!("--- {}\n{}{}", i.view.hostname, n.boot_log, n.agent_log()))
            })
            .collect()
    }
}

impl Drop for VerdaStandin {
    fn drop(&mut self) {
        drop(self.server.take());
        let nodes: Vec<BootedNode> = self
            .lock()
            .instances
            .iter_mut()
            .filter_map(|i| i.node.take())
            .collect();
        for node in nodes {
            node.destroy();
        }
    }
}

impl Inner {
    fn with_fixtures() -> Inner {
        let mut availability = HashMap::new();
        let all = [
            "CPU.4V.16G",
            "CPU.8V.32G",
            "1V100.6V",
            "1A100.40S.22V",
            "1H100.80S.30V",
            "8H100.80S.176V",
        ];
        let set = |a: &mut HashMap<(String, bool), Vec<String>>, l: &str, spot, types: &[&str]| {
            a.insert(
                (l.to_string(), spot),
                types.iter().map(|t| t.to_string()).collect(),
            );
        };
        set(&mut availability, "FIN-01", false, &all);
        set(
            &mut availability,
            "FIN-01",
            true,
            &["CPU.4V.16G", "CPU.8V.32G", "1H100.80S.30V"],
        );
        set(
            &mut availability,
            "FIN-02",
            false,
            &["CPU.4V.16G", "1A100.40S.22V", "8H100.80S.176V"],
        );
        set(&mut availability, "FIN-02", true, &[]);
        set(
            &mut availability,
            "ICE-01",
            false,
            &["CPU.4V.16G", "CPU.8V.32G", "1V100.6V"],
        );
        set(
            &mut availability,
            "ICE-01",
            true,
            &["CPU.4V.16G", "1V100.6V"],
        );
        Inner {
            token_lifetime: Duration::from_secs(3600),
            access_tokens: HashMap::new(),
            refresh_tokens: HashSet::new(),
            grants: Vec::new(),
            issued: Vec::new(),
            counter: 0,
            instance_types: default_instance_types(),
            locations: vec![
                json!({"code": "FIN-01", "name": "Finland 1", "country_code": "FI"}),
                json!({"code": "FIN-02", "name": "Finland 2", "country_code": "FI"}),
                json!({"code": "ICE-01", "name": "Iceland 1", "country_code": "IS"}),
            ],
            availability,
            capacity_failures: HashSet::new(),
            unavailable_regions: HashSet::new(),
            faults: Vec::new(),
            partial_delete_failures: 0,
            id_format: IdFormat::PlainText,
            availability_as_strings: false,
            omit_tags: false,
            boot_outcome: None,
            boot_isolated: false,
            scripts: Vec::new(),
            ssh_keys: Vec::new(),
            instances: Vec::new(),
            create_bodies: Vec::new(),
            action_bodies: Vec::new(),
            requests: Vec::new(),
        }
    }

    /// A fresh id shaped like Verda's UUIDs.
    fn new_id(&mut self) -> String {
        self.counter += 1;
        let salt = std::process::id() as u64;
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            (salt.wrapping_mul(2654435761) ^ self.counter) & 0xffff_ffff,
            self.counter & 0xffff,
            (self.counter >> 4) & 0xfff,
            salt & 0xfff,
            self.counter.wrapping_mul(0x9e37_79b9) & 0xffff_ffff_ffff
        )
    }

    fn new_token(&mut self, prefix: &str) -> String {
        let id = self.new_id();
        let token = format!("{prefix}.{}", id.replace('-', ""));
        self.issued.push(token.clone());
        token
    }

    fn instance_type(&self, name: &str) -> Option<&Value> {
        self.instance_types
            .iter()
            .find(|t| t.get("instance_type").and_then(Value::as_str) == Some(name))
    }

    fn location_known(&self, code: &str) -> bool {
        self.locations
            .iter()
            .any(|l| l.get("code").and_then(Value::as_str) == Some(code))
    }
}

/// The fixture instance types: some prices as strings, some as numbers, as the API mixes.
pub fn default_instance_types() -> Vec<Value> {
    let t = |id: &str,
             name: &str,
             price: Value,
             spot: Value,
             cores: u32,
             mem: u32,
             gpu: (&str, u32, u32)| {
        json!({
            "id": id,
            "instance_type": name,
            "price_per_hour": price,
            "spot_price": spot,
            "description": format!("{name} instance"),
            "cpu": {"description": format!("{cores} CPU"), "number_of_cores": cores},
            "gpu": {"description": gpu.0, "number_of_gpus": gpu.1},
            "memory": {"description": format!("{mem}GB RAM"), "size_in_gigabytes": mem},
            "gpu_memory": {"description": format!("{}GB VRAM", gpu.2), "size_in_gigabytes": gpu.2},
            "storage": {"description": "dynamic"},
            "best_for": [],
            "model": gpu.0.split_whitespace().nth(1).unwrap_or("CPU"),
            "name": name,
            "p2p": "",
            "currency": "usd",
            "manufacturer": if gpu.1 > 0 { "NVIDIA" } else { "AMD" },
            "display_name": name,
            "supported_os": ["ubuntu-24.04"],
        })
    };
    vec![
        t(
            "c01d5c1e-0001-4000-8000-000000000001",
            "CPU.4V.16G",
            json!("0.0820"),
            json!("0.0290"),
            4,
            16,
            ("", 0, 0),
        ),
        t(
            "c01d5c1e-0002-4000-8000-000000000002",
            "CPU.8V.32G",
            json!(0.164),
            json!(0.058),
            8,
            32,
            ("", 0, 0),
        ),
        t(
            "c01d5c1e-0003-4000-8000-000000000003",
            "1V100.6V",
            json!("0.39"),
            json!("0.14"),
            6,
            23,
            ("1x Tesla V100 16GB", 1, 16),
        ),
        t(
            "c01d5c1e-0004-4000-8000-000000000004",
            "1A100.40S.22V",
            json!(1.29),
            json!("0.45"),
            22,
            120,
            ("1x A100 SXM4 40GB", 1, 40),
        ),
        t(
            "c01d5c1e-0005-4000-8000-000000000005",
            "1H100.80S.30V",
            json!("2.19"),
            json!("0.99"),
            30,
            120,
            ("1x H100 SXM5 80GB", 1, 80),
        ),
        t(
            "c01d5c1e-0006-4000-8000-000000000006",
            "8H100.80S.176V",
            json!(17.52),
            json!(8.0),
            176,
            1480,
            ("8x H100 SXM5 80GB", 8, 640),
        ),
    ]
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/oauth2/token", post(token))
        .route("/instance-types", get(instance_types))
        .route("/locations", get(locations))
        .route("/instance-availability", get(availability))
        .route(
            "/instance-availability/{instance_type}",
            get(availability_of),
        )
        .route(
            "/scripts",
            get(list_registered::<Scripts>)
                .post(create_registered::<Scripts>)
                .delete(delete_scripts),
        )
        .route(
            "/scripts/{id}",
            get(get_registered::<Scripts>).delete(delete_registered::<Scripts>),
        )
        .route(
            "/ssh-keys",
            get(list_registered::<SshKeys>).post(create_registered::<SshKeys>),
        )
        .route(
            "/ssh-keys/{id}",
            get(get_registered::<SshKeys>).delete(delete_registered::<SshKeys>),
        )
        .route(
            "/instances",
            get(list_instances)
                .post(create_instance)
                .put(instance_action),
        )
        .route("/instances/{id}", get(get_instance));
    Router::new()
        .nest("/v1", api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "Not found") })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            gatekeeper,
        ))
        .with_state(shared)
}

/// Records the request, answers injected faults, and checks the bearer token (everything but
/// the token endpoint needs one).
async fn gatekeeper(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let shown = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    {
        let mut inner = shared.lock();
        inner.requests.push(format!("{} {shown}", request.method()));
        let method = request.method().clone();
        if let Some(fault) = inner
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method == method && f.path == path)
        {
            fault.remaining -= 1;
            return error(fault.status, &fault.code, &fault.message);
        }
        // Source: every call but the token grant carries `Authorization: Bearer` (the SDKs'
        // http clients; docs/cloud-apis.md#verda); a missing or expired one is a 401.
        if path != "/v1/oauth2/token" {
            let bearer = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let valid = bearer
                .and_then(|t| inner.access_tokens.get(&t).copied())
                .is_some_and(|expires| Instant::now() < expires);
            if !valid {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized_request",
                    "Access token is missing, invalid or expired",
                );
            }
        }
    }
    next.run(request).await
}

fn parse_body(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Request body is not valid JSON",
        ))
    })
}

async fn token(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
    let grant = field("grant_type").to_string();
    let mut inner = shared.lock();
    // Source: OAuth2 client credentials and refresh grants (the SDKs' authentication
    // modules; docs/cloud-apis.md#verda).
    let granted = match grant.as_str() {
        "client_credentials" => {
            field("client_id") == CLIENT_ID && field("client_secret") == CLIENT_SECRET
        }
        "refresh_token" => inner.refresh_tokens.remove(field("refresh_token")),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type must be client_credentials or refresh_token",
            )
        }
    };
    inner.grants.push((grant.clone(), granted));
    if !granted {
        let message = if grant == "client_credentials" {
            "Invalid client credentials"
        } else {
            "Invalid or expired refresh token"
        };
        return error(StatusCode::UNAUTHORIZED, "unauthorized_request", message);
    }
    let access = inner.new_token("at");
    let refresh = inner.new_token("rt");
    let lifetime = inner.token_lifetime;
    inner
        .access_tokens
        .insert(access.clone(), Instant::now() + lifetime);
    inner.refresh_tokens.insert(refresh.clone());
    Json(json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "scope": "fullAccess",
    }))
    .into_response()
}

async fn instance_types(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    // Source: the SDKs' `instance_types.get(currency)` takes "usd" or "eur".
    match query.get("currency").map(String::as_str) {
        None | Some("usd") | Some("eur") => {}
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("Unsupported currency {other}"),
            )
        }
    }
    Json(Value::Array(shared.lock().instance_types.clone())).into_response()
}

async fn locations(State(shared): State<Arc<Shared>>) -> Response {
    Json(Value::Array(shared.lock().locations.clone())).into_response()
}

/// `is_spot` or `isSpot` ("true"/"false"); absent means on-demand. Source: one SDK sends each
/// spelling (docs/cloud-apis.md#verda).
fn spot_flag(query: &HashMap<String, String>) -> Result<bool, Box<Response>> {
    match query
        .get("is_spot")
        .or_else(|| query.get("isSpot"))
        .map(String::as_str)
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("is_spot must be true or false, not {other}"),
        ))),
    }
}

async fn availability(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let spot = match spot_flag(&query) {
        Ok(spot) => spot,
        Err(response) => return *response,
    };
    let inner = shared.lock();
    let codes: Vec<String> = match query.get("location_code") {
        // Stand-in's own: an unknown code is refused rather than answered empty; location
        // codes are data from `/locations` (docs/cloud-apis.md#verda), which the provider reads.
        Some(code) if !inner.location_known(code) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("Invalid location code {code}"),
            )
        }
        Some(code) => vec![code.clone()],
        None => inner
            .locations
            .iter()
            .filter_map(|l| l.get("code").and_then(Value::as_str).map(str::to_string))
            .collect(),
    };
    let answer: Vec<Value> = codes
        .into_iter()
        .map(|code| {
            let types = inner
                .availability
                .get(&(code.clone(), spot))
                .cloned()
                .unwrap_or_default();
            json!({ "location_code": code, "availabilities": types })
        })
        .collect();
    Json(Value::Array(answer)).into_response()
}

async fn availability_of(
    State(shared): State<Arc<Shared>>,
    UrlPath(instance_type): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let spot = match spot_flag(&query) {
        Ok(spot) => spot,
        Err(response) => return *response,
    };
    let inner = shared.lock();
    let available = inner.availability.iter().any(|((code, s), types)| {
        *s == spot
            && query.get("location_code").is_none_or(|c| c == code)
            && types.contains(&instance_type)
    });
    if inner.availability_as_strings {
        Json(json!(available.to_string())).into_response()
    } else {
        Json(json!(available)).into_response()
    }
}

async fn delete_scripts(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    // Source: the SDKs' `startup_scripts.delete(ids)` sends `{"scripts": [...]}`.
    let Some(ids) = body.get("scripts").and_then(Value::as_array) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "scripts (a list of ids) is required",
        );
    };
    let ids: HashSet<&str> = ids.iter().filter_map(Value::as_str).collect();
    shared
        .lock()
        .scripts
        .retain(|s| !ids.contains(s.id.as_str()));
    StatusCode::OK.into_response()
}

/// Whether `line` is an OpenSSH public key: a known algorithm, then base64 of the SSH wire
/// encoding, which itself starts with the same algorithm name (RFC 4253 6.6).
fn is_openssh_public_key(line: &str) -> bool {
    use base64::Engine as _;
    const ALGORITHMS: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    ];
    let mut parts = line.split_whitespace();
    let (Some(algorithm), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(wire) = base64::engine::general_purpose::STANDARD.decode(blob) else {
        return false;
    };
    let named = wire
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| wire.get(4..4 + n));
    ALGORITHMS.contains(&algorithm) && named == Some(algorithm.as_bytes())
}

/// A named thing registered on the account: a startup script, an SSH key. Both are made
/// from `{name, <field>}` (the new id answered as plain text, as the Python SDK reads it:
/// docs/cloud-apis.md#verda), listed, read back as a one-element array (the SDK reads `[0]`)
/// and deleted by id.
trait Registered: Send + 'static {
    /// The field that carries its text.
    const FIELD: &'static str;
    const NOT_FOUND: &'static str;
    /// Why a request's `name` and text are refused, if they are.
    fn refusal(name: Option<&str>, text: Option<&str>) -> Option<&'static str>;
    fn all(inner: &mut Inner) -> &mut Vec<Registration>;
}

/// `/scripts`.
struct Scripts;

impl Registered for Scripts {
    const FIELD: &'static str = "script";
    const NOT_FOUND: &'static str = "Startup script not found";
    fn refusal(name: Option<&str>, script: Option<&str>) -> Option<&'static str> {
        // Source: the SDKs' `startup_scripts.create(name, script)` sends both.
        match (name, script) {
            (Some(name), Some(script)) if name.is_empty() || script.is_empty() => {
                Some("name and script must not be empty")
            }
            (Some(_), Some(_)) => None,
            _ => Some("name and script are required"),
        }
    }
    fn all(inner: &mut Inner) -> &mut Vec<Registration> {
        &mut inner.scripts
    }
}

/// `/ssh-keys`.
struct SshKeys;

impl Registered for SshKeys {
    const FIELD: &'static str = "key";
    const NOT_FOUND: &'static str = "SSH key not found";
    fn refusal(name: Option<&str>, key: Option<&str>) -> Option<&'static str> {
        // Both fields are what every SDK sends; an empty name or a key that is no OpenSSH
        // public key is refused (the console and CLI take only OpenSSH lines).
        if name.unwrap_or_default().is_empty() {
            return Some("name is required");
        }
        (!is_openssh_public_key(key.unwrap_or_default()))
            .then_some("key must be an OpenSSH public key")
    }
    fn all(inner: &mut Inner) -> &mut Vec<Registration> {
        &mut inner.ssh_keys
    }
}

/// How the API shows a registration of kind `R`.
fn registration_json<R: Registered>(r: &Registration) -> Value {
    json!({"id": r.id, "name": r.name, R::FIELD: r.text})
}

async fn list_registered<R: Registered>(State(shared): State<Arc<Shared>>) -> Response {
    let all: Vec<Value> = R::all(&mut shared.lock())
        .iter()
        .map(registration_json::<R>)
        .collect();
    Json(Value::Array(all)).into_response()
}

async fn create_registered<R: Registered>(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let name = body.get("name").and_then(Value::as_str);
    let content = body.get(R::FIELD).and_then(Value::as_str);
    if let Some(why) = R::refusal(name, content) {
        return error(StatusCode::BAD_REQUEST, "invalid_request", why);
    }
    let mut inner = shared.lock();
    let id = inner.new_id();
    R::all(&mut inner).push(Registration {
        id: id.clone(),
        name: name.unwrap_or_default().into(),
        text: content.unwrap_or_default().into(),
    });
    text(StatusCode::CREATED, id)
}

/// A one-element array, as the API answers.
async fn get_registered<R: Registered>(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match R::all(&mut shared.lock()).iter().find(|r| r.id == id) {
        Some(r) => Json(json!([registration_json::<R>(r)])).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", R::NOT_FOUND),
    }
}

async fn delete_registered<R: Registered>(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let mut inner = shared.lock();
    let all = R::all(&mut inner);
    let before = all.len();
    all.retain(|r| r.id != id);
    if all.len() == before {
        error(StatusCode::NOT_FOUND, "not_found", R::NOT_FOUND)
    } else {
        StatusCode::OK.into_response()
    }
}

fn instance_json(inner: &Inner, i: &StoredInstance) -> Value {
    let t = inner
        .instance_type(&i.view.instance_type)
        .cloned()
        .unwrap_or(Value::Null);
    let running = i.view.status == "running";
    let mut value = json!({
        "id": i.view.id,
        "instance_type": i.view.instance_type,
        "image": i.view.image,
        "price_per_hour": t.get(if i.view.is_spot { "spot_price" } else { "price_per_hour" }).cloned().unwrap_or(Value::Null),
        "hostname": i.view.hostname,
        "description": i.description,
        "status": i.view.status,
        "created_at": i.created_at,
        "ssh_key_ids": i.view.ssh_key_ids,
        "cpu": t.get("cpu").cloned().unwrap_or(Value::Null),
        "gpu": t.get("gpu").cloned().unwrap_or(Value::Null),
        "memory": t.get("memory").cloned().unwrap_or(Value::Null),
        "gpu_memory": t.get("gpu_memory").cloned().unwrap_or(Value::Null),
        "storage": t.get("storage").cloned().unwrap_or(Value::Null),
        // Only a namespace of the test's own: never an address the stand-in made up.
        "ip": match i.view.address {
            Some(address) if running => json!(address.to_string()),
            _ => Value::Null,
        },
        "os_volume_id": if running { json!(format!("{}-os", i.view.id)) } else { Value::Null },
        "os_volume": i.os_volume,
        "location": i.view.location,
        "startup_script_id": i.view.startup_script_id,
        "is_spot": i.view.is_spot,
        "contract": if i.view.is_spot { "SPOT" } else { "PAY_AS_YOU_GO" },
        "pricing": "FIXED_PRICE",
    });
    if !inner.omit_tags {
        value["tags"] = Value::Array(
            i.view
                .tags
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect(),
        );
    }
    value
}

async fn list_instances(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = shared.lock();
    // Deleting instances linger for a listing or two, then are gone.
    for i in inner.instances.iter_mut().filter(|i| !i.view.deleted) {
        if i.view.status == "deleting" {
            if i.linger == 0 {
                i.view.deleted = true;
            } else {
                i.linger -= 1;
            }
        }
    }
    let wanted = query.get("status");
    let listed: Vec<Value> = inner
        .instances
        .iter()
        .filter(|i| !i.view.deleted)
        .filter(|i| wanted.is_none_or(|w| *w == i.view.status))
        .map(|i| instance_json(&inner, i))
        .collect();
    Json(Value::Array(listed)).into_response()
}

/// Answers the instance as it is, then moves it one step: ordered -> provisioning -> running
/// (or the configured outcome).
async fn get_instance(State(shared): State<Arc<Shared>>, UrlPath(id): UrlPath<String>) -> Response {
    let mut inner = shared.lock();
    let Some(index) = inner
        .instances
        .iter()
        .position(|i| i.view.id == id && !i.view.deleted)
    else {
        return error(StatusCode::NOT_FOUND, "not_found", "Instance not found");
    };
    let answer = instance_json(&inner, &inner.instances[index]);
    let outcome = inner
        .boot_outcome
        .clone()
        .unwrap_or_else(|| "running".into());
    let instance = &mut inner.instances[index];
    instance.view.status = match instance.view.status.as_str() {
        "ordered" => "provisioning".into(),
        "provisioning" => match instance.view.boot_error {
            Some(_) => "error".into(),
            None => outcome,
        },
        other => other.to_string(),
    };
    Json(answer).into_response()
}

/// The key ids a create names: a list, or one id as a string.
fn requested_ssh_keys(body: &Value) -> Vec<String> {
    match body.get("ssh_key_ids") {
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(id)) => vec![id.clone()],
        _ => Vec::new(),
    }
}

/// Validates a create body the way the API does; `Err` is the error answer.
fn validate_create(inner: &Inner, body: &Value) -> Result<(), Box<Response>> {
    let bad = |message: &str| {
        Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            message,
        )))
    };
    let s = |k: &str| body.get(k).and_then(Value::as_str);
    // Source for the required fields: the SDKs' `instances.create` takes instance_type,
    // image, ssh_key_ids, hostname, description and a location as required arguments;
    // types, images and locations are the API's own lists.
    let Some(instance_type) = s("instance_type") else {
        return bad("instance_type is required");
    };
    if inner.instance_type(instance_type).is_none() {
        return bad(&format!("Invalid instance type {instance_type}"));
    }
    match s("image") {
        Some(image) if IMAGES.contains(&image) => {}
        Some(image) => return bad(&format!("Invalid image {image}")),
        None => return bad("image is required"),
    }
    match s("hostname") {
        Some(h)
            if !h.is_empty()
                && h.len() <= 63
                && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !h.starts_with('-') => {}
        _ => return bad("hostname must be 1-63 letters, digits and dashes"),
    }
    if s("description").is_none() {
        return bad("description is required");
    }
    let Some(location) = s("location_code") else {
        return bad("location_code is required");
    };
    if !inner.location_known(location) || inner.unavailable_regions.contains(location) {
        return bad("Region not available");
    }
    match s("startup_script_id") {
        Some(id) if inner.scripts.iter().any(|sc| sc.id == id) => {}
        Some(_) => return bad("Startup script not found"),
        None => {}
    }
    // Source: Verda's API answers a create without a key of the account with this 400,
    // whose wording contradicts itself; Verda's own CLI classifies it as "SSH key required"
    // (docs/cloud-apis.md#verda). A list or a single id string is accepted, as the message
    // says, but only when it names at least one key the account has.
    let key_ids = requested_ssh_keys(body);
    if key_ids.is_empty()
        || !key_ids
            .iter()
            .all(|id| inner.ssh_keys.iter().any(|k| k.id == *id))
    {
        return bad(
            "SSH keys can be an array of UUID's, a single UUID string, null value or not defined",
        );
    }
    // Source: the SDKs send `is_spot` as a JSON boolean.
    if !body.get("is_spot").is_none_or(Value::is_boolean) {
        return bad("is_spot must be a boolean");
    }
    // Source: `os_volume: {name, size}` as the SDKs build it (docs/cloud-apis.md#verda).
    if let Some(volume) = body.get("os_volume").filter(|v| !v.is_null()) {
        let named = volume.get("name").and_then(Value::as_str).is_some();
        let sized = volume
            .get("size")
            .and_then(Value::as_u64)
            .is_some_and(|s| s > 0);
        if !named || !sized {
            return bad("os_volume needs a name and a size in GB");
        }
    }
    if let Some(tags) = body.get("tags").filter(|v| !v.is_null()) {
        let Some(tags) = tags.as_array() else {
            return bad("tags must be a list of {key, value}");
        };
        // Source: at most 10 `{key, value}` tags (docs/cloud-apis.md#verda).
        if tags.len() > 10 {
            return bad("At most 10 tags are allowed");
        }
        if !tags.iter().all(|t| {
            t.get("key").and_then(Value::as_str).is_some()
                && t.get("value").and_then(Value::as_str).is_some()
        }) {
            return bad("tags must be a list of {key, value}");
        }
    }
    Ok(())
}

async fn create_instance(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let mut inner = shared.lock();
    inner.create_bodies.push(body.clone());
    if let Err(response) = validate_create(&inner, &body) {
        return *response;
    }
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (instance_type, location) = (s("instance_type"), s("location_code"));
    let is_spot = body
        .get("is_spot")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let listed = inner
        .availability
        .get(&(location.clone(), is_spot))
        .is_some_and(|types| types.contains(&instance_type));
    if !listed
        || inner
            .capacity_failures
            .contains(&(instance_type.clone(), location.clone()))
    {
        let gpus = inner
            .instance_type(&instance_type)
            .and_then(|t| t.get("gpu")?.get("number_of_gpus")?.as_u64())
            .unwrap_or(0);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            &format!(
                "Not enough resources to deploy a {gpus} GPU instance type {instance_type} in {location}"
            ),
        );
    }
    let id = inner.new_id();
    let script_id = s("startup_script_id");
    let script = inner
        .scripts
        .iter()
        .find(|sc| sc.id == script_id)
        .map(|sc| sc.text.clone());
    let tags: Vec<(String, String)> = body
        .get("tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t.get("key")?.as_str()?.to_string(),
                t.get("value")?.as_str()?.to_string(),
            ))
        })
        .collect();
    let ssh_key_ids = requested_ssh_keys(&body);
    let hostname = s("hostname");
    inner.instances.push(StoredInstance {
        view: InstanceView {
            id: id.clone(),
            hostname: hostname.clone(),
            instance_type,
            location,
            image: s("image"),
            status: "ordered".into(),
            is_spot,
            startup_script_id: script_id,
            ssh_key_ids,
            tags,
            booted: false,
            boot_error: None,
            address: None,
            deleted: false,
        },
        description: s("description"),
        os_volume: body.get("os_volume").cloned().unwrap_or(Value::Null),
        created_at: rfc3339_now(),
        linger: DELETE_LINGER_POLLS,
        node: None,
    });
    // The machine boots and runs its startup script, as the real one would.
    if let (Some(script), None) = (script, inner.boot_outcome.as_ref()) {
        let (shared, id, isolated) = (shared.clone(), id.clone(), inner.boot_isolated);
        tokio::task::spawn_blocking(move || {
            let booted = if isolated {
                BootedNode::boot_isolated(&shared.root, &hostname, &script)
            } else {
                BootedNode::boot(&shared.root, &hostname, &script)
            };
            let mut inner = shared.lock();
            let Some(instance) = inner.instances.iter_mut().find(|i| i.view.id == id) else {
                return;
            };
            match booted {
                // Deleted while booting: the node goes with it (dropping destroys it).
                Ok(_) if instance.view.deleted || instance.view.status == "deleting" => {}
                Ok(node) => {
                    instance.view.booted = true;
                    instance.view.address = node.address();
                    instance.node = Some(node);
                }
                Err(why) => {
                    instance.view.boot_error = Some(why);
                    instance.view.status = "error".into();
                }
            }
        });
    }
    let format = inner.id_format;
    drop(inner);
    match format {
        IdFormat::PlainText => text(StatusCode::ACCEPTED, id),
        IdFormat::JsonString => (StatusCode::ACCEPTED, Json(json!(id))).into_response(),
        IdFormat::JsonObject => (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
    }
}

async fn instance_action(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let mut inner = shared.lock();
    inner.action_bodies.push(body.clone());
    let ids: Vec<String> = match body.get("id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "id must be an instance id or a list of them",
            )
        }
    };
    let action = body
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // Source: the SDKs' `Actions` (start, shutdown, delete, hibernate, restore) and `boot`;
    // `{"id": one or a list, "action", "volume_ids"}` as `instances.action` sends it.
    if !matches!(
        action.as_str(),
        "delete" | "shutdown" | "start" | "hibernate" | "restore" | "boot"
    ) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("Invalid action {action:?}"),
        );
    }
    if ids.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "No instance ids given",
        );
    }
    let mut fail_first = action == "delete" && inner.partial_delete_failures > 0;
    if fail_first {
        inner.partial_delete_failures -= 1;
    }
    let mut results = Vec::new();
    let mut failures = 0;
    let mut to_destroy = Vec::new();
    for id in &ids {
        let Some(instance) = inner
            .instances
            .iter_mut()
            .find(|i| i.view.id == *id && !i.view.deleted)
        else {
            failures += 1;
            results.push(
                json!({"instanceId": id, "action": action, "status": "error",
                "statusCode": 404, "error": "Instance not found"}),
            );
            continue;
        };
        if fail_first {
            fail_first = false;
            failures += 1;
            results.push(json!({"instanceId": id, "action": action, "status": "error",
                "statusCode": 500, "error": "server_error: could not delete the instance, try again"}));
            continue;
        }
        match action.as_str() {
            "delete" => {
                instance.view.status = "deleting".into();
                instance.linger = DELETE_LINGER_POLLS;
                if let Some(node) = instance.node.take() {
                    to_destroy.push(node);
                }
                instance.view.booted = false;
            }
            "shutdown" | "hibernate" => {
                instance.view.status = "offline".into();
                if let Some(node) = instance.node.take() {
                    to_destroy.push(node);
                }
                instance.view.booted = false;
            }
            _ => instance.view.status = "running".into(),
        }
        results.push(
            json!({"instanceId": id, "action": action, "status": "success", "statusCode": 202}),
        );
    }
    drop(inner);
    // The machines are gone: every process they started dies with them.
    for node in to_destroy {
        node.destroy();
    }
    match (failures, ids.len()) {
        (0, _) => StatusCode::ACCEPTED.into_response(),
        (1, 1) if results[0]["statusCode"] == 404 => {
            error(StatusCode::NOT_FOUND, "not_found", "Instance not found")
        }
        _ => (StatusCode::MULTI_STATUS, Json(Value::Array(results))).into_response(),
    }
}

/// Now as `2026-11-27T08:09:31Z`, the way the API writes `created_at`.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
