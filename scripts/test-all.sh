#!/usr/bin/env bash
# Runs every check and test of hpcproxy: formatting, vet, each fuzz target
# briefly, the benchmarks briefly (so they keep working), and the whole test
# suite under the race detector. Under CI=true a test whose requirement is
# missing (sshd, curl, root) fails instead of skipping, and any skip at all
# fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
fail=0
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

step() { printf '==> %s\n' "$*"; }

step "gofmt"
unformatted=$(gofmt -l . | grep -v '^vendor/' || true)
if [ -n "$unformatted" ]; then
	echo "gofmt needed on:"; echo "$unformatted"; fail=1
fi

step "go vet"
go vet ./... || fail=1

# Fuzz budgets are execution counts, not durations: with a duration, Go
# 1.26's fuzz coordinator can report a spurious "context deadline exceeded"
# failure when the deadline fires while a starved worker is mid-call
# (go.dev/issue/75804, fixed in Go 1.27). A count has no deadline to race.
# 25000 executions take 2-5 s per target here.
step "fuzz targets (${FUZZTIME:=25000x} each)"
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
		echo "  $pkg $target"
		if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" "$pkg" >"$log/fuzz" 2>&1; then
			cat "$log/fuzz"; fail=1
		fi
	done
done

step "benchmarks (brief)"
if ! go test -run '^$' -bench . -benchtime "${BENCHTIME:=20x}" ./... >"$log/bench" 2>&1; then
	cat "$log/bench"; fail=1
else
	grep -E '^(Benchmark|ok|PASS|FAIL)' "$log/bench" || true
fi

step "tests (go test -race)"
go test -race -count=1 -timeout 20m -v ./... >"$log/test" 2>&1
rc=$?
passed=$(grep -cE '^\s*--- PASS' "$log/test")
failed=$(grep -cE '^\s*--- FAIL' "$log/test")
skipped=$(grep -cE '^\s*--- SKIP' "$log/test")
# Show failures and skips with their output, and every package's result.
grep -E '^(ok|FAIL|---|panic)|^\s+--- (FAIL|SKIP)' "$log/test" | grep -v -- '--- PASS' || true
if [ $rc -ne 0 ] && [ "$failed" -eq 0 ]; then
	echo; echo "go test exited $rc without a failing test (build error, panic or timeout):"
	tail -150 "$log/test"
	fail=1
elif [ "$failed" -ne 0 ]; then
	echo; echo "full output of failing tests:"
	awk '/^=== RUN/{buf=""} {buf=buf"\n"$0} /^\s*--- FAIL/{print buf; buf=""}' "$log/test" | tail -400
	fail=1
fi
if [ "$skipped" -ne 0 ]; then
	grep -E -A3 '^\s*--- SKIP' "$log/test"
	case "${CI:-}" in true|1|TRUE|True) echo "skipped tests are failures under CI"; fail=1 ;; esac
fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit $fail
