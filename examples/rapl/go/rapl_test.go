//go:build !wasip1

package main

import (
	"testing"

	"msrwasm"
)

// Natively the SDK stands in for the host: config gives the default
// (65 W) and the clock reads 0.
func TestAnswersFromConfigAndRefusesWrites(t *testing.T) {
	if pluginInit() != 0 {
		t.Fatal("init refused the default")
	}
	if rdmsr(0x610) != msrwasm.Handled || msrwasm.LastReply() != 65*8|0x8000 {
		t.Fatalf("0x610 = %#x", msrwasm.LastReply())
	}
	if rdmsr(0x611) != msrwasm.Handled || msrwasm.LastReply() != 0 {
		t.Fatalf("0x611 = %#x", msrwasm.LastReply())
	}
	if rdmsr(0x612) != msrwasm.Pass || wrmsr(0x610, 1) != msrwasm.Fault {
		t.Fatal("0x612 must pass and writes must fault")
	}
	if claim(0) != 0x0000060600000606 || claim(1) != 0x0000061000000614 || claim(2) != -1 {
		t.Fatal("claims")
	}
}
