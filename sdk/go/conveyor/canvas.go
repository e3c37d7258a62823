package conveyor

// Task signatures and the canvas (chain, group, chord), as in docs/canvas.md:
//
//	conveyor.Chain(conveyor.NewSignature("add", 1, 2), conveyor.NewSignature("mul", 10))
//
// runs add(1, 2), then mul(3, 10): a step receives the previous step's result as its leading
// argument unless it is Immutable.

import (
	"fmt"
	"time"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Canvas is something Client.Submit accepts: a *Signature, *ChainCanvas, *GroupCanvas or
// *ChordCanvas.
type Canvas interface {
	workflow() (*pb.Workflow, error)
}

// Backoff is how the delay between attempts grows.
type Backoff = pb.BackoffKind

// The backoff kinds.
const (
	BackoffExponential = pb.BackoffKind_BACKOFF_KIND_EXPONENTIAL
	BackoffFibonacci   = pb.BackoffKind_BACKOFF_KIND_FIBONACCI
	BackoffFixed       = pb.BackoffKind_BACKOFF_KIND_FIXED
)

// RetryPolicy says how often and how soon a failed task runs again.
type RetryPolicy struct {
	// Total attempts, the first included; 0 or 1: no retry.
	MaxAttempts int32
	// How the delay grows (exponential when unset).
	Backoff Backoff
	// The first retry's delay (server default 1 s when zero) and the longest (1 h when zero).
	Initial, Max time.Duration
	// Fraction of the delay (0..1) added or removed at random.
	Jitter float64
}

// Signature is one task call.
type Signature struct {
	// Assigned by the server when empty.
	ID string
	// The registered task name.
	Name string
	// Positional and named arguments; any values ToValue accepts.
	Args   []any
	Kwargs map[string]any
	// The queue ("default" when empty) and priority (0 lowest to 9).
	Queue    string
	Priority int32
	// Free-form headers.
	Headers map[string]string
	// Earliest time to run (zero: now), or a delay from submission; set at most one.
	ETA       time.Time
	Countdown time.Duration
	// Retries of failed attempts; nil: none.
	Retry *RetryPolicy
	// Hard limit for one attempt (the worker's context is cancelled at it); zero: none.
	TimeLimit time.Duration
	// Soft limit for one attempt, below TimeLimit; zero: none.
	SoftTimeLimit time.Duration
	// Do not receive the previous chain step's result.
	Immutable bool
	// Submitting twice with the same key returns the first task's id.
	IdempotencyKey string
	// Run after this task succeeds (with its result as leading arg) or fails for good (with
	// the error as a JSON object).
	OnSuccess, OnError []*Signature
}

// NewSignature is a call of the task `name` with positional args.
func NewSignature(name string, args ...any) *Signature {
	return &Signature{Name: name, Args: args}
}

func (s *Signature) workflow() (*pb.Workflow, error) {
	task, err := s.proto()
	if err != nil {
		return nil, err
	}
	return &pb.Workflow{Kind: &pb.Workflow_Task{Task: task}}, nil
}

func (s *Signature) proto() (*pb.Signature, error) {
	if s.Name == "" {
		return nil, fmt.Errorf("a signature needs a task name")
	}
	args, err := ToValues(s.Args)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Name, err)
	}
	kwargs, err := ToValueMap(s.Kwargs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Name, err)
	}
	out := &pb.Signature{
		Id: s.ID, Name: s.Name, Queue: s.Queue, Args: args, Kwargs: kwargs, Headers: s.Headers,
		Priority: s.Priority, Immutable: s.Immutable, IdempotencyKey: s.IdempotencyKey,
		Countdown: optionalDuration(s.Countdown), TimeLimit: optionalDuration(s.TimeLimit),
		SoftTimeLimit: optionalDuration(s.SoftTimeLimit),
	}
	if !s.ETA.IsZero() {
		out.Eta = timestamppb.New(s.ETA)
	}
	if s.Retry != nil {
		out.Retry = &pb.RetryPolicy{
			MaxAttempts: s.Retry.MaxAttempts, Backoff: s.Retry.Backoff, Jitter: s.Retry.Jitter,
			Initial: optionalDuration(s.Retry.Initial), Max: optionalDuration(s.Retry.Max),
		}
	}
	if out.OnSuccess, err = signatures(s.OnSuccess); err != nil {
		return nil, err
	}
	if out.OnError, err = signatures(s.OnError); err != nil {
		return nil, err
	}
	return out, nil
}

func signatures(sigs []*Signature) ([]*pb.Signature, error) {
	out := make([]*pb.Signature, 0, len(sigs))
	for _, s := range sigs {
		converted, err := s.proto()
		if err != nil {
			return nil, err
		}
		out = append(out, converted)
	}
	return out, nil
}

func optionalDuration(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}

func workflows(items []Canvas) ([]*pb.Workflow, error) {
	out := make([]*pb.Workflow, 0, len(items))
	for _, item := range items {
		converted, err := item.workflow()
		if err != nil {
			return nil, err
		}
		out = append(out, converted)
	}
	return out, nil
}

// ChainCanvas runs its steps one after another; a failed step fails the chain.
type ChainCanvas struct {
	Steps []Canvas
	// Run when the chain succeeds (with its result) or a step fails for good (with the error).
	OnSuccess, OnError []*Signature
}

// Chain runs steps in order, each receiving the previous result as its leading argument.
func Chain(steps ...Canvas) *ChainCanvas { return &ChainCanvas{Steps: steps} }

func (c *ChainCanvas) workflow() (*pb.Workflow, error) {
	steps, err := workflows(c.Steps)
	if err != nil {
		return nil, err
	}
	chain := &pb.Chain{Steps: steps}
	if chain.OnSuccess, err = signatures(c.OnSuccess); err != nil {
		return nil, err
	}
	if chain.OnError, err = signatures(c.OnError); err != nil {
		return nil, err
	}
	return &pb.Workflow{Kind: &pb.Workflow_Chain{Chain: chain}}, nil
}

// GroupCanvas runs its members in parallel; its result is the list of member results.
type GroupCanvas struct {
	Members []Canvas
	// Run when every member succeeded (with the list of results) or once when one failed.
	OnSuccess, OnError []*Signature
}

// Group runs members in parallel.
func Group(members ...Canvas) *GroupCanvas { return &GroupCanvas{Members: members} }

func (g *GroupCanvas) group() (*pb.Group, error) {
	members, err := workflows(g.Members)
	if err != nil {
		return nil, err
	}
	group := &pb.Group{Members: members}
	if group.OnSuccess, err = signatures(g.OnSuccess); err != nil {
		return nil, err
	}
	if group.OnError, err = signatures(g.OnError); err != nil {
		return nil, err
	}
	return group, nil
}

func (g *GroupCanvas) workflow() (*pb.Workflow, error) {
	group, err := g.group()
	if err != nil {
		return nil, err
	}
	return &pb.Workflow{Kind: &pb.Workflow_Group{Group: group}}, nil
}

// ChordCanvas runs a group, then its callback once with the list of member results as its one
// leading argument.
type ChordCanvas struct {
	Header   *GroupCanvas
	Callback Canvas
	// ContinueOnFailure runs the callback even when members fail (they appear as
	// {"error": {...}} objects); by default a failed member fails the callback.
	ContinueOnFailure bool
}

// Chord runs header's members, then callback with their results.
func Chord(header *GroupCanvas, callback Canvas) *ChordCanvas {
	return &ChordCanvas{Header: header, Callback: callback}
}

func (c *ChordCanvas) workflow() (*pb.Workflow, error) {
	if c.Header == nil || c.Callback == nil {
		return nil, fmt.Errorf("a chord needs a header group and a callback")
	}
	header, err := c.Header.group()
	if err != nil {
		return nil, err
	}
	callback, err := c.Callback.workflow()
	if err != nil {
		return nil, err
	}
	chord := &pb.Chord{Header: header, Callback: callback}
	if c.ContinueOnFailure {
		chord.FailurePolicy = pb.ChordFailurePolicy_CHORD_FAILURE_POLICY_CONTINUE
	}
	return &pb.Workflow{Kind: &pb.Workflow_Chord{Chord: chord}}, nil
}
