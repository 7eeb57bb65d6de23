package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"

	"cloud.google.com/go/storage"
)

// callSkew widens the window in which an operation of a lost export answer
// may have been created: our clock against the service's.
const callSkew = 2 * time.Minute

// findOperation looks for the export operation a starting run may have
// started: ExportResources operations of the store's dataset created since
// the attempt began (operations.list; OperationMetadata does not name the
// store). It returns the operation owned by this run (operations/{op} names
// it) or the only one nobody owns; otherwise how many unowned candidates it
// could not tell apart. Cloud Storage output ({destination}/{opID}_*) tells
// candidates apart once they have written it.
//
// The window is on the service's clock: operations fhirexport owns give the
// offset between its createTime and our record of it; without one, every
// unowned export operation of the dataset is a candidate.
func (x *Exporter) findOperation(ctx context.Context, p pendingRecord) (string, int, error) {
	i := strings.Index(p.Store, "/fhirStores/")
	if i < 0 {
		return "", 0, fmt.Errorf("store %q has no dataset", p.Store)
	}
	dataset := p.Store[:i]
	type cand struct {
		name string
		ct   time.Time
	}
	var unowned []cand
	offset, known := time.Duration(0), false // our clock minus the service's, at most
	pages := 0
	err := x.hc.Projects.Locations.Datasets.Operations.List(dataset).PageSize(100).Pages(ctx, func(page *healthcare.ListOperationsResponse) error {
		pages++
		for _, op := range page.Operations {
			var meta healthcare.OperationMetadata
			if json.Unmarshal(op.Metadata, &meta) != nil || !strings.HasSuffix(meta.ApiMethodName, "ExportResources") {
				continue
			}
			ct, err := time.Parse(time.RFC3339Nano, meta.CreateTime)
			if err != nil {
				continue
			}
			var own opRecord
			_, err = x.state.read(ctx, opObject(op.Name), &own)
			switch {
			case err == nil && own.Run == p.Run:
				return foundOp(op.Name)
			case err == nil:
				if d := own.Recorded.Sub(ct); !known || d < offset {
					offset, known = d, true
				}
			case errors.Is(err, ErrNotFound):
				unowned = append(unowned, cand{op.Name, ct})
			case errors.Is(err, ErrCorrupt):
				continue
			default:
				return err
			}
		}
		if pages >= 20 {
			return errStop
		}
		return nil
	})
	var found foundOp
	switch {
	case errors.As(err, &found):
		return string(found), 0, nil
	case err != nil && !errors.Is(err, errStop):
		return "", 0, fmt.Errorf("operations.list %s: %w", dataset, err)
	}
	if known && !p.Locked.IsZero() {
		// Not p.Started: each resolution renews that lease.
		from := p.Locked.Add(-callSkew - offset)
		unowned = slices.DeleteFunc(unowned, func(c cand) bool { return c.ct.Before(from) })
	}
	if len(unowned) == 1 {
		return unowned[0].name, 0, nil
	}
	if len(unowned) > 1 && strings.HasPrefix(p.Destination, "gs://") {
		var confirmed []string
		for _, c := range unowned {
			ok, err := x.wroteOutput(ctx, p.Destination, c.name)
			if err != nil {
				return "", 0, err
			}
			if ok {
				confirmed = append(confirmed, c.name)
			}
		}
		if len(confirmed) == 1 {
			return confirmed[0], 0, nil
		}
	}
	return "", len(unowned), nil
}

type foundOp string

func (f foundOp) Error() string { return "found " + string(f) }

// wroteOutput reports whether operation op wrote objects under dest
// ({dest}/{opID}_{Type}).
func (x *Exporter) wroteOutput(ctx context.Context, dest, op string) (bool, error) {
	bucket, prefix, _ := strings.Cut(strings.TrimPrefix(dest, "gs://"), "/")
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	prefix += op[strings.LastIndex(op, "/")+1:] + "_"
	it := x.state.client.Bucket(bucket).Objects(ctx, &storage.Query{Prefix: prefix})
	_, err := it.Next()
	if errors.Is(err, iterator.Done) {
		return false, nil
	}
	return err == nil, err
}
