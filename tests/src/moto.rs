//! EC2 for tests: `moto_server` (moto from PyPI, installed by scripts/test.sh) on a free
//! loopback port with its realism flags on, a fault-injecting proxy in front of it for what
//! moto cannot do (capacity errors, throttling), and a "hypervisor" that boots every instance
//! moto starts from its user-data, read back through the EC2 API as a node would get it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    pub url: String,
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
        Moto { child, url }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
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
}

#[derive(Default)]
struct ProxyState {
    faults: Vec<Fault>,
    /// Every action seen, in order.
    actions: Vec<String>,
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
            .filter(|a| *a == action)
            .count()
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
    let fault = {
        let mut state = state.lock().unwrap();
        state.actions.push(action.clone());
        let hit = state.faults.iter_mut().find(|f| match f {
            Fault::FleetError { count, .. } => action == "CreateFleet" && *count > 0,
            Fault::Throttle { action: a, count } => *a == action && *count > 0,
        });
        hit.map(|f| {
            match f {
                Fault::FleetError { count, .. } | Fault::Throttle { count, .. } => *count -= 1,
            }
            f.clone()
        })
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
        None => {
            let target = format!("{upstream}{}", uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
            let mut request = http.request(method, target).body(body.to_vec());
            for (name, value) in &headers {
                if name != "host" && name != "content-length" {
                    request = request.header(name, value);
                }
            }
            match request.send().await {
                Ok(reply) => {
                    let status = StatusCode::from_u16(reply.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                    let content_type = reply
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("text/xml")
                        .to_string();
                    let bytes = reply.bytes().await.unwrap_or_default();
                    (status, [("content-type", content_type)], bytes).into_response()
                }
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
    }
}

/// Boots every instance moto reports running from its user-data (read back through
/// DescribeInstanceAttribute, as a node gets it from the metadata service), and destroys the
/// booted node once the instance is terminated: the part of EC2 that moto leaves out.
pub struct Hypervisor {
    booted: Arc<Mutex<HashMap<String, BootedNode>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hypervisor {
    pub fn start(moto_url: &str, root: PathBuf) -> Hypervisor {
        let booted: Arc<Mutex<HashMap<String, BootedNode>>> = Arc::default();
        let (url, nodes) = (moto_url.to_string(), booted.clone());
        let task = tokio::spawn(async move {
            let ec2 = client(&url).await;
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
                        if state == "running" && !known {
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
                            let node = tokio::task::spawn_blocking(move || {
                                BootedNode::boot(&root, &name, &script)
                            })
                            .await
                            .ok()
                            .and_then(Result::ok);
                            if let Some(node) = node {
                                nodes.lock().unwrap().insert(id, node);
                            }
                        } else if matches!(
                            state.as_str(),
                            "shutting-down" | "terminated" | "stopped"
                        ) && known
                        {
                            if let Some(node) = nodes.lock().unwrap().remove(&id) {
                                node.destroy();
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Hypervisor { booted, task }
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

/// A tag filter for DescribeInstances.
pub fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}
