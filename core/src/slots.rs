//! GPU slots: which GPUs a node offers to tasks, and which task gets which. Pure, like
//! [`crate::schedule`], so every rule is tested without a network.
//!
//! A node offers one slot per whole GPU, or, for a GPU split with MIG, one per MIG device
//! (CUDA cannot use a MIG-enabled GPU whole). A task asks for nothing, for N whole GPUs on
//! one node, or for one slot of any kind. Tasks with a GPU request start only when their
//! slots are free, on any node; tasks without one keep the per-node limit of [`Scheduler`].

use std::collections::{HashMap, VecDeque};
use std::fmt;

use skyward_common::inventory::Inventory;

use crate::catalog::DeviceKind;
use crate::schedule::Scheduler;
use crate::spec::AcceleratorRequest;

/// One GPU slot of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// A whole GPU, by its `nvidia-smi` index.
    Gpu { index: u32 },
    /// A MIG device, by the UUID CUDA selects it with.
    Mig { uuid: String, profile: String },
}

impl Slot {
    /// How `CUDA_VISIBLE_DEVICES` names it.
    pub fn device_id(&self) -> String {
        match self {
            Slot::Gpu { index } => index.to_string(),
            Slot::Mig { uuid, .. } => uuid.clone(),
        }
    }
}

/// The slots `inventory` offers, whole GPUs and MIG devices in index order.
pub fn node_slots(inventory: &Inventory) -> Vec<Slot> {
    let mut slots = Vec::new();
    for gpu in &inventory.gpus {
        if gpu.mig_mode_current == Some(true) || !gpu.mig_devices.is_empty() {
            slots.extend(gpu.mig_devices.iter().map(|mig| Slot::Mig {
                uuid: mig.uuid.clone(),
                profile: mig.profile.clone(),
            }));
        } else {
            slots.push(Slot::Gpu { index: gpu.index });
        }
    }
    slots
}

/// What a task asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GpuRequest {
    #[default]
    None,
    /// This many whole GPUs, all on one node.
    Gpus(u32),
    /// One slot: a MIG device or a whole GPU; with a profile (`1g.10gb`), only a MIG device
    /// of that profile.
    Slice { profile: Option<String> },
}

impl fmt::Display for GpuRequest {
    /// As the command line spells it, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRequest::None => write!(f, "no GPU"),
            GpuRequest::Gpus(n) => write!(f, "--gpus {n}"),
            GpuRequest::Slice { profile: None } => write!(f, "--slice"),
            GpuRequest::Slice {
                profile: Some(profile),
            } => write!(f, "--slice={profile}"),
        }
    }
}

impl GpuRequest {
    pub fn is_none(&self) -> bool {
        *self == GpuRequest::None
    }

    /// The free slots (indices into `slots`) this request would take, if there are enough.
    fn pick(&self, slots: &[Slot], free: &[bool]) -> Option<Vec<usize>> {
        let mut candidates = slots
            .iter()
            .zip(free)
            .enumerate()
            .filter(|(_, (_, &free))| free)
            .map(|(i, (slot, _))| (i, slot));
        match self {
            GpuRequest::None => Some(Vec::new()),
            GpuRequest::Gpus(n) => {
                let whole: Vec<usize> = candidates
                    .filter(|(_, slot)| matches!(slot, Slot::Gpu { .. }))
                    .map(|(i, _)| i)
                    .take(*n as usize)
                    .collect();
                (whole.len() == *n as usize).then_some(whole)
            }
            GpuRequest::Slice { profile } => candidates
                .find(|(_, slot)| match (profile, slot) {
                    (None, _) => true,
                    (Some(wanted), Slot::Mig { profile, .. }) => profile == wanted,
                    (Some(_), Slot::Gpu { .. }) => false,
                })
                .map(|(i, _)| vec![i]),
        }
    }
}

/// Rejects, before anything is provisioned, a request that no node of the spec can meet:
/// more GPUs than `--accelerator` puts on a node, a GPU request without an accelerator, or a
/// MIG profile of a GPU without MIG.
pub fn fits(request: &GpuRequest, accelerator: Option<&AcceleratorRequest>) -> Result<(), String> {
    if request.is_none() {
        return Ok(());
    }
    let Some(accelerator) = accelerator else {
        return Err(match request {
            GpuRequest::Gpus(n) => format!("{request} needs GPUs: add --accelerator NAME:{n}"),
            _ => format!("{request} needs a GPU: add --accelerator NAME"),
        });
    };
    let name = accelerator.accelerator.name;
    if accelerator.accelerator.kind != DeviceKind::NvidiaGpu {
        return Err(format!(
            "{request} places tasks on NVIDIA GPUs and {name} is not one: drop {request} or pick an NVIDIA --accelerator"
        ));
    }
    match request {
        GpuRequest::Gpus(n) if *n > accelerator.count => Err(format!(
            "{request} is more than the {} GPU(s) per node of --accelerator {accelerator}: ask for --gpus {} or fewer, or --accelerator {name}:{n}",
            accelerator.count, accelerator.count
        )),
        GpuRequest::Slice {
            profile: Some(profile),
        } if !accelerator.accelerator.mig => Err(format!(
            "--slice={profile} needs MIG, which {name} does not have: use --slice without a profile, or a MIG GPU (A100, H100...)"
        )),
        _ => Ok(()),
    }
}

/// Rejects a request that no eligible node can ever meet, even with all its slots free:
/// `pin` is the node a task must run on, if any.
pub fn fits_nodes(
    request: &GpuRequest,
    pin: Option<usize>,
    slots: &[Vec<Slot>],
) -> Result<(), String> {
    if request.is_none() {
        return Ok(());
    }
    let eligible: Vec<&Vec<Slot>> = match pin {
        Some(node) => slots.get(node).into_iter().collect(),
        None => slots.iter().collect(),
    };
    if eligible
        .iter()
        .any(|node| request.pick(node, &vec![true; node.len()]).is_some())
    {
        return Ok(());
    }
    let whole = |node: &&Vec<Slot>| {
        node.iter()
            .filter(|s| matches!(s, Slot::Gpu { .. }))
            .count()
    };
    let migs = |node: &&Vec<Slot>| node.len() - whole(node);
    let most_whole = eligible.iter().map(whole).max().unwrap_or(0);
    let any_mig = eligible.iter().any(|n| migs(n) > 0);
    let which = if pin.is_some() {
        "that node"
    } else {
        "any node"
    };
    Err(match request {
        GpuRequest::None => return Ok(()),
        GpuRequest::Gpus(_) if most_whole == 0 && any_mig => format!(
            "{request}: the GPUs of {which} are split into MIG slices: use --slice to run on one"
        ),
        GpuRequest::Gpus(_) if most_whole == 0 => {
            format!("{request}: {which} has no GPU: pick nodes with GPUs (--accelerator NAME)")
        }
        GpuRequest::Gpus(_) => format!(
            "{request} is more whole GPUs than {which} has ({most_whole}): ask for --gpus {most_whole} or fewer"
        ),
        GpuRequest::Slice { profile: None } => {
            format!("{request}: {which} has no GPU: pick nodes with GPUs (--accelerator NAME)")
        }
        GpuRequest::Slice {
            profile: Some(_),
        } => {
            let mut profiles: Vec<&str> = eligible
                .iter()
                .flat_map(|node| node.iter())
                .filter_map(|s| match s {
                    Slot::Mig { profile, .. } => Some(profile.as_str()),
                    Slot::Gpu { .. } => None,
                })
                .collect();
            profiles.sort_unstable();
            profiles.dedup();
            if profiles.is_empty() {
                format!("{request}: {which} has no MIG device: use --slice without a profile")
            } else {
                format!(
                    "{request}: {which} has no MIG device of that profile: use one of {}",
                    profiles.join(", ")
                )
            }
        }
    })
}

/// One task started: where, and with which slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub task: usize,
    pub node: usize,
    /// Empty for a task without a GPU request.
    pub slots: Vec<Slot>,
}

impl Placement {
    /// The environment that confines the task to its slots (empty without slots).
    pub fn env(&self) -> Vec<(String, String)> {
        slot_env(&self.slots)
    }
}

/// The environment that confines a task to `slots` (empty without slots).
pub fn slot_env(slots: &[Slot]) -> Vec<(String, String)> {
    if slots.is_empty() {
        return Vec::new();
    }
    let devices: Vec<String> = slots.iter().map(Slot::device_id).collect();
    let devices = devices.join(",");
    let mut env = vec![
        ("CUDA_VISIBLE_DEVICES".to_string(), devices.clone()),
        ("NVIDIA_VISIBLE_DEVICES".to_string(), devices),
    ];
    // CUDA numbers GPUs fastest first unless told otherwise; the indices here are
    // nvidia-smi's, which follow the PCI bus.
    if slots.iter().any(|s| matches!(s, Slot::Gpu { .. })) {
        env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
    }
    env
}

/// One task for [`SlotScheduler`]: the node it must run on (broadcast), and what it asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotTask {
    pub pin: Option<usize>,
    pub gpus: GpuRequest,
}

/// [`Scheduler`] for tasks without a GPU request, slots for those with one.
#[derive(Debug, Clone)]
pub struct SlotScheduler {
    plain: Scheduler,
    /// The job's task index of each task `plain` holds, in its order.
    plain_tasks: Vec<usize>,
    slots: Vec<Vec<Slot>>,
    free: Vec<Vec<bool>>,
    /// Slots this job's bookkeeping has free but another job on the pool holds now.
    elsewhere: Vec<Vec<bool>>,
    /// GPU tasks not started yet, in input order: (task, pin, request, a node it must not
    /// go to).
    waiting: VecDeque<(usize, Option<usize>, GpuRequest, Option<usize>)>,
    /// Every started, unfinished task: its node and the slots it holds.
    running: HashMap<usize, (usize, Vec<usize>)>,
    gpu_total: usize,
    gpu_finished: usize,
    /// Nodes that take no new unpinned task.
    retired: Vec<bool>,
    /// Every task as asked for, to put one back in line.
    tasks: Vec<SlotTask>,
    /// Running tasks whose node's place went to a new node: they free nothing when they end.
    orphans: std::collections::HashSet<usize>,
    /// A node was retired or a task put back in line since [`unplaceable`](Self::unplaceable)
    /// last looked: only then can a waiting task have lost its last place.
    may_strand: bool,
}

impl SlotScheduler {
    /// `node` takes no new task that could go elsewhere (it was lost, or is about to be
    /// taken away); tasks pinned to it still go there.
    pub fn retire(&mut self, node: usize) {
        self.may_strand = true;
        self.plain.retire(node);
        if let Some(retired) = self.retired.get_mut(node) {
            *retired = true;
        }
    }

    pub fn is_retired(&self, node: usize) -> bool {
        self.retired.get(node).copied().unwrap_or(false)
    }

    /// `slots[n]` is node `n`'s slots; `per_node` limits tasks without a GPU request only.
    /// Fails, naming the fix, when a task could never start on its nodes.
    pub fn new(slots: Vec<Vec<Slot>>, per_node: usize, tasks: &[SlotTask]) -> Result<Self, String> {
        let mut plain_pins = Vec::new();
        let mut plain_tasks = Vec::new();
        let mut waiting = VecDeque::new();
        for (i, task) in tasks.iter().enumerate() {
            if task.gpus.is_none() {
                plain_pins.push(task.pin);
                plain_tasks.push(i);
            } else {
                fits_nodes(&task.gpus, task.pin, &slots)?;
                waiting.push_back((i, task.pin, task.gpus.clone(), None));
            }
        }
        Ok(SlotScheduler {
            plain: Scheduler::new(slots.len(), per_node, plain_pins),
            plain_tasks,
            free: slots.iter().map(|s| vec![true; s.len()]).collect(),
            elsewhere: slots.iter().map(|s| vec![false; s.len()]).collect(),
            retired: vec![false; slots.len()],
            slots,
            gpu_total: waiting.len(),
            waiting,
            running: HashMap::new(),
            gpu_finished: 0,
            tasks: tasks.to_vec(),
            orphans: Default::default(),
            may_strand: false,
        })
    }

    /// Task `task`, started, must run again elsewhere (its node is lost or about to be, or
    /// lost the task): what it held is free, and the next [`assign`](Self::assign) places it
    /// first, as it places any task (never on a retired node, within the per-node limit, on
    /// free slots), and not on `avoid`. False when it is not running.
    pub fn requeue(&mut self, task: usize, avoid: Option<usize>) -> bool {
        // An orphan (its node's place renewed since) holds nothing to free.
        let (node, taken) = match self.running.remove(&task) {
            Some((node, taken)) => (Some(node), taken),
            None if self.orphans.remove(&task) => (None, Vec::new()),
            None => return false,
        };
        self.may_strand = true;
        let pin = self.tasks.get(task).and_then(|t| t.pin);
        match self.plain_tasks.binary_search(&task) {
            Ok(index) => self.plain.requeue(index, node, pin, avoid),
            Err(_) => {
                let node = node.unwrap_or(usize::MAX);
                for i in taken {
                    if let Some(free) = self.free.get_mut(node).and_then(|f| f.get_mut(i)) {
                        *free = true;
                    }
                }
                let request = self.tasks[task].gpus.clone();
                self.waiting.push_front((task, pin, request, avoid));
            }
        }
        true
    }

    /// Whether some node that is not retired, other than `avoid`, could ever take `task` (its
    /// GPU request fits that node's slots, whatever holds them now): a task no such node can
    /// take would wait for ever.
    pub fn has_place_for(&self, task: usize, avoid: Option<usize>) -> bool {
        let Some(asked) = self.tasks.get(task) else {
            return false;
        };
        (0..self.slots.len())
            .filter(|&node| !self.is_retired(node) && avoid != Some(node))
            .any(|node| {
                asked.gpus.is_none()
                    || asked
                        .gpus
                        .pick(&self.slots[node], &vec![true; self.slots[node].len()])
                        .is_some()
            })
    }

    /// Takes out, as ended, the tasks waiting to start that no node could ever take now
    /// (every node that could was retired, or is the one a moved task must avoid), so that
    /// none waits for ever; returns them. Pinned tasks wait for their node.
    pub fn unplaceable(&mut self) -> Vec<usize> {
        // Looked at once per change, not once per task end: a long map's queue is long.
        if !std::mem::take(&mut self.may_strand) {
            return Vec::new();
        }
        let open: Vec<usize> = (0..self.slots.len())
            .filter(|&node| !self.is_retired(node))
            .collect();
        let plain_tasks = &self.plain_tasks;
        let mut out: Vec<usize> = self
            .plain
            .drop_queued(|_, pin, avoid| {
                pin.is_none() && !open.iter().any(|&node| Some(node) != avoid)
            })
            .into_iter()
            .map(|index| plain_tasks[index])
            .collect();
        let hopeless: Vec<bool> = self
            .waiting
            .iter()
            .map(|(task, pin, _, avoid)| pin.is_none() && !self.has_place_for(*task, *avoid))
            .collect();
        let mut index = 0;
        self.waiting.retain(|(task, ..)| {
            let drop = hopeless[index];
            index += 1;
            if drop {
                out.push(*task);
            }
            !drop
        });
        self.gpu_finished += hopeless.iter().filter(|&&h| h).count();
        out.sort_unstable();
        out
    }

    /// Takes out, as ended, the tasks waiting to start that are pinned to `node` (it was given
    /// up: nothing may start there); returns them.
    pub fn drop_pinned_to(&mut self, node: usize) -> Vec<usize> {
        let plain_tasks = &self.plain_tasks;
        let mut out: Vec<usize> = self
            .plain
            .drop_queued(|_, pin, _| pin == Some(node))
            .into_iter()
            .map(|index| plain_tasks[index])
            .collect();
        let before = self.waiting.len();
        self.waiting.retain(|(task, pin, ..)| {
            let drop = *pin == Some(node);
            if drop {
                out.push(*task);
            }
            !drop
        });
        self.gpu_finished += before - self.waiting.len();
        out.sort_unstable();
        out
    }

    /// A new node with `slots` takes `node`'s place (the old one was lost and replaced): it
    /// takes tasks again, all its slots free. Tasks of the old node that still end there
    /// are orphans: they count as finished but free nothing of the new node's.
    pub fn renew(&mut self, node: usize, slots: Vec<Slot>) {
        if node >= self.slots.len() {
            return;
        }
        self.plain.renew(node);
        self.retired[node] = false;
        self.free[node] = vec![true; slots.len()];
        self.elsewhere[node] = vec![false; slots.len()];
        self.slots[node] = slots;
        let orphans: Vec<usize> = self
            .running
            .iter()
            .filter(|(_, (n, _))| *n == node)
            .map(|(task, _)| *task)
            .collect();
        for task in orphans {
            self.running.remove(&task);
            self.orphans.insert(task);
        }
    }

    /// Counts tasks already running on each node (from earlier work) towards the per-node
    /// limit of tasks without a GPU request.
    pub fn with_running(mut self, running: Vec<usize>) -> Self {
        self.plain = self.plain.with_running(running);
        self
    }

    /// Marks the slots other jobs on the pool hold now (`held(node, slot)`): they are not
    /// given out until a later call says they are free.
    pub fn held_elsewhere(&mut self, held: impl Fn(usize, &Slot) -> bool) {
        for (node, slots) in self.slots.iter().enumerate() {
            for (i, slot) in slots.iter().enumerate() {
                self.elsewhere[node][i] = self.free[node][i] && held(node, slot);
            }
        }
    }

    /// Whether GPU tasks wait for slots (their own job's, or another's).
    pub fn waiting_for_slots(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Takes every task that can start now, in input order, with its node and slots. A GPU
    /// task goes to the eligible node with the most free slots (ties to the earliest) that
    /// has what it asks for; one that fits nowhere now waits without holding back the rest.
    pub fn assign(&mut self) -> Vec<Placement> {
        let mut out: Vec<Placement> = self
            .plain
            .assign()
            .into_iter()
            .map(|(i, node)| Placement {
                task: self.plain_tasks[i],
                node,
                slots: Vec::new(),
            })
            .collect();
        let mut still_waiting = VecDeque::new();
        while let Some((task, pin, request, avoid)) = self.waiting.pop_front() {
            match self.place(pin, &request, avoid) {
                Some((node, taken)) => {
                    for &i in &taken {
                        self.free[node][i] = false;
                    }
                    out.push(Placement {
                        task,
                        node,
                        slots: taken.iter().map(|&i| self.slots[node][i].clone()).collect(),
                    });
                    self.running.insert(task, (node, taken));
                }
                None => still_waiting.push_back((task, pin, request, avoid)),
            }
        }
        self.waiting = still_waiting;
        for p in out.iter().filter(|p| p.slots.is_empty()) {
            self.running.insert(p.task, (p.node, Vec::new()));
        }
        out.sort_by_key(|p| p.task);
        out
    }

    fn place(
        &self,
        pin: Option<usize>,
        request: &GpuRequest,
        avoid: Option<usize>,
    ) -> Option<(usize, Vec<usize>)> {
        let nodes = match pin {
            Some(node) => node..node + 1,
            None => 0..self.slots.len(),
        };
        nodes
            .filter(|&node| {
                pin.is_some()
                    || (!self.retired.get(node).copied().unwrap_or(false) && avoid != Some(node))
            })
            .filter_map(|node| {
                let free: Vec<bool> = self
                    .free
                    .get(node)?
                    .iter()
                    .zip(&self.elsewhere[node])
                    .map(|(&free, &elsewhere)| free && !elsewhere)
                    .collect();
                let taken = request.pick(&self.slots[node], &free)?;
                Some((node, taken, free.iter().filter(|&&f| f).count()))
            })
            .min_by_key(|(node, _, free)| (std::cmp::Reverse(*free), *node))
            .map(|(node, taken, _)| (node, taken))
    }

    /// Task `task` ended: its slots, or its place on the node, are free again.
    pub fn finished(&mut self, task: usize) {
        let plain = self.plain_tasks.binary_search(&task).is_ok();
        if self.orphans.remove(&task) {
            match plain {
                true => self.plain.finished_orphan(),
                false => self.gpu_finished += 1,
            }
            return;
        }
        let Some((node, taken)) = self.running.remove(&task) else {
            return;
        };
        if self.plain_tasks.binary_search(&task).is_ok() {
            self.plain.finished(node);
        } else {
            for i in taken {
                self.free[node][i] = true;
            }
            self.gpu_finished += 1;
        }
    }

    pub fn done(&self) -> bool {
        self.plain.done() && self.gpu_finished >= self.gpu_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_common::inventory::{Gpu, MigDevice};

    fn mig_uuid(node: usize, gpu: u32, i: u32) -> String {
        format!("MIG-{node:04}{gpu:04}-{i:04}-0000-0000-000000000000")
    }

    /// A node with `gpus` H100s, each split into `migs` 1g.10gb devices (0: not split).
    fn inventory(node: usize, gpus: u32, migs: u32) -> Inventory {
        Inventory {
            gpus: (0..gpus)
                .map(|index| Gpu {
                    index,
                    uuid: format!("GPU-{node:04}{index:04}"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    mig_mode_current: Some(migs > 0),
                    mig_devices: (0..migs)
                        .map(|i| MigDevice {
                            uuid: mig_uuid(node, index, i),
                            profile: "1g.10gb".into(),
                            parent_gpu_index: index,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn tasks(n: usize, gpus: GpuRequest) -> Vec<SlotTask> {
        vec![SlotTask { pin: None, gpus }; n]
    }

    fn slice() -> GpuRequest {
        GpuRequest::Slice { profile: None }
    }

    fn env_of(p: &Placement, key: &str) -> Option<String> {
        p.env().into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    #[test]
    fn a_mig_gpu_offers_its_devices_and_a_plain_gpu_itself() {
        let mut node = inventory(0, 2, 0);
        node.gpus[1] = inventory(0, 2, 3).gpus[1].clone();
        assert_eq!(
            node_slots(&node),
            vec![
                Slot::Gpu { index: 0 },
                Slot::Mig {
                    uuid: mig_uuid(0, 1, 0),
                    profile: "1g.10gb".into()
                },
                Slot::Mig {
                    uuid: mig_uuid(0, 1, 1),
                    profile: "1g.10gb".into()
                },
                Slot::Mig {
                    uuid: mig_uuid(0, 1, 2),
                    profile: "1g.10gb".into()
                },
            ]
        );
        // MIG on but no device made yet: CUDA sees nothing there.
        let mut unsplit = inventory(0, 1, 0);
        unsplit.gpus[0].mig_mode_current = Some(true);
        assert_eq!(node_slots(&unsplit), vec![]);
    }

    #[test]
    fn slots_another_job_holds_are_not_given_out_until_it_frees_them() {
        let slots = vec![node_slots(&inventory(0, 2, 0))];
        let mut s = SlotScheduler::new(slots, 1, &tasks(2, GpuRequest::Gpus(1))).unwrap();
        // Another job holds GPU 0.
        s.held_elsewhere(|_, slot| *slot == Slot::Gpu { index: 0 });
        let first = s.assign();
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(first[0].slots, vec![Slot::Gpu { index: 1 }]);
        assert!(s.waiting_for_slots());
        assert_eq!(s.assign(), vec![], "GPU 0 is still the other job's");
        // The other job is done with it.
        s.held_elsewhere(|_, _| false);
        let second = s.assign();
        assert_eq!(second.len(), 1, "{second:?}");
        assert_eq!(second[0].slots, vec![Slot::Gpu { index: 0 }]);
        assert!(!s.waiting_for_slots());
    }

    #[test]
    fn fourteen_mig_slices_run_at_once_and_the_fifteenth_gets_a_freed_one() {
        let slots = vec![
            node_slots(&inventory(0, 1, 7)),
            node_slots(&inventory(1, 1, 7)),
        ];
        let mut s = SlotScheduler::new(slots, 1, &tasks(15, slice())).unwrap();
        let first = s.assign();
        assert_eq!(first.len(), 14, "{first:?}");
        let mut uuids: Vec<String> = first
            .iter()
            .map(|p| env_of(p, "CUDA_VISIBLE_DEVICES").unwrap())
            .collect();
        for p in &first {
            let uuid = env_of(p, "CUDA_VISIBLE_DEVICES").unwrap();
            assert!(uuid.starts_with(&format!("MIG-{:04}", p.node)), "{p:?}");
            assert_eq!(env_of(p, "NVIDIA_VISIBLE_DEVICES"), Some(uuid));
            assert_eq!(env_of(p, "CUDA_DEVICE_ORDER"), None);
        }
        uuids.sort();
        uuids.dedup();
        assert_eq!(uuids.len(), 14);
        // Spread over both nodes, not one filled first.
        assert_eq!(first.iter().filter(|p| p.node == 0).count(), 7);
        assert_eq!(s.assign(), vec![], "the 15th waits for a free slice");

        let freed = first.iter().find(|p| p.task == 9).unwrap();
        s.finished(9);
        let next = s.assign();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].task, 14);
        assert_eq!(next[0].node, freed.node);
        assert_eq!(next[0].slots, freed.slots);
        assert!(!s.done());
        for task in (0..14).filter(|&t| t != 9) {
            s.finished(task);
        }
        assert!(!s.done());
        s.finished(14);
        assert!(s.done());
    }

    #[test]
    fn whole_gpus_go_to_one_node_each_and_four_pairs_fit_two_nodes_of_four() {
        let slots = vec![
            node_slots(&inventory(0, 4, 0)),
            node_slots(&inventory(1, 4, 0)),
        ];
        let mut s = SlotScheduler::new(slots, 1, &tasks(6, GpuRequest::Gpus(2))).unwrap();
        let first = s.assign();
        let placed: Vec<(usize, usize, String)> = first
            .iter()
            .map(|p| (p.task, p.node, env_of(p, "CUDA_VISIBLE_DEVICES").unwrap()))
            .collect();
        assert_eq!(
            placed,
            vec![
                (0, 0, "0,1".into()),
                (1, 1, "0,1".into()),
                (2, 0, "2,3".into()),
                (3, 1, "2,3".into()),
            ]
        );
        assert_eq!(env_of(&first[0], "NVIDIA_VISIBLE_DEVICES").unwrap(), "0,1");
        assert_eq!(
            env_of(&first[0], "CUDA_DEVICE_ORDER").unwrap(),
            "PCI_BUS_ID"
        );
        assert_eq!(s.assign(), vec![]);
        s.finished(2);
        let next = s.assign();
        assert_eq!(next.len(), 1);
        assert_eq!((next[0].task, next[0].node), (4, 0));
        assert_eq!(env_of(&next[0], "CUDA_VISIBLE_DEVICES").unwrap(), "2,3");
    }

    #[test]
    fn a_big_request_waits_while_smaller_ones_behind_it_fill_free_slots() {
        // One node of 4 GPUs: two singles, then a four that must wait, then a single that fits.
        let slots = vec![node_slots(&inventory(0, 4, 0))];
        let requests = [
            GpuRequest::Gpus(1),
            slice(),
            GpuRequest::Gpus(4),
            GpuRequest::Gpus(1),
        ];
        let tasks: Vec<SlotTask> = requests
            .iter()
            .map(|gpus| SlotTask {
                pin: None,
                gpus: gpus.clone(),
            })
            .collect();
        let mut s = SlotScheduler::new(slots, 1, &tasks).unwrap();
        let started: Vec<usize> = s.assign().iter().map(|p| p.task).collect();
        assert_eq!(started, vec![0, 1, 3]);
        s.finished(0);
        s.finished(1);
        assert_eq!(s.assign(), vec![]);
        s.finished(3);
        let four = s.assign();
        assert_eq!(four.len(), 1);
        assert_eq!(env_of(&four[0], "CUDA_VISIBLE_DEVICES").unwrap(), "0,1,2,3");
    }

    #[test]
    fn plain_tasks_keep_the_per_node_limit_beside_gpu_tasks() {
        let slots = vec![
            node_slots(&inventory(0, 1, 0)),
            node_slots(&inventory(1, 0, 0)),
        ];
        let tasks = vec![
            SlotTask::default(),
            SlotTask {
                pin: None,
                gpus: GpuRequest::Gpus(1),
            },
            SlotTask::default(),
            SlotTask::default(),
            SlotTask {
                pin: None,
                gpus: slice(),
            },
        ];
        let mut s = SlotScheduler::new(slots, 1, &tasks).unwrap();
        let first = s.assign();
        let placed: Vec<(usize, usize, bool)> = first
            .iter()
            .map(|p| (p.task, p.node, p.env().is_empty()))
            .collect();
        // Plain tasks one per node; the GPU task beside them on the only GPU node; the
        // slice waits for that GPU.
        assert_eq!(placed, vec![(0, 0, true), (1, 0, false), (2, 1, true)]);
        s.finished(1);
        let next: Vec<usize> = s.assign().iter().map(|p| p.task).collect();
        assert_eq!(next, vec![4]);
        s.finished(0);
        let next: Vec<(usize, usize)> = s.assign().iter().map(|p| (p.task, p.node)).collect();
        assert_eq!(next, vec![(3, 0)]);
        for task in [2, 3, 4] {
            s.finished(task);
        }
        assert!(s.done());
    }

    #[test]
    fn a_profile_picks_only_mig_devices_of_it() {
        let mut node = inventory(0, 1, 3);
        node.gpus[0].mig_devices[1].profile = "3g.40gb".into();
        let slots = vec![node_slots(&node)];
        let task = SlotTask {
            pin: None,
            gpus: GpuRequest::Slice {
                profile: Some("3g.40gb".into()),
            },
        };
        let mut s = SlotScheduler::new(slots.clone(), 1, &[task.clone(), task]).unwrap();
        let first = s.assign();
        assert_eq!(first.len(), 1);
        assert_eq!(
            env_of(&first[0], "CUDA_VISIBLE_DEVICES"),
            Some(mig_uuid(0, 0, 1))
        );
        let missing = GpuRequest::Slice {
            profile: Some("7g.80gb".into()),
        };
        let err = fits_nodes(&missing, None, &slots).unwrap_err();
        assert!(err.contains("use one of 1g.10gb, 3g.40gb"), "{err}");
    }

    #[test]
    fn a_retired_node_gets_no_new_gpu_task() {
        let slots = vec![
            node_slots(&inventory(0, 2, 0)),
            node_slots(&inventory(1, 2, 0)),
        ];
        let one_gpu = SlotTask {
            pin: None,
            gpus: GpuRequest::Gpus(1),
        };
        let mut s = SlotScheduler::new(slots, 1, &vec![one_gpu; 3]).unwrap();
        s.retire(0);
        let placed: Vec<(usize, usize)> = s.assign().iter().map(|p| (p.task, p.node)).collect();
        // Node 0's two free GPUs are not used: only node 1's two.
        assert_eq!(placed, vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn broadcast_tasks_take_slots_on_their_own_node() {
        let slots = vec![
            node_slots(&inventory(0, 2, 0)),
            node_slots(&inventory(1, 2, 0)),
        ];
        let tasks: Vec<SlotTask> = (0..2)
            .map(|node| SlotTask {
                pin: Some(node),
                gpus: GpuRequest::Gpus(2),
            })
            .collect();
        let mut s = SlotScheduler::new(slots, 1, &tasks).unwrap();
        let nodes: Vec<(usize, usize)> = s.assign().iter().map(|p| (p.task, p.node)).collect();
        assert_eq!(nodes, vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn oversized_requests_are_rejected_against_the_nodes_with_the_fix() {
        let slots = vec![
            node_slots(&inventory(0, 2, 0)),
            node_slots(&inventory(1, 1, 7)),
            node_slots(&inventory(2, 0, 0)),
        ];
        for (request, pin, hint) in [
            (GpuRequest::Gpus(3), None, "ask for --gpus 2 or fewer"),
            (GpuRequest::Gpus(1), Some(1), "use --slice"),
            (GpuRequest::Gpus(1), Some(2), "has no GPU"),
            (slice(), Some(2), "has no GPU"),
        ] {
            let task = SlotTask { pin, gpus: request };
            let err =
                SlotScheduler::new(slots.clone(), 1, std::slice::from_ref(&task)).unwrap_err();
            assert!(err.contains(hint), "{task:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(fits_nodes(&GpuRequest::Gpus(2), None, &slots).is_ok());
        assert!(fits_nodes(&slice(), Some(1), &slots).is_ok());
    }

    #[test]
    fn oversized_requests_are_rejected_against_the_spec_before_provisioning() {
        let h100 = |s: &str| s.parse::<AcceleratorRequest>().unwrap();
        assert_eq!(
            fits(&GpuRequest::Gpus(2), None).unwrap_err(),
            "--gpus 2 needs GPUs: add --accelerator NAME:2"
        );
        assert_eq!(
            fits(&slice(), None).unwrap_err(),
            "--slice needs a GPU: add --accelerator NAME"
        );
        let err = fits(&GpuRequest::Gpus(3), Some(&h100("H100:2"))).unwrap_err();
        assert!(err.contains("--gpus 2 or fewer"), "{err}");
        assert!(err.contains("--accelerator H100:3"), "{err}");
        assert!(fits(&GpuRequest::Gpus(2), Some(&h100("H100:2"))).is_ok());
        assert!(fits(&slice(), Some(&h100("L4"))).is_ok());
        let profile = GpuRequest::Slice {
            profile: Some("1g.10gb".into()),
        };
        assert!(fits(&profile, Some(&h100("H100"))).is_ok());
        assert!(fits(&profile, Some(&h100("L4")))
            .unwrap_err()
            .contains("needs MIG"));
        assert!(fits(&slice(), Some(&h100("MI300X")))
            .unwrap_err()
            .contains("NVIDIA"));
        assert!(fits(&GpuRequest::None, None).is_ok());
    }

    #[test]
    fn a_task_no_node_left_can_take_ends_instead_of_waiting() {
        // Node 0 has a GPU, node 1 none; task 0 is plain, task 1 wants a whole GPU.
        let slots = vec![node_slots(&inventory(0, 1, 0)), Vec::new()];
        let asked = [
            SlotTask::default(),
            SlotTask {
                pin: None,
                gpus: GpuRequest::Gpus(1),
            },
        ];
        let mut s = SlotScheduler::new(slots, 1, &asked).unwrap();
        let placed = s.assign();
        assert_eq!(placed.len(), 2, "{placed:?}");
        let plain_on = placed.iter().find(|p| p.task == 0).unwrap().node;
        // Both move off their nodes; node 0 (the only one with a GPU) is lost.
        assert!(s.requeue(0, Some(plain_on)));
        assert!(s.requeue(1, Some(0)));
        s.retire(0);
        // The GPU task can go nowhere; the plain one can go to node 1 unless it left it.
        let dropped = s.unplaceable();
        match plain_on {
            1 => assert_eq!(dropped, [0, 1]),
            _ => assert_eq!(dropped, [1]),
        }
        assert_eq!(s.done(), plain_on == 1);
    }

    mod moves {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            Assign,
            /// The n-th running (or orphaned) task ends.
            Finish(usize),
            /// The n-th running (or orphaned) task must run again elsewhere.
            Requeue(usize),
            Retire(usize),
            /// A new node with this many GPUs (each split in two MIG devices, or not) takes
            /// the place.
            Renew(usize, u32, bool),
            /// The tasks no node left could take end.
            DropUnplaceable,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                3 => Just(Step::Assign),
                2 => (0..8usize).prop_map(Step::Finish),
                1 => (0..8usize).prop_map(Step::Requeue),
                1 => (0..3usize).prop_map(Step::Retire),
                1 => (0..3usize, 0..3u32, any::<bool>()).prop_map(|(n, g, m)| Step::Renew(n, g, m)),
                1 => Just(Step::DropUnplaceable),
            ]
        }

        #[derive(Debug, Clone, PartialEq)]
        enum Fate {
            Waiting,
            /// Running on this node with these devices.
            Running(usize, Vec<String>),
            /// Still running on a node whose place went to a new node.
            Orphan,
            Done,
        }

        fn request(i: usize) -> GpuRequest {
            match i % 3 {
                0 => GpuRequest::None,
                1 => GpuRequest::Gpus(1),
                _ => slice(),
            }
        }

        /// Nodes that can take every request: two GPUs, one of them split.
        fn roomy(node: usize) -> Vec<Slot> {
            let mut inv = inventory(node, 2, 0);
            inv.gpus[1] = inventory(node, 2, 2).gpus[1].clone();
            node_slots(&inv)
        }

        fn check(fates: &[Fate], retired: &[bool], per_node: usize) -> Result<(), TestCaseError> {
            for node in 0..retired.len() {
                let mut held: Vec<&String> = fates
                    .iter()
                    .filter_map(|f| match f {
                        Fate::Running(n, devices) if *n == node => Some(devices),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                let total = held.len();
                held.sort();
                held.dedup();
                prop_assert_eq!(
                    held.len(),
                    total,
                    "a slot of node {} held twice: {:?}",
                    node,
                    fates
                );
                let plain = fates
                    .iter()
                    .enumerate()
                    .filter(|(i, f)| {
                        request(*i).is_none() && matches!(f, Fate::Running(n, _) if *n == node)
                    })
                    .count();
                prop_assert!(
                    plain <= per_node,
                    "node {} runs {} plain tasks",
                    node,
                    plain
                );
            }
            Ok(())
        }

        proptest! {
            /// Whatever moves, losses and replacements happen, no GPU slot is held by two
            /// tasks at once, no retired node gets a task, the per-node limit holds, and every
            /// task ends exactly once.
            #[test]
            fn moves_and_replacements_never_double_book_and_every_task_ends_once(
                steps in proptest::collection::vec(step(), 1..80),
                count in 1..10usize,
            ) {
                let per_node = 2;
                let tasks: Vec<SlotTask> = (0..count)
                    .map(|i| SlotTask { pin: None, gpus: request(i) })
                    .collect();
                let mut scheduler =
                    SlotScheduler::new((0..3).map(roomy).collect(), per_node, &tasks).unwrap();
                let mut fates = vec![Fate::Waiting; count];
                let mut retired = [false; 3];
                // The node each moved task must not go back to.
                let mut avoids: Vec<Option<usize>> = vec![None; count];
                let live = |fates: &[Fate]| -> Vec<usize> {
                    (0..fates.len())
                        .filter(|&t| matches!(fates[t], Fate::Running(..) | Fate::Orphan))
                        .collect()
                };
                let assign = |scheduler: &mut SlotScheduler, fates: &mut Vec<Fate>, retired: &[bool; 3], avoids: &mut Vec<Option<usize>>| -> Result<(), TestCaseError> {
                    for p in scheduler.assign() {
                        prop_assert_eq!(&fates[p.task], &Fate::Waiting, "task {} placed twice", p.task);
                        prop_assert!(!retired[p.node], "task {} went to retired node {}", p.task, p.node);
                        prop_assert!(avoids[p.task] != Some(p.node), "task {} went back to node {}", p.task, p.node);
                        avoids[p.task] = None;
                        fates[p.task] =
                            Fate::Running(p.node, p.slots.iter().map(Slot::device_id).collect());
                    }
                    Ok(())
                };
                for step in steps {
                    match step {
                        Step::Assign => assign(&mut scheduler, &mut fates, &retired, &mut avoids)?,
                        Step::Finish(n) => {
                            let live = live(&fates);
                            if let Some(&task) = live.get(n % live.len().max(1)) {
                                scheduler.finished(task);
                                fates[task] = Fate::Done;
                            }
                        }
                        Step::Requeue(n) => {
                            let live = live(&fates);
                            if let Some(&task) = live.get(n % live.len().max(1)) {
                                let avoid = match &fates[task] {
                                    Fate::Running(node, _) => Some(*node),
                                    _ => None,
                                };
                                prop_assert!(scheduler.requeue(task, avoid));
                                avoids[task] = avoid;
                                fates[task] = Fate::Waiting;
                            }
                        }
                        Step::DropUnplaceable => {
                            for task in scheduler.unplaceable() {
                                prop_assert_eq!(&fates[task], &Fate::Waiting, "task {} dropped while running", task);
                                fates[task] = Fate::Done;
                            }
                        }
                        Step::Retire(node) => {
                            scheduler.retire(node);
                            retired[node] = true;
                        }
                        Step::Renew(node, gpus, split) => {
                            let slots = node_slots(&inventory(node + 10, gpus, if split { 2 } else { 0 }));
                            scheduler.renew(node, slots);
                            retired[node] = false;
                            for fate in fates.iter_mut() {
                                if matches!(fate, Fate::Running(n, _) if *n == node) {
                                    *fate = Fate::Orphan;
                                }
                            }
                        }
                    }
                    check(&fates, &retired, per_node)?;
                    prop_assert_eq!(scheduler.done(), fates.iter().all(|f| *f == Fate::Done));
                }
                // Then every node comes back roomy and everything runs to its end, once.
                for (node, retired) in retired.iter_mut().enumerate() {
                    scheduler.renew(node, roomy(node + 20));
                    *retired = false;
                    for fate in fates.iter_mut() {
                        if matches!(fate, Fate::Running(n, _) if *n == node) {
                            *fate = Fate::Orphan;
                        }
                    }
                }
                for _ in 0..(count * 2 + 2) {
                    assign(&mut scheduler, &mut fates, &retired, &mut avoids)?;
                    check(&fates, &retired, per_node)?;
                    for task in live(&fates) {
                        scheduler.finished(task);
                        fates[task] = Fate::Done;
                    }
                }
                prop_assert!(fates.iter().all(|f| *f == Fate::Done), "{:?}", fates);
                prop_assert!(scheduler.done());
            }
        }
    }
}
