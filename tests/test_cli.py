"""The real CLI (typer app) end to end, and its error contract: exit code 2 and one `error: ...` line."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import typer
from attncache_cli.main import app
from attncache_cli.options import FROM_CONFIG
from conftest import make_image_folder
from typer.testing import CliRunner

from attncache import open_cache

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("cli") / "cache"
    result = _run("extract", *tiny_teacher.cli_args(), "--data", "demo:2", "--out", out, "--views", "2",
                  "--layers", "0", "--format", "wds", "--shard-records", "5", "--embed-images")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cli_cache):
    """A finished copy-mode run on `cli_cache` (its own val cache), without EMA weights."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = _run("train", "--mode", "copy", "--cache", cli_cache[0], "--val-cache", cli_cache[0], "--out", run,
                  "--epochs", "1", "--batch-size", "4", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    return run


def test_extract_inspect_verify(cli_cache, tiny_teacher):
    out, result = cli_cache
    assert result.stdout.strip() == f"wrote {out}: 16 records in 4 shards"

    inspect = _run("inspect", out, "--json")
    assert inspect.exit_code == 0, inspect.output
    summary = json.loads(inspect.stdout)
    assert summary["teacher"] == "vit_tiny_patch16_224"
    assert (summary["image_size"], summary["tokens"], summary["heads"], summary["layers"]) == (32, 17, 4, [0])
    assert (summary["samples"], summary["views_per_image"], summary["records"], summary["shards"]) == (8, 2, 16, 4)
    assert (summary["codec"], summary["store"], summary["payload"], summary["split"]) == ("fp16", "wds", "probs",
                                                                                          "train")
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["weights_sha256"] == manifest["teacher"]["weights_sha256"][:16]
    assert summary["shard_bytes"] == sum((out / f["path"]).stat().st_size
                                         for s in manifest["store"]["shards"] for f in s["files"])
    assert "ratio_vs_raw_fp16" not in summary  # images embedded: no compression ratio to report

    table = _run("inspect", out)
    assert table.exit_code == 0 and "vit_tiny_patch16_224" in table.stdout

    verify = _run("verify", out)
    assert verify.exit_code == 0, verify.output
    n_files = 4 + 4  # shards + the record tables (samples, keys, key index, views)
    assert verify.stdout.startswith(f"ok (full): {n_files} files, 16 records, 16 chunk checksums, ")

    # what the CLI wrote is what the API reads: one record replayed through the API
    cache = open_cache(str(out))
    assert cache.layers == [0] and cache[3].maps.shape == (1, 4, 17, 17)
    assert torch.allclose(cache[3].maps.sum(-1), torch.ones(1, 4, 17), atol=2e-3)


def test_cli_rerun_resumes_as_a_no_op(cli_cache, tiny_teacher):
    """Re-running the same command on a finished cache writes nothing. Regression (the old test compared the
    manifest's bytes only, whose timestamp has 1 s resolution, so a rewrite within the second went unnoticed):
    every file of the cache is dated an hour back first, and keeps its bytes, inode and mtime_ns."""
    out, _ = cli_cache
    past = time.time_ns() - 3600 * 10**9
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for p in files:
        os.utime(p, ns=(past, past))
    before = {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert (out / "manifest.json") in before
    again = _run("extract", *tiny_teacher.cli_args(), "--data", "demo:2", "--out", out, "--views", "2",
                 "--layers", "0", "--format", "wds", "--shard-records", "5", "--embed-images")
    assert again.exit_code == 0, again.output
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    after = {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert after == before, [str(p) for p in files if after[p] != before[p]]


def test_cli_verify_names_a_corrupt_shard(tmp_path, cli_cache):
    import shutil

    out = shutil.copytree(cli_cache[0], tmp_path / "copy")
    shard = out / "shards" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    result = _run("verify", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "shards/shard-000001.tar" in result.stderr
    assert result.stderr.count("\n") == 1


def _bad_cases(tmp_path, teacher, other_teacher):
    folder = make_image_folder(tmp_path / "imgs")
    (folder / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    other_cache = tmp_path / "other_cache"
    assert _run("extract", *other_teacher.cli_args(), "--data", "demo:1", "--out", other_cache,
                "--layers", "0").exit_code == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    base = teacher.cli_args()
    demo = ["--data", "demo:1"]
    fresh = ["--out", tmp_path / "fresh"]
    return [
        (["extract", *base, "--data", tmp_path / "missing", *fresh], str(tmp_path / "missing")),
        (["extract", *base, "--data", folder, *fresh], "bee/broken.jpg"),
        (["extract", "--teacher", "vit_imaginary", "--no-pretrained", *demo, *fresh],
         "unknown teacher 'vit_imaginary'"),
        ([*_swap(["extract", *base, *demo, *fresh], "--image-size", "30")], "image size 30"),
        (["extract", *base, *demo, "--out", other_cache, "--layers", "0"], "holds a different cache (teacher differs)"),
        (["extract", *base, *demo, "--out", busy], f"--out {busy}: not empty and holds no attncache cache"),
        (["extract", *base, *demo, *fresh, "--layers", "0-5"], "--layers '0-5'"),
        (["extract", *base, *demo, *fresh, "--codec", "zfp"], "unknown codec 'zfp'"),
        (["extract", *base, *demo, *fresh, "--embed-images"], "--embed-images needs --format wds"),
        (["extract", *base, *demo, *fresh, "--payload", "values"], "--payload 'values'"),
        (["extract", *base, *demo, *fresh, "--teacher-arg", "depth"], "--teacher-arg 'depth'"),
        ([*_swap(["extract", *base, *demo, *fresh], "--weights", not_sd)], f"--weights {not_sd}"),
        ([*_swap(["extract", *base, *demo, *fresh], "--weights", other_cache / "manifest.json")], "cannot read"),
        (["inspect", tmp_path / "imgs"], "not an attncache cache"),
        (["verify", tmp_path / "nowhere"], "not an attncache cache"),
    ]


def _swap(args, option, value):
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tiny_teacher, other_tiny_teacher):
    for args, culprit in _bad_cases(tmp_path, tiny_teacher, other_tiny_teacher):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.stderr.startswith("error: "), (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output
        assert culprit in result.stderr, (culprit, result.stderr)
        assert result.stdout == ""
    assert not (tmp_path / "fresh").exists()  # no error left a half-made cache behind


@pytest.mark.parametrize(("args", "culprit"), [
    (["train", "--mode", "distil", "--out", "x"], "Invalid value for '--mode': 'distil' is not one of"),
    (["extract", "--teacher", "demo"], "Missing option '--data'"),
    (["extract", "--teacher", "demo", "--data", "demo", "--out", "x", "--format", "npz"], "'npz'"),
    (["inspect"], "Missing argument 'cache'"),
    (["train", "--mode", "copy", "--out", "x", "--epochs", "ten"], "Invalid value for '--epochs'"),
    (["bench", "codecs", "--nope"], "No such option: --nope"),
])
def test_usage_errors_are_one_line(args, culprit):
    """Regression: typer's usage errors were 5-line boxes (`--mode distil`)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert culprit in result.stderr and "--help" in result.stderr and result.stdout == ""


def test_version_and_the_real_entry_point():
    import subprocess
    import sys

    import attncache

    assert runner.invoke(app, ["--version"]).stdout == f"attncache {attncache.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "attncache", "train", "--mode", "distil", "--out", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: Invalid value for '--mode'")


def test_train_and_eval_commands(cli_cache, tmp_path):
    """`attncache train` on a wds cache with embedded images (its own val cache), then `attncache eval`."""
    cache, _ = cli_cache
    run = tmp_path / "run"
    args = ["train", "--mode", "copy", "--cache", cache, "--val-cache", cache, "--out", run, "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--quiet"]
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    again = _run(*args)  # a finished run: its results again, as the short summary
    assert again.exit_code == 0 and again.stdout.splitlines()[0].startswith(
        f"copy: {trained['steps']} steps, 1 epochs; val top-1 {trained['val_top1']:.1f} %")
    assert f"in {run}: model.safetensors, results.json, metrics.jsonl" in again.stdout
    assert trained["mode"] == "copy" and trained["layers"] == [0] and trained["val_images"] == 8
    evaluated = _run("eval", "--checkpoint", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["student_top1"] == trained["val_top1"]
    summary = _run("eval", "--checkpoint", run)
    assert summary.exit_code == 0 and summary.stdout.splitlines() == [
        f"copy student (model.safetensors): top-1 {trained['val_top1']:.1f} % (loss {trained['val_loss']:.3f}, "
        f"{trained['val_images']} images)"]
    # errors: one line, exit code 2, nothing written
    bad = _run(*args[:-1], "--mixup", "0.8", "--quiet")
    assert bad.exit_code == 2 and "its views were drawn with other augmentation: mixup 0.0 (asked: 0.8)" in bad.stderr
    missing = _run("train", "--mode", "distill", "--data", "demo", "--out", tmp_path / "x", "--quiet")
    assert missing.exit_code == 2 and "needs teacher maps: pass --cache" in missing.stderr
    assert not (tmp_path / "x").exists()
    no_run = _run("eval", "--checkpoint", tmp_path)
    assert no_run.exit_code == 2 and "not an attncache training run" in no_run.stderr


def test_recipe_commands(tiny_teacher, tmp_path):
    """`extract --recipe` caches the recipe's views; `train --recipe` takes every preset it did not get typed."""
    cache = tmp_path / "cache"
    result = _run("extract", *tiny_teacher.cli_args(), "--data", "demo:2", "--out", cache, "--views", "2",
                  "--recipe", "at-distill", "--format", "wds", "--embed-images", "--codec", "fp32")
    assert result.exit_code == 0, result.output
    views = json.loads((cache / "manifest.json").read_text())["views"]
    assert views["augment"]["randaugment"] == "rand-m9-mstd0.5-inc1" and views["augment"]["cutmix"] == 1.0
    shown = _run("inspect", cache, "--views", "0:8")
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(lines) == 8 and any("mix" in v for v in lines) and any("augment" in v for v in lines)
    run = tmp_path / "run"
    result = _run("train", "--recipe", "at-distill", "--cache", cache, "--out", run, "--epochs", "1",
                  "--batch-size", "4", "--workers", "0", "--quiet", "--label-smoothing", "0.2")
    assert result.exit_code == 0, result.output
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["mode"] == "distill" and options["epochs"] == 1 and options["label_smoothing"] == 0.2  # typed
    assert options["lr"] == 1e-4 * 4 / 256 and options["beta2"] == 0.95 and options["drop_path"] == 0.2  # preset
    assert options["weight_decay"] == 0.3 and options["ema"] == 0.9999
    # a recipe's views against a cache without them: one line, before anything is written
    plain = _run("train", "--recipe", "at-copy", "--cache", cache, "--out", tmp_path / "x", "--randaugment", "none",
                 "--quiet")
    assert plain.exit_code == 2 and "randaugment 'rand-m9-mstd0.5-inc1' (asked: None)" in plain.stderr
    assert not (tmp_path / "x").exists()
    nothing = _run("train", "--cache", cache, "--out", tmp_path / "y", "--quiet")
    assert nothing.exit_code == 2 and "pass --mode" in nothing.stderr


def test_demo_end_to_end(tmp_path, monkeypatch):
    """`make demo` with one epoch per run, 2 seeds and 100 val images: teacher -> caches -> verify ->
    scratch/copy/distill students -> table (the full demo's figures: tests/test_demo_figures.py)."""
    monkeypatch.setattr("attncache.tools.demo.SEEDS", (0, 1))
    monkeypatch.setattr("attncache.tools.demo.VAL_PER_CLASS", 25)
    result = _run("demo", "--out", tmp_path / "demo", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "copy" in result.stdout and "distill" in result.stdout and "(verify: ok)" in result.stdout
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert saved["replay_max_abs_error"] < 1e-3 and saved["val_cache"]["records"] == 100
    for m in ("scratch", "copy", "distill"):  # the mean over the seeds, each seed's run in its own directory
        seeds = saved[f"student_{m}_val_top1_seeds"]
        assert len(seeds) == 2 and saved[f"student_{m}_val_top1"] == pytest.approx(sum(seeds) / 2)
        assert f"{saved[f'student_{m}_val_top1']:.1f} ± {saved[f'student_{m}_val_top1_std']:.1f}" in result.stdout
    assert (tmp_path / "demo" / "seed1" / "student_distill" / "model.safetensors").is_file()


def test_extract_with_codec_args_then_bench_codecs(tmp_path, tiny_teacher):
    """`--codec lowrank --codec-arg ...` ends up in the manifest; `bench codecs` measures the codecs it is given."""
    out = tmp_path / "lowrank"
    result = _run("extract", *tiny_teacher.cli_args(), "--data", "demo:2", "--out", out, "--codec", "lowrank",
                  "--codec-arg", "rank=4", "--codec-arg", "bits=6")
    assert result.exit_code == 0, result.output
    summary = json.loads(_run("inspect", out, "--json").stdout)
    assert (summary["codec"], summary["payload"], summary["decodes_to"]) == ("lowrank", "qk", "logits")
    assert json.loads((out / "manifest.json").read_text())["codec"]["params"] == {"bits": 6, "rank": 4}

    bench = _run("bench", "codecs", *tiny_teacher.cli_args()[:6], *sum((["--teacher-arg", f"{k}={v}"]
                 for k, v in tiny_teacher.args.items()), []), "--data", "demo:2", "--codec", "fp16",
                 "--codec", "sqrtq:bits=8", "--codec", "qk:bits=8", "--repeats", "1", "--json")
    assert bench.exit_code == 0, bench.output
    rows = {r["codec"]: r for r in json.loads(bench.stdout)["codecs"]}
    assert list(rows) == ["fp16", "sqrtq:bits=8", "qk:bits=8"]
    assert rows["sqrtq:bits=8"]["params"] == {"bits": 8}
    # qk stores 2·d = 32 numbers per token and head against N = 17 map entries: larger than fp16 maps here
    assert rows["qk:bits=8"]["ratio_vs_raw_fp16"] < rows["sqrtq:bits=8"]["ratio_vs_raw_fp16"]
    for r in rows.values():
        assert 0 <= r["kl_mean"] <= r["kl_p99"] + 1e-12 and r["kl_mean"] < 1e-3
        assert min(r["encode_MBps_per_core"], r["decode_MBps_per_core"], r["device_decode_MBps"]) > 0


def test_bench_codecs_refuses_unknown_codec_before_work():
    result = runner.invoke(app, ["bench", "codecs", "--codec", "zfp:level=3"])
    assert result.exit_code == 2 and "unknown codec 'zfp'" in result.output


# ---------------------------------------------------------------------------------------------------------------
# the CLI parses; the library owns the defaults and the checks


def _commands(cmd=None, path=("attncache",)):
    """(command path, click command) of every command of the app."""
    cmd = cmd or typer.main.get_command(app)
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _commands(sub, (*path, name)) if hasattr(sub, "commands") else [(" ".join((*path, name)), sub)]


COMMANDS = dict(_commands())
CONFIGURED = sorted(path for path, cmd in COMMANDS.items() if cmd.configs)


@pytest.mark.parametrize("path", CONFIGURED)
def test_every_option_default_is_its_config_fields(path):
    """An option named after a field of the command's configs (nested ones included: `--mixup` is
    `augment.mixup`, `--pretrained` is `teacher.pretrained`) defaults to that field's default: a default typed into
    the CLI that differs from the library's fails here."""
    cmd = COMMANDS[path]
    cmd.fill_defaults()
    defaults = cmd.field_defaults()
    checked = [p for p in cmd.params if p.name in defaults and not p.required]  # required: no default to differ
    def same(cli, config) -> bool:
        # a repeatable KEY=VALUE option (--student-arg) with none given is the field's empty mapping
        pairs_none_given = isinstance(cli, list | tuple) and isinstance(config, dict) and not cli and not config
        return cli == config or str(cli) == str(config) or pairs_none_given

    differ = {p.name: (p.default, defaults[p.name]) for p in checked if not same(p.default, defaults[p.name])}
    assert differ == {}, f"`{path}`: CLI default vs config default: {differ}"
    assert not [p.name for p in cmd.params if p.default is FROM_CONFIG]
    assert len(checked) >= {"attncache extract": 31, "attncache train": 40}.get(path, 5), [p.name for p in checked]


def test_config_defaults_reach_the_help():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if "--warmup-epochs" in line)
    assert "[default: 1.0]" in line


def test_the_command_tree_imports_no_config():
    """The defaults are filled in when a command runs: building the CLI (and `attncache --help`) stays light."""
    import subprocess
    import sys

    code = ("import sys, typer; from attncache_cli.main import app; typer.main.get_command(app); "
            "print(sorted(m for m in ('torch', 'attncache.train.config', 'attncache.extract.config') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_a_recipe_presets_options_both_commands_take():
    """`typed_only` drops the presets the user did not type, by their parameter source: each must be an option."""
    from attncache.recipes import AUGMENTATION_OPTIONS, RECIPES

    train_options = {p.name for p in COMMANDS["attncache train"].params}
    extract_options = {p.name for p in COMMANDS["attncache extract"].params}
    for recipe in RECIPES.values():
        assert recipe.presets <= train_options and AUGMENTATION_OPTIONS <= extract_options
        assert {"mode", "lr", "min_lr", "epochs", "mixup", "teacher_drop_path"} <= recipe.presets


@pytest.mark.parametrize(("args", "line"), [
    (["train", "--mode", "copy", "--epochs", "0"], "--epochs 0: must be >= 1"),
    (["train", "--mode", "copy", "--cache", "c", "--max-steps", "0"], "--max-steps 0: must be >= 1"),
    (["train", "--mode", "copy", "--weights", "w.pth"], "--weights without --teacher: --mode copy takes the "
                                                        "teacher's maps from --cache"),
    (["train", "--mode", "gta", "--cache", "c", "--no-pretrained"], "--mode gta starts from the teacher's "
                                                                    "weights: pass --weights (or turn --pretrained on"),
    (["train", "--data", "demo"], "pass --mode (copy, distill, gta, scratch, finetune) or --recipe"),
    (["train", "--mode", "copy", "--cache", "c", "--student-arg", "depth=2"],
     "--student-arg ['depth'] without --student: the default student is the teacher's architecture"),
    (["train", "--recipe", "at-copi"], "--recipe 'at-copi': expected one of ['at-copy', 'at-distill']"),
    (["extract", "--teacher", "demo", "--data", "demo", "--shard-records", "0"], "--shard-records 0: must be >= 1"),
    (["extract", "--teacher", "demo", "--data", "demo", "--num-shards", "2", "--shard-index", "2"],
     "--num-shards 2 --shard-index 2: expected"),
    (["extract", "--teacher", "demo", "--data", "demo", "--split", "val", "--mixup", "0.8"],
     "--split val draws timm's deterministic eval view"),
    # views/policy.py
    (["extract", "--teacher", "demo", "--data", "demo", "--erase-prob", "2"], "--erase-prob 2.0: expected 0..1"),
    (["extract", "--teacher", "demo", "--data", "demo", "--randaugment", "autoaug"],
     "--randaugment 'autoaug': expected a timm RandAugment string"),
    (["extract", "--teacher", "demo", "--data", "demo", "--split", "val", "--views", "2"],
     "--split val uses one deterministic view per image: drop --views"),
    (["train", "--mode", "copy", "--mix-switch", "1.5"], "--mix-switch 1.5: expected 0..1"),
    # sources
    (["extract", "--teacher", "demo", "--data", "demo:x"], "--data demo:x: expected demo or demo:N"),
    (["extract", "--teacher", "demo", "--data", "/nonexistent/s.tar"], "--data /nonexistent/s.tar: no such file"),
    # eval.py (device.py, and a source opened for --val-data)
    (["eval", "--checkpoint", "<run>", "--ema"], "<run>/ema.safetensors: no such weights (is the run finished?; "
                                                 "a run trained without --ema has no ema.safetensors)"),
    (["eval", "--checkpoint", "<run>", "--device", "cuda:99"], "--device cuda:99: "),
    (["eval", "--checkpoint", "<run>", "--val-data", "/nonexistent"],
     "--val-data /nonexistent: no such file or directory"),
    # tools/viz.py (and teacher/capture.py's layer lists, as heads)
    (["viz", "--image", "x.png"], "--image needs --teacher (and --weights, or hub weights)"),
    (["viz", "--cache", "<cache>", "--heads", "0-9"], "--heads '0-9': head indices must lie in 0..3"),
    (["viz", "--cache", "<cache>", "--layers", "1"], "--cache <cache>: holds layers [0], not [1]"),
    (["viz", "--cache", "<cache>", "--query", "9,9"], "--query '9,9': the patch grid is 4x4"),
])
def test_library_errors_are_printed_with_the_commands_flags(request, tmp_path, args, line):
    places = {"<cache>": lambda: request.getfixturevalue("cli_cache")[0],  # made only for the cases that use it
              "<run>": lambda: request.getfixturevalue("cli_run")}
    for place, made in places.items():
        if place in args:
            path = str(made())
            args, line = [path if a == place else a for a in args], line.replace(place, path)
    takes_out = "out" in {p.name for p in COMMANDS[f"attncache {args[0]}"].params}
    result = runner.invoke(app, [*args, *(["--out", str(tmp_path / "out")] if takes_out else [])])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"error: {line}"), result.stderr
    assert "`" not in result.stderr and not (tmp_path / "out").exists()


def test_library_errors_name_config_fields():
    """The same checks from Python: the message names the fields (in backticks), never a flag."""
    from attncache.errors import ConfigError
    from attncache.extract.config import ExtractConfig
    from attncache.extract.config import check_options as check_extract
    from attncache.recipes import train_config
    from attncache.teacher import TeacherOptions
    from attncache.train.config import check_options as check_train

    def error(check, cfg) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            check(cfg)
        assert "--" not in str(info.value)
        return info.value

    assert str(error(check_train, train_config(mode="copy", out="x", epochs=0))) == "`epochs` 0: must be >= 1"
    weights = error(check_train, train_config(mode="copy", out="x", teacher=TeacherOptions(weights="w.pth")))
    assert weights.options == ["teacher.weights", "teacher.name", "mode", "cache"]
    shards = error(check_extract, ExtractConfig(TeacherOptions("demo"), "demo", "x", records_per_shard=0))
    assert str(shards) == "`records_per_shard` 0: must be >= 1"
    with pytest.raises(ConfigError, match=r"^pass `mode` \(copy, distill, gta, scratch, finetune\) or `recipe`$"):
        train_config(out="x")


def test_every_option_a_library_error_names_is_a_flag():
    """Each option named in a library error's text (`name` in backticks) is an option of some command, so the CLI
    never prints a Python name: found in the source, in the literal parts of every `raise`."""
    import ast
    from pathlib import Path

    import attncache
    from attncache.errors import AttncacheError

    named = {}
    for path in sorted(Path(attncache.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for part in ast.walk(node.exc):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        for option in AttncacheError.OPTION.findall(part.value):
                            named.setdefault(option, path.name)
    assert {"drop_path", "records_per_shard", "teacher.weights", "teacher.name", "out", "recipe"} <= set(named)
    unspelled = {o: f for o, f in named.items() if not any(cmd.flag(o) for cmd in COMMANDS.values())}
    assert unspelled == {}


def test_command_spells_options_as_its_flags():
    train, extract, merge = (COMMANDS[f"attncache {c}"] for c in ("train", "extract", "merge"))
    spelled = {o: train.flag(o) for o in ("batch_size", "teacher.weights", "teacher.name", "teacher.pretrained",
                                          "augment.mixup", "val_cache", "progress")}
    assert spelled == {"batch_size": "--batch-size", "teacher.weights": "--weights", "teacher.name": "--teacher",
                       "teacher.pretrained": "--pretrained", "augment.mixup": "--mixup", "val_cache": "--val-cache",
                       "progress": None}
    assert (extract.flag("records_per_shard"), extract.flag("ignore_free_space")) == ("--shard-records",
                                                                                     "--ignore-free-space")
    assert merge.flag("cache") == "CACHE"  # an argument: its metavar


def test_world_env_reads_torchrun_variables_without_joining(monkeypatch):
    """The CLI's "rank 0 speaks for the job" asks `World.env()`, which never joins a process group."""
    import torch.distributed as dist

    from attncache.distributed import World

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.env() == World(2, 4, 1) and not World.env().is_main and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert World.env() == World() and World.env().is_main
