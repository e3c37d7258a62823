package conveyor

// Typed task functions: Worker.Register takes an ordinary Go function and decodes the call's
// positional args into its parameters.
//
//	func(ctx context.Context, x, y int) (int, error)
//	func(ctx context.Context, order Order) error     // Order decoded from a JSON object
//	func(name string) string
//
// The leading context.Context is optional; the results may be (value, error), (value), (error)
// or nothing. Kwargs and the task's details are in TaskFromContext(ctx).

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime/debug"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
)

var (
	contextType = reflect.TypeOf((*context.Context)(nil)).Elem()
	errorType   = reflect.TypeOf((*error)(nil)).Elem()
)

// handler calls one registered function.
type handler struct {
	fn       reflect.Value
	withCtx  bool
	params   []reflect.Type
	variadic bool
}

func newHandler(fn any) (*handler, error) {
	v := reflect.ValueOf(fn)
	if v.Kind() != reflect.Func {
		return nil, fmt.Errorf("a task must be a function, got %T", fn)
	}
	t := v.Type()
	h := &handler{fn: v, variadic: t.IsVariadic()}
	for i := 0; i < t.NumIn(); i++ {
		if i == 0 && t.In(0) == contextType {
			h.withCtx = true
			continue
		}
		h.params = append(h.params, t.In(i))
	}
	switch {
	case t.NumOut() > 2:
		return nil, fmt.Errorf("a task returns at most (value, error), got %s", t)
	case t.NumOut() == 2 && t.Out(1) != errorType:
		return nil, fmt.Errorf("a task's second result must be error, got %s", t)
	}
	return h, nil
}

// call decodes args into the function's parameters and runs it; a panic becomes an error.
func (h *handler) call(ctx context.Context, args []*pb.Value) (result any, err error) {
	in, err := h.arguments(args)
	if err != nil {
		return nil, err
	}
	if h.withCtx {
		in = append([]reflect.Value{reflect.ValueOf(ctx)}, in...)
	}
	defer func() {
		if recovered := recover(); recovered != nil {
			err = &panicError{value: recovered, stack: string(debug.Stack())}
		}
	}()
	out := h.fn.Call(in)
	return results(out)
}

func (h *handler) arguments(args []*pb.Value) ([]reflect.Value, error) {
	fixed := len(h.params)
	if h.variadic {
		fixed--
	}
	if len(args) < fixed || (!h.variadic && len(args) > fixed) {
		return nil, Errorf("TypeError", "the task takes %d args, got %d", fixed, len(args))
	}
	in := make([]reflect.Value, 0, len(args))
	for i, arg := range args {
		t := h.paramType(i, fixed)
		decoded, err := decodeAs(arg, t)
		if err != nil {
			return nil, Errorf("TypeError", "arg %d: %v", i, err)
		}
		in = append(in, decoded)
	}
	return in, nil
}

func (h *handler) paramType(i, fixed int) reflect.Type {
	if h.variadic && i >= fixed {
		return h.params[fixed].Elem()
	}
	return h.params[i]
}

func results(out []reflect.Value) (any, error) {
	var value any
	var err error
	for _, v := range out {
		if v.Type() == errorType {
			if !v.IsNil() {
				err = v.Interface().(error)
			}
			continue
		}
		value = v.Interface()
	}
	return value, err
}

// TaskError is an error with a type name that other languages see as the task's error type
// (TaskResult.error.type), e.g. "ValueError".
type TaskError struct {
	Type    string
	Message string
}

func (e *TaskError) Error() string { return e.Type + ": " + e.Message }

// Errorf makes a *TaskError of the given type.
func Errorf(errorType, format string, args ...any) error {
	return &TaskError{Type: errorType, Message: fmt.Sprintf(format, args...)}
}

// RetryError asks for the task to run again after Delay (bounded by its max attempts; 3 when
// its retry policy sets none). Return it from a task: `return nil, conveyor.Retry(time.Second, "busy")`.
type RetryError struct {
	Delay  float64 // seconds
	Reason string
}

func (e *RetryError) Error() string { return "retry requested: " + e.Reason }

// Retry asks for another attempt after delay seconds.
func Retry(delaySeconds float64, reason string) error {
	return &RetryError{Delay: delaySeconds, Reason: reason}
}

// RejectError fails the task for good, without retries, whatever its retry policy.
type RejectError struct{ Err error }

func (e *RejectError) Error() string { return e.Err.Error() }
func (e *RejectError) Unwrap() error { return e.Err }

// Reject wraps err so that the task fails for good without retries.
func Reject(err error) error { return &RejectError{Err: err} }

type panicError struct {
	value any
	stack string
}

func (e *panicError) Error() string { return fmt.Sprintf("panic: %v", e.value) }

// errorFields is the wire TaskError of a Go error: the *TaskError type if there is one in
// the chain, "Panic" for a panic, else "Error".
func errorFields(err error) *pb.TaskError {
	out := &pb.TaskError{Type: "Error", Message: err.Error()}
	var typed *TaskError
	var panicked *panicError
	switch {
	case errors.As(err, &typed):
		out.Type, out.Message = typed.Type, typed.Message
	case errors.As(err, &panicked):
		out.Type, out.Traceback = "Panic", panicked.stack
	}
	return out
}
