;; Reads return the MSR index itself (as the selftest's user space does);
;; writes pass, so KVM or the unhandled policy decides them. The mode MSR
;; 0x4d4f4445 ("MODE") reads the `mode` config value, which tells a test
;; guest which composition it runs under.
(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "mode")
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.eq (local.get $i) (i32.const 0x4d4f4445))
      (then (call $reply (call $config (i32.const 0) (i32.const 4) (i64.const 0))))
      (else (call $reply (i64.extend_i32_u (local.get $i)))))
    (i32.const 0))
  (func (export "wrmsr") (param $i i32) (param $v i64) (result i32) (i32.const 2))
)
