//! The task both binaries share: the program sends `Sum`s, the custom agent runs them.

use serde::{Deserialize, Serialize};
use skyward_common::typed::{Task, TaskContext, TaskResult};

/// Adds up its values on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sum {
    pub values: Vec<u64>,
}

impl Task for Sum {
    const NAME: &'static str = "sum";
    const VERSION: u32 = 1;
    type Output = u64;

    fn run(self, _ctx: &TaskContext) -> TaskResult<u64> {
        // A panic in a task comes back to the caller as an error with its message; this one
        // shows it (a real task would return an error instead).
        Ok(self
            .values
            .iter()
            .try_fold(0u64, |sum, v| sum.checked_add(*v))
            .expect("sum overflows u64"))
    }
}
