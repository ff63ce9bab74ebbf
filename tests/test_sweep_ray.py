"""`--executor ray` (a local Ray instance) gives the same records as the local executor."""
import pytest

from clintune.cli import main
from clintune.sweep.store import RunStore

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'clintune[ray]')")


def test_ray_local_mode_gives_the_same_records(tmp_path, tiny_backbone, binary_csv):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
data: {{data: {binary_csv}}}
settings: {{backbone: {tiny_backbone}, epochs: 2, batch_size: 16, max_length: 32, lr: 5.0e-3, precision: fp32,
            threads: 1}}
grid: {{method: [frozen, lora]}}
seeds: [3]
""")
    assert main(["bench", str(spec), "--out", str(tmp_path / "local")]) == 0
    assert main(["bench", str(spec), "--out", str(tmp_path / "ray"), "--executor", "ray", "--jobs", "2"]) == 0
    assert not ray.is_initialized()                                   # the local instance we started is shut down
    with RunStore(tmp_path / "local" / "runs.db", create=False) as a, \
            RunStore(tmp_path / "ray" / "runs.db", create=False) as b:
        ra, rb = {r.id: r for r in a.runs()}, {r.id: r for r in b.runs()}
        assert set(ra) == set(rb) and len(ra) == 2
        for rid, x in ra.items():
            y = rb[rid]
            assert x.status == y.status == "success" and x.attempts == y.attempts == 1
            assert x.config == y.config and x.record["config"] == y.record["config"]
            assert x.metrics == y.metrics                              # same seed, same threads: same numbers
            assert x.metrics_ci == y.metrics_ci and x.test_split_sha256 == y.test_split_sha256
            assert x.training["history"] == y.training["history"]
            assert a.predictions(rid).equals(b.predictions(rid))
            assert y.cost["peak_rss_mb"] > 0 and y.worker == "ray"
    assert (tmp_path / "ray" / "logs").is_dir() and any((tmp_path / "ray" / "logs").iterdir())
