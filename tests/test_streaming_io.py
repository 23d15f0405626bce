"""The streamed pass's reading and recording: O_DIRECT byte ranges, reads straight into the fused
expert tensors, the one-layer-ahead prefetcher, and the all-experts recording forward (the same
numbers, bit for bit, as the per-expert loop it replaced)."""
import os
import threading
import time

import pytest
import torch

from conftest import ARCHS
from secompress.adapters import get_adapter
from secompress.direct_read import ShardReader
from secompress.experts import expert_forward
from secompress.instrument import Recorder, _fused_forward, row_stats
from secompress.pipeline import Stream, Streamed, run_pass
from secompress.pipeline.prefetch import Prefetcher
from secompress.source import Source
from secompress.streaming import Checkpoint, build_skeleton, layer_tensors, read_module
from secompress.testing import make_tiny, save_tiny


# ---- O_DIRECT reads ------------------------------------------------------------------------------

@pytest.fixture()
def blob(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (3 * 2**20 + 12345,), dtype=torch.uint8, generator=g).numpy().tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("bounce", [4096, 3 * 4096, 2**20])
def test_byte_ranges_read_back_exactly(blob, direct, bounce):
    path, data = blob
    r = ShardReader(direct, bounce_bytes=bounce)
    g = torch.Generator().manual_seed(1)
    try:
        assert r.is_direct(path) == (direct and hasattr(os, "O_DIRECT"))
        cases = [(0, 0), (0, 1), (4095, 2), (4096, 4096), (len(data) - 7, 7), (1, bounce + 5)]
        cases += [(int(a), int(n)) for a, n in zip(torch.randint(0, len(data) - 300_000, (40,), generator=g),
                                                     torch.randint(0, 300_000, (40,), generator=g))]
        for a, n in cases:
            dst = torch.full((n,), 7, dtype=torch.uint8)
            assert r.readinto(path, a, dst) == n
            assert dst.numpy().tobytes() == data[a:a + n], (a, n)
        dst = torch.empty(100, dtype=torch.uint8)
        assert r.readinto(path, len(data) - 40, dst) == 40  # the end of the file
        assert dst[:40].numpy().tobytes() == data[-40:]
    finally:
        r.close()


def test_a_file_system_refusing_o_direct_falls_back_to_plain_reads(blob, monkeypatch):
    path, data = blob
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (_ for _ in ()).throw(OSError(22, "EINVAL"))
                        if flags & getattr(os, "O_DIRECT", 0) else real_open(p, flags, *a))
    r = ShardReader(True)
    dst = torch.empty(5000, dtype=torch.uint8)
    assert r.readinto(path, 123, dst) == 5000 and dst.numpy().tobytes() == data[123:5123]
    assert not r.is_direct(path)
    r.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_o_direct_refused_at_read_time_falls_back_for_that_file(blob, monkeypatch):
    path, data = blob
    r = ShardReader(True)
    if not r.is_direct(path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(22, "EINVAL")))
    dst = torch.empty(5000, dtype=torch.uint8)
    assert r.readinto(path, 99, dst) == 5000 and dst.numpy().tobytes() == data[99:5099]
    assert not r.is_direct(path)
    r.close()


# ---- reading layers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return save_tiny(make_tiny("qwen3_moe").to(torch.bfloat16), tmp_path_factory.mktemp("bf16") / "m")


def test_read_into_a_slice_and_with_a_cast(bf16_dir):
    ck = Checkpoint(bf16_dir)
    key = "model.layers.0.mlp.experts.1.down_proj.weight"
    with ck.reading():
        want = ck.get(key)
        big = torch.zeros(3, *want.shape, dtype=torch.bfloat16)
        ck.read_into(key, big[1])  # bytes straight into the middle of a larger tensor
        f32 = torch.empty(want.shape, dtype=torch.float32)
        ck.read_into(key, f32)  # read, then cast
        with pytest.raises(Exception, match="shape"):
            ck.read_into(key, torch.empty(2, 2, dtype=torch.bfloat16))
    assert torch.equal(big[1], want) and not big[0].any() and not big[2].any()
    assert torch.equal(f32, want.float())


@pytest.mark.parametrize("direct", [True, False])
def test_layer_tensors_fuse_per_expert_keys_as_the_model_holds_them(bf16_dir, direct):
    model = make_tiny("qwen3_moe").to(torch.bfloat16)
    skeleton = build_skeleton(model.config)
    ad = get_adapter(model.config)
    ck = Checkpoint(bf16_dir, direct=direct)
    for dtype in (torch.bfloat16, torch.float32):  # in place, and read + cast
        got = layer_tensors(ad.layers(skeleton)[1], "model.layers.1.", ck, ad, dtype)
        want = dict(ad.layers(model)[1].named_parameters())
        assert set(got) == set(want)
        for k, t in got.items():
            assert t.dtype == dtype and torch.equal(t, want[k].to(dtype)), k


def test_a_prefetch_thread_reads_with_its_own_files(bf16_dir):
    """The main thread's open files and a worker's are separate (each inside its own reading block)."""
    model = make_tiny("qwen3_moe").to(torch.bfloat16)
    ad = get_adapter(model.config)
    skeleton = build_skeleton(model.config)
    ck = Checkpoint(bf16_dir)
    with ck.reading():
        with Prefetcher(lambda i: layer_tensors(ad.layers(skeleton)[i], f"model.layers.{i}.", ck, ad,
                                                torch.bfloat16)) as pre:
            pre.get(0, then=1)  # layer 1 read in the worker meanwhile
            a = read_module(ad.layers(skeleton)[1], "model.layers.1.", ck, ad, torch.bfloat16)  # main thread
            b = pre.get(1)
        assert ck.get("model.norm.weight") is not None  # the main thread's files are still open
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k])


# ---- the prefetcher -----------------------------------------------------------------------------

def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("secompress-prefetch")]


def _gated_load():
    started, gate = [], {i: threading.Event() for i in range(6)}

    def load(i):
        started.append((i, threading.current_thread().name))
        assert gate[i].wait(5)
        return i * 10

    return load, started, gate


def test_prefetcher_loads_the_next_one_while_the_caller_works_and_no_further():
    load, started, gate = _gated_load()
    with Prefetcher(load) as pre:
        gate[0].set()
        assert pre.get(0, then=1) == 0
        time.sleep(0.2)
        assert [i for i, _ in started] == [0, 1]  # layer 1 is being read while the caller works on 0; not 2
        assert all(name.startswith("secompress-prefetch") for _, name in started)
        gate[1].set()
        assert pre.get(1, then=2) == 10
        time.sleep(0.2)
        assert [i for i, _ in started] == [0, 1, 2]
        for i in (2, 3, 4):
            gate[i].set()
        assert [pre.get(2, then=3), pre.get(3, then=4), pre.get(4)] == [20, 30, 40]
        assert [i for i, _ in started] == [0, 1, 2, 3, 4]  # each loaded once
    assert not _prefetch_threads()


def test_prefetcher_in_any_order_and_after_a_wrong_guess():
    load, started, gate = _gated_load()
    for g in gate.values():
        g.set()
    with Prefetcher(load) as pre:
        assert [pre.get(5, then=4), pre.get(4, then=3)] == [50, 40]  # descending (HEAPr's backward pass)
        assert pre.get(1, then=0) == 10  # not the one read ahead (3): dropped, 1 loaded
        assert pre.get(0) == 0  # read ahead
        assert pre.get(2) == 20  # neither read ahead nor a next one: in the caller's thread
        assert [i for i, _ in started] == [5, 4, 3, 1, 0, 2]
        assert started[-1][1] == threading.current_thread().name
    assert not _prefetch_threads()


def test_prefetcher_raises_a_load_error_at_its_key_and_closes():
    def load(i):
        if i == 2:
            raise KeyError("no tensor for layer 2")
        return i

    with pytest.raises(KeyError, match="layer 2"):
        with Prefetcher(load) as pre:
            assert [pre.get(0, then=1), pre.get(1, then=2)] == [0, 1]
            pre.get(2, then=3)
    assert not _prefetch_threads()


# ---- the streamed layer source ------------------------------------------------------------------

def _recording_reads(monkeypatch, done=None):
    """Streamed._read wrapped: (layer, thread name) of every read; ``done[i]`` set when a read of i ends."""
    reads = []
    real = Streamed._read

    def read(self, i):
        reads.append((i, threading.current_thread().name))
        out = real(self, i)
        if done is not None and i in done:
            done[i].set()
        return out

    monkeypatch.setattr(Streamed, "_read", read)
    return reads


def _assert_layer_equals(layer, want):
    got = dict(layer.named_parameters())
    assert set(got) == set(dict(want.named_parameters()))
    for k, p in want.named_parameters():
        assert torch.equal(got[k], p), k


@pytest.mark.parametrize("descending", [False, True])
def test_streamed_source_reads_each_layer_once_the_next_one_ahead(bf16_dir, monkeypatch, descending):
    model = make_tiny("qwen3_moe").to(torch.bfloat16)
    reads = _recording_reads(monkeypatch)
    src = Streamed(Source.open(bf16_dir, dtype="bfloat16", device="cpu"))
    L = len(src.layers)
    order = list(range(L))[::-1] if descending else list(range(L))
    for n, i in enumerate(order):
        layer = src.open(i, then=order[n + 1] if n + 1 < L else None)
        _assert_layer_equals(layer, get_adapter(model.config).layers(model)[i])
        src.close(i)
    src.end()
    assert [i for i, _ in reads] == order  # each layer once, in the order opened
    assert all(name.startswith("secompress-prefetch") for _, name in reads[1:])  # all but the first: ahead
    assert not _prefetch_threads()


def test_a_layer_changed_after_it_was_read_ahead_is_read_again(bf16_dir, monkeypatch):
    """A step that loads or replaces part of layer i+1 while layer i runs: what was read ahead is not used."""
    model = make_tiny("qwen3_moe").to(torch.bfloat16)
    done = {1: threading.Event()}
    reads = _recording_reads(monkeypatch, done)
    src = Streamed(Source.open(bf16_dir, dtype="bfloat16", device="cpu"))
    src.open(0, then=1)
    assert done[1].wait(10)  # layer 1 read ahead, then changed
    norm = src.layers[1].input_layernorm
    mine = torch.full(norm.weight.shape, 3.0, dtype=torch.bfloat16)
    norm.weight = torch.nn.Parameter(mine, requires_grad=False)  # loaded by a step, not to be overwritten
    layer = src.open(1)
    src.end()
    assert [i for i, _ in reads] == [0, 1, 1]  # read ahead, then again
    assert layer.input_layernorm.weight is not None and torch.equal(layer.input_layernorm.weight, mine)
    want = dict(get_adapter(model.config).layers(model)[1].named_parameters())
    for k, p in layer.named_parameters():
        if k != "input_layernorm.weight":
            assert torch.equal(p, want[k]), k


def test_a_pass_that_fails_leaves_no_read_ahead_thread(bf16_dir):
    class Boom:
        def on_layer(self, index, layer, inputs):
            if index == 1:
                raise RuntimeError("step failed at layer 1")

    src = Streamed(Source.open(bf16_dir, dtype="bfloat16", device="cpu"))
    ids = torch.randint(0, src.config.vocab_size, (2, 16))
    with pytest.raises(RuntimeError, match="layer 1"):
        run_pass(src, {"x": Stream([ids])}, [Boom()], progress=False)
    assert not _prefetch_threads()


# ---- the recording forward ----------------------------------------------------------------------

def _per_expert_loop(experts, rec: Recorder, layer: int, hidden, idx, w):
    """The recording forward it replaced: one expert at a time, ``index_add_`` into the output."""
    E, K = experts.num_experts, idx.shape[-1]
    out = torch.zeros_like(hidden)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1)[:E].tolist()
    start, cols, toks, stats, ws = 0, [], [], [], []
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sel = order[start:start + c]
        start += c
        tok, slot = sel // K, sel % K
        act, y = expert_forward(experts, e, hidden[tok])
        weight = w[tok, slot]
        out.index_add_(0, tok, (y * weight[:, None]).to(out.dtype))
        cols.append(torch.full_like(tok, e)), toks.append(tok), ws.append(weight)
        stats.append(row_stats(act, y))
    rec.observe_rows(layer, E, torch.cat(cols), torch.cat(toks), *(torch.cat(z) for z in zip(*stats)), torch.cat(ws))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_experts_forward_equals_the_per_expert_loop_bit_for_bit(arch, dtype):
    model = make_tiny(arch).to(dtype)
    ad = get_adapter(model.config)
    experts = next(ad.experts_of(b) for b in map(ad.block_of, ad.layers(model)) if b is not None)
    E, T, K = experts.num_experts, 96, 3
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, model.config.hidden_size, generator=g).to(dtype)
    idx = torch.rand(T, E, generator=g).topk(K, dim=-1).indices  # [T, K] distinct experts, unsorted
    idx[5, 1] = E  # an EP sentinel: no expert runs for it
    w = torch.rand(T, K, generator=g).softmax(-1).to(dtype)
    ref, new = Recorder(seq_len=32), Recorder(seq_len=32)
    with torch.no_grad():
        want = _per_expert_loop(experts, ref, 0, hidden, idx, w)
        got = _fused_forward(new, 0)(experts, hidden, idx, w)
    assert got.dtype == want.dtype and torch.equal(got, want)
    a, b = ref.experts[0], new.experts[0]
    for field in ("out_max", "out_channel", "out_pos", "in_max", "tokens", "gate_sum", "norm_sum", "gated_norm_sum"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_a_streamed_pass_releases_each_layer_even_when_something_holds_its_modules(tmp_path):
    """The profile's hooks keep every experts module until the pass ends; the layer's weights must go anyway
    (the Qwen1.5-MoE shape outgrew 24 GiB when they did not)."""
    src_dir = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=3), tmp_path / "m")
    src = Streamed(Source.open(str(src_dir), dtype="float32", device="cpu"))
    held = []

    class Hold:
        def on_layer(self, i, layer, inputs):
            held.append(layer)  # as instrument's `swapped` list holds the experts modules

    run_pass(src, {"c": Stream([torch.randint(0, 200, (2, 8))], before=True)}, [Hold()], progress=False)
    assert len(held) == 3
    for layer in held:
        assert not [*layer.parameters(), *layer.buffers()], "the layer's weights are kept alive"
