"""The command line: flags from the config, and every bad input gives one line and a non-zero exit."""
import json
import os
import subprocess
import sys

import pytest

from clintune.cli import main


def run(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def files(tmp_path):
    f = {}
    f["good"] = tmp_path / "good.csv"
    f["good"].write_text("text,label\n" + "".join(f"note {i} heart,{i % 2}\n" for i in range(20)))
    f["xlsx"] = tmp_path / "notes.xlsx"
    f["xlsx"].write_text("x")
    f["empty"] = tmp_path / "empty.csv"
    f["empty"].write_text("")
    f["nocol"] = tmp_path / "nocol.csv"
    f["nocol"].write_text("body,label\na,1\nb,0\n")
    f["blank"] = tmp_path / "blank.csv"
    f["blank"].write_text("text,label\na,1\n,0\nc,1\n")
    f["single"] = tmp_path / "single.csv"
    f["single"].write_text("text,label\na,1\nb,1\nc,1\n")
    f["unseen"] = tmp_path / "unseen.csv"
    f["unseen"].write_text("text,label\nfresh note,2\n")
    f["latin1"] = tmp_path / "latin1.csv"
    f["latin1"].write_bytes("text,label\nfi\u00e8vre,1\n".encode("latin-1"))
    f["ragged"] = tmp_path / "ragged.csv"
    f["ragged"].write_text("text,label\nchest pain, left side,1\nrash,0\n")
    f["noheader"] = tmp_path / "noheader.csv"
    f["noheader"].write_text("".join(f"patient {i} has a broken arm SECRETNOTE,{i % 2}\n" for i in range(6)))
    f["dir"] = tmp_path / "dir.csv"
    f["dir"].mkdir()
    f["epochs0"] = tmp_path / "run.yaml"
    f["epochs0"].write_text("epochs: 0\n")
    return f


CASES = [
    (["--data", "{missing}"], "missing.csv: file not found"),
    (["--data", "{xlsx}"], "unknown format ('.xlsx')"),
    (["--data", "{empty}"], "empty.csv: file is empty"),
    (["--data", "{nocol}"], "column 'text' not found"),
    (["--data", "{blank}"], "empty or missing text in column 'text' at row 2"),
    (["--data", "{single}"], "single class '1'"),
    (["--data", "{good}", "--test-data", "{unseen}"], "label '2' at row 1 of the test data never appears"),
    (["--data", "{latin1}"], "not valid UTF-8 at line 2"),
    (["--data", "{good}", "--backbone", "nobody/no-such-model"], "backbone 'nobody/no-such-model' cannot be loaded"),
    (["--data", "{good}", "--backbone", "./no/such/dir"], "backbone './no/such/dir': directory not found"),
    (["--data", "{good}", "--lora-r", "0"], "--lora-r: 0 is out of range"),
    (["--data", "{good}", "--method", "adapters"], "--method: 'adapters' is not one of full, frozen, lora, ia3"),
    (["--data", "{ragged}"], "ragged.csv: row 1 (line 2) has 3 fields, the header has 2"),
    (["--data", "{noheader}"], "the first row looks like data, not a header"),
    (["--data", "{dir}"], "dir.csv: is a directory, expected a data file"),
    (["--data", "{good}", "--test-size", "nan"], "--test-size: nan is not a finite number"),
    (["--data", "{good}", "--val-size", "nan"], "--val-size: nan is not a finite number"),
    (["--data", "{good}", "--lr", "nan"], "--lr: nan is not a finite number"),
    (["--data", "{good}", "--seed", "-1"], "--seed: -1 is out of range"),
    (["--data", "{good}", "--max-length", "1000"], "--max-length: 1000 is more than the 512 tokens"),
    (["--config", "{epochs0}", "--data", "{good}"], "run.yaml: epochs: 0 is out of range"),
]


@pytest.mark.parametrize("argv,needle", CASES)
def test_bad_input_one_line_nonzero_no_traceback(argv, needle, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "missing.csv")}
    argv = [a.format(**paths) for a in argv]
    try:
        code, out, err = run(["-q", "train", *argv, "--out", str(tmp_path / "o")], capsys)
    except SystemExit as e:  # argparse errors
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and "SECRETNOTE" not in err
    assert not (tmp_path / "o").exists()


def test_predict_and_evaluate_bad_model_dir(tmp_path, files, capsys):
    code, _, err = run(["predict", "--model", str(tmp_path / "nope"), "--data", str(files["good"]), "--out",
                        str(tmp_path / "p.csv")], capsys)
    assert code == 2 and "model directory not found" in err
    (tmp_path / "half").mkdir()
    code, _, err = run(["evaluate", "--model", str(tmp_path / "half"), "--data", str(files["good"])], capsys)
    assert code == 2 and "not a clintune model directory (no record.json)" in err
    code, _, err = run(["predict", "--model", str(tmp_path / "half"), "--data", str(files["good"]), "--out",
                        str(tmp_path / "p.xlsx")], capsys)
    assert code == 2 and "unknown format" in err


def test_train_predict_evaluate_via_cli(tiny_backbone, binary_csv, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"backbone: {tiny_backbone}\nmethod: lora\nepochs: 5\nmax_length: 32\nlr: 0.01\nprecision: fp32\n")
    out = tmp_path / "m"
    code, stdout, err = run(["train", "--config", str(cfg), "--data", binary_csv, "--epochs", "2", "--out", str(out),
                             "--no-progress"], capsys)
    assert code == 0, err
    assert "f1" in stdout and "train samples/s" in stdout
    rec = json.loads((out / "record.json").read_text())
    assert rec["config"]["epochs"] == 2 and rec["config"]["lr"] == 0.01   # flag beat the file; file beat default
    code, stdout, _ = run(["predict", "--model", str(out), "--data", binary_csv, "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 0 and "400 predictions written" in stdout
    code, stdout, _ = run(["evaluate", "--model", str(out), "--data", binary_csv, "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0 and "auroc" in stdout
    # privacy: no note text on stdout or stderr
    import pandas as pd
    texts = pd.read_csv(binary_csv)["text"].tolist()
    assert not any(t in stdout for t in texts)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "clintune", "train", "--data", str(tmp_path / "none.csv")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip() == f"clintune: error: {tmp_path / 'none.csv'}: file not found"


@pytest.mark.parametrize("size", ["0", "-1"])
def test_predict_batch_size_must_be_positive(size, tmp_path, files, capsys):
    code, _, err = run(["predict", "--model", str(tmp_path / "m"), "--data", str(files["good"]), "--out",
                        str(tmp_path / "p.csv"), "--batch-size", size], capsys)
    assert code == 2 and err.strip() == "clintune: error: --batch-size: must be >= 1"
    assert not (tmp_path / "p.csv").exists()


def test_demo_epochs_zero_is_refused(tmp_path, capsys):
    code, _, err = run(["demo", "--epochs", "0", "--out", str(tmp_path / "demo")], capsys)
    assert code == 2 and "--epochs: 0 is out of range" in err
    assert not (tmp_path / "demo").exists()


def test_predict_summary_does_not_print_labels_that_look_like_text(tmp_path, capsys):
    import clintune

    labels = ["patient has a broken arm SECRETNOTE", "patient reports chest pain SECRETNOTE"]
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"note {i} {'arm' if i % 2 else 'chest'},{labels[i % 2]}\n"
                                             for i in range(20)))
    clintune.train(clintune.TrainConfig(data=str(data), method="tfidf", tfidf_min_df=1, progress=False,
                                        out=str(tmp_path / "m")))
    code, out, err = run(["predict", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                          str(tmp_path / "p.csv")], capsys)
    assert code == 0, err
    assert "20 predictions written" in out and "distinct labels" in out and "SECRETNOTE" not in out + err
