package conveyor_test

// Compiled (not run) examples; docs/machinery.md and sdk/go/README.md quote them.

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/conveyor-dev/conveyor/sdk/go/conveyor"
)

func ExampleWorker() {
	worker := conveyor.NewWorker(conveyor.WorkerOptions{
		Queues:      []string{"default"},
		Concurrency: 8, // tasks run at once
		Prefetch:    2, // the server hands it up to 16 tasks at once: 8 running, 8 waiting
	})
	worker.MustRegister("add", func(x, y int64) int64 { return x + y })
	worker.MustRegister("fetch", func(ctx context.Context, url string) (string, error) {
		task := conveyor.TaskFromContext(ctx) // id, attempt, headers, kwargs, progress
		if task.Attempt < 3 {
			return "", conveyor.Retry(5, "not ready") // run again in 5 s
		}
		return url, nil
	})
	ctx, stop := conveyor.SignalContext()
	defer stop()
	if err := worker.Run(ctx); err != nil {
		log.Fatal(err)
	}
}

func ExampleClient_Submit() {
	ctx := context.Background()
	client, err := conveyor.NewClient(ctx, conveyor.ConnOptions{Address: "127.0.0.1:50051"})
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	// One task, retried up to 3 more times (Fibonacci backoff from 1 s), not before eta.
	eta := time.Now().Add(time.Minute)
	task := &conveyor.Signature{
		Name: "add", Args: []any{1, 2}, Queue: "default", ETA: eta,
		Retry: &conveyor.RetryPolicy{MaxAttempts: 4, Backoff: conveyor.BackoffFibonacci, Initial: time.Second},
	}
	result, err := client.Submit(ctx, task)
	if err != nil {
		log.Fatal(err)
	}
	var sum int64
	if err := result.GetInto(ctx, &sum); err != nil {
		log.Fatal(err) // a *conveyor.TaskFailedError when the task failed
	}
	fmt.Println(sum)
}

func ExampleChain() {
	ctx := context.Background()
	client, err := conveyor.NewClient(ctx, conveyor.ConnOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	// add(1, 2), then mul(3, 10): each step gets the previous result as its first arg.
	result, err := client.Submit(ctx, conveyor.Chain(
		conveyor.NewSignature("add", 1, 2),
		conveyor.NewSignature("mul", 10),
	))
	if err != nil {
		log.Fatal(err)
	}
	value, err := result.Get(ctx)
	fmt.Println(value, err)
}

func ExampleChord() {
	ctx := context.Background()
	client, err := conveyor.NewClient(ctx, conveyor.ConnOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	// The header's members run in parallel; total gets one arg, the list of their results.
	result, err := client.Submit(ctx, conveyor.Chord(
		conveyor.Group(conveyor.NewSignature("add", 1, 1), conveyor.NewSignature("add", 2, 2)),
		conveyor.NewSignature("total"),
	))
	if err != nil {
		log.Fatal(err)
	}
	watch, err := client.Watch(ctx, nil, result.WorkflowID) // every task's state changes
	if err != nil {
		log.Fatal(err)
	}
	for {
		event, err := watch.Next() // io.EOF once every task has ended
		if err != nil {
			break
		}
		fmt.Println(event.TaskId, event.State)
	}
}
