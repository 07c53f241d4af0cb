//! Where typed tasks that may block run: [`TaskThreads`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a queued task may wait without starting before it gets a thread of its own.
pub const STARTED_WITHIN: Duration = Duration::from_millis(10);

type Job = Box<dyn FnOnce() + Send>;

/// Runs tasks that may block on threads of tokio's blocking pool, a few at a time.
///
/// `spawn_blocking` for each task wakes a parked thread for each task, and the same again to
/// hand the result back; for a short task on a few cores those wake-ups cost as much as the
/// rest of its dispatch. Here up to one drainer per core takes queued tasks one after
/// another and parks nobody while one is queued. A task that blocks holds its drainer, so a
/// task still queued after [`STARTED_WITHIN`] asks for one more ([`TaskThreads::unstick`]):
/// a task that blocks holds up those behind it that long at most.
pub struct TaskThreads {
    state: Mutex<State>,
    /// Drainers kept going while tasks are queued: the cores.
    base: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    drainers: usize,
}

impl Default for TaskThreads {
    fn default() -> Self {
        TaskThreads {
            state: Mutex::default(),
            base: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl TaskThreads {
    /// Queues `job`, starting a drainer if fewer than one per core run. Returns a flag that
    /// turns true once a drainer starts the job. Call from within the tokio runtime.
    pub fn submit(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> Arc<AtomicBool> {
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let job: Job = Box::new(move || {
            flag.store(true, Ordering::Release);
            job();
        });
        let mut state = self.state.lock().expect("task threads lock");
        state.queue.push_back(job);
        if state.drainers < self.base {
            state.drainers += 1;
            drop(state);
            self.start_drainer();
        }
        started
    }

    /// One more drainer, whatever the count, while tasks are queued: those running block.
    pub fn unstick(self: &Arc<Self>) {
        let mut state = self.state.lock().expect("task threads lock");
        if state.queue.is_empty() {
            return;
        }
        state.drainers += 1;
        drop(state);
        self.start_drainer();
    }

    fn start_drainer(self: &Arc<Self>) {
        let threads = self.clone();
        tokio::task::spawn_blocking(move || loop {
            let job = {
                let mut state = threads.state.lock().expect("task threads lock");
                match state.queue.pop_front() {
                    Some(job) => job,
                    None => {
                        state.drainers -= 1;
                        return;
                    }
                }
            };
            job();
        });
    }

    #[cfg(test)]
    fn drainers(&self) -> usize {
        self.state.lock().expect("task threads lock").drainers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_tasks_run_and_the_drainers_go_when_the_queue_is_empty() {
        let threads = Arc::new(TaskThreads::default());
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..1000u32 {
            let done = done.clone();
            threads.submit(move || done.send(i).unwrap());
        }
        let mut seen = Vec::new();
        while seen.len() < 1000 {
            seen.push(finished.recv().await.unwrap());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while threads.drainers() > 0 {
            assert!(std::time::Instant::now() < deadline, "drainers stayed");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_behind_blocked_ones_gets_a_thread_when_unstuck() {
        let threads = Arc::new(TaskThreads {
            state: Mutex::default(),
            base: 1,
        });
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker_started = threads.submit(move || {
            let _ = held.recv();
        });
        let (done, finished) = tokio::sync::oneshot::channel();
        let started = threads.submit(move || done.send(()).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !blocker_started.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the blocker never started"
            );
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(STARTED_WITHIN).await;
        assert!(
            !started.load(Ordering::Acquire),
            "the only drainer is blocked, so the second task waits"
        );
        threads.unstick();
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the unstuck task ran")
            .unwrap();
        release.send(()).unwrap();
    }
}
