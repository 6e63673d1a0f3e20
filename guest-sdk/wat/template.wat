;; template.wat: a commented starting point for a hand-written plugin.
;; `msrwasm check template.wat` accepts it as it is; the host compiles WAT
;; itself, so no toolchain is needed. README.md beside this file has a
;; complete plugin; the plugin ABI is guest-sdk/ABI.md in the repository.
;;
;; Every host import (module "msr"); import only what you use:
;;   (import "msr" "reply"     (func $reply (param i64)))               ;; value of the current rdmsr
;;   (import "msr" "vcpu"      (func $vcpu (result i32)))               ;; vCPU index, 0-based
;;   (import "msr" "reason"    (func $reason (result i32)))             ;; 1 INVAL, 2 UNKNOWN, 4 FILTER
;;   (import "msr" "now_ns"    (func $now_ns (result i64)))             ;; host monotonic clock, ns
;;   (import "msr" "state_get" (func $state_get (param i32) (result i64)))       ;; VM-wide store: key -> value (0 if unset)
;;   (import "msr" "state_set" (func $state_set (param i32 i64)))                ;; key, value
;;   (import "msr" "state_add" (func $state_add (param i32 i64) (result i64)))   ;; key, delta -> new value (atomic)
;;   (import "msr" "config"    (func $config (param i32 i32 i64) (result i64))) ;; name ptr, len, default
;;   (import "msr" "log"       (func $log (param i32 i32 i32)))                  ;; level (0 error .. 3 debug), ptr, len
;; config and log read UTF-8 strings from the exported memory.
(module
  ;; Optional metadata that `msrwasm check` prints (TOML).
  (@custom "msrwasm.meta" "name = \"template\"\nversion = \"0.1.0\"\ndescription = \"a starting point\"\nauthor = \"you\"\n")

  ;; Import only what you use. All imports live in module "msr".
  (import "msr" "reply" (func $reply (param i64)))                 ;; the value of the current rdmsr
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64))) ;; [plugin.config] integer
  (import "msr" "state_add" (func $state_add (param i32 i64) (result i64))) ;; VM-wide, survives reloads

  ;; Needed because config takes a name from memory.
  (memory (export "memory") 1)
  (data (i32.const 0) "answer")          ;; 6 bytes: the config key below

  (global $answer (mut i64) (i64.const 0))

  ;; Required: the ABI version.
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))

  ;; Optional: runs once per instance (per vCPU); non-zero refuses the load.
  (func (export "init") (result i32)
    (global.set $answer (call $config (i32.const 0) (i32.const 6) (i64.const 42)))
    (i32.const 0))

  ;; Optional: the MSRs this plugin claims, one inclusive range per n,
  ;; packed as (first << 32) | last, then -1. Without it the plugin is
  ;; asked about every deflected access.
  (func (export "claim") (param $n i32) (result i64)
    (if (result i64) (i32.eqz (local.get $n))
      (then (i64.const 0x4d5300004d530001))   ;; 0x4d530000-0x4d530001
      (else (i64.const -1))))

  ;; RDMSR: 0 HANDLED (value from $reply), 1 FAULT (#GP), 2 PASS.
  (func (export "rdmsr") (param $index i32) (result i32)
    (if (i32.eq (local.get $index) (i32.const 0x4d530000))
      (then
        (call $reply (global.get $answer))
        (return (i32.const 0))))
    (if (i32.eq (local.get $index) (i32.const 0x4d530001))
      (then
        ;; a counter shared by all vCPUs
        (call $reply (call $state_add (i32.const 0) (i64.const 1)))
        (return (i32.const 0))))
    (i32.const 2))

  ;; WRMSR: same status codes; the value arrives as EDX:EAX in one i64.
  (func (export "wrmsr") (param $index i32) (param $value i64) (result i32)
    (i32.const 1))                             ;; read-only: #GP
)
