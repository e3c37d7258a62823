package conveyor_test

// A real `conveyor serve` for the end-to-end tests: SQLite broker and backend in a temp dir, a
// free port, stopped at the end of the test. The `conveyor` command comes from CONVEYOR_BIN or
// PATH (the project's virtualenv).

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
)

type testServer struct {
	address string
	logPath string
}

func conveyorCommand(t *testing.T) string {
	if bin := os.Getenv("CONVEYOR_BIN"); bin != "" {
		return bin
	}
	bin, err := exec.LookPath("conveyor")
	if err != nil {
		t.Skip("needs the `conveyor` command on PATH (activate the project's .venv) or CONVEYOR_BIN")
	}
	return bin
}

func freePort(t *testing.T) int {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	return listener.Addr().(*net.TCPAddr).Port
}

// startServer runs `conveyor serve` until the test ends.
func startServer(t *testing.T) *testServer {
	t.Helper()
	bin, dir := conveyorCommand(t), t.TempDir()
	db := "sqlite:///" + filepath.Join(dir, "conveyor.db")
	for attempt := 0; attempt < 3; attempt++ { // another process may take the port first
		port := freePort(t)
		logPath := filepath.Join(dir, fmt.Sprintf("server-%d.log", port))
		logFile, err := os.Create(logPath)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "serve", "--port", fmt.Sprint(port), "--broker", db, "--backend", db)
		cmd.Dir, cmd.Stdout, cmd.Stderr = dir, logFile, logFile
		cmd.Env = append(os.Environ(), "CONVEYOR_HTTP_PORT=0")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			_ = cmd.Process.Signal(os.Interrupt)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
			logFile.Close()
		})
		server := &testServer{address: fmt.Sprintf("127.0.0.1:%d", port), logPath: logPath}
		if server.waitServing(exited) {
			return server
		}
		if !strings.Contains(server.log(), "address in use") {
			t.Fatalf("the server did not start:\n%s", server.log())
		}
	}
	t.Fatal("no free port for the server")
	return nil
}

func (s *testServer) log() string {
	text, _ := os.ReadFile(s.logPath)
	return string(text)
}

// waitServing polls the health service; false when the process exited first.
func (s *testServer) waitServing(exited <-chan struct{}) bool {
	deadline := time.Now().Add(30 * time.Second)
	conn, err := grpc.Dial(s.address, grpc.WithInsecure())
	if err != nil {
		return false
	}
	defer conn.Close()
	health := grpc_health_v1.NewHealthClient(conn)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return false
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		response, err := health.Check(ctx, &grpc_health_v1.HealthCheckRequest{})
		cancel()
		if err == nil && response.Status == grpc_health_v1.HealthCheckResponse_SERVING {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// proxy forwards TCP to a server and can cut the connections: the worker's stream breaks
// and reconnecting fails until it is restored.
type proxy struct {
	address string
	target  string
	mu      sync.Mutex
	conns   []net.Conn
	down    bool
}

func startProxy(t *testing.T, target string) *proxy {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { listener.Close() })
	p := &proxy{address: listener.Addr().String(), target: target}
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go p.serve(conn)
		}
	}()
	t.Cleanup(func() { p.cut(false) })
	return p
}

func (p *proxy) serve(conn net.Conn) {
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		conn.Close()
		return
	}
	upstream, err := net.Dial("tcp", p.target)
	if err != nil {
		p.mu.Unlock()
		conn.Close()
		return
	}
	p.conns = append(p.conns, conn, upstream)
	p.mu.Unlock()
	go func() { _, _ = io.Copy(upstream, conn); upstream.Close() }()
	_, _ = io.Copy(conn, upstream)
	conn.Close()
}

// cut closes every connection; with down, new ones are refused until restore.
func (p *proxy) cut(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	for _, conn := range p.conns {
		conn.Close()
	}
	p.conns = nil
}

func (p *proxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
}
