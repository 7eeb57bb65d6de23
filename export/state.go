package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/iterator"
)

// Errors of the state store. Anything else it returns is transient.
var (
	ErrExists   = errors.New("state object already exists")
	ErrConflict = errors.New("state object changed concurrently")
	ErrNotFound = errors.New("state object not found")
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
	// The storage library retries uploads with a narrower test than other
	// calls: a connection closed without an answer (EOF) is not retried.
	// storage.ShouldRetry is the one it applies everywhere else.
	w := s.bkt.Object(s.object(name)).If(cond).Retryer(storage.WithErrorFunc(storage.ShouldRetry)).NewWriter(ctx)
	// Buffered, so the client can retry the write (a conditional write is
	// idempotent); with ChunkSize 0 it sends one unretryable request. The
	// library rounds this up to 256 KiB: still one request.
	w.ChunkSize = len(data) + 1
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
		return 0, fmt.Errorf("decode state %s: %w", name, err)
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
	return fmt.Errorf("state gs://%s/%s: %w", s.bucket, s.object(name), err)
}
