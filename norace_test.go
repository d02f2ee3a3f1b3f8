//go:build !race

package hpcproxy

const raceEnabled = false
