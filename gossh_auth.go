package hpcproxy

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

// Authentication of the in-process SSH client (MethodGoSSH): the keys it
// offers (agent, key files, certificates) and the error that names them
// when the server accepts none.

// AuthError reports that the SSH server accepted none of the keys offered,
// or that there was no key to offer. Retrying will not help.
type AuthError struct {
	User, Host string
	// Offered describes each key offered ("agent: ED25519 SHA256:...",
	// "/home/u/.ssh/id_rsa: RSA SHA256:..."). Empty when there was none.
	Offered []string
	// Skipped describes keys that could not be used (encrypted key files,
	// unreadable agents).
	Skipped []string
	// Tried lists where keys were looked for: each key file (IdentityFile,
	// else OpenSSH's default ~/.ssh/id_* names), marked "(absent)" when
	// missing, and the agent socket, or that there was none.
	Tried []string
	Err   error // the SSH library's error, if a handshake took place
}

func (e *AuthError) Error() string {
	var b strings.Builder
	if len(e.Offered) == 0 {
		fmt.Fprintf(&b, "hpcproxy: no usable SSH key for %s@%s (no agent keys, no readable unencrypted key file; tried %s)", e.User, e.Host, strings.Join(e.Tried, ", "))
	} else {
		fmt.Fprintf(&b, "hpcproxy: %s@%s refused every key offered: %s", e.User, e.Host, strings.Join(e.Offered, "; "))
	}
	if len(e.Skipped) > 0 {
		fmt.Fprintf(&b, " (skipped: %s)", strings.Join(e.Skipped, "; "))
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *AuthError) Unwrap() error { return e.Err }

// gosshKeys is what gosshSigners found.
type gosshKeys struct {
	signers []ssh.Signer
	offered []string // a description per signer
	skipped []string
	tried   []string // see AuthError.Tried
	// agentConn is the ssh-agent connection the agent's signers use.
	agentConn net.Conn
}

// close closes the agent connection, if any.
func (k *gosshKeys) close() {
	if k.agentConn != nil {
		_ = k.agentConn.Close()
	}
}

// gosshSigners collects the keys to offer, never prompting:
//
//   - the ssh-agent's keys (IdentityAgent, else $SSH_AUTH_SOCK; "none"
//     disables it), only those matching an IdentityFile when
//     IdentitiesOnly=yes (an IdentityFile matches through its private key,
//     its KEY.pub when the private key is absent, or its own content when
//     it is a public key file, as in OpenSSH). Its socket stays open for
//     signing until gosshKeys.close, which the caller calls once
//     authentication is over (well before the tunnel closes: nothing needs
//     the agent after that);
//   - the IdentityFiles (OpenSSH's default list when none is configured);
//     encrypted ones are skipped with a debug line;
//   - for each key, the certificates matching it: CertificateFile entries
//     and KEY-cert.pub beside a key file, offered before the plain key.
//
// RSA keys sign with rsa-sha2-256/512 as the server's server-sig-algs asks
// (x/crypto picks the algorithm; agent keys too), so an OpenSSH >= 8.8
// server, which refuses SHA-1 ssh-rsa, accepts them.
func gosshSigners(s *sshSettings, log *slog.Logger) (*gosshKeys, error) {
	keys := &gosshKeys{}
	type fileKey struct {
		path   string
		signer ssh.Signer // nil when only the public key is known (encrypted or absent)
		pub    ssh.PublicKey
	}
	var files []fileKey
	for _, p := range s.IdentityFiles {
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			keys.tried = append(keys.tried, p+" (absent)")
			// As in OpenSSH, an IdentityFile whose private half is
			// absent still selects the agent key of its KEY.pub.
			if pub := readPublicKey(p + ".pub"); pub != nil {
				files = append(files, fileKey{path: p, pub: pub})
			}
			continue
		}
		keys.tried = append(keys.tried, p)
		if err != nil {
			log.Debug("skipping unreadable key file", "file", p, "err", err)
			keys.skipped = append(keys.skipped, p+": "+err.Error())
			continue
		}
		signer, err := ssh.ParsePrivateKey(b)
		var pme *ssh.PassphraseMissingError
		switch {
		case errors.As(err, &pme):
			log.Debug("skipping encrypted key file (gossh never prompts; load it into ssh-agent)", "file", p)
			keys.skipped = append(keys.skipped, p+": encrypted")
			pub := pme.PublicKey
			if pub == nil {
				pub = readPublicKey(p + ".pub")
			}
			files = append(files, fileKey{path: p, pub: pub})
		case err != nil:
			if pub, _, _, _, perr := ssh.ParseAuthorizedKey(b); perr == nil {
				// A public key named as IdentityFile: it selects an
				// agent key, as in OpenSSH.
				files = append(files, fileKey{path: p, pub: pub})
				continue
			}
			log.Debug("skipping unusable key file", "file", p, "err", err)
			keys.skipped = append(keys.skipped, p+": "+err.Error())
		default:
			files = append(files, fileKey{path: p, signer: signer, pub: signer.PublicKey()})
		}
	}

	certs := loadCertificates(s, log)
	add := func(signer ssh.Signer, source string) {
		pub := signer.PublicKey().Marshal()
		for _, c := range certs {
			if string(c.Key.Marshal()) != string(pub) {
				continue
			}
			cs, err := ssh.NewCertSigner(c, signer)
			if err != nil {
				log.Debug("skipping certificate", "key", source, "err", err)
				continue
			}
			keys.signers = append(keys.signers, cs)
			keys.offered = append(keys.offered, source+": certificate "+describeKey(c.Key)+" (serial "+fmt.Sprint(c.Serial)+")")
		}
		keys.signers = append(keys.signers, signer)
		keys.offered = append(keys.offered, source+": "+describeKey(signer.PublicKey()))
	}

	seen := map[string]bool{}
	for _, signer := range agentSigners(s, log, keys) {
		pub := string(signer.PublicKey().Marshal())
		if s.IdentitiesOnly && !slices.ContainsFunc(files, func(f fileKey) bool {
			return f.pub != nil && string(f.pub.Marshal()) == pub
		}) {
			continue
		}
		if _, isCert := signer.PublicKey().(*ssh.Certificate); isCert {
			keys.signers = append(keys.signers, signer)
			keys.offered = append(keys.offered, "agent: certificate "+describeKey(signer.PublicKey()))
			continue
		}
		seen[pub] = true
		add(signer, "agent")
	}
	for _, f := range files {
		if f.signer == nil || seen[string(f.pub.Marshal())] {
			continue
		}
		seen[string(f.pub.Marshal())] = true
		add(f.signer, f.path)
	}
	return keys, nil
}

// agentSigners returns the agent's keys, recording in keys the agent
// connection they sign through.
func agentSigners(s *sshSettings, log *slog.Logger, keys *gosshKeys) []ssh.Signer {
	sock := s.IdentityAgent
	if sock == "" || sock == "SSH_AUTH_SOCK" {
		sock = os.Getenv("SSH_AUTH_SOCK")
	}
	switch sock {
	case "":
		keys.tried = append(keys.tried, "no agent (SSH_AUTH_SOCK unset)")
		return nil
	case "none":
		keys.tried = append(keys.tried, "no agent (IdentityAgent none)")
		return nil
	}
	keys.tried = append(keys.tried, "agent "+sock)
	conn, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		log.Debug("no ssh-agent", "socket", sock, "err", err)
		keys.skipped = append(keys.skipped, "agent "+sock+": "+err.Error())
		return nil
	}
	ag := agent.NewClient(conn)
	signers, err := ag.Signers()
	if err != nil {
		conn.Close()
		log.Debug("ssh-agent list failed", "socket", sock, "err", err)
		keys.skipped = append(keys.skipped, "agent "+sock+": "+err.Error())
		return nil
	}
	if len(signers) == 0 {
		conn.Close()
		return nil
	}
	keys.agentConn = conn
	return signers
}

// readPublicKey reads an authorized_keys-format public key file; nil if it
// cannot.
func readPublicKey(path string) ssh.PublicKey {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		return nil
	}
	return pub
}

// loadCertificates reads the CertificateFile entries and the KEY-cert.pub
// files beside the IdentityFiles. Missing files are skipped silently,
// unparsable ones with a debug line.
func loadCertificates(s *sshSettings, log *slog.Logger) []*ssh.Certificate {
	paths := slices.Clone(s.CertificateFiles)
	for _, p := range s.IdentityFiles {
		paths = append(paths, p+"-cert.pub")
	}
	var certs []*ssh.Certificate
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				log.Debug("skipping certificate", "file", p, "err", err)
			}
			continue
		}
		pub, _, _, _, err := ssh.ParseAuthorizedKey(b)
		cert, ok := pub.(*ssh.Certificate)
		if err != nil || !ok {
			log.Debug("skipping file that holds no certificate", "file", p, "err", err)
			continue
		}
		if cert.CertType != ssh.UserCert {
			log.Debug("skipping host certificate given as a user certificate", "file", p)
			continue
		}
		certs = append(certs, cert)
	}
	return certs
}

// describeKey returns "TYPE SHA256:...".
func describeKey(k ssh.PublicKey) string {
	return k.Type() + " " + ssh.FingerprintSHA256(k)
}
