package export

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/iterator"
)

// Errors of the state store. Anything else it returns is transient.
var (
	ErrExists   = errors.New("state object already exists")
	ErrConflict = errors.New("state object changed concurrently")
	ErrNotFound = errors.New("state object not found")
	// ErrCorrupt marks a state object that is not what fhirexport wrote (it
	// does not decode). It is permanent: retrying cannot heal it.
	ErrCorrupt = errors.New("state object is corrupt")
)

// State is the run state kept as small JSON objects in Cloud Storage. Every
// write carries a precondition (DoesNotExist or GenerationMatch) so concurrent
// instances and redeliveries cannot double-start a run or lose an update.
type State struct {
	client *storage.Client // also writes feed files to destinations (feed.go)
	bkt    *storage.BucketHandle
	bucket string
	prefix string
}

// NewState returns the state store at gs://bucket/prefix.
func NewState(client *storage.Client, bucket, prefix string) *State {
	return &State{client: client, bkt: client.Bucket(bucket), bucket: bucket, prefix: prefix}
}

func (s *State) object(name string) string { return path.Join(s.prefix, name) }

// stateObject is a listed state object.
type stateObject struct {
	Name       string // relative to the listed folder
	Generation int64
	Metadata   map[string]string
	Updated    time.Time // when the object last changed
}

// create writes v to name only if name does not exist yet.
func (s *State) create(ctx context.Context, name string, v any, meta map[string]string) (int64, error) {
	return s.write(ctx, name, storage.Conditions{DoesNotExist: true}, v, meta)
}

// update replaces name only if it is still at generation gen.
func (s *State) update(ctx context.Context, name string, gen int64, v any, meta map[string]string) (int64, error) {
	return s.write(ctx, name, storage.Conditions{GenerationMatch: gen}, v, meta)
}

func (s *State) write(ctx context.Context, name string, cond storage.Conditions, v any, meta map[string]string) (int64, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode state %s: %w", name, err)
	}
	// One request per attempt, without the library's 256 KiB chunk buffer
	// (ChunkSize 0); the retries are ours. A conditional write is idempotent,
	// except that a DoesNotExist write whose answer was lost meets its own
	// object on the retry: reading it back tells that apart from a rival.
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		gen, err := s.writeOnce(ctx, name, cond, data, meta)
		if err == nil {
			return gen, nil
		}
		if attempt > 1 && (errors.Is(err, ErrExists) || errors.Is(err, ErrConflict)) {
			if g, same := s.sameContent(ctx, name, data); same {
				return g, nil
			}
		}
		if attempt == 4 || !storage.ShouldRetry(unwrapState(err)) {
			return 0, err
		}
		select {
		case <-ctx.Done():
			return 0, err
		case <-time.After(backoff):
		}
		backoff *= 3
	}
}

func (s *State) writeOnce(ctx context.Context, name string, cond storage.Conditions, data []byte, meta map[string]string) (int64, error) {
	w := s.bkt.Object(s.object(name)).If(cond).Retryer(storage.WithPolicy(storage.RetryNever)).NewWriter(ctx)
	w.ChunkSize = 0
	w.ContentType = "application/json"
	w.Metadata = meta
	if _, err := w.Write(data); err != nil {
		w.Close()
		return 0, s.classify(name, err, cond)
	}
	if err := w.Close(); err != nil {
		return 0, s.classify(name, err, cond)
	}
	return w.Attrs().Generation, nil
}

// sameContent reports whether name holds exactly data, and its generation.
func (s *State) sameContent(ctx context.Context, name string, data []byte) (int64, bool) {
	r, err := s.bkt.Object(s.object(name)).NewReader(ctx)
	if err != nil {
		return 0, false
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	return r.Attrs.Generation, err == nil && bytes.Equal(got, data)
}

// stateError keeps the storage error under our wrapping for retry decisions.
type stateError struct {
	msg string
	err error
}

func (e *stateError) Error() string { return e.msg }
func (e *stateError) Unwrap() error { return e.err }

func unwrapState(err error) error {
	var se *stateError
	if errors.As(err, &se) {
		return se.err
	}
	return err
}

// read decodes name into v and returns its generation.
func (s *State) read(ctx context.Context, name string, v any) (int64, error) {
	r, err := s.bkt.Object(s.object(name)).NewReader(ctx)
	if err != nil {
		return 0, s.classify(name, err, storage.Conditions{})
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		return 0, fmt.Errorf("read state %s: %w", name, err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return r.Attrs.Generation, fmt.Errorf("state %s: %w: %v", name, ErrCorrupt, err)
	}
	return r.Attrs.Generation, nil
}

// remove deletes name if it is still at generation gen; a missing object is
// not an error (the delete already happened).
func (s *State) remove(ctx context.Context, name string, gen int64) error {
	err := s.bkt.Object(s.object(name)).If(storage.Conditions{GenerationMatch: gen}).Delete(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return nil
	}
	if err != nil {
		return s.classify(name, err, storage.Conditions{GenerationMatch: gen})
	}
	return nil
}

// list returns the objects under dir with their generation and metadata.
func (s *State) list(ctx context.Context, dir string) ([]stateObject, error) {
	q := &storage.Query{Prefix: s.object(dir) + "/"}
	if err := q.SetAttrSelection([]string{"Name", "Generation", "Metadata"}); err != nil {
		return nil, fmt.Errorf("list state %s: %w", dir, err)
	}
	var out []stateObject
	it := s.bkt.Objects(ctx, q)
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("list state gs://%s/%s: %w", s.bucket, q.Prefix, err)
		}
		rel := a.Name[len(q.Prefix):]
		out = append(out, stateObject{Name: rel, Generation: a.Generation, Metadata: a.Metadata})
	}
}

func (s *State) classify(name string, err error, cond storage.Conditions) error {
	if errors.Is(err, storage.ErrObjectNotExist) {
		return fmt.Errorf("state %s: %w", name, ErrNotFound)
	}
	var ge *googleapi.Error
	if errors.As(err, &ge) && ge.Code == 412 {
		if cond.DoesNotExist {
			return fmt.Errorf("state %s: %w", name, ErrExists)
		}
		return fmt.Errorf("state %s: %w", name, ErrConflict)
	}
	if errors.As(err, &ge) && ge.Code == 404 {
		return fmt.Errorf("state %s: %w", name, ErrNotFound)
	}
	return &stateError{msg: fmt.Sprintf("state gs://%s/%s: %v", s.bucket, s.object(name), err), err: err}
}

// each calls fn for every object under dir as the listing streams in, so a
// sweep over many objects holds one page at a time, not the whole listing.
// Stopping early: fn returns errStop.
func (s *State) each(ctx context.Context, dir string, fn func(stateObject) error) error {
	q := &storage.Query{Prefix: s.object(dir) + "/"}
	if err := q.SetAttrSelection([]string{"Name", "Generation", "Metadata", "Updated"}); err != nil {
		return fmt.Errorf("list state %s: %w", dir, err)
	}
	it := s.bkt.Objects(ctx, q)
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("list state gs://%s/%s: %w", s.bucket, q.Prefix, err)
		}
		if err := fn(stateObject{Name: a.Name[len(q.Prefix):], Generation: a.Generation, Metadata: a.Metadata, Updated: a.Updated}); err != nil {
			if errors.Is(err, errStop) {
				return nil
			}
			return err
		}
	}
}

var errStop = errors.New("stop listing")

// quarantine moves a corrupt object aside (quarantine/{name}.{gen}) so the
// pipeline it blocked can move on, keeping its bytes for an operator.
func (s *State) quarantine(ctx context.Context, name string, gen int64, reason string) error {
	r, err := s.bkt.Object(s.object(name)).If(storage.Conditions{GenerationMatch: gen}).NewReader(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return nil
	}
	if err != nil {
		return s.classify(name, err, storage.Conditions{})
	}
	data, err := io.ReadAll(io.LimitReader(r, 1<<20))
	r.Close()
	if err != nil {
		return fmt.Errorf("read state %s: %w", name, err)
	}
	to := fmt.Sprintf("quarantine/%s.%d", name, gen)
	w := s.bkt.Object(s.object(to)).NewWriter(ctx)
	w.ContentType = "application/octet-stream"
	w.Metadata = map[string]string{"reason": truncate(reason, 1000), "from": name}
	if _, err := w.Write(data); err != nil {
		w.Close()
		return s.classify(to, err, storage.Conditions{})
	}
	if err := w.Close(); err != nil {
		return s.classify(to, err, storage.Conditions{})
	}
	return s.remove(ctx, name, gen)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
