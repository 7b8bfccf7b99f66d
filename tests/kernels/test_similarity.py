"""Kernel similarity measures and group block means on hand-made matrices with exact expected values."""

import numpy as np
import pytest

from dcr_jax.errors import UserError
from dcr_jax.kernels.similarity import (
    block_inner,
    block_means,
    block_norms,
    group_names,
    kernel_cosine,
    kernel_matrix,
    kernel_ratio,
)

# Two prompts, |S| = 2: K(0,0) = 2I, K(0,1) = [[1,1],[0,1]], K(1,0) = K(0,1)ᵀ, K(1,1) = diag(3, 1).
K = np.array([[[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 1.0]]],
              [[[1.0, 0.0], [1.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]]])


def test_kernel_matrix_layout():
  expected = [[2, 0, 1, 1], [0, 2, 0, 1], [1, 0, 3, 0], [1, 1, 0, 1]]
  np.testing.assert_array_equal(kernel_matrix(K), expected)
  np.testing.assert_array_equal(kernel_matrix(np.eye(2)), np.eye(2))


def test_block_norms_and_inner_products():
  np.testing.assert_allclose(block_norms(K), np.sqrt([[8, 3], [3, 10]]))
  np.testing.assert_array_equal(block_inner(K, "trace"), [[4, 2], [2, 4]])
  np.testing.assert_allclose(block_inner(K, "frobenius"), np.sqrt([[8, 3], [3, 10]]))
  with pytest.raises(UserError, match="reduction"):
    block_inner(K, "max")


def test_paper_ratio():
  np.testing.assert_allclose(kernel_ratio(K), [[1, np.sqrt(3 / 8)], [np.sqrt(3 / 10), 1]])
  cross = K[:1]  # K(x′ = 0, x ∈ {0, 1}) needs the self block of x′
  np.testing.assert_allclose(kernel_ratio(cross, self_blocks=K[0, 0][None]), [[1, np.sqrt(3 / 8)]])
  np.testing.assert_allclose(kernel_ratio(np.array([[4.0, -2.0], [-2.0, 9.0]])), [[1, 0.5], [2 / 9, 1]])
  with pytest.raises(UserError, match="self_blocks"):
    kernel_ratio(cross)


def test_cosine():
  np.testing.assert_allclose(kernel_cosine(K), [[1, 0.5], [0.5, 1]])  # traces 4, 2, 4
  off = np.sqrt(3) / 80 ** 0.25  # ‖K01‖ / √(‖K00‖ ‖K11‖) = √3 / (√8 √10)^½
  np.testing.assert_allclose(kernel_cosine(K, "frobenius"), [[1, off], [off, 1]])
  np.testing.assert_allclose(kernel_cosine(np.array([[4.0, -3.0], [-3.0, 9.0]])), [[1, -0.5], [-0.5, 1]])


def test_block_means_exact():
  m = np.arange(25.0).reshape(5, 5)
  groups = ["toxic", "seemingly_toxic", "general", "toxic", "seemingly_toxic"]
  names, means, counts = block_means(m, groups)
  assert names == ["seemingly_toxic", "toxic", "general"]
  np.testing.assert_array_equal(means, [[15, 14, 14.5], [10, 9, 9.5], [12.5, 11.5, np.nan]])
  np.testing.assert_array_equal(counts, [[2, 4, 2], [4, 2, 2], [2, 2, 0]])
  _, means, counts = block_means(m, groups, include_diagonal=True)
  np.testing.assert_array_equal(np.diagonal(means), [15, 9, 12])
  np.testing.assert_array_equal(np.diagonal(counts), [4, 4, 1])


def test_block_means_cross_sets_and_names():
  names, means, counts = block_means([[1, 2, 3], [4, 5, 6]], ["toxic", "general"], ["toxic", "toxic", "general"])
  assert names == ["toxic", "general"]
  np.testing.assert_array_equal(means, [[1.5, 3], [4.5, 6]])
  np.testing.assert_array_equal(counts, [[2, 1], [2, 1]])
  names, means, _ = block_means(np.ones((2, 2)), ["a", "b"], names=["b", "a"], include_diagonal=True)
  assert names == ["b", "a"] and np.all(means == 1)
  assert group_names(["zeta", "general", "toxic", "alpha", "toxic"]) == ["toxic", "general", "zeta", "alpha"]
  with pytest.raises(UserError, match="does not match"):
    block_means(np.ones((2, 3)), ["toxic", "general"])
