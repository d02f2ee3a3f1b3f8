package cli

import (
	"time"

	"github.com/hpcproxy/hpcproxy"
)

// StatusSchema is the version of the [StatusReport] JSON shape. Fields are
// only ever added under one version; a change that could break a reader
// (a renamed, removed or retyped field) raises it.
const StatusSchema = 1

// StatusReport is a daemon's status as `status --json` prints it, read
// from its state file: everything `status` shows, without the
// credentials. LoginNodes says what the login node pays for this daemon
// (for a node tunnel: for all the jobs sharing it): its SSH connections,
// the channels they carry and their bytes.
//
//	{
//	  "schema": 1,
//	  "state": "alive", "usable": true,
//	  "mode": "per-job", "address": "127.0.0.1:40123",
//	  "host": "node17", "pid": 4242, "via": "login1",
//	  "method": "gossh", "tunnel": "up", "tunnel_since": "...", "reconnects": 0,
//	  "job_id": "1234_7", "scheduler": "slurm",
//	  "stats": {"active": 1, "total": 9, "bytes_in": 812, "bytes_out": 91234, ...},
//	  "forwards": [],
//	  "node": {"socket": "@hpcproxy-node-1000-9f2c...", "jobs": 3, "attached": true},
//	  "login_nodes": [{"host": "login1", "in_use": true, "status": "up", "method": "gossh",
//	                   "connections": 1, "channels": 4, "channels_total": 31,
//	                   "bytes_in": 2301, "bytes_out": 402133, "jobs": 3}],
//	  "state_file": "/tmp/hpcproxy-1000/proxy-1234_7.json",
//	  "log_file": "/tmp/hpcproxy-1000/proxy-1234_7.log"
//	}
//
// "stats" are this job's own proxy port; "login_nodes" sum every job on
// the tunnel. A daemon that is not running reports "state": "not running"
// with only "schema", "usable" and "state_file" set.
type StatusReport struct {
	Schema      int                       `json:"schema"`
	State       string                    `json:"state"`  // CheckState's verdict, or "not running"
	Usable      bool                      `json:"usable"` // the proxy can be used
	Mode        hpcproxy.Mode             `json:"mode,omitempty"`
	Address     string                    `json:"address,omitempty"`
	Host        string                    `json:"host,omitempty"`
	PID         int                       `json:"pid,omitempty"`
	Via         string                    `json:"via,omitempty"`
	Method      string                    `json:"method,omitempty"`
	Tunnel      hpcproxy.Status           `json:"tunnel,omitempty"`
	TunnelSince time.Time                 `json:"tunnel_since,omitzero"`
	Reconnects  int                       `json:"reconnects"`
	LastError   string                    `json:"last_error,omitempty"`
	Started     time.Time                 `json:"started,omitzero"`
	JobID       string                    `json:"job_id,omitempty"`
	Scheduler   string                    `json:"scheduler,omitempty"`
	Stats       *hpcproxy.DaemonStats     `json:"stats,omitempty"`
	Forwards    []hpcproxy.ForwardInfo    `json:"forwards"`
	Node        *hpcproxy.NodeTunnelInfo  `json:"node,omitempty"`
	LoginNodes  []hpcproxy.LoginNodeStats `json:"login_nodes"`
	StateFile   string                    `json:"state_file"`
	LogFile     string                    `json:"log_file,omitempty"`
}

// NewStatusReport builds the report for the state file at path, which
// holds ps (nil: no state file) judged v.
func NewStatusReport(path string, ps *hpcproxy.ProxyState, v hpcproxy.StateVerdict) StatusReport {
	r := StatusReport{Schema: StatusSchema, State: "not running", StateFile: path,
		Forwards: []hpcproxy.ForwardInfo{}, LoginNodes: []hpcproxy.LoginNodeStats{}}
	if ps == nil {
		return r
	}
	r.State, r.Usable = v.String(), v.Usable()
	r.Mode, r.Address, r.Host, r.PID, r.Via = ps.Mode, ps.Addr(), ps.Host, ps.PID, ps.Via
	r.Method, r.Tunnel, r.TunnelSince, r.Reconnects, r.LastError = ps.Method, ps.Status, ps.StatusSince, ps.Reconnects, ps.LastError
	r.Started, r.JobID, r.Scheduler, r.Stats, r.Node, r.LogFile = ps.Started, ps.JobID, ps.Scheduler, ps.Stats, ps.Node, ps.LogFile
	if ps.Forwards != nil {
		r.Forwards = ps.Forwards
	}
	if ps.LoginNodes != nil {
		r.LoginNodes = ps.LoginNodes
	}
	return r
}
