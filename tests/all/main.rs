//! End-to-end tests: the host driven through the kubelet simulator over real unix
//! sockets. One binary, a module per area.

mod foundation;
mod guest_errors;
mod kubelet_restarts;
mod live;
