//go:build !wasip1

package msrwasm

import "sync"

// Stand-ins for the host, so that a plugin's logic runs under go test.

var (
	lastReply int64
	stateMu   sync.Mutex
	state     = map[int32]int64{}
)

func reply(value int64)                   { lastReply = value }
func vcpu() int32                         { return 0 }
func reason() int32                       { return ReasonUnknown }
func nowNs() int64                        { return 0 }
func config(name string, def int64) int64 { return def }
func log(level int32, message string)     {}
func stateGet(key int32) int64            { stateMu.Lock(); defer stateMu.Unlock(); return state[key] }
func stateSet(key int32, value int64)     { stateMu.Lock(); defer stateMu.Unlock(); state[key] = value }
func stateAdd(key int32, delta int64) int64 {
	stateMu.Lock()
	defer stateMu.Unlock()
	state[key] += delta
	return state[key]
}

// LastReply is the last value given to Reply (native builds only, for tests).
func LastReply() uint64 { return uint64(lastReply) }
