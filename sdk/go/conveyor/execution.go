package conveyor

// One running attempt: its goroutine, its context (cancelled by CancelTasks, the time limit or
// a shutdown) and the TaskOutcome it ends with.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Why an attempt's context was cancelled.
type stopReason int

const (
	stopNone      stopReason = iota
	stopCancelled            // CancelTasks: reported OUTCOME_CANCELLED
	stopTimeLimit            // Signature.time_limit: reported as a TimeLimitExceeded failure
	stopShutdown             // the worker gave up draining: not reported, the server hands it on
)

// mapHeader marks a map's chunk task (docs/canvas.md): "map" (each arg is one call's arg) or
// "starmap" (each arg is one call's list of args); the task runs once per item.
const mapHeader = "conveyor-map"

type execution struct {
	assignment *pb.Assignment
	cancel     context.CancelFunc
	mu         sync.Mutex
	stoppedBy  stopReason
}

func (e *execution) stop(reason stopReason) {
	e.mu.Lock()
	if e.stoppedBy == stopNone {
		e.stoppedBy = reason
	}
	e.mu.Unlock()
	e.cancel()
}

func (e *execution) reason() stopReason {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stoppedBy
}

func nowProto() *timestamppb.Timestamp { return timestamppb.Now() }

// startLocked runs an assignment in its own goroutine (w.mu held).
func (w *Worker) startLocked(assignment *pb.Assignment) {
	ctx, cancel := context.WithCancel(context.Background())
	e := &execution{assignment: assignment, cancel: cancel}
	w.running[assignment.Task.GetId()] = e
	w.pending.started = append(w.pending.started, &pb.LeaseRef{
		TaskId: assignment.Task.GetId(), LeaseToken: assignment.LeaseToken,
	})
	w.wake()
	go func() {
		defer cancel()
		w.finish(e, w.execute(ctx, e))
	}()
}

type callResult struct {
	value any
	err   error
}

// execute runs the attempt and says how it ended (nil: not to be reported). A task that
// ignores its context is abandoned at a cancel or its time limit: Go cannot stop a goroutine.
func (w *Worker) execute(ctx context.Context, e *execution) *pb.TaskOutcome {
	task := e.assignment.Task
	outcome := &pb.TaskOutcome{TaskId: task.GetId(), LeaseToken: e.assignment.LeaseToken, StartedAt: nowProto()}
	limit := task.GetTimeLimit().AsDuration()
	if task.GetTimeLimit() != nil && limit > 0 {
		timer := time.AfterFunc(limit, func() { e.stop(stopTimeLimit) })
		defer timer.Stop()
	}
	taskCtx := context.WithValue(ctx, taskContextKey{}, w.taskContext(e))
	done := make(chan callResult, 1)
	go func() {
		value, err := w.call(taskCtx, w.handlers[task.GetName()], task)
		done <- callResult{value, err}
	}()
	var result callResult
	select {
	case result = <-done:
	case <-ctx.Done():
	}
	switch e.reason() {
	case stopShutdown:
		return nil
	case stopCancelled:
		outcome.Outcome = pb.Outcome_OUTCOME_CANCELLED
	case stopTimeLimit:
		outcome.Outcome = pb.Outcome_OUTCOME_FAILURE
		outcome.Error = &pb.TaskError{Type: "TimeLimitExceeded", Message: fmt.Sprintf("ran longer than its time limit of %v", limit)}
	default:
		w.settle(outcome, result)
	}
	outcome.FinishedAt = nowProto()
	return outcome
}

// settle fills the outcome of an attempt that returned.
func (w *Worker) settle(outcome *pb.TaskOutcome, result callResult) {
	var retry *RetryError
	var reject *RejectError
	switch {
	case result.err == nil:
		value, err := ToValue(result.value)
		if err != nil {
			outcome.Outcome = pb.Outcome_OUTCOME_FAILURE
			outcome.Error = &pb.TaskError{Type: "UnencodableValue", Message: err.Error()}
			return
		}
		outcome.Outcome, outcome.Result = pb.Outcome_OUTCOME_SUCCESS, value
	case errors.As(result.err, &retry):
		outcome.Outcome = pb.Outcome_OUTCOME_RETRY
		outcome.Error = &pb.TaskError{Type: "Retry", Message: retry.Reason}
		outcome.RetryDelay = durationpb.New(time.Duration(retry.Delay * float64(time.Second)))
	case errors.As(result.err, &reject):
		outcome.Outcome, outcome.Error = pb.Outcome_OUTCOME_REJECTED, errorFields(reject.Err)
	default:
		outcome.Outcome, outcome.Error = pb.Outcome_OUTCOME_FAILURE, errorFields(result.err)
	}
}

// call runs the function once, or once per item of a map's chunk (returning the list).
func (w *Worker) call(ctx context.Context, h *handler, task *pb.Signature) (any, error) {
	mode, isChunk := task.GetHeaders()[mapHeader]
	if !isChunk {
		return h.call(ctx, task.GetArgs())
	}
	results := make([]any, 0, len(task.GetArgs()))
	for i, item := range task.GetArgs() {
		args := []*pb.Value{item}
		if mode == "starmap" {
			var list []any
			if err := DecodeValue(item, &list); err != nil {
				return nil, Errorf("TypeError", "starmap item %d is not a list of args: %v", i, err)
			}
			var err error
			if args, err = ToValues(list); err != nil {
				return nil, err
			}
		}
		value, err := h.call(ctx, args)
		if err != nil {
			return nil, err
		}
		results = append(results, value)
	}
	return results, nil
}

func (w *Worker) taskContext(e *execution) *TaskContext {
	task, assignment := e.assignment.Task, e.assignment
	return &TaskContext{
		ID: task.GetId(), Name: task.GetName(), Queue: task.GetQueue(), Attempt: assignment.Attempt,
		Deliveries: assignment.Deliveries, WorkflowID: assignment.WorkflowId, Headers: task.GetHeaders(),
		Kwargs: task.GetKwargs(), TimeLimit: task.GetTimeLimit().AsDuration(),
		SoftTimeLimit: task.GetSoftTimeLimit().AsDuration(),
		progress: func(value any) error {
			encoded, err := ToValue(value)
			if err != nil {
				return err
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			w.pending.progress = append(w.pending.progress, &pb.ProgressItem{
				TaskId: task.GetId(), LeaseToken: assignment.LeaseToken, Progress: encoded,
			})
			w.wake()
			return nil
		},
	}
}
