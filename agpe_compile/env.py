"""On/off environment switches (AGPE_CPU_BSR, AGPE_INLINE_KERNELS, AGPE_EAGER_IN_PLACE).

Each is on unless set to an "off" word; a value that is neither an "on" nor an "off" word is
an error naming the variable, so ``AGPE_CPU_BSR=false`` turns the path off instead of being
read as on (AGPE_TMA, which takes a setting, is checked in kernels/launch.py).
"""

from __future__ import annotations

import os

ON = ("1", "true", "on", "yes")
OFF = ("0", "false", "off", "no")


def switch(name: str, default: bool = True) -> bool:
    """The value of the on/off variable ``name``; unset or empty gives ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"agpe_compile: expected {name} to be one of {ON + OFF} (case-insensitive), "
                     f"got {os.environ[name]!r}")
