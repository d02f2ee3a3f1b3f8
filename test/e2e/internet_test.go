package e2e

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/http/cgi"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// roleEnv names the variable that makes the test binary run as one of the
// cluster's servers instead of the tests.
const roleEnv = "HPCPROXY_E2E_ROLE"

const gitHTTPBackend = "/usr/lib/git-core/git-http-backend"

func TestMain(m *testing.M) {
	if os.Getenv(roleEnv) == "internet" {
		if err := serveInternet(os.Getenv("HPCPROXY_E2E_DIR")); err != nil {
			fmt.Fprintln(os.Stderr, "internet:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// serveInternet runs the internet node's servers until killed: HTTP on port
// 80 and HTTPS on 443 (certificate for internetHost from the test CA), both
// serving
//
//	/files/...    a static file tree (big.bin, hello.txt)
//	/repo.git/... a git repository over smart HTTP (git-http-backend)
//	/slow?bytes=N&chunk=C&delay=D
//	              N bytes (Content-Length N) written C at a time, D apart:
//	              a download that is in flight long enough to break
//
// It prints READY once both listen.
func serveInternet(dir string) error {
	mux := http.NewServeMux()
	mux.Handle("/files/", http.FileServer(http.Dir(filepath.Join(dir, "www"))))
	mux.Handle("/repo.git/", &cgi.Handler{
		Path: gitHTTPBackend,
		Env: []string{
			"GIT_PROJECT_ROOT=" + filepath.Join(dir, "git"),
			"GIT_HTTP_EXPORT_ALL=1",
		},
	})
	mux.HandleFunc("/slow", slow)

	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		return err
	}
	plain, err := net.Listen("tcp", ":80")
	if err != nil {
		return err
	}
	secure, err := net.Listen("tcp", ":443")
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	go func() { errc <- (&http.Server{Handler: logged(mux), ReadHeaderTimeout: 10 * time.Second}).Serve(plain) }()
	go func() {
		srv := &http.Server{Handler: logged(mux), ReadHeaderTimeout: 10 * time.Second}
		errc <- srv.Serve(tls.NewListener(secure, &tls.Config{Certificates: []tls.Certificate{cert}}))
	}()
	fmt.Println("READY")
	return <-errc
}

func logged(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("%s %s %s %s\n", time.Now().Format("15:04:05.000"), r.RemoteAddr, r.Method, r.URL)
		h.ServeHTTP(w, r)
	})
}

func slow(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	n, _ := strconv.Atoi(q.Get("bytes"))
	chunk, _ := strconv.Atoi(q.Get("chunk"))
	delay, _ := time.ParseDuration(q.Get("delay"))
	if n <= 0 || chunk <= 0 {
		http.Error(w, "want bytes and chunk", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(n))
	w.Header().Set("Content-Type", "application/octet-stream")
	buf := make([]byte, chunk)
	for i := range buf {
		buf[i] = byte('a' + i%26)
	}
	f, _ := w.(http.Flusher)
	for sent := 0; sent < n; {
		k := min(chunk, n-sent)
		if _, err := w.Write(buf[:k]); err != nil {
			return
		}
		if f != nil {
			f.Flush()
		}
		sent += k
		select {
		case <-r.Context().Done():
			return
		case <-time.After(delay):
		}
	}
}
