package hpcproxy

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Garbage collection in a daemon
//
// A tunnel's live heap is small (a few MiB, plus a few KiB per held
// connection), but x/crypto/ssh allocates a fresh 40 KiB buffer for every
// packet it receives: a download through the tunnel makes garbage at its
// own speed. With Go's default GOGC=100 the collector then runs hundreds of
// times a second and its scavenger returns pages that the next packets
// fault in again. While bytes stream (the heap grows by gcStreamingRate per
// second or more), tuneGC sets GOGC to gcStreamingPercent: measured here, a
// gossh download's CPU time per GB fell by 15% from GOGC=100, alike for
// 200, 400 and 800. Once the streams have stopped for gcQuiet it goes back
// to 100 and returns the garbage's pages, so that idle connections cost no
// more than they would.
const (
	gcStreamingPercent = 400
	gcStreamingRate    = 64 << 20 // bytes allocated per second
	gcQuiet            = 5 * time.Second
)

// tuneGC adjusts the garbage collector to the allocation rate, checking
// every interval, until ctx ends; then it restores the previous setting.
func tuneGC(ctx context.Context, interval time.Duration) {
	sample := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	streaming := false
	// The first rate is measured over the first interval, not over
	// everything the process allocated before it started.
	metrics.Read(sample)
	lastAllocs, last, lastBusy := sample[0].Value.Uint64(), time.Now(), time.Time{}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		metrics.Read(sample)
		allocs, now := sample[0].Value.Uint64(), time.Now()
		rate := float64(allocs-lastAllocs) / now.Sub(last).Seconds()
		lastAllocs, last = allocs, now
		switch {
		case rate >= gcStreamingRate:
			lastBusy = now
			if !streaming {
				debug.SetGCPercent(gcStreamingPercent)
				streaming = true
			}
		case streaming && now.Sub(lastBusy) >= gcQuiet:
			debug.SetGCPercent(100)
			// Collect the streams' garbage and give its pages back
			// now, not piecemeal.
			debug.FreeOSMemory()
			streaming = false
		}
	}
}
