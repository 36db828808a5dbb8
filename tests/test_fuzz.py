"""Property-based fuzzing of every reader of outside data (issue 9): arbitrary bytes, arbitrary
JSON/YAML shapes and mutations of real inputs go in; only the reader's documented MigrdError
comes out (never TypeError, KeyError, AttributeError, RecursionError, UnicodeDecodeError...),
and the receiver leaves nothing behind when it refuses.

`make test`/`make unit` run these with the quick, derandomized profile (tests/conftest.py);
`make fuzz` runs only these, with many more examples.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard
from hypothesis import assume, given
from hypothesis import strategies as st

from migrd import model
from migrd.agent import admin, loop as agent
from migrd import config
from migrd.adapters import exchange, untrusted
from migrd.core import precheck
from migrd.engine import manifest, migration as migrate, receive, target
from migrd.errors import ConfigError, ImageError, InputError, JournalCorrupt, MigrdError
from migrd.engine.journal import Journal, summarize
from test_policy import host
from test_transport import assert_nothing_left, make_image, reader, stream_of

pytestmark = pytest.mark.fuzz

# --------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
           | st.floats() | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def _edit(doc: Any, path: list[int], value: Any, how: int) -> Any:
    """doc with the node that `path` (indexes into keys/items, taken modulo) points at replaced
    by value (how 0), deleted (1), or given an extra key/item (2)."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value if how == 0 or not isinstance(doc, (dict, list)) else doc
    i, rest = path[0], path[1:]
    if isinstance(doc, dict):
        key = sorted(doc)[i % len(doc)]
        out = dict(doc)
        if not rest and how == 1:
            del out[key]
        elif not rest and how == 2:
            out[f"new_{i}"] = value
        else:
            out[key] = _edit(doc[key], rest, value, how)
        return out
    out = list(doc)
    j = i % len(doc)
    if not rest and how == 1:
        del out[j]
    elif not rest and how == 2:
        out.append(value)
    else:
        out[j] = _edit(doc[j], rest, value, how)
    return out


def mutations(good: Any) -> st.SearchStrategy[Any]:
    """A real document with one node replaced by any JSON value, deleted, or a key added."""
    return st.builds(_edit, st.just(good), st.lists(st.integers(0, 50), max_size=5), json_values,
                     st.integers(0, 2))


def documents(good: Any) -> st.SearchStrategy[bytes]:
    """Bytes a reader of `good`'s kind may meet: junk, any JSON, or a mutated real document."""
    as_json = st.one_of(json_values, mutations(good), mutations(good)).map(
        lambda v: json.dumps(v).encode())
    return st.one_of(st.binary(max_size=300), as_json,
                     st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n))


def _dumps(v: Any) -> bytes:
    return json.dumps(v).encode()


# --------------------------------------------------------------------------- peer snapshots

GOOD_SNAPSHOT = json.loads(exchange.Snapshot(host("b", 0.5), "normal", 42).to_json())


@given(documents(GOOD_SNAPSHOT))
def test_snapshot_reader(data: bytes) -> None:
    try:
        snap = exchange.Snapshot.from_json(data, "b:load.json")
    except InputError as e:
        assert str(e).startswith("b:load.json: ") and "\n" not in str(e)
        return
    assert snap.load.cpu_capacity > 0 and isinstance(snap.agent_pid, int)


# --------------------------------------------------------------------------- manifests

GOOD_MANIFEST = json.loads(manifest.Manifest(
    format=manifest.FORMAT, created=1.0, criu_version="4.0", host="h",
    process=model.ProcessInfo(pid=42, cmdline=("sleep", "1"), exe="/bin/sleep", cwd="/", uid=0,
                                 rss=1, start_time=0.0,
                                 open_files=(model.OpenFile("/tmp/x", 3, "r", 5),),
                                 listening=(model.Listener("inet", "0.0.0.0", 80),), tree_ids=(42,),
                                 environ={"A": "b"}),
    options={"tcp_established": False}, files={"core-42.img": manifest.FileEntry(3, "0" * 64)},
).to_json())


@given(documents(GOOD_MANIFEST))
def test_manifest_reader(data: bytes) -> None:
    try:
        m = manifest.from_json(data, "m.json")
    except ImageError as e:
        assert str(e).startswith("m.json") and "\n" not in str(e)
        return
    assert all(isinstance(f, manifest.FileEntry) and f.size >= 0 for f in m.files.values())


@given(documents(GOOD_MANIFEST))
def test_manifest_verify(data: bytes) -> None:
    """verify() over a directory holding the fuzzed manifest and the one image file."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / manifest.NAME).write_bytes(data)
        (Path(d) / "core-42.img").write_bytes(b"abc")
        try:
            manifest.verify(Path(d))
        except ImageError:
            pass


# --------------------------------------------------------------------------- journals

GOOD_RECORD = {"state": "transfer", "time": 1.5, "data": {
    "source": "a", "options": {"target": "b", "mode": "move"}, "carry": [], "workload": None,
    "process": GOOD_MANIFEST["process"], "freeze": 1.0, "nft_tables": ["t"],
    "request": {"pid": 42, "start_time": 0.0, "target": "b", "mode": "move"}}}

journal_lines = st.one_of(st.binary(max_size=80), documents(GOOD_RECORD), documents(GOOD_RECORD))


@given(st.lists(journal_lines, max_size=4), st.binary(max_size=40))
def test_journal_reader_and_torn_tail(lines: list[bytes], tail: bytes) -> None:
    """Any file content: records() gives records or JournalCorrupt, history summarizes it, the
    typed view recovery checks is built or refused; and after an append the new record is the
    last one (a torn tail never hides it)."""
    assume(b"\n" not in tail)
    with tempfile.TemporaryDirectory() as d:
        j = Journal(Path(d) / "m")
        j.dir.mkdir()
        j.path.write_bytes(b"".join(ln.replace(b"\n", b" ") + b"\n" for ln in lines) + tail)
        try:
            before = j.records()
        except JournalCorrupt:
            before = None
        s = summarize(j)  # never raises; a record's data of the wrong type is corrupt too
        assert s.outcome == "corrupt journal" or before is not None
        if before is not None:
            try:
                untrusted.build(migrate.Recorded, j.merged(), JournalCorrupt, str(j.path))
            except JournalCorrupt:
                pass
        j.record("done", outcome="ok")
        if before is not None:
            after = j.records()
            assert after[:-1] == before and after[-1].state == "done"


# --------------------------------------------------------------------------- config

EXAMPLE = (Path(__file__).parent.parent / "configs" / "migrd.yaml").read_text()
EXAMPLE_DOC = yaml.safe_load(EXAMPLE)
EXAMPLE_DOC["hosts"] = [{"name": "h2", "address": "198.18.0.2", "port": 22, "host_keys": ["k"]}]
config_keys = st.sampled_from(sorted({*EXAMPLE_DOC, *(k for v in EXAMPLE_DOC.values()
                                                      if isinstance(v, dict) for k in v)}))
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(config_keys | st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
tags = st.sampled_from(["", "!foo ", "!!python/name:os.system ", "!!binary ", "!!int ", "!!float ",
                        "!!timestamp ", "&a ", "*a ", "? ", "{a: 1}: ", "- ", "<<: "])


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return yaml.safe_dump(draw(yaml_values | mutations(EXAMPLE_DOC)), allow_unicode=True)
    lines = (EXAMPLE if kind == 2 else yaml.safe_dump(EXAMPLE_DOC)).splitlines()
    for _ in range(draw(st.integers(1, 3))):  # a tag, a value or junk spliced into some line
        i = draw(st.integers(0, len(lines) - 1))
        at = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:at] + draw(tags | st.text(max_size=8)) + lines[i][at:]
    return "\n".join(lines)


@given(config_texts())
def test_config_reader(text: str) -> None:
    try:
        cfg = config.parse(text, "m.yaml")
    except ConfigError as e:
        assert str(e).startswith("m.yaml") and "\n" not in str(e)
        return
    assert cfg.state_dir.is_absolute() and cfg.ssh.connect_timeout > 0
    assert all(1 <= h.port <= 65535 for h in cfg.hosts)


# --------------------------------------------------------------------------- admin requests

request_dicts = st.fixed_dictionaries(
    {"op": st.sampled_from([*agent.OPS, "nope"]) | st.text(max_size=8)},
    optional={"pid": scalars, "limit": scalars, "requester": scalars, "extra": json_values},
)


@given(st.one_of(st.binary(max_size=200), json_values.map(_dumps), request_dicts.map(_dumps),
                 st.integers(1, 5000).map(lambda n: b'{"op": ' * n)))
def test_admin_request_parser(line: bytes) -> None:
    try:
        req = agent.parse_request(admin.decode_request(line))
    except InputError as e:
        assert "\n" not in str(e)
        return
    assert req.op in agent.OPS and (req.pid is None or isinstance(req.pid, int))

    def bug(_req: dict[str, Any]) -> Any:
        raise KeyError("a bug")

    # Whatever the handler does, every request gets an answer.
    for handler in (agent.parse_request, bug):
        assert admin.answer(handler, line)["ok"] in (True, False)


# --------------------------------------------------------------------------- precheck requests

def _precheck_request(ask: precheck.Ask) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(precheck.Request(
        id="m1", mode="move", rss=1 << 20, ports=(80,), carry=("/tmp/x",), with_files=True,
        move_address=None, headroom=1.2, ask=ask, cpuinfo="AA=="))))


GOOD_PRECHECKS = (
    _precheck_request(precheck.ProcessAsk(pid=42, start_time=1.0, tree_ids=(42, 43), own_pid_namespace=False,
                                          files=(("/tmp/x", 5),),
                                          identities={"/tmp/x": model.FileIdentity(1, 2, 5, "ab")})),
    _precheck_request(precheck.ContainerAsk("web", "podman", "busybox", "d1", "abc")),
)


@given(st.sampled_from(GOOD_PRECHECKS).flatmap(documents))
def test_precheck_request_parser(data: bytes) -> None:
    """The target's reading of the source's request: one line naming what is wrong, or a
    request whose ask is one whole kind of ask."""
    try:
        req = target.parse_precheck(untrusted.loads(data, InputError, "precheck request"))
    except InputError as e:
        assert str(e).startswith("precheck request: ") and "\n" not in str(e)
        return
    assert isinstance(req.ask, (precheck.ProcessAsk, precheck.ContainerAsk))


# --------------------------------------------------------------------------- receive stream


@pytest.fixture(scope="module")
def real_stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    src = tmp_path_factory.mktemp("fuzz") / "src"
    make_image(src, {"pages-1.img": bytes(range(256)) * 8, "core-1.img": b"core", "empty.img": b""})
    return stream_of(src)


def _mutate_stream(data: bytes, edits: list[tuple[int, int, bytes]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, kind, piece in edits:
        p = pos % (len(out) + 1)
        if kind == 0:
            out[p:p + len(piece)] = piece  # overwrite
        elif kind == 1:
            out[p:p] = piece  # insert
        else:
            del out[p:p + len(piece) + 1]  # delete
    return bytes(out[:cut] if cut is not None else out)


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 2), st.binary(min_size=1, max_size=8)),
                 max_size=3)


def _receive(data: bytes, sha: str, compression: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "img"
        try:
            receive.receive(reader(data, piece=700), target, sha, compression)
        except (ImageError, InputError) as e:
            assert "\n" not in str(e)
            assert_nothing_left(target)
            return
        manifest.verify(target)  # anything accepted is complete and intact


@given(st.binary(max_size=3000), st.sampled_from(receive.COMPRESSIONS))
def test_receiver_on_junk(data: bytes, compression: str) -> None:
    _receive(data, "0" * 64, compression)


@given(edits, st.none() | st.integers(0, 1 << 16), st.booleans(), st.booleans())
def test_receiver_on_mutated_streams(real_stream: tuple[bytes, str], changes, cut, zstd: bool,
                                     mutate_compressed: bool) -> None:
    data, sha = real_stream
    if not zstd:
        _receive(_mutate_stream(data, changes, cut), sha, "none")
    elif mutate_compressed:
        _receive(_mutate_stream(zstandard.ZstdCompressor().compress(data), changes, cut), sha, "zstd")
    else:
        _receive(zstandard.ZstdCompressor().compress(_mutate_stream(data, changes, cut)), sha, "zstd")


def test_the_fuzzers_reach_the_good_paths(real_stream: tuple[bytes, str]) -> None:
    """The unmutated inputs are accepted, so the properties above are not vacuous."""
    assert exchange.Snapshot.from_json(_dumps(GOOD_SNAPSHOT)).agent_pid == 42
    assert manifest.from_json(_dumps(GOOD_MANIFEST)).process.pid == 42
    assert config.parse(EXAMPLE).state_dir == Path("/var/lib/migrd")
    assert config.parse(yaml.safe_dump(EXAMPLE_DOC)).hosts[0].name == "h2"
    assert untrusted.build(migrate.Recorded, GOOD_RECORD["data"], MigrdError, "j").request.pid == 42
    assert agent.parse_request({"op": "history", "limit": 5}).limit == 5
    with tempfile.TemporaryDirectory() as d:
        receive.receive(reader(real_stream[0]), Path(d) / "img", real_stream[1])
