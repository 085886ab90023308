//! embedding-server as a library: the binary's modules, public so that tests and benchmarks can drive the
//! engine without HTTP.

pub mod cli;
pub mod commands;
pub mod models;
pub mod server;
