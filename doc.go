// Package hpcproxy gives programs on HPC compute nodes, which usually have no
// route to the internet, a proxy they can use with ordinary tools. It opens
// an SSH tunnel to a login node that does have one and serves SOCKS5,
// SOCKS4a, HTTP CONNECT and plain HTTP proxying on one port, so that pip,
// conda, git, curl, wget, apptainer and any Go program with
// [net/http.Transport.DialContext] just work.
//
// # The proxy server
//
// [Server] accepts connections on any [net.Listener] (TCP or unix socket),
// sniffs the first byte of each and speaks the protocol the client chose:
//
//   - 0x05: SOCKS5 (RFC 1928), CONNECT only, with username/password
//     authentication (RFC 1929) when credentials are configured;
//   - 0x04: SOCKS4 and SOCKS4a, CONNECT only;
//   - anything else: HTTP/1.1, both CONNECT tunnels (RFC 9110, section
//     9.3.6) and absolute-form forward proxying of plain http:// requests
//     ("GET http://host/path HTTP/1.1"), with Basic Proxy-Authorization.
//
// Destination names are passed to the [DialFunc] unresolved, so they are
// resolved on the far side of the tunnel, where DNS works. [RunProxy] is the
// one-call form.
//
// # Replies
//
// Every request the server refuses gets the answer its protocol defines,
// and the connection is closed (a client that [Server.AllowClient] refuses
// is closed without one). HTTP errors carry a short text body that says
// why:
//
//	400 Bad Request            malformed request, or a request target that
//	                           does not parse ("CONNECT ::1:80" without
//	                           brackets, "GET http://h%00.x/"); origin-form
//	                           ("GET /path") or "*" instead of an absolute
//	                           URL; a URL without host, a bad host:port or
//	                           port (0 included), a scheme other than http;
//	                           CONNECT without host:port; a request body
//	                           whose framing is broken (bad chunked
//	                           encoding, fewer bytes than Content-Length),
//	                           which is never sent upstream whole
//	403 Forbidden              the destination is prohibited (the login
//	                           node's AllowTcpForwarding or PermitOpen)
//	405 Method Not Allowed     an absolute https:// URL: use CONNECT
//	                           ("Allow: CONNECT")
//	407 Proxy Authentication   credentials required and missing or wrong
//	    Required               (Proxy-Authenticate: Basic realm="hpcproxy")
//	431 Request Header Fields  the request line and header block are over
//	    Too Large              64 KiB
//	502 Bad Gateway            the dial failed: refused, unreachable, a name
//	                           that does not resolve, any other error; or
//	                           the origin's response was broken
//	503 Service Unavailable    the tunnel is down or reconnecting, or the
//	                           server is at Server.MaxConns
//	504 Gateway Timeout        the dial timed out
//	505 HTTP Version Not       not HTTP/1.x
//	    Supported
//
// SOCKS5 replies (RFC 1928 REP field); method selection answers 0xFF when
// no offered method is acceptable, and wrong credentials get RFC 1929
// status 0x01:
//
//	0x00 succeeded
//	0x01 general failure: the tunnel is down or reconnecting, MaxConns, a
//	     bad request version or host name, port 0, any dial error not
//	     below
//	0x02 not allowed: the destination is prohibited
//	0x03 network unreachable
//	0x04 host unreachable, or the name does not resolve on the far side
//	0x05 connection refused
//	0x06 TTL expired: the dial timed out
//	0x07 command not supported: BIND, UDP ASSOCIATE, any other command
//	0x08 address type not supported
//
// SOCKS4 and SOCKS4a reply 0x5A (granted) or 0x5B (rejected) for every
// failure: a malformed request, port 0, a user ID that is not a valid
// token, any dial failure, MaxConns.
//
// # Limits before authentication
//
// A client that has not authenticated costs the server little, as
// OpenSSH's MaxStartups and Squid's request_header_max_size see to: an
// HTTP request line and header block may hold 64 KiB (then 431), a SOCKS
// handshake 4 KiB (the largest valid one is 1,032 bytes), and the whole
// handshake must arrive within [Server.HandshakeTimeout] (10 s). At most
// [Server.MaxHandshakes] (128) connections may be in their handshake
// unauthenticated at once; a new one beyond that closes the oldest
// unfinished one (sshd refuses the new one instead, which lets a flood of
// slow handshakes lock out a client that would authenticate at once).
// Connections that
// [Server.TrustConn] admits (a per-job daemon's owner) never count. After
// a burst the freed memory goes back to the operating system. A
// keep-alive HTTP client connection that waits
// [Server.KeepAliveTimeout] for its next request is closed; the daemons
// set [DefaultKeepAliveTimeout] (2 minutes, Squid's default). A listener
// that runs out of file descriptors or memory at accept (many held
// connections) logs it and tries again, after 5 ms doubling to a second,
// while new connections wait in its backlog: [Server.Serve] and
// [LocalForward.Serve] end only when their listener fails for good.
//
// # Tunnels
//
// [EstablishTunnel] reaches the login node by the first of several
// [Method]s that works: an in-process SSH client ([MethodGoSSH]), an OpenSSH
// ControlMaster multiplexed in process ([MethodControlMaster]), `ssh -D` on a
// private unix socket ([MethodSOCKSUnix]), or one `ssh -W` per connection
// ([MethodExec]). No method opens a listener that another user of the node
// could use: `ssh -D` on a loopback TCP port ([MethodSOCKSTCP]), which has
// no authentication, is refused ([ErrUnsafeMethod]). The destination is resolved the
// way ssh resolves it (ssh_config, Match, ProxyJump), and host keys are
// always verified against known_hosts: nothing in this package accepts an
// unverified host key. [DialGoSSH] and [DialSystemSSH] are the one-call
// forms. [SupervisedTunnel] keeps a tunnel up, re-establishing it with
// backoff when it drops.
//
// A cluster's login nodes can be given as a list
// ([TunnelConfig.Destinations]): each node orders them by rendezvous
// hashing of its name ([OrderLogins]), tries the method chain on each in
// turn, and a supervised tunnel that loses its login node goes to the next.
// Starts that sshd drops before its banner (MaxStartups, when a job array
// starts many tunnels at once) are retried with full-jitter backoff until
// [TunnelConfig.StartRetryTimeout].
//
// # Port forwarding
//
// [LocalForward] listens locally and carries each connection through a
// tunnel to a fixed destination, like `ssh -L`. [ReverseForward] asks the
// login node's sshd to listen ([Tunnel.Listen]; gossh and controlmaster
// only) and carries each connection back to a local address, like
// `ssh -R`, re-registering the listener after a reconnect. A [Daemon] runs
// them from its Forwards and Exposes, and takes more while it runs through
// its owner-only control socket ([AddForward], [AddExpose]). A daemon
// refuses to expose what it serves itself (its proxy port, a forward, its
// control socket, the tunnel's sockets), and never takes a connection it
// opened itself (an expose's, which carries some login-node user's bytes
// from the owner's UID) for its owner's.
//
// # Daemon
//
// [RunDaemon] runs the server over a supervised tunnel as a long-lived
// process, in shared mode on a login node or in per-job mode inside a batch
// job, records its state in a private state file (see [ProxyState]), and
// reconnects by itself when the tunnel drops. Its status is
// [StatusUnresponsive] from the first keepalive the login node leaves
// unanswered (gossh), before the tunnel is given up for dead. [FindActiveProxy] and
// [GetJobProxy] find a running proxy; [ProxyEnvList] and [ProxyEnvListFor]
// turn it into the environment variables that clients read, and, with
// [EnvOptions].Java, the system properties JVMs read instead (in
// JAVA_TOOL_OPTIONS). Over a controlmaster tunnel the daemon hands each
// client's socket to the OpenSSH master once the proxy handshake is done
// ([HandoffMode]): uploads then go from the client to ssh directly, and,
// in [HandoffOptimistic], downloads too.
//
// # Node tunnel
//
// Per-job daemons of one user on one compute node share one tunnel: the
// first opens it and serves it on an abstract unix socket
// ([NodeSocketName]); later jobs (array tasks, job steps) attach to it
// with [Daemon.Attach] instead of opening another SSH connection. Each job
// keeps its own listener, credentials, UID check, state file, log,
// forwards and control socket; its end (a pidfd of its script, passed
// with SCM_RIGHTS) or [DetachJob] detaches it alone, and the last job's
// end ends the daemon. The state directory travels as a descriptor too,
// so this works where each job has a private /tmp (Slurm's
// job_container/tmpfs). Both sides check the peer's UID with
// SO_PEERCRED: another user can neither attach nor pose as the daemon.
// [Daemon.Private] opts out. The state file ([ProxyState]) records the
// daemon's status, with what each login node carries ([LoginNodeStats]).
//
// The daemon lives in the job that opened the tunnel, and a scheduler
// that kills every process of a job at its end (Slurm's proctrack/cgroup)
// kills it with that job. So each job's listener is made in the job
// itself and held there by a stand-by process: a
// /bin/sh blocked in `read` on a pipe whose write end only the daemon
// holds (passed with the listener, [Daemon.ListenerFd] and
// [Daemon.StandbyFd]).
// The job's end makes the daemon write "exit" on it; the daemon's death
// (even SIGKILL) makes the stand-by exec the job's start again, with the
// listener inherited and the job's credentials kept: it attaches to a
// daemon that still runs or becomes the new one. The port never closes;
// connections made meanwhile wait in its backlog. A stand-by costs about
// 0.1 MiB of memory of its own (PSS; dash's pages are shared) and nothing
// on the login node. A shell, since a second Go process per job would
// cost several MiB; in the job, since anything outside its cgroup (a
// user service, another job's process) would not end with it.
//
// # Cost
//
// An idle relay holds no pipe and no large buffer: between two TCP
// sockets it waits until bytes are queued and splices just those (Linux);
// elsewhere it waits in a read with a 512-byte buffer and moves to 32 and
// 256 KiB ones while a stream is busy. Tunnel channels are opened without
// x/crypto's two goroutines per channel, so a held idle connection costs
// about 14 KiB. A per-job [Daemon] runs its Go code on one thread
// ([Daemon.MaxProcs]), runs the garbage collector less often while bytes
// stream (x/crypto allocates a buffer per received packet), and raises
// its open-file limit for itself and its ssh children.
// A tunnel of the gossh or controlmaster method grows a pool of SSH
// connections with the number of open channels and shrinks it when they
// close ([TunnelConfig.MaxConnections], [TunnelConfig.ChannelsPerConnection]). BENCHMARKS.md in the repository compares all of this with
// OpenSSH's `ssh -D`.
//
// # What is left to the caller
//
// The package never prompts for passwords or passphrases: authentication
// that needs a person (MFA, an encrypted key without an agent) must happen
// beforehand, for instance in an OpenSSH ControlMaster that
// [MethodControlMaster] can attach to (when ssh_config keeps host key
// checking on for the login node). UDP (SOCKS5 UDP ASSOCIATE) and BIND
// are not supported.
package hpcproxy
