"""Hardening (issue 25): a full disk, a hostile nesting depth, and the order of extraction's input checks.

- A disk that fills up during extraction or training is one line naming the file and the bytes it needed; nothing
  partial is left and the same command, once there is room, resumes to the cache an uninterrupted run writes. Before
  the work, extraction refuses an `--out` clearly too small for its estimated cache (unless `--ignore-free-space`)
  and training one that cannot hold a checkpoint. Tested on a real tiny tmpfs where one can be mounted (root), and
  with ENOSPC injected into the writes (always).
- JSON nested 100,000 deep (a manifest) is a one-line error naming the file, not a RecursionError.
- `extract --data /nonexistent` names the data path before any teacher is built (no model hub is contacted).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from attncache_cli.main import app
from typer.testing import CliRunner

from attncache import CacheFormatError, open_cache
from attncache.errors import DiskFullError
from attncache.files import MAX_JSON_DEPTH, AppendLog, StrictJSONError, atomic_write_bytes, loads_strict

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _cli(args: list) -> tuple[int, str]:
    """(exit code, stderr) of the CLI run in this process (so that monkeypatches apply)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stderr


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, (code, stderr)
    assert len(stderr) < 600, stderr
    return stderr


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without its timing field."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in lines]


def _partials(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*.partial")]


def _same_cache(a: Path, b: Path) -> None:
    """Every file byte for byte; the manifests equal except when and by what they were written."""
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert not [k for k in fa if k != "manifest.json" and fa[k] != fb[k]]
    ma, mb = json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"])
    for m in (ma, mb):
        m.pop("created_at"), m.pop("content_sha256")
    assert ma == mb


def _enospc(monkeypatch, where: str) -> list[str]:
    """Every fsync of a file whose path contains `where` fails with ENOSPC (as on a full disk, or NFS at fsync);
    returns the paths it failed."""
    failed, fsync = [], os.fsync

    def full(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if where in path:
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    return failed


def _free_space(monkeypatch, free: int) -> None:
    """shutil.disk_usage reports `free` bytes free everywhere."""
    usage = shutil.disk_usage

    def fake(path):
        total, used, _ = usage(path)
        return shutil._ntuple_diskusage(total, used, free)

    monkeypatch.setattr(shutil, "disk_usage", fake)


class TinyFS:
    """A real tmpfs of a given size at `path` (mounting needs root); `resize` is a user freeing space."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def mount(self, size: str, options: str = "") -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
        self.mounted = True
        return self.path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        if self.mounted:
            gc.collect()  # an in-process CLI's exception frames may still hold a table reader open
            if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], check=True)
            self.mounted = False


@pytest.fixture
def tiny_fs(tmp_path):
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    fs = TinyFS(tmp_path / "tinyfs")
    yield fs
    fs.unmount()


def _extract_args(teacher, data: Path, out: Path, *extra) -> list:
    """The folder_fp16_zarr fixture's extraction (conftest), through the CLI."""
    return ["extract", *teacher.cli_args(), "--data", data, "--out", out, "--views", "2", "--codec", "fp16",
            "--shard-records", "5", *extra]


def _train_args(cache: Path, data: Path, out: Path) -> list:
    return ["train", "--mode", "distill", "--cache", cache, "--data", data, "--out", out, "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--quiet", "--lr", "1e-3"]


# ---------------------------------------------------------------------------------------------------------------
# 1. a full disk


def test_an_atomic_write_on_a_full_disk_names_the_file_and_its_bytes(tmp_path, monkeypatch):
    path = tmp_path / "d" / "file.bin"
    atomic_write_bytes(path, b"old")
    _enospc(monkeypatch, "file.bin")
    with pytest.raises(DiskFullError, match=rf"^{path}: no space left on device \(needed 12,345 bytes, [\d,]+ "
                                            "bytes free there\\); free some space") as info:
        atomic_write_bytes(path, b"x" * 12345)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"old" and _partials(tmp_path) == []


def test_a_metrics_line_on_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
    import attncache.files as files

    log = AppendLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1})

    class HalfWritten:  # the disk fills in the middle of the line
        def __init__(self, path, mode):
            self.f = open(path, mode)  # noqa: SIM115

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files, "open", HalfWritten, raising=False)
    with pytest.raises(DiskFullError, match=r"metrics.jsonl: no space left on device \(needed 13 bytes"):
        log.append({"step": 22})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n' and log.lines == 1


def test_extraction_stopped_by_a_full_disk_resumes_to_the_same_cache(tmp_path, monkeypatch, tiny_teacher,
                                                                      image_folder, folder_fp16_zarr):
    out = tmp_path / "cache"
    failed = _enospc(monkeypatch, "/maps/c/1/")  # the second shard's file finds the disk full
    err = _one_line_error(*_cli(_extract_args(tiny_teacher, image_folder, out)))
    assert failed and f"error: {out}/maps/c/1/0/0/0/0: no space left on device (needed " in err and "bytes" in err
    assert _partials(out) == [] and not (out / "manifest.json").exists()
    assert (out / ".progress/shard-000000.json").is_file()  # the first shard is kept
    monkeypatch.undo()  # space was freed
    code, stderr = _cli(_extract_args(tiny_teacher, image_folder, out))
    assert code == 0, stderr
    _same_cache(out, folder_fp16_zarr)


def _estimate(cache: Path, views_per_image: int = 2) -> tuple[int, float]:
    """What extraction estimates for the cache of folder_fp16_zarr's plan (with other views per image)."""
    from attncache.extract import estimated_bytes

    opened = open_cache(str(cache))
    shape = opened.teacher.capture_shape(len(opened.layers))
    return estimated_bytes(opened.codec, shape, opened.num_samples * views_per_image)


def test_the_estimate_is_the_measured_ratio_times_the_raw_bytes(folder_fp16_zarr):
    from attncache.tools.costs import measured_ratio_of

    total, per_view = _estimate(folder_fp16_zarr)
    opened = open_cache(str(folder_fp16_zarr))
    raw = opened.teacher.num_heads * len(opened.layers) * opened.teacher.num_tokens ** 2 * 2  # fp16 maps
    assert per_view == pytest.approx(raw * measured_ratio_of(opened.codec)) and total == int(per_view * 12)
    shards = sum(f["bytes"] for s in opened.manifest["store"]["shards"] for f in s["files"])
    assert 0.5 < shards / total < 1.0  # this random-init teacher's maps compress a little better: not refused


def test_extraction_refuses_an_out_clearly_too_small_unless_told(tmp_path, monkeypatch, tiny_teacher, image_folder,
                                                                   folder_fp16_zarr):
    out = tmp_path / "cache"
    total, per_view = _estimate(folder_fp16_zarr)
    _free_space(monkeypatch, 1000)
    err = _one_line_error(*_cli(_extract_args(tiny_teacher, image_folder, out)))
    assert err.startswith(f"error: {out}: the cache needs about {total:,} more bytes (12 records of "
                          f"~{per_view:,.0f} bytes), its filesystem has 1,000 free; "), err
    assert "--ignore-free-space" in err
    assert not out.exists()  # refused before the scan: nothing written
    code, stderr = _cli(_extract_args(tiny_teacher, image_folder, out, "--ignore-free-space"))
    assert code == 0, stderr
    _same_cache(out, folder_fp16_zarr)


def test_a_resumed_extraction_needs_room_only_for_the_rest(tmp_path, monkeypatch, tiny_teacher, image_folder,
                                                          folder_fp16_zarr):
    fresh, out = tmp_path / "fresh", tmp_path / "cache"
    _enospc(monkeypatch, "/maps/c/1/")
    _one_line_error(*_cli(_extract_args(tiny_teacher, image_folder, out)))  # stops after the first shard
    monkeypatch.undo()
    total, _ = _estimate(folder_fp16_zarr)
    written = sum(len(data) for data in _files(out).values())
    _free_space(monkeypatch, (total - written // 2) // 2)  # under half the whole cache, over half of the rest
    err = _one_line_error(*_cli(_extract_args(tiny_teacher, image_folder, fresh)))
    assert f"the cache needs about {total:,} more bytes" in err
    code, stderr = _cli(_extract_args(tiny_teacher, image_folder, out))
    assert code == 0, stderr
    _same_cache(out, folder_fp16_zarr)


def test_extraction_onto_a_real_full_filesystem(tiny_fs, tiny_teacher, image_folder, folder_fp16_zarr):
    out = tiny_fs.mount("48k") / "cache"  # room to start (the estimate fits), not for the whole cache
    err = _one_line_error(*_cli(_extract_args(tiny_teacher, image_folder, out)))
    assert f"error: {out}/" in err and "no space left on device (needed " in err, err
    assert _partials(out) == [] and not (out / "manifest.json").exists()
    tiny_fs.resize("10m")  # space freed
    code, stderr = _cli(_extract_args(tiny_teacher, image_folder, out))
    assert code == 0, stderr
    _same_cache(out, folder_fp16_zarr)


def test_extraction_preflight_on_a_real_small_filesystem(tiny_fs, tiny_teacher, image_folder, folder_fp16_zarr):
    out = tiny_fs.mount("64k") / "cache"
    args = [*_extract_args(tiny_teacher, image_folder, out), "--views", "8"]
    total, _ = _estimate(folder_fp16_zarr, views_per_image=8)
    assert total > 2 * 65536  # clearly too much for 64 kB
    err = _one_line_error(*_cli(args))
    assert f"error: {out}: the cache needs about {total:,} more bytes" in err and "65,536 free" in err, err
    assert not out.exists()
    err = _one_line_error(*_cli([*args, "--ignore-free-space"]))  # starts, and stops when the disk is full
    assert "no space left on device" in err and _partials(out) == []


def test_training_refuses_a_run_directory_without_room_for_a_checkpoint(tmp_path, monkeypatch, image_folder,
                                                                         folder_fp16_zarr):
    out, reference = tmp_path / "run", tmp_path / "reference"
    assert _cli(_train_args(folder_fp16_zarr, image_folder, reference))[0] == 0
    checkpoint = (reference / "checkpoints/last.pt").stat().st_size
    _free_space(monkeypatch, 5000)
    err = _one_line_error(*_cli(_train_args(folder_fp16_zarr, image_folder, out)))
    needed = int(re.search(r"a checkpoint of this run takes about ([\d,]+) bytes \(model, optimizer\), its "
                           r"filesystem has 5,000 free", err).group(1).replace(",", ""))
    assert err.startswith(f"error: {out}/checkpoints/last.pt: ") and 0.9 < needed / checkpoint <= 1.0, err
    assert not (out / "checkpoints").exists()


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, image_folder,
                                                                      folder_fp16_zarr):
    out = tmp_path / "run"
    failed = _enospc(monkeypatch, "last.pt")
    err = _one_line_error(*_cli(_train_args(folder_fp16_zarr, image_folder, out)))
    assert failed and re.match(rf"error: {out}/checkpoints/last.pt: no space left on device \(needed [\d,]+ bytes, ",
                               err), err
    assert _partials(out) == [] and not (out / "checkpoints/last.pt").exists()
    monkeypatch.undo()
    code, stderr = _cli(_train_args(folder_fp16_zarr, image_folder, out))
    assert code == 0 and (out / "results.json").is_file(), stderr


def test_training_onto_a_real_full_filesystem(tiny_fs, tmp_path, image_folder, folder_fp16_zarr):
    out = tiny_fs.mount("1600k") / "run"  # room for the checkpoint (~1.4 MB), not for the model beside it
    err = _one_line_error(*_cli(_train_args(folder_fp16_zarr, image_folder, out)))
    assert f"error: {out}/model.safetensors: no space left on device (needed " in err, err
    assert _partials(out) == [] and (out / "checkpoints/last.pt").is_file()
    tiny_fs.resize("10m")
    code, stderr = _cli(_train_args(folder_fp16_zarr, image_folder, out))  # resumes at the saved epoch end
    assert code == 0, stderr
    reference = tmp_path / "reference"
    assert _cli(_train_args(folder_fp16_zarr, image_folder, reference))[0] == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert _metrics(out) == _metrics(reference)


# ---------------------------------------------------------------------------------------------------------------
# 2. nesting depth


def test_loads_strict_bounds_the_nesting_depth():
    assert loads_strict("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    assert loads_strict(json.dumps({"a": "[{" * 10_000})) == {"a": "[{" * 10_000}  # brackets in a string
    for deep in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000, "[" * 100_000,
                 "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)):
        for data in (deep, deep.encode()):
            with pytest.raises(StrictJSONError, match=f"nested .* deep \\(at most {MAX_JSON_DEPTH}\\)"):
                loads_strict(data)


@pytest.fixture
def deep_manifest(wds_copy) -> Path:
    path = wds_copy / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"model_args": {', '"junk": ' + "[" * 100_000 + "]" * 100_000 + ', "model_args": {',
                                 1))
    return wds_copy


def test_a_deeply_nested_manifest_is_one_line(deep_manifest, tmp_path, image_folder):
    where = f"{deep_manifest}/manifest.json: arrays or objects nested 100002 deep (at most {MAX_JSON_DEPTH})"
    with pytest.raises(CacheFormatError) as info:
        open_cache(str(deep_manifest))
    assert str(info.value) == where
    for args in (["inspect", deep_manifest], ["verify", deep_manifest], ["verify", deep_manifest, "--quick"]):
        assert _one_line_error(*_cli(args)) == f"error: {where}\n"
    err = _one_line_error(*_cli(_train_args(deep_manifest, image_folder, tmp_path / "run")))
    assert err == f"error: --cache {where}\n"


# ---------------------------------------------------------------------------------------------------------------
# 3. extraction checks its cheap inputs before it builds a teacher


@pytest.fixture
def no_teacher(monkeypatch):
    """Fails the test if anything builds a teacher or probes the model hub."""
    import timm

    from attncache.teacher import hub, registry

    def forbidden(*a, **kw):
        raise AssertionError("a teacher was built, or the hub probed, before the bad input was named")

    for module, name in ((registry, "build_teacher"), (registry, "require_hub"), (hub, "reachable"),
                         (timm, "create_model")):
        monkeypatch.setattr(module, name, forbidden)


def test_a_missing_data_path_is_named_before_the_teacher(tmp_path, no_teacher):
    out = tmp_path / "out"
    err = _one_line_error(*_cli(["extract", "--data", "/nonexistent", "--teacher", "mae_vitl", "--out", out]))
    assert err == "error: --data /nonexistent: no such file or directory\n"
    assert not out.exists()


def test_an_out_that_cannot_be_created_is_named_before_the_teacher(tmp_path, no_teacher, image_folder):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "cache"
    err = _one_line_error(*_cli(["extract", "--data", image_folder, "--teacher", "mae_vitl", "--out", out]))
    assert err == f"error: --out {out}: cannot be created ({tmp_path / 'file'} is not a directory)\n"


def test_an_out_on_a_read_only_filesystem_is_named_before_the_teacher(tiny_fs, no_teacher, image_folder):
    out = tiny_fs.mount("64k", ",ro") / "cache"  # even root cannot write there
    err = _one_line_error(*_cli(["extract", "--data", image_folder, "--teacher", "mae_vitl", "--out", out]))
    assert err == (f"error: --out {out}: cannot be created (no write permission on {tiny_fs.path}, or a read-only "
                   "filesystem)\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")
def test_unreadable_data_and_unwritable_out_are_named_before_the_teacher(tmp_path, no_teacher, image_folder):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = _one_line_error(*_cli(["extract", "--data", image_folder, "--teacher", "mae_vitl", "--out",
                                 locked / "cache"]))
    assert f"--out {locked / 'cache'}: cannot be created (no write permission on {locked}" in err
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    data.chmod(0o000)
    try:
        err = _one_line_error(*_cli(["extract", "--data", data, "--teacher", "mae_vitl", "--out", tmp_path / "o"]))
        assert err == f"error: --data {data}: not readable (permission denied)\n"
    finally:
        data.chmod(0o700)
