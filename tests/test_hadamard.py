import numpy as np
import pytest
import scipy.linalg
import torch

from linearpatch_kernels import hadamard_matrix, is_supported_size
from linearpatch_kernels.hadamard import MAX_K, hadamard_factors, kernel_h_k

MODEL_SIZES = [576, 896, 960, 1536, 2304, 3072, 3584, 5120, 5376]
POWERS_OF_TWO = [2**i for i in range(16)]  # 1 ... 32768


@pytest.mark.parametrize("d", POWERS_OF_TWO[:11])
def test_powers_of_two_are_sylvester_like_scipy(d):
    h = hadamard_matrix(d, normalized=False)
    assert np.array_equal(h.numpy(), scipy.linalg.hadamard(d).astype(np.float64))


@pytest.mark.parametrize("d", POWERS_OF_TWO + MODEL_SIZES)
def test_factors_are_symmetric_hadamard(d):
    f = hadamard_factors(d)
    assert f.k * f.n == d and f.n == 2**f.log2_n and f.k <= MAX_K
    h_k = f.h_k
    assert set(h_k.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h_k, h_k.T)
    assert torch.equal(h_k @ h_k.T, f.k * torch.eye(f.k, dtype=torch.float64))


@pytest.mark.parametrize("d", [12, 20, 28, 44, 576, 896, 960, 1536, 2304, 3072])
def test_dense_matrix_is_orthonormal_and_symmetric(d):
    h = hadamard_matrix(d)
    assert h.shape == (d, d) and h.dtype == torch.float64
    assert torch.allclose(h.abs(), torch.full_like(h, d**-0.5))
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)


def test_smallest_k_is_chosen():
    # 576 = 36 * 16 (Paley II, q = 17); 1536 = 12 * 128 (Paley I, q = 11); 4096 needs no K at all.
    assert (hadamard_factors(576).k, hadamard_factors(1536).k, hadamard_factors(4096).k) == (36, 12, 1)
    assert hadamard_factors(5120).k == 20 and hadamard_factors(5376).k == 84


def test_dtype_and_device_arguments():
    h = hadamard_matrix(64, dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16
    assert torch.equal(h.float(), hadamard_matrix(64).float().to(torch.bfloat16).float())


@pytest.mark.parametrize("d", [100, 7, 4100, 0, -4])
def test_unsupported_size_names_d_and_neighbours(d):
    with pytest.raises(ValueError) as info:
        hadamard_matrix(d)
    message = str(info.value)
    assert f"size {d}" in message and "nearest supported" in message
    assert not is_supported_size(d)


def test_unsupported_size_suggests_real_sizes():
    with pytest.raises(ValueError, match=r"nearest supported: 88, 96, 104, 108"):
        hadamard_factors(100)


def test_non_integer_size_is_a_type_error():
    with pytest.raises(TypeError):
        hadamard_factors(64.0)


@pytest.mark.parametrize("d", [64, 576, 5120])
def test_kernel_factor_is_made_once_per_size_and_device(d):
    """The kernels' H_K is built once: a host copy per call would sync the GPU stream every op."""
    h = kernel_h_k(d, torch.device("cpu"))
    assert h.dtype == torch.float32 and h.is_contiguous()
    assert torch.equal(h.double(), hadamard_factors(d).h_k)
    assert kernel_h_k(d, torch.device("cpu")) is h
