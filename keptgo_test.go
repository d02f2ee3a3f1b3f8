package hpcproxy

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestKeptGoroutinesReuseAndEnd(t *testing.T) {
	k := newKeptGoroutines()
	var wg sync.WaitGroup
	release := make(chan struct{})
	// 20 tasks at once: 20 goroutines, of which at most
	// maxKeptGoroutines wait afterwards.
	for range 20 {
		wg.Add(1)
		k.goRun(func() { <-release; wg.Done() })
	}
	close(release)
	wg.Wait()
	require.Eventually(t, func() bool { return k.idle.Load() == maxKeptGoroutines }, 5*time.Second, time.Millisecond)

	// The next tasks go to the waiting goroutines: a send on tasks only
	// completes if one waits.
	ran := make(chan struct{}, 5)
	for range 5 {
		k.tasks <- func() { ran <- struct{}{} }
	}
	for range 5 {
		<-ran
	}

	k.close()
	require.Eventually(t, func() bool { return k.idle.Load() == 0 }, 5*time.Second, time.Millisecond,
		"close ends the waiting goroutines (goleak checks that they are gone)")
}
