package mirror

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The files of a mirror folder besides its {Type}.ndjson.
const (
	// CursorFile is the last manifest applied: a pull continues after it.
	CursorFile = "feed-cursor.json"
	// ChangesFile logs every change applied (Options.Changes), one Change a line.
	ChangesFile = "changes.ndjson"

	stagingDir  = ".fhirexport-pull"      // one manifest being applied; removed once it is
	lockFile    = ".fhirexport-pull.lock" // flock: one pull at a time
	journalFile = "commit.json"           // in stagingDir: the commit point of one manifest
)

var (
	// ErrBusy means another pull holds the folder.
	ErrBusy = errors.New("another pull is applying into this folder")
	// ErrNotMirror means the folder holds files but no cursor: pulling into
	// it would mix a mirror with whatever is there.
	ErrNotMirror = errors.New("the folder is not empty and holds no " + CursorFile + ": not a mirror")
	// ErrNotNewer means a manifest is not newer than the last one applied:
	// applying it would apply a run twice or out of order.
	ErrNotNewer = errors.New("not newer than the last manifest applied")
)

// Cursor is what a mirror folder has applied: the last manifest and the
// resources held after it.
type Cursor struct {
	Pipeline        string         `json:"pipeline"`
	Store           string         `json:"store,omitempty"`
	Run             string         `json:"run"`
	Operation       string         `json:"operation,omitempty"`
	TransactionTime string         `json:"transactionTime"`
	Manifest        string         `json:"manifest"`
	Applied         int            `json:"applied"`   // manifests applied to the folder in all
	Resources       map[string]int `json:"resources"` // resources held, by type
	Updated         time.Time      `json:"updated"`
}

// Run names the export run a manifest belongs to.
type Run struct {
	ID        string
	Operation string
	Manifest  string // where the manifest was read
	Pipeline  string
	Store     string
}

// Change is one line of the changes log: a resource upserted or removed by a
// run. Upserts that leave a resource as it was are not logged.
type Change struct {
	Run             string `json:"run"`
	Operation       string `json:"operation,omitempty"`
	TransactionTime string `json:"transactionTime"`
	Action          string `json:"action"`           // "upsert" or "remove"
	Reason          string `json:"reason,omitempty"` // a removal's: "deleted" (listed in deleted) or "snapshot" (absent from a full export)
	Type            string `json:"type"`
	ID              string `json:"id"`
	VersionID       string `json:"versionId,omitempty"`   // the version upserted or removed
	LastUpdated     string `json:"lastUpdated,omitempty"` // its meta.lastUpdated
}

// Mirror is an open mirror folder, locked against other pulls until Close.
type Mirror struct {
	dir    string
	now    func() time.Time
	lock   *os.File
	cursor *Cursor

	// Recovered is the cursor of a manifest an interrupted pull had
	// committed and Open finished applying; nil when there was none.
	Recovered *Cursor

	crash func(step string) error // tests: stop as a crash would after step
}

// journal is a committed manifest's remaining work: written atomically once
// every new file is in the staging folder, and redone until it is removed.
type journal struct {
	Cursor  Cursor   `json:"cursor"`
	Replace []string `json:"replace"` // types whose staged file replaces the folder's
	Remove  []string `json:"remove"`  // types whose file goes: none of them is left
	// ChangesOffset is the changes log's size before this manifest's lines:
	// redoing truncates it there before appending them.
	ChangesOffset *int64 `json:"changesOffset,omitempty"`
}

// Open opens the mirror folder dir, creating it if needed, and locks it.
// A manifest an interrupted pull had committed is finished (Recovered);
// one it had only begun is forgotten, so the next Apply starts it over.
func Open(dir string, now func() time.Time) (*Mirror, error) {
	if now == nil {
		now = time.Now
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	lock, err := lockDir(filepath.Join(dir, lockFile))
	if err != nil {
		return nil, err
	}
	m := &Mirror{dir: dir, now: now, lock: lock}
	if err := m.recover(); err != nil {
		lock.Close()
		return nil, err
	}
	return m, nil
}

func (m *Mirror) recover() error {
	data, err := os.ReadFile(m.staged(journalFile))
	switch {
	case err == nil:
		var j journal
		if err := json.Unmarshal(data, &j); err != nil {
			return fmt.Errorf("%s: %w", m.staged(journalFile), err)
		}
		if err := m.finish(j); err != nil {
			return fmt.Errorf("finish applying %s: %w", j.Cursor.Manifest, err)
		}
		m.Recovered = &j.Cursor
	case errors.Is(err, os.ErrNotExist):
		if err := os.RemoveAll(m.staged()); err != nil {
			return err
		}
	default:
		return err
	}
	data, err = os.ReadFile(filepath.Join(m.dir, CursorFile))
	switch {
	case err == nil:
		var c Cursor
		if err := json.Unmarshal(data, &c); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(m.dir, CursorFile), err)
		}
		m.cursor = &c
		return nil
	case !errors.Is(err, os.ErrNotExist):
		return err
	}
	entries, err := os.ReadDir(m.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Name() != lockFile && e.Name() != stagingDir {
			return fmt.Errorf("%s: %w (it holds %s)", m.dir, ErrNotMirror, e.Name())
		}
	}
	return nil
}

// Cursor returns the last manifest applied, nil for a new mirror.
func (m *Mirror) Cursor() *Cursor {
	if m.cursor == nil {
		return nil
	}
	c := *m.cursor
	return &c
}

// Close releases the folder.
func (m *Mirror) Close() error { return m.lock.Close() }

func (m *Mirror) staged(parts ...string) string {
	return filepath.Join(append([]string{m.dir, stagingDir}, parts...)...)
}

// step runs the crash hook of tests.
func (m *Mirror) step(name string) error {
	if m.crash != nil {
		return m.crash(name)
	}
	return nil
}

// finish does a committed manifest's remaining work. Every step may be
// repeated: a rename already done finds no staged file, a removal no file,
// the changes log is cut back to its size before the manifest's lines.
// The journal goes first when done, so the staged files it names outlive it.
func (m *Mirror) finish(j journal) error {
	for _, t := range j.Replace {
		err := os.Rename(m.staged("new", t+".ndjson"), filepath.Join(m.dir, t+".ndjson"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	for _, t := range j.Remove {
		if err := os.Remove(filepath.Join(m.dir, t+".ndjson")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := m.step("replaced"); err != nil {
		return err
	}
	if j.ChangesOffset != nil {
		if err := m.appendChanges(*j.ChangesOffset); err != nil {
			return err
		}
	}
	if err := m.step("logged"); err != nil {
		return err
	}
	data, err := json.MarshalIndent(j.Cursor, "", "  ")
	if err != nil {
		return err
	}
	if err := m.writeAtomic(CursorFile, append(data, '\n')); err != nil {
		return err
	}
	if err := syncDir(m.dir); err != nil {
		return err
	}
	if err := os.Remove(m.staged(journalFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	m.cursor = &j.Cursor
	return os.RemoveAll(m.staged())
}

// appendChanges appends the staged changes to the log, first cutting the log
// back to offset (a repeat after a crash appends them once).
func (m *Mirror) appendChanges(offset int64) error {
	src, err := os.Open(m.staged(ChangesFile))
	if err != nil {
		return err
	}
	defer src.Close()
	f, err := os.OpenFile(filepath.Join(m.dir, ChangesFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err == nil && st.Size() > offset {
		err = f.Truncate(offset)
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekEnd)
	}
	if err == nil {
		_, err = io.Copy(f, src)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// writeAtomic replaces the folder's file name with data: written and synced
// in the staging folder, then renamed over it.
func (m *Mirror) writeAtomic(name string, data []byte) error {
	if err := os.MkdirAll(m.staged(), 0o755); err != nil {
		return err
	}
	tmp := m.staged(name + ".tmp")
	if err := writeSynced(tmp, data); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(m.dir, name))
}

func writeSynced(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return err
	}
	return nil
}

// Types lists the resource types the folder holds a file of, sorted.
func (m *Mirror) Types() ([]string, error) {
	entries, err := os.ReadDir(m.dir)
	if err != nil {
		return nil, err
	}
	var types []string
	for _, e := range entries {
		if t, ok := strings.CutSuffix(e.Name(), ".ndjson"); ok && typeName.MatchString(t) && e.Type().IsRegular() {
			types = append(types, t)
		}
	}
	slices.Sort(types)
	return types, nil
}
