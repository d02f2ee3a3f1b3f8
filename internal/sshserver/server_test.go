package sshserver

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
)

func FuzzParseDirectTCPIP(f *testing.F) {
	f.Add([]byte{0, 0, 0, 9, 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't', 0, 0, 0, 80})
	f.Add([]byte{0, 0, 0, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		target, err := parseDirectTCPIP(b)
		if err == nil && target == "" {
			t.Fatal("empty target without error")
		}
	})
}

func TestParseDirectTCPIP(t *testing.T) {
	b := binary.BigEndian.AppendUint32(nil, 3)
	b = append(b, "::1"...)
	b = binary.BigEndian.AppendUint32(b, 443)
	got, err := parseDirectTCPIP(b)
	assert.NoError(t, err)
	assert.Equal(t, "[::1]:443", got)
	_, err = parseDirectTCPIP(b[:5])
	assert.Error(t, err)
}
