;; synthetic_rapl.wat: a DEMONSTRATION of Intel's RAPL registers, not
;; telemetry: the package energy counter advances with host time at a
;; configured TDP, whatever the host or the guest really consume. It needs no
;; host access, so guests that probe RAPL (turbostat, powercap) see a sane
;; package. For real energy, use plugins/rapl/ (docs/energy.md).
;;
;;   0x606 MSR_RAPL_POWER_UNIT    power 1/8 W, energy 2^-14 J, time 2^-10 s
;;   0x610 MSR_PKG_POWER_LIMIT    PL1 = tdp_watts, enabled
;;   0x611 MSR_PKG_ENERGY_STATUS  32-bit energy counter advancing with host
;;                                time at tdp_watts (wraps like hardware)
;;   0x613 MSR_PKG_PERF_STATUS    0 (never throttled)
;;   0x614 MSR_PKG_POWER_INFO     thermal spec power = tdp_watts
;;
;; Every write faults (#GP): the host owns power limits, and the status
;; MSRs are read-only on hardware too.
;;
;; Config: tdp_watts (default 65).
(module
  (@custom "msrwasm.meta" "name = \"rapl\"\nversion = \"1.0.0\"\ndescription = \"Synthetic RAPL (demo: TDP x time, not telemetry)\"\nauthor = \"msrwasm\"\n")
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "now_ns" (func $now_ns (result i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))

  (memory (export "memory") 1)
  (data (i32.const 0) "tdp_watts")

  (global $watts (mut i64) (i64.const 65))

  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))

  (func (export "init") (result i32)
    (global.set $watts (call $config (i32.const 0) (i32.const 9) (i64.const 65)))
    ;; refuse nonsense instead of answering with it
    (if (i64.le_s (global.get $watts) (i64.const 0)) (then (return (i32.const 1))))
    (i32.const 0))

  ;; claims 0x606 and 0x610-0x614
  (func (export "claim") (param $n i32) (result i64)
    (if (i32.eqz (local.get $n)) (then (return (i64.const 0x0000060600000606))))
    (if (i32.eq (local.get $n) (i32.const 1)) (then (return (i64.const 0x0000061000000614))))
    (i64.const -1))

  ;; energy units since the host started: us * W * 2^14 / 10^6, low 32 bits
  (func $energy (result i64)
    (i64.and
      (i64.div_u
        (i64.mul
          (i64.mul (i64.div_u (call $now_ns) (i64.const 1000)) (global.get $watts))
          (i64.const 16384))
        (i64.const 1000000))
      (i64.const 0xffffffff)))

  (func (export "rdmsr") (param $index i32) (result i32)
    (block $pass
      (block $handled
        (br_if $handled
          (if (result i32) (i32.eq (local.get $index) (i32.const 0x606))
            (then (call $reply (i64.const 0x000a0e03)) (i32.const 1))
            (else (i32.const 0))))
        (br_if $handled
          (if (result i32) (i32.eq (local.get $index) (i32.const 0x610))
            (then (call $reply (i64.or (i64.mul (global.get $watts) (i64.const 8)) (i64.const 0x8000)))
                  (i32.const 1))
            (else (i32.const 0))))
        (br_if $handled
          (if (result i32) (i32.eq (local.get $index) (i32.const 0x611))
            (then (call $reply (call $energy)) (i32.const 1))
            (else (i32.const 0))))
        (br_if $handled
          (if (result i32) (i32.eq (local.get $index) (i32.const 0x613))
            (then (call $reply (i64.const 0)) (i32.const 1))
            (else (i32.const 0))))
        (br_if $handled
          (if (result i32) (i32.eq (local.get $index) (i32.const 0x614))
            (then (call $reply (i64.and (i64.mul (global.get $watts) (i64.const 8)) (i64.const 0x7fff)))
                  (i32.const 1))
            (else (i32.const 0))))
        (br $pass))
      (return (i32.const 0)))  ;; HANDLED
    (i32.const 2))             ;; PASS: 0x612 and others in the claim

  (func (export "wrmsr") (param $index i32) (param $value i64) (result i32)
    (i32.const 1))             ;; FAULT
)
