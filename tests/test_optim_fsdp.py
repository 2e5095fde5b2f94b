"""AdamW8bit under FSDP2 (fully_shard, DTensor parameters): 2 processes on CPU with gloo, bound to
127.0.0.1, give exactly the losses of one process, also across a save/load of the state.
Marked slow (about a minute): `.ci/run` runs them."""

from pathlib import Path

import pytest

from distributed_cases import run_ranks

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("optim_fsdp_worker.py")


def run(mode, tmp_path, world=1):
    return run_ranks(WORKER, mode, tmp_path, world)


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    single, _ = run("single", tmp_path)
    sharded, shapes = run("sharded", tmp_path, world=2)
    assert sharded == single  # exactly, every step
    assert "[3, 300]" in shapes  # the 5-row weight is split 3 + 2


@pytest.mark.slow
def test_fsdp2_resume_from_saved_state(tmp_path):
    single, _ = run("single", tmp_path)
    resumed, _ = run("resume", tmp_path, world=2)
    assert resumed == single
    assert sorted(f.name for f in tmp_path.glob("optim-rank*.safetensors")) == [
        "optim-rank0.safetensors", "optim-rank1.safetensors"]


@pytest.mark.slow
def test_fsdp2_resume_through_distributed_checkpoint(tmp_path):
    """dcp.save of sharded_state_dict() after 3 steps, a fresh optimizer, dcp.load, 2 more steps:
    the losses of one process that never stopped, exactly."""
    single, _ = run("single", tmp_path)
    resumed, _ = run("dcp", tmp_path, world=2)
    assert resumed == single
    assert (tmp_path / "dcp" / ".metadata").is_file()
