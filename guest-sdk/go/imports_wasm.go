//go:build wasip1

package msrwasm

import "unsafe"

//go:wasmimport msr reply
func reply(value int64)

//go:wasmimport msr vcpu
func vcpu() int32

//go:wasmimport msr reason
func reason() int32

//go:wasmimport msr now_ns
func nowNs() int64

//go:wasmimport msr state_get
func stateGet(key int32) int64

//go:wasmimport msr state_set
func stateSet(key int32, value int64)

//go:wasmimport msr state_add
func stateAdd(key int32, delta int64) int64

//go:wasmimport msr config
func configRaw(name unsafe.Pointer, nameLen int32, def int64) int64

//go:wasmimport msr log
func logRaw(level int32, message unsafe.Pointer, messageLen int32)

func config(name string, def int64) int64 {
	return configRaw(unsafe.Pointer(unsafe.StringData(name)), int32(len(name)), def)
}

func log(level int32, message string) {
	logRaw(level, unsafe.Pointer(unsafe.StringData(message)), int32(len(message)))
}
