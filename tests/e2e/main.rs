//! End-to-end tests: the real `skyward` CLI, real `skyward-agent` processes, real QUIC with
//! real certificates, on loopback.

mod agent;
mod aws;
mod cli;
mod digitalocean;
mod gpu;
mod mig;
mod orphans;
mod output;
mod readme;
mod security;
mod selection;
mod slots;
mod spot;
mod training;
mod vastai;
mod verda;
mod workdir;
