//go:build tools

// Package tools records the commands built from this module and the
// modules whose CRDs it provides.
package tools

import (
	_ "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller"
	_ "sigs.k8s.io/gateway-api/apis/v1beta1"
)
