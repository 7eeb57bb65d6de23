package mirror

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Options are how one manifest is applied.
type Options struct {
	// Changes appends the manifest's changes to the changes log.
	Changes bool
	// Progress, when set, is told the bytes downloaded of the manifest's
	// files so far, as they arrive.
	Progress func(bytes int64)
}

// Result is what applying one manifest did.
type Result struct {
	Upserts  int   // resources created or changed
	Removals int   // resources removed
	Bytes    int64 // downloaded
	Snapshot bool  // the manifest was a full export: absent resources of its types were removed
}

// maxLine bounds one NDJSON line (one resource); the Healthcare API's own
// limit on a resource is 10 MB.
const maxLine = 64 << 20

// Apply fetches man's files with f and applies man as the Bulk Data client
// rule says: every output resource upserted, then every deleted one removed;
// a snapshot (Manifest.Snapshot) also removes whatever it does not list of
// its types. The folder changes atomically: when Apply fails, or ctx ends,
// it holds what it held before. A manifest not newer than the cursor is
// refused (ErrNotNewer).
func (m *Mirror) Apply(ctx context.Context, run Run, man *Manifest, f *Fetcher, opts Options) (Result, error) {
	var res Result
	if c := m.cursor; c != nil {
		if c.Pipeline != run.Pipeline {
			return res, fmt.Errorf("%s mirrors pipeline %s, not %s", m.dir, c.Pipeline, run.Pipeline)
		}
		if err := checkNewer(c, man); err != nil {
			return res, fmt.Errorf("manifest %s (transactionTime %s): %w (%s, %s)", run.Manifest, man.TransactionTime, err, c.Manifest, c.TransactionTime)
		}
	}
	a := &applier{m: m, run: run, man: man, opts: opts, ups: map[string][]upsert{}, dels: map[string]map[string]bool{}}
	defer a.close()
	// Until the journal is written, a failure leaves nothing behind; from
	// then on the staging folder is the manifest's, until it is applied.
	// (A crash in tests leaves it, as a real one would.)
	committed, crashed := false, false
	defer func() {
		if !committed && !crashed {
			a.close()
			os.RemoveAll(m.staged())
		}
	}()
	if err := os.RemoveAll(m.staged()); err != nil {
		return res, err
	}
	for _, d := range []string{"dl", "new"} {
		if err := os.MkdirAll(m.staged(d), 0o755); err != nil {
			return res, err
		}
	}
	if err := a.download(ctx, f); err != nil {
		return res, err
	}
	if err := m.step("downloaded"); err != nil {
		crashed = true
		return res, err
	}
	j, err := a.stage()
	if err != nil {
		return res, err
	}
	// The last moment to give up: once the journal is written, the
	// manifest is applied, by this call or by the next Open.
	if err := ctx.Err(); err != nil {
		return res, err
	}
	data, err := json.Marshal(j)
	if err != nil {
		return res, err
	}
	if err := writeSynced(m.staged(journalFile+".tmp"), data); err != nil {
		return res, err
	}
	if err := os.Rename(m.staged(journalFile+".tmp"), m.staged(journalFile)); err != nil {
		return res, err
	}
	committed = true
	if err := syncDir(m.staged()); err != nil {
		return res, err
	}
	if err := m.step("committed"); err != nil {
		return res, err
	}
	a.close()
	if err := m.finish(j); err != nil {
		return res, fmt.Errorf("apply %s: %w (the next pull finishes it)", run.Manifest, err)
	}
	return Result{Upserts: a.upserts, Removals: a.removals, Bytes: a.bytes, Snapshot: man.Snapshot()}, nil
}

func checkNewer(c *Cursor, man *Manifest) error {
	prev, err := time.Parse(time.RFC3339Nano, c.TransactionTime)
	if err != nil {
		return fmt.Errorf("cursor: transactionTime %q: %w", c.TransactionTime, err)
	}
	if !man.Time().After(prev) {
		return ErrNotNewer
	}
	return nil
}

// upsert is one output resource: its line in a downloaded file.
type upsert struct {
	id   string
	file int
	off  int64
	n    int
}

// applier applies one manifest into the staging folder.
type applier struct {
	m    *Mirror
	run  Run
	man  *Manifest
	opts Options

	files []*os.File                 // downloaded: the outputs, then the deleted files
	ups   map[string][]upsert        // by type
	dels  map[string]map[string]bool // by type, then id

	bytes             int64
	upserts, removals int
	changes           *bufio.Writer
	changesFile       *os.File
}

func (a *applier) close() {
	for _, f := range a.files {
		f.Close()
	}
	a.files = nil
	if a.changesFile != nil {
		a.changesFile.Close()
		a.changesFile = nil
	}
}

// download fetches every output and deleted file into the staging folder
// and reads them: the outputs are indexed, the deletions collected.
func (a *applier) download(ctx context.Context, f *Fetcher) error {
	all := append(slices.Clone(a.man.Output), a.man.Deleted...)
	for i, file := range all {
		out, err := os.OpenFile(a.m.staged("dl", strconv.Itoa(i)), os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
		a.files = append(a.files, out)
		body, err := f.Get(ctx, file.URL, a.man.RequiresAccessToken)
		if err != nil {
			return err
		}
		_, err = io.Copy(out, &counting{r: body, add: func(n int) {
			a.bytes += int64(n)
			if a.opts.Progress != nil {
				a.opts.Progress(a.bytes)
			}
		}})
		body.Close()
		if err != nil {
			return fmt.Errorf("GET %s: %w", file.URL, err)
		}
		if _, err := out.Seek(0, io.SeekStart); err != nil {
			return err
		}
		if i < len(a.man.Output) {
			err = a.indexOutput(i, file)
		} else {
			err = a.readDeleted(i, file)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

type counting struct {
	r   io.Reader
	add func(int)
}

func (c *counting) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.add(n)
	}
	return n, err
}

// head is what the mirror reads of a resource.
type head struct {
	ResourceType string `json:"resourceType"`
	ID           string `json:"id"`
	Meta         struct {
		VersionID   string `json:"versionId"`
		LastUpdated string `json:"lastUpdated"`
	} `json:"meta"`
}

func decodeHead(line []byte) (head, error) {
	var h head
	if err := json.Unmarshal(line, &h); err != nil {
		return h, err
	}
	if h.ResourceType == "" || h.ID == "" {
		return h, errors.New("no resourceType or id")
	}
	return h, nil
}

// lines calls fn with every non-blank line of r and its offset.
func lines(r io.Reader, fn func(line []byte, off int64) error) (int64, error) {
	br := bufio.NewReaderSize(r, 1<<16)
	var off, n int64
	for {
		line, err := br.ReadBytes('\n')
		if len(line) > maxLine {
			return n, fmt.Errorf("a line of more than %d bytes", maxLine)
		}
		lead := len(line) - len(bytes.TrimLeft(line, " \t\r\n"))
		if t := bytes.TrimSpace(line); len(t) > 0 {
			if ferr := fn(t, off+int64(lead)); ferr != nil {
				return n, ferr
			}
			n++
		}
		off += int64(len(line))
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

func (a *applier) indexOutput(fi int, file File) error {
	n, err := lines(a.files[fi], func(line []byte, off int64) error {
		h, err := decodeHead(line)
		if err != nil {
			return fmt.Errorf("a line is not a FHIR resource: %v", err)
		}
		if h.ResourceType != file.Type {
			return fmt.Errorf("%s/%s in the %s file", h.ResourceType, h.ID, file.Type)
		}
		a.ups[file.Type] = append(a.ups[file.Type], upsert{id: h.ID, file: fi, off: off, n: len(line)})
		return nil
	})
	if err == nil && file.Count != nil && *file.Count != n {
		err = fmt.Errorf("%d resources where the manifest counts %d", n, *file.Count)
	}
	if err != nil {
		return fmt.Errorf("%w: output %s: %v", ErrManifest, file.URL, err)
	}
	return nil
}

// deletedBundle is a line of a deleted file: a Bundle of DELETE requests.
type deletedBundle struct {
	ResourceType string `json:"resourceType"`
	Entry        []struct {
		Request struct {
			Method string `json:"method"`
			URL    string `json:"url"`
		} `json:"request"`
	} `json:"entry"`
}

func (a *applier) readDeleted(fi int, file File) error {
	n, err := lines(a.files[fi], func(line []byte, _ int64) error {
		var b deletedBundle
		if err := json.Unmarshal(line, &b); err != nil || b.ResourceType != "Bundle" {
			return fmt.Errorf("a line is not a Bundle (%v)", err)
		}
		for _, e := range b.Entry {
			if !strings.EqualFold(e.Request.Method, "DELETE") {
				return fmt.Errorf("an entry's request is %s %s, not DELETE", e.Request.Method, e.Request.URL)
			}
			typ, id, ok := resourceRef(e.Request.URL)
			if !ok {
				return fmt.Errorf("DELETE %q does not name Type/id", e.Request.URL)
			}
			if a.dels[typ] == nil {
				a.dels[typ] = map[string]bool{}
			}
			a.dels[typ][id] = true
		}
		return nil
	})
	if err == nil && file.Count != nil && *file.Count != n {
		err = fmt.Errorf("%d Bundles where the manifest counts %d", n, *file.Count)
	}
	if err != nil {
		return fmt.Errorf("%w: deleted %s: %v", ErrManifest, file.URL, err)
	}
	return nil
}

// resourceRef reads Type/id from a request url, relative ("Patient/123", as
// the IG shows it) or absolute.
func resourceRef(raw string) (typ, id string, ok bool) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", "", false
	}
	segs := strings.Split(strings.Trim(path.Clean("/"+u.Path), "/"), "/")
	if len(segs) < 2 {
		return "", "", false
	}
	typ, id = segs[len(segs)-2], segs[len(segs)-1]
	return typ, id, typeName.MatchString(typ) && id != ""
}

// stage writes the new file of every type the manifest changes into the
// staging folder, and the changes, and returns the journal that commits them.
func (a *applier) stage() (journal, error) {
	snapshot := a.man.Snapshot()
	types := map[string]bool{}
	for t := range a.ups {
		types[t] = true
	}
	for t := range a.dels {
		types[t] = true
	}
	if snapshot {
		held, err := a.m.Types()
		if err != nil {
			return journal{}, err
		}
		for _, t := range held {
			if a.man.covers(t) {
				types[t] = true
			}
		}
	}
	var j journal
	if a.opts.Changes {
		var off int64
		switch st, err := os.Stat(filepath.Join(a.m.dir, ChangesFile)); {
		case err == nil:
			off = st.Size()
		case !errors.Is(err, os.ErrNotExist):
			return j, err
		}
		j.ChangesOffset = &off
		f, err := os.Create(a.m.staged(ChangesFile))
		if err != nil {
			return j, err
		}
		a.changesFile, a.changes = f, bufio.NewWriter(f)
	}
	counts := map[string]int{}
	prev := 0
	if c := a.m.cursor; c != nil {
		maps.Copy(counts, c.Resources)
		prev = c.Applied
	}
	for _, t := range slices.Sorted(maps.Keys(types)) {
		n, err := a.merge(t, snapshot && a.man.covers(t))
		if err != nil {
			return j, err
		}
		if n == 0 {
			j.Remove = append(j.Remove, t)
			delete(counts, t)
		} else {
			j.Replace = append(j.Replace, t)
			counts[t] = n
		}
	}
	if a.changes != nil {
		err := a.changes.Flush()
		if err == nil {
			err = a.changesFile.Sync()
		}
		if err != nil {
			return j, err
		}
	}
	if err := syncDir(a.m.staged("new")); err != nil {
		return j, err
	}
	j.Cursor = Cursor{Pipeline: a.run.Pipeline, Store: a.run.Store, Run: a.run.ID, Operation: a.run.Operation,
		TransactionTime: a.man.TransactionTime, Manifest: a.run.Manifest, Applied: prev + 1, Resources: counts,
		Updated: a.m.now().UTC()}
	return j, nil
}

// merge writes type t's new file: the held file (sorted by id) merged with
// the manifest's upserts, less its deletions, less everything it does not
// list when snapshot. It returns the resources written.
func (a *applier) merge(t string, snapshot bool) (int, error) {
	ups := a.ups[t]
	slices.SortStableFunc(ups, func(x, y upsert) int { return strings.Compare(x.id, y.id) })
	// The last line of an id wins, as upserts applied in order would.
	dedup := ups[:0]
	for i, u := range ups {
		if i+1 < len(ups) && ups[i+1].id == u.id {
			continue
		}
		dedup = append(dedup, u)
	}
	ups = dedup
	dels := a.dels[t]

	held := filepath.Join(a.m.dir, t+".ndjson")
	var cur *heldFile
	switch f, err := os.Open(held); {
	case err == nil:
		defer f.Close()
		cur = &heldFile{name: held, r: bufio.NewReaderSize(f, 1<<16)}
	case !errors.Is(err, os.ErrNotExist):
		return 0, err
	}
	out, err := os.Create(a.m.staged("new", t+".ndjson"))
	if err != nil {
		return 0, err
	}
	defer out.Close()
	w := bufio.NewWriterSize(out, 1<<16)
	n := 0
	write := func(line []byte) error {
		n++
		if _, err := w.Write(line); err != nil {
			return err
		}
		return w.WriteByte('\n')
	}
	var compacted bytes.Buffer
	read := func(u upsert) ([]byte, head, error) {
		raw := make([]byte, u.n)
		if _, err := a.files[u.file].ReadAt(raw, u.off); err != nil {
			return nil, head{}, err
		}
		compacted.Reset()
		if err := json.Compact(&compacted, raw); err != nil {
			return nil, head{}, err
		}
		h, err := decodeHead(raw)
		return compacted.Bytes(), h, err
	}

	have, err := cur.next()
	if err != nil {
		return 0, err
	}
	i := 0
	for have || i < len(ups) {
		switch {
		case have && (i == len(ups) || cur.id < ups[i].id):
			switch {
			case dels[cur.id]:
				err = a.remove(cur.head, "deleted")
			case snapshot:
				err = a.remove(cur.head, "snapshot")
			default:
				err = write(cur.line)
			}
			if err == nil {
				have, err = cur.next()
			}
		default:
			u := ups[i]
			i++
			line, h, rerr := read(u)
			if rerr != nil {
				return 0, rerr
			}
			same := have && cur.id == u.id
			switch {
			case dels[u.id] && same:
				err = a.remove(cur.head, "deleted") // upserted, then removed
			case dels[u.id]:
				// upserted, then removed: nothing held, nothing to log
			default:
				if !same || !bytes.Equal(cur.line, line) {
					err = a.upsert(h)
				}
				if err == nil {
					err = write(line)
				}
			}
			if err == nil && same {
				have, err = cur.next()
			}
		}
		if err != nil {
			return 0, err
		}
	}
	if err := w.Flush(); err != nil {
		return 0, err
	}
	return n, out.Sync()
}

// heldFile reads a type's file in the folder, checking it is still sorted.
type heldFile struct {
	name string
	r    *bufio.Reader
	id   string
	head head
	line []byte
}

func (h *heldFile) next() (bool, error) {
	if h == nil {
		return false, nil
	}
	for {
		line, err := h.r.ReadBytes('\n')
		if t := bytes.TrimSpace(line); len(t) > 0 {
			hd, derr := decodeHead(t)
			if derr != nil {
				return false, fmt.Errorf("%s: a line is not a FHIR resource (%v): was the file edited?", h.name, derr)
			}
			if hd.ID <= h.id && h.line != nil {
				return false, fmt.Errorf("%s: %s follows %s: the file is not sorted by id; was it edited? Pull into a new folder", h.name, hd.ID, h.id)
			}
			h.id, h.head, h.line = hd.ID, hd, t
			return true, nil
		}
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
	}
}

func (a *applier) upsert(h head) error {
	a.upserts++
	return a.log(Change{Action: "upsert", Type: h.ResourceType, ID: h.ID, VersionID: h.Meta.VersionID, LastUpdated: h.Meta.LastUpdated})
}

func (a *applier) remove(h head, reason string) error {
	a.removals++
	return a.log(Change{Action: "remove", Reason: reason, Type: h.ResourceType, ID: h.ID, VersionID: h.Meta.VersionID, LastUpdated: h.Meta.LastUpdated})
}

func (a *applier) log(c Change) error {
	if a.changes == nil {
		return nil
	}
	c.Run, c.Operation, c.TransactionTime = a.run.ID, a.run.Operation, a.man.TransactionTime
	data, err := json.Marshal(c)
	if err != nil {
		return err
	}
	a.changes.Write(data)
	return a.changes.WriteByte('\n')
}
