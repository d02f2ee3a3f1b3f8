package hpcproxy

import "sync/atomic"

// keptGoroutines runs funcs in goroutines that are kept, once their func
// has returned, for the next one: a func that needs a deep stack (a
// connection's handshake, an SSH channel open) then runs on a stack that
// an earlier one grew, instead of growing a new goroutine's 2 KiB stack
// by copying it at each doubling. Measured with perf during short
// connections through a per-job daemon: stack growth was 3.8% of its CPU
// time with a new goroutine per handshake and per channel open.
//
// At most maxKeptGoroutines wait for work; the others end. close ends the
// waiting ones; goRun must not be called after close.
type keptGoroutines struct {
	tasks chan func()
	idle  atomic.Int32
}

const maxKeptGoroutines = 8

func newKeptGoroutines() *keptGoroutines {
	return &keptGoroutines{tasks: make(chan func())}
}

// goRun runs task in a waiting goroutine, or in a new one if none waits.
func (k *keptGoroutines) goRun(task func()) {
	select {
	case k.tasks <- task:
	default:
		go k.run(task)
	}
}

func (k *keptGoroutines) run(task func()) {
	for {
		task()
		if k.idle.Add(1) > maxKeptGoroutines {
			k.idle.Add(-1)
			return
		}
		next, ok := <-k.tasks
		k.idle.Add(-1)
		if !ok {
			return
		}
		task = next
	}
}

// close ends the goroutines that wait, and the others once their task
// returns.
func (k *keptGoroutines) close() { close(k.tasks) }
