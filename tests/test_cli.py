"""The quantkit command: every subcommand on small generated checkpoints, errors and exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantkit import QTensor, cli, convert, load
from quantkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _tensors(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 300, generator=g) * torch.rand(48, 1, generator=g)
    w[3] = 0                                        # an all-zero channel (a pruned row)
    return {
        "encoder.fc1.weight": w,
        "encoder.fc1.bias": torch.randn(48, generator=g),
        "encoder.fc2.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16),
        "conv.weight": (torch.randn(8, 4, 3, 3, generator=g) * 0.1).to(torch.float16),
        "embeddings.weight": torch.randn(100, 16, generator=g),
        "position_ids": torch.arange(64),
        "scale": torch.tensor(2.0),
    }


QUANTIZED = {"encoder.fc1.weight", "encoder.fc2.weight", "conv.weight", "embeddings.weight"}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt", "note": "test"})
    return path


@pytest.fixture
def sharded(tmp_path) -> Path:
    tensors = _tensors(1)
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".quantkit-"))


def _check_close(original: dict, loaded, quantized=QUANTIZED):
    assert set(loaded) == set(original)
    for name, x in original.items():
        value = loaded[name]
        if name in quantized:
            assert isinstance(value, QTensor), name
            x32 = x.float()
            x_hat = value.dequantize()
            assert x_hat.shape == x32.shape and x_hat.dtype == torch.float32
            err = torch.linalg.norm(x_hat - x32) / torch.linalg.norm(x32)
            assert err < 0.05, (name, float(err))
        else:
            assert not isinstance(value, QTensor), name
            assert value.dtype == x.dtype and torch.equal(value, x), name


# ------------------------------------------------------------------------------------ quantize


def test_quantize_file(checkpoint, tmp_path, capsys):
    before = _digest(checkpoint)
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert _digest(checkpoint) == before                      # the input is never modified
    loaded = load(out)
    _check_close(_tensors(), loaded)
    for name in QUANTIZED:
        assert loaded[name].axis == 0                          # channel granularity = axis 0
    assert float(loaded["encoder.fc1.weight"].dequantize()[3].abs().max()) == 0
    assert loaded.metadata["quantkit.method"] == "mse"
    assert loaded.metadata["note"] == "test"                  # the input's metadata is carried
    # The table: every tensor, figures for the quantized ones, the totals; no control characters
    # when the output is not a terminal.
    lines = captured.out.splitlines()
    for name in _tensors():
        row = next(line for line in lines if line.startswith(name + " "))
        if name in QUANTIZED:
            sqnr, vs_max = row.split()[3:5]
            assert float(sqnr) > 20 and 0 < float(vs_max) <= 1.0 + 1e-9, row
        else:
            assert "kept" in row, row
    assert any(line.startswith("total") for line in lines)
    assert "4 tensors quantized, 3 kept" in captured.out
    assert "\r" not in captured.out + captured.err and "\x1b" not in captured.out + captured.err


@pytest.mark.parametrize("granularity, check", [
    ("tensor", lambda q: q.axis is None and q.block_size is None),
    ("channel", lambda q: q.axis == 0),
    ("block:64", lambda q: q.block_size == 64),
])
def test_quantize_granularities(checkpoint, tmp_path, capsys, granularity, check):
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(out), "--granularity", granularity]) == 0
    loaded = load(out)
    _check_close(_tensors(), loaded)
    assert all(check(loaded[name]) for name in QUANTIZED)


@pytest.mark.parametrize("method", cli.METHODS)
def test_quantize_methods(checkpoint, tmp_path, capsys, method):
    out = tmp_path / f"{method}.safetensors"
    # Per tensor here (fast for every method); the other tests cover the per-channel default.
    assert main(["quantize", str(checkpoint), "-o", str(out), "--method", method,
                 "--granularity", "tensor"]) == 0
    loaded = load(out)
    _check_close(_tensors(), loaded)
    assert loaded.metadata["quantkit.method"] == method
    for name in QUANTIZED:
        alpha = float(loaded[name].scale) * 127
        amax = float(_tensors()[name].float().abs().max())
        assert 0 < alpha <= amax * (1 + 1e-6)
        if method == "max":   # at alpha = |x|max nothing is clipped
            assert alpha == pytest.approx(amax, rel=1e-6)


def test_quantize_skip(checkpoint, tmp_path, capsys):
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(out),
                 "--skip", "embeddings.*", "--skip", "conv.*"]) == 0
    loaded = load(out)
    _check_close(_tensors(), loaded, quantized=QUANTIZED - {"embeddings.weight", "conv.weight"})
    assert "kept (--skip)" in capsys.readouterr().out


@pytest.mark.parametrize("via_index", [False, True])
def test_quantize_sharded(sharded, tmp_path, capsys, via_index):
    src = sharded / "model.safetensors.index.json" if via_index else sharded
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(src), "-o", str(out)]) == 0
    _check_close(_tensors(1), load(out))


def test_quantize_progress_bar_on_a_terminal(checkpoint, tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["quantize", str(checkpoint), "-o", str(tmp_path / "o.safetensors")]) == 0
    assert "\r" in err.getvalue() and "tensors" in err.getvalue()
    assert "\r" not in capsys.readouterr().out
    err.truncate(0)
    assert main(["quantize", str(checkpoint), "-o", str(tmp_path / "o.safetensors"),
                 "--no-progress"]) == 0
    assert err.getvalue().strip("\x00") == ""


def test_quantize_goes_on_when_the_reader_of_its_table_goes_away(checkpoint, tmp_path,
                                                                 monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(out)]) == 0
    _check_close(_tensors(), load(out))


def test_quantize_refuses_to_overwrite_its_input(checkpoint, sharded, capsys):
    before = _digest(checkpoint)
    assert main(["quantize", str(checkpoint), "-o", str(checkpoint)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert _digest(checkpoint) == before
    shard = sharded / "model-00002-of-00002.safetensors"
    shard_before = _digest(shard)
    assert main(["quantize", str(sharded), "-o", str(shard)]) == 2
    index = sharded / "model.safetensors.index.json"
    assert main(["quantize", str(sharded), "-o", str(index)]) == 2
    assert _digest(shard) == shard_before


def test_quantize_failure_leaves_no_output(tmp_path, capsys):
    tensors = _tensors()
    bad = tensors["embeddings.weight"].clone()
    bad[7, 3] = float("nan")
    tensors["embeddings.weight"] = bad        # sorted after encoder.*: fails half-way through
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "out.safetensors"
    assert main(["quantize", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "embeddings.weight" in err and "non-finite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and _leftovers(tmp_path) == []
    # An existing output is left as it was.
    out.write_bytes(b"previous")
    assert main(["quantize", str(src), "-o", str(out)]) == 1
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_quantize_name_clash_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "clash.safetensors"
    save_file({"w": torch.randn(4, 64), "w_scale": torch.randn(4, 64)}, str(src))
    assert main(["quantize", str(src), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "w_scale" in err and len(err.strip().splitlines()) == 1
    assert _leftovers(tmp_path) == []


def test_quantize_refuses_an_int8_checkpoint(checkpoint, tmp_path, capsys):
    q = tmp_path / "int8.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(q)]) == 0
    capsys.readouterr()
    assert main(["quantize", str(q), "-o", str(tmp_path / "again.safetensors")]) == 1
    assert "already a quantkit int8 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "again.safetensors").exists()


def test_quantize_interrupted_leaves_no_output(checkpoint, tmp_path, capsys, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    real = convert.quantize_tensor
    monkeypatch.setattr(convert, "quantize_tensor", interrupted)
    out = tmp_path / "out.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_quantize_terminated_leaves_no_output(checkpoint, tmp_path, capsys, monkeypatch):
    """SIGTERM (timeout, kill, a scheduler) unwinds like Ctrl-C: no temporary file is left."""
    import os
    import signal

    calls = []

    def terminated(*args, **kwargs):
        if calls:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return real(*args, **kwargs)

    real = convert.quantize_tensor
    monkeypatch.setattr(convert, "quantize_tensor", terminated)
    out = tmp_path / "out.safetensors"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["quantize", str(checkpoint), "-o", str(out)]) == 128 + signal.SIGTERM
    assert "terminated; no output was written" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before     # main puts the old handler back


def test_an_ignored_hangup_stays_ignored(checkpoint, monkeypatch):
    """Under nohup (SIGHUP ignored) the command keeps running on a hang-up."""
    import signal

    import quantkit.cli as cli_module

    seen = []
    monkeypatch.setattr(cli_module, "cmd_inspect", lambda args: seen.append(
        (signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM))) or 0)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main(["inspect", str(checkpoint)]) == 0
    finally:
        signal.signal(signal.SIGHUP, before)
    assert seen[0][0] is signal.SIG_IGN and seen[0][1] is not signal.SIG_DFL


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args, code, message", [
    (["quantize", "{missing}", "-o", "{out}"], 1, "no such file"),
    (["quantize", "{text}", "-o", "{out}"], 1, "not a safetensors file"),
    (["quantize", "{ckpt}", "-o", "{out}", "--method", "median"], 2, "invalid choice: 'median'"),
    (["quantize", "{ckpt}", "-o", "{out}", "--granularity", "block:100"], 2, "block:100"),
    (["quantize", "{ckpt}", "-o", "{out}", "--granularity", "rows"], 2, "unknown granularity"),
    (["quantize", "{ckpt}"], 2, "-o"),
    (["quantize", "{ckpt}", "-o", "{tmp}"], 2, "is a folder"),
    (["quantize", "{ckpt}", "-o", "{tmp}/no/such/dir/out.safetensors"], 1, "does not exist"),
    (["quantize", "{ckpt}", "-o", "{out}", "--percentile", "99"], 2, "--percentile"),
    (["quantize", "{ckpt}", "-o", "{out}", "--method", "percentile", "--percentile", "0"], 2,
     "(0, 100]"),
    (["quantize", "{ckpt}", "-o", "{out}", "--method", "percentile", "--percentile", "nan"], 2,
     "(0, 100]"),
    (["quantize", "{tmp}", "-o", "{out}"], 1, "index.json"),
    (["inspect", "{missing}"], 1, "no such file"),
    (["inspect", "{text}"], 1, "not a safetensors file"),
    (["calibrate", "{ckpt}", "--tensor", "nope"], 1, "no tensor 'nope'"),
    (["calibrate", "{ckpt}", "--tensor", "position_ids"], 1, "floating-point"),
    (["calibrate", "{ckpt}", "--tensor", "encoder.fc1.bias", "--granularity", "channel"], 2,
     "no channels"),
    (["frobnicate"], 2, "invalid choice"),
    ([], 2, "usage"),
])
def test_errors_are_one_line_with_exit_code(checkpoint, tmp_path, capsys, args, code, message):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not tensors, just some text long enough to be a header\n" * 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {"missing": tmp_path / "missing.safetensors", "text": text, "ckpt": checkpoint,
             "out": tmp_path / "out.safetensors", "tmp": empty}
    argv = [a.format(**names) for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if args:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("quantkit: error: ")
    assert not (tmp_path / "out.safetensors").exists()


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "quantize" in capsys.readouterr().out
    assert main(["quantize", "--help"]) == 0
    assert "--granularity" in capsys.readouterr().out
    assert main(["--version"]) == 0


# ------------------------------------------------------------------------------------ inspect


def test_inspect_float_and_int8(checkpoint, sharded, tmp_path, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "float checkpoint, 7 tensors" in out
    assert all(name in out for name in _tensors())
    assert "BF16" in out and "F16" in out and "I64" in out

    q = tmp_path / "int8.safetensors"
    assert main(["quantize", str(checkpoint), "-o", str(q), "--granularity", "block:64"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(q)]) == 0
    out = capsys.readouterr().out
    assert "quantkit int8 checkpoint, 7 tensors" in out
    row = next(line for line in out.splitlines() if line.startswith("encoder.fc1.weight "))
    assert "int8" in row and "block 64" in row and "%" in row
    assert "4 int8 tensors" in out

    assert main(["inspect", str(sharded)]) == 0
    assert "2 shards" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ calibrate


@pytest.mark.parametrize("granularity", [[], ["--granularity", "channel"]])
def test_calibrate_compares_methods(checkpoint, capsys, granularity):
    assert main(["calibrate", str(checkpoint), *granularity]) == 0
    out = capsys.readouterr().out
    assert f"granularity {'channel' if granularity else 'tensor'}" in out
    lines = out.splitlines()
    for name in QUANTIZED:
        rows = [line.split() for line in lines if line.startswith(name + " ")]
        assert [r[1] for r in rows] == list(cli.METHODS)
        ratios = [float(r[4].rstrip("x")) for r in rows]
        assert min(ratios) == 1.0 and all(r >= 1.0 for r in ratios)
        mse_row = rows[0]
        assert float(mse_row[4].rstrip("x")) <= float(rows[1][4].rstrip("x"))   # mse <= max


def test_calibrate_one_tensor_with_plot(checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("quantkit.report")
    png = tmp_path / "curve.png"
    assert main(["calibrate", str(checkpoint), "--tensor", "encoder.fc1.weight",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("encoder.fc1.weight ") == len(cli.METHODS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_plot_into_a_missing_folder_is_refused_before_the_work(checkpoint, tmp_path,
                                                                          capsys):
    pytest.importorskip("matplotlib")
    assert main(["calibrate", str(checkpoint), "--plot", str(tmp_path / "nodir" / "c.png")]) == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "calibration methods" not in captured.out


def test_calibrate_plot_without_matplotlib(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["calibrate", str(checkpoint), "--plot", str(tmp_path / "c.png")]) == 1
    assert 'quantkit[plot]' in capsys.readouterr().err


# ------------------------------------------------------------------------------------ demo


def test_demo_without_the_extra_runs_the_synthetic_pipeline(capsys, monkeypatch):
    import quantkit

    monkeypatch.setitem(sys.modules, "quantkit.demo", None)     # as if the extra were missing
    monkeypatch.delattr(quantkit, "demo", raising=False)        # set if it was imported before
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert 'pip install "quantkit[demo]"' in out
    assert "wrote" in out and "total" in out
    row = next(line for line in out.splitlines() if line.startswith("int8 mse, per channel"))
    mean_cos = float(row.split()[-5])
    assert mean_cos > 0.99, row


# ------------------------------------------------------------------------------------ the script


def test_console_script_piped(checkpoint, tmp_path):
    """One real run of the installed command (or python -m quantkit), output piped."""
    script = shutil.which("quantkit")
    cmd = [script] if script else [sys.executable, "-m", "quantkit"]
    out = tmp_path / "int8.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd + ["quantize", str(checkpoint), "-o", str(out), "--method", "max"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "\r" not in proc.stdout + proc.stderr
    assert proc.stderr == ""
    _check_close(_tensors(), load(out))


def test_quantize_reports_the_files_sizes(tmp_path, capsys):
    """Many tiny tensors: each quantized one adds a scale and header entries, so the output can
    be the larger file; the summary says so from the files' sizes."""
    path = tmp_path / "small.safetensors"
    save_file({f"layers.{i}.w": torch.randn(2, 8) for i in range(300)}, str(path))
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x larger than the input's" in text and "smaller" not in text.split("wrote")[-1]
