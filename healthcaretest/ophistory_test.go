package healthcaretest

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"
)

// TestOperationHistory: a dataset with a long history of finished operations
// of several methods, listed through the real client in either order, every
// page, with the operations a test starts among them where their creation
// puts them.
func TestOperationHistory(t *testing.T) {
	t.Parallel()
	for _, order := range []ListOrder{OldestFirst, NewestFirst} {
		e := newEnv(t, func(o *Options) { o.ExportDuration = 0; o.ListOrder = order })
		before := e.mustExport(t, gcsExport("gs://bucket/h")).Name
		old, err := e.srv.AddHistory(testDataset, History{Count: 2500, Seed: 7})
		if err != nil {
			t.Fatal(err)
		}
		after := e.mustExport(t, gcsExport("gs://bucket/h")).Name

		var names []string
		var created []time.Time
		methods := map[string]int{}
		pages := 0
		err = e.svc.Projects.Locations.Datasets.Operations.List(testDataset).PageSize(100).Pages(context.Background(), func(r *healthcare.ListOperationsResponse) error {
			pages++
			for _, op := range r.Operations {
				var m healthcare.OperationMetadata
				if err := json.Unmarshal(op.Metadata, &m); err != nil {
					return err
				}
				ct, err := time.Parse(time.RFC3339Nano, m.CreateTime)
				if err != nil {
					return err
				}
				if !op.Done {
					t.Errorf("order %d: %s is not done", order, op.Name)
				}
				names, created = append(names, op.Name), append(created, ct)
				methods[m.ApiMethodName[strings.LastIndex(m.ApiMethodName, ".")+1:]]++
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		want := slices.Concat(old, []string{before, after})
		if order == NewestFirst {
			slices.Reverse(want)
		}
		if !slices.Equal(names, want) || pages != 26 {
			t.Errorf("order %d: listed %d operations in %d pages, want the %d in order in 26", order, len(names), pages, len(want))
		}
		sorted := slices.IsSortedFunc(created, func(a, b time.Time) int { return a.Compare(b) })
		if order == NewestFirst {
			sorted = slices.IsSortedFunc(created, func(a, b time.Time) int { return b.Compare(a) })
		}
		if !sorted {
			t.Errorf("order %d: creation times are not in the listing's order", order)
		}
		if oldest := e.clock.Now().Add(-31 * 24 * time.Hour); created[0].Before(oldest) && created[len(created)-1].Before(oldest) {
			t.Errorf("order %d: history reaches before 30 days", order)
		}
		if len(methods) < 4 || methods["ExportResources"] < 100 {
			t.Errorf("order %d: methods %v, want a mix with exports among them", order, methods)
		}
	}
}
