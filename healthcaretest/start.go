package healthcaretest

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"google.golang.org/api/option"

	healthcare "google.golang.org/api/healthcare/v1"
)

// Server is an Emulator listening on a loopback address, like
// httptest.Server.
type Server struct {
	// URL is the base URL, "http://127.0.0.1:port", for option.WithEndpoint.
	URL string
	*Emulator

	srv  *http.Server
	ln   net.Listener
	done chan struct{}
}

// Start serves a new Emulator with opts on addr ("127.0.0.1:0" for a random
// port) until Close.
func Start(addr string, opts Options) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	e := New(opts)
	s := &Server{
		URL:      "http://" + ln.Addr().String(),
		Emulator: e,
		srv:      &http.Server{Handler: e, ReadHeaderTimeout: 10 * time.Second},
		ln:       ln,
		done:     make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			e.logf("healthcaretest: serve: %v", err)
		}
	}()
	return s, nil
}

// Close stops the server, waiting up to 5 s for requests in flight, and
// stops running export writes.
func (s *Server) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
	<-s.done
	s.Emulator.Close()
}

// Service returns a real Cloud Healthcare API v1 client pointed at the
// server, without authentication.
func (s *Server) Service(ctx context.Context) (*healthcare.Service, error) {
	return healthcare.NewService(ctx, option.WithEndpoint(s.URL), option.WithoutAuthentication())
}
