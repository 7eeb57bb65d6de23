package healthcaretest

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSmokeExportGCS(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	if _, err := e.srv.Seed(testStore, 1, 5); err != nil {
		t.Fatal(err)
	}
	op := e.mustExport(t, gcsExport("gs://bucket/out"))
	got := e.getOp(t, op.Name)
	if !got.Done || got.Error != nil {
		t.Fatalf("op %+v", got)
	}
	objs := e.readObjects(t, "bucket", "out/")
	want := wantNDJSON(e.srv.Resources(testStore), "out/"+opID(op.Name)+"_", nil)
	if diff := cmp.Diff(want, objs); diff != "" {
		t.Fatal(diff)
	}
}
