package cli

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy"
)

// TestStatusReportJSON pins the shape of status --json: its names are a
// documented interface.
func TestStatusReportJSON(t *testing.T) {
	at := time.Date(2026, 12, 6, 20, 0, 0, 0, time.UTC)
	ps := &hpcproxy.ProxyState{
		Host: "node17", Via: "login1", Port: 40123, PID: 4242, Mode: hpcproxy.ModePerJob, Method: "gossh",
		Started: at, Status: hpcproxy.StatusUp, StatusSince: at, Credentials: &hpcproxy.ProxyCredentials{User: "hpcproxy", Token: "SECRET"},
		JobID: "1234_7", Scheduler: "slurm", LogFile: "/tmp/p.log",
		Stats: &hpcproxy.DaemonStats{Active: 1, Total: 9, BytesIn: 812, BytesOut: 91234, Updated: at},
		Node:  &hpcproxy.NodeTunnelInfo{Socket: "@hpcproxy-node-1000-00", Jobs: 3, Attached: true},
		LoginNodes: []hpcproxy.LoginNodeStats{{Host: "login1", InUse: true, Status: hpcproxy.StatusUp, Method: "gossh", Connections: 1,
			Channels: 4, ChannelsTotal: 31, BytesIn: 2301, BytesOut: 402133, Jobs: 3}},
	}
	b, err := json.Marshal(NewStatusReport("/tmp/p.json", ps, hpcproxy.VerdictAlive))
	require.NoError(t, err)
	assert.NotContains(t, string(b), "SECRET", "status --json shows the token")
	want := `{"schema":1,"state":"alive","usable":true,"mode":"per-job","address":"127.0.0.1:40123","host":"node17",` +
		`"pid":4242,"via":"login1","method":"gossh","tunnel":"up","tunnel_since":"2026-12-06T20:00:00Z","reconnects":0,` +
		`"started":"2026-12-06T20:00:00Z","job_id":"1234_7","scheduler":"slurm",` +
		`"stats":{"active":1,"total":9,"bytes_in":812,"bytes_out":91234,"failed_handshakes":0,"updated":"2026-12-06T20:00:00Z"},` +
		`"forwards":[],"node":{"socket":"@hpcproxy-node-1000-00","jobs":3,"attached":true},` +
		`"login_nodes":[{"host":"login1","in_use":true,"status":"up","method":"gossh","connections":1,"channels":4,` +
		`"channels_total":31,"bytes_in":2301,"bytes_out":402133,"jobs":3}],"state_file":"/tmp/p.json","log_file":"/tmp/p.log"}`
	assert.JSONEq(t, want, string(b))

	b, err = json.Marshal(NewStatusReport("/tmp/p.json", nil, 0))
	require.NoError(t, err)
	assert.JSONEq(t, `{"schema":1,"state":"not running","usable":false,"reconnects":0,"forwards":[],"login_nodes":[],"state_file":"/tmp/p.json"}`, string(b))
}
