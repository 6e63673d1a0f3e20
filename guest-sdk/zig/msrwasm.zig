//! msrwasm SDK for Zig (0.14): write msrwasm plugins, wasm core modules
//! that answer KVM guests' MSR accesses (plugin ABI v1). Status codes,
//! the host's `msr.*` imports, typed helpers and plugin metadata; see
//! README.md beside this file for a complete plugin and how to build it.
//!
//! A plugin exports `msrwasm_abi_version` (returning 1) and `rdmsr` and/or
//! `wrmsr` with `export fn`; `init` and `claim` are optional.

const std = @import("std");

/// Status codes of rdmsr/wrmsr: the access completes (a read returns the
/// value given to `reply`).
pub const HANDLED: i32 = 0;
/// The guest gets #GP(0).
pub const FAULT: i32 = 1;
/// Not this plugin's: the next plugin is asked, then KVM or the VM's
/// `unhandled` policy.
pub const PASS: i32 = 2;

/// Why KVM deflected the access (`reason()`).
pub const Reason = enum(i32) {
    /// An invalid access to an MSR KVM knows.
    inval = 1,
    /// An MSR KVM does not know.
    unknown = 2,
    /// An MSR a plugin claimed through the MSR filter.
    filter = 4,
    _,
};
/// `raw.reason()` values, as plain integers.
pub const REASON_INVAL: i32 = 1;
pub const REASON_UNKNOWN: i32 = 2;
pub const REASON_FILTER: i32 = 4;

/// What `claim(n)` returns past the last entry.
pub const CLAIM_END: i64 = -1;

/// Log levels of `log`.
pub const Level = enum(i32) { err = 0, warn = 1, info = 2, debug = 3 };

/// The host's imports, exactly as the ABI declares them. The helpers below
/// wrap them; a plugin imports only what it calls.
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

/// The value of the current rdmsr (call it, then return HANDLED).
pub fn reply(value: u64) void {
    raw.reply(@bitCast(value));
}

/// Index (0-based) of the vCPU making the access.
pub fn vcpu() u32 {
    return @bitCast(raw.vcpu());
}

/// Why KVM deflected the current access.
pub fn reason() Reason {
    return @enumFromInt(raw.reason());
}

/// Host monotonic clock, nanoseconds (since the host process started).
pub fn nowNs() u64 {
    return @bitCast(raw.now_ns());
}

/// The longest string the host accepts from `config` and `log`.
const max_str = 4096;

fn clip(s: []const u8) []const u8 {
    return s[0..@min(s.len, max_str)];
}

/// Integer parameter `name` from the manifest's [plugin.config], or `default`.
pub fn config(name: []const u8, default: i64) i64 {
    const n = clip(name);
    return raw.config(n.ptr, @intCast(n.len), default);
}

/// Logs `message` through the host (at most 20 messages per second per
/// instance reach its log; longer than 4096 bytes is cut).
pub fn log(level: Level, message: []const u8) void {
    const m = clip(message);
    raw.log(@intFromEnum(level), m.ptr, @intCast(m.len));
}
/// `log(.err, message)`.
pub fn logError(message: []const u8) void {
    log(.err, message);
}
/// `log(.warn, message)`.
pub fn logWarn(message: []const u8) void {
    log(.warn, message);
}
/// `log(.info, message)`.
pub fn logInfo(message: []const u8) void {
    log(.info, message);
}
/// `log(.debug, message)`.
pub fn logDebug(message: []const u8) void {
    log(.debug, message);
}

/// The VM-wide integer store of this plugin: shared by all vCPUs, kept
/// across hot reloads, keyed by the plugin's name in the manifest. Keys
/// are yours to choose; a key never set reads 0.
pub const state = struct {
    /// The value of `key` (0 if never set).
    pub fn get(key: i32) i64 {
        return raw.state_get(key);
    }
    /// Sets `key` to `value`.
    pub fn set(key: i32, value: i64) void {
        raw.state_set(key, value);
    }
    /// Atomically adds `delta` (wrapping); returns the new value.
    pub fn add(key: i32, delta: i64) i64 {
        return raw.state_add(key, delta);
    }
};

/// One claim entry: the inclusive range [first, last], packed as
/// `(first << 32) | last`.
pub fn claim(first: u32, last: u32) i64 {
    return @bitCast((@as(u64, first) << 32) | last);
}

/// Plugin metadata: the `msrwasm.meta` custom section that `msrwasm check`
/// prints, from a struct of strings. Use it once, in a container-level
/// comptime block:
///
///     comptime {
///         _ = msr.Meta(.{ .name = "rapl", .version = "1.0.0", .author = "platform team" });
///     }
///
/// Every field becomes a TOML line `key = "value"` (any text: quotes,
/// backslashes and newlines are escaped).
pub fn Meta(comptime fields: anytype) type {
    return struct {
        comptime {
            asm (metaAsm(fields));
        }
    };
}

/// The global assembly `Meta` emits: a `.custom_section.msrwasm.meta`
/// section, which LLVM's wasm backend writes as a custom section.
fn metaAsm(comptime fields: anytype) []const u8 {
    comptime {
        @setEvalBranchQuota(1_000_000);
        var toml: []const u8 = "";
        for (@typeInfo(@TypeOf(fields)).@"struct".fields) |field| {
            const value: []const u8 = @field(fields, field.name);
            toml = toml ++ field.name ++ " = \"";
            for (value) |c| {
                toml = toml ++ switch (c) {
                    '"' => "\\\"",
                    '\\' => "\\\\",
                    '\n' => "\\n",
                    '\t' => "\\t",
                    '\r' => "\\r",
                    0...8, 11, 12, 14...0x1f, 0x7f => std.fmt.comptimePrint("\\u{X:0>4}", .{c}),
                    else => &[_]u8{c},
                };
            }
            toml = toml ++ "\"\n";
        }
        var out: []const u8 = ".section .custom_section.msrwasm.meta,\"\",@\n";
        for (toml) |c| out = out ++ std.fmt.comptimePrint(".byte {d}\n", .{c});
        return out ++ ".text\n";
    }
}
