;; topology.wat: MSR_CORE_THREAD_COUNT (0x35), which Intel guests read to
;; learn how many cores and threads the package has, and which KVM does
;; not model. Bits 15:0 are the thread count, bits 31:16 the core count.
;; The register is read-only: writes fault.
;;
;; Config: cores (default 1), threads (default: cores).
(module
  (@custom "msrwasm.meta" "name = \"topology\"\nversion = \"1.0.0\"\ndescription = \"MSR_CORE_THREAD_COUNT from config\"\nauthor = \"msrwasm\"\n")
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))

  (memory (export "memory") 1)
  (data (i32.const 0) "cores")
  (data (i32.const 8) "threads")

  (global $value (mut i64) (i64.const 0))

  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))

  (func (export "init") (result i32)
    (local $cores i64)
    (local $threads i64)
    (local.set $cores (call $config (i32.const 0) (i32.const 5) (i64.const 1)))
    (local.set $threads (call $config (i32.const 8) (i32.const 7) (local.get $cores)))
    ;; each field is 16 bits wide; there is at least one thread per core
    (if (i32.or
          (i32.or (i64.lt_s (local.get $cores) (i64.const 1)) (i64.gt_s (local.get $cores) (i64.const 0xffff)))
          (i32.or (i64.lt_s (local.get $threads) (local.get $cores)) (i64.gt_s (local.get $threads) (i64.const 0xffff))))
      (then (return (i32.const 1))))
    (global.set $value (i64.or (i64.shl (local.get $cores) (i64.const 16)) (local.get $threads)))
    (i32.const 0))

  (func (export "claim") (param $n i32) (result i64)
    (if (result i64) (i32.eqz (local.get $n))
      (then (i64.const 0x0000003500000035))
      (else (i64.const -1))))

  (func (export "rdmsr") (param $index i32) (result i32)
    (if (i32.ne (local.get $index) (i32.const 0x35)) (then (return (i32.const 2))))
    (call $reply (global.get $value))
    (i32.const 0))

  (func (export "wrmsr") (param $index i32) (param $value i64) (result i32)
    (if (result i32) (i32.eq (local.get $index) (i32.const 0x35))
      (then (i32.const 1))
      (else (i32.const 2))))
)
