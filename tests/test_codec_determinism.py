"""A cache is the same bytes whatever the ranks and the machine's thread count (issue 25): `inputs_klt` fits its basis
from the data, and LAPACK's eigh and inverse (MKL in torch, OpenBLAS in numpy) gave other last bits with other thread
counts; a torchrun rank (OMP_NUM_THREADS=1) wrote another `inputs_basis.safetensors` than one process. The other
codecs fit nothing: `teacher_qk.safetensors` is the teacher's weights as they are, and every shard field is a function
of its own record's capture."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Fits a basis in several thread counts and prints, per fit, the digests of the basis file and of the encoding matrix
# T (which decides every code). Features with a few outlier channels and a channel whose mean dwarfs its spread, as a
# ViT's norm1 output has; 520 tokens of D=192, where the fit used to differ between 1 and 2 threads.
FIT_SCRIPT = """
import hashlib, torch
from attncache.codecs.inputs_klt import basis_bytes, fit_basis
from attncache.teacher.projections import Projections
g = torch.Generator().manual_seed(0)
V, L, N, D, H = 8, 2, 65, 192, 3
x = torch.randn(V, L, N, D, generator=g) * (torch.rand(D, generator=g) + 0.1) + torch.randn(D, generator=g)
x[..., :3] *= 40
x[..., 3] += 50
w = torch.randn(L, 2 * D, D, generator=g) * D ** -0.5 * 4
b = torch.randn(L, 2 * D, generator=g) * 0.1
norm = torch.stack([torch.rand(L, D // H, generator=g) + 0.5, torch.randn(L, D // H, generator=g) * 0.1] * 2, 1)
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for layout in (None, norm):
        basis = fit_basis(x, Projections(w, b, layout, 1e-6, H))
        encode = basis.encode.numpy().tobytes()
        print(hashlib.sha256(basis_bytes(basis)).hexdigest(), hashlib.sha256(encode).hexdigest())
"""


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_basis_fit_is_the_same_bytes_whatever_the_thread_count():
    """torch.set_num_threads 1, 2 and 3 in-process, in a process with OMP_NUM_THREADS=1 (a torchrun rank; numpy's
    OpenBLAS starts with one thread) and one with 2: every fit, with and without qk-norm, is the same bytes."""
    procs = [subprocess.Popen([sys.executable, "-c", FIT_SCRIPT], env=_env(OMP_NUM_THREADS=str(n)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out.split("\n")[:-1])
    fits = [line.split() for out in outputs for line in out]
    assert len(fits) == 12
    for layout in (0, 1):  # lines alternate: without, with qk-norm
        digests = {tuple(f) for f in fits[layout::2]}
        assert len(digests) == 1, digests
    assert fits[0] != fits[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode_diff(a: bytes, b: bytes) -> float:
    from safetensors.torch import load

    ta, tb = load(a), load(b)
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
    """D=192 (3 heads of 64), where LAPACK's thread count shows in the basis; 17 tokens, 2 blocks."""
    from conftest import _save_teacher

    spec = dict(name="vit_tiny_patch16_224", image_size=32, args=dict(patch_size=8, depth=2, embed_dim=192,
                                                                        num_heads=3))
    return _save_teacher(spec, tmp_path_factory.mktemp("wide_teacher") / "wide.safetensors")


@pytest.mark.long
def test_inputs_klt_cache_is_the_same_bytes_in_one_process_one_thread_and_torchrun(tmp_path, wide_teacher,
                                                                                   image_folder):
    """One process (2 torch threads), one with OMP_NUM_THREADS=1, and torchrun with 2 ranks write the same basis,
    projections and shards, byte for byte."""
    from attncache.extract import extract

    single = tmp_path / "single"
    torch.set_num_threads(2)
    extract(wide_teacher.config(image_folder, single, views=2, codec="inputs_klt", records_per_shard=3))
    args = ["-m", "attncache", "extract", *wide_teacher.cli_args(), "--data", str(image_folder), "--views", "2",
            "--codec", "inputs_klt", "--shard-records", "3"]
    runs = {"omp1": [sys.executable, *args, "--out", str(tmp_path / "omp1")],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args,
                         "--out", str(tmp_path / "torchrun")]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _files(single)
    assert "inputs_basis.safetensors" in expected and any(k.startswith("z/") for k in expected)
    for name in runs:
        got = _files(tmp_path / name)
        assert got.keys() == expected.keys(), name
        basis = "inputs_basis.safetensors"
        if got[basis] != expected[basis]:
            print(f"{name}: basis max abs diff {_decode_diff(got[basis], expected[basis]):.3g}")
        differ = [k for k in expected if k != "manifest.json" and got[k] != expected[k]]
        assert not differ, (name, differ)
        ma, mb = json.loads(expected["manifest.json"]), json.loads(got["manifest.json"])
        for m in (ma, mb):
            m.pop("created_at"), m.pop("content_sha256")
        assert ma == mb, name
    print("basis sha256", hashlib.sha256(expected["inputs_basis.safetensors"]).hexdigest())
