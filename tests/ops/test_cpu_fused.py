"""The compiled CPU stage 2 (ops.cpu_fused) equals the reference bit for bit where it is used, and
hands every other case to the torch-op path: torch's bilinear weights replayed, the probe per
shape, 224x224 from the maps real backbones give, edge cases, threads, maps it refuses."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from test_cpu_agreement import assert_bit_equal, edge_cases, reference

from xal_engine.ops import cpu_agreement, cpu_fused
from xal_engine.ops.cpu_agreement import Workspace, upsample_agreement
from xal_engine.ops.reference import roi_agreement, upsample_normalise


@pytest.mark.parametrize(("n_in", "n_out"), [(56, 224), (7, 224), (13, 100), (17, 61), (3, 224), (9, 30),
                                             (224, 56), (40, 40), (1, 5)])
def test_axis_weights_are_torchs(n_in, n_out):
    """Impulse responses: torch's 1-D bilinear of e_q is column q of the interpolation matrix."""
    i0, i1, l0, l1 = cpu_fused.bilinear_axis(n_in, n_out)
    want = torch.stack([F.interpolate(torch.eye(n_in)[q][None, None, None], (1, n_out), mode="bilinear",
                                      align_corners=False)[0, 0, 0] for q in range(n_in)])  # [n_in, n_out]
    got = torch.zeros(n_in, n_out)
    cols = torch.arange(n_out)
    got.index_put_((torch.from_numpy(i0), cols), torch.from_numpy(l0), accumulate=True)
    got.index_put_((torch.from_numpy(i1), cols), torch.from_numpy(l1), accumulate=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("side", [7, 14, 28, 56])
@pytest.mark.parametrize("seed", range(3))
def test_224_from_backbone_maps_is_the_fused_path_and_the_reference_bits(side, seed):
    assert cpu_fused.fused_matches_torch(side, side, 224, 224)
    g = torch.Generator().manual_seed(seed)
    cam = torch.rand(9, side, side, generator=g)
    rois = torch.rand(9, 224, 224, generator=g) < float(torch.rand(1, generator=g))
    threshold = float(torch.rand(1, generator=g))
    assert_bit_equal(upsample_agreement(cam, rois, threshold, Workspace()), reference(cam, rois, threshold))


def test_odd_shapes_the_probe_passes_equal_the_reference():
    """Odd map and ROI sides the probe accepts here (a different torch build may route them elsewhere)."""
    g = torch.Generator().manual_seed(3)
    used = 0
    for h, w, height, width in [(13, 17, 100, 61), (5, 5, 77, 77), (4, 4, 81, 81), (9, 11, 96, 130)]:
        cam = torch.rand(5, h, w, generator=g)
        rois = torch.rand(5, height, width, generator=g) > 0.4
        used += cpu_fused.fused_matches_torch(h, w, height, width)
        assert_bit_equal(upsample_agreement(cam, rois, 0.35, Workspace()), reference(cam, rois, 0.35))
    assert used >= 3  # measured here: all four


def test_a_shape_where_torch_computes_otherwise_goes_the_torch_way(monkeypatch):
    """Torch's CPU bilinear takes another formula for small output planes (here 30x30); the probe sees it,
    and the results are the reference's all the same."""
    assert not cpu_fused.fused_matches_torch(4, 4, 30, 30)
    called = []
    monkeypatch.setattr(cpu_fused, "agreement", lambda *a: called.append(a))
    g = torch.Generator().manual_seed(4)
    cam, rois = torch.rand(6, 4, 4, generator=g), torch.rand(6, 30, 30, generator=g) > 0.5
    assert_bit_equal(upsample_agreement(cam, rois, 0.5, Workspace()), reference(cam, rois, 0.5))
    assert called == []


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_edge_cases_on_the_fused_path(threshold):
    cam, rois = edge_cases(56, (224, 224))
    got = upsample_agreement(cam, rois, threshold, Workspace())
    assert_bit_equal(got, reference(cam, rois, threshold))
    assert got[0][0] == 0 and not got[3][0] and torch.isnan(got[0][1]) and torch.isnan(got[0][6])
    assert not got[3][1] and not got[3][6] and got[0][4] == 0


def test_maps_with_a_sign_bit_go_the_torch_way():
    """-0.0 and negative values (no stage-1 map has them) would break the integer min/max: the
    compiled pass refuses the batch (None), and the results are the torch-op path's."""
    g = torch.Generator().manual_seed(6)
    cam = torch.rand(4, 56, 56, generator=g)
    rois = torch.rand(4, 224, 224, generator=g) > 0.5
    flat = rois.reshape(4, -1)
    assert cpu_fused.agreement(cam, flat, (224, 224), 0.5) is not None
    cam[1, 0, 0] = -0.0
    assert cpu_fused.agreement(cam, flat, (224, 224), 0.5) is None
    assert_bit_equal(upsample_agreement(cam, rois, 0.5, Workspace()), reference(cam, rois, 0.5))
    cam[1, 0, 0], cam[2] = 0.0, cam[2] - 0.5
    assert cpu_fused.agreement(cam, flat, (224, 224), 0.5) is None
    assert_bit_equal(upsample_agreement(cam, rois, 0.5, Workspace()), reference(cam, rois, 0.5))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_give_the_same_bits(threads):
    g = torch.Generator().manual_seed(7)
    cam, rois = torch.rand(11, 28, 28, generator=g), torch.rand(11, 224, 224, generator=g) > 0.3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = upsample_agreement(cam, rois, 0.5, Workspace())
    finally:
        torch.set_num_threads(before)
    assert_bit_equal(got, reference(cam, rois, 0.5))


@pytest.mark.parametrize("n", [8, 9, 31, 32, 33, 100, 255, 1000, 3136, 4097, 50176, 65536, 70001, 1 << 20])
def test_row_sum_is_torchs_sum_bit_for_bit(n):
    """Plain and masked. Lengths through every branch of torch's cascade: under one row of 32, tails of vectors and of
    values, one chunk, several chunks and levels (2**20: 32768 rows, chunks of 16, three levels)."""
    kernels = cpu_fused._kernels()
    g = torch.Generator().manual_seed(n)
    x = torch.rand(3, n, generator=g) * (torch.rand(3, n, generator=g) > 0.3)  # zeros as where(R, S, 0) has
    x[2] *= 1e4 * torch.rand(n, generator=g)  # a wide range: an order difference shows in the last bits
    levels = torch.empty(4, 32).numpy()
    want = x.sum(1)  # the reference's per-image sums: rows of a (B, P) batch, each summed whole
    got = torch.tensor([kernels.row_sum(row, levels) for row in x.numpy()])
    assert torch.equal(got, want)
    r = torch.rand(3, n, generator=g) > 0.5  # the masked sum, sum(where(R, S, 0)), without writing it
    want = torch.where(r, x, 0.0).sum(1)
    got = torch.tensor([kernels.masked_row_sum(row, m, levels) for row, m in zip(x.numpy(), r.numpy().view("u1"))])
    assert torch.equal(got, want)


def test_level_power_is_torchs_chunk_rule():
    kernels = cpu_fused._kernels()
    assert [kernels.level_power(r) for r in (0, 1, 2, 3, 16, 1 << 16, (1 << 16) + 1, 1 << 20, (1 << 20) + 1)] \
        == [4, 4, 4, 4, 4, 4, 4, 5, 5]


def test_the_metrics_are_the_references_bits_and_nothing_big_is_written():
    g = torch.Generator().manual_seed(8)
    cam, rois = torch.rand(5, 14, 14, generator=g), torch.rand(5, 224, 224, generator=g) > 0.5
    got = cpu_fused.agreement(cam, rois.reshape(5, -1), (224, 224), 0.25)
    assert got is not None and [tuple(t.shape) for t in got] == [(5,)] * 4
    assert_bit_equal(got, roi_agreement(upsample_normalise(cam, (224, 224)), rois, 0.25))


def test_without_numba_every_shape_takes_the_torch_ops(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_kernels", lambda: None)  # as when `import numba` fails
    monkeypatch.setattr(cpu_fused, "_CHECKED", {})
    assert not cpu_fused.fused_matches_torch(56, 56, 224, 224)
    g = torch.Generator().manual_seed(9)
    cam, rois = torch.rand(4, 56, 56, generator=g), torch.rand(4, 224, 224, generator=g) > 0.5
    assert_bit_equal(upsample_agreement(cam, rois, 0.5, Workspace()), reference(cam, rois, 0.5))


def test_a_failing_compiler_leaves_the_shape_to_the_torch_ops(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_CHECKED", {})

    def broken(*args):
        raise RuntimeError("LLVM ERROR: no such target feature")

    monkeypatch.setattr(cpu_fused, "_in_parallel", broken)
    assert not cpu_fused.fused_matches_torch(56, 56, 224, 224)


def test_numba_is_imported_on_first_use_not_with_the_package():
    """Importing numba costs about half a second: a CLI command that scores nothing on a CPU skips it."""
    import subprocess
    import sys

    code = ("import sys, xal_engine.cli, xal_engine.ops; assert 'numba' not in sys.modules, 'imported'; "
            "from xal_engine.ops import cpu_fused; assert cpu_fused.available() and 'numba' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torchs_threads_and_the_thread_pool_give_the_same_bits(monkeypatch):
    """Both ways of splitting the images (numba's team on torch's OpenMP threads, where its omp
    layer loads; a pool of threads elsewhere) give the reference's bits."""
    g = torch.Generator().manual_seed(11)
    cam, rois = torch.rand(13, 14, 14, generator=g), torch.rand(13, 224, 224, generator=g) > 0.4
    want = reference(cam, rois, 0.5)
    team = cpu_fused.agreement(cam, rois.reshape(13, -1), (224, 224), 0.5)
    monkeypatch.setattr(cpu_fused, "_team", lambda: False)
    pool = cpu_fused.agreement(cam, rois.reshape(13, -1), (224, 224), 0.5)
    assert team is not None and pool is not None
    assert_bit_equal(team, want)
    assert_bit_equal(pool, want)


def test_the_team_launch_leaves_torchs_thread_count():
    """numba's OpenMP launch sets the runtime's thread count to its own (the cores): torch's comes
    back, so that `--threads 1` with loader workers stays one thread. In a fresh process, where the
    launch happens."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); from xal_engine.ops import cpu_fused; "
            "assert cpu_fused._team() in (True, False); assert torch.get_num_threads() == 1, torch.get_num_threads(); "
            "torch.set_num_threads(2); import numba; print(numba.threading_layer(), cpu_fused._team())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out[1] == str(out[0] == "omp")  # the team serves exactly where the omp layer loaded


def test_a_forked_child_scores_on_its_own_thread_pool():
    """numba's omp layer terminates a forked child that runs a parallel function (GNU OpenMP does not
    survive a fork): a child takes the pool, a new one (the parent's threads do not exist there)."""
    import os

    g = torch.Generator().manual_seed(12)
    cam, rois = torch.rand(6, 14, 14, generator=g), torch.rand(6, 224, 224, generator=g) > 0.5
    want = reference(cam, rois, 0.5)
    assert cpu_fused.fused_matches_torch(14, 14, 224, 224)
    assert_bit_equal(cpu_fused.agreement(cam, rois.reshape(6, -1), (224, 224), 0.5), want)  # launched here
    pool = cpu_fused._pool(2)
    pid = os.fork()
    if pid == 0:  # the child
        try:
            got = cpu_fused.agreement(cam, rois.reshape(6, -1), (224, 224), 0.5)
            same = got is not None and all(torch.equal(a, b) for a, b in zip(got, want))
            os._exit(0 if same and cpu_fused._forked and cpu_fused._pool(2) is not pool else 1)
        except BaseException:  # noqa: BLE001 - any failure in the child is its exit code
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_one_image_stays_on_the_reference():
    """A batch of one: torch splits its single row between threads, as the reference does; not fused."""
    g = torch.Generator().manual_seed(10)
    cam, rois = torch.rand(1, 56, 56, generator=g), torch.rand(1, 224, 224, generator=g) > 0.5
    assert_bit_equal(upsample_agreement(cam, rois, 0.5, Workspace()),
                     roi_agreement(upsample_normalise(cam, (224, 224)), rois, 0.5))


def test_slices_cover_the_batch_with_at_least_two_images():
    assert cpu_agreement.slices(7, 2) == [(0, 2), (2, 4), (4, 7)]
    assert cpu_agreement.slices(64, 10)[-1] == (60, 64) and cpu_agreement.slices(5, 8) == [(0, 5)]
    assert cpu_agreement.slices(9, 8) == [(0, 9)]
