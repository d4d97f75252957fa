// Command mock-csi-driver serves Kubernetes' own CSI mock driver
// (k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock/service, the
// driver the Kubernetes e2e suite tests CSI with) on a unix socket: a CSI
// controller with ControllerPublish/Unpublish, written and maintained
// outside this project, for stowage's `--csi-driver` proxy tests.
//
// The mock keeps its volumes in memory and has one node, whose ID is the
// driver name; it publishes to that node ID only.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock/service"
)

func main() {
	endpoint := flag.String("endpoint", "", "where to serve: unix:///path/to/csi.sock")
	name := flag.String("name", service.Name, "driver name (also the mock's one node ID)")
	topology := flag.Bool("enable-topology", false, "report the mock's topology segment "+service.TopologyKey+"="+service.TopologyValue)
	attachLimit := flag.Int64("attach-limit", 0, "volumes publishable per node (0: no limit)")
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
		DriverName:     *name,
		EnableTopology: *topology,
		AttachLimit:    *attachLimit,
		IO:             service.OSDirIO{},
	})
	interceptors := []grpc.UnaryServerInterceptor{logCalls}
	if *record != "" {
		file, err := os.OpenFile(*record, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			log.Fatalf("opening %s: %v", *record, err)
		}
		defer file.Close()
		interceptors = append(interceptors, (&recorder{file: file}).record)
	}
	server := grpc.NewServer(grpc.ChainUnaryInterceptor(interceptors...))
	csi.RegisterIdentityServer(server, mock)
	csi.RegisterControllerServer(server, mock)
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

// logCalls logs each call and its error, if any.
func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	reply, err := handler(ctx, req)
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
