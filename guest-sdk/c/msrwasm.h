/*
 * msrwasm.h: write msrwasm plugins in C (plugin ABI v1). One header, no
 * libc: plugins are freestanding wasm core modules. README.md beside this
 * file has a complete plugin and the build command:
 *
 *   clang --target=wasm32 -O2 -nostdlib -ffreestanding \
 *         -Wl,--no-entry -Wl,-z,stack-size=65536 -o plugin.wasm plugin.c
 *
 * (A 64 KiB stack instead of the 1 MiB default keeps the module well
 * inside the host's default memory cap, memory_max_kib = 1024.)
 *
 * A plugin uses MSRWASM_ABI_V1 once and exports rdmsr and/or wrmsr with
 * MSRWASM_EXPORT; everything else is optional.
 */
#ifndef MSRWASM_H
#define MSRWASM_H

#include <stdint.h>

/* Status codes of rdmsr/wrmsr. */
enum { MSRWASM_HANDLED = 0, MSRWASM_FAULT = 1, MSRWASM_PASS = 2 };

/* msr.reason() values: KVM's KVM_MSR_EXIT_REASON_* bits. */
enum { MSRWASM_REASON_INVAL = 1, MSRWASM_REASON_UNKNOWN = 2, MSRWASM_REASON_FILTER = 4 };

/* Log levels of msr_log(). */
enum { MSRWASM_ERROR = 0, MSRWASM_WARN = 1, MSRWASM_INFO = 2, MSRWASM_DEBUG = 3 };

#define MSRWASM_IMPORT(name) __attribute__((import_module("msr"), import_name(#name)))
#define MSRWASM_EXPORT(name) __attribute__((export_name(#name)))

/*
 * The host's imports. Only the ones a plugin calls end up imported.
 *   msr_reply(value)            the value of the current rdmsr (then return MSRWASM_HANDLED)
 *   msr_vcpu()                  index (0-based) of the vCPU making the access
 *   msr_reason()                MSRWASM_REASON_*: why KVM deflected the access
 *   msr_now_ns()                host monotonic clock, nanoseconds
 *   msr_state_get/set/add(key)  VM-wide integer store: shared by all vCPUs, kept
 *                               across hot reloads; a key never set reads 0;
 *                               add is atomic (wrapping) and returns the new value
 */
MSRWASM_IMPORT(reply) void msr_reply(int64_t value);
MSRWASM_IMPORT(vcpu) int32_t msr_vcpu(void);
MSRWASM_IMPORT(reason) int32_t msr_reason(void);
MSRWASM_IMPORT(now_ns) int64_t msr_now_ns(void);
MSRWASM_IMPORT(state_get) int64_t msr_state_get(int32_t key);
MSRWASM_IMPORT(state_set) void msr_state_set(int32_t key, int64_t value);
MSRWASM_IMPORT(state_add) int64_t msr_state_add(int32_t key, int64_t delta);
MSRWASM_IMPORT(config) int64_t msr_config_raw(const char *name, int32_t name_len, int64_t dflt);
MSRWASM_IMPORT(log) void msr_log_raw(int32_t level, const char *message, int32_t len);

/* The longest string the host accepts from config and log. */
#define MSRWASM_MAX_STR 4096

/* strlen without libc (plugins link no C library), cut to at most
 * MSRWASM_MAX_STR bytes on a UTF-8 character boundary. */
static inline int32_t msrwasm_strlen(const char *s) {
    int32_t n = 0;
    while (n < MSRWASM_MAX_STR && s[n])
        n++;
    if (n == MSRWASM_MAX_STR && s[n])
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
            n--;
    return n;
}

/* Integer parameter `name` from the manifest's [plugin.config], or dflt. */
static inline int64_t msr_config(const char *name, int64_t dflt) {
    return msr_config_raw(name, msrwasm_strlen(name), dflt);
}

/* Logs a C string through the host (at most 20 messages per second per
 * instance reach its log; longer than 4096 bytes is cut). */
static inline void msr_log(int32_t level, const char *message) {
    msr_log_raw(level, message, msrwasm_strlen(message));
}
static inline void msr_log_error(const char *message) { msr_log(MSRWASM_ERROR, message); }
static inline void msr_log_warn(const char *message) { msr_log(MSRWASM_WARN, message); }
static inline void msr_log_info(const char *message) { msr_log(MSRWASM_INFO, message); }
static inline void msr_log_debug(const char *message) { msr_log(MSRWASM_DEBUG, message); }

/* Defines the required msrwasm_abi_version export. Use once. */
#define MSRWASM_ABI_V1 \
    MSRWASM_EXPORT(msrwasm_abi_version) int32_t msrwasm_abi_version(void) { return 1; }

/* One claim entry: the inclusive range [first, last], packed. */
#define MSRWASM_CLAIM(first, last) ((int64_t)(((uint64_t)(uint32_t)(first) << 32) | (uint32_t)(last)))
/* What claim(n) returns past the last entry. */
#define MSRWASM_CLAIM_END ((int64_t)-1)

/*
 * Plugin metadata: the msrwasm.meta custom section (TOML) that
 * `msrwasm check` prints. Use once, at file scope, with string literals
 * that contain no quote or backslash, e.g.
 *   MSRWASM_META("rapl", "1.0.0", "RAPL package power telemetry", "platform team");
 * (Written with assembler directives: clang 14 places a variable in a data
 * segment even when its section is named .custom_section.*.)
 */
#define MSRWASM_META(name, version, description, author) \
    __asm__(".section .custom_section.msrwasm.meta,\"\",@\n" \
            ".ascii \"name = '" name "'\\n\"\n" \
            ".ascii \"version = '" version "'\\n\"\n" \
            ".ascii \"description = '" description "'\\n\"\n" \
            ".ascii \"author = '" author "'\\n\"\n" \
            ".text\n")

#endif
