//! msrwasm SDK for Zig: the ABI v1 imports, status codes and helpers.
//!
//! Build a plugin (Zig 0.14, e.g. from PyPI: `pip install ziglang==0.14.1`):
//!
//!   python3 -m ziglang build-exe -target wasm32-freestanding -fno-entry -rdynamic \
//!       -O ReleaseSmall --stack 65536 --dep msrwasm -Mroot=plugin.zig \
//!       -Mmsrwasm=guest-sdk/zig/msrwasm.zig -femit-bin=plugin.wasm
//!
//! A plugin exports `msrwasm_abi_version` (returning 1) and `rdmsr` and/or
//! `wrmsr` with `export fn`; see guest-sdk/ABI.md.

/// Status codes of rdmsr/wrmsr.
pub const HANDLED: i32 = 0;
pub const FAULT: i32 = 1;
pub const PASS: i32 = 2;

/// msr.reason() values.
pub const REASON_INVAL: i32 = 1;
pub const REASON_UNKNOWN: i32 = 2;
pub const REASON_FILTER: i32 = 4;

/// What `claim(n)` returns past the last entry.
pub const CLAIM_END: i64 = -1;

/// The host's imports, as the ABI declares them.
pub const raw = struct {
    pub extern "msr" fn reply(value: i64) void;
    pub extern "msr" fn vcpu() i32;
    pub extern "msr" fn reason() i32;
    pub extern "msr" fn now_ns() i64;
    pub extern "msr" fn state_get(key: i32) i64;
    pub extern "msr" fn state_set(key: i32, value: i64) void;
    pub extern "msr" fn state_add(key: i32, delta: i64) i64;
    pub extern "msr" fn config(name_ptr: [*]const u8, name_len: i32, default: i64) i64;
    pub extern "msr" fn log(level: i32, ptr: [*]const u8, len: i32) void;
};

/// The value of the current rdmsr.
pub fn reply(value: u64) void {
    raw.reply(@bitCast(value));
}

/// Index of the vCPU making the access.
pub fn vcpu() u32 {
    return @bitCast(raw.vcpu());
}

/// Host monotonic clock, nanoseconds.
pub fn nowNs() u64 {
    return @bitCast(raw.now_ns());
}

/// Integer parameter `name` from the manifest's [plugin.config], or `default`.
pub fn config(name: []const u8, default: i64) i64 {
    return raw.config(name.ptr, @intCast(name.len), default);
}

/// Logs `message` (0 error, 1 warn, 2 info, 3 debug).
pub fn log(level: i32, message: []const u8) void {
    raw.log(level, message.ptr, @intCast(message.len));
}

/// One claim entry: the inclusive range [first, last], packed.
pub fn claim(first: u32, last: u32) i64 {
    return @bitCast((@as(u64, first) << 32) | last);
}
