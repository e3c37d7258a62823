// Command conformance-worker is a Go worker serving the conformance task set of
// docs/conformance.md (conformance.echo, .bytes, .fail, .retry, .sleep, .progress):
//
//	scripts/go build -o /tmp/go-conformance-worker ./cmd/conformance-worker
//	conveyor conformance --worker-cmd /tmp/go-conformance-worker
//
// It reads CONVEYOR_ADDRESS, CONVEYOR_QUEUE (default "default"; a comma-separated list for
// several), CONVEYOR_TOKEN and optionally CONVEYOR_CONCURRENCY, and drains on SIGTERM.
package main

import (
	"context"
	"log"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/conveyor-dev/conveyor/sdk/go/conveyor"
)

func main() {
	queues := []string{"default"}
	if queue := os.Getenv("CONVEYOR_QUEUE"); queue != "" {
		queues = strings.Split(queue, ",")
	}
	concurrency, _ := strconv.Atoi(os.Getenv("CONVEYOR_CONCURRENCY"))
	worker := conveyor.NewWorker(conveyor.WorkerOptions{Queues: queues, Concurrency: concurrency})
	register(worker)
	ctx, stop := conveyor.SignalContext()
	defer stop()
	if err := worker.Run(ctx); err != nil {
		log.Fatal(err)
	}
}

func register(worker *conveyor.Worker) {
	worker.MustRegister("conformance.echo", func(value any) any { return value },
		"Returns its argument unchanged.")
	worker.MustRegister("conformance.bytes", func(data []byte) []byte {
		reversed := make([]byte, len(data))
		for i, b := range data {
			reversed[len(data)-1-i] = b
		}
		return reversed
	}, "Returns the bytes reversed.")
	worker.MustRegister("conformance.fail", func(message string) error {
		return conveyor.Errorf("ConformanceError", "%s", message)
	}, "Fails with a ConformanceError carrying the message.")
	worker.MustRegister("conformance.retry", func(ctx context.Context, times int32) (int32, error) {
		attempt := conveyor.TaskFromContext(ctx).Attempt
		if attempt <= times {
			return 0, conveyor.Retry(0.1, "attempt "+strconv.Itoa(int(attempt)))
		}
		return attempt, nil
	}, "Asks to run again until its attempt is past `times`, then returns the attempt.")
	worker.MustRegister("conformance.sleep", func(ctx context.Context, seconds float64) (float64, error) {
		select {
		case <-time.After(time.Duration(seconds * float64(time.Second))):
			return seconds, nil
		case <-ctx.Done(): // a cancel or the time limit
			return 0, ctx.Err()
		}
	}, "Sleeps `seconds`, stopping early on a cancel or its time limit.")
	worker.MustRegister("conformance.progress", func(ctx context.Context, steps int64) (int64, error) {
		task := conveyor.TaskFromContext(ctx)
		for step := int64(1); step <= steps; step++ {
			if err := task.Progress(step); err != nil {
				return 0, err
			}
		}
		return steps, nil
	}, "Reports progress 1..steps, then returns steps.")
}
