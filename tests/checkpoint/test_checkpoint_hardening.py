"""Checkpoint hardening (issue 18): a killed first save never blocks a restart, the metadata carries
its own checksum and agrees with the tag and DeepSpeed's record, every file read is covered by the
checksums, every save failure is one line, and a resume that changes the data order is refused."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

from test_resume import make_token_file, run_pretrain, tiny_flags

from megaphi.checkpoint import layout, model_folder, resume_checks, training_state
from megaphi.training.arguments import parse_args
from megaphi.checkpoint.layout import CheckpointError

ITERS = 3
META = "megaphi_meta.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: ZeRO 0, one save at iteration 3 (12 samples consumed)."""
    tmp = tmp_path_factory.mktemp("harden")
    prefix = make_token_file(str(tmp / "toy"))
    save = str(tmp / "ck")
    run_pretrain(tiny_flags(prefix, ITERS) + ["--save", save, "--zero-stage", "0", "--eval-iters", "0"])
    return types.SimpleNamespace(prefix=prefix, save=save, tag=f"iter_{ITERS:07d}")


def _copy(run, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(run.save, dst)
    return dst, os.path.join(dst, run.tag)


def _one_line_error(call, *a, **kw):
    with pytest.raises(CheckpointError) as info:
        call(*a, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _flip_bit(path, needle, offset, bit):
    """Flip one bit of the byte `offset` bytes into the first occurrence of `needle`."""
    data = bytearray(open(path, "rb").read())
    at = data.index(needle) + offset
    data[at] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def _reseal(meta):
    """The documented seal, computed here independently: sha256 of the canonical JSON of every other key."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return {**body, "metadata_sha256": hashlib.sha256(canonical).hexdigest()}


def _rewrite_meta(tag_dir, change):
    path = os.path.join(tag_dir, META)
    meta = json.load(open(path))
    change(meta)
    open(path, "w").write(json.dumps(_reseal(meta), indent=2, sort_keys=True))
    return path


# ---- 1. an incomplete tag folder never counts as a checkpoint ----


def _killed_first_save(save, tag="iter_0000005"):
    """What kill -9 inside the first save leaves: DeepSpeed's file, the model export's temporary folder,
    no metadata, no `latest`."""
    tag_dir = os.path.join(save, tag)
    os.makedirs(os.path.join(tag_dir, "model.tmp"))
    torch.save({"module": {}}, os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    open(os.path.join(tag_dir, "model.tmp", "config.json"), "w").write("{")
    return tag_dir


def _prepare(prefix, *flags):
    """What a run of these flags resolves (reading --load's metadata) and then prepares before building
    the model: (verified checkpoint or None, the lines both said)."""
    from megaphi.training.arguments import parse_flags
    from megaphi.training.config import resolve_config

    config = resolve_config(parse_flags(tiny_flags(prefix, ITERS) + list(flags)), world_size=1)
    lines = list(config.logging.messages)
    verified = resume_checks.prepare_resume(config.flag_namespace(), say=lines.append)
    return verified, " | ".join(lines)


def test_incomplete_first_save_is_set_aside(run, tmp_path):
    save = str(tmp_path / "ck")
    tag_dir = _killed_first_save(save)
    verified, said = _prepare(run.prefix, "--save", save, "--load", save)
    assert verified is None
    assert not os.path.exists(tag_dir) and os.path.isdir(tag_dir + ".incomplete-1")
    assert (
        f"{tag_dir} is an incomplete checkpoint (no {META}: a save was interrupted); set aside as "
        f"{tag_dir}.incomplete-1"
    ) in said
    _killed_first_save(save)  # killed again: the next free name
    _prepare(run.prefix, "--save", save, "--load", save)
    assert sorted(os.listdir(save)) == ["iter_0000005.incomplete-1", "iter_0000005.incomplete-2"]


def test_incomplete_later_save_is_set_aside_and_the_complete_one_resumed(run, tmp_path):
    load, _ = _copy(run, tmp_path)
    tag_dir = _killed_first_save(load, "iter_0000006")
    verified, said = _prepare(run.prefix, "--save", load, "--load", load)
    assert verified[0] == run.tag and os.path.isdir(tag_dir + ".incomplete-1")
    # without `latest`: the refusal counts and names only the complete checkpoint
    os.remove(os.path.join(load, "latest"))
    _killed_first_save(load, "iter_0000006")
    message = _one_line_error(_prepare, run.prefix, "--save", load, "--load", load)
    assert f"holds 1 checkpoint(s) ({run.tag} .. {run.tag}) but no 'latest' file" in message
    assert f"echo {run.tag} >" in message


def test_incomplete_folder_in_a_load_only_folder_is_ignored_not_moved(run, tmp_path):
    load = str(tmp_path / "other")
    tag_dir = _killed_first_save(load)
    verified, said = _prepare(run.prefix, "--load", load)
    assert verified is None and os.path.isdir(tag_dir)  # another job may be writing it: left alone
    assert f"ignoring {tag_dir}: incomplete (no {META}; a save was interrupted or is in progress)" in said


def _popen_pretrain(flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "megaphi.pretrain", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_kill_9_during_the_first_save_then_the_same_command_restarts(run, tmp_path):
    """A restartable job (--save D --load D, --save-interval 5) killed inside its first save, as soon as
    the model export's temporary folder appears (DeepSpeed's and the RNG files written, no metadata: the
    state the issue reported). Where the kill lands after the save completed (a loaded machine), the
    folder is put back into the state a kill before the metadata leaves (metadata and `latest`
    removed), so the restart always meets an interrupted first save."""
    save = str(tmp_path / "ck")
    command = tiny_flags(run.prefix, 8) + ["--save", save, "--load", save, "--save-interval", "5", "--eval-iters", "0"]
    tag_dir = os.path.join(save, "iter_0000005")
    proc = _popen_pretrain(command)
    try:
        deadline = time.time() + 240
        while (
            time.time() < deadline
            and proc.poll() is None
            and not (os.path.isdir(os.path.join(tag_dir, "model.tmp")) or os.path.isdir(os.path.join(tag_dir, "model")))
        ):
            time.sleep(0.001)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if os.path.exists(os.path.join(save, "latest")):
        os.remove(os.path.join(save, "latest"))
    if os.path.exists(os.path.join(tag_dir, META)):
        os.remove(os.path.join(tag_dir, META))
    assert os.path.isdir(tag_dir)
    restarted = run_pretrain(command, check=False)
    assert restarted.returncode == 0, restarted.stdout[-2000:] + restarted.stderr[-2000:]
    assert (
        f"{tag_dir} is an incomplete checkpoint (no {META}: a save was interrupted); set aside as "
        f"{tag_dir}.incomplete-1" in restarted.stdout
    )
    assert "starting from scratch" in restarted.stdout
    tag, meta = training_state.verify_checkpoint(save)
    assert (tag, meta["iteration"]) == ("iter_0000008", 8)
    assert layout.iteration_tags(save) == ["iter_0000005", "iter_0000008"]


# ---- 2. the metadata's own checksum, cross-checked with the tag and DeepSpeed's record ----


def test_saved_metadata_is_sealed(run):
    meta = json.load(open(os.path.join(run.save, run.tag, META)))
    assert meta["format"] == "megaphi-train-v2"
    assert _reseal(meta)["metadata_sha256"] == meta["metadata_sha256"]


def test_the_seal_survives_the_json_round_trip():
    from megaphi.checkpoint import integrity

    # what json turns into something else: integer keys (which also sort differently as text), tuples
    meta = integrity.seal_metadata({"iteration": 1, "state": {10: "a", 9: "b"}, "shape": (2, 3)})
    back = json.loads(json.dumps(meta, indent=2, sort_keys=True))
    assert integrity.check_metadata_seal(back, "m") is True
    assert _reseal(back)["metadata_sha256"] == back["metadata_sha256"]


@pytest.mark.parametrize(
    "needle,offset,bit",
    [
        (b'"iteration": 3', 13, 2),  # 3 -> 7
        (b'"consumed_samples": 12', 20, 1),  # 12 -> 32
        (b'"consumed_tokens": 384', 19, 0),  # 384 -> 284 ... a silent shift of the data position
        (b'"metadata_sha256": "', 20, 0),  # the seal itself
    ],
)
def test_one_flipped_bit_in_the_metadata_is_refused(run, tmp_path, needle, offset, bit):
    load, tag_dir = _copy(run, tmp_path)
    path = os.path.join(tag_dir, META)
    _flip_bit(path, needle, offset, bit)
    message = _one_line_error(training_state.verify_checkpoint, load)
    assert message == (
        f"{path}: corrupted: its own sha256 does not match its content (the metadata changed after the save)"
    )


def test_a_flipped_bit_in_the_seal_key_is_refused(run, tmp_path):
    load, tag_dir = _copy(run, tmp_path)
    path = os.path.join(tag_dir, META)
    _flip_bit(path, b'"metadata_sha256"', 1, 0)  # the key becomes "letadata_sha256"
    message = _one_line_error(training_state.verify_checkpoint, load)
    assert message == f"{path}: corrupted: no 'metadata_sha256' entry (a megaphi-train-v2 metadata has one)"


def test_consistent_but_wrong_metadata_disagrees_with_the_tag_and_deepspeed(run, tmp_path):
    load, tag_dir = _copy(run, tmp_path)
    path = _rewrite_meta(tag_dir, lambda m: m.update(iteration=7))
    message = _one_line_error(training_state.verify_checkpoint, load)
    assert message == f"{path}: iteration 7 does not match its folder {run.tag}"

    _rewrite_meta(tag_dir, lambda m: m.update(iteration=3, consumed_samples=16))
    states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    message = _one_line_error(training_state.verify_checkpoint, load)
    assert message == (
        f"{path}: consumed_samples 16 disagrees with DeepSpeed's record in {states} (12); "
        f"the metadata is damaged or belongs to another save"
    )


def test_metadata_of_an_older_megaphi_loads_with_a_warning(run, tmp_path, capsys):
    load, tag_dir = _copy(run, tmp_path)
    path = os.path.join(tag_dir, META)
    meta = json.load(open(path))
    del meta["metadata_sha256"]
    meta["format"] = "megaphi-train-v1"
    open(path, "w").write(json.dumps(meta))
    assert training_state.verify_checkpoint(load)[1]["iteration"] == ITERS
    assert f"warning: {path} has no checksum of its own (saved by an older megaphi)" in capsys.readouterr().err


# ---- 3. every file the loader reads is covered by the checksums ----


def test_an_empty_file_list_with_a_flipped_weight_is_refused(run, tmp_path):
    load, tag_dir = _copy(run, tmp_path)
    _rewrite_meta(tag_dir, lambda m: m.update(files={}))
    states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    _flip_bit(states, b"PK", 100, 3)
    message = _one_line_error(training_state.verify_checkpoint, load)
    assert message == (
        f"{tag_dir}/model/config.json: not covered by the checksums in {tag_dir}/{META} (the folder "
        f"changed after the save, or the metadata is damaged; 4 more files are not covered either)"
    )


def test_every_file_read_must_be_listed(run, tmp_path):
    load, tag_dir = _copy(run, tmp_path)
    meta_path = _rewrite_meta(tag_dir, lambda m: m["files"].pop("rng_state_rank0.pt"))
    message = _one_line_error(training_state.verify_checkpoint, load)
    assert message == (
        f"{tag_dir}/rng_state_rank0.pt: not covered by the checksums in {meta_path} (the folder "
        f"changed after the save, or the metadata is damaged)"
    )
    _rewrite_meta(
        tag_dir,
        lambda m: m["files"].update(
            {
                "rng_state_rank0.pt": json.load(open(os.path.join(run.save, run.tag, META)))["files"][
                    "rng_state_rank0.pt"
                ]
            }
        ),
    )
    assert training_state.verify_checkpoint(load)[0] == run.tag
    # a file added to the folder after the save (DeepSpeed would read a second optimizer partition)
    extra = os.path.join(tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shutil.copyfile(os.path.join(tag_dir, "rng_state_rank0.pt"), extra)
    assert _one_line_error(training_state.verify_checkpoint, load).startswith(f"{extra}: not covered by the checksums")
    os.remove(extra)
    # --finetune reads the exported model folder: it must be covered too
    _rewrite_meta(tag_dir, lambda m: m["files"].pop("model/model.safetensors"))
    message = _one_line_error(model_folder.finetune_weights_source, load)
    assert message.startswith(f"{tag_dir}/model/model.safetensors: not covered by the checksums")


# ---- 4. every save failure: one line, partial save removed, `latest` untouched ----


class _FakeEngine:
    """Writes what DeepSpeed writes first (the module-states file, through torch.save); `fail` injects."""

    def __init__(self, fail=None):
        self.module = types.SimpleNamespace(config=None, save_pretrained=self._export)
        self.fail = fail or {}

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        if "deepspeed" in self.fail:
            raise self.fail["deepspeed"]
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"module": {}, **client_state}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def _export(self, folder, eos_token_id=None):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "model.safetensors"), "wb").write(b"x" * 100)
        if "export" in self.fail:
            raise self.fail["export"]


def _save(engine, save, iteration, prefix, export=True):
    args = parse_args(tiny_flags(prefix, 10) + ["--save", save])
    return training_state.save_checkpoint(
        engine, save, iteration, 4 * iteration, 128 * iteration, args, export_model=export
    )


def _no_space_here(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    "where,error,cause",
    [
        ("deepspeed", OSError(errno.EIO, "Input/output error"), "EIO, Input/output error"),
        (
            "deepspeed",
            RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                "file data/0: file write failed\nmore"
            ),
            "RuntimeError: [enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
            "file write failed",
        ),
        (
            "export",
            PermissionError(errno.EACCES, "Permission denied", "x/model.tmp/model.safetensors"),
            "EACCES, Permission denied: x/model.tmp/model.safetensors",
        ),
        ("meta", OSError(errno.EROFS, "Read-only file system"), "EROFS, Read-only file system"),
        ("latest", OSError(errno.EIO, "Input/output error"), "EIO, Input/output error"),
    ],
)
def test_every_save_failure_is_one_line_and_leaves_latest(run, tmp_path, monkeypatch, where, error, cause):
    save = str(tmp_path / "ck")
    assert _save(_FakeEngine(), save, 1, run.prefix) == "iter_0000001"
    engine = _FakeEngine({where: error})
    if where in ("meta", "latest"):
        real = training_state.write_text_atomic
        target = META if where == "meta" else "latest"

        def failing(path, text):
            if os.path.basename(path) == target:
                raise error
            return real(path, text)

        monkeypatch.setattr(training_state, "write_text_atomic", failing)
    tag_dir = os.path.join(save, "iter_0000002")
    message = _one_line_error(_save, engine, save, 2, run.prefix)
    assert message == (
        f"saving {tag_dir} failed ({cause}); the partial checkpoint was removed; 'latest' still names iter_0000001"
    )
    assert open(os.path.join(save, "latest")).read() == "iter_0000001\n"
    assert layout.iteration_tags(save) == ["iter_0000001"]
    assert training_state.verify_checkpoint(save)[0] == "iter_0000001"


def test_a_file_where_the_tag_folder_should_be_is_left_alone(run, tmp_path):
    save = str(tmp_path / "ck")
    os.makedirs(save)
    in_the_way = os.path.join(save, "iter_0000001")
    open(in_the_way, "w").write("not a checkpoint")
    message = _one_line_error(_save, _FakeEngine(), save, 1, run.prefix)
    assert message == (
        f"saving {in_the_way} failed ({in_the_way} is a file, not a folder: move it away and "
        f"resume); nothing was removed; no checkpoint is complete yet ('latest' was never written)"
    )
    assert open(in_the_way).read() == "not a checkpoint" and not os.path.exists(os.path.join(save, "latest"))


def test_a_partial_save_that_cannot_be_removed_says_so(run, tmp_path, monkeypatch):
    save = str(tmp_path / "ck")
    monkeypatch.setattr(training_state.shutil, "rmtree", lambda *a, **kw: None)  # e.g. a read-only remount
    message = _one_line_error(
        _save, _FakeEngine({"export": OSError(errno.EROFS, "Read-only file system")}), save, 1, run.prefix
    )
    assert f"the partial checkpoint {save}/iter_0000001 could not be removed" in message


def test_a_lost_rank_during_a_save_is_left_to_the_trainer(run, tmp_path):
    """gloo's error in a survivor is the trainer's to report (naming the lost rank), not a failed save."""
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    with pytest.raises(RuntimeError) as info:
        _save(_FakeEngine({"deepspeed": lost}), str(tmp_path / "ck"), 1, run.prefix)
    assert info.value is lost


def test_a_file_in_the_way_of_a_real_run_is_one_line(run, tmp_path):
    save = str(tmp_path / "ck")
    os.makedirs(save)
    in_the_way = os.path.join(save, "iter_0000001")
    open(in_the_way, "w").write("")
    proc = run_pretrain(tiny_flags(run.prefix, 1) + ["--save", save, "--eval-iters", "0"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megaphi.pretrain: error: saving {in_the_way} failed ({in_the_way} is a file, not a folder: move it away "
        f"and resume); nothing was removed; no checkpoint is complete yet ('latest' was never written)"
    )


def test_disk_full_message_gives_free_space_in_readable_units(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "iter_0000002")
    monkeypatch.setattr(training_state.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=40 * 1024))
    message = training_state._discard_partial_save(
        str(tmp_path), "iter_0000002", OSError(errno.ENOSPC, "No space left on device")
    )
    assert message == (
        f"disk full (ENOSPC, No space left on device) while saving {tmp_path}/iter_0000002; the "
        f"partial checkpoint was removed, 40 KiB free now; no checkpoint is complete yet ('latest' "
        f"was never written); free space (or --keep-last N) and resume"
    )


# ---- 6. a resume that changes the data order; three messages ----


@pytest.mark.parametrize(
    "flags,diff",
    [
        (["--seed", "7"], "--seed 1234 vs 7"),
        (["--seq-length", "16"], "--seq-length 32 vs 16"),
        (["--global-batch-size", "8"], "--global-batch-size 4 vs 8"),
    ],
)
def test_a_changed_data_order_is_refused_or_overridden(run, flags, diff):
    message = _one_line_error(_prepare, run.prefix, "--load", run.save, *flags)
    assert message == (
        f"--load {run.save}/{run.tag}: the data order differs from the checkpoint's (checkpoint vs "
        f"run: {diff}): it changes which samples are read after iteration {ITERS} (the data "
        f"position is kept as 12 consumed samples); pass the checkpoint's values, or "
        f"--override-data-order to continue with the new ones"
    )
    verified, said = _prepare(run.prefix, "--load", run.save, *flags, "--override-data-order")
    assert verified[0] == run.tag
    assert f"--override-data-order: continuing with the new data order (checkpoint vs run: {diff})" in said


def test_latest_that_is_a_directory(run, tmp_path):
    load, _ = _copy(run, tmp_path)
    os.remove(os.path.join(load, "latest"))
    os.makedirs(os.path.join(load, "latest"))
    message = _one_line_error(_prepare, run.prefix, "--load", load, "--save", load)
    assert message == (
        f"{load}/latest is a directory; it should be a file holding one tag like iter_0000100 "
        f"(the newest complete checkpoint here is {run.tag}): move the directory away"
    )
    # in a --save folder with no checkpoint yet: refused at start, not at the first save
    save = str(tmp_path / "fresh")
    os.makedirs(os.path.join(save, "latest"))
    message = _one_line_error(_prepare, run.prefix, "--save", save)
    assert message == (
        f"{save}/latest is a directory; it should be a file holding one tag like iter_0000100 "
        f"(there is no complete checkpoint here): move the directory away"
    )


def test_save_or_load_that_is_a_regular_file(run, tmp_path):
    from megaphi.checkpoint import lock

    path = str(tmp_path / "a_file")
    open(path, "w").write("")
    with pytest.raises(lock.SaveFolderError) as info:
        lock.acquire(path)  # the first thing a run does with --save
    assert str(info.value) == f"--save {path} is a file, not a folder: give a folder (created if absent)"
    message = _one_line_error(_prepare, run.prefix, "--load", path)
    assert message == f"--load {path} is a file, not a checkpoint folder"
