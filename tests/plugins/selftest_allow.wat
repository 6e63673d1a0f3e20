;; The user-space side of userspace_msr_exit_test.c's filter-allow case as a
;; plugin: "XSS" (0x1fc here) reads 0 and accepts only 0; "FLUSH_CMD" (0x2ff
;; here) faults on read and accepts only 1; the fabricated 0x474f4f00 keeps what was written. Every
;; access must arrive with reason FILTER (4): anything else faults, which
;; the guest notices.
(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "reason" (func $reason (result i32)))
  (import "msr" "state_get" (func $get (param i32) (result i64)))
  (import "msr" "state_set" (func $set (param i32 i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.ne (call $reason) (i32.const 4)) (then (return (i32.const 1))))
    (if (i32.eq (local.get $i) (i32.const 0x1fc)) (then (call $reply (i64.const 0)) (return (i32.const 0))))
    (if (i32.eq (local.get $i) (i32.const 0x2ff)) (then (return (i32.const 1))))
    (if (i32.eq (local.get $i) (i32.const 0x474f4f00)) (then (call $reply (call $get (i32.const 0))) (return (i32.const 0))))
    (i32.const 2))
  (func (export "wrmsr") (param $i i32) (param $v i64) (result i32)
    (if (i32.ne (call $reason) (i32.const 4)) (then (return (i32.const 1))))
    (if (i32.eq (local.get $i) (i32.const 0x1fc))
      (then (return (select (i32.const 0) (i32.const 1) (i64.eqz (local.get $v))))))
    (if (i32.eq (local.get $i) (i32.const 0x2ff))
      (then (return (select (i32.const 0) (i32.const 1) (i64.eq (local.get $v) (i64.const 1))))))
    (if (i32.eq (local.get $i) (i32.const 0x474f4f00))
      (then (call $set (i32.const 0) (local.get $v)) (return (i32.const 0))))
    (i32.const 2))
)
