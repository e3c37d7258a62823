package conveyor_test

// End to end: a real server, the Go client and the Go worker runtime in this process.

import (
	"context"
	"errors"
	"io"
	"log"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/conveyor-dev/conveyor/sdk/go/conveyor"
	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
)

const testTimeout = 30 * time.Second

type order struct {
	Item     string `json:"item"`
	Quantity int    `json:"quantity"`
}

// runWorker runs a worker with the given tasks until the test ends (or its stop is called);
// stop returns Run's error.
func runWorker(t *testing.T, address string, opts conveyor.WorkerOptions, tasks map[string]any) func() error {
	t.Helper()
	opts.Address = address
	if opts.Logger == nil {
		opts.Logger = log.New(testWriter{t}, "", log.Lmicroseconds)
	}
	worker := conveyor.NewWorker(opts)
	for name, fn := range tasks {
		if err := worker.Register(name, fn); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- worker.Run(ctx) }()
	var result error
	stopped := false
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case result = <-done:
			case <-time.After(testTimeout):
				t.Error("the worker did not stop")
			}
		}
		return result
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

func newClient(t *testing.T, address string) (*conveyor.Client, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	client, err := conveyor.NewClient(ctx, conveyor.ConnOptions{Address: address})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client, ctx
}

func submit(t *testing.T, ctx context.Context, client *conveyor.Client, canvas conveyor.Canvas) *conveyor.AsyncResult {
	t.Helper()
	result, err := client.Submit(ctx, canvas)
	if err != nil {
		t.Fatal(err)
	}
	return result
}

func get(t *testing.T, ctx context.Context, result *conveyor.AsyncResult) any {
	t.Helper()
	value, err := result.Get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return value
}

// waitStarted watches a task until it is STARTED.
func waitStarted(t *testing.T, ctx context.Context, client *conveyor.Client, id string) {
	t.Helper()
	watch, err := client.Watch(ctx, []string{id}, "")
	if err != nil {
		t.Fatal(err)
	}
	for {
		event, err := watch.Next()
		if err != nil {
			t.Fatalf("task %s ended its watch before STARTED: %v", id, err)
		}
		if event.State == pb.TaskState_TASK_STATE_STARTED {
			return
		}
	}
}

// watchAll reads a watch to its end (every watched task terminal).
func watchAll(t *testing.T, ctx context.Context, client *conveyor.Client, ids []string, workflowID string) []*pb.TaskEvent {
	t.Helper()
	watch, err := client.Watch(ctx, ids, workflowID)
	if err != nil {
		t.Fatal(err)
	}
	var events []*pb.TaskEvent
	for {
		event, err := watch.Next()
		if errors.Is(err, io.EOF) {
			return events
		}
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, event)
	}
}

func failed(t *testing.T, err error) *conveyor.TaskFailedError {
	t.Helper()
	var taskFailed *conveyor.TaskFailedError
	if !errors.As(err, &taskFailed) {
		t.Fatalf("want a *TaskFailedError, got %v", err)
	}
	return taskFailed
}

func TestValuesRoundTripThroughAGoWorker(t *testing.T) {
	server := startServer(t)
	runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"echo": func(value any) any { return value },
	})
	client, ctx := newClient(t, server.address)
	cases := []struct{ sent, want any }{
		{42, int64(42)},
		{int64(-1 << 63), int64(-1 << 63)},
		{2.5, 2.5},
		{"héllo ✓", "héllo ✓"},
		{true, true},
		{nil, nil},
		{[]byte{0, 1, 255}, []byte{0, 1, 255}},
		{map[string]any{"list": []any{1, "x", []byte("hi"), nil}}, map[string]any{"list": []any{int64(1), "x", []byte("hi"), nil}}},
		{order{"tea", 2}, map[string]any{"item": "tea", "quantity": int64(2)}},
	}
	for _, c := range cases {
		got := get(t, ctx, submit(t, ctx, client, conveyor.NewSignature("echo", c.sent)))
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("echo(%#v) = %#v, want %#v", c.sent, got, c.want)
		}
	}
}

func TestTypedFunctionsGetDecodedArgs(t *testing.T) {
	server := startServer(t)
	runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"add": func(ctx context.Context, x, y int) (int, error) { return x + y, nil },
		"describe": func(o order, note string) string {
			return note + ": " + o.Item
		},
		"sum": func(values ...float64) float64 {
			total := 0.0
			for _, v := range values {
				total += v
			}
			return total
		},
		"kwarg": func(ctx context.Context) (string, error) {
			var name string
			_, err := conveyor.TaskFromContext(ctx).Kwarg("name", &name)
			return "hello " + name, err
		},
	})
	client, ctx := newClient(t, server.address)
	if got := get(t, ctx, submit(t, ctx, client, conveyor.NewSignature("add", 2, 3))); got != int64(5) {
		t.Errorf("add = %#v", got)
	}
	describe := conveyor.NewSignature("describe", order{"tea", 2}, "order")
	if got := get(t, ctx, submit(t, ctx, client, describe)); got != "order: tea" {
		t.Errorf("describe = %#v", got)
	}
	if got := get(t, ctx, submit(t, ctx, client, conveyor.NewSignature("sum", 1, 2.5, 3))); got != 6.5 {
		t.Errorf("sum = %#v", got)
	}
	kwarg := &conveyor.Signature{Name: "kwarg", Kwargs: map[string]any{"name": "go"}}
	if got := get(t, ctx, submit(t, ctx, client, kwarg)); got != "hello go" {
		t.Errorf("kwarg = %#v", got)
	}
	_, err := submit(t, ctx, client, conveyor.NewSignature("add", "two", 3)).Get(ctx)
	if failure := failed(t, err); failure.Type != "TypeError" {
		t.Errorf("add(\"two\", 3) failed with %s, want a TypeError", failure.Type)
	}
}

func TestErrorsKeepTheirTypeAndRetriesFollowThePolicy(t *testing.T) {
	server := startServer(t)
	var flakyRuns atomic.Int32
	runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"fail":   func(message string) error { return conveyor.Errorf("ValueError", "%s", message) },
		"reject": func() error { return conveyor.Reject(conveyor.Errorf("Permanent", "no")) },
		"panic":  func() error { panic("boom") },
		"flaky": func(ctx context.Context) (int32, error) {
			flakyRuns.Add(1)
			if attempt := conveyor.TaskFromContext(ctx).Attempt; attempt < 3 {
				return 0, conveyor.Retry(0.05, "not yet")
			}
			return conveyor.TaskFromContext(ctx).Attempt, nil
		},
	})
	client, ctx := newClient(t, server.address)
	retry := &conveyor.RetryPolicy{MaxAttempts: 3, Initial: 50 * time.Millisecond}

	_, err := submit(t, ctx, client, &conveyor.Signature{Name: "fail", Args: []any{"bad"}, Retry: retry}).Get(ctx)
	if failure := failed(t, err); failure.Type != "ValueError" || failure.Message != "bad" {
		t.Errorf("fail ended with %+v", failure)
	}
	rejected := submit(t, ctx, client, &conveyor.Signature{Name: "reject", Retry: retry})
	record, err := rejected.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if record.State != pb.TaskState_TASK_STATE_FAILURE || record.Attempts != 1 || record.Error.Type != "Permanent" {
		t.Errorf("a rejected task ended %s after %d attempts with %v", record.State, record.Attempts, record.Error)
	}
	_, err = submit(t, ctx, client, conveyor.NewSignature("panic")).Get(ctx)
	if failure := failed(t, err); failure.Type != "Panic" || failure.Traceback == "" {
		t.Errorf("a panic ended with %+v", failure)
	}
	if got := get(t, ctx, submit(t, ctx, client, conveyor.NewSignature("flaky"))); got != int64(3) || flakyRuns.Load() != 3 {
		t.Errorf("flaky returned %v after %d runs, want 3 after 3", got, flakyRuns.Load())
	}
}

func TestChainGroupAndChord(t *testing.T) {
	server := startServer(t)
	runWorker(t, server.address, conveyor.WorkerOptions{Concurrency: 4}, map[string]any{
		"add": func(x, y int64) int64 { return x + y },
		"mul": func(x, y int64) int64 { return x * y },
		"total": func(values []int64) int64 {
			var total int64
			for _, v := range values {
				total += v
			}
			return total
		},
	})
	client, ctx := newClient(t, server.address)
	add, mul := func(args ...any) *conveyor.Signature { return conveyor.NewSignature("add", args...) },
		func(args ...any) *conveyor.Signature { return conveyor.NewSignature("mul", args...) }

	chain := submit(t, ctx, client, conveyor.Chain(add(1, 2), mul(10), add(5)))
	if got := get(t, ctx, chain); got != int64(35) {
		t.Errorf("chain = %#v, want 35", got)
	}
	group := submit(t, ctx, client, conveyor.Group(add(1, 1), mul(2, 3), conveyor.Chain(add(1, 1), mul(5))))
	if got := get(t, ctx, group); !reflect.DeepEqual(got, []any{int64(2), int64(6), int64(10)}) {
		t.Errorf("group = %#v", got)
	}
	if len(group.TaskIDs) != 4 || group.WorkflowID == "" {
		t.Errorf("group made tasks %v in workflow %q", group.TaskIDs, group.WorkflowID)
	}
	chord := submit(t, ctx, client, conveyor.Chord(conveyor.Group(add(1, 1), add(2, 2), add(3, 3)), conveyor.NewSignature("total")))
	if got := get(t, ctx, chord); got != int64(12) {
		t.Errorf("chord = %#v, want 12", got)
	}
}

func TestCancelAndTimeLimitCancelTheTaskContext(t *testing.T) {
	server := startServer(t)
	stoppedBy := make(chan error, 2)
	runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"sleep": func(ctx context.Context, seconds float64) (float64, error) {
			select {
			case <-time.After(time.Duration(seconds * float64(time.Second))):
				return seconds, nil
			case <-ctx.Done():
				stoppedBy <- ctx.Err()
				return 0, ctx.Err()
			}
		},
	})
	client, ctx := newClient(t, server.address)

	cancelled := submit(t, ctx, client, conveyor.NewSignature("sleep", 30))
	waitStarted(t, ctx, client, cancelled.TaskID)
	if _, err := client.Cancel(ctx, cancelled.TaskID); err != nil {
		t.Fatal(err)
	}
	if failure := failed(t, second(cancelled.Get(ctx))); failure.State != pb.TaskState_TASK_STATE_CANCELLED {
		t.Errorf("a cancelled task ended %s", failure.State)
	}
	if err := <-stoppedBy; !errors.Is(err, context.Canceled) {
		t.Errorf("the task's context ended with %v", err)
	}

	limited := submit(t, ctx, client, &conveyor.Signature{Name: "sleep", Args: []any{30}, TimeLimit: 300 * time.Millisecond})
	started := time.Now()
	if failure := failed(t, second(limited.Get(ctx))); failure.Type != "TimeLimitExceeded" {
		t.Errorf("a task past its time limit ended with %+v", failure)
	}
	if elapsed := time.Since(started); elapsed > 10*time.Second {
		t.Errorf("the time limit took %v", elapsed)
	}
	<-stoppedBy
}

func second(_ any, err error) error { return err }

func TestProgressIsWatchable(t *testing.T) {
	server := startServer(t)
	release := make(chan struct{})
	defer func() {
		select {
		case <-release:
		default:
			close(release) // a failed test must not leave the task blocking the worker's drain
		}
	}()
	runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"steps": func(ctx context.Context, steps int) (int, error) {
			for step := 1; step <= steps; step++ {
				if err := conveyor.TaskFromContext(ctx).Progress(map[string]int{"step": step}); err != nil {
					return 0, err
				}
			}
			<-release
			return steps, nil
		},
	})
	client, ctx := newClient(t, server.address)
	result := submit(t, ctx, client, conveyor.NewSignature("steps", 3))
	waitStarted(t, ctx, client, result.TaskID)
	deadline := time.Now().Add(testTimeout)
	for {
		record, err := result.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		progress, _ := conveyor.FromValue(record.GetProgress())
		if reflect.DeepEqual(progress, map[string]any{"step": int64(3)}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("progress is %#v", progress)
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(release)
	var states []pb.TaskState
	for _, event := range watchAll(t, ctx, client, []string{result.TaskID}, "") {
		states = append(states, event.State)
	}
	if states[len(states)-1] != pb.TaskState_TASK_STATE_SUCCESS {
		t.Errorf("watched states %v", states)
	}
}

func TestConcurrencyBoundsRunningTasksAndPrefetchHoldsMore(t *testing.T) {
	server := startServer(t)
	var running, most atomic.Int32
	runWorker(t, server.address, conveyor.WorkerOptions{Concurrency: 2, Prefetch: 3}, map[string]any{
		"busy": func() int32 {
			now := running.Add(1)
			defer running.Add(-1)
			for {
				seen := most.Load()
				if now <= seen || most.CompareAndSwap(seen, now) {
					break
				}
			}
			time.Sleep(200 * time.Millisecond)
			return now
		},
	})
	client, ctx := newClient(t, server.address)
	var results []*conveyor.AsyncResult
	for i := 0; i < 8; i++ {
		results = append(results, submit(t, ctx, client, conveyor.NewSignature("busy")))
	}
	for _, result := range results {
		get(t, ctx, result)
	}
	if most.Load() != 2 {
		t.Errorf("%d tasks ran at once, want 2", most.Load())
	}
}

func TestStopDrainsRunningTasks(t *testing.T) {
	server := startServer(t)
	stop := runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"slow": func() string { time.Sleep(700 * time.Millisecond); return "done" },
	})
	client, ctx := newClient(t, server.address)
	result := submit(t, ctx, client, conveyor.NewSignature("slow"))
	waitStarted(t, ctx, client, result.TaskID)
	if err := stop(); err != nil {
		t.Fatalf("Run returned %v", err)
	}
	// Recorded before Run returned: no wait needed.
	record, err := result.Read(ctx)
	if err != nil || record.State != pb.TaskState_TASK_STATE_SUCCESS {
		t.Fatalf("after the drain the task is %s (%v)", record.GetState(), err)
	}
}

func TestResultsMadeWhileDisconnectedAreSentAfterTheReconnect(t *testing.T) {
	server := startServer(t)
	link := startProxy(t, server.address)
	release := make(chan struct{})
	var runs atomic.Int32
	runWorker(t, link.address, conveyor.WorkerOptions{}, map[string]any{
		"held": func() string { runs.Add(1); <-release; return "kept" },
	})
	client, ctx := newClient(t, server.address)
	result := submit(t, ctx, client, conveyor.NewSignature("held"))
	waitStarted(t, ctx, client, result.TaskID)
	link.cut(true)
	close(release)                     // the result is made with no stream to send it on
	time.Sleep(300 * time.Millisecond) // a reconnect attempt or two is refused meanwhile
	link.restore()
	if got := get(t, ctx, result); got != "kept" {
		t.Errorf("result %#v", got)
	}
	record, err := result.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if record.Attempts != 1 || runs.Load() != 1 {
		t.Errorf("the task ran %d times in %d attempts, want once (its result should have been resent)",
			runs.Load(), record.Attempts)
	}
}

func TestWatchFollowsAWorkflow(t *testing.T) {
	server := startServer(t)
	runWorker(t, server.address, conveyor.WorkerOptions{}, map[string]any{
		"add": func(x, y int) int { return x + y },
	})
	client, ctx := newClient(t, server.address)
	result := submit(t, ctx, client, conveyor.Chain(conveyor.NewSignature("add", 1, 1), conveyor.NewSignature("add", 1)))
	succeeded := map[string]bool{}
	for _, event := range watchAll(t, ctx, client, nil, result.WorkflowID) {
		if event.State == pb.TaskState_TASK_STATE_SUCCESS {
			succeeded[event.TaskId] = true
		}
	}
	if len(succeeded) != 2 {
		t.Errorf("watched %d tasks succeed, want 2", len(succeeded))
	}
}
