"""The cross-Gramian transforms: ``cross_gramian_of`` and ``cross_gramian``, ``J_a J_bᵀ`` between
the Jacobians of fn on two batches (the empirical NTK's ``K(x_a, x_b)``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from torchgram._assemble_cross import cross_of_factors
from torchgram._factors import DEFAULT_CHUNK_BYTES
from torchgram._linearised import Linearised
from torchgram._memo import Probes, remembered
from torchgram._pytree import InDims, Inputs, normalize_argnums
from torchgram._shapes import generalize_cross
from torchgram._transform import _linearise, _options

Tensor = torch.Tensor


def cross_gramian_of(
    fn: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    batch_dim: int | None = None,
    in_dims: InDims = 0,
    has_aux: bool = False,
    check_samples: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Callable[[tuple[Any, ...], tuple[Any, ...]], Any]:
    """Transform ``fn`` into a function of two argument tuples that returns the cross-Gramian
    ``J_a J_bᵀ`` of its Jacobians on them.

    For ``out_a = fn(*args_a)`` of shape ``S_a`` and ``out_b = fn(*args_b)`` of shape ``S_b``,
    with the same parameters ``args_a[argnums]`` and ``args_b[argnums]`` (the same tensors), the
    result has shape ``S_a + S_b[::-1]``, its entry at ``(s, s')`` the inner product
    ``<d out_a[s] / d params, d out_b[s'] / d params>`` summed over every parameter. The
    empirical neural tangent kernel between two batches is one: ``K(x_test, x_train)``. With
    ``args_a`` equal to ``args_b`` it is the Gramian ``gramian_of(fn, argnums)(*args_a)``.

    fn runs once on each batch, as in [`gramian_of`][torchgram.gramian_of] (the same checks,
    and the same memory between calls); the per-use rules give each batch's factors, and each
    parameter's cross term is formed from them in the cheaper form: the ghost form
    ``<A_a A_bᵀ, D_a D_bᵀ>`` for linear maps, token equality for embeddings, per-sample gradients
    for the others, by chunks of at most ``max_chunk_bytes``.

    Args:
        fn: ``fn(*args) -> out`` (``-> (out, aux)`` with ``has_aux``), as for
            [`gramian_of`][torchgram.gramian_of].
        argnums: The positional argument(s) of fn holding the parameters, the same tensors in
            both argument tuples.
        batch_dim: The output dimension that indexes independent samples, or None; see
            [`gramian_of`][torchgram.gramian_of]. With it, the two batches may differ in size.
        in_dims: Where the samples lie in fn's other arguments, the same for both tuples.
        has_aux: fn returns ``(out, aux)``; ``(aux_a, aux_b)`` is returned last.
        check_samples: The first call's checks, as for [`gramian_of`][torchgram.gramian_of].
        max_chunk_bytes: The largest intermediate built at once, as for
            [`gramian_of`][torchgram.gramian_of].

    Returns:
        A function ``(args_a, args_b) -> G_ab`` (and ``(aux_a, aux_b)``), each a tuple of fn's
        positional arguments.

    Examples:
        >>> import torch, torchgram
        >>> def f(w, x):
        ...     return torch.tanh(x @ w).sum(-1)                 # [B]
        >>> w = torch.randn(3, 2)
        >>> x_a, x_b = torch.randn(4, 3), torch.randn(6, 3)
        >>> K = torchgram.cross_gramian_of(f, batch_dim=0)((w, x_a), (w, x_b))
        >>> K.shape
        torch.Size([4, 6])
        >>> J_a = torch.func.jacrev(f)(w, x_a).flatten(1)
        >>> J_b = torch.func.jacrev(f)(w, x_b).flatten(1)
        >>> torch.allclose(K, J_a @ J_b.T, atol=1e-5)
        True
    """
    return _cross_transform(
        fn, argnums, batch_dim, in_dims, has_aux, check_samples, max_chunk_bytes, Probes()
    )


def cross_gramian(
    fn: Callable[..., Any],
    params: Any,
    args_a: tuple[Any, ...],
    args_b: tuple[Any, ...],
    *,
    batch_dim: int | None = None,
    in_dims: InDims = 0,
    has_aux: bool = False,
    check_samples: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Any:
    """The cross-Gramian ``J_a J_bᵀ`` of ``fn(params, *args_a)`` and ``fn(params, *args_b)``.

    Eager form of [`cross_gramian_of`][torchgram.cross_gramian_of]
    (``cross_gramian_of(fn, argnums=0, ...)((params, *args_a), (params, *args_b))``), as
    [`gramian`][torchgram.gramian] is of [`gramian_of`][torchgram.gramian_of]: called in a
    loop with the same ``fn`` it remembers what it learned of ``fn``.

    Args:
        fn: ``fn(params, *args) -> out`` (``-> (out, aux)`` with ``has_aux``).
        params: The parameters, any pytree of floating-point tensors.
        args_a: fn's other positional arguments for the first batch, a tuple.
        args_b: The same for the second batch.
        batch_dim: As for [`cross_gramian_of`][torchgram.cross_gramian_of].
        in_dims: As for [`cross_gramian_of`][torchgram.cross_gramian_of].
        has_aux: fn returns ``(out, aux)``; ``(aux_a, aux_b)`` is returned last.
        check_samples: As for [`gramian_of`][torchgram.gramian_of].
        max_chunk_bytes: As for [`gramian_of`][torchgram.gramian_of].

    Returns:
        ``S_a + S_b[::-1]`` (and ``(aux_a, aux_b)``).

    Examples:
        >>> import torch, torchgram
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> def f(params, x):
        ...     return torch.func.functional_call(model, params, (x,)).squeeze(-1)
        >>> x_train, x_test = torch.randn(10, 3), torch.randn(4, 3)
        >>> K_test_train = torchgram.cross_gramian(f, params, (x_test,), (x_train,), batch_dim=0)
        >>> K_test_train.shape
        torch.Size([4, 10])
        >>> K_train = torchgram.gramian(f, params, x_train, batch_dim=0)
        >>> same = torchgram.cross_gramian(f, params, (x_train,), (x_train,), batch_dim=0)
        >>> torch.allclose(same, K_train)
        True
    """
    caller = f"cross_gramian(fn, batch_dim={batch_dim})"
    for name, value in (("args_a", args_a), ("args_b", args_b)):
        if not isinstance(value, tuple):
            raise TypeError(
                f"{caller}: {name} must be a tuple of fn's positional arguments after params, "
                f"got {type(value).__name__}. For one argument x, pass (x,)."
            )
    transform = _cross_transform(
        fn, 0, batch_dim, in_dims, has_aux, check_samples, max_chunk_bytes, remembered(fn),
        "cross_gramian",
    )  # fmt: skip
    return transform((params, *args_a), (params, *args_b))


def _cross_transform(
    fn: Callable[..., Any],
    argnums: int | tuple[int, ...],
    batch_dim: int | None,
    in_dims: InDims,
    has_aux: bool,
    check_samples: bool,
    max_chunk_bytes: int,
    probes: Probes,
    name: str = "cross_gramian_of",
) -> Callable[[tuple[Any, ...], tuple[Any, ...]], Any]:
    caller = f"{name}(fn, batch_dim={batch_dim})"
    options = _options(fn, caller, batch_dim, has_aux, check_samples, max_chunk_bytes)
    numbers = normalize_argnums(argnums, caller)

    @functools.wraps(fn)
    def wrapper(args_a: tuple[Any, ...], args_b: tuple[Any, ...]) -> Any:
        for label, value in (("args_a", args_a), ("args_b", args_b)):
            if not isinstance(value, tuple):
                raise TypeError(
                    f"{caller}: {label} must be a tuple of fn's positional arguments, got "
                    f"{type(value).__name__}."
                )
        inputs_a, run_a = _linearise(fn, args_a, numbers, in_dims, options, probes)
        inputs_b, run_b = _linearise(fn, args_b, numbers, in_dims, options, probes)
        assert isinstance(run_a, Linearised) and isinstance(run_b, Linearised)  # no group here
        _check_same_params(inputs_a, inputs_b, caller)
        shape_a, shape_b = run_a.out.shape, run_b.out.shape
        _check_shapes(shape_a, shape_b, batch_dim, caller)
        dim = run_a.batch_dim
        if not shape_a.numel() or not shape_b.numel():
            flat = run_a.out.new_zeros(shape_a.numel(), shape_b.numel())
        else:
            flat = cross_of_factors(
                run_a.contributions,
                run_b.contributions,
                inputs_a.params,
                (shape_a.numel(), shape_b.numel()),
                options.chunk_bytes,
            )
        G = generalize_cross(flat, shape_a, shape_b, dim)
        return (G, (run_a.aux, run_b.aux)) if has_aux else G

    return wrapper


def _check_same_params(a: Inputs, b: Inputs, caller: str) -> None:
    same = a.params_spec == b.params_spec and all(
        x is y for x, y in zip(a.params, b.params, strict=True)
    )
    if not same:
        raise ValueError(
            f"{caller}: the parameters in args_a and args_b (at argnums) must be the same "
            "tensors: a cross-Gramian compares two batches' Jacobians with respect to one set "
            "of parameters. Pass the same pytree in both argument tuples."
        )


def _check_shapes(
    shape_a: torch.Size, shape_b: torch.Size, batch_dim: int | None, caller: str
) -> None:
    if batch_dim is not None and len(shape_a) != len(shape_b):
        raise ValueError(
            f"{caller}: fn's outputs on the two batches have shapes {list(shape_a)} and "
            f"{list(shape_b)}; with batch_dim they must have as many dimensions, the samples "
            "at batch_dim in both."
        )
