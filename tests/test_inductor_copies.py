"""benchmarks/inductor_copies.py finds kernels that write one loaded value to several outputs."""

import gzip
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("inductor_copies", os.path.join(ROOT, "benchmarks", "inductor_copies.py"))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

PREFIX = "V1127 05:03:04.551000 1508 torch/_inductor/graph.py:2552] [0/1] [__output_code] "
LOG = [
    "triton_poi_fused_gelu_5 = async_compile.triton('triton_poi_fused_gelu_5', '''",
    "def triton_poi_fused_gelu_5(in_ptr0, out_ptr0, out_ptr1, xnumel, XBLOCK : tl.constexpr):",
    "    tmp0 = tl.load(in_ptr0 + (x0), None)",
    "    tmp1 = tmp0 * 0.5",
    "    tl.store(out_ptr0 + (x0), tmp1, None)",
    "    tl.store(out_ptr1 + (x0), tmp1, None)",
    "''', device_str='cuda')",
    "triton_poi_fused_zeros_0 = async_compile.triton('triton_poi_fused_zeros_0', '''",
    "def triton_poi_fused_zeros_0(out_ptr0, out_ptr1, xnumel, XBLOCK : tl.constexpr):",
    "    tmp0 = tl.full([1], 0.0, tl.float32)",
    "    tl.store(out_ptr0 + (x0), tmp0, xmask)",
    "    tl.store(out_ptr1 + (x0), tmp0, xmask)",
    "''', device_str='cuda')",
    "def forward_kernel(x_ptr, y_ptr):  # a user kernel: its loads belong to no Inductor kernel",
    "    tl.store(y_ptr, tl.load(x_ptr))",
    "''', device_str='cuda')",
    "        triton_poi_fused_gelu_5.run(buf0, buf1, buf2, 64, stream=stream0)",
    "        triton_poi_fused_gelu_5.run(buf3, buf4, buf5, 64, stream=stream0)",
]


def test_reports_a_value_stored_twice_and_skips_fills(tmp_path, capsys):
    path = tmp_path / "output_code.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(PREFIX + line for line in LOG))
    repeated, launches = tool.copies(tool.read(str(path)))
    assert repeated == {"triton_poi_fused_gelu_5": 2}  # the fill of two buffers is no copy
    assert launches["triton_poi_fused_gelu_5"] == 2
    assert tool.main([str(path)]) == 0
    assert "triton_poi_fused_gelu_5" in capsys.readouterr().out


def test_refuses_a_file_that_is_not_inductor_output(tmp_path, capsys):
    path = tmp_path / "log.txt"
    path.write_text("nothing here\n")
    with pytest.raises(SystemExit):
        tool.main([str(path)])
    assert "no Triton kernel definitions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "missing.txt")])
    assert "cannot read" in capsys.readouterr().err
