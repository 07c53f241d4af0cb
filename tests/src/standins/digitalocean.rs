//! A DigitalOcean API stand-in on loopback: sizes and regions with paging, droplets created
//! (202, `new`, then `active`), listed, fetched and deleted in the real API's shapes, status
//! codes and traps (see `docs/cloud-apis.md`):
//! - a plain listing, and listing or deleting by `tag_name`, leaves GPU droplets out; only
//!   `type=gpus` lists them, and `type` with `tag_name` is refused;
//! - a wrong token gets 401 `{"id":"Unauthorized","message":"Unable to authenticate you."}`;
//! - a size made unavailable in a region gets 422 "Size is not available in this region.";
//! - 429 with `ratelimit-*` headers and 5xx answers on demand;
//! - private `networks.v4` entries first, with `"gateway": "nil"`;
//! - Cloud Firewalls (create, list, get, delete) that may only name existing tags (`POST
//!   /v2/tags` or a droplet creates one), with names unique in the account (409 otherwise);
//! - VPCs (create, list, get, delete, members): every region starts with its default VPC
//!   (`default-<region>`), where droplets created without `vpc_uuid` go, and the first VPC
//!   made in a region without one becomes its default; names are unique in the account (422
//!   otherwise); `ip_range` is picked when not given (a /20 overlapping no other); a droplet's
//!   VPC must exist and be in its region (422); deleting a default VPC or one with members is
//!   refused with 403 `forbidden`, and deleted droplets can be made to stay members for a
//!   while ([`set_member_linger`](DigitalOceanStandIn::set_member_linger)), as on
//!   DigitalOcean. A droplet's private address is in its VPC's range.
//!
//! Creating a droplet boots it: its user-data runs as a [`BootedNode`] (the agent starts and
//! dials the coordinator); deleting it destroys the node. With
//! [`set_boot_isolated`](DigitalOceanStandIn::set_boot_isolated), each droplet boots in a
//! network namespace of its own, whose address becomes its public IPv4 address once it is
//! active and booted. No other droplet has a public address: nothing a test could dial is
//! ever invented. Every request and every answer is checked against the official OpenAPI
//! spec; [`DigitalOceanStandIn::violations`] lists what did not match.
//!
//! Besides that record, the stand-in refuses what DigitalOcean refuses; each such rule names
//! its source beside it (the vendored spec, `docs/cloud-apis.md#digitalocean`, or a real
//! answer on record), and the few that have none say so.

use super::server::StandinServer;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use skyward_providers::digitalocean::DigitalOceanConfig;

use crate::node::BootedNode;
use crate::openapi::{self, OpenApi};

/// The token the stand-in accepts.
pub const TOKEN: &str = "dop_v1_standin_token";
/// How many droplets the account may have at once, as `GET /v2/account` says.
const DROPLET_LIMIT: usize = 25;
/// How many droplets one multi-create may name.
const MULTI_CREATE_LIMIT: usize = 10;
/// Droplet names and tags: at most this many characters.
const NAME_LIMIT: usize = 255;
/// Regions the official spec's image `regions` enum allows (the others are left out there).
const IMAGE_REGIONS: &[&str] = &[
    "ams1", "ams2", "ams3", "blr1", "fra1", "lon1", "nyc1", "nyc2", "nyc3", "sfo1", "sfo2", "sfo3",
    "sgp1", "tor1", "syd1",
];

/// One request as it came, and what it was answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Option<Value>,
    pub status: u16,
}

impl Recorded {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A droplet as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct DropletInfo {
    pub id: u64,
    pub name: String,
    pub size: String,
    pub region: String,
    pub image: String,
    pub tags: Vec<String>,
    pub user_data: Option<String>,
    pub status: String,
    pub gpu: bool,
    /// The VPC it is in.
    pub vpc_uuid: String,
}

/// A VPC as the stand-in holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct VpcInfo {
    pub id: String,
    pub name: String,
    pub description: String,
    pub region: String,
    pub ip_range: String,
    pub default: bool,
}

/// A deleted droplet still counted among its VPC's members.
struct Lingering {
    vpc_uuid: String,
    id: u64,
    name: String,
    until: Instant,
}

struct Droplet {
    info: DropletInfo,
    created: Instant,
    /// A status forced by the test (`off`, `archive`), else `new` then `active`.
    forced: Option<String>,
}

struct Inner {
    sizes: Vec<Value>,
    regions: Vec<Value>,
    droplets: BTreeMap<u64, Droplet>,
    next_id: u64,
    requests: Vec<Recorded>,
    violations: Vec<String>,
    unavailable: HashSet<(String, String)>,
    rate_limited: usize,
    server_errors: usize,
    max_per_page: usize,
    active_after: Duration,
    boot: bool,
    boot_isolated: bool,
    booted: HashMap<u64, BootedNode>,
    boot_errors: Vec<String>,
    /// Tags that exist: made by `POST /v2/tags` or by creating a droplet with them.
    tags: HashSet<String>,
    /// Cloud Firewalls in creation order, as the API shows them.
    firewalls: Vec<Value>,
    next_firewall: u64,
    /// VPCs in creation order, the regions' defaults first.
    vpcs: Vec<VpcInfo>,
    next_vpc: u64,
    /// How long a deleted droplet stays a member of its VPC.
    member_linger: Duration,
    lingering: Vec<Lingering>,
}

struct Shared {
    state: Mutex<Inner>,
    base: String,
    boot_root: PathBuf,
    contract: &'static OpenApi,
}

pub struct DigitalOceanStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Taken (stopped) first when dropped, before the nodes go.
    server: Option<StandinServer>,
}

impl DigitalOceanStandIn {
    /// Serves on 127.0.0.1 (a free port) with [`default_sizes`]; droplets boot under
    /// `boot_root/<name>-<id>`.
    pub async fn start(boot_root: &Path) -> DigitalOceanStandIn {
        // Parsing the 3 MB spec takes a while: off the async threads.
        let contract = tokio::task::spawn_blocking(openapi::digitalocean)
            .await
            .expect("loading the OpenAPI spec");
        // Bound first: the stand-in names its own address in its answers.
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let regions = default_regions();
        let vpcs: Vec<VpcInfo> = regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let slug = r["slug"].as_str().expect("region slug");
                VpcInfo {
                    id: format!("760e09ef-dc84-11e8-981e-{:012x}", i + 1),
                    name: format!("default-{slug}"),
                    description: String::new(),
                    region: slug.to_string(),
                    ip_range: format!("10.{}.0.0/20", 100 + i),
                    default: true,
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(Inner {
                sizes: default_sizes(),
                regions,
                droplets: BTreeMap::new(),
                next_id: 500_000_001,
                requests: Vec::new(),
                violations: Vec::new(),
                unavailable: HashSet::new(),
                rate_limited: 0,
                server_errors: 0,
                max_per_page: 200,
                active_after: Duration::from_millis(300),
                boot: true,
                boot_isolated: false,
                booted: HashMap::new(),
                boot_errors: Vec::new(),
                tags: HashSet::new(),
                firewalls: Vec::new(),
                next_firewall: 1,
                vpcs,
                next_vpc: 1,
                member_linger: Duration::ZERO,
                lingering: Vec::new(),
            }),
            base: format!("http://{addr}"),
            boot_root: boot_root.to_path_buf(),
            contract,
        });
        let server = StandinServer::serve_handler("digitalocean", listener, handle, shared.clone());
        DigitalOceanStandIn {
            addr,
            shared,
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A provider configuration pointed here, with the token accepted and short polls.
    pub fn config(&self) -> DigitalOceanConfig {
        DigitalOceanConfig {
            api_url: Some(self.url()),
            token: Some(TOKEN.into()),
            poll_interval: Duration::from_millis(200),
            active_timeout: Duration::from_secs(20),
            teardown_timeout: Duration::from_secs(20),
            ..DigitalOceanConfig::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.state.lock().expect("stand-in state")
    }

    pub fn droplets(&self) -> Vec<DropletInfo> {
        let state = self.state();
        state
            .droplets
            .values()
            .map(|d| {
                let mut info = d.info.clone();
                info.status = status_of(d, state.active_after);
                info
            })
            .collect()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Requests and answers that did not match the OpenAPI spec.
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    /// Fails the test if any request or answer broke the OpenAPI contract.
    pub fn assert_contract(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "OpenAPI contract violations:\n  {}",
            violations.join("\n  ")
        );
    }

    pub fn set_sizes(&self, sizes: Vec<Value>) {
        self.state().sizes = sizes;
    }

    /// Creating `size` in `region` answers 422 "Size is not available in this region.".
    pub fn make_unavailable(&self, size: &str, region: &str) {
        self.state()
            .unavailable
            .insert((size.to_string(), region.to_string()));
    }

    /// The next `n` requests are answered 429 with a reset one second away.
    pub fn rate_limit_next(&self, n: usize) {
        self.state().rate_limited = n;
    }

    /// The next `n` requests are answered 500.
    pub fn fail_next(&self, n: usize) {
        self.state().server_errors = n;
    }

    /// Pages hold at most `n` items, whatever `per_page` asks.
    pub fn set_max_per_page(&self, n: usize) {
        self.state().max_per_page = n.max(1);
    }

    /// Whether created droplets run their user-data (on by default).
    pub fn set_boot(&self, boot: bool) {
        self.state().boot = boot;
    }

    /// Whether created droplets boot in a network namespace of their own (needs root), whose
    /// address becomes the droplet's public IPv4 address once it is active; off by default.
    pub fn set_boot_isolated(&self, isolated: bool) {
        self.state().boot_isolated = isolated;
    }

    /// The Cloud Firewalls that exist, as `GET /v2/firewalls` shows them.
    pub fn firewalls(&self) -> Vec<Value> {
        self.state().firewalls.clone()
    }

    /// The VPCs that exist, as `GET /v2/vpcs` shows them.
    pub fn vpcs(&self) -> Vec<VpcInfo> {
        self.state().vpcs.clone()
    }

    /// The id of `region`'s default VPC.
    pub fn default_vpc(&self, region: &str) -> Option<String> {
        self.state()
            .vpcs
            .iter()
            .find(|v| v.default && v.region == region)
            .map(|v| v.id.clone())
    }

    /// Removes `region`'s default VPC, as for an account that never used the region: the
    /// next VPC made there becomes the default. Panics if it has members.
    pub fn remove_default_vpc(&self, region: &str) {
        let mut state = self.state();
        let Some(id) = state
            .vpcs
            .iter()
            .find(|v| v.default && v.region == region)
            .map(|v| v.id.clone())
        else {
            return;
        };
        assert!(
            members(&state, &id).is_empty(),
            "the default VPC of {region} has members"
        );
        state.vpcs.retain(|v| v.id != id);
    }

    /// Deleted droplets stay members of their VPC for `linger` (none by default), so that
    /// deleting the VPC is refused meanwhile.
    pub fn set_member_linger(&self, linger: Duration) {
        self.state().member_linger = linger;
    }

    /// Puts a droplet in another VPC (which need not be in its region).
    pub fn set_vpc(&self, droplet: u64, vpc_uuid: &str) {
        if let Some(d) = self.state().droplets.get_mut(&droplet) {
            d.info.vpc_uuid = vpc_uuid.to_string();
        }
    }

    /// The names of what is in a VPC, as `GET /v2/vpcs/{id}/members` lists them.
    pub fn vpc_members(&self, vpc_uuid: &str) -> Vec<String> {
        members(&self.state(), vpc_uuid)
            .into_iter()
            .map(|m| m["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// A droplet that exists without having been created through the API (never booted),
    /// in its region's default VPC.
    pub fn add_droplet(&self, name: &str, size: &str, region: &str, tags: &[String]) -> u64 {
        let mut state = self.state();
        let gpu = state
            .sizes
            .iter()
            .find(|s| s["slug"] == size)
            .is_some_and(|s| s.get("gpu_info").is_some());
        let id = state.next_id;
        state.next_id += 1;
        let vpc_uuid = region_default_vpc(&mut state, region);
        state.droplets.insert(
            id,
            Droplet {
                info: DropletInfo {
                    id,
                    name: name.into(),
                    size: size.into(),
                    region: region.into(),
                    image: "ubuntu-24-04-x64".into(),
                    tags: tags.to_vec(),
                    user_data: None,
                    status: "active".into(),
                    gpu,
                    vpc_uuid,
                },
                created: Instant::now() - Duration::from_secs(3600),
                forced: None,
            },
        );
        id
    }

    /// Forces a droplet's status (`off`, `archive`, `active`).
    pub fn set_status(&self, id: u64, status: &str) {
        if let Some(d) = self.state().droplets.get_mut(&id) {
            d.forced = Some(status.into());
        }
    }

    /// Names of the droplets whose user-data ran and that still exist.
    pub fn booted(&self) -> Vec<String> {
        let state = self.state();
        state
            .booted
            .keys()
            .filter_map(|id| state.droplets.get(id).map(|d| d.info.name.clone()))
            .collect()
    }

    /// User-data runs that failed.
    pub fn boot_errors(&self) -> Vec<String> {
        self.state().boot_errors.clone()
    }
}

impl Drop for DigitalOceanStandIn {
    fn drop(&mut self) {
        drop(self.server.take());
        let booted: Vec<BootedNode> = self.state().booted.drain().map(|(_, n)| n).collect();
        drop(booted);
    }
}

/// Common sizes, shaped and priced as the API lists them: CPU sizes, GPU sizes (H100 x1 and
/// x8, L40S, MI300X), one size not available, one GPU of a model Skyward does not know.
pub fn default_sizes() -> Vec<Value> {
    let all = ["nyc1", "nyc3", "sfo3", "ams3", "tor1"];
    vec![
        size("s-1vcpu-1gb", 1, 1024, 25, 0.00893, 6.0, "Basic", &all),
        size("s-2vcpu-4gb", 2, 4096, 80, 0.03571, 24.0, "Basic", &all),
        size(
            "s-4vcpu-8gb",
            4,
            8192,
            160,
            0.07143,
            48.0,
            "Basic",
            &["nyc1", "nyc3", "sfo3"],
        ),
        size(
            "c-4",
            4,
            8192,
            50,
            0.125,
            84.0,
            "CPU-Optimized",
            &["nyc1", "nyc3", "tor1"],
        ),
        size(
            "g-4vcpu-16gb",
            4,
            16384,
            50,
            0.1875,
            126.0,
            "General Purpose",
            &["nyc3", "ams3"],
        ),
        {
            let mut s = size("s-8vcpu-16gb", 8, 16384, 320, 0.14286, 96.0, "Basic", &all);
            s["available"] = json!(false);
            s
        },
        gpu_size(
            "gpu-h100x1-80gb",
            20,
            245760,
            720,
            3.39,
            "nvidia_h100",
            1,
            80,
            &["nyc2", "tor1"],
        ),
        gpu_size(
            "gpu-h100x8-640gb",
            160,
            1966080,
            2046,
            23.92,
            "nvidia_h100",
            8,
            80,
            &["nyc2", "tor1"],
        ),
        gpu_size(
            "gpu-l40sx1-48gb",
            8,
            65536,
            500,
            1.57,
            "nvidia_l40s",
            1,
            48,
            &["tor1"],
        ),
        gpu_size(
            "gpu-mi300x1-192gb",
            20,
            245760,
            720,
            1.99,
            "amd_mi300x",
            1,
            192,
            &["atl1"],
        ),
        gpu_size(
            "gpu-zz9000x1-16gb",
            8,
            32768,
            200,
            0.5,
            "acme_zz9000",
            1,
            16,
            &["tor1"],
        ),
    ]
}

#[allow(clippy::too_many_arguments)]
pub fn size(
    slug: &str,
    vcpus: u32,
    memory_mib: u64,
    disk_gb: u64,
    price_hourly: f64,
    price_monthly: f64,
    description: &str,
    regions: &[&str],
) -> Value {
    json!({
        "slug": slug,
        "memory": memory_mib,
        "vcpus": vcpus,
        "disk": disk_gb,
        "transfer": 4.0,
        "price_monthly": price_monthly,
        "price_hourly": price_hourly,
        "regions": regions,
        "available": true,
        "description": description,
        "disk_info": [{"type": "local", "size": {"amount": disk_gb, "unit": "gib"}}],
    })
}

#[allow(clippy::too_many_arguments)]
pub fn gpu_size(
    slug: &str,
    vcpus: u32,
    memory_mib: u64,
    disk_gb: u64,
    price_hourly: f64,
    model: &str,
    count: u32,
    vram_gib: u32,
    regions: &[&str],
) -> Value {
    let mut s = size(
        slug,
        vcpus,
        memory_mib,
        disk_gb,
        price_hourly,
        (price_hourly * 672.0 * 100.0).round() / 100.0,
        "GPU",
        regions,
    );
    s["gpu_info"] =
        json!({"count": count, "model": model, "vram": {"amount": vram_gib, "unit": "gib"}});
    s["disk_info"]
        .as_array_mut()
        .expect("disk_info")
        .push(json!({"type": "scratch", "size": {"amount": 5120, "unit": "gib"}}));
    s
}

fn default_regions() -> Vec<Value> {
    [
        ("nyc1", "New York 1"),
        ("nyc2", "New York 2"),
        ("nyc3", "New York 3"),
        ("sfo3", "San Francisco 3"),
        ("ams3", "Amsterdam 3"),
        ("tor1", "Toronto 1"),
        ("atl1", "Atlanta 1"),
    ]
    .iter()
    .map(|(slug, name)| {
        json!({
            "name": name,
            "slug": slug,
            "features": ["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"],
            "available": true,
            "sizes": [],
        })
    })
    .collect()
}

fn status_of(droplet: &Droplet, active_after: Duration) -> String {
    match &droplet.forced {
        Some(status) => status.clone(),
        None if droplet.created.elapsed() >= active_after => "active".into(),
        None => "new".into(),
    }
}

fn error_body(id: &str, message: &str) -> Value {
    json!({"id": id, "message": message, "request_id": "8a7c6a3e-1d3b-4c55-9a2e-5f0d6b1c7e21"})
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An answer before the headers every answer carries.
struct Answer {
    status: StatusCode,
    body: Option<Value>,
    extra_headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn json(status: StatusCode, body: Value) -> Answer {
        Answer {
            status,
            body: Some(body),
            extra_headers: Vec::new(),
        }
    }

    fn error(status: StatusCode, id: &str, message: &str) -> Answer {
        Answer::json(status, error_body(id, message))
    }

    fn no_content() -> Answer {
        Answer {
            status: StatusCode::NO_CONTENT,
            body: None,
            extra_headers: Vec::new(),
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            reqwest::Url::parse(&format!("http://standin/?{q}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let json_body: Option<Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };
    // Not an acceptance rule: what breaks the spec is recorded (`violations`), not refused.
    let mut violations =
        shared
            .contract
            .check_request(method.as_str(), &path, &query, json_body.as_ref());
    if !body.is_empty() && json_body.is_none() {
        violations.push(format!("{method} {path}: request body is not JSON"));
    }
    if json_body.is_some()
        && !headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/json"))
    {
        violations.push(format!(
            "{method} {path}: JSON body without content-type application/json"
        ));
    }

    // Source: docs/cloud-apis.md#digitalocean (auth `Authorization: Bearer $DIGITALOCEAN_TOKEN`;
    // 401 `Unauthorized` "Unable to authenticate you"); DigitalOcean OpenAPI, `bearer_auth`
    // and the `unauthorized` response.
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    let answer = if !authorized {
        Answer::error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unable to authenticate you.",
        )
    } else {
        route(&shared, &method, &path, &query, json_body.as_ref())
    };

    let (limit, remaining) = (5000, 4999);
    let mut response = match &answer.body {
        Some(value) => (answer.status, axum::Json(value.clone())).into_response(),
        None => answer.status.into_response(),
    };
    let out = response.headers_mut();
    out.insert("ratelimit-limit", HeaderValue::from(limit));
    out.insert("ratelimit-remaining", HeaderValue::from(remaining));
    out.insert("ratelimit-reset", HeaderValue::from(epoch_secs() + 60));
    for (name, value) in &answer.extra_headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            out.insert(*name, value);
        }
    }
    let body_bytes = answer
        .body
        .as_ref()
        .map(|b| serde_json::to_vec(b).expect("JSON"))
        .unwrap_or_default();
    let header_list: Vec<(String, String)> = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    violations.extend(shared.contract.check_response(
        method.as_str(),
        &path,
        answer.status.as_u16(),
        &header_list,
        &body_bytes,
    ));
    let mut state = shared.state.lock().expect("stand-in state");
    state.violations.extend(violations);
    state.requests.push(Recorded {
        method: method.to_string(),
        path,
        query,
        body: json_body,
        status: answer.status.as_u16(),
    });
    response
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: Option<&Value>,
) -> Answer {
    {
        let mut state = shared.state.lock().expect("stand-in state");
        // Test hooks (`rate_limit_next`, `fail_next`), in the shapes of docs/cloud-apis.md
        // (429 `too_many_requests` with `ratelimit-*` headers) and the spec's `server_error`.
        if state.rate_limited > 0 {
            state.rate_limited -= 1;
            let mut answer = Answer::error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "API Rate limit exceeded.",
            );
            answer.extra_headers = vec![
                ("ratelimit-limit", "250".into()),
                ("ratelimit-remaining", "0".into()),
                ("ratelimit-reset", (epoch_secs() + 1).to_string()),
            ];
            return answer;
        }
        if state.server_errors > 0 {
            state.server_errors -= 1;
            return Answer::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Unexpected server-side error",
            );
        }
    }
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["", "v2", "account"]) => Answer::json(
            StatusCode::OK,
            json!({"account": {
                "droplet_limit": DROPLET_LIMIT, "floating_ip_limit": 5, "email": "ops@example.com",
                "name": "Stand-in", "uuid": "b6fr89dbf6d9156cace5f3c78dc9851d957381ef",
                "email_verified": true, "status": "active", "status_message": "",
                "team": {"uuid": "5df3e3004a17e242b7c20ca6c9fc25b701a47ece", "name": "My Team"}
            }}),
        ),
        ("GET", ["", "v2", "sizes"]) => {
            let sizes = shared.state.lock().expect("state").sizes.clone();
            page(shared, "/v2/sizes", "sizes", sizes, query)
        }
        ("GET", ["", "v2", "regions"]) => {
            let regions = shared.state.lock().expect("state").regions.clone();
            page(shared, "/v2/regions", "regions", regions, query)
        }
        ("GET", ["", "v2", "droplets"]) => {
            let (tag, kind, name) = (param("tag_name"), param("type"), param("name"));
            // Source: DigitalOcean OpenAPI, droplets_list parameters `droplet_tag_name` ("Can
            // not be combined with `name` or `type`"), `droplet_name` and `droplet_type`;
            // docs/cloud-apis.md#digitalocean (the `type=gpus` trap). 400 as the spec's
            // `bad_request` error; the real status of this refusal is not documented.
            if tag.is_some() && (kind.is_some() || name.is_some()) {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "tag_name cannot be combined with name or type",
                );
            }
            // Source: DigitalOcean OpenAPI, `droplet_type` enum (droplets, gpus); GPU droplets
            // are listed only with `type=gpus` (docs/cloud-apis.md#digitalocean).
            let gpus = match kind {
                None | Some("droplets") => false,
                Some("gpus") => true,
                Some(_) => {
                    return Answer::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "type must be droplets or gpus",
                    )
                }
            };
            let list: Vec<Value> = {
                let state = shared.state.lock().expect("state");
                state
                    .droplets
                    .values()
                    .filter(|d| d.info.gpu == gpus)
                    .filter(|d| tag.is_none_or(|t| d.info.tags.iter().any(|x| x == t)))
                    .filter(|d| name.is_none_or(|n| d.info.name.eq_ignore_ascii_case(n)))
                    .map(|d| droplet_json(&state, d))
                    .collect()
            };
            page(shared, "/v2/droplets", "droplets", list, query)
        }
        ("POST", ["", "v2", "droplets"]) => create(shared, body),
        ("DELETE", ["", "v2", "droplets"]) => {
            // Source: DigitalOcean OpenAPI, droplets_destroy_byTag (`tag_name` required).
            let Some(tag) = param("tag_name") else {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "tag_name is required",
                );
            };
            let removed: Vec<(u64, Option<BootedNode>)> = {
                let mut state = shared.state.lock().expect("state");
                // Deleting by tag misses GPU droplets, as listing by tag does.
                let ids: Vec<u64> = state
                    .droplets
                    .values()
                    .filter(|d| !d.info.gpu && d.info.tags.iter().any(|x| x == tag))
                    .map(|d| d.info.id)
                    .collect();
                ids.into_iter()
                    .map(|id| {
                        remove_droplet(&mut state, id);
                        (id, state.booted.remove(&id))
                    })
                    .collect()
            };
            drop(removed);
            Answer::no_content()
        }
        // Source: DigitalOcean OpenAPI, droplets_get / droplets_destroy (404 `not_found` for a
        // droplet that does not exist).
        ("GET", ["", "v2", "droplets", id]) => {
            let state = shared.state.lock().expect("state");
            match id
                .parse::<u64>()
                .ok()
                .and_then(|id| state.droplets.get(&id))
            {
                Some(d) => {
                    Answer::json(StatusCode::OK, json!({"droplet": droplet_json(&state, d)}))
                }
                None => not_found(),
            }
        }
        ("DELETE", ["", "v2", "droplets", id]) => {
            let removed = {
                let mut state = shared.state.lock().expect("state");
                match id.parse::<u64>().ok() {
                    Some(id) if remove_droplet(&mut state, id) => Some(state.booted.remove(&id)),
                    _ => None,
                }
            };
            match removed {
                Some(node) => {
                    drop(node);
                    Answer::no_content()
                }
                None => not_found(),
            }
        }
        ("POST", ["", "v2", "tags"]) => create_tag(shared, body),
        ("GET", ["", "v2", "firewalls"]) => {
            let firewalls = shared.state.lock().expect("state").firewalls.clone();
            page(shared, "/v2/firewalls", "firewalls", firewalls, query)
        }
        ("POST", ["", "v2", "firewalls"]) => create_firewall(shared, body),
        // Source: DigitalOcean OpenAPI, firewalls_get, firewalls_delete, vpcs_get, vpcs_delete
        // and vpcs_list_members (404 `not_found` for an id that does not exist).
        ("GET", ["", "v2", "firewalls", id]) => {
            let state = shared.state.lock().expect("state");
            match state.firewalls.iter().find(|f| f["id"] == *id) {
                Some(firewall) => Answer::json(StatusCode::OK, json!({"firewall": firewall})),
                None => not_found(),
            }
        }
        ("GET", ["", "v2", "vpcs"]) => {
            let vpcs: Vec<Value> = shared
                .state
                .lock()
                .expect("state")
                .vpcs
                .iter()
                .map(vpc_json)
                .collect();
            page(shared, "/v2/vpcs", "vpcs", vpcs, query)
        }
        ("POST", ["", "v2", "vpcs"]) => create_vpc(shared, body),
        ("GET", ["", "v2", "vpcs", id]) => {
            let state = shared.state.lock().expect("state");
            match state.vpcs.iter().find(|v| v.id == *id) {
                Some(vpc) => Answer::json(StatusCode::OK, json!({"vpc": vpc_json(vpc)})),
                None => not_found(),
            }
        }
        ("DELETE", ["", "v2", "vpcs", id]) => {
            let mut state = shared.state.lock().expect("state");
            let Some(vpc) = state.vpcs.iter().find(|v| v.id == *id).cloned() else {
                return not_found();
            };
            // Source: DigitalOcean OpenAPI, vpcs_delete ("Attempting to delete a region's
            // default VPC or a VPC that still has members will result in a 403 Forbidden").
            if vpc.default {
                Answer::error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "Cannot delete the default VPC of a region.",
                )
            } else if !members(&state, id).is_empty() {
                Answer::error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "Can not delete VPC with members",
                )
            } else {
                state.vpcs.retain(|v| v.id != *id);
                Answer::no_content()
            }
        }
        ("GET", ["", "v2", "vpcs", id, "members"]) => {
            let list: Vec<Value> = {
                let state = shared.state.lock().expect("state");
                if !state.vpcs.iter().any(|v| v.id == *id) {
                    return not_found();
                }
                members(&state, id)
                    .into_iter()
                    .filter(|m| {
                        param("resource_type").is_none_or(|t| {
                            m["urn"]
                                .as_str()
                                .is_some_and(|u| u.starts_with(&format!("do:{t}:")))
                        })
                    })
                    .collect()
            };
            page(
                shared,
                &format!("/v2/vpcs/{id}/members"),
                "members",
                list,
                query,
            )
        }
        ("DELETE", ["", "v2", "firewalls", id]) => {
            let mut state = shared.state.lock().expect("state");
            let before = state.firewalls.len();
            state.firewalls.retain(|f| f["id"] != *id);
            if state.firewalls.len() < before {
                Answer::no_content()
            } else {
                not_found()
            }
        }
        // Anything else: 404 `not_found`, as the API answers an unknown path.
        _ => not_found(),
    }
}

fn not_found() -> Answer {
    Answer::error(
        StatusCode::NOT_FOUND,
        "not_found",
        "The resource you were accessing could not be found.",
    )
}

/// One page of `items` with `links.pages` and `meta.total`, as the API pages.
fn page(
    shared: &Arc<Shared>,
    path: &str,
    key: &str,
    items: Vec<Value>,
    query: &[(String, String)],
) -> Answer {
    let number = |name: &str, default: usize| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let cap = shared.state.lock().expect("state").max_per_page;
    // Source: DigitalOcean OpenAPI, `per_page` (default 20, maximum 200) and `page`
    // (default 1). A larger `per_page` is served 200 items, not refused, as the real API
    // does (digitalocean/api-v2#43, petems/tugboat#205: "The maximum number of results per
    // page is 200"); the contract check records it as a violation. `cap` is a test hook
    // (`set_max_per_page`).
    let per_page = number("per_page", 20).clamp(1, 200).min(cap);
    let page = number("page", 1).max(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let slice: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let link = |p: usize| format!("{}{path}?page={p}&per_page={per_page}", shared.base);
    let mut pages = serde_json::Map::new();
    if page > 1 {
        pages.insert("first".into(), json!(link(1)));
        pages.insert("prev".into(), json!(link(page - 1)));
    }
    if page < last {
        pages.insert("next".into(), json!(link(page + 1)));
        pages.insert("last".into(), json!(link(last)));
    }
    let mut body = json!({"links": {"pages": pages}, "meta": {"total": total}});
    body[key] = Value::Array(slice);
    Answer::json(StatusCode::OK, body)
}

/// `POST /v2/droplets`: checks the body as DigitalOcean does (each rule names its source),
/// creates the droplets (202, `new`) and boots them.
fn create(shared: &Arc<Shared>, body: Option<&Value>) -> Answer {
    let Some(body) = body else {
        // Source: DigitalOcean OpenAPI, droplets_create (a JSON request body). The real status
        // of an unparsable body is not documented for this operation (the spec's
        // `bad_request` example says 400 "error parsing request body" elsewhere).
        return Answer::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable_entity",
            "The request body is not JSON.",
        );
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_string);
    // Source: DigitalOcean OpenAPI, droplets_create body `oneOf` droplet_single_create
    // (`name`, a string) and droplet_multi_create (`names`, strings): one of them, not both.
    let names: Vec<String> = match (body.get("name"), body.get("names")) {
        (Some(Value::String(name)), None) => vec![name.clone()],
        (None, Some(Value::Array(names))) => {
            // Source: DigitalOcean OpenAPI, droplets_create ("Up to ten Droplets may be
            // created this way at a time").
            if names.len() > MULTI_CREATE_LIMIT {
                return unprocessable(&format!(
                    "You may create at most {MULTI_CREATE_LIMIT} Droplets at a time."
                ));
            }
            let mut list = Vec::with_capacity(names.len());
            for name in names {
                let Some(name) = name.as_str() else {
                    return unprocessable("names must be strings.");
                };
                list.push(name.to_string());
            }
            list
        }
        _ => {
            return Answer::error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable_entity",
                "Either name or names must be given.",
            )
        }
    };
    // Source: DigitalOcean OpenAPI, droplet_single_create.name / droplet_multi_create.names
    // items (pattern `^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$`, maxLength 255).
    if let Some(bad) = names.iter().find(|n| !valid_droplet_name(n)) {
        return unprocessable(&format!(
            "Name {bad:?}: only a-z, A-Z, 0-9, . and -, ending in a letter or digit"
        ));
    }
    // Source: DigitalOcean OpenAPI, droplet_create (`size` required). `region` is optional
    // there ("the Droplet may deploy in any region", and a prefix such as `nyc` is allowed):
    // requiring an exact region slug refuses more than the API does; Skyward always sends one.
    let (Some(size_slug), Some(region)) = (text("size"), text("region")) else {
        return Answer::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable_entity",
            "You must specify a size and a region.",
        );
    };
    // Source: DigitalOcean OpenAPI, droplet_create (`image` required, `oneOf` a slug string or
    // an integer id). Whether the image exists is not checked: the stand-in has no images.
    let image = match body.get("image") {
        Some(Value::String(slug)) if !slug.trim().is_empty() => slug.clone(),
        Some(Value::Number(id)) if id.is_u64() => id.to_string(),
        _ => return unprocessable("You specified an invalid image for Droplet creation."),
    };
    // Source: DigitalOcean OpenAPI, droplet_create.user_data (a string, "plain text and may not
    // exceed 64 KiB"); docs/cloud-apis.md#digitalocean (user_data <= 64 KiB).
    let user_data = match body.get("user_data") {
        None | Some(Value::Null) => None,
        Some(Value::String(script)) => Some(script.clone()),
        Some(_) => return unprocessable("user_data must be a string."),
    };
    if user_data.as_ref().is_some_and(|u| u.len() > 64 * 1024) {
        return Answer::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable_entity",
            "user_data must not exceed 64 KiB.",
        );
    }
    // Source: DigitalOcean OpenAPI, droplet_create.tags (a nullable array of strings; new tags
    // are made) and the `tags` schema's name (pattern `^[a-zA-Z0-9_\-\:]+$`, maxLength 255).
    // 422 is this stand-in's choice: the real answer to a bad tag here is not documented.
    let tags: Vec<String> = match body.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            let mut tags = Vec::with_capacity(list.len());
            for tag in list {
                match tag.as_str() {
                    Some(tag) if valid_tag(tag) => tags.push(tag.to_string()),
                    _ => {
                        return unprocessable(&format!(
                            "tag {tag}: only letters, numbers, colons, dashes and underscores"
                        ))
                    }
                }
            }
            tags
        }
        Some(_) => return unprocessable("tags must be an array of strings."),
    };
    // Source: DigitalOcean OpenAPI, droplet_create.vpc_uuid (a string).
    let wanted_vpc = match body.get("vpc_uuid") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return unprocessable("vpc_uuid must be a string."),
    };
    let mut state = shared.state.lock().expect("state");
    // Source: DigitalOcean OpenAPI, account.droplet_limit ("The total number of Droplets
    // current user or team may have active at one time"); the real answer, 422
    // `unprocessable_entity` "creating this/these droplet(s) will exceed your droplet limit",
    // as captured in OpenRouterLabs/spawn#3059.
    if state.droplets.len() + names.len() > DROPLET_LIMIT {
        return unprocessable("creating this/these droplet(s) will exceed your droplet limit");
    }
    // Source: docs/cloud-apis.md#digitalocean (create of an unknown size answers 422).
    let Some(size) = state
        .sizes
        .iter()
        .find(|s| s["slug"] == size_slug.as_str())
        .cloned()
    else {
        return Answer::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable_entity",
            "You specified an invalid size for Droplet creation.",
        );
    };
    // Source: docs/cloud-apis.md#digitalocean (422 "Size is not available in this region.");
    // DigitalOcean OpenAPI, size.regions, size.available ("whether new Droplets can be created
    // with this size") and region.available ("whether new Droplets can be created in this
    // region"). `unavailable` is a test hook (`make_unavailable`).
    let listed = size["regions"]
        .as_array()
        .is_some_and(|r| r.iter().any(|r| r == region.as_str()));
    let region_closed = state
        .regions
        .iter()
        .any(|r| r["slug"] == region.as_str() && r["available"] == json!(false));
    if !listed
        || size["available"] == json!(false)
        || region_closed
        || state
            .unavailable
            .contains(&(size_slug.clone(), region.clone()))
    {
        return Answer::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable_entity",
            "Size is not available in this region.",
        );
    }
    let gpu = size.get("gpu_info").is_some();
    // Source: DigitalOcean OpenAPI, droplet_create.vpc_uuid (without it, "the Droplet will be
    // assigned to your account's default VPC for the region") and vpc_create.region (a VPC
    // belongs to one region). The 422 for a VPC that does not exist or is elsewhere is this
    // stand-in's reading; the real wording is not documented.
    let vpc_uuid = match wanted_vpc {
        None => region_default_vpc(&mut state, &region),
        Some(id) => match state.vpcs.iter().find(|v| v.id == id) {
            None => return unprocessable("The VPC does not exist."),
            Some(vpc) if vpc.region != region => {
                return unprocessable("The VPC is not in the region of the Droplet.")
            }
            Some(vpc) => vpc.id.clone(),
        },
    };
    // Creating a droplet creates its tags.
    state.tags.extend(tags.iter().cloned());
    let mut created = Vec::new();
    for name in names {
        let id = state.next_id;
        state.next_id += 1;
        let droplet = Droplet {
            info: DropletInfo {
                id,
                name: name.clone(),
                size: size_slug.clone(),
                region: region.clone(),
                image: image.clone(),
                tags: tags.clone(),
                user_data: user_data.clone(),
                status: "new".into(),
                gpu,
                vpc_uuid: vpc_uuid.clone(),
            },
            created: Instant::now(),
            forced: None,
        };
        created.push(droplet_json(&state, &droplet));
        state.droplets.insert(id, droplet);
        if let (true, Some(script)) = (state.boot, user_data.clone()) {
            let isolated = state.boot_isolated;
            boot(shared.clone(), id, format!("{name}-{id}"), script, isolated);
        }
    }
    let actions: Vec<Value> = created
        .iter()
        .map(|d| {
            let action = d["id"].as_u64().unwrap_or(0) + 1_000_000;
            json!({"id": action, "rel": "create", "href": format!("{}/v2/actions/{action}", shared.base)})
        })
        .collect();
    let body = if body.get("names").is_some() {
        json!({"droplets": created, "links": {"actions": actions}})
    } else {
        json!({"droplet": created[0], "links": {"actions": actions}})
    };
    Answer::json(StatusCode::ACCEPTED, body)
}

fn unprocessable(message: &str) -> Answer {
    Answer::error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable_entity",
        message,
    )
}

/// Whether `name` is a droplet name the spec allows (`^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$`,
/// at most 255 characters).
fn valid_droplet_name(name: &str) -> bool {
    name.len() <= NAME_LIMIT
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// Whether `name` is a tag name the spec allows (`^[a-zA-Z0-9_\-\:]+$`, at most 255
/// characters).
fn valid_tag(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_LIMIT
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b))
}

/// `POST /v2/tags`: 201 with the tag, also when it exists already.
fn create_tag(shared: &Arc<Shared>, body: Option<&Value>) -> Answer {
    // Source: DigitalOcean OpenAPI, tags_create (body `tags`, whose `name` is the one field
    // given). The real status of a body without one is not documented.
    let Some(name) = body.and_then(|b| b.get("name")).and_then(Value::as_str) else {
        return unprocessable("name is required");
    };
    // Source: DigitalOcean OpenAPI, `tags` schema's name (pattern `^[a-zA-Z0-9_\-\:]+$`,
    // maxLength 255) and tags_create's 400 `tags_bad_request` (`error_with_root_causes`).
    if !valid_tag(name) {
        // This operation's errors have a shape of their own.
        return Answer::json(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("Error validating resource tag: \"tag-name {name:?} contains invalid characters\""),
                "messages": null, "root_causes": []}),
        );
    }
    shared
        .state
        .lock()
        .expect("state")
        .tags
        .insert(name.to_string());
    let none = json!({"count": 0});
    Answer::json(
        StatusCode::CREATED,
        json!({"tag": {"name": name, "resources": {"count": 0, "droplets": none,
            "images": none, "volumes": none, "volume_snapshots": none, "databases": none}}}),
    )
}

/// Whether `ports` is what a rule may say: one port, a range, or every port (`0`, `all`).
fn valid_ports(ports: &str) -> bool {
    let port = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
    match ports.split_once('-') {
        _ if ports == "0" || ports == "all" => true,
        Some((low, high)) => {
            port(low) && port(high) && low.parse::<u16>().ok() <= high.parse::<u16>().ok()
        }
        None => port(ports),
    }
}

/// Whether `address` is an IP address or a CIDR block.
fn valid_address(address: &str) -> bool {
    match address.split_once('/') {
        None => address.parse::<IpAddr>().is_ok(),
        Some((ip, bits)) => match (ip.parse::<IpAddr>(), bits.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(bits)) => bits <= 32,
            (Ok(IpAddr::V6(_)), Ok(bits)) => bits <= 128,
            _ => false,
        },
    }
}

/// `POST /v2/firewalls`: checks the name (pattern, unique in the account), the rules
/// (protocol, ports, addresses; at least one rule) and that every tag named exists; 202 with
/// the firewall `waiting`, listed `succeeded` from then on.
fn create_firewall(shared: &Arc<Shared>, body: Option<&Value>) -> Answer {
    let Some(body) = body else {
        return unprocessable("The request body is not JSON.");
    };
    let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
    // Source: DigitalOcean OpenAPI, firewalls_create (`name` required) and firewall.name
    // (pattern `^[a-zA-Z0-9][a-zA-Z0-9\.-]+$`).
    let name_valid = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if !name_valid {
        return unprocessable("name must begin with an alphanumeric character and hold only alphanumerics, '.' and '-'");
    }
    let rules = |key: &str| -> Vec<Value> {
        body.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (mut inbound, mut outbound) = (rules("inbound_rules"), rules("outbound_rules"));
    // Source: DigitalOcean OpenAPI, firewalls_create ("The request must contain at least one
    // inbound or outbound access rule"; its 400 is the spec's `bad_request`).
    if inbound.is_empty() && outbound.is_empty() {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "must contain at least one inbound or outbound access rule",
        );
    }
    let mut named_tags: Vec<String> = body
        .get("tags")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (rules, target) in [(&mut inbound, "sources"), (&mut outbound, "destinations")] {
        for rule in rules.iter_mut() {
            // Source: DigitalOcean OpenAPI, firewall_rule_base (`protocol` required, enum tcp,
            // udp, icmp; `ports` required: one port, a range, or "0" for all).
            let protocol = rule["protocol"].as_str().unwrap_or_default();
            if !["tcp", "udp", "icmp"].contains(&protocol) {
                return unprocessable("protocol must be tcp, udp or icmp");
            }
            let ports = rule["ports"].as_str().unwrap_or_default().to_string();
            if protocol == "icmp" || ports == "all" {
                rule["ports"] = json!("0");
            } else if !valid_ports(&ports) {
                return unprocessable(&format!("invalid ports {ports:?}"));
            }
            // Source: DigitalOcean OpenAPI, firewall_rules (inbound rules require `sources`,
            // outbound ones `destinations`); firewall_rule_target.addresses (IPv4/IPv6
            // addresses and CIDRs).
            let Some(where_) = rule.get(target).and_then(Value::as_object) else {
                return unprocessable(&format!("every rule needs its {target}"));
            };
            let list = |key: &str| -> Vec<String> {
                where_
                    .get(key)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            if let Some(bad) = list("addresses").iter().find(|a| !valid_address(a)) {
                return unprocessable(&format!("invalid address {bad:?}"));
            }
            named_tags.extend(list("tags"));
            // No vendor source: a rule whose target names nothing is refused here (the spec
            // does not say what the API does with one); Skyward never sends one.
            let targets = [
                "addresses",
                "tags",
                "droplet_ids",
                "load_balancer_uids",
                "kubernetes_ids",
            ];
            if !targets.iter().any(|k| {
                where_
                    .get(*k)
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
            }) {
                return unprocessable(&format!("a rule's {target} name nothing"));
            }
        }
    }
    let mut state = shared.state.lock().expect("state");
    // Source: DigitalOcean OpenAPI, existing_tags_array ("Tag names must exist in order to be
    // referenced in a request"), for the firewall's `tags` and its rules' `tags`.
    if let Some(missing) = named_tags.iter().find(|t| !state.tags.contains(*t)) {
        return unprocessable(&format!("tag {missing} does not exist"));
    }
    // Firewall names unique in the account, 409 `conflict` "duplicate name": the provider
    // module's account of the API (providers/src/digitalocean.rs); the spec does
    // not say so.
    if state.firewalls.iter().any(|f| f["name"] == name) {
        return Answer::error(StatusCode::CONFLICT, "conflict", "duplicate name");
    }
    let id = format!("fb6045f1-cf1d-4ca3-bfac-{:012x}", state.next_firewall);
    state.next_firewall += 1;
    let droplet_ids: Vec<u64> = body
        .get("droplet_ids")
        .and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let mut firewall = json!({
        "id": id,
        "name": name,
        "status": "succeeded",
        "created_at": "2026-03-02T10:20:30Z",
        "pending_changes": [],
        "droplet_ids": droplet_ids,
        "tags": body.get("tags").cloned().unwrap_or(json!([])),
        "inbound_rules": inbound,
        "outbound_rules": outbound,
    });
    state.firewalls.push(firewall.clone());
    firewall["status"] = json!("waiting");
    Answer::json(StatusCode::ACCEPTED, json!({"firewall": firewall}))
}

/// Runs the droplet's user-data as its first boot (in a namespace of its own when
/// `isolated`), off the async threads; a droplet deleted meanwhile has its node destroyed as
/// soon as the boot returns.
fn boot(shared: Arc<Shared>, id: u64, dir_name: String, user_data: String, isolated: bool) {
    let root = shared.boot_root.clone();
    tokio::spawn(async move {
        let booted = tokio::task::spawn_blocking(move || {
            if isolated {
                BootedNode::boot_isolated(&root, &dir_name, &user_data)
            } else {
                BootedNode::boot(&root, &dir_name, &user_data)
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("boot panicked: {e}")));
        let mut state = shared.state.lock().expect("state");
        match booted {
            Ok(node) if state.droplets.contains_key(&id) => {
                state.booted.insert(id, node);
            }
            // Deleted while booting: dropping the node destroys it.
            Ok(node) => drop(node),
            Err(e) => state.boot_errors.push(format!("droplet {id}: {e}")),
        }
    });
}

/// A droplet in the API's full shape.
fn droplet_json(state: &Inner, droplet: &Droplet) -> Value {
    let info = &droplet.info;
    let size = state
        .sizes
        .iter()
        .find(|s| s["slug"] == info.size.as_str())
        .cloned()
        .unwrap_or_else(|| size(&info.size, 1, 1024, 25, 0.00893, 6.0, "Basic", &[]));
    let region = state
        .regions
        .iter()
        .find(|r| r["slug"] == info.region.as_str())
        .cloned()
        .unwrap_or_else(|| {
            json!({"name": info.region, "slug": info.region, "features": [], "available": true, "sizes": []})
        });
    let status = status_of(droplet, state.active_after);
    // Addresses come with the boot; private first, as the real API lists them. The public
    // one is the namespace address of a droplet booted isolated, and there is none
    // otherwise: a test's coordinator must never dial an address made up here.
    let mut v4 = Vec::new();
    if status != "new" {
        let range = state
            .vpcs
            .iter()
            .find(|v| v.id == info.vpc_uuid)
            .map(|v| v.ip_range.as_str())
            .unwrap_or("10.116.0.0/20");
        let (network, bits) = parse_cidr(range).unwrap_or((0x0a74_0000, 20));
        let ip = std::net::Ipv4Addr::from(network + (info.id % 250) as u32 + 2);
        let netmask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0));
        v4.push(json!({"ip_address": ip.to_string(), "netmask": netmask.to_string(), "gateway": "nil", "type": "private"}));
        if let Some(ip) = state.booted.get(&info.id).and_then(BootedNode::address) {
            // The namespace is a /30 whose other end is the host side of its link.
            let gateway = std::net::Ipv4Addr::from(u32::from(ip) - 1);
            v4.push(
                json!({"ip_address": ip.to_string(), "netmask": "255.255.255.252",
                "gateway": gateway.to_string(), "type": "public"}),
            );
        }
    }
    let image_regions: Vec<&str> = IMAGE_REGIONS
        .iter()
        .copied()
        .filter(|r| *r == info.region)
        .collect();
    let mut value = json!({
        "id": info.id,
        "name": info.name,
        "memory": size["memory"],
        "vcpus": size["vcpus"],
        "disk": size["disk"],
        "disk_info": size["disk_info"],
        "locked": false,
        "status": status,
        "kernel": null,
        "created_at": "2026-03-02T10:20:30Z",
        "features": ["droplet_agent", "private_networking"],
        "backup_ids": [],
        "next_backup_window": null,
        "snapshot_ids": [],
        "image": {
            "id": 191457505,
            "name": format!("{} image", info.image),
            "distribution": "Ubuntu",
            "slug": info.image,
            "public": true,
            "regions": image_regions,
            "created_at": "2025-10-01T12:00:00Z",
            "min_disk_size": 25,
            "type": "base",
            "size_gigabytes": 2.36,
            "description": "Base image",
            "tags": [],
            "status": "available",
        },
        "volume_ids": [],
        "size": size,
        "size_slug": info.size,
        "networks": {"v4": v4, "v6": []},
        "region": region,
        "tags": info.tags,
        "vpc_uuid": info.vpc_uuid,
    });
    if let Some(gpu) = size.get("gpu_info") {
        value["gpu_info"] = gpu.clone();
    }
    value
}

/// A VPC in the API's shape.
fn vpc_json(vpc: &VpcInfo) -> Value {
    json!({
        "id": vpc.id,
        "urn": format!("do:vpc:{}", vpc.id),
        "name": vpc.name,
        "description": vpc.description,
        "region": vpc.region,
        "ip_range": vpc.ip_range,
        "default": vpc.default,
        "created_at": "2026-03-02T10:20:30Z",
    })
}

/// An IPv4 CIDR block as its network address and prefix length, if it is one and its
/// address is the network's.
fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (ip, bits) = cidr.split_once('/')?;
    let ip = u32::from(ip.parse::<std::net::Ipv4Addr>().ok()?);
    let bits: u32 = bits.parse().ok().filter(|b| *b <= 32)?;
    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
    (ip & mask == ip).then_some((ip, bits))
}

/// Whether two CIDR blocks share an address.
fn overlap(a: (u32, u32), b: (u32, u32)) -> bool {
    let end = |(ip, bits): (u32, u32)| ip as u64 + (1u64 << (32 - bits)) - 1;
    (a.0 as u64) <= end(b) && (b.0 as u64) <= end(a)
}

/// Whether a block is within the private ranges of RFC 1918.
fn private(block: (u32, u32)) -> bool {
    [(0x0a00_0000, 8), (0xac10_0000, 12), (0xc0a8_0000, 16)]
        .iter()
        .any(|&(net, bits)| {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            block.1 >= bits && block.0 & mask == net
        })
}

/// `POST /v2/vpcs`: a name in the spec's pattern and unique in the account (422 otherwise),
/// a known region, an `ip_range` that is private, /16 to /28 and overlaps no other VPC's
/// (picked when not given); 201 with the VPC. The first VPC of a region without one is its
/// default.
fn create_vpc(shared: &Arc<Shared>, body: Option<&Value>) -> Answer {
    let Some(body) = body else {
        return unprocessable("The request body is not JSON.");
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str).unwrap_or_default();
    let (name, region) = (text("name"), text("region"));
    // Source: DigitalOcean OpenAPI, vpcs_create (`name`, `region` required) and
    // vpc_updatable.name (pattern `^[a-zA-Z0-9\-\.]+$`).
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return unprocessable("name may only contain alphanumeric characters, dashes, and periods");
    }
    let description = text("description");
    // Source: DigitalOcean OpenAPI, vpc_updatable.description (maxLength 255).
    if description.chars().count() > 255 {
        return unprocessable("description may be at most 255 characters");
    }
    let mut state = shared.state.lock().expect("state");
    // Source: DigitalOcean OpenAPI, vpc_create.region ("The slug identifier for the region").
    if !state.regions.iter().any(|r| r["slug"] == region) {
        return unprocessable("region is not a valid region");
    }
    // Source: DigitalOcean OpenAPI, vpc_updatable.name ("Must be unique"). Comparing without
    // regard to case is this stand-in's reading; the spec does not say.
    if state.vpcs.iter().any(|v| v.name.eq_ignore_ascii_case(name)) {
        return unprocessable("A VPC with this name already exists.");
    }
    let taken: Vec<(u32, u32)> = state
        .vpcs
        .iter()
        .filter_map(|v| parse_cidr(&v.ip_range))
        .collect();
    // Source: DigitalOcean OpenAPI, vpc_create.ip_range (RFC 1918, no smaller than /28 nor
    // larger than /16, overlapping no other network of the account; a /20 is picked when
    // none is given), a string.
    if body
        .get("ip_range")
        .is_some_and(|r| !r.is_string() && !r.is_null())
    {
        return unprocessable("ip_range must be a string in CIDR notation");
    }
    let ip_range = match body.get("ip_range").and_then(Value::as_str) {
        Some(range) => {
            let Some(block) = parse_cidr(range).filter(|b| (16..=28).contains(&b.1) && private(*b))
            else {
                return unprocessable("ip_range must be a private network from /16 to /28");
            };
            if taken.iter().any(|t| overlap(*t, block)) {
                return unprocessable("ip_range overlaps another VPC network of the account");
            }
            range.to_string()
        }
        None => {
            let Some(block) = (0..4096u32)
                .map(|k| (0x0a6e_0000 + (k << 12), 20))
                .find(|b| !taken.iter().any(|t| overlap(*t, *b)))
            else {
                return unprocessable("no free IP range left");
            };
            format!("{}/20", std::net::Ipv4Addr::from(block.0))
        }
    };
    let default = !state.vpcs.iter().any(|v| v.default && v.region == region);
    let vpc = VpcInfo {
        id: format!("5a4981aa-9653-4bd1-bef5-{:012x}", state.next_vpc),
        name: name.to_string(),
        description: description.to_string(),
        region: region.to_string(),
        ip_range,
        default,
    };
    state.next_vpc += 1;
    state.vpcs.push(vpc.clone());
    Answer::json(StatusCode::CREATED, json!({"vpc": vpc_json(&vpc)}))
}

/// The default VPC of `region`, made (`default-<region>`) if it has none, as DigitalOcean
/// does for a region's first resource.
fn region_default_vpc(state: &mut Inner, region: &str) -> String {
    if let Some(vpc) = state.vpcs.iter().find(|v| v.default && v.region == region) {
        return vpc.id.clone();
    }
    let taken: Vec<(u32, u32)> = state
        .vpcs
        .iter()
        .filter_map(|v| parse_cidr(&v.ip_range))
        .collect();
    let block = (0..4096u32)
        .map(|k| (0x0a6e_0000 + (k << 12), 20))
        .find(|b| !taken.iter().any(|t| overlap(*t, *b)))
        .unwrap_or((0x0a74_0000, 20));
    let vpc = VpcInfo {
        id: format!("5a4981aa-9653-4bd1-bef5-{:012x}", state.next_vpc),
        name: format!("default-{region}"),
        description: String::new(),
        region: region.to_string(),
        ip_range: format!("{}/20", std::net::Ipv4Addr::from(block.0)),
        default: true,
    };
    state.next_vpc += 1;
    let id = vpc.id.clone();
    state.vpcs.push(vpc);
    id
}

/// Removes a droplet; it stays a member of its VPC for the configured linger. Whether it
/// existed.
fn remove_droplet(state: &mut Inner, id: u64) -> bool {
    let Some(droplet) = state.droplets.remove(&id) else {
        return false;
    };
    if !state.member_linger.is_zero() {
        state.lingering.push(Lingering {
            vpc_uuid: droplet.info.vpc_uuid,
            id,
            name: droplet.info.name,
            until: Instant::now() + state.member_linger,
        });
    }
    true
}

/// The members of a VPC in the API's shape: its droplets, and deleted ones still lingering.
fn members(state: &Inner, vpc_uuid: &str) -> Vec<Value> {
    let now = Instant::now();
    let member = |id: u64, name: &str| json!({"urn": format!("do:droplet:{id}"), "name": name, "created_at": "2026-03-02T10:20:30Z"});
    state
        .droplets
        .values()
        .filter(|d| d.info.vpc_uuid == vpc_uuid)
        .map(|d| member(d.info.id, &d.info.name))
        .chain(
            state
                .lingering
                .iter()
                .filter(|l| l.vpc_uuid == vpc_uuid && l.until > now)
                .map(|l| member(l.id, &l.name)),
        )
        .collect()
}
