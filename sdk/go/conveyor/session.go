package conveyor

// One Connect stream. Its loop is the stream's only sender: Hello, the resend of unacked
// results, heartbeats, the pending reports and, when the worker stops or the server asks it
// to drain, Goodbye, the last results and the close of the worker's side.

import (
	"context"
	"errors"
	"io"
	"time"

	pb "github.com/conveyor-dev/conveyor/sdk/go/conveyor/v1"
	"google.golang.org/grpc"
)

type session struct {
	w      *Worker
	stream pb.WorkerService_ConnectClient
	// Set once draining: Goodbye was sent; closed when every task has ended.
	draining bool
	idle     <-chan struct{}
	// Set once the last results went out: close the stream when acked or at closeBy; ackWait
	// ticks meanwhile to check.
	closeBy time.Time
	ackWait *time.Ticker
	closed  bool
	// What the receiving goroutine read, once it runs: from then on it is the stream's only
	// reader (grpc-go's Recv must not be called from two goroutines).
	incoming chan received
}

// ackWaitTicks is nil (never ready) until the drain waits for its last acks.
func (s *session) ackWaitTicks() <-chan time.Time {
	if s.ackWait == nil {
		return nil
	}
	return s.ackWait.C
}

type received struct {
	message *pb.ConnectResponse
	err     error
}

// runSession serves one stream until it ends; welcomed says whether the server accepted Hello.
func (w *Worker) runSession(ctx context.Context, client pb.WorkerServiceClient) (welcomed bool, err error) {
	// The stream outlives ctx: a stop drains it gracefully instead of cutting it.
	streamCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.Connect(streamCtx, grpc.MaxCallRecvMsgSize(maxReceiveBytes))
	if err != nil {
		return false, err
	}
	defer w.dropStreamReports()
	s := &session{w: w, stream: stream}
	if err := stream.Send(&pb.ConnectRequest{Message: &pb.ConnectRequest_Hello{Hello: w.hello()}}); err != nil {
		return false, s.streamError(err)
	}
	if err := s.flush(true); err != nil {
		return false, s.streamError(err)
	}
	incoming := make(chan received)
	s.incoming = incoming
	go func() {
		for {
			message, err := stream.Recv()
			select {
			case incoming <- received{message, err}:
			case <-streamCtx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	heartbeat := time.NewTicker(5 * time.Second) // until Welcome says how often
	defer heartbeat.Stop()
	defer func() {
		if s.ackWait != nil {
			s.ackWait.Stop()
		}
	}()
	stopping := ctx.Done()
	for {
		var sendErr error
		select {
		case in := <-incoming:
			if in.err != nil {
				if errors.Is(in.err, io.EOF) {
					return welcomed, nil
				}
				return welcomed, in.err
			}
			if welcome := in.message.GetWelcome(); welcome != nil {
				welcomed = true
				s.welcome(welcome, heartbeat)
			}
			sendErr = s.handle(in.message)
		case <-heartbeat.C:
			sendErr = stream.Send(&pb.ConnectRequest{Message: &pb.ConnectRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}})
		case <-w.kick:
			sendErr = s.flush(false)
		case <-stopping:
			stopping = nil
			sendErr = s.drain("the worker is stopping")
		case <-s.idle:
			s.idle = nil
			sendErr = s.finishDrain()
		case <-s.ackWaitTicks():
			sendErr = s.closeWhenAcked()
		}
		if sendErr != nil {
			return welcomed, s.streamError(sendErr)
		}
	}
}

// streamError turns a failed Send into the stream's status (Send only says io.EOF; Recv
// returns the status). Once the receiving goroutine runs, the status comes from it: a second
// Recv beside its own would wait forever for an error the stream delivers once, and the
// worker would neither reconnect nor stop.
func (s *session) streamError(err error) error {
	if !errors.Is(err, io.EOF) {
		return err
	}
	recvErr := error(nil)
	if s.incoming == nil {
		_, recvErr = s.stream.Recv()
	} else {
		for recvErr == nil { // what arrived before the end is of no use to a broken stream
			recvErr = (<-s.incoming).err
		}
	}
	if recvErr != nil && !errors.Is(recvErr, io.EOF) {
		return recvErr
	}
	return err
}

func (s *session) welcome(welcome *pb.Welcome, heartbeat *time.Ticker) {
	w := s.w
	w.mu.Lock()
	w.workerID = welcome.WorkerId
	w.mu.Unlock()
	if interval := welcome.HeartbeatInterval.AsDuration(); interval > 0 {
		heartbeat.Reset(interval)
	}
	w.log.Printf("conveyor: connected as %s (queues %v)", welcome.WorkerId, w.opts.Queues)
}

func (s *session) handle(message *pb.ConnectResponse) error {
	w := s.w
	switch m := message.Message.(type) {
	case *pb.ConnectResponse_Assignments:
		for _, assignment := range m.Assignments.Items {
			w.accept(assignment)
		}
	case *pb.ConnectResponse_Cancel:
		w.cancel(m.Cancel.TaskIds)
	case *pb.ConnectResponse_Acks:
		w.acked(m.Acks.Acks)
	case *pb.ConnectResponse_Drain:
		// The server believes this worker hung: drain and stop, as the Python and Node workers do.
		w.log.Printf("conveyor: server asked to drain: %s", m.Drain.Reason)
		w.drained.Store(true)
		return s.drain(m.Drain.Reason)
	}
	return nil
}

// flush sends the pending reports, one message per kind.
func (s *session) flush(resend bool) error {
	pending := s.w.takePending(resend)
	var messages []*pb.ConnectRequest
	if len(pending.rejects) > 0 {
		messages = append(messages, &pb.ConnectRequest{Message: &pb.ConnectRequest_Reject{
			Reject: &pb.Reject{Tasks: pending.rejects}}})
	}
	if len(pending.started) > 0 {
		messages = append(messages, &pb.ConnectRequest{Message: &pb.ConnectRequest_Started{
			Started: &pb.Started{Tasks: pending.started}}})
	}
	if len(pending.progress) > 0 {
		messages = append(messages, &pb.ConnectRequest{Message: &pb.ConnectRequest_Progress{
			Progress: &pb.Progress{Items: pending.progress}}})
	}
	if len(pending.results) > 0 {
		messages = append(messages, &pb.ConnectRequest{Message: &pb.ConnectRequest_Results{
			Results: &pb.Results{Outcomes: pending.results}}})
	}
	for _, message := range messages {
		if err := s.stream.Send(message); err != nil {
			return err
		}
	}
	return nil
}

// drain says Goodbye and waits (in the loop) for the running tasks, up to DrainTimeout.
func (s *session) drain(reason string) error {
	if s.draining {
		return nil
	}
	s.draining = true
	w := s.w
	w.log.Printf("conveyor: draining (%s)", reason)
	if err := s.stream.Send(&pb.ConnectRequest{Message: &pb.ConnectRequest_Goodbye{Goodbye: &pb.Goodbye{}}}); err != nil {
		return err
	}
	idle := w.whenIdle()
	timedOut := make(chan struct{})
	go func() {
		select {
		case <-idle:
		case <-time.After(w.opts.DrainTimeout):
			w.log.Printf("conveyor: tasks did not finish in %v; handing them back", w.opts.DrainTimeout)
			w.abandon()
		}
		close(timedOut)
	}()
	s.idle = timedOut
	return nil
}

// finishDrain sends the last results; the stream closes once they are acked (or soon after).
func (s *session) finishDrain() error {
	s.closeBy = time.Now().Add(ackWait)
	s.ackWait = time.NewTicker(20 * time.Millisecond)
	if err := s.flush(false); err != nil {
		return err
	}
	return s.closeWhenAcked()
}

// closeWhenAcked ends the worker's side of the stream; the server then ends its side.
func (s *session) closeWhenAcked() error {
	if s.closeBy.IsZero() || s.closed {
		return nil
	}
	if s.w.unackedCount() > 0 && time.Now().Before(s.closeBy) {
		return nil
	}
	s.closed = true
	return s.stream.CloseSend()
}
