// Package msrwasm writes msrwasm MSR plugins in Go: a core module (ABI v1,
// guest-sdk/ABI.md) built with
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o plugin.wasm
//
// The plugin's main package exports msrwasm_abi_version, rdmsr, wrmsr and,
// optionally, init and claim with //go:wasmexport; this package wraps the
// host's msr.* imports. Built for any other target (go test, go vet) the
// imports are replaced by stand-ins: vCPU 0, reason UNKNOWN, clock 0,
// Config returns the default, an in-process state store, Log prints nothing.
package msrwasm

// ABIVersion is what the msrwasm_abi_version export must return.
const ABIVersion int32 = 1

// Status codes returned by rdmsr and wrmsr.
const (
	Handled int32 = 0 // the access completes (rdmsr: with the value given to Reply)
	Fault   int32 = 1 // the guest gets #GP(0)
	Pass    int32 = 2 // decline: the next plugin, KVM or the unhandled policy decides
)

// Why KVM sent the access to user space (KVM_MSR_EXIT_REASON_*), as Reason returns it.
const (
	ReasonInval   int32 = 1
	ReasonUnknown int32 = 2
	ReasonFilter  int32 = 4
)

// Log levels.
const (
	LevelError int32 = 0
	LevelWarn  int32 = 1
	LevelInfo  int32 = 2
	LevelDebug int32 = 3
)

// ClaimEnd is what the claim export returns past the last range.
const ClaimEnd int64 = -1

// Range is an inclusive range of MSR indices.
type Range struct{ First, Last uint32 }

// Claim packs the inclusive range [first, last] as claim(n) returns it.
func Claim(first, last uint32) int64 { return int64(uint64(first)<<32 | uint64(last)) }

// ClaimAt answers claim(n) from a list of ranges: the n-th packed, or ClaimEnd.
func ClaimAt(ranges []Range, n int32) int64 {
	if n < 0 || int(n) >= len(ranges) {
		return ClaimEnd
	}
	return Claim(ranges[n].First, ranges[n].Last)
}

// Reply gives the value of the current rdmsr; return Handled after it.
func Reply(value uint64) { reply(int64(value)) }

// Vcpu is the index of the vCPU making the current access (0-based).
func Vcpu() uint32 { return uint32(vcpu()) }

// Reason is why the current access left KVM: ReasonInval, ReasonUnknown or ReasonFilter.
func Reason() int32 { return reason() }

// NowNs is the host's monotonic clock in nanoseconds.
func NowNs() uint64 { return uint64(nowNs()) }

// Config is the integer name from the manifest's [plugin.config], or def.
func Config(name string, def int64) int64 { return config(name, def) }

// Log writes a message to the host log (rate-limited by the host).
func Log(level int32, message string) { log(level, message) }

func Error(message string) { Log(LevelError, message) }
func Warn(message string)  { Log(LevelWarn, message) }
func Info(message string)  { Log(LevelInfo, message) }
func Debug(message string) { Log(LevelDebug, message) }

// The VM-wide integer store, private to the plugin's name, shared by all
// vCPUs and kept across hot reloads. Missing keys read 0; adds wrap.
func StateGet(key int32) int64                   { return stateGet(key) }
func StateSet(key int32, value int64)            { stateSet(key, value) }
func StateAdd(key int32, delta int64) int64      { return stateAdd(key, delta) }
func StateGetU64(key int32) uint64               { return uint64(stateGet(key)) }
func StateSetU64(key int32, value uint64)        { stateSet(key, int64(value)) }
func StateAddU64(key int32, delta uint64) uint64 { return uint64(stateAdd(key, int64(delta))) }
