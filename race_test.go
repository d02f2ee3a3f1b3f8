//go:build race

package hpcproxy

// raceEnabled: the race detector is on, which multiplies memory use.
const raceEnabled = true
