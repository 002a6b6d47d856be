//! End-to-end tests: the host driven through the kubelet simulator over real unix
//! sockets. One binary, a module per area.

mod apiserver;
mod bad_modules;
mod bad_requests;
mod cdi;
mod dra;
mod exports;
mod foundation;
mod fpga;
mod generic;
mod hostile;
mod interop;
mod kubelet_restarts;
mod live;
mod observability;
mod python;
mod snapshot;
mod warm;
