// The synthetic RAPL demo plugin in Go: the same answers as plugins/synthetic_rapl.wat.
// Build: see guest-sdk/go/README.md. Go cannot embed the msrwasm.meta
// custom section; add it afterwards with `msrwasm meta rapl.wasm --set ...`.
package main

import "msrwasm"

// Set by init (the export) from config; every vCPU has its own instance.
var watts int64 = 65

var claims = []msrwasm.Range{{First: 0x606, Last: 0x606}, {First: 0x610, Last: 0x614}}

//go:wasmexport msrwasm_abi_version
func abiVersion() int32 { return msrwasm.ABIVersion }

//go:wasmexport init
func pluginInit() int32 {
	watts = msrwasm.Config("tdp_watts", 65)
	if watts <= 0 {
		return 1 // refuse nonsense instead of answering with it
	}
	return 0
}

//go:wasmexport claim
func claim(n int32) int64 { return msrwasm.ClaimAt(claims, n) }

// energy is in units of 2^-14 J since the host started, low 32 bits.
func energy() uint64 {
	us := msrwasm.NowNs() / 1000
	return (us * uint64(watts) * 16384 / 1_000_000) & 0xffffffff
}

// read answers RDMSR index: the value and true, or false for PASS.
func read(index uint32) (uint64, bool) {
	switch index {
	case 0x606:
		return 0x000a0e03, true
	case 0x610:
		return uint64((watts * 8) | 0x8000), true
	case 0x611:
		return energy(), true
	case 0x613:
		return 0, true
	case 0x614:
		return uint64((watts * 8) & 0x7fff), true
	}
	return 0, false
}

//go:wasmexport rdmsr
func rdmsr(index uint32) int32 {
	value, ok := read(index)
	if !ok {
		return msrwasm.Pass
	}
	msrwasm.Reply(value)
	return msrwasm.Handled
}

//go:wasmexport wrmsr
func wrmsr(index uint32, value uint64) int32 {
	return msrwasm.Fault // RAPL is read-only here
}

// Not called: a -buildmode=c-shared module is a reactor (_initialize).
func main() {}
