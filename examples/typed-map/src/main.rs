//! Builds a local pool of two nodes running `typed-map-agent`, sums 20 chunks of numbers on
//! them, prints and checks the sums, and tears the pool down.

use std::process::ExitCode;

use skyward::{self as api, ComputePool, Local};
use typed_map::Sum;

const CHUNKS: u64 = 20;
const PER_CHUNK: u64 = 10;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("typed-map: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), api::Error> {
    let agent = api::binary_beside_this_program("typed-map-agent")?;
    let pool = ComputePool::builder()
        .provider(Local)
        .nodes(2)
        .agent_binary(agent)
        .build()
        .await?;
    println!("pool {} is up: {}", pool.name(), pool.nodes().join(", "));
    let chunks: Vec<Vec<u64>> = (0..CHUNKS)
        .map(|c| (c * PER_CHUNK..(c + 1) * PER_CHUNK).collect())
        .collect();
    let expected: Vec<u64> = chunks.iter().map(|c| c.iter().sum()).collect();
    let sums = pool
        .map(chunks.into_iter().map(|values| Sum { values }))
        .await?;
    for (index, sum) in sums.iter().enumerate() {
        println!("chunk {index}: {sum}");
    }
    pool.shutdown().await?;
    if sums != expected {
        return Err(api::Error::Invalid(format!(
            "wrong sums: {sums:?}, expected {expected:?}"
        )));
    }
    println!("all {CHUNKS} sums are right");
    Ok(())
}
