"""The prefix cache and the state files, without HTTP: longest-prefix planning over several stored states, delta
chains, LRU budgets per tier, checkpoint placement, and KV on disk (restart, exact restore, corrupt / foreign /
orphaned files, bounded size). Token-only fake sessions where the model does not matter; the tiny model on the
reference backend where the states must be real."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from ds4cupy.engines.state import SessionState, chain_of, chain_rows, chain_tokens
from ds4cupy.server.kv_disk import DiskStore
from ds4cupy.server.prefix_cache import (MAX_CHECKPOINT_TOKENS, MIN_CHECKPOINT_TOKENS, PrefixCache,
                                         checkpoint_interval)

pytestmark = pytest.mark.usefixtures("one_blas_thread")

ROW = 8          # float32 values a fake session stores per token: its states weigh 4 * (ROW + 1) bytes a token


class RowSession:
    """A session whose state is one append-only row per token holding the token id, plus the tokens."""

    def __init__(self):
        self.tokens: list[int] = []
        self.prefilled_tokens = 0
        self.restores = 0

    @property
    def n_tokens(self):
        return len(self.tokens)

    def prefill(self, ids):
        self.tokens += list(ids)
        self.prefilled_tokens += len(ids)

    def snapshot(self, since=0):
        rows = np.repeat(np.asarray(self.tokens[since:], np.float32)[:, None], ROW, axis=1)
        return SessionState(since, self.tokens[since:], {"r": (since, rows)}, {"last": np.float32([len(self.tokens)])})

    def restore(self, state):
        chain = chain_of(state)
        tokens = chain_tokens(chain)
        rows = np.concatenate([a for _, a in chain_rows(chain, "r", len(tokens))])
        assert rows[:, 0].tolist() == tokens           # the rows came back in order, for exactly these tokens
        assert chain[-1].fixed["last"][0] == len(tokens)
        self.tokens = tokens
        self.restores += 1

    def reset(self):
        self.tokens = []


def run(cache, session, prompt, checkpoints=()):
    """What the worker does with a prompt: prepare, prefill with checkpoints, store the end. Returns (plan, prefilled)."""
    before = session.prefilled_tokens
    plan = cache.prepare(session, prompt)
    position = plan.cached
    for point in cache.checkpoint_positions(plan.cached, len(prompt), checkpoints):
        session.prefill(prompt[position:point])
        position = point
        cache.checkpoint(session)
    session.prefill(prompt[position:])
    cache.checkpoint(session)
    return plan, session.prefilled_tokens - before


def test_plan_prefers_the_longest_prefix():
    cache = PrefixCache(checkpoint_tokens=1000)
    s = RowSession()
    prompt = [1, 2, 3, 4, 5]
    assert cache.plan([], prompt).action == "reset"
    assert (cache.plan([1, 2, 3], prompt).action, cache.plan([1, 2, 3], prompt).cached) == ("live", 3)
    assert cache.plan([1, 2, 3, 4, 5], prompt).action == "reset"      # the live session is not a strict prefix
    s.prefill([1, 2])
    cache.checkpoint(s)
    s.prefill([3, 4])
    cache.checkpoint(s)
    s.reset()
    s.prefill([1, 7, 7])
    cache.checkpoint(s)
    plan = cache.plan([1, 2, 9], prompt)
    assert (plan.action, plan.cached, plan.source) == ("restore", 4, "memory")
    assert cache.plan([1, 2, 3, 4], prompt).action == "live"          # live wins a tie: nothing to copy
    assert cache.plan([], [1, 2, 3, 4]).cached == 2                   # one token is always left to prefill
    assert cache.plan([], [7, 7]).action == "reset"
    [e4] = [e for e in cache.entries() if e.n_tokens == 4]
    assert e4.since == 2 and e4.parent.n_tokens == 2 and e4.tokens.tolist() == [3, 4]    # a delta on [1, 2]


def test_two_interleaved_conversations_each_continue_their_own_state():
    cache = PrefixCache(checkpoint_tokens=64)
    s = RowSession()
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 1000, 150).tolist()
    convs = {"main": shared + rng.integers(0, 1000, 100).tolist(), "sub": shared + rng.integers(0, 1000, 40).tolist()}
    seen = []
    for turn in range(4):
        for name in ("main", "sub"):
            previous = list(convs[name])
            if turn:
                convs[name] += rng.integers(0, 1000, 30 + turn).tolist()
            plan, prefilled = run(cache, s, convs[name])
            seen.append((name, plan.source, plan.cached, prefilled))
            if turn:
                assert plan.cached == len(previous) and prefilled == len(convs[name]) - len(previous)
    # the first sub request reuses the shared prefix up to the last checkpoint (128 = 2 x 64) inside it
    assert seen[1][2] == 128
    assert {src for _, src, _, _ in seen[2:]} == {"memory"}         # the other agent always ran in between
    assert s.restores >= 6


def test_lru_budget_keeps_what_is_used_and_parents_of_kept_states():
    per_token = 4 * (ROW + 1)
    cache = PrefixCache(checkpoint_tokens=10_000, host_bytes=per_token * 130)
    s = RowSession()
    a, b, c = [list(range(k, k + 60)) for k in (1000, 2000, 3000)]
    run(cache, s, a)
    run(cache, s, b)
    run(cache, s, a + [1, 2])           # a is used again: b is now the least recently used
    run(cache, s, c)
    left = {tuple(chain_tokens([x.data for x in e.chain()])[:1]) for e in cache.entries()}
    assert (1000,) in left and (3000,) in left and (2000,) not in left
    stats = cache.stats()
    assert stats["bytes_host"] <= 130 * per_token and stats["evicted_memory"] >= 1
    for e in cache.entries():          # every stored delta still has its whole chain
        assert all(x.data is not None for x in e.chain())


def test_device_states_move_to_the_host_over_the_device_budget():
    class DeviceArray:
        """Stands for a GPU array: not NumPy, copied to the host by .get()."""
        def __init__(self, a):
            self.a, self.nbytes, self.shape = a, a.nbytes, a.shape

        def get(self):
            return self.a.copy()

    class DeviceSession(RowSession):
        def snapshot(self, since=0):
            st = super().snapshot(since)
            return SessionState(st.since, st.tokens, {"r": (st.rows["r"][0], DeviceArray(st.rows["r"][1]))}, st.fixed)

    cache = PrefixCache(checkpoint_tokens=10_000, device_bytes=50 * 4 * ROW, host_bytes=1 << 30)
    s = DeviceSession()
    run(cache, s, list(range(40)))
    assert cache.used["device"] > 0 and cache.counts["demoted"] == 0
    run(cache, s, list(range(100, 140)))
    assert cache.used["device"] <= 50 * 4 * ROW and cache.counts["demoted"] >= 1
    assert {e.tier for e in cache.entries()} == {"device", "host"}
    s.reset()
    plan, prefilled = run(cache, s, list(range(40)) + [5])   # a demoted (host) chain restores like any other
    assert plan.cached == 40 and prefilled == 1


def test_checkpoint_positions_and_interval():
    cache = PrefixCache(checkpoint_tokens=256)
    assert cache.checkpoint_positions(0, 1000, [300, 999, 5000]) == [256, 300, 512, 768, 999]
    assert cache.checkpoint_positions(600, 1000) == [768, 999]
    assert cache.checkpoint_positions(999, 1000) == []
    assert checkpoint_interval(10.0) == MIN_CHECKPOINT_TOKENS
    assert checkpoint_interval(1e9) == MAX_CHECKPOINT_TOKENS
    assert checkpoint_interval(3000.0) == 2048            # 3000 tokens in CHECKPOINT_TARGET_S = 1 s, power of two
    auto = PrefixCache()
    for _ in range(30):
        auto.observe_prefill(512, 512 / 5000.0)          # 5000 tokens/s
    assert auto.interval == 4096
    auto.observe_prefill(1, 10.0)                        # a one-token call says nothing about the speed
    assert auto.interval == 4096


# ---------------------------------------------------------------------------------------------------- on disk

@pytest.fixture(scope="module")
def model(tiny_reference_model):
    return tiny_reference_model


def disk_cache(model, directory, **kw):
    return PrefixCache(model.state_identity, disk=DiskStore(directory, model.state_identity),
                       disk_bytes=kw.pop("disk_bytes", 1 << 30), **kw)


IDENTITY = "test-identity"


def row_disk_cache(directory, **kw):
    return PrefixCache(IDENTITY, disk=DiskStore(directory, IDENTITY), disk_bytes=kw.pop("disk_bytes", 1 << 30), **kw)


def test_states_survive_a_restart_and_restore_exactly(model, tmp_path):
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, model.config.n_vocab, 50).tolist()
    follow = prompt + rng.integers(0, model.config.n_vocab, 6).tolist()

    first = disk_cache(model, tmp_path, checkpoint_tokens=16)
    s = model.new_session(256)
    run(first, s, prompt)
    first.close()
    n_files = len(list(tmp_path.glob("*.kv")))
    assert n_files == 5                                   # checkpoints at 16, 32, 48, 49 and the end (50)

    reference = model.new_session(256)                    # what an uninterrupted session computes
    reference.prefill(follow[:-1])
    want = reference.prefill(follow[-1:])

    second = disk_cache(model, tmp_path, checkpoint_tokens=16)
    assert second.stats()["entries_disk"] == 5 and second.stats()["entries_memory"] == 0
    fresh = model.new_session(256)
    plan = second.prepare(fresh, follow)
    assert (plan.action, plan.source, plan.cached) == ("restore", "disk", 50)
    fresh.prefill(follow[50:-1])
    np.testing.assert_array_equal(fresh.prefill(follow[-1:]), want)
    assert second.stats()["disk_read_bytes"] > 0 and second.stats()["hit_disk"] == 1
    second.close()


def test_corrupt_foreign_and_orphaned_files_are_ignored(tmp_path, caplog):
    """Found at start-up: garbage, a file cut inside its header, another model's file, and states whose parent
    file is gone are skipped with a log line each; the server prefills instead. Another model's file is kept."""
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, 1000, 70).tolist()
    cache = row_disk_cache(tmp_path, checkpoint_tokens=32)
    run(cache, RowSession(), prompt)
    cache.close()
    records = {r.n_tokens: r for r in DiskStore(tmp_path, IDENTITY).scan()}
    assert sorted(records) == [32, 64, 69, 70]
    real = (tmp_path / f"{records[70].key}.kv").read_bytes()
    (tmp_path / ("0" * 64 + ".kv")).write_bytes(b"not a state file at all")
    (tmp_path / ("1" * 64 + ".kv")).write_bytes(real[:10])
    DiskStore(tmp_path, "another-model-identity").write("f" * 64, None,
                                                         SessionState(0, [1, 2, 3], {}, {"x": np.ones(3, np.float32)}))
    os.remove(tmp_path / f"{records[32].key}.kv")        # the root: every other real state hangs off it
    with caplog.at_level(logging.INFO, logger="ds4cupy.server"):
        again = row_disk_cache(tmp_path, checkpoint_tokens=32)
    text = caplog.text
    assert "bad magic" in text and "truncated header" in text and "another model" in text and "missing" in text
    assert again.stats()["entries_disk"] == 0 and again.stats()["disk_errors"] == 5   # 2 broken + 3 orphans
    plan, prefilled = run(again, RowSession(), prompt)
    assert plan.action == "reset" and prefilled == len(prompt)
    again.close()
    assert (tmp_path / ("f" * 64 + ".kv")).exists()


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_damaged_state_file_falls_back_to_the_next_best_state(tmp_path, caplog, damage):
    """Damage past the header shows only when the file is read: that state is dropped (its file deleted), the
    next best one is used, and the request is served."""
    rng = np.random.default_rng(6)
    prompt = rng.integers(0, 1000, 70).tolist()
    cache = row_disk_cache(tmp_path, checkpoint_tokens=32)
    run(cache, RowSession(), prompt)
    cache.close()
    end = max(DiskStore(tmp_path, IDENTITY).scan(), key=lambda r: r.n_tokens)
    path = tmp_path / f"{end.key}.kv"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    else:
        del data[-7:]
    path.write_bytes(bytes(data))
    again = row_disk_cache(tmp_path, checkpoint_tokens=32)
    with caplog.at_level(logging.WARNING, logger="ds4cupy.server"):
        plan = again.prepare(RowSession(), prompt + [5])
    assert ("checksum" if damage == "flip" else "truncated") in caplog.text
    assert plan.cached == 69 and again.stats()["read_errors"] == 1 and not path.exists()
    again.close()


def test_disk_size_is_bounded(tmp_path):
    rng = np.random.default_rng(5)
    probe = row_disk_cache(tmp_path / "probe", checkpoint_tokens=10_000)
    run(probe, RowSession(), rng.integers(0, 1000, 40).tolist())
    probe.close()
    one = max(p.stat().st_size for p in (tmp_path / "probe").glob("*.kv"))
    budget = 5 * one
    cache = row_disk_cache(tmp_path / "bounded", checkpoint_tokens=10_000, disk_bytes=budget)
    s = RowSession()
    prompts = [rng.integers(0, 1000, 40).tolist() for _ in range(6)]
    for p in prompts:
        run(cache, s, p)
        cache.flush()
        total = sum(f.stat().st_size for f in (tmp_path / "bounded").glob("*.kv"))
        assert total <= budget and total == cache.used["disk"]
    assert cache.stats()["evicted_disk"] >= 1
    cache.close()
    kept = {tuple(r.tokens[:3].tolist()) for r in DiskStore(tmp_path / "bounded", IDENTITY).scan()
            if r.since == 0}
    assert tuple(prompts[-1][:3]) in kept and tuple(prompts[0][:3]) not in kept     # least recently used went first


def test_a_failing_snapshot_costs_the_reuse_not_the_request(caplog):
    """A session that cannot store its state (out of memory, or an old-contract snapshot()) still serves: every
    request prefills from scratch and finishes; the failure is logged once."""
    import asyncio

    from ds4cupy.server.protocol import SamplingFields
    from ds4cupy.server.worker import EngineWorker, EventChannel, GenerationJob, JobFinished

    class NoSnapshots(RowSession):
        def snapshot(self, since=0):
            raise MemoryError("no room for a snapshot")

    class OneToken:
        def __init__(self, job):
            self.completion_tokens = [7]

        def stream(self, session, logits):
            yield type("Delta", (), {"token_id": 7, "finish_reason": "stop", "content": "x"})()

    session = NoSnapshots()
    worker = EngineWorker(session, OneToken, prefill_chunk=8).start()

    async def main():
        out = []
        for name in ("a", "b"):
            job = GenerationJob(request_id=name, prompt_ids=list(range(1, 30)), max_tokens=1,
                                sampling=SamplingFields(), channel=EventChannel())
            worker.submit(job)
            while not isinstance(event := await asyncio.wait_for(job.channel.get(), 10), JobFinished):
                pass
            out.append(event)
        return out

    try:
        with caplog.at_level("WARNING", logger="ds4cupy.server"):
            first, second = asyncio.run(main())
    finally:
        worker.stop()
    assert first.cached_tokens == 0 and second.cached_tokens == 0 and session.prefilled_tokens == 2 * 29
    assert caplog.text.count("cannot store the session state") == 1 and "MemoryError" in caplog.text
