"""Several processes train one model (torchrun, DDP over gloo on CPU): rank 0 alone writes the result."""
import json
import os
import subprocess
import sys

import clintune


def test_torchrun_two_processes_train_one_model(tiny_backbone, binary_csv, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "clintune", "-q", "train", "--data", binary_csv, "--backbone", tiny_backbone, "--method", "full",
           "--lr", "0.002", "--epochs", "6", "--patience", "0", "--max-length", "32", "--precision", "fp32", "--no-progress",
           "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("test metrics:") == 1                      # one summary: rank 0's
    rec = json.loads((out / "record.json").read_text())
    assert rec["env"]["processes"] == 2 and rec["status"] == "success"
    assert rec["metrics"]["accuracy"] > 0.85, rec["metrics"]
    assert rec["training"]["epochs_run"] == 6 and rec["cost"]["train_samples_per_s"] > 0
    assert not [d for d in tmp_path.iterdir() if ".partial-" in d.name]
    clf = clintune.load(out)
    assert len(clf.predict(["heart cardiac", "rash"])) == 2
