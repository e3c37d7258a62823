package conveyor

// The producer side: submit tasks and canvases, wait for results, watch state changes.
//
//	client, err := conveyor.NewClient(ctx, conveyor.ConnOptions{Address: "127.0.0.1:50051"})
//	result, err := client.Submit(ctx, conveyor.NewSignature("add", 2, 3))
//	sum, err := result.Get(ctx) // int64(5)

import (
	"context"
	"fmt"
	"time"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
)

// The longest single GetResult wait; Wait repeats it until the context ends.
const maxWaitPerCall = 30 * time.Second

// Client talks to TaskService.
type Client struct {
	conn  *grpc.ClientConn
	tasks pb.TaskServiceClient
}

// NewClient connects to the server (the connection is made lazily, on the first call).
func NewClient(ctx context.Context, options ConnOptions) (*Client, error) {
	conn, err := options.dial(ctx)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, tasks: pb.NewTaskServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Tasks is the generated TaskService client, for calls this type does not wrap.
func (c *Client) Tasks() pb.TaskServiceClient { return c.tasks }

// Submit submits a task or a canvas; the returned handle reads its result.
func (c *Client) Submit(ctx context.Context, canvas Canvas) (*AsyncResult, error) {
	request := &pb.SubmitRequest{}
	if sig, ok := canvas.(*Signature); ok {
		task, err := sig.proto()
		if err != nil {
			return nil, err
		}
		request.Target = &pb.SubmitRequest_Task{Task: task}
	} else {
		workflow, err := canvas.workflow()
		if err != nil {
			return nil, err
		}
		request.Target = &pb.SubmitRequest_Workflow{Workflow: workflow}
	}
	response, err := c.tasks.Submit(ctx, request)
	if err != nil {
		return nil, err
	}
	return &AsyncResult{
		TaskID: response.TaskId, WorkflowID: response.WorkflowId, TaskIDs: response.TaskIds, client: c,
	}, nil
}

// Result is a handle on a task or workflow submitted earlier, by its id.
func (c *Client) Result(id string) *AsyncResult {
	return &AsyncResult{TaskID: id, TaskIDs: []string{id}, client: c}
}

// Cancel cancels a task or a whole workflow; it returns the ids of the tasks it stopped.
func (c *Client) Cancel(ctx context.Context, id string) ([]string, error) {
	response, err := c.tasks.Cancel(ctx, &pb.CancelRequest{Id: id})
	if err != nil {
		return nil, err
	}
	return response.CancelledTaskIds, nil
}

// Watch streams the state changes of tasks (by id) and of every task of a workflow (when
// workflowID is set), until each watched task is terminal. Late watchers first get what
// happened so far.
func (c *Client) Watch(ctx context.Context, taskIDs []string, workflowID string) (*Watcher, error) {
	stream, err := c.tasks.WatchResults(ctx, &pb.WatchResultsRequest{
		TaskIds: taskIDs, WorkflowId: workflowID, MaxEventsPerResponse: watchEventsPerResponse,
	})
	if err != nil {
		return nil, err
	}
	return &Watcher{stream: stream}, nil
}

// Events per watch response asked of the server: the events ready together come in one message.
const watchEventsPerResponse = 512

// Watcher reads a watch stream.
type Watcher struct {
	stream pb.TaskService_WatchResultsClient
	// Events of the last response not returned yet.
	pending []*pb.TaskEvent
}

// Next returns the next event, or io.EOF once every watched task is terminal.
func (w *Watcher) Next() (*pb.TaskEvent, error) {
	for len(w.pending) == 0 {
		response, err := w.stream.Recv()
		if err != nil {
			return nil, err
		}
		w.pending = response.Events
		if len(w.pending) == 0 && response.Event != nil {
			// A server that predates batches sends one event per response, in Event.
			w.pending = []*pb.TaskEvent{response.Event}
		}
	}
	event := w.pending[0]
	w.pending = w.pending[1:]
	return event, nil
}

// AsyncResult is a submitted task or workflow.
type AsyncResult struct {
	// The task whose result is the submission's result (empty for a group).
	TaskID string
	// Set for a workflow (a canvas).
	WorkflowID string
	// Every task the submission created, depth first.
	TaskIDs []string
	client  *Client
}

// ID is what GetResult reads: the workflow for a canvas (its whole result), else the task.
func (r *AsyncResult) ID() string {
	if r.WorkflowID != "" {
		return r.WorkflowID
	}
	return r.TaskID
}

// Read returns the task's or workflow's record as it is now, without waiting.
func (r *AsyncResult) Read(ctx context.Context) (*pb.TaskResult, error) {
	response, err := r.client.tasks.GetResult(ctx, &pb.GetResultRequest{TaskId: r.ID()})
	if err != nil {
		return nil, err
	}
	return response.Result, nil
}

// Wait blocks until the task or workflow is terminal (or ctx ends) and returns its record.
func (r *AsyncResult) Wait(ctx context.Context) (*pb.TaskResult, error) {
	for {
		wait := maxWaitPerCall
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < wait {
			wait = time.Until(deadline)
		}
		response, err := r.client.tasks.GetResult(ctx, &pb.GetResultRequest{
			TaskId: r.ID(), Wait: durationpb.New(wait),
		})
		if err != nil {
			return nil, err
		}
		if IsTerminal(response.Result.GetState()) {
			return response.Result, nil
		}
		if err := ctx.Err(); err != nil {
			return response.Result, err
		}
	}
}

// Get waits for the result and decodes it (see FromValue); a task that did not succeed
// gives a *TaskFailedError.
func (r *AsyncResult) Get(ctx context.Context) (any, error) {
	result, err := r.Wait(ctx)
	if err != nil {
		return nil, err
	}
	if err := failure(result); err != nil {
		return nil, err
	}
	return FromValue(result.Result)
}

// GetInto waits for the result and decodes it into `out` (a pointer; see DecodeValue).
func (r *AsyncResult) GetInto(ctx context.Context, out any) error {
	result, err := r.Wait(ctx)
	if err != nil {
		return err
	}
	if err := failure(result); err != nil {
		return err
	}
	return DecodeValue(result.Result, out)
}

// IsTerminal reports whether a task in this state has ended.
func IsTerminal(state pb.TaskState) bool {
	switch state {
	case pb.TaskState_TASK_STATE_SUCCESS, pb.TaskState_TASK_STATE_FAILURE,
		pb.TaskState_TASK_STATE_CANCELLED, pb.TaskState_TASK_STATE_EXPIRED:
		return true
	}
	return false
}

// TaskFailedError is a task or workflow that ended without success.
type TaskFailedError struct {
	TaskID string
	State  pb.TaskState
	// The error's type (e.g. "ValueError", "TimeLimitExceeded"), message and traceback.
	Type, Message, Traceback string
}

func (e *TaskFailedError) Error() string {
	return fmt.Sprintf("task %s ended %s: %s: %s", e.TaskID, e.State, e.Type, e.Message)
}

func failure(result *pb.TaskResult) error {
	if result.State == pb.TaskState_TASK_STATE_SUCCESS {
		return nil
	}
	return &TaskFailedError{
		TaskID: result.TaskId, State: result.State, Type: result.Error.GetType(),
		Message: result.Error.GetMessage(), Traceback: result.Error.GetTraceback(),
	}
}
