package transparent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The stage is this program re-executed as the first process of the new
// user, network and mount namespaces (see Start). It runs with
// CAP_NET_ADMIN and CAP_SYS_ADMIN in those namespaces only (ambient
// capabilities, from the user namespace it created), sets them up, hands
// the TUN device to the parent and executes the command without any
// capability.

const (
	// stageEnv marks the stage; its value is the path of the resolv.conf
	// to bind over /etc/resolv.conf.
	stageEnv = "HPCPROXY_TRANSPARENT_STAGE"
	// stageFD is the stage's end of the socket pair (ExtraFiles[0]).
	stageFD = 3
	tunName = "tun0"
)

// Messages on the socket pair: the stage sends msgReady with the TUN fd,
// or msgError and a text; the parent answers msgGo once its stack reads
// the device.
const (
	msgReady = 'R'
	msgError = 'E'
	msgGo    = 'G'
)

// Init must be called first thing in main (and in TestMain) by every
// program that starts commands with [Start]: Start re-executes the program
// itself inside the new namespaces, and there Init sets the namespaces up
// and executes the command instead of returning. In any other process it
// returns at once.
func Init() {
	resolv, ok := os.LookupEnv(stageEnv)
	if !ok {
		return
	}
	os.Unsetenv(stageEnv)
	// Capabilities are per thread: the one that clears them must be the
	// one that executes the command.
	runtime.LockOSThread()
	sock := os.NewFile(stageFD, "transparent-stage")
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "transparent: stage started without a command")
		os.Exit(126)
	}
	path, argv := os.Args[1], os.Args[2:]
	tunFD, err := setupNamespace(resolv)
	if err != nil {
		_ = sendMsg(sock, append([]byte{msgError}, err.Error()...), -1)
		os.Exit(126)
	}
	if err := sendMsg(sock, []byte{msgReady}, tunFD); err != nil {
		fmt.Fprintln(os.Stderr, "transparent: stage:", err)
		os.Exit(126)
	}
	_ = unix.Close(tunFD)
	var b [1]byte
	if n, err := sock.Read(b[:]); n != 1 || b[0] != msgGo {
		// The parent gave up (and says why); nothing of the command ran.
		_ = err
		os.Exit(126)
	}
	_ = sock.Close()
	// No capability survives into the command: with the ambient set
	// empty, executing a file as a non-zero UID leaves none.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "transparent: clear capabilities:", err)
		os.Exit(126)
	}
	err = syscall.Exec(path, argv, os.Environ())
	fmt.Fprintf(os.Stderr, "transparent: %s: %v\n", path, err)
	if errors.Is(err, syscall.ENOENT) {
		os.Exit(127)
	}
	os.Exit(126)
}

// resolverSockets are the sockets of resolver daemons that the C library
// would ask instead of the namespace's resolv.conf.
var resolverSockets = []string{
	"/run/nscd/socket",
	"/var/run/nscd/socket",
	"/run/systemd/resolve/io.systemd.Resolve",
}

// setupNamespace makes the namespace's network (loopback up, a TUN device
// carrying the default route) and its resolv.conf, and returns the TUN fd.
func setupNamespace(resolv string) (int, error) {
	// The mount namespace is a copy of the parent's; make it private so
	// that the bind below stays in it.
	if err := unix.Mount("none", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return -1, fmt.Errorf("make the mount namespace private: %w", err)
	}
	if err := unix.Mount(resolv, "/etc/resolv.conf", "", unix.MS_BIND, ""); err != nil {
		return -1, fmt.Errorf("bind the namespace's resolv.conf over /etc/resolv.conf: %w", err)
	}
	// Resolver daemons that glibc asks before DNS (nscd, common on
	// clusters; systemd-resolved through nss-resolve) would answer with
	// the node's DNS: hide their sockets, so that glibc falls back to
	// resolv.conf. A regular file over a socket refuses connections.
	for _, sock := range resolverSockets {
		var st unix.Stat_t
		if unix.Lstat(sock, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
			continue
		}
		if err := unix.Mount(resolv, sock, "", unix.MS_BIND, ""); err != nil {
			return -1, fmt.Errorf("hide the resolver socket %s: %w", sock, err)
		}
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(tunName)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("create the TUN device (TUNSETIFF): %w", err)
	}
	if err := configureLinks(); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func configureLinks() error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(s)
	ioctl := func(what, name string, req uint, set func(*unix.Ifreq) error) error {
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		if err := set(ifr); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(s, req, ifr); err != nil {
			return fmt.Errorf("%s of %s: %w", what, name, err)
		}
		return nil
	}
	up := func(ifr *unix.Ifreq) error { ifr.SetUint16(unix.IFF_UP | unix.IFF_RUNNING); return nil }
	steps := []struct {
		what, name string
		req        uint
		set        func(*unix.Ifreq) error
	}{
		{"bring up", "lo", unix.SIOCSIFFLAGS, up},
		{"set MTU", tunName, unix.SIOCSIFMTU, func(ifr *unix.Ifreq) error { ifr.SetUint32(tunMTU); return nil }},
		{"set address", tunName, unix.SIOCSIFADDR, func(ifr *unix.Ifreq) error { return ifr.SetInet4Addr(tunAddr.AsSlice()) }},
		{"set netmask", tunName, unix.SIOCSIFNETMASK, func(ifr *unix.Ifreq) error {
			m := net4Mask(DefaultFakeRange.Bits())
			return ifr.SetInet4Addr(m[:])
		}},
		{"bring up", tunName, unix.SIOCSIFFLAGS, up},
	}
	for _, st := range steps {
		if err := ioctl(st.what, st.name, st.req, st.set); err != nil {
			return err
		}
	}
	idx, err := ifIndex(s, tunName)
	if err != nil {
		return err
	}
	return addDefaultRoute(idx)
}

func net4Mask(bits int) [4]byte {
	v := ^uint32(0) << (32 - bits)
	return [4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
}

func ifIndex(s int, name string) (int, error) {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("index of %s: %w", name, err)
	}
	return int(ifr.Uint32()), nil
}

// addDefaultRoute adds "default dev IDX" (IPv4) over rtnetlink.
func addDefaultRoute(idx int) error {
	s, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink socket: %w", err)
	}
	defer unix.Close(s)
	if err := unix.Bind(s, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink bind: %w", err)
	}
	const attrLen = unix.SizeofRtAttr + 4
	msg := make([]byte, unix.SizeofNlMsghdr+unix.SizeofRtMsg+attrLen)
	hdr := (*unix.NlMsghdr)(unsafe.Pointer(&msg[0]))
	*hdr = unix.NlMsghdr{
		Len:   uint32(len(msg)),
		Type:  unix.RTM_NEWROUTE,
		Flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK | unix.NLM_F_CREATE | unix.NLM_F_EXCL,
		Seq:   1,
	}
	rt := (*unix.RtMsg)(unsafe.Pointer(&msg[unix.SizeofNlMsghdr]))
	*rt = unix.RtMsg{
		Family:   unix.AF_INET,
		Table:    unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_BOOT,
		Scope:    unix.RT_SCOPE_LINK,
		Type:     unix.RTN_UNICAST,
	}
	attr := msg[unix.SizeofNlMsghdr+unix.SizeofRtMsg:]
	binary.NativeEndian.PutUint16(attr[0:], attrLen)
	binary.NativeEndian.PutUint16(attr[2:], unix.RTA_OIF)
	binary.NativeEndian.PutUint32(attr[4:], uint32(idx))
	if err := unix.Sendto(s, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(s, buf, 0)
	if err != nil {
		return fmt.Errorf("netlink receive: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return fmt.Errorf("netlink answer: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
				return fmt.Errorf("add the default route via %s: %w", tunName, syscall.Errno(-e))
			}
			return nil
		}
	}
	return errors.New("add the default route: no answer from netlink")
}

// sendMsg sends b on the socket pair, with fd attached unless it is -1.
func sendMsg(sock *os.File, b []byte, fd int) error {
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	return unix.Sendmsg(int(sock.Fd()), b, oob, nil, 0)
}
