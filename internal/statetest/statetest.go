// Package statetest holds test helpers for device state structs: the state
// a device saves must survive the encodings a snapshot uses.
package statetest

import (
	"bytes"
	"encoding/gob"
	"encoding/json"
	"testing"
)

// ThroughGobAndJSON encodes s with gob, decodes it, encodes that with JSON
// and decodes it again, as a snapshot file would, and returns the result.
func ThroughGobAndJSON[T any](t testing.TB, s T) T {
	t.Helper()
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(s); err != nil {
		t.Fatal(err)
	}
	var sg T
	if err := gob.NewDecoder(&buf).Decode(&sg); err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(sg)
	if err != nil {
		t.Fatal(err)
	}
	var sj T
	if err := json.Unmarshal(js, &sj); err != nil {
		t.Fatal(err)
	}
	return sj
}
