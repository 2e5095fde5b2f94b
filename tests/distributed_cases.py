"""Runs the ranks of a multi-process torch.distributed test: each rank a subprocess of ``worker``
on the gloo backend, bound to 127.0.0.1, with a time limit; every process is killed on the way out."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, mode: str, tmp_path, world: int = 1):
    """(JSON of rank 0's last stdout line, rank 0's stderr) after ``world`` ranks of
    ``python worker mode`` all exit 0."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), QK_TEST_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(worker), mode],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-3000:]
            outs.append((out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(outs[0][0].strip().splitlines()[-1]), outs[0][1]
