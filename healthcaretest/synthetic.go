package healthcaretest

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"time"
)

type coding struct{ system, code, display string }

const (
	loinc  = "http://loinc.org"
	snomed = "http://snomed.info/sct"
	ucum   = "http://unitsofmeasure.org"
)

type obsKind struct {
	code      coding
	category  string
	unit      string
	ucumCode  string
	mean, dev float64
	decimals  int
}

var obsKinds = []obsKind{
	{coding{loinc, "8867-4", "Heart rate"}, "vital-signs", "beats/minute", "/min", 75, 12, 0},
	{coding{loinc, "8480-6", "Systolic blood pressure"}, "vital-signs", "mmHg", "mm[Hg]", 122, 15, 0},
	{coding{loinc, "8462-4", "Diastolic blood pressure"}, "vital-signs", "mmHg", "mm[Hg]", 79, 10, 0},
	{coding{loinc, "8310-5", "Body temperature"}, "vital-signs", "Cel", "Cel", 36.8, 0.4, 1},
	{coding{loinc, "29463-7", "Body weight"}, "vital-signs", "kg", "kg", 76, 14, 1},
	{coding{loinc, "8302-2", "Body height"}, "vital-signs", "cm", "cm", 171, 9, 1},
	{coding{loinc, "9279-1", "Respiratory rate"}, "vital-signs", "breaths/minute", "/min", 15, 2, 0},
	{coding{loinc, "2339-0", "Glucose [Mass/volume] in Blood"}, "laboratory", "mg/dL", "mg/dL", 98, 18, 0},
	{coding{loinc, "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma"}, "laboratory", "mg/dL", "mg/dL", 190, 30, 0},
	{coding{loinc, "718-7", "Hemoglobin [Mass/volume] in Blood"}, "laboratory", "g/dL", "g/dL", 14, 1.4, 1},
	{coding{loinc, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"}, "laboratory", "%", "%", 5.7, 0.8, 1},
	{coding{loinc, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma"}, "laboratory", "mg/dL", "mg/dL", 0.95, 0.2, 2},
}

var conditions = []coding{
	{snomed, "44054006", "Diabetes mellitus type 2"},
	{snomed, "38341003", "Hypertensive disorder"},
	{snomed, "195967001", "Asthma"},
	{snomed, "55822004", "Hyperlipidemia"},
	{snomed, "162864005", "Body mass index 30+ - obesity"},
	{snomed, "444814009", "Viral sinusitis"},
	{snomed, "10509002", "Acute bronchitis"},
	{snomed, "40055000", "Chronic sinusitis"},
}

var (
	givenF   = []string{"Maria", "Emma", "Olivia", "Ava", "Sofia", "Mia", "Amelia", "Chloe", "Laura", "Hana"}
	givenM   = []string{"James", "Liam", "Noah", "Lucas", "Mateo", "Ethan", "David", "Omar", "Kenji", "Ivan"}
	families = []string{"Smith", "Garcia", "Nguyen", "Müller", "Rossi", "Kowalski", "Okafor", "Tanaka", "Silva", "Dubois", "Johnson", "Khan"}
	cities   = []struct{ city, state, zip string }{
		{"Springfield", "IL", "62701"}, {"Madison", "WI", "53703"}, {"Austin", "TX", "73301"},
		{"Portland", "OR", "97201"}, {"Boston", "MA", "02108"}, {"Denver", "CO", "80202"},
	}
	encounterTypes = []coding{
		{snomed, "185349003", "Encounter for check up"},
		{snomed, "50849002", "Emergency room admission"},
		{snomed, "270427003", "Patient-initiated encounter"},
	}
)

func syntheticID(rng *rand.Rand) string {
	var b [16]byte
	rng.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func codeable(c coding) map[string]any {
	return map[string]any{
		"coding": []any{map[string]any{"system": c.system, "code": c.code, "display": c.display}},
		"text":   c.display,
	}
}

func round(v float64, decimals int) json.Number {
	return json.Number(fmt.Sprintf("%.*f", decimals, v))
}

// Synthetic returns deterministic, realistic R4 resources for patients
// patients: per patient a Patient, 1–3 Encounters (subject → Patient), 2–6
// Observations per encounter (LOINC vital signs and laboratory codes with
// UCUM valueQuantity; subject and encounter references) and 0–2 Conditions
// (SNOMED CT; subject and encounter references). Every resource has an id;
// the same seed gives the same bytes.
func Synthetic(seed int64, patients int) [][]byte {
	rng := rand.New(rand.NewSource(seed))
	base := time.Date(2024, 1, 1, 8, 0, 0, 0, time.UTC)
	var out [][]byte
	add := func(m map[string]any) {
		b, err := json.Marshal(m)
		if err != nil {
			panic(err) // cannot happen: only plain values
		}
		out = append(out, b)
	}
	for p := 0; p < patients; p++ {
		pid := syntheticID(rng)
		gender, given := "female", givenF[rng.Intn(len(givenF))]
		if rng.Intn(2) == 0 {
			gender, given = "male", givenM[rng.Intn(len(givenM))]
		}
		family := families[rng.Intn(len(families))]
		birth := time.Date(1935+rng.Intn(85), time.Month(1+rng.Intn(12)), 1+rng.Intn(28), 0, 0, 0, 0, time.UTC)
		c := cities[rng.Intn(len(cities))]
		add(map[string]any{
			"resourceType": "Patient",
			"id":           pid,
			"identifier": []any{map[string]any{
				"system": "urn:oid:2.16.840.1.113883.4.3.25",
				"value":  fmt.Sprintf("MRN-%d-%06d", seed, p),
			}},
			"active":    true,
			"name":      []any{map[string]any{"use": "official", "family": family, "given": []any{given}}},
			"gender":    gender,
			"birthDate": birth.Format("2006-01-02"),
			"address": []any{map[string]any{
				"line": []any{fmt.Sprintf("%d %s St", 1+rng.Intn(999), families[rng.Intn(len(families))])},
				"city": c.city, "state": c.state, "postalCode": c.zip, "country": "US",
			}},
		})
		encounters := 1 + rng.Intn(3)
		for en := 0; en < encounters; en++ {
			eid := syntheticID(rng)
			start := base.Add(time.Duration(rng.Intn(365*24*60)) * time.Minute)
			end := start.Add(time.Duration(15+rng.Intn(120)) * time.Minute)
			et := encounterTypes[rng.Intn(len(encounterTypes))]
			class := map[string]any{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"}
			if et.code == "50849002" {
				class = map[string]any{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER", "display": "emergency"}
			}
			add(map[string]any{
				"resourceType": "Encounter",
				"id":           eid,
				"status":       "finished",
				"class":        class,
				"type":         []any{codeable(et)},
				"subject":      map[string]any{"reference": "Patient/" + pid, "display": given + " " + family},
				"period":       map[string]any{"start": start.Format(time.RFC3339), "end": end.Format(time.RFC3339)},
			})
			observations := 2 + rng.Intn(5)
			for o := 0; o < observations; o++ {
				k := obsKinds[rng.Intn(len(obsKinds))]
				v := k.mean + rng.NormFloat64()*k.dev
				if v < 0 {
					v = -v
				}
				add(map[string]any{
					"resourceType": "Observation",
					"id":           syntheticID(rng),
					"status":       "final",
					"category": []any{map[string]any{"coding": []any{map[string]any{
						"system": "http://terminology.hl7.org/CodeSystem/observation-category",
						"code":   k.category,
					}}}},
					"code":              codeable(k.code),
					"subject":           map[string]any{"reference": "Patient/" + pid},
					"encounter":         map[string]any{"reference": "Encounter/" + eid},
					"effectiveDateTime": start.Add(time.Duration(o) * time.Minute).Format(time.RFC3339),
					"issued":            end.Format("2006-01-02T15:04:05.000Z07:00"),
					"valueQuantity": map[string]any{
						"value": round(v, k.decimals), "unit": k.unit, "system": ucum, "code": k.ucumCode,
					},
				})
			}
			if rng.Intn(3) == 0 {
				cond := conditions[rng.Intn(len(conditions))]
				add(map[string]any{
					"resourceType": "Condition",
					"id":           syntheticID(rng),
					"clinicalStatus": map[string]any{"coding": []any{map[string]any{
						"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active",
					}}},
					"verificationStatus": map[string]any{"coding": []any{map[string]any{
						"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed",
					}}},
					"category": []any{map[string]any{"coding": []any{map[string]any{
						"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis",
					}}}},
					"code":          codeable(cond),
					"subject":       map[string]any{"reference": "Patient/" + pid},
					"encounter":     map[string]any{"reference": "Encounter/" + eid},
					"onsetDateTime": start.Format(time.RFC3339),
					"recordedDate":  end.Format(time.RFC3339),
				})
			}
		}
	}
	return out
}

// Seed puts Synthetic(seed, patients) into a store and returns how many
// resources it wrote.
func (e *Emulator) Seed(store string, seed int64, patients int) (int, error) {
	n := 0
	for _, r := range Synthetic(seed, patients) {
		if _, err := e.PutResource(store, r); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
