"""Threads: the default follows a cgroup CPU limit (containers), OMP_NUM_THREADS and --threads win over it."""
import pytest
import torch

from clintune import runtime
from clintune.sweep import runner


def _hierarchy(tmp_path, kind, mount_root, cgroup_path, files):
    """A fake /proc/self/mountinfo and /proc/self/cgroup for one hierarchy mounted at tmp_path/'cg', and its files
    ({relative directory: {name: content}})."""
    point = tmp_path / "cg"
    for rel, entries in files.items():
        d = point / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, content in entries.items():
            (d / name).write_text(content)
    point.mkdir(exist_ok=True)
    if kind == "v2":
        mount = f"30 25 0:26 {mount_root} {point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        line = f"0::{cgroup_path}\n"
    else:
        mount = f"31 25 0:27 {mount_root} {point} rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        line = f"4:cpu,cpuacct:{cgroup_path}\n"
    other = f"22 1 8:1 / {tmp_path} rw - ext4 /dev/sda1 rw\n"            # not a cgroup: ignored
    (tmp_path / "mountinfo").write_text(other + mount)
    (tmp_path / "cgroup").write_text("1:name=systemd:/\n" + line)
    return str(tmp_path / "mountinfo"), str(tmp_path / "cgroup")


def test_cgroup_v2_limit_is_the_smallest_quota_along_the_path(tmp_path):
    paths = _hierarchy(tmp_path, "v2", "/", "/a/b", {"a/b": {"cpu.max": "150000 100000\n"},
                                                     "a": {"cpu.max": "max 100000\n"}})
    assert runtime.cgroup_cpu_limit(*paths) == 1.5
    (tmp_path / "cg" / "a" / "cpu.max").write_text("50000 100000\n")           # a parent caps its children
    assert runtime.cgroup_cpu_limit(*paths) == 0.5


def test_cgroup_v2_without_a_limit(tmp_path):
    paths = _hierarchy(tmp_path, "v2", "/", "/", {".": {"cpu.max": "max 100000\n"}})
    assert runtime.cgroup_cpu_limit(*paths) is None


def test_cgroup_v1_inside_a_container_reads_the_mount_itself(tmp_path):
    """Docker without a cgroup namespace: the process's path /docker/abc is the mount's root, so the quota is in
    the mount point's own files."""
    paths = _hierarchy(tmp_path, "v1", "/docker/abc", "/docker/abc",
                       {".": {"cpu.cfs_quota_us": "200000\n", "cpu.cfs_period_us": "100000\n"}})
    assert runtime.cgroup_cpu_limit(*paths) == 2.0
    (tmp_path / "cg" / "cpu.cfs_quota_us").write_text("-1\n")                 # no limit
    assert runtime.cgroup_cpu_limit(*paths) is None


def test_cgroup_limit_unreadable_or_absent_is_none(tmp_path):
    assert runtime.cgroup_cpu_limit(str(tmp_path / "no-mountinfo"), str(tmp_path / "no-cgroup")) is None
    paths = _hierarchy(tmp_path, "v2", "/", "/a", {"a": {"cpu.max": "garbage\n"}})
    assert runtime.cgroup_cpu_limit(*paths) is None
    paths = _hierarchy(tmp_path, "v1", "/other", "/docker/abc", {".": {"cpu.cfs_quota_us": "100000\n",
                                                                        "cpu.cfs_period_us": "100000\n"}})
    assert runtime.cgroup_cpu_limit(*paths) is None                             # our cgroup is not under this mount


def test_usable_cpus_rounds_a_limit_down_and_keeps_one(monkeypatch):
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    free = runtime.usable_cpus()
    assert free >= 1
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 0.3)
    assert runtime.usable_cpus() == 1
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: free + 0.9)
    assert runtime.usable_cpus() == free                                        # the affinity caps it too


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_runs_take_the_cgroup_limit_unless_told(monkeypatch, threads):
    if threads < 2:
        pytest.skip("one core: no fewer threads to choose")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
    rt = runtime.resolve_runtime("cpu", "fp32", allow_distributed=False)
    assert torch.get_num_threads() == 1 and rt.threads_from == "usable cores"

    torch.set_num_threads(threads)
    rt = runtime.resolve_runtime("cpu", "fp32", 2, allow_distributed=False)  # --threads wins
    assert torch.get_num_threads() == 2 and rt.threads_from == "--threads"

    torch.set_num_threads(threads)
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))                        # so does OMP_NUM_THREADS
    rt = runtime.resolve_runtime("cpu", "fp32", allow_distributed=False)
    assert torch.get_num_threads() == threads and rt.threads_from == "OMP_NUM_THREADS"


def test_the_tokenizers_threads_follow_pytorchs_unless_set(monkeypatch, threads):
    """RAYON_NUM_THREADS (the Rust tokenizer's pool, before it starts) defaults to PyTorch's thread count, so a
    run given one core tokenises on one too; a value already set stands. The command line turns the pool on
    where it tokenises in its own process and off where it starts workers, unless told."""
    import os

    from clintune import cli

    if threads < 2:
        pytest.skip("one core: no fewer threads to choose")
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runtime.resolve_runtime("cpu", "fp32", 1, allow_distributed=False)
    assert os.environ["RAYON_NUM_THREADS"] == "1"
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    runtime.resolve_runtime("cpu", "fp32", 2, allow_distributed=False)
    assert os.environ["RAYON_NUM_THREADS"] == "7"
    for command, parallel in (("train", "true"), ("evaluate", "true"), ("predict", "true"), ("demo", "true"),
                              ("bench", "false"), ("tune", "false"), (None, "false")):
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        cli._tokenizer_threads(command)
        assert os.environ["TOKENIZERS_PARALLELISM"] == parallel, command
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    cli._tokenizer_threads("predict")
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_runs_keep_pytorchs_threads_without_a_limit(monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: threads)
    rt = runtime.resolve_runtime("cpu", "fp32", allow_distributed=False)
    assert torch.get_num_threads() == threads and rt.threads_from == "PyTorch default"


def test_sweep_shares_out_the_usable_cores(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    assert [runner.default_threads(j) for j in (1, 2, 3, 8)] == [4, 2, 1, 1]
