// Command mock-csi-driver serves Kubernetes' own CSI mock driver
// (k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock/service, the
// driver the Kubernetes e2e suite tests CSI with) on a unix socket: a CSI
// controller with ControllerPublish/Unpublish, written and maintained
// outside this project, for stowage's `--csi-driver` proxy tests.
//
// The mock keeps its volumes in memory and has one node, whose ID is the
// driver name; it publishes to that node ID only. Its ListVolumes reports
// every volume as published to that node, published or not; served here,
// it reports the node IDs the mock has really published each volume to, so
// that a driver losing a publication can be told from one keeping it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock/service"
)

func main() {
	endpoint := flag.String("endpoint", "", "where to serve: unix:///path/to/csi.sock")
	name := flag.String("name", service.Name, "driver name (also the mock's one node ID)")
	topology := flag.Bool("enable-topology", false, "report the mock's topology segment "+service.TopologyKey+"="+service.TopologyValue)
	attachLimit := flag.Int64("attach-limit", 0, "volumes publishable per node (0: no limit)")
	nodeExpansion := flag.Bool("node-expansion-required", false, "answer ControllerExpandVolume of a filesystem volume with node_expansion_required (a block volume needs nothing on the node)")
	maxSize := flag.Int64("max-volume-size", 0, "answer OutOfRange to a ControllerExpandVolume beyond this many bytes (0: no limit)")
	capacity := flag.String("capacity", "", "answer GetCapacity per topology segment: VALUE=BYTES,... (a segment holding VALUE gets BYTES, others 0), with maximum_volume_size the lesser of BYTES and --max-volume-size when that is set")
	record := flag.String("record", "", "append every call to this file, one JSON line each: {\"method\": ..., \"request\": ...}")
	flag.Parse()
	// Tests read retry intervals off these lines.
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	path, ok := strings.CutPrefix(*endpoint, "unix://")
	if !ok || path == "" {
		log.Fatalf("--endpoint must be unix:///path, not %q", *endpoint)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing stale %s: %v", path, err)
	}
	listener, err := net.Listen("unix", path)
	if err != nil {
		log.Fatalf("listening on %s: %v", path, err)
	}
	mock := service.New(service.Config{
		DriverName:            *name,
		EnableTopology:        *topology,
		AttachLimit:           *attachLimit,
		NodeExpansionRequired: *nodeExpansion,
		IO:                    service.OSDirIO{},
	})
	perSegment, err := parseCapacity(*capacity)
	if err != nil {
		log.Fatalf("--capacity: %v", err)
	}
	interceptors := []grpc.UnaryServerInterceptor{logCalls, limitExpansion(*maxSize), blockNeedsNoNode}
	if *record != "" {
		file, err := os.OpenFile(*record, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			log.Fatalf("opening %s: %v", *record, err)
		}
		defer file.Close()
		interceptors = append(interceptors, (&recorder{file: file}).record)
	}
	// Last: it answers GetCapacity itself, after the others have seen it.
	if perSegment != nil {
		interceptors = append(interceptors, capacityBySegment(perSegment, *maxSize))
	}
	server := grpc.NewServer(grpc.ChainUnaryInterceptor(interceptors...))
	csi.RegisterIdentityServer(server, mock)
	csi.RegisterControllerServer(server, published{mock})
	csi.RegisterNodeServer(server, mock)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		server.GracefulStop()
	}()
	log.Printf("serving CSI mock driver %s on %s", *name, path)
	if err := server.Serve(listener); err != nil {
		log.Fatalf("serving: %v", err)
	}
}

// limitExpansion refuses to expand beyond max bytes, as a driver whose
// backing store is full answers: the error a user must fix by asking for
// less.
func limitExpansion(max int64) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if expand, ok := req.(*csi.ControllerExpandVolumeRequest); ok && max > 0 {
			if wanted := expand.GetCapacityRange().GetRequiredBytes(); wanted > max {
				return nil, status.Errorf(codes.OutOfRange, "%d bytes requested, at most %d available", wanted, max)
			}
		}
		return handler(ctx, req)
	}
}

// parseCapacity reads VALUE=BYTES,...; nil when s is empty.
func parseCapacity(s string) (map[string]int64, error) {
	if s == "" {
		return nil, nil
	}
	out := map[string]int64{}
	for _, pair := range strings.Split(s, ",") {
		value, bytes, ok := strings.Cut(pair, "=")
		n, err := strconv.ParseInt(bytes, 10, 64)
		if !ok || err != nil || value == "" {
			return nil, fmt.Errorf("%q: expected VALUE=BYTES", pair)
		}
		out[value] = n
	}
	return out, nil
}

// capacityBySegment answers GetCapacity from perSegment, as a driver whose
// pools differ per zone: the mock's own answer is one figure for every
// segment.
func capacityBySegment(perSegment map[string]int64, max int64) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		get, ok := req.(*csi.GetCapacityRequest)
		if !ok {
			return handler(ctx, req)
		}
		var available int64
		for _, value := range get.GetAccessibleTopology().GetSegments() {
			if bytes, ok := perSegment[value]; ok {
				available = bytes
				break
			}
		}
		reply := &csi.GetCapacityResponse{AvailableCapacity: available}
		if max > 0 {
			// As drivers do: no one volume is larger than what is left.
			reply.MaximumVolumeSize = wrapperspb.Int64(min(max, available))
		}
		return reply, nil
	}
}

// blockNeedsNoNode answers a block volume's ControllerExpandVolume without
// node_expansion_required, as drivers whose devices need no resize on the
// node do; a filesystem volume keeps the mock's answer.
func blockNeedsNoNode(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	reply, err := handler(ctx, req)
	expand, ok := req.(*csi.ControllerExpandVolumeRequest)
	if err == nil && ok && expand.GetVolumeCapability().GetBlock() != nil {
		reply.(*csi.ControllerExpandVolumeResponse).NodeExpansionRequired = false
	}
	return reply, err
}

// logCalls logs each call and its error, if any.
// published is the mock with a ListVolumes that tells where each volume
// is published: the mock records a publish to node N as the key "N/dev" in
// the volume's context.
type published struct{ service.Service }

func (p published) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	reply, err := p.Service.ListVolumes(ctx, req)
	if err != nil {
		return nil, err
	}
	for _, e := range reply.Entries {
		// The mock hands out its own volume, whose context map a publish
		// changes in place: reply with a copy, taken while calls are
		// serialized (logCalls).
		volume := *e.Volume
		volume.VolumeContext = map[string]string{}
		var nodes []string
		for k, v := range e.Volume.VolumeContext {
			volume.VolumeContext[k] = v
			if node, ok := strings.CutSuffix(k, "/dev"); ok && v != "" {
				nodes = append(nodes, node)
			}
		}
		e.Volume = &volume
		if e.Status == nil {
			e.Status = &csi.ListVolumesResponse_VolumeStatus{}
		}
		e.Status.PublishedNodeIds = nodes
	}
	return reply, nil
}

// calls serializes the mock's calls, so that none reads a volume another
// one is changing.
var calls sync.Mutex

// logCalls runs one call at a time (calls) and logs each with its error,
// if any.
func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	calls.Lock()
	reply, err := handler(ctx, req)
	calls.Unlock()
	if err != nil {
		log.Printf("%s %v: %v", info.FullMethod, req, err)
	} else {
		log.Printf("%s %v", info.FullMethod, req)
	}
	return reply, err
}

// recorder appends each request, as protojson, to a file: what the tests
// compare between callers (external-provisioner and stowage).
type recorder struct {
	mu   sync.Mutex
	file *os.File
}

// recorded is one line of the file. The request stays raw JSON, its fields
// named as in the CSI spec's protobuf (snake_case) and emitted even when
// unset, so that a field one caller sets and the other leaves out shows.
// Fields newer than the spec this module pins are not in the JSON: their
// wire bytes are kept in unknown_fields (base64), so they show too.
type recorded struct {
	Method        string          `json:"method"`
	Request       json.RawMessage `json:"request"`
	UnknownFields []byte          `json:"unknown_fields,omitempty"`
}

func (r *recorder) record(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	var message proto.Message
	switch m := req.(type) {
	case proto.Message:
		message = m
	case protoadapt.MessageV1:
		// The CSI spec release this module pins was generated for the older
		// protobuf API, whose messages have no reflection of their own.
		message = protoadapt.MessageV2Of(m)
	default:
		log.Fatalf("recording %s: %T is not a protobuf message", info.FullMethod, req)
	}
	body, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(message)
	if err != nil {
		log.Fatalf("recording %s: %v", info.FullMethod, err)
	}
	line, err := json.Marshal(recorded{
		Method:        info.FullMethod,
		Request:       body,
		UnknownFields: message.ProtoReflect().GetUnknown(),
	})
	if err != nil {
		log.Fatalf("recording %s: %v", info.FullMethod, err)
	}
	r.mu.Lock()
	_, err = r.file.Write(append(line, '\n'))
	r.mu.Unlock()
	if err != nil {
		log.Fatalf("recording %s: %v", info.FullMethod, err)
	}
	return handler(ctx, req)
}
