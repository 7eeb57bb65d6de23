package export

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/fhirexport/fhirexport/events"
)

// TestRecordChangeBelievesOnlyTheAPI: deletion notifications the Healthcare
// API cannot send are acknowledged and never reach a deleted file (a 10,000
// character id, ids with characters no FHIR id has, a resource type of no FHIR
// version); a lastUpdatedTime in the year 9999 or an hour after the message's
// publish time never makes a deletion time later than the run's deleted file:
// the publish time is used. The run's deleted file is what a user observes.
func TestRecordChangeBelievesOnlyTheAPI(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	dest := "gs://" + exportsBkt + "/n"
	p, op, meta := feedRun(dest, "op-1", w.clock.Now(), nil, true, 0)
	first, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, nil)
	if err != nil {
		t.Fatal(err)
	}

	w.clock.Advance(time.Minute)
	at := w.clock.Now().Add(-10 * time.Second)
	good := deletion("Patient", "good", at, 5*time.Millisecond, "1")
	refused := []events.Notification{
		deletion("Patient", strings.Repeat("a", 10000), at, 5*time.Millisecond, "2"),
		deletion("Patient", strings.Repeat("a", 65), at, 5*time.Millisecond, "3"),
		deletion("Patient", "a_b", at, 5*time.Millisecond, "4"),
		deletion("Patient", "a/b", at, 5*time.Millisecond, "5"),
		deletion("Patient", "", at, 5*time.Millisecond, "6"),
		deletion("Patient", "süd", at, 5*time.Millisecond, "7"),
		deletion("Spaceship", "x", at, 5*time.Millisecond, "8"),
		deletion("patient", "x", at, 5*time.Millisecond, "9"),
	}
	future := deletion("Patient", "future", at, 5*time.Millisecond, "10")
	future.LastUpdated = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)
	hourLate := deletion("Observation", "late", at, 5*time.Millisecond, "11")
	hourLate.LastUpdated = hourLate.PublishTime.Add(time.Hour).Truncate(time.Second)
	// A publish time after our clock (a direct CloudEvent may say anything):
	// the deletion is never dated after it was recorded.
	ahead := deletion("Encounter", "ahead", w.clock.Now().Add(time.Hour), 0, "12")
	for _, n := range append(refused, good, future, hourLate, ahead) {
		if err := w.x.RecordChange(ctx, n); err != nil {
			t.Fatalf("RecordChange(%.40s): %v, want it acknowledged", n.ID, err)
		}
	}
	recordedAt := w.clock.Now()

	w.clock.Advance(time.Minute)
	p, op, meta = feedRun(dest, "op-2", w.clock.Now(), nil, true, 0)
	res, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, first.Cursor)
	if err != nil {
		t.Fatal(err)
	}
	rfc := func(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }
	want := []string{
		"Patient/good@" + rfc(deletionTime(good)),
		"Patient/future@" + rfc(future.PublishTime),
		"Observation/late@" + rfc(hourLate.PublishTime),
		"Encounter/ahead@" + rfc(recordedAt),
	}
	if diff := cmp.Diff(want, w.deletedIn(t, res), cmpopts.SortSlices(func(a, b string) bool { return a < b })); diff != "" {
		t.Errorf("deleted file (-want +got):\n%s", diff)
	}
}
