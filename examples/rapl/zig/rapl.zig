//! The synthetic RAPL demo plugin in Zig: the same answers as plugins/synthetic_rapl.wat,
//! checked by tests/conformance.rs. Build: see guest-sdk/zig/README.md.
const msr = @import("msrwasm");

comptime {
    _ = msr.Meta(.{
        .name = "rapl",
        .version = "1.0.0",
        .description = "RAPL package power telemetry (Zig)",
        .author = "msrwasm",
    });
}

var watts: i64 = 65;

export fn msrwasm_abi_version() i32 {
    return 1;
}

export fn init() i32 {
    watts = msr.config("tdp_watts", 65);
    return if (watts > 0) 0 else 1;
}

export fn claim(n: i32) i64 {
    return switch (n) {
        0 => msr.claim(0x606, 0x606),
        1 => msr.claim(0x610, 0x614),
        else => msr.CLAIM_END,
    };
}

/// Energy units (2^-14 J) since the host started, low 32 bits.
fn energy() u64 {
    const us = msr.nowNs() / 1000;
    const w: u64 = @bitCast(watts);
    return (us *% w *% 16384 / 1_000_000) & 0xffffffff;
}

export fn rdmsr(index: i32) i32 {
    const value: u64 = switch (@as(u32, @bitCast(index))) {
        0x606 => 0x000a0e03,
        0x610 => @bitCast((watts *% 8) | 0x8000),
        0x611 => energy(),
        0x613 => 0,
        0x614 => @bitCast((watts *% 8) & 0x7fff),
        else => return msr.PASS,
    };
    msr.reply(value);
    return msr.HANDLED;
}

export fn wrmsr(index: i32, value: i64) i32 {
    _ = index;
    _ = value;
    return msr.FAULT; // RAPL is read-only here
}
