package conveyor

import (
	"context"
	"time"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
)

// TaskContext describes the running attempt; a task reads it with TaskFromContext(ctx).
type TaskContext struct {
	ID, Name, Queue string
	// 1 for the first attempt.
	Attempt int32
	// Deliveries of this attempt to a worker, this one included.
	Deliveries int32
	// Empty for a task submitted on its own.
	WorkflowID string
	Headers    map[string]string
	// The named arguments as sent; decode one with Kwarg.
	Kwargs map[string]*pb.Value
	// Zero when the signature sets none. The context is cancelled at TimeLimit.
	TimeLimit, SoftTimeLimit time.Duration
	progress                 func(any) error
}

type taskContextKey struct{}

// TaskFromContext returns the running task's details, or nil outside a task.
func TaskFromContext(ctx context.Context) *TaskContext {
	task, _ := ctx.Value(taskContextKey{}).(*TaskContext)
	return task
}

// Progress reports a progress value (stored as TaskResult.progress; the latest wins).
func (t *TaskContext) Progress(value any) error { return t.progress(value) }

// Kwarg decodes the named argument into `out` (a pointer); false when it was not passed.
func (t *TaskContext) Kwarg(name string, out any) (bool, error) {
	value, ok := t.Kwargs[name]
	if !ok {
		return false, nil
	}
	return true, DecodeValue(value, out)
}
