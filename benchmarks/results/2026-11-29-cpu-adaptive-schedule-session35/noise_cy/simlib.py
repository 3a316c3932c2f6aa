"""Re-audit CY's loader: the schedule on PYTHONPATH (NEW: 51ec167's rule), the rule before audit CV
(old_schedule.py, f3750f9~1) and f3750f9's (f3750f9_schedule.py), side by side."""
import importlib.util, os, sys
from agpe_compile.controller import adaptive_schedule as NEW

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m


OLD = _load(os.path.join(HERE, "old_schedule.py"), "as_old")
F37 = _load(os.path.join(HERE, "f3750f9_schedule.py"), "as_f37")
