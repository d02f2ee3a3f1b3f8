package main

import (
	"fmt"
	"io"
	"os/exec"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// rate formats bytes/s as GB/s (1e9).
func rate(bps float64) string { return fmt.Sprintf("%.2f GB/s", bps/1e9) }

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func seconds(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = d.Seconds()
	}
	return out
}

// ratios divides a by b round by round.
func ratios(a, b []float64) []float64 {
	var out []float64
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			out = append(out, a[i]/b[i])
		}
	}
	return out
}

// spread formats the median of xs with its min-max range.
func spread(xs []float64) string {
	if len(xs) == 0 {
		return "-"
	}
	if len(xs) == 1 {
		return fmt.Sprintf("%.2f", xs[0])
	}
	return fmt.Sprintf("%.2f (%.2f-%.2f)", median(xs), slices.Min(xs), slices.Max(xs))
}

// printTables prints the medians, then the ratios of each contender to its
// group's baseline (ssh -D for the SSH tunnels, socat for the relays).
func printTables(w io.Writer, cs []*contender, res *results, streams, holds []int, hr map[*contender][]holdResult, size int64) {
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Medians over the rounds (this machine, this run; compare rows, not runs):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	head := []string{"contender", "down GB/s", "up GB/s"}
	for _, n := range streams {
		head = append(head, fmt.Sprintf("%dx GB/s", n))
	}
	head = append(head, "p50 ms", "p99 ms", "CPU µs/conn", "CPU s/GB", "kernel s/GB", "sshd s/GB")
	for _, n := range holds {
		head = append(head, fmt.Sprintf("KiB/conn@%d", n), fmt.Sprintf("errors@%d", n))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t")+"\t")
	for _, c := range cs {
		if res.skipped[c] != nil {
			continue
		}
		row := []string{c.name,
			fmt.Sprintf("%.2f", median(res.down[c])/1e9),
			fmt.Sprintf("%.2f", median(res.up[c])/1e9)}
		for _, n := range streams {
			row = append(row, fmt.Sprintf("%.2f", median(res.par[c][n])/1e9))
		}
		row = append(row,
			orDashf("%.3f", seconds(res.p50[c]), 1e3),
			orDashf("%.3f", seconds(res.p99[c]), 1e3),
			orDashf("%.0f", res.cpuPerConn[c], 1e6),
			fmt.Sprintf("%.2f", median(res.cpuPerGB[c])),
			fmt.Sprintf("%.2f", median(res.sysPerGB[c])),
			orDash(res.loginPerGB[c]))
		row = append(row, holdCells(hr[c], holds)...)
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()

	for _, group := range []string{"ssh", "relay"} {
		base := baselineOf(cs, group)
		if base == nil || res.skipped[base] != nil {
			continue
		}
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Ratios to %s, median of the per-round ratios (min-max); throughput: higher is better, latency, CPU and memory: lower is better:\n", base.name)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		head := []string{"contender", "down", "up"}
		for _, n := range streams {
			head = append(head, fmt.Sprintf("%dx", n))
		}
		head = append(head, "p50", "p99", "CPU/conn", "CPU/GB")
		for _, n := range holds {
			head = append(head, fmt.Sprintf("mem@%d", n))
		}
		fmt.Fprintln(tw, strings.Join(head, "\t")+"\t")
		for _, c := range cs {
			if c.group != group || c == base || res.skipped[c] != nil {
				continue
			}
			row := []string{c.name, spread(ratios(res.down[c], res.down[base])), spread(ratios(res.up[c], res.up[base]))}
			for _, n := range streams {
				row = append(row, spread(ratios(res.par[c][n], res.par[base][n])))
			}
			row = append(row,
				spread(ratios(seconds(res.p50[c]), seconds(res.p50[base]))),
				spread(ratios(seconds(res.p99[c]), seconds(res.p99[base]))),
				spread(ratios(res.cpuPerConn[c], res.cpuPerConn[base])),
				spread(ratios(res.cpuPerGB[c], res.cpuPerGB[base])))
			for i := range holds {
				a, b := holdAt(hr[c], i), holdAt(hr[base], i)
				if a == nil || b == nil || b.perConn <= 0 {
					row = append(row, "-")
					continue
				}
				row = append(row, fmt.Sprintf("%.2f", a.perConn/b.perConn))
			}
			fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
		}
		tw.Flush()
	}
	for _, c := range cs {
		for _, h := range hr[c] {
			if h.firstErr != nil {
				fmt.Fprintf(w, "%s, %d connections held: first error: %v\n", c.name, h.n, h.firstErr)
				if h.log != "" {
					fmt.Fprintf(w, "  its stderr or log ends:\n%s\n", indent(h.log))
				}
			}
		}
	}
}

// orDash formats the median of xs, or "-" if there are none.
func orDash(xs []float64) string { return orDashf("%.2f", xs, 1) }

// orDashf formats the median of xs times scale, "-" when xs is empty
// (a measurement left out).
func orDashf(format string, xs []float64, scale float64) string {
	if len(xs) == 0 {
		return "-"
	}
	return fmt.Sprintf(format, median(xs)*scale)
}

// holdAt returns the i-th hold count's result, nil if it was left out.
func holdAt(hs []holdResult, i int) *holdResult {
	if i < len(hs) && hs[i].n > 0 {
		return &hs[i]
	}
	return nil
}

func holdCells(hs []holdResult, holds []int) []string {
	var out []string
	for i := range holds {
		h := holdAt(hs, i)
		if h == nil {
			out = append(out, "-", "-")
			continue
		}
		out = append(out, fmt.Sprintf("%.1f", h.perConn/1024), fmt.Sprint(h.errors))
	}
	return out
}

func baselineOf(cs []*contender, group string) *contender {
	for _, c := range cs {
		if c.group == group && c.baseline {
			return c
		}
	}
	return nil
}

// indent prefixes every line of s with four spaces.
func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

// execOutput runs a program and returns its combined output.
func execOutput(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
