//go:build tools

// The commands `cargo xtask e2e` builds from this module, named here so that
// `go mod tidy` keeps what they need in go.mod and go.sum.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
