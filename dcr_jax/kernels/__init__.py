"""Kernel analysis: the exact first-token logit eNTK (jvp/vjp rows, or per-layer factors: `structured`) over
parameter subsets, and similarity measures."""

from dcr_jax.kernels.ntk import (
    first_token_logits_fn,
    logit_kernel,
    next_token_probs,
    ntk_vector_product,
    pairwise_kernel,
    param_filter,
    predict_one_step_change,
    response_logprob_fn,
    scalar_kernel,
    split_params,
    token_set,
)
from dcr_jax.kernels.similarity import block_means, kernel_cosine, kernel_matrix, kernel_ratio

__all__ = ["param_filter", "split_params", "first_token_logits_fn", "response_logprob_fn", "next_token_probs",
           "token_set", "logit_kernel", "scalar_kernel", "pairwise_kernel", "ntk_vector_product",
           "predict_one_step_change", "kernel_matrix", "kernel_ratio", "kernel_cosine", "block_means"]
