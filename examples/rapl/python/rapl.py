"""The synthetic RAPL demo plugin in Python, as a WebAssembly component: the same
answers as plugins/synthetic_rapl.wat. Build: see guest-sdk/python/README.md."""
import msrwasm
from msrwasm import U64

# Set by init from config; every vCPU has its own instance. (componentize-py
# may create a new Handler object per call: keep state in the module.)
watts = 65


def energy() -> int:
    """Energy units (2^-14 J) since the host started, low 32 bits (u64 arithmetic)."""
    us = msrwasm.now_ns() // 1000
    return (((us * watts) & U64) * 16384 & U64) // 1_000_000 & 0xFFFF_FFFF


class Handler(msrwasm.Plugin):
    def init(self) -> None:
        global watts
        watts = msrwasm.config("tdp_watts", 65)
        if watts <= 0:
            raise msrwasm.refuse(f"tdp_watts must be positive, not {watts}")

    def claims(self):
        return msrwasm.claims((0x606, 0x606), (0x610, 0x614))

    def rdmsr(self, index: int) -> msrwasm.ReadResult:
        if index == 0x606:
            return msrwasm.value(0xA0E03)
        if index == 0x610:
            return msrwasm.value((watts * 8 & U64) | 0x8000)
        if index == 0x611:
            return msrwasm.value(energy())
        if index == 0x613:
            return msrwasm.value(0)
        if index == 0x614:
            return msrwasm.value(watts * 8 & 0x7FFF)
        return msrwasm.PASS

    def wrmsr(self, index: int, value: int) -> msrwasm.WriteResult:
        return msrwasm.WRITE_FAULT  # RAPL is read-only here
