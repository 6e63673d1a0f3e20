;; Fixed answers for checking how results reach the guest: full 64-bit
;; values, indices above 0x7fffffff, FAULT on read and on write.
(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "state_get" (func $get (param i32) (result i64)))
  (import "msr" "state_set" (func $set (param i32 i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.eq (local.get $i) (i32.const 0x4d530001)) (then (call $reply (i64.const 0x1122334455667788)) (return (i32.const 0))))
    (if (i32.eq (local.get $i) (i32.const 0xc0000fff)) (then (call $reply (i64.const 0x80000000fffffffe)) (return (i32.const 0))))
    (if (i32.eq (local.get $i) (i32.const 0x4d530002)) (then (return (i32.const 1))))
    (if (i32.eq (local.get $i) (i32.const 0x4d530004)) (then (call $reply (call $get (i32.const 0))) (return (i32.const 0))))
    (i32.const 2))
  (func (export "wrmsr") (param $i i32) (param $v i64) (result i32)
    (if (i32.ne (local.get $i) (i32.const 0x4d530003)) (then (return (i32.const 2))))
    (if (i64.eq (local.get $v) (i64.const 5)) (then (return (i32.const 1))))
    (call $set (i32.const 0) (local.get $v))
    (i32.const 0))
)
