// Package transparent runs a command whose every TCP connection, and its
// DNS, goes through an hpcproxy tunnel, without root and without proxy
// settings in the command: `perjob run --transparent` (examples/perjob)
// is built on it.
//
// [Start] runs the command in a new user, network and mount namespace
// (unprivileged user namespaces, as rootless Apptainer and Podman use).
// The namespace's only route is a TUN device; its other end is a
// user-space TCP/IP stack (gVisor's netstack) in the calling process,
// which accepts each connection the command opens and dials its
// destination with [Config.Dial], normally the tunnel's DialFunc. A
// bind-mounted resolv.conf points the command's resolver at the stack,
// where [FakeDNS] answers every name with a fake address from
// 198.18.0.0/15 and remembers it: a connection to that address is dialled
// by name, so the name resolves on the login node. The command's UID and
// GID are the caller's (mapped into the namespace), its stdio, working
// directory, environment and exit status are its own, and it runs with
// no capability.
//
// # What the command can reach
//
//   - Any TCP destination the far end of the tunnel can reach, by name or
//     by address (IPv4; AAAA queries get no answer, so programs use IPv4).
//   - Its own loopback: 127.0.0.1 inside the namespace is the namespace's,
//     so servers the command starts itself are reachable, but the node's
//     other processes (the per-job proxy included) are not.
//   - Networks listed in [Config.Exclude], dialled directly from the
//     caller's network namespace (the node's own network: other nodes of
//     the job, cluster file servers), by address only.
//
// UDP other than DNS (to the resolver in resolv.conf), ICMP (ping) and
// IPv6 destinations are not carried. /etc/hosts stays the node's: names
// it lists resolve to its addresses, which are then dialled through the
// tunnel (or directly, if excluded). The sockets of nscd and
// systemd-resolved, which the C library would ask before resolv.conf, are
// hidden in the command's mount namespace.
//
// # What it needs from the node
//
// Unprivileged user namespaces (sysctl user.max_user_namespaces above 0;
// kernel.unprivileged_userns_clone=1 where it exists; no AppArmor
// restriction, kernel.apparmor_restrict_unprivileged_userns=0) and a
// /dev/net/tun that the user can open (mode 0666, as most distributions
// ship it). [Check] tests both; Start returns a [*SetupError] naming the
// setting when either is missing, before the command runs.
//
// A program that calls Start must call [Init] first thing in main (and in
// TestMain): Start re-executes the program as the namespace's first
// process, where Init sets the namespace up and then executes the
// command.
//
// This package is separate from package hpcproxy so that programs which
// only use the proxy do not compile the TCP/IP stack.
package transparent
