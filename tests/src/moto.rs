//! EC2 for tests: `moto_server` (moto from PyPI, installed by scripts/test.sh) on a free
//! loopback port with its realism flags on, a fault-injecting proxy in front of it for what
//! moto cannot do (capacity errors, throttling), and a "hypervisor" that boots every instance
//! moto starts from its user-data, read back through the EC2 API as a node would get it.
//!
//! moto has no placement groups: a front of ours answers those calls itself, in EC2's shapes,
//! and passes everything else to moto, so every test's EC2 (`Moto::url`) has them.
//!
//! moto gives instances random public IPs, which tests must never send traffic to: through
//! the proxy an instance has no public address until the hypervisor has booted it in a
//! network namespace of its own (`set_boot_isolated`), and then that namespace's address.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, InstanceAttributeName};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::node::BootedNode;

/// Where scripts/test.sh installs moto, unless SKYWARD_MOTO_SERVER says otherwise.
const DEFAULT_MOTO: &str = "/var/tmp/skyward-tools/moto/bin/moto_server";

pub struct Moto {
    child: Child,
    /// EC2 for tests: moto behind the placement-group front.
    pub url: String,
    front: PlacementGroups,
    stop_front: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Moto {
    /// Starts a fresh moto server (fresh state) on a free loopback port.
    pub fn start() -> Moto {
        let server =
            std::env::var("SKYWARD_MOTO_SERVER").unwrap_or_else(|_| DEFAULT_MOTO.to_string());
        assert!(
            Path::new(&server).is_file(),
            "{server} is missing: scripts/test.sh installs moto (pip install 'moto[server]' in a venv)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
            .env("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let front = PlacementGroups::default();
        let (front_url, stop_front) = serve_front(front.clone(), url);
        Moto {
            child,
            url: front_url,
            front,
            stop_front: Some(stop_front),
        }
    }

    /// The placement groups that exist now, in every region.
    pub fn placement_groups(&self) -> Vec<PlacementGroup> {
        self.front.0.lock().unwrap().clone()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_front.take() {
            let _ = stop.send(());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Static fake credentials for moto, for every test in this process.
pub fn fake_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: set once, before any test thread of this process reads these variables.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
    });
}

/// An EC2 client for the test itself (to look at what the provider did), in us-east-1.
pub async fn client(url: &str) -> aws_sdk_ec2::Client {
    client_in(url, "us-east-1").await
}

/// The same in another region.
pub async fn client_in(url: &str, region: &str) -> aws_sdk_ec2::Client {
    fake_credentials();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(url)
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}

/// A fault to answer instead of moto.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next `count` CreateFleet calls report this EC2 error code in the fleet's errors,
    /// as instant fleets do for capacity problems.
    FleetError { code: String, count: usize },
    /// The next `count` calls of `action` get EC2's throttling error (HTTP 503).
    Throttle { action: String, count: usize },
    /// The next `count` calls of `action` are refused as a user without that permission
    /// is (`UnauthorizedOperation`, HTTP 403).
    Unauthorized { action: String, count: usize },
}

/// The public address of each instance booted isolated (its namespace's), by instance id;
/// every other instance has none.
#[derive(Clone, Default)]
pub struct PublicAddresses(Arc<Mutex<HashMap<String, Ipv4Addr>>>);

impl PublicAddresses {
    pub fn get(&self, instance_id: &str) -> Option<Ipv4Addr> {
        self.0.lock().unwrap().get(instance_id).copied()
    }

    fn snapshot(&self) -> HashMap<String, Ipv4Addr> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct ProxyState {
    faults: Vec<Fault>,
    /// Every action seen, in order, with its form.
    actions: Vec<(String, String)>,
    /// What the proxy reports as instances' public addresses.
    public: PublicAddresses,
}

/// A proxy in front of moto that injects faults.
pub struct FaultProxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(moto_url: &str) -> FaultProxy {
        skyward_common::install_crypto_provider();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let upstream = moto_url.to_string();
        let shared = (state.clone(), reqwest::Client::new(), upstream);
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::new(shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr: SocketAddr = listener.local_addr().expect("proxy address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            url: format!("http://{addr}"),
            state,
            _task: task,
        }
    }

    /// Reports the namespace addresses of the instances `hypervisor` boots isolated as their
    /// public addresses (no instance has one otherwise).
    pub fn report_public_addresses_of(&self, hypervisor: &Hypervisor) {
        self.state.lock().unwrap().public = hypervisor.public.clone();
    }

    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push(fault);
    }

    /// How many times `action` was called.
    pub fn calls(&self, action: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .actions
            .iter()
            .filter(|(a, _)| a == action)
            .count()
    }

    /// The form of each call of `action`, in order (`Key=Value&...`, URL-encoded).
    pub fn forms(&self, action: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .actions
            .iter()
            .filter(|(a, _)| a == action)
            .map(|(_, form)| form.clone())
            .collect()
    }
}

type Shared = Arc<(Arc<Mutex<ProxyState>>, reqwest::Client, String)>;

async fn forward(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (state, http, upstream) = (&shared.0, &shared.1, &shared.2);
    let form = String::from_utf8_lossy(&body).into_owned();
    let action = form
        .split('&')
        .chain(uri.query().unwrap_or_default().split('&'))
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or_default()
        .to_string();
    let (fault, public) = {
        let mut state = state.lock().unwrap();
        state.actions.push((action.clone(), form.clone()));
        let hit = state.faults.iter_mut().find(|f| match f {
            Fault::FleetError { count, .. } => action == "CreateFleet" && *count > 0,
            Fault::Throttle { action: a, count } | Fault::Unauthorized { action: a, count } => {
                *a == action && *count > 0
            }
        });
        let fault = hit.map(|f| {
            match f {
                Fault::FleetError { count, .. }
                | Fault::Throttle { count, .. }
                | Fault::Unauthorized { count, .. } => *count -= 1,
            }
            f.clone()
        });
        (fault, state.public.clone())
    };
    match fault {
        Some(Fault::FleetError { code, .. }) => (
            StatusCode::OK,
            [("content-type", "text/xml")],
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CreateFleetResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>fault-0001</requestId><fleetId>fleet-fault</fleetId><errorSet><item><errorCode>{code}</errorCode><errorMessage>We currently do not have sufficient capacity in the Availability Zone you requested.</errorMessage><lifecycle>spot</lifecycle></item></errorSet><fleetInstanceSet/></CreateFleetResponse>"
            ),
        )
            .into_response(),
        Some(Fault::Throttle { .. }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/xml")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>fault-0002</RequestID></Response>".to_string(),
        )
            .into_response(),
        Some(Fault::Unauthorized { action, .. }) => (
            StatusCode::FORBIDDEN,
            [("content-type", "text/xml")],
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation. User: arn:aws:iam::123456789012:user/skyward is not authorized to perform: ec2:{action}</Message></Error></Errors><RequestID>fault-0003</RequestID></Response>"),
        )
            .into_response(),
        None => {
            pass_on(http, upstream, method, &uri, &headers, body, |bytes| {
                match std::str::from_utf8(&bytes) {
                    Ok(xml) if xml.contains("<instancesSet>") => {
                        Bytes::from(rewrite_public_addresses(xml, &public.snapshot()))
                    }
                    _ => bytes,
                }
            })
            .await
        }
    }
}

/// Sends the request on to `upstream` and its answer back, the body through `rewrite`.
async fn pass_on(
    http: &reqwest::Client,
    upstream: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    rewrite: impl FnOnce(Bytes) -> Bytes,
) -> Response {
    let target = format!(
        "{upstream}{}",
        uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let mut request = http.request(method, target).body(body.to_vec());
    for (name, value) in headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(reply) => {
            let status =
                StatusCode::from_u16(reply.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = reply
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/xml")
                .to_string();
            let bytes = reply.bytes().await.unwrap_or_default();
            (status, [("content-type", content_type)], rewrite(bytes)).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// A placement group as EC2 keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementGroup {
    pub region: String,
    pub name: String,
    pub id: String,
    pub strategy: String,
    pub tags: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct PlacementGroups(Arc<Mutex<Vec<PlacementGroup>>>);

type FrontState = Arc<(PlacementGroups, reqwest::Client, String)>;

/// Serves the front on a loopback port of its own thread (moto's users may be sync tests).
fn serve_front(
    groups: PlacementGroups,
    moto_url: String,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    skyward_common::install_crypto_provider();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the moto front");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the moto front");
            let _ = address_tx.send(listener.local_addr().expect("front address"));
            let state: FrontState = Arc::new((groups, reqwest::Client::new(), moto_url));
            let app = axum::Router::new().fallback(front).with_state(state);
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
    });
    let address: SocketAddr = address_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the moto front starts");
    (format!("http://{address}"), stop)
}

async fn front(
    State(state): State<FrontState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (groups, http, upstream) = (&state.0, &state.1, &state.2);
    let form: Vec<(String, String)> = reqwest::Url::parse(&format!(
        "http://form/?{}&{}",
        String::from_utf8_lossy(&body),
        uri.query().unwrap_or_default()
    ))
    .map(|url| url.query_pairs().into_owned().collect())
    .unwrap_or_default();
    let get = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    // The region is the SigV4 credential scope's: `Credential=KEY/DATE/REGION/ec2/...`.
    let region = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| auth.split("Credential=").nth(1))
        .and_then(|scope| scope.split('/').nth(2))
        .unwrap_or("us-east-1")
        .to_string();
    let action = get("Action").unwrap_or_default();
    let mut groups = groups.0.lock().unwrap();
    match action.as_str() {
        "CreatePlacementGroup" => {
            let name = get("GroupName").unwrap_or_default();
            let strategy = get("Strategy").unwrap_or_default();
            if !["cluster", "spread", "partition"].contains(&strategy.as_str()) {
                return ec2_error(
                    "InvalidParameterValue",
                    &format!("Value ({strategy}) for parameter strategy is invalid."),
                );
            }
            if groups.iter().any(|g| g.region == region && g.name == name) {
                return ec2_error(
                    "InvalidPlacementGroup.Duplicate",
                    &format!("The Placement Group '{name}' already exists."),
                );
            }
            let tags = (1..)
                .map_while(|n| {
                    let key = get(&format!("TagSpecification.1.Tag.{n}.Key"))?;
                    Some((
                        key,
                        get(&format!("TagSpecification.1.Tag.{n}.Value")).unwrap_or_default(),
                    ))
                })
                .collect();
            let group = PlacementGroup {
                region,
                id: format!("pg-{:017x}", groups.len() + 1),
                name,
                strategy,
                tags,
            };
            let xml = format!(
                "<CreatePlacementGroupResponse xmlns=\"{EC2_XMLNS}\"><requestId>front-0001</requestId><return>true</return><placementGroup>{}</placementGroup></CreatePlacementGroupResponse>",
                group_xml(&group)
            );
            groups.push(group);
            ec2_ok(xml)
        }
        "DescribePlacementGroups" => {
            let names: Vec<String> = (1..)
                .map_while(|n| get(&format!("GroupName.{n}")))
                .collect();
            let mut filters = Vec::new();
            for n in 1.. {
                let Some(name) = get(&format!("Filter.{n}.Name")) else {
                    break;
                };
                let values: Vec<String> = (1..)
                    .map_while(|m| get(&format!("Filter.{n}.Value.{m}")))
                    .collect();
                if !(name.starts_with("tag:") || name == "group-name" || name == "strategy") {
                    return ec2_error(
                        "InvalidParameterValue",
                        &format!("The filter '{name}' is invalid"),
                    );
                }
                filters.push((name, values));
            }
            let matches = |g: &PlacementGroup| {
                g.region == region
                    && (names.is_empty() || names.contains(&g.name))
                    && filters.iter().all(|(name, values)| {
                        let have: Vec<&str> = match name.strip_prefix("tag:") {
                            Some(key) => g
                                .tags
                                .iter()
                                .filter(|(k, _)| k == key)
                                .map(|(_, v)| v.as_str())
                                .collect(),
                            None if name == "group-name" => vec![g.name.as_str()],
                            None => vec![g.strategy.as_str()],
                        };
                        have.iter().any(|h| values.iter().any(|v| v == h))
                    })
            };
            let items: String = groups
                .iter()
                .filter(|g| matches(g))
                .map(|g| format!("<item>{}</item>", group_xml(g)))
                .collect();
            ec2_ok(format!(
                "<DescribePlacementGroupsResponse xmlns=\"{EC2_XMLNS}\"><requestId>front-0002</requestId><placementGroupSet>{items}</placementGroupSet></DescribePlacementGroupsResponse>"
            ))
        }
        "DeletePlacementGroup" => {
            let name = get("GroupName").unwrap_or_default();
            let before = groups.len();
            groups.retain(|g| !(g.region == region && g.name == name));
            if groups.len() == before {
                return ec2_error(
                    "InvalidPlacementGroup.Unknown",
                    &format!("The Placement Group '{name}' is unknown."),
                );
            }
            ec2_ok(format!(
                "<DeletePlacementGroupResponse xmlns=\"{EC2_XMLNS}\"><requestId>front-0003</requestId><return>true</return></DeletePlacementGroupResponse>"
            ))
        }
        _ => {
            drop(groups);
            pass_on(http, upstream, method, &uri, &headers, body, |b| b).await
        }
    }
}

const EC2_XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

fn group_xml(g: &PlacementGroup) -> String {
    let tags: String = g
        .tags
        .iter()
        .map(|(k, v)| format!("<item><key>{k}</key><value>{v}</value></item>"))
        .collect();
    format!(
        "<groupName>{}</groupName><groupId>{}</groupId><state>available</state><strategy>{}</strategy><tagSet>{tags}</tagSet>",
        g.name, g.id, g.strategy
    )
}

fn ec2_ok(xml: String) -> Response {
    (
        StatusCode::OK,
        [("content-type", "text/xml")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{xml}"),
    )
        .into_response()
}

fn ec2_error(code: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "text/xml")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>front-error</RequestID></Response>"),
    )
        .into_response()
}

/// Boots every instance moto reports running from its user-data (read back through
/// DescribeInstanceAttribute, as a node gets it from the metadata service), and destroys the
/// booted node once the instance is terminated: the part of EC2 that moto leaves out.
pub struct Hypervisor {
    booted: Arc<Mutex<HashMap<String, BootedNode>>>,
    /// Boot each instance in a network namespace of its own (see `set_boot_isolated`).
    isolated: Arc<AtomicBool>,
    public: PublicAddresses,
    task: tokio::task::JoinHandle<()>,
}

impl Hypervisor {
    pub fn start(moto_url: &str, root: PathBuf) -> Hypervisor {
        let booted: Arc<Mutex<HashMap<String, BootedNode>>> = Arc::default();
        let isolated = Arc::new(AtomicBool::new(false));
        let public = PublicAddresses::default();
        let (url, nodes) = (moto_url.to_string(), booted.clone());
        let (isolate, addresses) = (isolated.clone(), public.clone());
        let task = tokio::spawn(async move {
            let ec2 = client(&url).await;
            // A machine whose first boot failed does not boot again.
            let mut failed: HashSet<String> = HashSet::new();
            // Bounded: a test never runs this long.
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                if let Ok(out) = ec2.describe_instances().send().await {
                    for instance in out.reservations().iter().flat_map(|r| r.instances()) {
                        let Some(id) = instance.instance_id().map(str::to_string) else {
                            continue;
                        };
                        let state = instance
                            .state()
                            .and_then(|s| s.name())
                            .map(|n| n.as_str().to_string())
                            .unwrap_or_default();
                        let known = nodes.lock().unwrap().contains_key(&id);
                        if state == "running" && !known && !failed.contains(&id) {
                            let Ok(attr) = ec2
                                .describe_instance_attribute()
                                .instance_id(&id)
                                .attribute(InstanceAttributeName::UserData)
                                .send()
                                .await
                            else {
                                continue;
                            };
                            let Some(encoded) = attr.user_data().and_then(|u| u.value()) else {
                                continue;
                            };
                            let Ok(script) =
                                base64::engine::general_purpose::STANDARD.decode(encoded)
                            else {
                                continue;
                            };
                            let script = String::from_utf8_lossy(&script).into_owned();
                            let (root, name) = (root.clone(), id.clone());
                            let isolated = isolate.load(Ordering::SeqCst);
                            let booting = tokio::task::spawn_blocking(move || {
                                if isolated {
                                    BootedNode::boot_isolated(&root, &name, &script)
                                } else {
                                    BootedNode::boot(&root, &name, &script)
                                }
                            })
                            .await;
                            match booting {
                                Ok(Ok(node)) => {
                                    if let Some(address) = node.address() {
                                        addresses.0.lock().unwrap().insert(id.clone(), address);
                                    }
                                    nodes.lock().unwrap().insert(id, node);
                                }
                                Ok(Err(why)) => {
                                    eprintln!("hypervisor: {id} did not boot: {why}");
                                    failed.insert(id);
                                }
                                Err(_) => {
                                    failed.insert(id);
                                }
                            }
                        } else if matches!(
                            state.as_str(),
                            "shutting-down" | "terminated" | "stopped"
                        ) && known
                        {
                            addresses.0.lock().unwrap().remove(&id);
                            let node = nodes.lock().unwrap().remove(&id);
                            if let Some(node) = node {
                                node.destroy();
                                // Dropping waits for its processes, then removes its network.
                                let _ = tokio::task::spawn_blocking(move || drop(node)).await;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Hypervisor {
            booted,
            isolated,
            public,
            task,
        }
    }

    /// Boots the instances that start from now on each in a network namespace of its own, as
    /// machines with public IPs of their own: the namespace's address, which the proxy
    /// reports as the instance's public IP (see [`FaultProxy::report_public_addresses_of`]).
    /// Needs root.
    pub fn set_boot_isolated(&self, isolated: bool) {
        self.isolated.store(isolated, Ordering::SeqCst);
    }

    /// The namespace address of an instance booted isolated, once it has booted.
    pub fn public_address(&self, instance_id: &str) -> Option<Ipv4Addr> {
        self.public.get(instance_id)
    }

    /// Instances booted and not yet destroyed.
    pub fn running(&self) -> Vec<String> {
        self.booted.lock().unwrap().keys().cloned().collect()
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.task.abort();
        for (_, node) in self.booted.lock().unwrap().drain() {
            node.destroy();
        }
    }
}

/// Rewrites every instance in an EC2 XML response (DescribeInstances, RunInstances): an
/// instance in `public` gets that address as its public IP; every other one has no public IP
/// and no public DNS name, so that nothing can dial one of moto's invented addresses.
pub fn rewrite_public_addresses(xml: &str, public: &HashMap<String, Ipv4Addr>) -> String {
    map_instances(xml, |instance| {
        let id = element_text(instance, "instanceId").unwrap_or_default();
        let remove = |_: &str| String::new();
        let empty_dns = |_: &str| "<dnsName/>".to_string();
        match public.get(id) {
            Some(address) => {
                let ip_address = format!("<ipAddress>{address}</ipAddress>");
                let mut rewritten = map_elements(instance, "ipAddress", |_| ip_address.clone());
                if element_text(&rewritten, "ipAddress").is_none() {
                    rewritten.push_str(&ip_address);
                }
                let rewritten = map_elements(&rewritten, "publicIp", |_| {
                    format!("<publicIp>{address}</publicIp>")
                });
                let rewritten =
                    map_elements(&rewritten, "publicDnsName", |_| "<publicDnsName/>".into());
                map_elements(&rewritten, "dnsName", empty_dns)
            }
            None => {
                let stripped = map_elements(instance, "ipAddress", remove);
                // A network interface's association is its public IP (and DNS name).
                let stripped = map_elements(&stripped, "association", remove);
                map_elements(&stripped, "dnsName", empty_dns)
            }
        }
    })
}

/// Applies `rewrite` to the content of each instance (each top-level `<item>` of every
/// `<instancesSet>`).
fn map_instances(xml: &str, rewrite: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(set) = rest.find("<instancesSet>") {
        let body_start = set + "<instancesSet>".len();
        out.push_str(&rest[..body_start]);
        rest = &rest[body_start..];
        let mut depth = 0usize;
        let mut item_start = 0;
        let mut cursor = 0;
        // Copies everything up to the set's end, rewriting each top-level item's content.
        loop {
            let Some(offset) = rest[cursor..].find('<') else {
                cursor = rest.len();
                break;
            };
            let at = cursor + offset;
            let tail = &rest[at..];
            if tail.starts_with("<item>") {
                if depth == 0 {
                    out.push_str(&rest[cursor..at + "<item>".len()]);
                    item_start = at + "<item>".len();
                }
                depth += 1;
                cursor = at + "<item>".len();
            } else if depth > 0 && tail.starts_with("</item>") {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    out.push_str(&rewrite(&rest[item_start..at]));
                    out.push_str("</item>");
                }
                cursor = at + "</item>".len();
            } else if depth == 0 && tail.starts_with("</instancesSet>") {
                out.push_str(&rest[cursor..at]);
                cursor = at;
                break;
            } else {
                if depth == 0 {
                    out.push_str(&rest[cursor..at + 1]);
                }
                cursor = at + 1;
            }
        }
        rest = &rest[cursor..];
    }
    out.push_str(rest);
    out
}

/// The text of the first `<tag>text</tag>` in `xml`.
fn element_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))?;
    Some(&xml[start..start + end])
}

/// Replaces every `<tag>...</tag>` and `<tag/>` element in `xml` with `replace(element)`.
fn map_elements(xml: &str, tag: &str, replace: impl Fn(&str) -> String) -> String {
    let (open, close, empty) = (format!("<{tag}>"), format!("</{tag}>"), format!("<{tag}/>"));
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    loop {
        let (start, end) = match (rest.find(&open), rest.find(&empty)) {
            (Some(o), e) if e.is_none_or(|e| o < e) => match rest[o..].find(&close) {
                Some(c) => (o, o + c + close.len()),
                None => break,
            },
            (_, Some(e)) => (e, e + empty.len()),
            _ => break,
        };
        out.push_str(&rest[..start]);
        out.push_str(&replace(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A tag filter for DescribeInstances.
pub fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two reservations as moto answers DescribeInstances (trimmed): the first instance was
    /// booted isolated, the second not yet.
    const DESCRIBED: &str = "<DescribeInstancesResponse><reservationSet><item><instancesSet><item><networkInterfaceSet><item><association><ipOwnerId>1</ipOwnerId><publicDnsName>ip-54-214-1-2.ec2.internal</publicDnsName><publicIp>54.214.1.2</publicIp></association><privateIpAddressesSet><item><association><publicIp>54.214.1.2</publicIp></association><primary>true</primary></item></privateIpAddressesSet></item></networkInterfaceSet><instanceId>i-booted</instanceId><dnsName>ec2-54-214-1-2.compute-1.amazonaws.com</dnsName><privateIpAddress>10.0.0.5</privateIpAddress><ipAddress>54.214.1.2</ipAddress></item></instancesSet></item><item><instancesSet><item><networkInterfaceSet><item><association><publicIp>3.3.3.3</publicIp></association></item></networkInterfaceSet><instanceId>i-pending</instanceId><dnsName>ec2-3-3-3-3.compute-1.amazonaws.com</dnsName><privateIpAddress>10.0.0.6</privateIpAddress><ipAddress>3.3.3.3</ipAddress></item></instancesSet></item></reservationSet></DescribeInstancesResponse>";

    #[test]
    fn only_instances_booted_isolated_have_a_public_address_and_it_is_theirs() {
        let public = HashMap::from([("i-booted".to_string(), Ipv4Addr::new(10, 251, 7, 2))]);
        let out = rewrite_public_addresses(DESCRIBED, &public);
        for invented in ["54.214.1.2", "3.3.3.3", "ec2-", "ip-54"] {
            assert!(!out.contains(invented), "{invented} is left in {out}");
        }
        let (booted, pending) = out.split_once("i-pending").unwrap();
        assert_eq!(element_text(booted, "ipAddress"), Some("10.251.7.2"));
        assert_eq!(booted.matches("<publicIp>10.251.7.2</publicIp>").count(), 2);
        assert!(booted.contains("<privateIpAddress>10.0.0.5</privateIpAddress>"));
        assert_eq!(element_text(pending, "ipAddress"), None);
        assert!(!pending.contains("<association>") && !pending.contains("publicIp"));
        assert!(pending.contains("<dnsName/><privateIpAddress>10.0.0.6</privateIpAddress>"));
        // Everything else is left as it was.
        assert_eq!(
            out.matches("<item>").count(),
            DESCRIBED.matches("<item>").count()
        );
        assert!(out.ends_with("</item></reservationSet></DescribeInstancesResponse>"));
    }

    #[test]
    fn without_booted_instances_no_instance_has_a_public_address() {
        let out = rewrite_public_addresses(DESCRIBED, &HashMap::new());
        assert!(!out.contains("<ipAddress>"), "{out}");
        assert!(!out.contains("publicIp"), "{out}");
        assert_eq!(
            rewrite_public_addresses("<instancesSet/>", &HashMap::new()),
            "<instancesSet/>"
        );
    }

    #[test]
    fn an_instance_without_an_ip_address_element_gets_one_once_booted() {
        let xml =
            "<instancesSet><item><instanceId>i-1</instanceId><dnsName/></item></instancesSet>";
        let public = HashMap::from([("i-1".to_string(), Ipv4Addr::new(10, 251, 0, 2))]);
        assert_eq!(
            rewrite_public_addresses(xml, &public),
            "<instancesSet><item><instanceId>i-1</instanceId><dnsName/><ipAddress>10.251.0.2</ipAddress></item></instancesSet>"
        );
    }
}
