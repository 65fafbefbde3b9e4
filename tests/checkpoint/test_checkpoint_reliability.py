"""Checkpoint reliability (issue 12): checksums verified on --load with one-line errors, durability
order, `latest` missing, disk full, changed setup on resume, --keep-last, file modes, no --save."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest

from test_resume import make_token_file, run_pretrain, sigterm_after_metrics, tiny_flags

from megaphi.checkpoint import integrity, layout, model_folder, resume_checks, training_state
from megaphi.checkpoint.layout import CheckpointError
from megaphi.training.arguments import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: ZeRO 0, a save every iteration, --keep-last 2, into a folder that holds a stale
    complete iter_0000003 without `latest` (refused without --start-over), with a temporary left by a
    killed save: overwritten, the stale metadata and the temporary removed."""
    tmp = tmp_path_factory.mktemp("ckrel")
    prefix = make_token_file(str(tmp / "toy"))
    save = str(tmp / "ck")
    os.makedirs(os.path.join(save, "iter_0000003"))
    with open(os.path.join(save, "iter_0000003", "megaphi_meta.json"), "w") as f:
        f.write('{"iteration": 3, "consumed_samples": 99, "consumed_tokens": 0}')
    with open(os.path.join(save, "iter_0000003", "megaphi_meta.json.tmp.99999"), "w") as f:
        f.write('{"iteration": 3')
    proc = run_pretrain(
        tiny_flags(prefix, ITERS)
        + ["--save", save, "--save-interval", "1", "--keep-last", "2", "--zero-stage", "0", "--start-over"]
    )
    assert f"--start-over: ignoring 1 checkpoint(s) in {save} without a 'latest' file" in proc.stdout
    return types.SimpleNamespace(prefix=prefix, save=save, stdout=proc.stdout, tmp=tmp)


def _copy(run, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(run.save, dst)
    return dst, os.path.join(dst, f"iter_{ITERS:07d}")


def _verify_error(load_dir):
    with pytest.raises(CheckpointError) as info:
        training_state.verify_checkpoint(load_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_save_records_checksums_fsyncs_prunes_and_modes(run):
    tag_dir = os.path.join(run.save, f"iter_{ITERS:07d}")
    meta = json.load(open(os.path.join(tag_dir, "megaphi_meta.json")))
    assert meta["checksum"] == "crc32"
    assert sorted(meta["files"]) == integrity.data_files(tag_dir, "megaphi_meta.json")
    assert {"mp_rank_00_model_states.pt", "rng_state_rank0.pt", "model/model.safetensors", "model/config.json"} <= set(
        meta["files"]
    )
    for rel, entry in meta["files"].items():
        assert (entry["size"], entry["crc32"]) == integrity.file_crc32(os.path.join(tag_dir, rel))
    assert training_state.verify_checkpoint(run.save)[0] == f"iter_{ITERS:07d}"
    # --keep-last 2: the oldest save is gone, the two newest stay
    assert layout.iteration_tags(run.save) == ["iter_0000002", "iter_0000003"]
    assert "--keep-last 2: deleted iter_0000001" in run.stdout
    # no temporaries inside a completed checkpoint, and the umask's modes (not mkstemp's 0600/0700)
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(run.save):
        assert not [f for f in files if ".tmp" in f], root
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o777 & ~mask
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o666 & ~mask, os.path.join(root, f)


def test_corrupted_files_are_one_line_errors(run, tmp_path):
    load, tag_dir = _copy(run, tmp_path)
    states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    with open(states, "r+b") as f:  # flip one byte in the middle
        f.seek(os.path.getsize(states) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    message = _verify_error(load)
    assert message.startswith(f"{states}: corrupted: crc32 ")
    assert message.endswith("was saved (the file changed after the save)")
    shutil.copyfile(os.path.join(run.save, f"iter_{ITERS:07d}", "mp_rank_00_model_states.pt"), states)

    weights = os.path.join(tag_dir, "model", "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    assert _verify_error(load) == f"{weights}: truncated: {size - 100} bytes, {size} were saved"
    shutil.copyfile(os.path.join(run.save, f"iter_{ITERS:07d}", "model", "model.safetensors"), weights)

    rng = os.path.join(tag_dir, "rng_state_rank0.pt")
    rng_size = os.path.getsize(rng)
    os.remove(rng)
    assert _verify_error(load) == f"{rng}: missing (the metadata lists it, {rng_size} bytes)"
    # --finetune --load verifies only what it reads (the exported model folder here)
    assert model_folder.finetune_weights_source(load) == ("folder", os.path.join(tag_dir, "model"))


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"\xff\xfe\x00\x81garbage", "latest: not a checkpoint tag (binary content"),
        (b"", "latest is empty"),
        (b"../../etc\n", "latest: not a checkpoint tag ('../../etc'"),
        (b"iter_0009999\n", "latest points to iter_0009999, but "),
    ],
)
def test_garbage_in_latest(run, tmp_path, content, expected):
    load, _ = _copy(run, tmp_path)
    with open(os.path.join(load, "latest"), "wb") as f:
        f.write(content)
    assert expected in _verify_error(load)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"\x00\xff\xfe", "corrupted (not UTF-8 text)"),
        (b'{"iteration": 3, "consum', "corrupted (not valid JSON: Unterminated string"),
        (b"[1, 2]", "corrupted (a JSON list, expected an object)"),
        (
            b'{"iteration": "3", "consumed_samples": 12, "consumed_tokens": 384}',
            "corrupted ('iteration' is '3', expected",
        ),
        (
            b'{"iteration": 3, "consumed_samples": 12, "consumed_tokens": 384, "files": [1]}',
            "corrupted ('files' is a list, expected an object)",
        ),
    ],
)
def test_garbage_in_metadata(run, tmp_path, content, expected):
    load, tag_dir = _copy(run, tmp_path)
    with open(os.path.join(tag_dir, "megaphi_meta.json"), "wb") as f:
        f.write(content)
    message = _verify_error(load)
    assert message.startswith(os.path.join(tag_dir, "megaphi_meta.json") + ": ") and expected in message


def test_load_of_a_corrupted_checkpoint_exits_1_with_one_line(run, tmp_path):
    load, tag_dir = _copy(run, tmp_path)
    states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    with open(states, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x80]))
    proc = run_pretrain(tiny_flags(run.prefix, ITERS + 1) + ["--load", load, "--zero-stage", "0"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"megaphi.pretrain: error: {states}: corrupted: crc32 ") and last.endswith(
        " was saved (the file changed after the save)"
    )


def test_latest_missing_with_iter_folders_is_refused(run, tmp_path):
    load, _ = _copy(run, tmp_path)
    os.remove(os.path.join(load, "latest"))
    with pytest.raises(
        CheckpointError,
        match=r"holds 2 checkpoint\(s\) \(iter_0000002 \.\. iter_0000003\) but no "
        r"'latest' file: restore it .* or pass --start-over",
    ):
        training_state.check_no_orphan_checkpoints(load, False, "--load")
    training_state.check_no_orphan_checkpoints(load, True, "--load")  # --start-over: allowed
    args = parse_args(tiny_flags(run.prefix, ITERS) + ["--load", load, "--save", load])
    with pytest.raises(CheckpointError, match="--load .* but no 'latest' file"):
        resume_checks.prepare_resume(args, say=lambda *_: None)


def test_keep_last_never_deletes_latest_or_best(tmp_path):
    for i in range(1, 6):
        os.makedirs(tmp_path / f"iter_{i:07d}")
    (tmp_path / "latest").write_text("iter_0000004\n")  # e.g. iter 5 is a save in progress
    (tmp_path / "best").write_text("iter_0000001\nval_loss 2.0\n")
    assert training_state.prune_checkpoints(str(tmp_path), 1) == ["iter_0000002", "iter_0000003"]
    assert layout.iteration_tags(str(tmp_path)) == ["iter_0000001", "iter_0000004", "iter_0000005"]


def _run_config(flags):
    from megaphi.training.arguments import parse_flags
    from megaphi.training.config import resolve_config

    return resolve_config(parse_flags(flags), world_size=1)


def _resume_args(run, *extra):
    """(the resolved flags, the checkpoint's metadata, the model config) of a run resuming run.save."""
    config = _run_config(tiny_flags(run.prefix, ITERS) + ["--load", run.save, *extra])
    verified = resume_checks.prepare_resume(config.flag_namespace(), say=lambda *_: None)
    return config.flag_namespace(), verified[1], config.phi_config()


def test_changed_setup_is_one_clear_line_or_adopted(run):
    args, meta, config = _resume_args(run, "--zero-stage", "1")
    with pytest.raises(
        CheckpointError,
        match=r"saved with ZeRO stage 0, this run uses stage 1; the optimizer state "
        r"does not carry across these stages: pass --no-load-optim .* or resume "
        r"with --zero-stage 0",
    ):
        resume_checks.check_resume_setup(args, meta, config, 1, run.save)
    args, meta, config = _resume_args(run, "--zero-stage", "1", "--bf16")
    with pytest.raises(CheckpointError, match=r"\(bf16 runs use ZeRO >= 1 for fp32 gradient accumulation\)"):
        resume_checks.check_resume_setup(args, meta, config, 1, run.save)
    args, meta, config = _resume_args(run, "--zero-stage", "1", "--no-load-optim")
    resume_checks.check_resume_setup(args, meta, config, 1, run.save)

    # a longer --train-iters moves --lr-decay-iters (its default): refused, or overridden, or adopted
    flags = tiny_flags(run.prefix, 6) + ["--load", run.save]
    args = parse_args(flags)
    meta = training_state.verify_checkpoint(run.save)[1]
    config = _run_config(flags).phi_config()
    with pytest.raises(
        CheckpointError,
        match=r"the lr schedule differs from the checkpoint's \(checkpoint vs run: "
        r"--lr-decay-iters 3 vs 6;",
    ):
        resume_checks.check_resume_setup(args, meta, config, 0, run.save)
    resume_checks.check_resume_setup(parse_args(flags + ["--override-opt_param-scheduler"]), meta, config, 0, run.save)
    args = _run_config(flags + ["--use-checkpoint-opt_param-scheduler"]).flag_namespace()
    assert args.lr_decay_iters == 3 and args.train_iters == 6
    resume_checks.check_resume_setup(args, meta, config, 0, run.save)

    # architecture: refused, or taken from the checkpoint
    args, meta, config = _resume_args(run, "--hidden-size", "128")
    # (the rotary dim follows the head dim, so it differs too)
    with pytest.raises(
        CheckpointError,
        match=r"architecture differs from this run \(checkpoint vs run: hidden_size 64 "
        r"vs 128; rotary_dim 16 vs 32\); pass the checkpoint's model flags or "
        r"--use-checkpoint-args",
    ):
        resume_checks.check_resume_setup(args, meta, config, 0, run.save)
    args, meta, config = _resume_args(run, "--hidden-size", "128", "--num-layers", "3", "--use-checkpoint-args")
    assert (args.hidden_size, args.num_layers, config.hidden_size) == (64, 2, 64)
    resume_checks.check_resume_setup(args, meta, config, 0, run.save)


def test_resharded_vocab_padding_is_kept():
    # TP 2 pads the 50295-token codegen vocabulary to 50432 rows; resumed at TP 1 (which alone pads to
    # 50304) the checkpoint's rows are kept, so its tensors fit
    meta = {"model_config": {"vocab_size": 50432}}
    assert resume_checks.resume_vocab_rows(meta, 50304, 50295, 1, 128) == 50432
    assert resume_checks.resume_vocab_rows(meta, 50304, None, 1, 128) == 50304  # --vocab-size: the flag's


def test_disk_full_is_reported_and_the_partial_save_removed(run, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        proc = run_pretrain(tiny_flags(run.prefix, 1) + ["--save", str(mnt), "--eval-iters", "0"], check=False)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"megaphi.pretrain: error: disk full (ENOSPC, No space left on device) while saving "
            f"{mnt}/iter_0000001; the partial checkpoint was removed, "
        )
        assert last.endswith(
            "free now; no checkpoint is complete yet ('latest' was never written); free space (or "
            "--keep-last N) and resume"
        )
        # the free space once the partial save is gone (was "0.0 MiB": measured while the failed writer
        # still held its deleted file open); the 1 MiB tmpfs then holds only metrics.jsonl and the lock
        free = last.split("the partial checkpoint was removed, ")[1].split(" free now")[0]
        assert free.endswith(" KiB") and int(free[:-4]) >= 512, last
        assert sorted(n for n in os.listdir(mnt) if not n.startswith(".")) == ["metrics.jsonl"]  # no iter_*, latest
    finally:
        subprocess.run(["umount", str(mnt)])


def test_disk_full_detection_and_discard(tmp_path):
    assert integrity.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    assert not integrity.is_disk_full(RuntimeError("basic_ios::clear: iostream error"), str(tmp_path))
    os.makedirs(tmp_path / "iter_0000001")
    os.makedirs(tmp_path / "iter_0000002")
    (tmp_path / "latest").write_text("iter_0000001\n")
    message = training_state._discard_partial_save(
        str(tmp_path), "iter_0000002", OSError(errno.ENOSPC, "No space left on device")
    )
    assert "the partial checkpoint was removed" in message and "'latest' still names iter_0000001" in message
    assert layout.iteration_tags(str(tmp_path)) == ["iter_0000001"]


def test_truncated_metrics_line_is_repaired_and_skipped_by_the_plotter(tmp_path, capsys):
    from megaphi.training.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    good = [{"iteration": 1, "loss": 5.0, "lr": 1e-3}, {"iteration": 2, "loss": 4.5, "lr": 1e-3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"iteration": 3, "lo')
    writer = MetricsWriter(str(tmp_path))
    writer.write({"iteration": 3, "loss": 4.0, "lr": 1e-3})
    writer.close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]

    from megaphi.cli import plot_metrics

    path.write_text(json.dumps(good[0]) + "\n" + '{"iteration": 2, "lo\n' + json.dumps(good[1]) + "\n")
    train, valid = plot_metrics.read_metrics(str(path))
    assert [r["iteration"] for r in train] == [1, 2] and valid == []
    assert f"warning: {path}:2: skipped, not JSON" in capsys.readouterr().err


def test_resume_across_zero_stages_without_save_and_sigterm(run, tmp_path):
    """A ZeRO-0 checkpoint resumed at ZeRO 1 with --no-load-optim; no --save: a warning at start, and
    SIGTERM does not claim a save."""
    load, tag_dir = _copy(run, tmp_path)
    before = open(os.path.join(tag_dir, "megaphi_meta.json")).read()
    log_dir = str(tmp_path / "logs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megaphi.pretrain",
            *tiny_flags(run.prefix, 100000),
            "--log-dir",
            log_dir,
            "--eval-iters",
            "0",
            "--load",
            load,
            "--zero-stage",
            "1",
            "--no-load-optim",
            "--lr-decay-iters",
            str(ITERS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = os.path.join(log_dir, "metrics.jsonl")
    stdout, stderr = sigterm_after_metrics(proc, metrics, lines=1)
    assert proc.returncode == 0, stderr[-3000:]
    assert "warning: no --save: this run saves no checkpoint" in stderr  # warnings go to stderr
    assert f"resumed from {load}/iter_{ITERS:07d} at iteration {ITERS}" in stdout
    assert json.loads(open(metrics).readline())["iteration"] == ITERS + 1
    assert layout.iteration_tags(load) == ["iter_0000002", "iter_0000003"]
    assert open(os.path.join(tag_dir, "megaphi_meta.json")).read() == before
    assert "received SIGTERM: nothing saved (no --save) at iteration" in stdout
    assert "saved at iteration" not in stdout and "saved checkpoint" not in stdout


def test_kill_9_inside_a_save_never_exposes_a_partial_checkpoint(run, tmp_path):
    """kill -9 as soon as a save is seen in progress (a tag folder `latest` does not name yet): `latest`
    names a checkpoint that verifies, no metadata vouches for partial data, and a resume re-saves the
    interrupted iteration cleanly (no temporaries left)."""
    save = str(tmp_path / "ck")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megaphi.pretrain",
            *tiny_flags(run.prefix, 1000),
            "--save",
            save,
            "--save-interval",
            "1",
            "--eval-iters",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            latest = os.path.join(save, "latest")
            tags = layout.iteration_tags(save)
            if os.path.exists(latest) and tags and tags[-1] != open(latest).read().strip():
                break  # a save after the first complete one is being written
            time.sleep(0.002)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    tag, meta = training_state.verify_checkpoint(save)
    assert meta["iteration"] == int(tag[len("iter_") :])
    for other in layout.iteration_tags(save):
        other_meta = os.path.join(save, other, "megaphi_meta.json")
        if os.path.exists(other_meta):  # complete: every listed file verifies
            integrity.verify_files(os.path.join(save, other), json.load(open(other_meta))["files"])
    resumed = run_pretrain(
        tiny_flags(run.prefix, 1000)
        + ["--load", save, "--save", save, "--eval-iters", "0", "--exit-interval", str(meta["iteration"] + 1)]
    )
    assert f"resumed from {save}/{tag} at iteration {meta['iteration']}" in resumed.stdout
    new_tag, new_meta = training_state.verify_checkpoint(save)
    assert new_meta["iteration"] == meta["iteration"] + 1
    assert not [f for _, _, files in os.walk(os.path.join(save, new_tag)) for f in files if ".tmp" in f]
