//! End-to-end tests: the real `skyward` CLI, real `skyward-agent` processes, real QUIC with
//! real certificates, on loopback.

mod agent;
mod aws;
mod cli;
mod config;
mod digitalocean;
mod gpu;
mod mig;
mod orphans;
mod output;
mod pools;
mod readme;
mod reliability;
mod security;
mod selection;
mod shell;
mod slots;
mod spot;
mod training;
mod typed;
mod vastai;
mod verda;
mod workdir;
