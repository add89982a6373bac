"""The CUDA path of the logits stage (bf16 autocast, channels_last, pinned memory, compile, GPU JPEG decode).

Marked ``gpu``: run with ``pytest -m gpu`` on a machine with CUDA. Results must agree with the CPU path up to
bf16 tolerance, and the GPU path must be deterministic run to run.
"""

import numpy as np
import pytest
import torch

from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import open_logits
from stages.logits.stage import compute_logits
from tests.test_logits_support import NAMES, digits_data, jpeg, make_dataset, train_card

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    root = tmp_path_factory.mktemp("gpu")
    data = digits_data(root / "data")
    return root, data, train_card(root / "teacher", data, steps=6)


def _arrays(path, part=0, k=5):
    table = open_logits(path).read_part(part)
    return (fixed_list_to_numpy(table.column("topk_index"), k), fixed_list_to_numpy(table.column("topk_logit"), k),
            table.column("lse").to_numpy(), table.column("key").to_pylist())


@pytest.mark.parametrize("compile_model", [False, True])
def test_cuda_agrees_with_cpu_up_to_bf16_and_is_deterministic(inputs, tmp_path, compile_model):
    root, data, card = inputs
    cpu = compute_logits(data, card, tmp_path / "cpu", topk=5, temperature=2.0, device="cpu", num_workers=0)
    runs = [compute_logits(data, card, tmp_path / f"gpu{i}", topk=5, temperature=2.0, device="cuda",
                           compile_model=compile_model, num_workers=2) for i in range(2)]
    assert open_logits(runs[0]).params["compute"]["precision"] == "bf16-autocast"
    a, b = (p.parent / "part-000000.parquet" for p in runs)
    assert a.read_bytes() == b.read_bytes()
    idx_c, val_c, lse_c, keys_c = _arrays(cpu)
    idx_g, val_g, lse_g, keys_g = _arrays(runs[0])
    assert keys_c == keys_g and (idx_c[:, 0] == idx_g[:, 0]).mean() > 0.95
    np.testing.assert_allclose(lse_g, lse_c, rtol=3e-2, atol=3e-2)


def test_gpu_jpeg_decode_agrees_with_the_cpu_decoder(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(0)
    data = make_dataset(tmp_path / "d", [[{"__key__": f"k{i}", "jpg": jpeg(rng, (90, 60))} for i in range(40)]
                                         + [{"__key__": "bad", "jpg": b"\xff\xd8\xff" + b"x" * 50}]], NAMES)
    card = train_card(tmp_path / "t", None, steps=0)
    cpu = compute_logits(data, card, tmp_path / "cpu", topk=5, temperature=1.0, device="cuda", num_workers=1)
    gpu = compute_logits(data, card, tmp_path / "gpu", topk=5, temperature=1.0, device="cuda", gpu_decode=True,
                         num_workers=1)
    _, _, lse_c, keys_c = _arrays(cpu)
    _, _, lse_g, keys_g = _arrays(gpu)
    assert keys_c == keys_g == [f"k{i}" for i in range(40)]
    np.testing.assert_allclose(lse_g, lse_c, rtol=5e-2, atol=5e-2)
