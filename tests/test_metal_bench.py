"""The kernel benchmark is runnable everywhere: on a machine without Metal it says so, exits 0."""

from metal_kernels import bench


def test_bench_without_metal_exits_cleanly(capsys):
    assert bench.main([]) == 0
    assert "needs Metal" in capsys.readouterr().out


def test_bench_takes_a_window(capsys):
    assert bench.main(["--window", "1024", "--dtype", "float16"]) == 0
    assert "needs Metal" in capsys.readouterr().out
