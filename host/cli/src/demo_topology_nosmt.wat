;; The version of topology.wat that `msrwasm demo` swaps in while the VM
;; runs: SMT hidden, one thread per core, whatever the config says.
(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))

  (memory (export "memory") 1)
  (data (i32.const 0) "cores")

  (global $value (mut i64) (i64.const 0))

  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))

  (func (export "init") (result i32)
    (local $cores i64)
    (local.set $cores (call $config (i32.const 0) (i32.const 5) (i64.const 1)))
    (if (i32.or (i64.lt_s (local.get $cores) (i64.const 1)) (i64.gt_s (local.get $cores) (i64.const 0xffff)))
      (then (return (i32.const 1))))
    (global.set $value (i64.or (i64.shl (local.get $cores) (i64.const 16)) (local.get $cores)))
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
