"""The model store (Chapter 12): versions, aliases, checksums, and publishes that crash."""

import fcntl
import hashlib
import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from aimodels.checkpoint import CONFIG, MANIFEST, WEIGHTS, IntegrityError
from aimodels.serving import store as store_module
from aimodels.serving.models import DigitsClassifier, Servable, digits_config
from aimodels.serving.store import PAUSE_ENV, ModelNotFoundError, ModelStore, StoredModel

REPO = Path(__file__).resolve().parents[1]
CONFIG_DICT = {"architecture": "toy", "width": 3}


def tensors(seed: int = 0, size: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(size, generator=generator), "b": torch.arange(3)}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- subprocesses

PUBLISHER = """
import sys, time, torch
from pathlib import Path
from aimodels.serving.store import ModelStore
root, name, worker, count, size, go = sys.argv[1:7]
while go != "-" and not Path(go).exists():
    time.sleep(0.005)
store = ModelStore(root)
for i in range(int(count)):
    value = torch.full((int(size),), float(worker) * 1000 + i)
    version = store.publish(name, {"w": value}, {"worker": int(worker), "i": i})
    print(version, flush=True)
"""

LOCK_HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "a") as file:
    fcntl.flock(file.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
"""


def spawn(code: str, *args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=10)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------- layout and manifest


def test_publish_writes_a_checkpoint_folder_with_a_full_manifest(store: ModelStore):
    before = datetime.now(timezone.utc)
    version = store.publish("toy", tensors(), CONFIG_DICT, metrics={"accuracy": 0.93, "n": 360})
    assert version == 1
    folder = store.root / "toy" / "1"
    assert store.path("toy", 1) == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, CONFIG, MANIFEST])
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in (WEIGHTS, CONFIG):
        data = (folder / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                           "bytes": len(data)}
    meta = manifest["metadata"]
    created = datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= datetime.now(timezone.utc)
    assert meta["torch"] == torch.__version__ and meta["numpy"] == np.__version__
    assert meta["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["aimodels"] == importlib.metadata.version("aimodels")
    assert json.loads(meta["metrics"]) == {"accuracy": 0.93, "n": 360.0}
    assert store.models() == ["toy"] and hidden(store.root / "toy") == [".lock"]


def test_load_returns_the_published_version(store: ModelStore):
    store.publish("toy", tensors(0), CONFIG_DICT, metrics={"accuracy": 0.5})
    store.publish("toy", tensors(1), {**CONFIG_DICT, "width": 4}, aliases=["production"])
    loaded = store.load("toy")  # "production" by default
    assert isinstance(loaded, StoredModel)
    assert (loaded.name, loaded.version, loaded.metrics) == ("toy", 2, {})
    assert loaded.config == {**CONFIG_DICT, "width": 4}
    assert torch.equal(loaded.tensors["w"], tensors(1)["w"])
    first = store.load("toy", 1)
    assert torch.equal(first.tensors["w"], tensors(0)["w"]) and first.metrics == {"accuracy": 0.5}
    assert first.created == first.manifest["metadata"]["created"]


def test_servable_from_store_predicts(store: ModelStore):
    model = DigitsClassifier(hidden=8)
    store.publish("digits", model.state_dict(), digits_config(hidden=8), aliases=["production"])
    servable = Servable.from_store(store, "digits")
    out = servable.predict({"input": np.zeros((2, 64), np.float32)})
    assert servable.version == 1 and out["probabilities"].shape == (2, 10)


def test_extra_files_and_metric_validation(store: ModelStore):
    store.publish("toy", tensors(), CONFIG_DICT, extra_files={"card.md": "# toy"})
    assert "card.md" in store.info("toy", 1)["files"]
    for metrics in ({"loss": float("nan")}, {"loss": "low"}, {3: 1.0}, {"ok": True}):
        with pytest.raises(ValueError, match="metrics must map str to finite numbers"):
            store.publish("toy", tensors(), CONFIG_DICT, metrics=metrics)
    assert store.versions("toy") == [1]


# --------------------------------------------------------------------------- versions and refs


def test_incomplete_or_odd_folders_are_not_versions_and_are_never_overwritten(store: ModelStore):
    store.publish("toy", tensors(0), CONFIG_DICT)
    folder = store.root / "toy"
    for odd in ("2", "03", ".staging-x", "notes"):  # "2" is empty: no manifest
        (folder / odd).mkdir()
    assert store.versions("toy") == [1]
    assert store.resolve("toy", "latest") == 1
    assert store.publish("toy", tensors(1), CONFIG_DICT) == 3  # not renamed onto empty "2"
    assert list((folder / "2").iterdir()) == []
    assert store.versions("toy") == [1, 3]


def test_the_number_is_chosen_and_the_folder_renamed_under_the_lock(store, monkeypatch):
    store.publish("toy", tensors(0), CONFIG_DICT)
    lock = store.root / "toy" / ".lock"
    seen: list[tuple[str, bool]] = []

    def locked_by_someone() -> bool:
        with open(lock) as file:  # a second open file: conflicts with the store's own flock
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    real_next, real_rename = ModelStore._next_version, os.rename

    def next_version(self, name):
        seen.append(("choose", locked_by_someone()))
        return real_next(self, name)

    def rename(src, dst):
        if Path(dst).parent == store.root / "toy":
            seen.append((f"rename to {Path(dst).name}", locked_by_someone()))
        return real_rename(src, dst)

    monkeypatch.setattr(ModelStore, "_next_version", next_version)
    monkeypatch.setattr(store_module.os, "rename", rename)
    assert not locked_by_someone()
    assert store.publish("toy", tensors(1), CONFIG_DICT) == 2
    assert seen == [("choose", True), ("rename to 2", True)]


def test_versions_count_up_and_deleted_numbers_are_not_reused(store: ModelStore):
    assert [store.publish("toy", tensors(i), CONFIG_DICT) for i in range(3)] == [1, 2, 3]
    store.delete("toy", 3)
    assert store.versions("toy") == [1, 2]
    assert store.publish("toy", tensors(9), CONFIG_DICT) == 4  # 3 meant other weights
    assert store.versions("toy") == [1, 2, 4]


def test_resolve_accepts_ints_digit_strings_latest_and_aliases(store: ModelStore):
    for i in range(3):
        store.publish("toy", tensors(i), CONFIG_DICT)
    store.set_alias("toy", "production", 2)
    assert store.resolve("toy", 1) == 1
    assert store.resolve("toy", "3") == 3
    assert store.resolve("toy", "latest") == 3
    assert store.resolve("toy", "production") == 2
    assert store.path("toy", "production") == store.root / "toy" / "2"
    for ref in (7, "7", "canary", True, 2.0, "٢"):
        with pytest.raises(ModelNotFoundError) as info:
            store.resolve("toy", ref)
        assert "versions: [1, 2, 3]" in str(info.value)
        assert "'production': 2" in str(info.value)


def test_unknown_model_error_lists_the_models(store: ModelStore):
    store.publish("alpha", tensors(), CONFIG_DICT)
    store.publish("beta", tensors(), CONFIG_DICT)
    for call in (lambda: store.load("gamma", 1), lambda: store.versions("gamma"),
                 lambda: store.aliases("gamma"), lambda: store.info("gamma", 1),
                 lambda: store.set_alias("gamma", "production", 1)):
        with pytest.raises(ModelNotFoundError, match=r"no model 'gamma'.*\['alpha', 'beta'\]"):
            call()
    assert issubclass(ModelNotFoundError, LookupError)
    assert not (store.root / "gamma").exists()


BAD_NAMES = ["../x", "a/b", "..", "", ".hidden", "with space", "x" * 65, "a\0b", "a..b",
             "trailing\n", "-dash", 3, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_model_names_are_refused_with_the_rule(store: ModelStore, name):
    with pytest.raises(ValueError, match="expected 1-64 characters from A-Z a-z 0-9"):
        store.publish(name, tensors(), CONFIG_DICT)
    with pytest.raises(ValueError, match="invalid model name"):
        store.load(name, 1)
    assert list(store.root.iterdir()) == []
    assert not (store.root.parent / "x").exists()


def test_good_model_names_are_accepted(store: ModelStore):
    for name in ("digits", "gpt-2.small_v1", "x" * 64, "7"):
        assert store.publish(name, tensors(), CONFIG_DICT) == 1
    assert store.models() == sorted(["digits", "gpt-2.small_v1", "x" * 64, "7"])


# --------------------------------------------------------------------------- aliases


def test_aliases_point_promote_and_roll_back(store: ModelStore):
    store.publish("toy", tensors(0), CONFIG_DICT, aliases=["production"])
    store.publish("toy", tensors(1), CONFIG_DICT, aliases=["staging", "canary"])
    assert store.aliases("toy") == {"production": 1, "staging": 2, "canary": 2}
    store.set_alias("toy", "production", "staging")  # promote what staging points at
    assert store.load("toy", "production").version == 2
    store.set_alias("toy", "production", 1)  # roll back
    store.remove_alias("toy", "canary")
    assert json.loads((store.root / "toy" / "aliases.json").read_text()) == {
        "production": 1, "staging": 2}
    with pytest.raises(ModelNotFoundError, match="no alias 'canary'"):
        store.remove_alias("toy", "canary")
    with pytest.raises(ModelNotFoundError, match="versions: \\[1, 2\\]"):
        store.set_alias("toy", "production", 5)
    assert store.aliases("toy") == {"production": 1, "staging": 2}
    assert hidden(store.root / "toy") == [".lock"]  # no temporary files left


@pytest.mark.parametrize("alias", ["latest", "3", "../prod", "", "a b", 7])
def test_bad_alias_names_are_refused_before_anything_is_written(store: ModelStore, alias):
    store.publish("toy", tensors(), CONFIG_DICT)
    with pytest.raises(ValueError, match="alias"):
        store.set_alias("toy", alias, 1)
    with pytest.raises(ValueError, match="alias"):
        store.publish("toy", tensors(), CONFIG_DICT, aliases=[alias])
    assert store.versions("toy") == [1] and store.aliases("toy") == {}


def test_a_failed_alias_switch_leaves_the_old_pointers(store: ModelStore, monkeypatch):
    store.publish("toy", tensors(0), CONFIG_DICT, aliases=["production"])
    store.publish("toy", tensors(1), CONFIG_DICT)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.set_alias("toy", "production", 2)
    monkeypatch.undo()
    assert store.aliases("toy") == {"production": 1}  # the file was never half-written
    [temp] = [p for p in (store.root / "toy").iterdir() if ".tmp-" in p.name]
    assert store.cleanup() == [temp] and not temp.exists()


# --------------------------------------------------------------------------- integrity, info, delete


@pytest.mark.parametrize("damage", ["weights", "config", "truncate", "unlisted", "missing"])
def test_tampered_versions_are_refused_naming_model_version_and_file(store: ModelStore, damage):
    store.publish("toy", tensors(0), CONFIG_DICT)
    store.publish("toy", tensors(1), CONFIG_DICT)
    folder = store.path("toy", 2)
    expected = {"weights": WEIGHTS, "config": CONFIG, "truncate": WEIGHTS,
                "unlisted": "evil.py", "missing": CONFIG}[damage]
    if damage in ("weights", "config"):
        flip_middle_byte(folder / expected)
    elif damage == "truncate":
        (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:-4])
    elif damage == "unlisted":
        (folder / "evil.py").write_text("import os")
    else:
        (folder / CONFIG).unlink()
    with pytest.raises(IntegrityError) as info:
        store.load("toy", 2)
    message = str(info.value)
    assert "model 'toy' version 2" in message and expected in message, message
    assert isinstance(info.value, ValueError)
    assert torch.equal(store.load("toy", 1).tensors["w"], tensors(0)["w"])


def test_info_reads_the_manifest_without_loading_tensors(store: ModelStore, monkeypatch):
    store.publish("toy", tensors(), CONFIG_DICT, metrics={"accuracy": 0.9}, aliases=["staging"])
    store.set_alias("toy", "production", 1)
    monkeypatch.setattr(store_module, "load_checkpoint", lambda *a: pytest.fail("loaded"))
    info = store.info("toy", "production")
    assert info["version"] == 1 and info["name"] == "toy"
    assert info["metrics"] == {"accuracy": 0.9}
    assert info["aliases"] == ["production", "staging"]
    assert set(info["files"]) == {WEIGHTS, CONFIG}
    assert info["files"][WEIGHTS]["bytes"] == (store.path("toy", 1) / WEIGHTS).stat().st_size
    assert datetime.fromisoformat(info["created"]).utcoffset() == timedelta(0)
    assert info["packages"] == {key: info_meta(store)[key] for key in store_module.PACKAGES}
    assert info["packages"]["torch"] == torch.__version__


def info_meta(store: ModelStore) -> dict:
    return json.loads((store.path("toy", 1) / MANIFEST).read_text())["metadata"]


def test_delete_refuses_aliased_versions_and_leaves_no_trash(store: ModelStore):
    for i in range(3):
        store.publish("toy", tensors(i), CONFIG_DICT)
    store.set_alias("toy", "production", 2)
    with pytest.raises(ValueError, match=r"\['production'\] point at it"):
        store.delete("toy", "production")
    with pytest.raises(ValueError, match="production"):
        store.delete("toy", 2)
    store.delete("toy", 1)
    assert store.versions("toy") == [2, 3]
    assert hidden(store.root / "toy") == [".lock"]
    with pytest.raises(ModelNotFoundError, match=r"versions: \[2, 3\]"):
        store.load("toy", 1)
    with pytest.raises(ModelNotFoundError):
        store.delete("toy", 1)


def test_cleanup_removes_trash_and_temporary_files(store: ModelStore):
    store.publish("toy", tensors(), CONFIG_DICT, aliases=["production"])
    folder = store.root / "toy"
    trash = folder / ".trash-4-deadbeef"
    (trash / "sub").mkdir(parents=True)
    temp = folder / ".aliases.json.tmp-1234abcd"
    temp.write_text("{")
    assert store.cleanup() == [temp, trash]
    assert hidden(folder) == [".lock"] and store.cleanup() == []
    assert store.load("toy").version == 1


# --------------------------------------------------------------------------- concurrency and crashes


def test_concurrent_processes_get_distinct_versions(store: ModelStore, tmp_path: Path):
    go = tmp_path / "go"
    workers = [spawn(PUBLISHER, store.root, "toy", w, 3, 1000, go) for w in range(4)]
    try:
        time.sleep(0.2)
        go.touch()  # all four start publishing at once
        outputs = [w.communicate(timeout=60) for w in workers]
    finally:
        for worker in workers:
            stop(worker)
    assert all(w.returncode == 0 for w in workers), [err for _, err in outputs]
    printed = sorted(int(line) for out, _ in outputs for line in out.split())
    assert printed == list(range(1, 13))
    assert store.versions("toy") == list(range(1, 13))
    seen = set()
    for version in range(1, 13):
        loaded = store.load("toy", version)
        worker, i = loaded.config["worker"], loaded.config["i"]
        assert torch.all(loaded.tensors["w"] == worker * 1000 + i)
        seen.add((worker, i))
    assert len(seen) == 12
    assert hidden(store.root / "toy") == [".lock"]


def test_concurrent_threads_get_distinct_versions(store: ModelStore):
    results: list[int] = []

    def publish(seed: int) -> None:
        for _ in range(2):
            results.append(store.publish("toy", tensors(seed), {"seed": seed}))

    threads = [threading.Thread(target=publish, args=(s,)) for s in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == list(range(1, 13)) == store.versions("toy")


def test_publish_killed_after_staging_leaves_a_loadable_store(store: ModelStore):
    store.publish("toy", tensors(0), CONFIG_DICT, aliases=["production"])
    folder = store.root / "toy"
    process = spawn(PUBLISHER, store.root, "toy", 7, 1, 1000, "-", env={PAUSE_ENV: "60"})
    try:
        staged = lambda: list(folder.glob(".staging-*/checkpoint/manifest.json"))  # noqa: E731
        wait_for(lambda: staged() or process.poll() is not None, what="a staged publish")
        assert process.poll() is None, process.communicate()[1]
        [staging] = [p for p in folder.iterdir() if p.name.startswith(".staging-")]
        assert store.cleanup() == [] and staging.exists()  # a live publish is left alone
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stop(process)
    assert process.returncode == -signal.SIGKILL
    assert staging.exists() and store.versions("toy") == [1] and store.models() == ["toy"]
    assert store.resolve("toy", "latest") == 1
    assert torch.equal(store.load("toy").tensors["w"], tensors(0)["w"])
    assert store.cleanup() == [staging] and not staging.exists()
    assert store.publish("toy", tensors(1), CONFIG_DICT) == 2  # nothing is left locked
    assert hidden(folder) == [".lock"]


def test_publish_killed_at_a_random_moment_leaves_only_complete_versions(store: ModelStore):
    process = spawn(PUBLISHER, store.root, "big", 1, 1000, 2_000_000, "-")  # 8 MB each
    try:
        wait_for(lambda: (store.root / "big" / "2").exists() or process.poll() is not None,
                 what="two versions")
        time.sleep(random.Random(0).uniform(0.0, 0.2))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stop(process)
    assert process.returncode == -signal.SIGKILL
    versions = store.versions("big")
    digit_folders = sorted(int(p.name) for p in (store.root / "big").iterdir()
                           if p.name.isdigit())
    assert digit_folders == versions == list(range(1, len(versions) + 1))
    for version in versions:
        assert store.load("big", version).config == {"worker": 1, "i": version - 1}
    # The kill nearly always lands in a publish's staging phase (one staging folder left);
    # rarely it lands while last_version.json is rewritten, which leaves its temporary file too.
    removed = store.cleanup()
    staging = [p for p in removed if p.name.startswith(".staging-")]
    temporary = [p for p in removed if p.name.startswith(".last_version.json.tmp-")]
    assert len(staging) <= 1 and len(temporary) <= 1
    assert len(staging) + len(temporary) == len(removed), removed
    assert hidden(store.root / "big") == [".lock"]
    assert store.publish("big", tensors(), CONFIG_DICT) == versions[-1] + 1


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path: Path):
    store = ModelStore(tmp_path / "store", lock_timeout=0.3)
    store.publish("toy", tensors(0), CONFIG_DICT)
    holder = spawn(LOCK_HOLDER, store.root / "toy" / ".lock")
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError, match="publish 'toy'.*0.3 s"):
            store.publish("toy", tensors(1), CONFIG_DICT)
        assert store.versions("toy") == [1] and hidden(store.root / "toy") == [".lock"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        stop(holder)
    assert store.publish("toy", tensors(1), CONFIG_DICT) == 2
