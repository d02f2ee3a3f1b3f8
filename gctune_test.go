package hpcproxy

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

var sink []byte

// TestTuneGC checks that tuneGC raises the GC percent while the process
// allocates fast, goes back to 100 when it stops, and restores the previous
// setting when it ends.
func TestTuneGC(t *testing.T) {
	prev := debug.SetGCPercent(77)
	defer debug.SetGCPercent(prev)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tuneGC(ctx, 20*time.Millisecond)
	}()
	percent := func() int {
		s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
		metrics.Read(s)
		return int(s[0].Value.Uint64())
	}
	stop := make(chan struct{})
	go func() { // allocate like a download: a 40 KiB packet after another
		for {
			select {
			case <-stop:
				return
			default:
				sink = make([]byte, 40<<10)
			}
		}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for percent() != gcStreamingPercent && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := percent(); got != gcStreamingPercent {
		t.Errorf("GC percent while allocating fast = %d, want %d", got, gcStreamingPercent)
	}
	close(stop)
	deadline = time.Now().Add(gcQuiet + 5*time.Second)
	for percent() != 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := percent(); got != 100 {
		t.Errorf("GC percent once quiet = %d, want 100", got)
	}
	cancel()
	<-done
	if got := debug.SetGCPercent(prev); got != 77 {
		t.Errorf("GC percent after tuning = %d, want the 77 set before", got)
	}
}
