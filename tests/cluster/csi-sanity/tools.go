//go:build tools

// Package tools records the csi-sanity command built from this module.
package tools

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
