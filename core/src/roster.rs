//! Who each of a pool's node ids is, and whether it is still in the pool: its bootstrap
//! tokens, its one live certificate, its generation, when it was last heard from, and
//! whether it was given up (fenced). Sans I/O: the coordinator's endpoint feeds it what
//! happened (an enrollment request, a hello, a message, a renewal, silence, a give-up, an
//! attempt torn down) with the time it happened, and carries out the actions it answers
//! with (sign, welcome, refuse, fence).
//!
//! The rules it keeps:
//! - a token enrolls one node id once, before it expires, unless its node was given up or
//!   its provisioning attempt torn down;
//! - one node id has one live certificate: the last one signed for it; any other is
//!   refused at hello (a coordinator started again, having signed none, adopts the first
//!   it sees);
//! - a node silent past the timeout (connected or not, counting only time the coordinator
//!   itself ran) is given up, once; a node given up is refused at hello, gets no new
//!   certificate, and its tokens are revoked;
//! - an id forgotten (its attempt torn down) starts a new generation: nothing of the old
//!   one (certificate, tokens, fence) carries over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::tokens::{TokenRejection, TokenStore};

/// What happened to one of the pool's node ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An agent asks to enroll as `node` with `token`.
    EnrollRequested { node: String, token: String },
    /// A certificate was signed for `node` (its SHA-256 `cert`): at enrollment, with the
    /// `token` it spends, or at renewal, without one.
    Signed {
        node: String,
        cert: String,
        token: Option<String>,
    },
    /// A connection authenticated as `node` with certificate `cert` said hello.
    Hello {
        node: String,
        cert: String,
        connection: usize,
    },
    /// A message came from `node`.
    Heard { node: String },
    /// `node`'s connection `connection` ended.
    Closed { node: String, connection: usize },
    /// `node` asks for a new certificate over its authenticated connection.
    RenewRequested { node: String },
    /// Whoever drives the pool gave `node` up (its machine is gone, its task's connection
    /// did not come back).
    GiveUp { node: String, reason: String },
    /// These ids' provisioning attempt was torn down: the next node of each id is a new one.
    Forget { nodes: Vec<String> },
    /// Time passed; of it, `paused` the coordinator itself did not run (a stopped process,
    /// a suspended machine), which no node's silence counts.
    Tick { paused: Duration },
}

/// What the coordinator's endpoint must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sign the certificate asked for (then say [`Event::Signed`]).
    Sign,
    /// Refuse the enrollment: the token does not enroll this node.
    RejectToken(TokenRejection),
    /// Refuse the renewal for this reason.
    RefuseRenewal(String),
    /// Let the connection in: send the welcome.
    Welcome,
    /// Tell the agent to shut down in place of the welcome.
    Refuse(Refusal),
    /// Give `node` up: close its connection, wake whoever waits for it, tell the pool.
    Fence { node: String, reason: String },
}

/// Why a connection is not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The node was given up.
    Fenced { reason: String },
    /// Another certificate of the node id was signed after this one.
    Stale,
}

/// Which certificate of a node id connects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LiveCert {
    /// None signed by this coordinator (it was started again): the first one seen is adopted.
    FirstSeen,
    /// The last one signed, or adopted.
    Only(String),
    /// The id was forgotten: none connects until the next one is signed.
    Nobody,
}

#[derive(Debug, Clone)]
struct Record {
    generation: u64,
    enrolled: bool,
    live: LiveCert,
    fenced: Option<String>,
    /// When it was last heard from; `None` until it first connects (silence counts from then).
    last_heard: Option<Instant>,
    /// Its current connection, while one is open.
    connection: Option<usize>,
}

impl Record {
    fn new(generation: u64) -> Record {
        Record {
            generation,
            enrolled: false,
            live: LiveCert::FirstSeen,
            fenced: None,
            last_heard: None,
            connection: None,
        }
    }
}

/// The pool's node ids and their standing.
#[derive(Default, Debug)]
pub struct Roster {
    tokens: TokenStore,
    nodes: HashMap<String, Record>,
    /// A node silent this long is given up; never, while zero.
    timeout: Duration,
}

impl Roster {
    /// A roster whose nodes are given up after `timeout` of silence.
    pub fn new(timeout: Duration) -> Roster {
        Roster {
            timeout,
            ..Roster::default()
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Nodes connecting from now on are given up after `timeout` of silence.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Issues a fresh single-use token for `node`, valid for `ttl` from `now`.
    pub fn issue_token(&mut self, node: &str, ttl: Duration, now: Instant) -> String {
        self.tokens.issue(node, ttl, now)
    }

    /// Revokes every token issued so far for these nodes (an attempt given up).
    pub fn revoke_tokens(&mut self, nodes: &[String]) {
        for node in nodes {
            self.tokens.revoke_node(node);
        }
    }

    /// Checks `token` for `node` without spending it.
    pub fn check_token(&self, token: &str, node: &str, now: Instant) -> Result<(), TokenRejection> {
        self.tokens.check(token, node, now)
    }

    /// Every node enrolled (in its current generation).
    pub fn enrolled(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|(_, r)| r.enrolled)
            .map(|(node, _)| node.as_str())
    }

    /// Whether `node` has enrolled (in this generation).
    pub fn is_enrolled(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|r| r.enrolled)
    }

    /// Whether `node` has connected at least once (in this generation).
    pub fn has_connected(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|r| r.last_heard.is_some())
    }

    /// Why `node` was given up, if it was.
    pub fn fenced(&self, node: &str) -> Option<&str> {
        self.nodes.get(node)?.fenced.as_deref()
    }

    /// Which generation of `node` is current: it grows each time the id is forgotten.
    pub fn generation(&self, node: &str) -> u64 {
        self.nodes.get(node).map_or(0, |r| r.generation)
    }

    /// Why generation `generation` of `node` is out of the pool: given up, or forgotten
    /// for a newer node of the same id; `None` while it is in.
    pub fn fate(&self, node: &str, generation: u64) -> Option<String> {
        let record = self.nodes.get(node)?;
        if record.generation != generation {
            return Some("its provisioning attempt was given up".into());
        }
        record.fenced.clone()
    }

    /// Every node given up, with why.
    pub fn given_up(&self) -> impl Iterator<Item = (&str, &str)> {
        self.nodes
            .iter()
            .filter_map(|(node, r)| Some((node.as_str(), r.fenced.as_deref()?)))
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::EnrollRequested { node, token } => {
                if self.fenced(&node).is_some() {
                    return vec![Action::RejectToken(TokenRejection::Revoked)];
                }
                match self.tokens.check(&token, &node, now) {
                    Ok(()) => vec![Action::Sign],
                    Err(rejection) => vec![Action::RejectToken(rejection)],
                }
            }
            Event::Signed { node, cert, token } => {
                if let Some(token) = token {
                    if let Err(rejection) = self.tokens.redeem(&token, &node, now) {
                        return vec![Action::RejectToken(rejection)];
                    }
                }
                let record = self.record(&node);
                if record.fenced.is_some() {
                    // Asked before the node was given up, signed after: it stays out.
                    return vec![Action::RejectToken(TokenRejection::Revoked)];
                }
                record.live = LiveCert::Only(cert);
                record.enrolled = true;
                vec![]
            }
            Event::Hello {
                node,
                cert,
                connection,
            } => {
                let record = self.record(&node);
                if let Some(reason) = &record.fenced {
                    return vec![Action::Refuse(Refusal::Fenced {
                        reason: reason.clone(),
                    })];
                }
                match &record.live {
                    LiveCert::FirstSeen => record.live = LiveCert::Only(cert),
                    LiveCert::Only(live) if *live == cert => {}
                    LiveCert::Only(_) | LiveCert::Nobody => {
                        return vec![Action::Refuse(Refusal::Stale)]
                    }
                }
                record.connection = Some(connection);
                record.last_heard = Some(now);
                vec![Action::Welcome]
            }
            Event::Heard { node } => {
                if let Some(record) = self.nodes.get_mut(&node) {
                    if record.last_heard.is_some() {
                        record.last_heard = Some(now);
                    }
                }
                vec![]
            }
            Event::Closed { node, connection } => {
                if let Some(record) = self.nodes.get_mut(&node) {
                    if record.connection == Some(connection) {
                        record.connection = None;
                    }
                }
                vec![]
            }
            Event::RenewRequested { node } => match self.fenced(&node) {
                Some(reason) => vec![Action::RefuseRenewal(format!(
                    "{node} was given up ({reason})"
                ))],
                None => vec![Action::Sign],
            },
            Event::GiveUp { node, reason } => {
                if self.has_connected(&node) {
                    self.fence(&node, reason).into_iter().collect()
                } else {
                    vec![]
                }
            }
            Event::Forget { nodes } => {
                for node in nodes {
                    self.tokens.revoke_node(&node);
                    let generation = self.generation(&node) + 1;
                    let mut record = Record::new(generation);
                    // Until the next one is signed, no certificate of the id connects: a
                    // straggler of the old attempt would count as a node of the new one.
                    record.live = LiveCert::Nobody;
                    self.nodes.insert(node, record);
                }
                vec![]
            }
            Event::Tick { paused } => {
                let timeout = self.timeout;
                let mut silent = Vec::new();
                for (node, record) in &mut self.nodes {
                    let Some(heard) = &mut record.last_heard else {
                        continue;
                    };
                    if !paused.is_zero() {
                        *heard = (*heard + paused).min(now);
                    }
                    if !timeout.is_zero()
                        && record.fenced.is_none()
                        && now.saturating_duration_since(*heard) >= timeout
                    {
                        silent.push(node.clone());
                    }
                }
                silent.sort();
                let reason = format!(
                    "no health report for {}",
                    humantime::format_duration(timeout)
                );
                silent
                    .into_iter()
                    .filter_map(|node| self.fence(&node, reason.clone()))
                    .collect()
            }
        }
    }

    fn record(&mut self, node: &str) -> &mut Record {
        self.nodes
            .entry(node.to_string())
            .or_insert_with(|| Record::new(0))
    }

    /// Gives `node` up once: its tokens are revoked, and it is refused from now on.
    fn fence(&mut self, node: &str, reason: String) -> Option<Action> {
        let record = self.nodes.get_mut(node)?;
        if record.fenced.is_some() {
            return None;
        }
        record.fenced = Some(reason.clone());
        record.connection = None;
        self.tokens.revoke_node(node);
        Some(Action::Fence {
            node: node.to_string(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    const TIMEOUT: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(600);

    fn hello(node: &str, cert: &str, connection: usize) -> Event {
        Event::Hello {
            node: node.into(),
            cert: cert.into(),
            connection,
        }
    }

    fn enroll(
        roster: &mut Roster,
        node: &str,
        token: &str,
        cert: &str,
        now: Instant,
    ) -> Vec<Action> {
        let asked = roster.handle(
            Event::EnrollRequested {
                node: node.into(),
                token: token.into(),
            },
            now,
        );
        if asked != [Action::Sign] {
            return asked;
        }
        roster.handle(
            Event::Signed {
                node: node.into(),
                cert: cert.into(),
                token: Some(token.into()),
            },
            now,
        )
    }

    #[test]
    fn a_node_enrolls_once_and_only_its_last_certificate_connects() {
        let t0 = Instant::now();
        let mut roster = Roster::new(TIMEOUT);
        let token = roster.issue_token("node-1", TTL, t0);
        assert_eq!(enroll(&mut roster, "node-1", &token, "a", t0), vec![]);
        assert_eq!(
            enroll(&mut roster, "node-1", &token, "b", t0),
            vec![Action::RejectToken(TokenRejection::AlreadyUsed)]
        );
        assert_eq!(
            roster.handle(hello("node-1", "a", 1), t0),
            vec![Action::Welcome]
        );
        assert_eq!(
            roster.handle(
                Event::RenewRequested {
                    node: "node-1".into()
                },
                t0
            ),
            vec![Action::Sign]
        );
        roster.handle(
            Event::Signed {
                node: "node-1".into(),
                cert: "c".into(),
                token: None,
            },
            t0,
        );
        assert_eq!(
            roster.handle(hello("node-1", "a", 2), t0),
            vec![Action::Refuse(Refusal::Stale)]
        );
        assert_eq!(
            roster.handle(hello("node-1", "c", 3), t0),
            vec![Action::Welcome]
        );
    }

    #[test]
    fn a_silent_node_is_given_up_once_and_stays_out() {
        let t0 = Instant::now();
        let mut roster = Roster::new(TIMEOUT);
        let token = roster.issue_token("node-1", TTL, t0);
        enroll(&mut roster, "node-1", &token, "a", t0);
        roster.handle(hello("node-1", "a", 1), t0);
        // A coordinator paused for 20 s blames nobody for it.
        let resumed = t0 + Duration::from_secs(25);
        assert_eq!(
            roster.handle(
                Event::Tick {
                    paused: Duration::from_secs(20)
                },
                resumed
            ),
            vec![]
        );
        let late = resumed + Duration::from_secs(6);
        assert_eq!(
            roster.handle(
                Event::Tick {
                    paused: Duration::ZERO
                },
                late
            ),
            vec![Action::Fence {
                node: "node-1".into(),
                reason: "no health report for 10s".into()
            }]
        );
        assert_eq!(
            roster.handle(
                Event::Tick {
                    paused: Duration::ZERO
                },
                late
            ),
            vec![]
        );
        assert_eq!(
            roster.handle(hello("node-1", "a", 2), late),
            vec![Action::Refuse(Refusal::Fenced {
                reason: "no health report for 10s".into()
            })]
        );
        assert!(matches!(
            roster.handle(
                Event::RenewRequested {
                    node: "node-1".into()
                },
                late
            )[..],
            [Action::RefuseRenewal(_)]
        ));
        assert_eq!(
            roster.fate("node-1", 0).as_deref(),
            Some("no health report for 10s")
        );
    }

    #[test]
    fn a_forgotten_id_starts_afresh_and_its_old_machine_stays_out() {
        let t0 = Instant::now();
        let mut roster = Roster::new(TIMEOUT);
        let old_token = roster.issue_token("node-1", TTL, t0);
        let unused = roster.issue_token("node-1", TTL, t0);
        enroll(&mut roster, "node-1", &old_token, "old", t0);
        roster.handle(hello("node-1", "old", 1), t0);
        roster.handle(
            Event::GiveUp {
                node: "node-1".into(),
                reason: "gone".into(),
            },
            t0,
        );
        roster.handle(
            Event::Forget {
                nodes: vec!["node-1".into()],
            },
            t0,
        );
        assert_eq!(roster.generation("node-1"), 1);
        assert!(roster.fate("node-1", 0).is_some());
        assert_eq!(roster.fate("node-1", 1), None);
        assert_eq!(
            roster.handle(hello("node-1", "old", 2), t0),
            vec![Action::Refuse(Refusal::Stale)]
        );
        assert_eq!(
            enroll(&mut roster, "node-1", &unused, "x", t0),
            vec![Action::RejectToken(TokenRejection::Revoked)]
        );
        let token = roster.issue_token("node-1", TTL, t0);
        assert_eq!(enroll(&mut roster, "node-1", &token, "new", t0), vec![]);
        assert_eq!(
            roster.handle(hello("node-1", "new", 3), t0),
            vec![Action::Welcome]
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Issue(usize),
        /// Enroll with the token at this index (of those issued), claiming this node.
        Enroll(usize, usize),
        Renew(usize),
        /// Hello with the certificate at this index of those signed for the node (a stranger's
        /// when out of range).
        Hello(usize, usize),
        Heard(usize),
        Close(usize),
        GiveUp(usize),
        Forget(usize),
        Advance(u64),
        Pause(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let node = 0..3usize;
        prop_oneof![
            1 => node.clone().prop_map(Step::Issue),
            1 => (0..8usize, node.clone()).prop_map(|(t, n)| Step::Enroll(t, n)),
            1 => node.clone().prop_map(Step::Renew),
            3 => (node.clone(), 0..4usize).prop_map(|(n, c)| Step::Hello(n, c)),
            3 => node.clone().prop_map(Step::Heard),
            1 => node.clone().prop_map(Step::Close),
            1 => node.clone().prop_map(Step::GiveUp),
            1 => node.clone().prop_map(Step::Forget),
            3 => (1..6_000u64).prop_map(Step::Advance),
            1 => (1..20_000u64).prop_map(Step::Pause),
        ]
    }

    /// What the rules say, kept the plain way: against it, every answer of the roster.
    #[derive(Default)]
    struct Model {
        /// Per node: the certificates signed for it, in order.
        signed: HashMap<String, Vec<String>>,
        /// Per node: the certificate that may connect (the last signed, or the first
        /// welcomed when none was signed), and whether the id was forgotten since.
        live: HashMap<String, String>,
        forgotten: HashSet<String>,
        fenced: HashSet<String>,
        /// Per node: when it was last heard from, in the coordinator's running time.
        heard: HashMap<String, Duration>,
        generation: HashMap<String, u64>,
        /// Each token: its node, the generation it was issued in, whether it was spent.
        tokens: Vec<(String, String, u64, bool)>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Over random sequences of enrollments, renewals, hellos, messages, silences,
        /// pauses, give-ups and forgotten attempts: at most one certificate per node id
        /// connects (the last signed), a node given up is never welcomed nor signed for, a
        /// token enrolls once and never across a give-up or a new generation, and a node
        /// is given up exactly when (and once) it has been silent past the timeout in the
        /// coordinator's running time.
        #[test]
        fn node_identities_hold_under_any_sequence(steps in proptest::collection::vec(step(), 1..80)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut running = Duration::ZERO;
            let mut roster = Roster::new(TIMEOUT);
            let mut model = Model::default();
            let mut next_cert = 0;
            let mut connections = 0;
            let name = |i: usize| format!("node-{}", i + 1);
            for step in steps {
                match step {
                    Step::Issue(n) => {
                        let node = name(n);
                        let token = roster.issue_token(&node, TTL * 100, now);
                        let generation = *model.generation.get(&node).unwrap_or(&0);
                        model.tokens.push((token, node, generation, false));
                    }
                    Step::Enroll(t, n) => {
                        let Some((token, bound, generation, spent)) = model.tokens.get(t).cloned() else { continue };
                        let node = name(n);
                        next_cert += 1;
                        let cert = format!("cert-{next_cert}");
                        let answer = enroll(&mut roster, &node, &token, &cert, now);
                        let current = *model.generation.get(&bound).unwrap_or(&0);
                        let may = !spent && bound == node && generation == current && !model.fenced.contains(&node);
                        prop_assert_eq!(answer.is_empty(), may, "enroll {} with a token of {}: {:?}", node, bound, answer);
                        if may {
                            model.tokens[t].3 = true;
                            model.signed.entry(node.clone()).or_default().push(cert.clone());
                            model.live.insert(node, cert);
                        }
                    }
                    Step::Renew(n) => {
                        let node = name(n);
                        let answer = roster.handle(Event::RenewRequested { node: node.clone() }, now);
                        if model.fenced.contains(&node) {
                            prop_assert!(matches!(answer[..], [Action::RefuseRenewal(_)]));
                        } else {
                            prop_assert_eq!(answer, vec![Action::Sign]);
                            next_cert += 1;
                            let cert = format!("cert-{next_cert}");
                            let signed = roster.handle(Event::Signed { node: node.clone(), cert: cert.clone(), token: None }, now);
                            prop_assert_eq!(signed, vec![]);
                            model.signed.entry(node.clone()).or_default().push(cert.clone());
                            model.live.insert(node, cert);
                        }
                    }
                    Step::Hello(n, c) => {
                        let node = name(n);
                        let cert = model.signed.get(&node).and_then(|s| s.get(c)).cloned()
                            .unwrap_or_else(|| format!("stranger-{c}"));
                        connections += 1;
                        let answer = roster.handle(hello(&node, &cert, connections), now);
                        let welcome = !model.fenced.contains(&node) && match model.live.get(&node) {
                            Some(live) => *live == cert,
                            None => !model.forgotten.contains(&node),
                        };
                        prop_assert_eq!(answer == [Action::Welcome], welcome, "hello {} with {}: {:?}", node, cert, answer);
                        if welcome {
                            model.live.insert(node.clone(), cert);
                            model.heard.insert(node, running);
                        }
                    }
                    Step::Heard(n) => {
                        let node = name(n);
                        roster.handle(Event::Heard { node: node.clone() }, now);
                        if let Some(heard) = model.heard.get_mut(&node) {
                            *heard = running;
                        }
                    }
                    Step::Close(n) => {
                        roster.handle(Event::Closed { node: name(n), connection: connections }, now);
                    }
                    Step::GiveUp(n) => {
                        let node = name(n);
                        let answer = roster.handle(Event::GiveUp { node: node.clone(), reason: "gone".into() }, now);
                        let fences = model.heard.contains_key(&node) && !model.fenced.contains(&node);
                        prop_assert_eq!(answer.len(), usize::from(fences));
                        if fences {
                            model.fenced.insert(node);
                        }
                    }
                    Step::Forget(n) => {
                        let node = name(n);
                        roster.handle(Event::Forget { nodes: vec![node.clone()] }, now);
                        *model.generation.entry(node.clone()).or_default() += 1;
                        model.forgotten.insert(node.clone());
                        model.fenced.remove(&node);
                        model.live.remove(&node);
                        model.heard.remove(&node);
                    }
                    Step::Advance(ms) | Step::Pause(ms) => {
                        let elapsed = Duration::from_millis(ms);
                        now += elapsed;
                        let paused = match step {
                            Step::Pause(_) => elapsed,
                            _ => {
                                running += elapsed;
                                Duration::ZERO
                            }
                        };
                        let fenced: Vec<String> = roster
                            .handle(Event::Tick { paused }, now)
                            .into_iter()
                            .map(|action| match action {
                                Action::Fence { node, .. } => node,
                                other => panic!("a tick answered {other:?}"),
                            })
                            .collect();
                        let mut expected: Vec<String> = model
                            .heard
                            .iter()
                            .filter(|(node, heard)| !model.fenced.contains(*node) && running - **heard >= TIMEOUT)
                            .map(|(node, _)| node.clone())
                            .collect();
                        expected.sort();
                        prop_assert_eq!(&fenced, &expected);
                        model.fenced.extend(expected);
                    }
                }
                for node in (0..3).map(name) {
                    prop_assert_eq!(roster.fenced(&node).is_some(), model.fenced.contains(&node));
                    prop_assert_eq!(roster.generation(&node), *model.generation.get(&node).unwrap_or(&0));
                }
            }
        }
    }
}
