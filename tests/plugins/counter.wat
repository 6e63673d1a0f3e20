;; VM-wide counting from every vCPU: 0x4d530010 reads the asking vCPU's
;; index, writes to 0x4d530011 add to a shared counter (state_add), and
;; 0x4d530012 reads it.
(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "vcpu" (func $vcpu (result i32)))
  (import "msr" "state_get" (func $get (param i32) (result i64)))
  (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "claim") (param $n i32) (result i64)
    (if (result i64) (i32.eqz (local.get $n))
      (then (i64.const 0x4d5300104d530012))
      (else (i64.const -1))))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.eq (local.get $i) (i32.const 0x4d530010)) (then (call $reply (i64.extend_i32_u (call $vcpu))) (return (i32.const 0))))
    (if (i32.eq (local.get $i) (i32.const 0x4d530012)) (then (call $reply (call $get (i32.const 0))) (return (i32.const 0))))
    (i32.const 2))
  (func (export "wrmsr") (param $i i32) (param $v i64) (result i32)
    (if (i32.ne (local.get $i) (i32.const 0x4d530011)) (then (return (i32.const 2))))
    (drop (call $add (i32.const 0) (local.get $v)))
    (i32.const 0))
)
