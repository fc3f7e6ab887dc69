"""The node's key file (lanchat.keyfile): made once, mode 0600, refused when unsafe, and
replaced when the state directory turns up on another machine.

Real files in a temporary directory; the machine id is a file of the test's own
(``machine_id_path``), so a "second machine" is a second machine-id file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lanchat import keyfile
from lanchat.feed import MSG_DOMAIN, SigningKey, b64encode
from lanchat.keyfile import KEY_FILE, KeyFileError, load_identity, read_machine_id

MACHINE_A = "0123456789abcdef0123456789abcdef"
MACHINE_B = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def machine(tmp_path: Path, content: str | None, name: str = "machine-id") -> str:
    path = tmp_path / name
    if content is not None:
        path.write_text(content + "\n")
    return str(path)


def mode_of(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most careless umask: whatever is made is world-readable unless made 0600."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_first_start_makes_a_key_mode_0600_and_later_starts_load_it(
        state: Path, tmp_path: Path, umask_zero: None) -> None:
    mid = machine(tmp_path, MACHINE_A)
    first = load_identity(str(state), machine_id_path=mid)
    key_path = state / KEY_FILE
    assert first.created and first.replaced is None and first.path == str(key_path)
    assert mode_of(key_path) == 0o600
    assert mode_of(state) == 0o700
    assert sorted(os.listdir(state)) == [KEY_FILE]  # no temporary file left behind
    doc = json.loads(key_path.read_text())
    assert doc["node"] == first.node and doc["machine_id"] == MACHINE_A
    assert doc["public"] == first.key.public.text
    again = load_identity(str(state), machine_id_path=mid)
    assert not again.created and again.replaced is None
    assert again.node == first.node
    # the very same secret: a signature made by one verifies under the other
    assert again.key.public.verify(first.key.sign(MSG_DOMAIN + b"x"), MSG_DOMAIN + b"x")
    assert load_identity(str(tmp_path / "other"), machine_id_path=mid).node != first.node


def test_the_key_file_is_never_readable_by_others_even_while_it_is_made(
        state: Path, tmp_path: Path, umask_zero: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, bytes]] = []
    real_link = os.link

    def link(src: str, dst: str) -> None:
        seen.append((mode_of(src), Path(src).read_bytes()))  # the moment before it appears
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    ident = load_identity(str(state), machine_id_path=machine(tmp_path, MACHINE_A))
    assert len(seen) == 1
    assert seen[0][0] == 0o600
    assert seen[0][1] == (state / KEY_FILE).read_bytes()  # complete before it is in place
    assert json.loads(seen[0][1])["node"] == ident.node


def test_without_hard_links_the_file_is_renamed_into_place(
        state: Path, tmp_path: Path, umask_zero: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ident = load_identity(str(state), machine_id_path=machine(tmp_path, MACHINE_A))
    assert mode_of(state / KEY_FILE) == 0o600
    assert sorted(os.listdir(state)) == [KEY_FILE]
    monkeypatch.undo()
    assert load_identity(str(state), machine_id_path=machine(tmp_path, MACHINE_A)).node \
        == ident.node


def test_a_key_made_meanwhile_by_another_process_wins(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mid = machine(tmp_path, MACHINE_A)
    other = load_identity(str(tmp_path / "elsewhere"), machine_id_path=mid)
    real_link = os.link

    def racing_link(src: str, dst: str) -> None:
        # another daemon on the same state directory finishes first
        real_link(str(tmp_path / "elsewhere" / KEY_FILE), dst)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    ident = load_identity(str(state), machine_id_path=mid)
    assert ident.node == other.node
    assert sorted(os.listdir(state)) == [KEY_FILE]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666, 0o700 | 0o004])
def test_a_key_file_others_can_read_or_write_is_refused(
        state: Path, tmp_path: Path, mode: int) -> None:
    mid = machine(tmp_path, MACHINE_A)
    load_identity(str(state), machine_id_path=mid)
    os.chmod(state / KEY_FILE, mode)
    with pytest.raises(KeyFileError) as err:
        load_identity(str(state), machine_id_path=mid)
    assert f"mode {mode:04o}" in str(err.value) and "chmod 600" in str(err.value)
    assert mode_of(state / KEY_FILE) == mode  # refused, not "repaired"


def test_an_owner_only_key_file_is_fine(state: Path, tmp_path: Path) -> None:
    mid = machine(tmp_path, MACHINE_A)
    node = load_identity(str(state), machine_id_path=mid).node
    os.chmod(state / KEY_FILE, 0o400)
    assert load_identity(str(state), machine_id_path=mid).node == node


def test_a_key_file_of_another_user_a_link_or_a_directory_is_refused(
        state: Path, tmp_path: Path) -> None:
    mid = machine(tmp_path, MACHINE_A)
    load_identity(str(state), machine_id_path=mid)
    path = state / KEY_FILE
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(path, 4242, -1)
        with pytest.raises(KeyFileError, match="belongs to uid 4242"):
            load_identity(str(state), machine_id_path=mid)
        os.chown(path, 0, -1)
    real = state / "real.key"
    path.rename(real)
    path.symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_identity(str(state), machine_id_path=mid)
    path.unlink()
    path.mkdir()
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(str(state), machine_id_path=mid)
    path.rmdir()
    os.mkfifo(path, 0o600)  # nobody writes it: opening it must not wait for a writer
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(str(state), machine_id_path=mid)


def _doc(key: SigningKey, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"v": 1, "type": "ed25519", "seed": b64encode(key.seed),
                           "public": key.public.text, "node": key.node, "machine_id": None}
    doc.update(kw)
    return doc


K1, K2 = SigningKey(b"\x01" * 32), SigningKey(b"\x02" * 32)


@pytest.mark.parametrize("content", [
    b"",
    b"\n",
    b"garbage",
    b"\xff\xfe{}",
    b"[]",
    json.dumps({**_doc(K1), "extra": 1}).encode(),
    json.dumps({k: v for k, v in _doc(K1).items() if k != "node"}).encode(),
    json.dumps(_doc(K1, v=2)).encode(),
    json.dumps(_doc(K1, v=True)).encode(),
    json.dumps(_doc(K1, type="rsa")).encode(),
    json.dumps(_doc(K1, seed=b64encode(b"\x01" * 31))).encode(),
    json.dumps(_doc(K1, seed=7)).encode(),
    json.dumps(_doc(K1, public=K2.public.text)).encode(),  # parts that disagree: corrupt
    json.dumps(_doc(K1, node=K2.node)).encode(),
    json.dumps(_doc(K1, machine_id="not-a-machine")).encode(),
    json.dumps(_doc(K1)).encode() + b" " * 5000,
])
def test_a_key_file_with_wrong_content_is_refused_not_replaced(
        state: Path, tmp_path: Path, content: bytes) -> None:
    state.mkdir()
    path = state / KEY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as err:
        load_identity(str(state), machine_id_path=machine(tmp_path, MACHINE_A))
    assert "is not a lanchat key file" in str(err.value)
    assert "move it away to make a new identity" in str(err.value)
    assert path.read_bytes() == content
    assert os.listdir(state) == [KEY_FILE]


def test_a_hand_written_key_file_loads(state: Path, tmp_path: Path) -> None:
    state.mkdir()
    (state / KEY_FILE).write_text(json.dumps(_doc(K1, machine_id=MACHINE_A)))
    os.chmod(state / KEY_FILE, 0o600)
    ident = load_identity(str(state), machine_id_path=machine(tmp_path, MACHINE_A))
    assert ident.node == K1.node and not ident.created


def test_a_state_directory_on_another_machine_makes_a_new_identity(
        state: Path, tmp_path: Path) -> None:
    on_a = machine(tmp_path, MACHINE_A, "a")
    on_b = machine(tmp_path, MACHINE_B, "b")
    original = load_identity(str(state), machine_id_path=on_a)
    old_bytes = (state / KEY_FILE).read_bytes()
    clone = load_identity(str(state), machine_id_path=on_b)  # the directory was copied to B
    assert clone.created and clone.node != original.node
    assert clone.replaced is not None
    assert clone.replaced.node == original.node
    assert (clone.replaced.old_machine, clone.replaced.machine) == (MACHINE_A, MACHINE_B)
    kept = Path(clone.replaced.kept_as)
    assert kept.parent == state and original.node in kept.name
    assert kept.read_bytes() == old_bytes and mode_of(kept) == 0o600  # kept for the record
    assert json.loads((state / KEY_FILE).read_text())["machine_id"] == MACHINE_B
    note = clone.note()  # the daemon's one log line
    assert note is not None and "\n" not in note
    for part in (MACHINE_A, MACHINE_B, clone.node, original.node, str(kept)):
        assert part in note
    assert original.note() is None
    # from now on B loads its own identity, with nothing to report
    again = load_identity(str(state), machine_id_path=on_b)
    assert (again.node, again.created, again.replaced) == (clone.node, False, None)
    assert again.note() is None
    # copied back to A again: A's file was kept aside, so A gets a third identity, and the
    # kept copies never overwrite each other
    third = load_identity(str(state), machine_id_path=on_a)
    assert third.replaced is not None and third.replaced.node == clone.node
    assert third.node not in (original.node, clone.node)
    assert len([n for n in os.listdir(state) if n.startswith(f"{KEY_FILE}.")]) == 2
    # the original restored from a backup onto B: moved aside again, beside the first copy
    (state / KEY_FILE).write_bytes(old_bytes)
    os.chmod(state / KEY_FILE, 0o600)
    fourth = load_identity(str(state), machine_id_path=on_b)
    assert fourth.replaced is not None and fourth.replaced.node == original.node
    assert fourth.replaced.kept_as != str(kept)
    assert kept.read_bytes() == Path(fourth.replaced.kept_as).read_bytes() == old_bytes
    assert len([n for n in os.listdir(state) if n.startswith(f"{KEY_FILE}.")]) == 3


@pytest.mark.parametrize("before,after", [
    (None, MACHINE_B),  # made where there was no machine id: no way to tell a clone
    (MACHINE_A, None),  # a container without /etc/machine-id
    ("uninitialized", MACHINE_B),  # systemd's first boot
])
def test_an_unknown_machine_id_keeps_the_identity(
        state: Path, tmp_path: Path, before: str | None, after: str | None) -> None:
    first = load_identity(str(state), machine_id_path=machine(tmp_path, before, "before"))
    then = load_identity(str(state), machine_id_path=machine(tmp_path, after, "after"))
    assert then.node == first.node and then.replaced is None


@pytest.mark.parametrize("content,expected", [
    (MACHINE_A, MACHINE_A),
    (MACHINE_A + "\n", MACHINE_A),
    ("uninitialized", None),
    ("", None),
    ("0123", None),
    (MACHINE_A.upper(), None),
])
def test_read_machine_id(tmp_path: Path, content: str, expected: str | None) -> None:
    path = tmp_path / "machine-id"
    path.write_text(content)
    assert read_machine_id(str(path)) == expected
    assert read_machine_id(str(tmp_path / "missing")) is None


def test_the_real_machine_id_is_read_where_there_is_one() -> None:
    real = read_machine_id()
    if os.path.exists(keyfile.MACHINE_ID_PATH):
        content = Path(keyfile.MACHINE_ID_PATH).read_text().strip()
        assert real == (content if len(content) == 32 else None)
    else:
        assert real is None


def test_a_key_file_cannot_be_written(state: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    fsync: Callable[[int], None] = full
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyFileError, match="No space left"):
        load_identity(str(state), machine_id_path=machine(tmp_path, MACHINE_A))
    assert os.listdir(state) == []
