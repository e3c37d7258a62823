package conveyor

// The worker runtime: the protocol of docs/worker-protocol.md, as sdk/python/conveyor/worker.py
// and workers/node/lib/worker.js implement it.
//
//	worker := conveyor.NewWorker(conveyor.WorkerOptions{Queues: []string{"default"}, Concurrency: 8})
//	worker.MustRegister("add", func(ctx context.Context, x, y int) (int, error) { return x + y, nil })
//	ctx, stop := conveyor.SignalContext() // SIGTERM/SIGINT: drain, then Run returns
//	defer stop()
//	err := worker.Run(ctx)
//
// One stream carries everything. A session goroutine (session.go) owns the stream's sending
// side; tasks run in their own goroutines (execution.go) and hand their reports to the worker's
// pending lists, which the session flushes. Results stay in `unacked` until the server acks
// them and are sent again after a reconnect.

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SDKVersion is sent in Hello.
const SDKVersion = "conveyor-go/0.1.0"

const (
	reconnectInitial    = 200 * time.Millisecond
	reconnectMax        = 5 * time.Second
	defaultDrainTimeout = 30 * time.Second
	defaultConcurrency  = 4
	// After the last results of a graceful stop, wait this long at most for their acks.
	ackWait = time.Second
	// The largest message this worker accepts; the server splits assignment batches to fit.
	maxReceiveBytes = 64 << 20
)

// Status codes that reconnecting cannot fix.
var fatalCodes = map[codes.Code]bool{
	codes.InvalidArgument: true, codes.PermissionDenied: true,
	codes.Unauthenticated: true, codes.FailedPrecondition: true,
}

// WorkerOptions configure a Worker; zero values take the defaults.
type WorkerOptions struct {
	ConnOptions
	// Queues to pull from (["default"]).
	Queues []string
	// Tasks run at once (4).
	Concurrency int
	// Tasks held per concurrency slot (1): the window the server fills is Concurrency×Prefetch.
	Prefetch int
	// Stable worker id; the server assigns one when empty.
	WorkerID string
	// How long a graceful stop waits for running tasks (30 s).
	DrainTimeout time.Duration
	// Where the worker logs (log.Default()).
	Logger *log.Logger
}

// Worker runs registered Go functions for the tasks the server assigns.
type Worker struct {
	opts     WorkerOptions
	handlers map[string]*handler
	infos    map[string]*pb.TaskInfo
	log      *log.Logger

	mu       sync.Mutex
	running  map[string]*execution // task id -> running attempt
	waiting  []*pb.Assignment      // assigned beyond Concurrency (the prefetched ones)
	unacked  map[string]*pb.TaskOutcome
	pending  reports       // to send on the next flush
	kick     chan struct{} // wakes the session to flush
	idle     chan struct{} // closed when nothing is running or waiting; nil otherwise
	workerID string
	drained  atomic.Bool // the server sent Drain: Run returns after the drain, as a stop does
}

// reports waits for the session to send it.
type reports struct {
	started  []*pb.LeaseRef
	results  []*pb.TaskOutcome
	rejects  []*pb.RejectedTask
	progress []*pb.ProgressItem
}

// NewWorker makes a worker; register tasks, then Run it.
func NewWorker(opts WorkerOptions) *Worker {
	if len(opts.Queues) == 0 {
		opts.Queues = []string{"default"}
	}
	if opts.Concurrency < 1 {
		opts.Concurrency = defaultConcurrency
	}
	if opts.Prefetch < 1 {
		opts.Prefetch = 1
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = defaultDrainTimeout
	}
	if opts.Logger == nil {
		opts.Logger = log.Default()
	}
	return &Worker{
		opts: opts, handlers: map[string]*handler{}, infos: map[string]*pb.TaskInfo{}, log: opts.Logger,
		running: map[string]*execution{}, unacked: map[string]*pb.TaskOutcome{},
		kick: make(chan struct{}, 1), workerID: opts.WorkerID,
	}
}

// Register adds a task: `fn` is a Go function (see handler.go for the accepted shapes);
// description is shown by `conveyor tasks`.
func (w *Worker) Register(name string, fn any, description ...string) error {
	if name == "" {
		return fmt.Errorf("a task needs a name")
	}
	if _, taken := w.handlers[name]; taken {
		return fmt.Errorf("task %q is registered twice", name)
	}
	h, err := newHandler(fn)
	if err != nil {
		return fmt.Errorf("task %q: %w", name, err)
	}
	info := &pb.TaskInfo{Name: name}
	if len(description) > 0 {
		info.Description = description[0]
	}
	w.handlers[name], w.infos[name] = h, info
	return nil
}

// MustRegister is Register that panics on a bad function (for registration at startup).
func (w *Worker) MustRegister(name string, fn any, description ...string) {
	if err := w.Register(name, fn, description...); err != nil {
		panic(err)
	}
}

// SignalContext is a context cancelled by SIGTERM or SIGINT: pass it to Run to drain on them.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
}

// Run connects (and reconnects after failures, with backoff) and runs tasks until ctx ends
// or the server sends Drain (it believes the worker hung); then it drains: Goodbye, running
// tasks finish (up to DrainTimeout), their results are sent, and Run returns nil. It returns an error the server's refusal cannot recover from
// (PERMISSION_DENIED, UNAUTHENTICATED, ...).
func (w *Worker) Run(ctx context.Context) error {
	if len(w.handlers) == 0 {
		return fmt.Errorf("no tasks registered")
	}
	// gRPC's own reconnect backoff (1 s at first) would delay ours: a worker should be back
	// within the server's stream grace (2 s) to resend its results.
	conn, err := w.opts.dial(context.Background(), grpc.WithConnectParams(grpc.ConnectParams{
		Backoff: backoff.Config{BaseDelay: reconnectInitial, Multiplier: 2, Jitter: 0.2, MaxDelay: reconnectMax},
	}))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := pb.NewWorkerServiceClient(conn)
	defer w.abandon()
	delay := reconnectInitial
	for ctx.Err() == nil {
		welcomed, err := w.runSession(ctx, client)
		if ctx.Err() != nil || w.drained.Load() {
			break
		}
		if code := status.Code(err); fatalCodes[code] {
			return err
		}
		if welcomed {
			delay = reconnectInitial
		}
		w.log.Printf("conveyor: stream broke (%v); reconnecting in %v", err, delay)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
		delay = min(delay*2, reconnectMax)
	}
	w.log.Printf("conveyor: worker stopped")
	return nil
}

func min(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

// abandon stops what still runs when Run returns; those tasks are not reported (the server
// hands them to another worker when their leases lapse).
func (w *Worker) abandon() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.running {
		e.stop(stopShutdown)
	}
	w.waiting = nil
}

func (w *Worker) hello() *pb.Hello {
	names := make([]string, 0, len(w.handlers))
	for name := range w.handlers {
		names = append(names, name)
	}
	sort.Strings(names)
	infos := make([]*pb.TaskInfo, len(names))
	for i, name := range names {
		infos[i] = w.infos[name]
	}
	hostname, _ := os.Hostname()
	w.mu.Lock()
	defer w.mu.Unlock()
	// After a reconnect: the tasks still running or waiting here, so the server keeps their
	// leases with this stream instead of handing them out again when the old stream's grace ends.
	held := make([]*pb.LeaseRef, 0, len(w.running)+len(w.waiting))
	for _, e := range w.running {
		held = append(held, &pb.LeaseRef{TaskId: e.assignment.Task.GetId(), LeaseToken: e.assignment.LeaseToken})
	}
	for _, assignment := range w.waiting {
		held = append(held, &pb.LeaseRef{TaskId: assignment.Task.GetId(), LeaseToken: assignment.LeaseToken})
	}
	return &pb.Hello{
		WorkerId: w.workerID, Language: "go", SdkVersion: SDKVersion, Queues: w.opts.Queues,
		TaskNames: names, Tasks: infos, MaxInFlight: int32(w.opts.Concurrency * w.opts.Prefetch),
		Hostname: hostname, Pid: int32(os.Getpid()), MaxReceiveBytes: maxReceiveBytes, Held: held,
	}
}

// wake asks the session to flush the pending reports.
func (w *Worker) wake() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// accept takes an assignment: runs it, queues it for a free slot, or rejects an unknown name.
func (w *Worker) accept(assignment *pb.Assignment) {
	task := assignment.Task
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.handlers[task.GetName()]; !ok {
		w.pending.rejects = append(w.pending.rejects, &pb.RejectedTask{
			TaskId: task.GetId(), LeaseToken: assignment.LeaseToken,
			Reason: fmt.Sprintf("no task named %q is registered on this worker (go)", task.GetName()),
		})
		w.wake()
		return
	}
	if len(w.running) >= w.opts.Concurrency {
		w.waiting = append(w.waiting, assignment)
		return
	}
	w.startLocked(assignment)
}

// cancel stops the named tasks; a waiting one is reported cancelled at once.
func (w *Worker) cancel(taskIDs []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, id := range taskIDs {
		if e, ok := w.running[id]; ok {
			e.stop(stopCancelled)
		}
		for i, assignment := range w.waiting {
			if assignment.Task.GetId() == id {
				w.waiting = append(w.waiting[:i], w.waiting[i+1:]...)
				now := nowProto()
				w.reportLocked(&pb.TaskOutcome{
					TaskId: id, LeaseToken: assignment.LeaseToken, Outcome: pb.Outcome_OUTCOME_CANCELLED,
					StartedAt: now, FinishedAt: now,
				})
				break
			}
		}
	}
	w.settleLocked()
}

// acked forgets results the server answered.
func (w *Worker) acked(acks []*pb.ResultAck) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, ack := range acks {
		if held, ok := w.unacked[ack.TaskId]; ok && held.LeaseToken == ack.LeaseToken {
			delete(w.unacked, ack.TaskId)
		}
		if ack.Status != pb.AckStatus_ACK_STATUS_ACCEPTED {
			w.log.Printf("conveyor: result of %s not recorded: %s", ack.TaskId, ack.Status)
		}
	}
}

func (w *Worker) reportLocked(outcome *pb.TaskOutcome) {
	w.unacked[outcome.TaskId] = outcome
	w.pending.results = append(w.pending.results, outcome)
	w.wake()
}

// finish records an attempt's end and starts a waiting assignment in its slot.
func (w *Worker) finish(e *execution, outcome *pb.TaskOutcome) {
	w.mu.Lock()
	defer w.mu.Unlock()
	id := e.assignment.Task.GetId()
	if w.running[id] == e {
		delete(w.running, id)
	}
	if outcome != nil {
		w.reportLocked(outcome)
	}
	for len(w.waiting) > 0 && len(w.running) < w.opts.Concurrency {
		next := w.waiting[0]
		w.waiting = w.waiting[1:]
		w.startLocked(next)
	}
	w.settleLocked()
}

// settleLocked wakes the drain when nothing is left to run.
func (w *Worker) settleLocked() {
	if len(w.running)+len(w.waiting) == 0 && w.idle != nil {
		close(w.idle)
		w.idle = nil
	}
}

// whenIdle is closed once nothing runs or waits.
func (w *Worker) whenIdle() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	done := make(chan struct{})
	if len(w.running)+len(w.waiting) == 0 {
		close(done)
		return done
	}
	if w.idle == nil {
		w.idle = make(chan struct{})
	}
	return w.idle
}

// takePending hands the session what to send; with resend, every unacked result too (after a
// reconnect, where the server decides whether they still count).
func (w *Worker) takePending(resend bool) reports {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.pending
	w.pending = reports{}
	if resend {
		out.results = out.results[:0]
		for _, outcome := range w.unacked {
			out.results = append(out.results, outcome)
		}
	}
	return out
}

// dropStreamReports forgets the reports that only meant something on the stream that ended
// (Started, Reject and Progress name its leases); results stay in unacked.
func (w *Worker) dropStreamReports() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.pending = reports{}
}

func (w *Worker) unackedCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.unacked)
}
