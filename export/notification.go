package export

// What RecordChange believes of a change notification. The notification topic
// is fed by the Healthcare API, but a tombstone lands in every later deleted
// file of its store: only what the API can send is recorded, and its time is
// never later than the moment it was recorded (so never later than the feed
// file that lists it).

import (
	"fmt"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// notificationSkew is how far a notification's lastUpdatedTime may lie after
// its Pub/Sub publishTime (or our clock) and still be believed. The API
// publishes after the change commits, and lastUpdatedTime has whole seconds,
// so a true one is never later than publishTime but for clock differences
// between Google's servers, far below a minute.
const notificationSkew = time.Minute

// validFHIRID reports whether s is a FHIR resource id: [A-Za-z0-9\-\.]{1,64}
// (FHIR R4 datatypes, id).
func validFHIRID(s string) bool {
	return len(s) >= 1 && len(s) <= 64 &&
		every(s, func(c byte) bool { return isLetter(c) || isDigit(c) || c == '-' || c == '.' })
}

// checkNotification refuses a deletion the Healthcare API cannot have sent:
// a resource id that is not a FHIR id, or a resource type of no FHIR version.
// The error is safe to log (the id is clipped and quoted).
func checkNotification(n events.Notification) error {
	if !validTypeName(n.ResourceType) || !knownTypes[n.ResourceType] {
		return fmt.Errorf("resource type %s is not a FHIR resource type", quoteClipped(n.ResourceType))
	}
	if !validFHIRID(n.ID) {
		return fmt.Errorf("resource id %s (%d bytes) is not a FHIR id ([A-Za-z0-9-.]{1,64})", quoteClipped(n.ID), len(n.ID))
	}
	return nil
}

// quoteClipped quotes at most the first 64 bytes of s, for a log line.
func quoteClipped(s string) string {
	if len(s) > 64 {
		return fmt.Sprintf("%q…", s[:64])
	}
	return fmt.Sprintf("%q", s)
}

// tombstoneTime is the deletion time a tombstone records: deletionTime's
// estimate from lastUpdatedTime and publishTime, never later than now (when
// it is recorded). A lastUpdatedTime more than notificationSkew after the
// publish time or after now (year 9999, an hour late) cannot be the change's
// commit time: the publish time (or now, if earlier or absent) is used
// instead, and believed is false so the caller can say so.
func tombstoneTime(n events.Notification, now time.Time) (t time.Time, believed bool) {
	now = now.UTC().Truncate(time.Microsecond)
	bound := now
	if p := n.PublishTime.UTC().Truncate(time.Microsecond); !p.IsZero() && p.Before(bound) {
		bound = p
	}
	if n.LastUpdated.UTC().Truncate(time.Second).After(bound.Add(notificationSkew)) {
		return bound, false
	}
	if t = deletionTime(n); t.After(now) {
		t = now
	}
	return t, true
}
