"""msrwasm.py: write msrwasm MSR plugins in Python as WebAssembly components
(WIT world msrwasm:plugin/plugin@1.0.0, guest-sdk/wit/plugin.wit), built with
componentize-py.

A plugin module defines ``class Handler(msrwasm.Plugin)`` with ``init``,
``claims``, ``rdmsr`` and ``wrmsr``. Values are Python ints: helpers mask
u64 results to 64 bits so that they wrap like the other SDKs' u64
arithmetic. ``wit_world`` is the package componentize-py generates for the
world while it builds the component.
"""
from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.handler import (
    MsrRange,
    ReadResult,
    ReadResult_Fault,
    ReadResult_Pass,
    ReadResult_Value,
    WriteResult,
)
from wit_world.imports import host
from wit_world.imports.host import ExitReason, Level

__all__ = [
    "Plugin", "MsrRange", "ReadResult", "WriteResult", "ExitReason", "Level", "Err",
    "U64", "value", "FAULT", "PASS", "HANDLED", "WRITE_FAULT", "WRITE_PASS",
    "REASON_INVAL", "REASON_UNKNOWN", "REASON_FILTER", "refuse", "range_", "claims",
    "vcpu", "reason", "now_ns", "config", "log", "error", "warn", "info", "debug",
    "state_get", "state_set", "state_add", "state_get_u64", "state_set_u64", "state_add_u64",
]

#: Base class of a plugin's ``Handler`` (the exported ``handler`` interface).
Plugin = exports.Handler

#: Mask for u64 arithmetic: ``(a * b) & U64`` wraps like a u64 multiply.
U64 = 0xFFFF_FFFF_FFFF_FFFF

# rdmsr results: value(v), FAULT (#GP), PASS (decline).
FAULT = ReadResult_Fault()
PASS = ReadResult_Pass()


def value(v: int) -> ReadResult:
    """rdmsr result: the access completes with ``v`` (taken modulo 2**64)."""
    return ReadResult_Value(v & U64)


# wrmsr results.
HANDLED = WriteResult.HANDLED
WRITE_FAULT = WriteResult.FAULT
WRITE_PASS = WriteResult.PASS

# Why KVM sent the access to user space, as reason() returns it.
REASON_INVAL = ExitReason.INVAL
REASON_UNKNOWN = ExitReason.UNKNOWN
REASON_FILTER = ExitReason.FILTER


def refuse(message: str) -> Err:
    """``raise msrwasm.refuse("why")`` in init refuses the load with that text."""
    return Err(message)


def range_(first: int, last: int) -> MsrRange:
    """An inclusive MSR range."""
    return MsrRange(first, last)


def claims(*ranges: tuple[int, int]) -> list[MsrRange]:
    """What claims() returns for inclusive ``(first, last)`` pairs."""
    return [MsrRange(first, last) for first, last in ranges]


def vcpu() -> int:
    """Index of the vCPU making the current access (0-based)."""
    return host.vcpu()


def reason() -> ExitReason:
    """Why the current access left KVM."""
    return host.reason()


def now_ns() -> int:
    """Host monotonic clock, nanoseconds."""
    return host.now_ns()


def config(name: str, default: int) -> int:
    """Integer ``name`` from the manifest's [plugin.config], or ``default``."""
    v = host.config(name)
    return default if v is None else v


def log(level: Level, message: str) -> None:
    """A line in the host log (rate-limited by the host)."""
    host.log(level, str(message))


def error(message: str) -> None:
    log(Level.ERROR, message)


def warn(message: str) -> None:
    log(Level.WARN, message)


def info(message: str) -> None:
    log(Level.INFO, message)


def debug(message: str) -> None:
    log(Level.DEBUG, message)


# The VM-wide integer store: private to the plugin's name, shared by all
# vCPUs, kept across hot reloads. Keys are s32, values s64 (or u64 with the
# *_u64 helpers). Missing keys read 0; adds wrap.
def _s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >= 1 << 63 else v


def state_get(key: int) -> int:
    return host.state_get(key)


def state_set(key: int, v: int) -> None:
    host.state_set(key, _s64(v))


def state_add(key: int, delta: int) -> int:
    """Atomic add; returns the new value."""
    return host.state_add(key, _s64(delta))


def state_get_u64(key: int) -> int:
    return host.state_get(key) & U64


def state_set_u64(key: int, v: int) -> None:
    host.state_set(key, _s64(v))


def state_add_u64(key: int, delta: int) -> int:
    return host.state_add(key, _s64(delta)) & U64
